"""Original TuFT config files and `tuft launch` flags (docs/migrating-from-tuft.md).

The fixtures are the original repository's own files (tests/fixtures/original_tuft_*.yaml; source
and license in their headers).
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from app.cli.config_cmd import convert_text
from app.cli.main import build_parser, main, settings_from
from app.config import load_settings

FIXTURES = Path(__file__).parents[1] / "fixtures"
EXAMPLE = FIXTURES / "original_tuft_config.yaml"
MODELS = FIXTURES / "original_tuft_models.yaml"


@pytest.fixture(autouse=True)
def _no_inherited_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("TUFT_SETTINGS_JSON", "TUFT_CONFIG", "TUFT_CHECKPOINT_DIR", "TUFT_PORT", "TUFT_LOG_LEVEL"):
        monkeypatch.delenv(var, raising=False)


def test_example_config_loads_with_one_notice(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="tuft"):
        settings = load_settings(EXAMPLE)
    assert settings.checkpoint_dir == Path("~/.cache/tuft/checkpoints")
    assert [(m.model_name, m.model_path, m.max_model_len, m.max_lora_rank) for m in settings.supported_models] == [
        ("Qwen/Qwen3-4B", "Qwen/Qwen3-4B", 32768, 16),
        ("Qwen/Qwen3-8B", "Qwen/Qwen3-8B", 32768, 16),
    ]
    assert settings.api_keys == []  # its only key, local-dev-key, lacks the SDK's tml- prefix
    notices = [r.getMessage() for r in caplog.records if "original TuFT config" in r.getMessage()]
    assert len(notices) == 1
    for ignored in ("model_owner: ignored", "telemetry: ignored", "persistence: ignored", "tensor_parallel_size"):
        assert ignored in notices[0]


def test_models_fixture_keys_and_oc_env(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_settings(MODELS)
    assert {k.key: k.tenant for k in settings.api_keys} == {"tml-EMPTY": "default", "tml-test-key": "tester"}
    assert {m.model_path for m in settings.supported_models} == {"Qwen/Qwen3-0.6B"}  # ${oc.env:..., default}
    monkeypatch.setenv("TUFT_TEST_MODEL", "/models/q")
    assert {m.model_path for m in load_settings(MODELS).supported_models} == {"/models/q"}


def test_convert_writes_a_clean_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "ours.yaml"
    assert main(["config", "convert", str(EXAMPLE), "-o", str(out)]) == 0
    assert "# telemetry: ignored" in out.read_text()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tuft"):
        converted = load_settings(out)
    assert not [r for r in caplog.records if "original TuFT config" in r.getMessage()]
    assert converted == load_settings(EXAMPLE)
    assert main(["config", "convert", str(EXAMPLE), "-o", str(out)]) == 2  # no silent overwrite
    assert convert_text(out).count("checkpoint_dir") == 1  # ours passes through unchanged


def test_launch_flags_parse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = build_parser().parse_args(
        ["launch", "-p", "9000", "--log-level", "debug", "--checkpoint-dir", str(tmp_path / "ck")]
    )
    monkeypatch.setenv("TUFT_CONFIG", str(MODELS))
    settings = settings_from(args)
    assert (settings.port, settings.log_level, settings.checkpoint_dir) == (9000, "debug", tmp_path / "ck")
    assert settings.api_keys  # read from the file TUFT_CONFIG names
    explicit = settings_from(build_parser().parse_args(["launch", "-c", str(EXAMPLE)]))
    assert explicit.api_keys == []  # --config wins over TUFT_CONFIG


def test_launch_help_lists_original_flags() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "app.cli.main", "launch", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for flag in ("-p PORT, --port PORT", "--log-level", "--checkpoint-dir", "TUFT_CONFIG"):
        assert flag in out


def test_our_example_is_not_taken_for_theirs(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="tuft"):
        load_settings(Path(__file__).parents[2] / "tuft.example.yaml")
    assert not [r for r in caplog.records if "original TuFT config" in r.getMessage()]
