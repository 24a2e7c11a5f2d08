"""Checkpoint downloads through signed links (docs/downloads.md), in-process on SQLite and
PostgreSQL: the 0.25 archive link, the 0.38 per-file links, and the link route itself, which
takes no API key and trusts only the signature, the expiry and the checkpoint row.

No worker runs here: checkpoints are rows recorded as a worker would, plus files written where a
worker would put them.
"""

from __future__ import annotations

import email.utils
import io
import json
import os
import tarfile
import threading
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from sqlalchemy import update

from app.checkpoint_store import new_storage_path
from app.config import ConfigError, load_settings
from app.db.models import Checkpoint, Run
from app.queue import checkpoints
from app.signing import KEY_FILE, Grant, Signer, load_or_create_key, signer_for
from tests.api.helpers import KEY_A, KEY_B, Api, assert_error, make_settings, running_app

SEGMENT = {"training": "weights", "sampler": "sampler_weights", "external": "external_weights"}
# Bigger than the route's 1 MiB read size, so streaming goes through several chunks.
WEIGHTS = os.urandom((1 << 20) * 2 + 12_345)
ADAPTER_CONFIG = {"peft_type": "LORA", "r": 8, "base_model_name_or_path": "tuft/tiny-qwen3"}


def _save(api: Api, model_id: str, kind: str, name: str, *, request_id: str | None = None) -> str:
    """Record a checkpoint row and write its folder; returns the REST URL prefix of the checkpoint."""
    request_id = request_id or f"req-test-{name}"
    storage = new_storage_path(model_id, kind, name, request_id)
    folder = api.settings.resolved_checkpoint_dir() / storage
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(ADAPTER_CONFIG))
    (folder / "adapter_model.safetensors").write_bytes(WEIGHTS)
    (folder / "tuft_run.json").write_text('{"format": 1}\n')
    # Never offered: hidden names are how a worker stages files.
    (folder / ".staging-leftover").write_text("x")
    with api.db.write() as s:
        run = s.get(Run, model_id)
        assert run is not None
        checkpoints.record(
            s,
            tenant=run.tenant,
            run_id=model_id,
            kind=kind,
            name=name,
            storage_path=storage,
            base_model=run.base_model,
            lora_config=dict(run.lora_config),
            with_optimizer=False,
            ephemeral=False,
            size_bytes=len(WEIGHTS),
            user_metadata=None,
            ttl_seconds=None,
            request_id=request_id,
            overwrite=True,
        )
    return f"/api/v1/training_runs/{model_id}/checkpoints/{SEGMENT[kind]}/{name}"


FILES = {
    "adapter_config.json": json.dumps(ADAPTER_CONFIG).encode(),
    "adapter_model.safetensors": WEIGHTS,
    "tuft_run.json": b'{"format": 1}\n',
}


def _set(api: Api, model_id: str, kind: str, name: str, **values: Any) -> None:
    with api.db.write() as s:
        s.execute(
            update(Checkpoint)
            .where(Checkpoint.run_id == model_id, Checkpoint.kind == kind, Checkpoint.name == name)
            .values(**values)
        )


def _urls(api: Api, prefix: str, key: str = KEY_A) -> dict[str, Any]:
    r = api.get(prefix + "/external_weights_urls", key=key)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    assert set(body) == {"urls", "expires"}, body
    return body


def _archive_url(api: Api, prefix: str, key: str = KEY_A) -> str:
    r = api.get(prefix + "/archive", key=key, headers={"Accept": "application/json"})
    assert r.status_code == 200, r.text
    assert set(r.json()) == {"url", "expires"}, r.json()
    return str(r.json()["url"])


def _fetch(api: Api, url: str) -> httpx.Response:
    """A link is fetched like the SDK's urllib does: no API key."""
    return api.client.get(url)


