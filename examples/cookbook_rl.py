"""tinker-cookbook's own RL training loop (`tinker_cookbook.rl.train`) against TuFT, on the built-in
model `tuft/tiny-qwen3` with the cookbook's `qwen3` renderer and its offline arithmetic environment
(`recipes/math_rl/arithmetic_env.py`: "What is x + y?", reward for the right integer).

This is what `tinker_cookbook.recipes.math_rl.train env=arithmetic` builds, without that module's
import of the math-rl extra (sympy, pylatexenc, math-verify), which the arithmetic environment never
uses. The loop is the cookbook's, unmodified: rollouts through TuFT's sampler, advantages centred
per group, forward_backward with `--loss-fn` (importance_sampling by default; also ppo, cispo,
dro, gspo), optim_step, its metrics.jsonl. The tiny model is untrained, so rewards stay near 0:
this shows the loop runs, not that it learns (examples/rl_grpo.py does that with the bare SDK).

With `make run` going, using the repository's .venv (`make cookbook`):

    TINKER_API_KEY=tml-local-dev-key .venv/bin/python examples/cookbook_rl.py --steps 2

It prints the cookbook's metric tables, then `RESULT {json}` with each step's metrics.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from cookbook_sft import BASE_MODEL, DEFAULT_TOKENIZER_DIR, RENDERER, register_builtin_tokenizer
from tinker_cookbook.recipes.math_rl.arithmetic_env import ArithmeticDatasetBuilder
from tinker_cookbook.rl import train


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default=os.environ.get("TINKER_BASE_URL", "http://127.0.0.1:10610"))
    parser.add_argument("--tokenizer-dir", type=Path, default=DEFAULT_TOKENIZER_DIR)
    parser.add_argument("--log-path", default=None, help="the cookbook's log folder (default: a new temp folder)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--groups", type=int, default=2, help="problems per batch")
    parser.add_argument("--group-size", type=int, default=4, help="rollouts per problem")
    parser.add_argument("--loss-fn", default="importance_sampling")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args(argv)

    source = register_builtin_tokenizer(args.tokenizer_dir)
    log_path = args.log_path or tempfile.mkdtemp(prefix="tuft-cookbook-rl-")
    dataset = ArithmeticDatasetBuilder(
        batch_size=args.groups,
        model_name_for_tokenizer=BASE_MODEL,
        renderer_name=RENDERER,
        n_batches=args.steps,
        group_size=args.group_size,
    )
    config = train.Config(
        learning_rate=args.lr,
        dataset_builder=dataset,
        model_name=BASE_MODEL,
        recipe_name="tuft_cookbook_rl",
        renderer_name=RENDERER,
        max_tokens=5,
        log_path=log_path,
        base_url=args.base_url,
        loss_fn=args.loss_fn,
        lora_rank=args.rank,
        eval_every=0,
        save_every=0,
    )
    asyncio.run(train.main(config))

    metrics = [json.loads(line) for line in (Path(log_path) / "metrics.jsonl").read_text().splitlines()]
    # kl_sample_train: the sampler's logprobs against the trainer's for the same tokens (~0 when the
    # two agree); optimizer_step: TuFT's count of applied steps.
    keys = ("env/all/reward/total", "optim/kl_sample_train_v1", "optimizer_step", "tokens/trained")
    steps = [{k: m[k] for k in keys} for m in metrics if "optimizer_step" in m]
    result = {"tokenizer": source, "log_path": log_path, "loss_fn": args.loss_fn, "steps": steps}
    print("RESULT " + json.dumps(result))
    return result


if __name__ == "__main__":
    main()
