"""age-encrypted exports with the real SDK 0.38 against a live server (docs/downloads.md,
"Encrypted exports"): save_weights_external(..., age_encryption_recipients=[...]) stores every
file as `<file>.age`; the links serve only those; decrypting them gives exactly the files of an
unencrypted export of the same point of the run. tinker-cookbook's own `weights.download` (which
always encrypts a training checkpoint's temporary export) and `build_hf_model` run unmodified
when the cookbook is importable.
"""

from __future__ import annotations

import json
import subprocess
import urllib.request
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import tinker
from tinker import types

from tests.e2e.server import LiveServer
from tests.e2e.test_download import _train
from tests.e2e.test_training import client_for, new_training

pyrage: Any = pytest.importorskip("pyrage")

SDK = tuple(int(p) for p in tinker.__version__.split(".")[:2])
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(SDK < (0, 38), reason="age_encryption_recipients is SDK 0.38's save_weights_external"),
]
EXPORTED = {"adapter_config.json", "adapter_model.safetensors", "tuft_run.json"}
KEY = "tml-local-dev-key"


def _rest(server: LiveServer) -> tinker.RestClient:
    return tinker.RestClient(base_url=server.url, api_key=KEY)


def _fetch_all(server: LiveServer, path: str, dest: Path) -> dict[str, Path]:
    links = _rest(server).get_external_weights_urls(path).result(timeout=60)
    dest.mkdir(parents=True)
    fetched = {}
    for name, url in links.urls.items():
        with urllib.request.urlopen(url, timeout=60) as r:
            (dest / name).write_bytes(r.read())
        fetched[name] = dest / name
    return fetched


def _ssh_identity(tmp_path: Path) -> tuple[str, Any]:
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True, timeout=30)
    return key.with_suffix(".pub").read_text().strip(), pyrage.ssh.Identity.from_buffer(key.read_bytes())


def test_encrypted_export_decrypts_to_the_unencrypted_export(embedded_server: LiveServer, tmp_path: Path) -> None:
    client = client_for(embedded_server)
    training = new_training(client)
    _train(training)
    native = pyrage.x25519.Identity.generate()
    ssh_public, ssh_identity = _ssh_identity(tmp_path)
    plain = training.save_weights_external("plain").result(timeout=120)
    sealed = training.save_weights_external(
        "sealed", age_encryption_recipients=[str(native.to_public()), ssh_public]
    ).result(timeout=120)
    assert sealed.path == f"tinker://{training.model_id}/external_weights/sealed"

    plain_files = _fetch_all(embedded_server, plain.path, tmp_path / "plain")
    sealed_files = _fetch_all(embedded_server, sealed.path, tmp_path / "sealed")
    assert set(plain_files) == EXPORTED | {"manifest.json"}
    # Only .age files are offered: the cookbook refuses any other name in an encrypted export.
    assert set(sealed_files) == {f + ".age" for f in EXPORTED}
    # At rest too: the server's folder holds no plaintext weights, only its own manifest.
    folder = next(
        (embedded_server.data_dir / "checkpoints" / training.model_id.replace(":", "_")).glob("external/sealed/*")
    )
    assert {p.name for p in folder.iterdir()} == {f + ".age" for f in EXPORTED} | {"manifest.json"}
    assert json.loads((folder / "manifest.json").read_text())["encryption"]["scheme"] == "age"

    for identity in (native, ssh_identity):  # either recipient can decrypt, alone
        for name in EXPORTED:
            clear = pyrage.decrypt(sealed_files[name + ".age"].read_bytes(), [identity])
            assert clear == plain_files[name].read_bytes(), name
    stranger = pyrage.x25519.Identity.generate()
    with pytest.raises(pyrage.DecryptError):
        pyrage.decrypt(sealed_files["adapter_model.safetensors.age"].read_bytes(), [stranger])

    # The server cannot read what it encrypted: loading or sampling it says so (category user).
    with warnings.catch_warnings(), pytest.raises(tinker.RequestFailedError, match="age-encrypted") as failed:
        warnings.simplefilter("ignore", FutureWarning)  # load_state is deprecated, still sent by 0.38
        new_training(client).load_state(sealed.path).result(timeout=120)
    assert failed.value.category == types.RequestErrorCategory.User
    with pytest.raises(tinker.BadRequestError, match="age-encrypted"):
        client.create_training_client_from_state(sealed.path).result(timeout=120)
    with pytest.raises(tinker.BadRequestError, match="age-encrypted"):
        sampler = client.create_sampling_client(model_path=sealed.path).result(timeout=120)
        prompt = types.ModelInput.from_ints([1, 2, 3])
        sampler.sample(prompt=prompt, num_samples=1, sampling_params=types.SamplingParams(max_tokens=2)).result()

    listing = _rest(embedded_server).list_checkpoints(training.model_id).result(timeout=60)
    listed = {c.checkpoint_id: c for c in listing.checkpoints}
    assert listed["external_weights/sealed"].size_bytes == sum(p.stat().st_size for p in sealed_files.values())