def _tar_members(body: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        members = tar.getmembers()
        assert all(m.isfile() for m in members), members
        return {m.name: tar.extractfile(m).read() for m in members}  # type: ignore[union-attr]


def _token_of(url: str) -> tuple[str, str]:
    parts = urlsplit(url).path.split("/")
    assert parts[:4] == ["", "api", "v1", "downloads"], url
    return parts[4], "/".join(parts[5:])


def test_external_weights_urls_round_trip(api: Api) -> None:
    model_id = api.model()
    prefix = _save(api, model_id, "external", "final")
    before = time.time()
    body = _urls(api, prefix)
    assert set(body["urls"]) == set(FILES)
    expires = datetime.fromisoformat(body["expires"]).timestamp()
    ttl = api.settings.download_link_ttl_seconds
    assert before + ttl - 5 <= expires <= time.time() + ttl + 1
    for rel, url in body["urls"].items():
        # Absolute, on the server the request came to (no public_base_url configured here).
        assert url.startswith("http://testserver/api/v1/downloads/"), url
        assert url.endswith("/" + rel), url
        r = _fetch(api, url)
        assert r.status_code == 200, r.text
        assert r.content == FILES[rel]
        assert int(r.headers["content-length"]) == len(FILES[rel])
        assert r.headers["content-type"] == "application/octet-stream"
        assert r.headers["cache-control"] == "no-store"


def test_archive_json_redirect_and_tar_contents(api: Api) -> None:
    model_id = api.model()
    prefix = _save(api, model_id, "sampler", "for-0.25")
    url = _archive_url(api, prefix)
    assert url.startswith("http://testserver/api/v1/downloads/") and url.endswith("/for-0.25.tar"), url

    r = _fetch(api, url)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/x-tar"
    assert int(r.headers["content-length"]) == len(r.content)
    # What 0.25's `tinker checkpoint download` / `push-hf` look for: a PEFT adapter at the top
    # level and the completion marker.
    assert _tar_members(r.content) == {**FILES, "checkpoint_complete": b""}

    # Without Accept: application/json, the original contract: a 302 with Location and Expires.
    redirect = api.get(prefix + "/archive", follow_redirects=False)
    assert redirect.status_code == 302, redirect.text
    location = redirect.headers["location"]
    assert _token_of(location)[1] == "for-0.25.tar"
    expires = email.utils.parsedate_to_datetime(redirect.headers["expires"]).timestamp()
    assert time.time() < expires <= time.time() + api.settings.download_link_ttl_seconds + 1
    assert _tar_members(_fetch(api, location).content) == {**FILES, "checkpoint_complete": b""}


def test_training_checkpoint_archive_is_served_too(api: Api) -> None:
    model_id = api.model()
    prefix = _save(api, model_id, "training", "state")
    assert set(_tar_members(_fetch(api, _archive_url(api, prefix)).content)) == {*FILES, "checkpoint_complete"}


def test_tampered_links_are_403(api: Api) -> None:
    model_id = api.model()
    url = _urls(api, _save(api, model_id, "external", "tamper"))["urls"]["adapter_config.json"]
    token, name = _token_of(url)
    payload, signature = token.split(".")
    base = "http://testserver/api/v1/downloads"
    flipped = "A" if payload[5] != "A" else "B"
    forged = [
        f"{base}/{payload[:5]}{flipped}{payload[6:]}.{signature}/{name}",  # payload changed
        f"{base}/{payload}.{signature[:-2]}AA/{name}",  # signature changed
        f"{base}/{payload}.{signature}/adapter_model.safetensors",  # another file, same token
        f"{base}/{payload}/{name}",  # no signature
        f"{base}/{signature}.{payload}/{name}",
        f"{base}/not-a-token/{name}",
        f"{base}/{payload}.{signature}\u00e9/{name}",
    ]
    for bad in forged:
        body = assert_error(_fetch(api, bad), 403, error="invalid_link")
        assert body["category"] == "user"
    # A link signed with another key is a forgery too.
    other = Signer(b"k" * 64).sign(Grant(model_id, "external", "tamper", "req-test-tamper", "default", name, 2**40))
    assert_error(_fetch(api, f"{base}/{other}/{name}"), 403, error="invalid_link")
    assert _fetch(api, url).status_code == 200


def test_expired_link_is_410(api: Api) -> None:
    model_id = api.model()
    prefix = _save(api, model_id, "external", "old")
    token, name = _token_of(_urls(api, prefix)["urls"]["tuft_run.json"])
    grant = signer_for(api.settings).verify(token, time.time())
    assert (grant.run_id, grant.kind, grant.name, grant.file, grant.tenant) == (
        model_id,
        "external",
        "old",
        "tuft_run.json",
        "default",
    )
    past = replace(grant, expires=int(time.time()) - 1)
    expired = signer_for(api.settings).sign(past)
    body = assert_error(_fetch(api, f"http://testserver/api/v1/downloads/{expired}/{name}"), 410, error="link_expired")
    assert "expired" in body["message"]


def test_link_dies_with_its_checkpoint(api: Api) -> None:
    model_id = api.model()
    prefix = _save(api, model_id, "external", "doomed")
    file_url = _urls(api, prefix)["urls"]["adapter_model.safetensors"]
    tar_url = _archive_url(api, prefix)
    assert _fetch(api, file_url).status_code == 200

    r = api.client.delete(prefix, headers={"X-API-Key": KEY_A})
    assert r.status_code == 200, r.text
    for url in (file_url, tar_url):
        assert_error(_fetch(api, url), 404, error="not_found", contains="no longer")

    # Saved again under the same name: another checkpoint, which the old links do not reach.
    _save(api, model_id, "external", "doomed", request_id="req-test-doomed-again")
    assert_error(_fetch(api, file_url), 404, error="not_found")
    assert _fetch(api, _urls(api, prefix)["urls"]["adapter_model.safetensors"]).content == WEIGHTS


def test_link_dies_when_its_checkpoint_expires(api: Api) -> None:
    model_id = api.model()
    prefix = _save(api, model_id, "external", "ttl")
    url = _urls(api, prefix)["urls"]["tuft_run.json"]
    _set(api, model_id, "external", "ttl", expires_at=time.time() - 10)
    assert_error(_fetch(api, url), 404, error="not_found")
    assert_error(api.get(prefix + "/external_weights_urls"), 404, error="not_found")


def test_other_tenants_unpublished_checkpoint_is_404(api: Api) -> None:
    model_id = api.model()
    prefix = _save(api, model_id, "external", "private")
    unknown = prefix.replace("/private", "/never-saved")
    for suffix in ("/external_weights_urls", "/archive"):
        theirs = assert_error(api.get(prefix + suffix, key=KEY_B), 404, error="not_found")
        missing = assert_error(api.get(unknown + suffix, key=KEY_B), 404, error="not_found")
        # The same answer as for a checkpoint that does not exist, once the name is masked.
        assert theirs["message"].replace("private", "<n>") == missing["message"].replace("never-saved", "<n>")


def test_published_checkpoint_is_downloadable_until_unpublished(api: Api) -> None:
    model_id = api.model()
    prefix = _save(api, model_id, "external", "shared")
    _set(api, model_id, "external", "shared", public=True)
    url_b = _urls(api, prefix, key=KEY_B)["urls"]["adapter_model.safetensors"]
    tar_b = _archive_url(api, prefix, key=KEY_B)
    url_a = _urls(api, prefix)["urls"]["adapter_model.safetensors"]
    assert _fetch(api, url_b).content == WEIGHTS
    assert _tar_members(_fetch(api, tar_b).content)["adapter_model.safetensors"] == WEIGHTS

    _set(api, model_id, "external", "shared", public=False)
    assert_error(_fetch(api, url_b), 404, error="not_found")
    assert_error(_fetch(api, tar_b), 404, error="not_found")
    assert _fetch(api, url_a).content == WEIGHTS  # the owner's own link is unaffected


def test_unknown_and_malformed_checkpoints(api: Api) -> None:
    model_id = api.model()
    prefix = _save(api, model_id, "external", "real")
    runs = f"/api/v1/training_runs/{model_id}/checkpoints"
    for suffix in ("/external_weights_urls", "/archive"):
        assert_error(api.get(prefix.replace("/real", "/missing") + suffix), 404, error="not_found")
        assert_error(api.get(f"/api/v1/training_runs/s-nobody:train:0/checkpoints/external_weights/real{suffix}"), 404)
        assert_error(api.get(f"/api/v1/training_runs/s-%00:train:0/checkpoints/external_weights/real{suffix}"), 404)
        assert_error(api.get(f"{runs}/bogus_kind/real{suffix}"), 400, error="invalid_input", contains="checkpoint id")
        assert_error(api.get(f"{runs}/external_weights/bad name!{suffix}"), 400, error="invalid_input")
        assert_error(api.get(prefix + suffix, key=None), 401)
    # Per-file links are for external weights only, as in the SDK.
    _save(api, model_id, "sampler", "sampler-only")
    body = assert_error(api.get(f"{runs}/sampler_weights/sampler-only/external_weights_urls"), 400)
    assert "external_weights" in body["message"]
    # The link route with no file name, or no token.
    assert_error(api.client.get("/api/v1/downloads/abc"), 403, error="invalid_link")
    assert_error(api.client.get("/api/v1/downloads/"), 404)


def test_checkpoint_files_gone_from_disk_is_404(api: Api) -> None:
    model_id = api.model()
    prefix = _save(api, model_id, "external", "vanished")
    url = _urls(api, prefix)["urls"]["tuft_run.json"]
    with api.db.read() as s:
        saved = checkpoints.find(s, model_id, "external", "vanished")
        assert saved is not None
        folder = api.settings.resolved_checkpoint_dir() / saved.storage_path
    (folder / "tuft_run.json").unlink()
    assert_error(_fetch(api, url), 404, error="not_found")


def test_signing_key_is_generated_once_and_shared(tmp_path: Path) -> None:
    keys: list[bytes] = []
    threads = [threading.Thread(target=lambda: keys.append(load_or_create_key(tmp_path / "ckpt"))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(keys) == 8 and len(set(keys)) == 1, keys
    key_file = tmp_path / "ckpt" / KEY_FILE
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == [KEY_FILE]  # no temporary files left
    assert load_or_create_key(tmp_path / "ckpt") == keys[0]

    key_file.write_text("short\n")
    with pytest.raises(RuntimeError, match="damaged"):
        load_or_create_key(tmp_path / "ckpt")


def test_configured_key_is_used_and_the_api_key_file_is_shared(api: Api) -> None:
    key_file = api.settings.resolved_checkpoint_dir() / KEY_FILE
    prefix = _save(api, api.model(), "external", "keyed")
    token, _ = _token_of(_urls(api, prefix)["urls"]["tuft_run.json"])
    # Another API process of the same deployment reads the same file, so it accepts the link.
    assert Signer(key_file.read_text().strip().encode()).verify(token, time.time()).name == "keyed"
    configured = api.settings.model_copy(update={"download_signing_key": "c" * 40})
    token = Signer(b"c" * 40).sign(Grant("r", "external", "n", "o", "t", None, 2**40))
    assert signer_for(configured).verify(token, time.time()).name == "n"
    assert signer_for(configured) is not signer_for(api.settings)


def _save_external(api: Api, model_id: str, seq: int, **fields: Any) -> httpx.Response:
    body = {"model_id": model_id, "seq_id": seq, "type": "save_weights_external", **fields}
    return api.post("/api/v1/save_weights_external", body)


def test_save_weights_external_is_an_ordered_training_op(api: Api) -> None:
    model_id = api.model()
    api.queued(api.accepted(_save_external(api, model_id, 1, path="final", ttl_seconds=3600)))
    refusals = {
        "age_encryption_recipients": {"path": "enc", "age_encryption_recipients": ["age1qqq"]},
        "name": {"path": "../escape"},
        "path": {},
        "ttl_seconds": {"path": "neg", "ttl_seconds": -5},
    }
    for seq, (word, fields) in enumerate(refusals.items(), start=2):
        message = api.refused(_save_external(api, model_id, seq, **fields))
        assert word in message, message
    assert "not a valid age recipient" in api.refused(
        _save_external(api, model_id, 6, path="enc2", age_encryption_recipients=["ssh-ed25519 AAAA"])
    )
    # An empty list is refused rather than read as "no encryption": a caller whose recipient list
    # came out empty did ask for encryption. The run's next seq is still accepted.
    assert "at least one recipient" in api.refused(
        _save_external(api, model_id, 7, path="none", age_encryption_recipients=[])
    )
    api.queued(api.accepted(_save_external(api, model_id, 8, path="plain")))


def test_links_use_public_base_url_when_configured(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, None, public_base_url="https://tuft.example.com/prefix/")
    with running_app(settings) as app:
        prefix = _save(app, app.model(), "external", "behind-proxy")
        url = _urls(app, prefix)["urls"]["tuft_run.json"]
        assert url.startswith("https://tuft.example.com/prefix/api/v1/downloads/"), url
        # What the proxy forwards once it strips its prefix.
        assert app.client.get(url.removeprefix("https://tuft.example.com/prefix")).content == FILES["tuft_run.json"]


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("download_signing_key", "too-short", "at least 32"),
        ("download_link_ttl_seconds", 0, "at least 1"),
        ("public_base_url", "tuft.example.com", "http"),
    ],
)
def test_download_settings_are_checked(tmp_path: Path, setting: str, value: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(data_dir=tmp_path, **{setting: value})
