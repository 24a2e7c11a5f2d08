"""tinker-cookbook's `qwen3` renderer on the built-in tokenizer produces Qwen3's token ids: the
chat-template markers and `<think>` / `</think>` as single tokens with Qwen3's ids, and sampled ids
parse back into reasoning and text up to the `<|im_end|>` stop token. Skipped where the cookbook is
not importable; `make test` installs it (Makefile: cookbook)."""

from __future__ import annotations

from pathlib import Path

import pytest

from workers.engine import build_tiny_tokenizer

renderers = pytest.importorskip("tinker_cookbook.renderers", reason="tinker-cookbook is not installed here")

IM_START, IM_END, THINK, END_THINK = 151_644, 151_645, 151_667, 151_668


def test_qwen3_renderer_writes_qwen3_ids_and_parses_its_own_output(cache_dir: Path) -> None:
    tok = build_tiny_tokenizer(cache_dir)
    renderer = renderers.get_renderer("qwen3", tok)
    reasoning = [{"type": "thinking", "thinking": "add"}, {"type": "text", "text": "4"}]
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": reasoning}]

    model_input, _ = renderer.build_supervised_example(messages)
    ids = model_input.to_ints()
    # Qwen3's template text, and each marker one token with Qwen3's id ("user" = 872,
    # "assistant" = 77091, "\n" = 198, "\n\n" = 271 are plain BPE ranks shared by every Qwen).
    template = "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n<think>\nadd\n</think>\n\n4<|im_end|>"
    assert tok.decode(ids) == template
    assert ids[:3] == [IM_START, 872, 198]
    assert ids[9:13] == [IM_START, 77091, 198, THINK]
    assert ids[16:18] == [END_THINK, 271] and ids[-1] == IM_END
    assert renderer.get_stop_sequences() == [IM_END]

    sampled = tok.encode("<think>\nadd\n</think>\n\n4<|im_end|>", add_special_tokens=False)
    assert sampled == [THINK, 198, 718, 198, END_THINK, 271, 19, IM_END]
    message, termination = renderer.parse_response(sampled)
    assert message["content"] == reasoning
    assert str(termination) == "stop_sequence"
