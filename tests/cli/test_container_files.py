"""The image and compose files say what docs/deployment.md promises: the image installs the tested
versions (constraints.txt pins every dependency, torch at the Makefile's TORCH_SPEC), and every
service of compose.yaml that runs TuFT has a healthcheck. Static checks: no Docker daemon here."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def _name(requirement: str) -> str:
    return re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_constraints_pin_every_dependency_but_torch() -> None:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"not pinned: {line}"
            pins[_name(name)] = version
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    missing = {_name(d) for d in deps} - set(pins) - {"torch"}
    assert not missing, f"make constraints: {sorted(missing)} not pinned"
    assert "torch" not in pins  # the image chooses its build (CUDA or CPU) with TORCH_SPEC


def test_dockerfile_installs_the_tested_versions() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    makefile = (ROOT / "Makefile").read_text()
    torch = re.search(r"^TORCH_SPEC \?= (\S+)$", makefile, re.M)
    assert torch is not None and f'ARG TORCH_SPEC="{torch.group(1)}"' in dockerfile
    assert "-c /tmp/constraints.txt" in dockerfile
    assert "!constraints.txt" in (ROOT / ".dockerignore").read_text()
    assert "HEALTHCHECK" in dockerfile and "/readyz" in dockerfile


def test_every_tuft_service_has_a_healthcheck() -> None:
    services = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    for name, service in services.items():
        if name == "migrate" or service.get("image") not in (None, "tuft:local"):
            continue
        check = service.get("healthcheck", {}).get("test")
        assert check, f"{name} has no healthcheck"
        if service["command"][0] == "worker":
            assert check[:3] == ["CMD", "tuft", "worker-health"], name
        else:
            assert "/readyz" in " ".join(check), name