@pytest.mark.parametrize(
    "recipients",
    [
        ["age1notakey"],
        ["ssh-ed25519 AAAAnot-base64"],
        ["AGE-SECRET-KEY-1QQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQ"],
        [""],
        [],
        ["age1" + "q" * 58] * 11,
    ],
)
def test_a_bad_recipient_fails_the_future_with_category_user(
    embedded_server: LiveServer, recipients: list[str]
) -> None:
    training = new_training(client_for(embedded_server))
    future = training.save_weights_external("bad", age_encryption_recipients=recipients)
    with pytest.raises(tinker.RequestFailedError) as failed:
        future.result(timeout=120)
    assert failed.value.category == types.RequestErrorCategory.User
    assert "age_encryption_recipients" in failed.value.message
    # Nothing was stored, and the run goes on: the next save succeeds.
    assert not list(embedded_server.data_dir.glob("checkpoints/*/external/bad"))
    assert training.save_weights_external("after").result(timeout=120).path.endswith("/external_weights/after")


def _cookbook() -> ModuleType:
    try:
        from tinker_cookbook import weights
    except ImportError as exc:
        pytest.skip(f"tinker-cookbook's weights module is not importable here: {exc}")
    return weights


def test_cookbook_download_decrypts_and_merges(
    embedded_server: LiveServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """tinker-cookbook 0.6.1's weights.download of a training checkpoint: create_training_client_
    from_state, save_weights_external encrypted to a fresh key, external_weights_urls, set TTL,
    download, decrypt, delete the export. The result merges like an unencrypted export."""
    weights = _cookbook()
    from workers.engine import build_tiny_model, build_tiny_tokenizer

    monkeypatch.setenv("TINKER_API_KEY", KEY)
    training = new_training(client_for(embedded_server))
    _train(training)
    state = training.save_state("state").result(timeout=120)
    plain = training.save_weights_external("reference").result(timeout=120)
    reference = _fetch_all(embedded_server, plain.path, tmp_path / "reference")

    out = tmp_path / "downloaded"
    assert weights.download(tinker_path=state.path, output_dir=str(out), base_url=embedded_server.url) == str(out)
    assert {p.name for p in out.iterdir()} == EXPORTED
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (out / name).read_bytes() == reference[name].read_bytes(), name
    assert not list(embedded_server.data_dir.glob("checkpoints/*/external/download/*"))  # export deleted

    base = tmp_path / "base"
    build_tiny_model().save_pretrained(base)
    build_tiny_tokenizer(tmp_path / "cache").save_pretrained(base)
    for adapter, merged in ((out, tmp_path / "merged"), (tmp_path / "reference", tmp_path / "merged-ref")):
        weights.build_hf_model(base_model=str(base), adapter_path=str(adapter), output_path=str(merged))
    from safetensors.torch import load_file

    got = load_file(next(iter(sorted((tmp_path / "merged").glob("*.safetensors")))))
    want = load_file(next(iter(sorted((tmp_path / "merged-ref").glob("*.safetensors")))))
    assert got.keys() == want.keys()
    assert all(got[k].equal(want[k]) for k in got)
    base_weights = load_file(next(iter(sorted(base.glob("*.safetensors")))))
    assert any(not got[k].equal(base_weights[k]) for k in got if k in base_weights)  # the training is in it
