"""Supervised fine-tuning of a chat model through the tinker SDK: a help-desk bot with fixed answers.

The data (examples/data/chat_sft.jsonl) is 8 questions a fictional app's users ask, each in 4
wordings, with one canned answer per question; the 4th wording of each is held out. Every exchange
is rendered with Qwen's ChatML template on token ids:

    <|im_start|>user\\n{question}<|im_end|>\\n<|im_start|>assistant\\n{answer}<|im_end|>

and only the answer tokens (and the closing <|im_end|>, so the bot learns to stop) carry weight
1; the prompt tokens carry weight 0. After each epoch it prints the mean NLL per answer token on
the training set (averaged over the epoch's batches, before each batch's update) and on the
held-out set; at the end it samples answers at temperature 0 for a few training questions.

The tokenizer: `training_client.get_tokenizer()` loads whatever `get_info()` reports as
`tokenizer_id`. For the built-in model, TuFT reports the folder where its worker saved the Qwen
tokenizer, a path on the server's machine that exists once the worker has loaded the model;
before that (or from another machine) it reports the model name, which only the Hugging Face Hub
could resolve. So this script loads the server's folder when it exists here (what get_tokenizer()
does), and otherwise builds the same tokenizer offline from this repository
(workers.engine.tiny.build_tiny_tokenizer, needing the server's dependencies) into --cache-dir.

Run `make run` (or `tuft launch`) in one terminal, then:

    python examples/sft_chat.py --steps 30

It prints `epoch=<n> train_nll=<x> heldout_nll=<y>` lines, `sample ...` lines and a final
`RESULT {json}` line; `main(argv)` returns the same dict. Works with tinker 0.25 and 0.38.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import tinker
from tinker import types

BASE_MODEL = "tuft/tiny-qwen3"
API_KEY = os.environ.get("TINKER_API_KEY", "tml-local-dev-key")
DATA = Path(__file__).resolve().parent / "data" / "chat_sft.jsonl"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"


def resolved(value: Any) -> Any:
    """0.38 returns futures of clients (using them directly is deprecated); 0.25 the clients."""
    return value.result() if hasattr(value, "result") else value


def load_tokenizer(training: Any, cache_dir: Path) -> tuple[Any, str]:
    tokenizer_id = training.get_info().model_data.tokenizer_id
    if tokenizer_id and Path(tokenizer_id).is_dir():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(tokenizer_id), f"server folder {tokenizer_id}"
    try:
        from workers.engine.tiny import build_tiny_tokenizer
    except ImportError as exc:
        raise SystemExit(
            f"the server reports tokenizer {tokenizer_id!r}, which is not a folder on this machine, and the "
            f"offline build needs the TuFT repository's dependencies ({exc}); run the server here and sample "
            "from the base model once, or use the repository's virtualenv"
        ) from exc
    return build_tiny_tokenizer(cache_dir), f"built offline from the repository into {cache_dir}"


class ChatFormat:
    """Qwen's ChatML on token ids: prompt = the user turn + the assistant header; completion = the
    answer + <|im_end|>. Pieces are encoded separately, so the boundary is always a token boundary."""

    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        self.im_end = int(tokenizer.convert_tokens_to_ids(IM_END))

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def prompt(self, question: str) -> list[int]:
        return self.encode(f"{IM_START}user\n{question}{IM_END}\n{IM_START}assistant\n")

    def completion(self, answer: str) -> list[int]:
        return [*self.encode(answer), self.im_end]

    def decode_answer(self, tokens: list[int]) -> str:
        if tokens and tokens[-1] == self.im_end:
            tokens = tokens[:-1]
        return str(self.tok.decode(tokens))


def sft_datum(prompt: list[int], completion: list[int]) -> types.Datum:
    tokens = prompt + completion
    weights = [0.0] * (len(prompt) - 1) + [1.0] * len(completion)
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": types.TensorData(data=tokens[1:], dtype="int64", shape=[len(tokens) - 1]),
            "weights": types.TensorData(data=weights, dtype="float32", shape=[len(weights)]),
        },
    )


def answer_tokens(data: list[types.Datum]) -> float:
    return float(sum(sum(d.loss_fn_inputs["weights"].data) for d in data))


def mean_nll(training: Any, data: list[types.Datum]) -> float:
    """forward() computes the loss without touching the weights; cross_entropy's loss:sum is the
    weighted NLL summed over tokens."""
    out = training.forward(data, "cross_entropy").result()
    return float(out.metrics["loss:sum"]) / answer_tokens(data)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Chat SFT on the built-in tiny model.")
    p.add_argument("--base-url", default=os.environ.get("TINKER_BASE_URL", "http://127.0.0.1:10610"))
    p.add_argument("--steps", type=int, default=30, help="optimizer steps (one per batch)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-2)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples", type=int, default=8, help="training questions answered at the end")
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--cache-dir", type=Path, default=Path("~/.cache/tuft/examples").expanduser())
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    rng = random.Random(args.seed)
    client = tinker.ServiceClient(base_url=args.base_url, api_key=API_KEY)
    training = resolved(client.create_lora_training_client(base_model=BASE_MODEL, rank=args.rank, seed=args.seed))
    tokenizer, source = load_tokenizer(training, args.cache_dir)
    print(f"model {training.model_id}: rank {args.rank}, lr {args.lr}; tokenizer: {source}", flush=True)

    chat = ChatFormat(tokenizer)
    rows = [json.loads(line) for line in args.data.read_text().splitlines() if line.strip()]
    examples: dict[str, list[tuple[str, str]]] = {"train": [], "heldout": []}
    for row in rows:
        user, assistant = (m["content"] for m in row["messages"])
        examples[row["split"]].append((user, assistant))
    train = [sft_datum(chat.prompt(q), chat.completion(a)) for q, a in examples["train"]]
    heldout = [sft_datum(chat.prompt(q), chat.completion(a)) for q, a in examples["heldout"]]
    print(f"{len(train)} training and {len(heldout)} held-out exchanges", flush=True)

    started = time.monotonic()
    epochs = [{"epoch": 0, "train_nll": mean_nll(training, train), "heldout_nll": mean_nll(training, heldout)}]
    print("epoch=0 train_nll={train_nll:.4f} heldout_nll={heldout_nll:.4f} (before training)".format(**epochs[0]))
    steps = 0
    while steps < args.steps:
        order = list(range(len(train)))
        rng.shuffle(order)
        batches = [[train[i] for i in order[at : at + args.batch_size]] for at in range(0, len(order), args.batch_size)]
        batches = batches[: args.steps - steps]
        # Submitted back to back: the server runs a run's ops in order, the client waits once.
        pending = []
        for batch in batches:
            pending.append((training.forward_backward(batch, "cross_entropy"), answer_tokens(batch)))
            training.optim_step(types.AdamParams(learning_rate=args.lr))
        losses = [(fb.result().metrics["loss:sum"], n) for fb, n in pending]
        steps += len(batches)
        epoch = {
            "epoch": len(epochs),
            "train_nll": sum(loss for loss, _ in losses) / sum(n for _, n in losses),
            "heldout_nll": mean_nll(training, heldout),
        }
        epochs.append(epoch)
        print("epoch={epoch} train_nll={train_nll:.4f} heldout_nll={heldout_nll:.4f}".format(**epoch), flush=True)

    sampler = resolved(training.save_weights_and_get_sampling_client())
    params = types.SamplingParams(max_tokens=32, temperature=0.0, stop=[chat.im_end])
    seen: set[str] = set()
    samples: list[dict[str, Any]] = []
    for question, answer in examples["train"]:
        if answer in seen or len(samples) == args.samples:
            continue
        seen.add(answer)
        out = sampler.sample(types.ModelInput.from_ints(chat.prompt(question)), 1, params).result()
        got = chat.decode_answer(list(out.sequences[0].tokens))
        samples.append({"question": question, "expected": answer, "got": got, "match": got == answer})
        print(f"sample question={question!r} got={got!r} match={got == answer}", flush=True)

    result = {
        "model_id": training.model_id,
        "tokenizer": source,
        "epochs": epochs,
        "samples": samples,
        "seconds": round(time.monotonic() - started, 1),
    }
    print("RESULT " + json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
