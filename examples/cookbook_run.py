"""Run a tinker-cookbook entry point unmodified against TuFT's built-in model `tuft/tiny-qwen3`.

The cookbook's recipes take everything on their command line (`base_url=`, `model_name=`,
`renderer_name=` ...) except a tokenizer for a model name the Hugging Face Hub does not know. This
registers one for "tuft/tiny-qwen3" (as examples/cookbook_sft.py explains), then runs the module as
`python -m MODULE ARGS...` would. For example, the cookbook's RL recipe on its offline arithmetic
environment, with `make run` going:

    TINKER_API_KEY=tml-local-dev-key .venv/bin/python examples/cookbook_run.py \\
        tinker_cookbook.recipes.math_rl.train model_name=tuft/tiny-qwen3 renderer_name=qwen3 \\
        env=arithmetic loss_fn=importance_sampling group_size=4 groups_per_batch=4 max_tokens=5 \\
        max_steps=2 eval_every=0 save_every=0 base_url=http://127.0.0.1:10610 \\
        log_path=/tmp/tuft-math-rl behavior_if_log_dir_exists=delete

`--tokenizer-dir=FOLDER` (first argument) names the server's tokenizer folder when it is not
`~/.tuft/cache/tokenizers/tiny-qwen3`.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

from cookbook_sft import DEFAULT_TOKENIZER_DIR, register_builtin_tokenizer


def main() -> None:
    args = sys.argv[1:]
    folder = DEFAULT_TOKENIZER_DIR
    if args and args[0].startswith("--tokenizer-dir="):
        folder = Path(args.pop(0).split("=", 1)[1])
    if not args:
        raise SystemExit(__doc__)
    print(f"tokenizer for tuft/tiny-qwen3: {register_builtin_tokenizer(folder)}", file=sys.stderr)
    sys.argv = [args[0], *args[1:]]
    runpy.run_module(args[0], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
