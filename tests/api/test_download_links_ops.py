"""Download links behind a reverse proxy, and tokens kept out of logs (issue 7 item 11).

- A proxy in `trusted_proxies` that sets X-Forwarded-Proto/-Host (the nginx block in
  docs/deployment.md) gets links to the public host, not to the upstream name it dialled; the
  same headers from any other peer are ignored.
- No log line of the API carries a link's token, whatever happens to the link.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.api.main import create_app
from app.signing import signer_for
from tests.api.helpers import KEY_A, Api, make_settings, running_app
from tests.api.test_downloads import _save, _token_of, _urls

PROXY = "10.1.2.3"
FORWARDED = {"Host": "tuft_api", "X-Forwarded-Proto": "https", "X-Forwarded-Host": "tuft.example.org"}


@pytest.fixture
def proxied(tmp_path: Path) -> Iterator[tuple[Api, TestClient, TestClient]]:
    """An app that trusts the proxy's network, with a client that comes from the proxy and one
    that comes from elsewhere."""
    settings = make_settings(tmp_path, None, trusted_proxies=["10.1.2.0/24"])
    with (
        running_app(settings) as api,
        TestClient(create_app(settings), client=(PROXY, 40000)) as via_proxy,
        TestClient(create_app(settings), client=("203.0.113.9", 40000)) as direct,
    ):
        yield api, via_proxy, direct


def test_links_name_the_public_host_behind_a_trusted_proxy(proxied: tuple[Api, TestClient, TestClient]) -> None:
    api, via_proxy, direct = proxied
    prefix = _save(api, api.model(), "external", "proxied")
    path = prefix + "/external_weights_urls"
    headers = {"X-API-Key": KEY_A, **FORWARDED}

    r = via_proxy.get(path, headers=headers)
    assert r.status_code == 200, r.text
    url = r.json()["urls"]["tuft_run.json"]
    assert url.startswith("https://tuft.example.org/api/v1/downloads/"), url
    # The 0.25 archive link (JSON and redirect forms) too.
    archive = via_proxy.get(prefix + "/archive", headers={**headers, "Accept": "application/json"})
    assert archive.json()["url"].startswith("https://tuft.example.org/api/v1/downloads/"), archive.text
    redirect = via_proxy.get(prefix + "/archive", headers=headers, follow_redirects=False)
    assert redirect.status_code == 302
    assert redirect.headers["location"].startswith("https://tuft.example.org/api/v1/downloads/")
    # The link works when the proxy passes it on.
    fetched = via_proxy.get(url.removeprefix("https://tuft.example.org"), headers=FORWARDED)
    assert fetched.status_code == 200 and fetched.content == b'{"format": 1}\n'

    # From a peer that is not a trusted proxy the headers mean nothing: the Host it sent is used.
    r = direct.get(path, headers=headers)
    assert r.status_code == 200, r.text
    assert r.json()["urls"]["tuft_run.json"].startswith("http://tuft_api/api/v1/downloads/")


def test_forged_forwarded_host_is_ignored(proxied: tuple[Api, TestClient, TestClient]) -> None:
    api, via_proxy, _ = proxied
    prefix = _save(api, api.model(), "external", "odd-host")
    r = via_proxy.get(
        prefix + "/external_weights_urls",
        headers={"X-API-Key": KEY_A, "Host": "tuft_api", "X-Forwarded-Host": "evil.example/path?x=1"},
    )
    assert r.status_code == 200, r.text
    assert r.json()["urls"]["tuft_run.json"].startswith("http://tuft_api/api/v1/downloads/")


def test_no_log_line_holds_a_token(api: Api, caplog: pytest.LogCaptureFixture) -> None:
    model_id = api.model()
    prefix = _save(api, model_id, "external", "logged")
    urls = _urls(api, prefix)["urls"]
    good = urls["adapter_model.safetensors"]
    token, name = _token_of(good)
    payload, signature = token.split(".")
    grant = signer_for(api.settings).verify(token, time.time())
    expired = signer_for(api.settings).sign(replace(grant, expires=int(time.time()) - 1))
    tampered = f"{payload}.{signature[:-2]}AA"
    tokens = [token, expired, tampered, payload, signature]

    with caplog.at_level(logging.DEBUG):
        assert api.client.get(good).status_code == 200
        assert api.client.get(f"/api/v1/downloads/{expired}/{name}").status_code == 410
        assert api.client.get(f"/api/v1/downloads/{tampered}/{name}").status_code == 403
        assert api.client.get(f"/api/v1/downloads/{token}/other-file.bin").status_code == 403
        # A valid link whose checkpoint is gone: the error handler logs the request's path.
        assert api.client.delete(prefix, headers={"X-API-Key": KEY_A}).status_code == 200
        assert api.client.get(good).status_code == 404
        # uvicorn's access log, as it formats a request line (when access logging is on).
        logging.getLogger("uvicorn.access").info(
            '%s - "%s %s HTTP/%s" %d', "10.0.0.1:5000", "GET", f"/api/v1/downloads/{token}/{name}", "1.1", 200
        )

    text = caplog.text + "\n".join(r.getMessage() for r in caplog.records)
    assert "download refused (410" in text and "download refused (403" in text  # the refusals are logged...
    assert "/api/v1/downloads/<redacted>/" in text
    for secret in tokens:
        assert secret not in text, secret  # ... without the token
