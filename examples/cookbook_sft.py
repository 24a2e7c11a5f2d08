"""tinker-cookbook's own supervised training loop (`tinker_cookbook.supervised.train`) against TuFT,
on the built-in model `tuft/tiny-qwen3` with the cookbook's `qwen3` renderer, fully offline.

Two things the cookbook needs that a Hugging Face model name would otherwise give it:

- a tokenizer: the cookbook's `get_tokenizer(model_name)` would ask the Hub for "tuft/tiny-qwen3".
  `register_tokenizer` answers it with the folder TuFT's worker writes at start-up,
  `<data dir>/cache/tokenizers/tiny-qwen3` (`~/.tuft` under `make run`), or, when that folder is not
  on this machine, the same tokenizer built offline from this repository;
- a renderer name: the cookbook only recommends renderers for models it knows, so `qwen3` is named
  explicitly (the built-in tokenizer is Qwen3's, `<think>` and `<|im_end|>` included).

The data is examples/data/chat_sft.jsonl (its 24 training rows). The cookbook's own
`FromConversationFileBuilder` builds a new renderer for every row, 0.5-2 s per row on a CPU for any
Qwen tokenizer (it copies the 151k-token backend), so this script renders all rows once with
one renderer and the cookbook's `conversation_to_datum`. Everything else is the cookbook's loop
unmodified: pipelined forward_backward + optim_step, its metrics.jsonl, its final checkpoint. Then
it samples one answer from the saved weights, prompted and parsed by the same renderer.

With `make run` going (or `tuft launch`), using the repository's .venv (`make cookbook` installs
tinker-cookbook 0.6.1 there):

    TINKER_API_KEY=tml-local-dev-key .venv/bin/python examples/cookbook_sft.py --steps 6

It prints the cookbook's metric tables, then `RESULT {json}` with each step's train_mean_nll.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import chz
import tinker
from tinker_cookbook import renderers
from tinker_cookbook.supervised import train
from tinker_cookbook.supervised.data import conversation_to_datum
from tinker_cookbook.supervised.types import SupervisedDataset, SupervisedDatasetBuilder
from tinker_cookbook.tokenizer_utils import get_tokenizer, register_tokenizer

BASE_MODEL = "tuft/tiny-qwen3"
RENDERER = "qwen3"
DATA = Path(__file__).resolve().parent / "data" / "chat_sft.jsonl"
DEFAULT_TOKENIZER_DIR = Path.home() / ".tuft" / "cache" / "tokenizers" / "tiny-qwen3"


def register_builtin_tokenizer(folder: Path) -> str:
    """Answer the cookbook's get_tokenizer("tuft/tiny-qwen3") without the Hub; say from where."""
    if (folder / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        register_tokenizer(BASE_MODEL, functools.cache(lambda: AutoTokenizer.from_pretrained(str(folder))))
        return f"server folder {folder}"
    from workers.engine.tiny import build_tiny_tokenizer  # needs the server's dependencies

    cache = Path(tempfile.gettempdir()) / "tuft-cookbook-example"
    register_tokenizer(BASE_MODEL, functools.cache(lambda: build_tiny_tokenizer(cache)))
    return f"built offline from the repository into {cache}"


class Batches(SupervisedDataset):
    """Fixed datums in batches, reshuffled per epoch (the cookbook calls set_epoch)."""

    def __init__(self, datums: list[tinker.Datum], batch_size: int) -> None:
        self.datums, self.order, self.batch_size = datums, list(datums), batch_size

    def get_batch(self, index: int) -> list[tinker.Datum]:
        return self.order[index * self.batch_size : (index + 1) * self.batch_size]

    def __len__(self) -> int:
        return len(self.datums) // self.batch_size

    def set_epoch(self, seed: int = 0) -> None:
        self.order = list(self.datums)
        random.Random(seed).shuffle(self.order)


@chz.chz
class ChatFile(SupervisedDatasetBuilder):
    """The training rows of a chat JSONL file, rendered once by one `qwen3` renderer."""

    file_path: str
    batch_size: int
    max_length: int = 256

    def __call__(self) -> tuple[SupervisedDataset, SupervisedDataset | None]:
        renderer = renderers.get_renderer(RENDERER, get_tokenizer(BASE_MODEL))
        rows = [json.loads(line) for line in Path(self.file_path).read_text().splitlines() if line.strip()]
        last = renderers.TrainOnWhat.LAST_ASSISTANT_MESSAGE  # one exchange per row: the answer only
        datums = [
            conversation_to_datum(row["messages"], renderer, self.max_length, last)
            for row in rows
            if row.get("split", "train") == "train"
        ]
        return Batches(datums, self.batch_size), None


def sample_answer(base_url: str, sampler_path: str, question: str) -> dict[str, Any]:
    """One greedy reply from the saved weights, prompted and parsed by the cookbook's renderer."""
    renderer = renderers.get_renderer(RENDERER, get_tokenizer(BASE_MODEL))
    service = tinker.ServiceClient(base_url=base_url)
    sampler = service.create_sampling_client(model_path=sampler_path).result()  # a future since SDK 0.38
    prompt = renderer.build_generation_prompt([{"role": "user", "content": question}])
    params = tinker.SamplingParams(max_tokens=24, temperature=0.0, stop=renderer.get_stop_sequences())
    seq = sampler.sample(prompt, num_samples=1, sampling_params=params).result().sequences[0]
    message, terminated = renderer.parse_response(seq.tokens)
    return {"question": question, "reply": message["content"], "termination": str(terminated)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default=os.environ.get("TINKER_BASE_URL", "http://127.0.0.1:10610"))
    parser.add_argument("--tokenizer-dir", type=Path, default=DEFAULT_TOKENIZER_DIR)
    parser.add_argument("--log-path", default=None, help="the cookbook's log folder (default: a new temp folder)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args(argv)

    source = register_builtin_tokenizer(args.tokenizer_dir)
    log_path = args.log_path or tempfile.mkdtemp(prefix="tuft-cookbook-sft-")
    dataset = ChatFile(file_path=str(DATA), batch_size=args.batch_size)
    rows = sum('"train"' in line for line in DATA.read_text().splitlines())
    epochs = -(-args.steps // max(1, rows // args.batch_size))  # enough passes over the data for --steps
    config = train.Config(
        log_path=log_path,
        model_name=BASE_MODEL,
        recipe_name="tuft_cookbook_sft",
        renderer_name=RENDERER,
        dataset_builder=dataset,
        learning_rate=args.lr,
        lr_schedule="constant",
        num_epochs=epochs,
        max_steps=args.steps,
        lora_rank=args.rank,
        base_url=args.base_url,
        save_every=0,
        eval_every=0,
        infrequent_eval_every=0,
    )
    asyncio.run(train.main(config))

    metrics = [json.loads(line) for line in (Path(log_path) / "metrics.jsonl").read_text().splitlines()]
    nll = [m["train_mean_nll"] for m in metrics if "train_mean_nll" in m]
    final = [json.loads(line) for line in (Path(log_path) / "checkpoints.jsonl").read_text().splitlines()][-1]
    reply = sample_answer(args.base_url, final["sampler_path"], "How do I reset my password?")
    result = {"tokenizer": source, "log_path": log_path, "train_mean_nll": nll, "final": final, "sample": reply}
    print("RESULT " + json.dumps(result))
    return result


if __name__ == "__main__":
    main()
