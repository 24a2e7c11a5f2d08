"""GRPO-style reinforcement learning through the tinker SDK, on a task with an exact reward.

The task: whatever the prompt, answer with a *common* token, i.e. one of the 25% most frequent BPE
pieces of the Qwen vocabulary. Qwen's BPE ids are merge ranks, so "common" is exactly
`token_id < 151643 // 4`, and the reward of a completion is 1 when its first token is common, else
0. A random model answers with a common token about a quarter of the time, so groups of samples
have reward variance to learn from from the first iteration; a trained policy always does.
No tokenizer is needed: prompts and answers are token ids.

Each iteration:
  1. save the current weights and get a sampler for them (save_weights_and_get_sampling_client);
  2. sample a group of G one-token completions for each prompt, at temperature 1;
  3. reward each completion and normalise within its group: advantage = (r - mean) / std;
  4. train with loss_fn="importance_sampling" on target_tokens, the sampler's logprobs and the
     advantages, then take one optimizer step.

Run `make run` (or `tuft launch`) in one terminal, then:

    python examples/rl_grpo.py --iterations 12

It prints `iter=<n> mean_reward=<r>` per iteration and a final `RESULT {json}` line; `main(argv)`
returns the same dict. Works with tinker 0.25 and 0.38.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from typing import Any

import tinker
from tinker import types

BASE_MODEL = "tuft/tiny-qwen3"
API_KEY = os.environ.get("TINKER_API_KEY", "tml-local-dev-key")
BPE_RANKS = 151_643  # ids at or above are special tokens
COMMON_BELOW = BPE_RANKS // 4
# One-token prompts ('0'..'3' in the Qwen vocabulary): short prompts keep each training datum to
# one position, so an iteration costs little more than its sampling.
PROMPTS = [[15], [16], [17], [18]]


def resolved(value: Any) -> Any:
    """0.38 returns futures of clients (using them directly is deprecated); 0.25 the clients."""
    return value.result() if hasattr(value, "result") else value


def reward(completion: list[int]) -> float:
    return 1.0 if completion and completion[0] < COMMON_BELOW else 0.0


def group_advantages(rewards: list[float]) -> list[float]:
    """GRPO: centre within the group, scale by its standard deviation. A group whose samples all
    scored the same has nothing to teach and gets zero advantages."""
    mean, std = statistics.fmean(rewards), statistics.pstdev(rewards)
    return [(r - mean) / (std + 1e-6) for r in rewards]


def rl_datum(prompt: list[int], completion: list[int], logprobs: list[float], advantage: float) -> types.Datum:
    """Inputs are prompt + completion[:-1] and position i predicts token i+1. Prompt positions get
    advantage 0 (the policy did not choose them); completion positions carry the sampler's logprobs."""
    tokens = prompt + completion
    n, pad = len(tokens) - 1, len(prompt) - 1
    advantages = [0.0] * pad + [advantage] * len(completion)
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": types.TensorData(data=tokens[1:], dtype="int64", shape=[n]),
            "logprobs": types.TensorData(data=[0.0] * pad + logprobs, dtype="float32", shape=[n]),
            "advantages": types.TensorData(data=advantages, dtype="float32", shape=[n]),
        },
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="GRPO-style RL on the built-in tiny model.")
    p.add_argument("--base-url", default=os.environ.get("TINKER_BASE_URL", "http://127.0.0.1:10610"))
    p.add_argument("--iterations", type=int, default=12)
    p.add_argument("--group-size", type=int, default=16, help="completions sampled per prompt (G)")
    # 0.1 learned too, on some library versions, but is on the edge: a step that lands every
    # sample of every group on one uncommon token leaves all-zero advantages, and the run is stuck
    # there for good (seen with transformers 5.25). 0.05 learns for every seed we tried (0-3).
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    rng = random.Random(args.seed)
    client = tinker.ServiceClient(base_url=args.base_url, api_key=API_KEY)
    training = resolved(client.create_lora_training_client(base_model=BASE_MODEL, rank=args.rank, seed=args.seed))
    print(f"model {training.model_id}: rank {args.rank}, lr {args.lr}, {len(PROMPTS)} prompts x G={args.group_size}")

    history: list[float] = []
    started = time.monotonic()
    for it in range(args.iterations):
        sampler = resolved(training.save_weights_and_get_sampling_client())
        params = types.SamplingParams(max_tokens=1, temperature=1.0, seed=rng.randrange(2**31))
        futures = [sampler.sample(types.ModelInput.from_ints(p), args.group_size, params) for p in PROMPTS]
        data: list[types.Datum] = []
        rewards: list[float] = []
        for prompt, future in zip(PROMPTS, futures, strict=True):
            sequences = future.result().sequences
            group = [reward(list(s.tokens)) for s in sequences]
            rewards += group
            for seq, advantage in zip(sequences, group_advantages(group), strict=True):
                if advantage != 0.0:
                    data.append(rl_datum(prompt, list(seq.tokens), list(seq.logprobs), advantage))
        history.append(statistics.fmean(rewards))
        print(f"iter={it} mean_reward={history[-1]:.4f} datums={len(data)}", flush=True)
        if data:
            # Submitted back to back: the server runs them in order, the client waits once.
            fb = training.forward_backward(data, "importance_sampling")
            optim = training.optim_step(types.AdamParams(learning_rate=args.lr))
            fb.result()
            optim.result()

    result = {"model_id": training.model_id, "mean_reward": history, "seconds": round(time.monotonic() - started, 1)}
    print("RESULT " + json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
