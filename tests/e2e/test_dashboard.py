"""The web dashboard (docs/dashboard.md) in a real browser: Debian's chromium driven by playwright
against a live `tuft launch` that the real tinker SDK trained, reached through a reverse proxy
that serves it under a path prefix. What the pages show is checked against what the SDK, the REST
API and the admin CLI say; screenshots go to the test's tmp dir.

Chromium must be at /usr/bin/chromium (`make services` installs it); only TUFT_SKIP_BROWSER=1
lets these tests skip where it is missing."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import tinker
from tinker import types

from app.db.engine import Database
from app.db.models import Run
from app.domain.ops import AdamParams, OptimStepOp
from app.queue import admin, submit
from tests.e2e.server import LiveServer, embedded
from tests.e2e.test_training import memorise_datum, resolved

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
KEY_A = "tml-dash-tenant-a"
KEY_B = "tml-dash-tenant-b"
KEY_ADMIN = "tml-dash-operator"
PREFIX = "/tuft"

pytestmark = [pytest.mark.e2e, pytest.mark.browser]


def _playwright() -> Any:
    if not CHROMIUM.exists() and os.environ.get("TUFT_SKIP_BROWSER") == "1":
        pytest.skip("no /usr/bin/chromium and TUFT_SKIP_BROWSER=1")
    assert CHROMIUM.exists(), "browser tests need /usr/bin/chromium (make services installs it)"
    from playwright.sync_api import sync_playwright

    return sync_playwright


class _Proxy(BaseHTTPRequestHandler):
    """A reverse proxy serving the API under PREFIX, as nginx's `location /tuft/ { proxy_pass
    http://api/; }` does: the prefix is stripped, bodies, cookies and Location headers pass as
    they are."""

    upstream = ""

    def _forward(self) -> None:
        if not self.path.startswith(PREFIX + "/"):
            self.send_error(404)
            return
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length", "connection")}
        headers["X-Forwarded-Prefix"] = PREFIX
        reply = httpx.request(
            self.command, self.upstream + self.path[len(PREFIX) :], headers=headers, content=body, timeout=30
        )
        self.send_response(reply.status_code)
        for name, value in reply.headers.multi_items():
            if name.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding"):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(reply.content)))
        self.end_headers()
        self.wfile.write(reply.content)

    do_GET = do_POST = _forward

    def log_message(self, *args: Any) -> None:
        pass


@dataclass
class World:
    server: LiveServer
    proxy_url: str  # http://127.0.0.1:PORT/tuft
    run_a: str
    run_a2: str
    run_b: str
    losses: list[float]  # tenant a's forward_backward loss:sum, step by step
    grad_norms: list[float | None] = field(default_factory=list)
    checkpoints: list[str] = field(default_factory=list)  # tinker:// paths, from the REST API


def _train_a(server: LiveServer) -> tuple[str, list[float], list[float | None], list[str]]:
    client = tinker.ServiceClient(base_url=server.url, api_key=KEY_A)
    training = resolved(client.create_lora_training_client(base_model="tuft/tiny-qwen3", rank=8, seed=0))
    losses: list[float] = []
    norms: list[float | None] = []
    for _ in range(4):
        fb = training.forward_backward([memorise_datum()], "cross_entropy")
        step = training.optim_step(types.AdamParams(learning_rate=1e-2))
        losses.append(fb.result(timeout=60).metrics["loss:sum"])
        norms.append((step.result(timeout=60).metrics or {}).get("grad_norm"))
    training.save_state("dash-state").result(timeout=60)
    training.save_weights_for_sampler("dash-sampler").result(timeout=60)
    rest = tinker.RestClient(base_url=server.url, api_key=KEY_A) if hasattr(tinker, "RestClient") else None
    rest = rest or client.create_rest_client()  # 0.25 has no RestClient
    paths = [c.tinker_path for c in rest.list_checkpoints(training.model_id).result(timeout=30).checkpoints]
    return training.model_id, losses, norms, paths


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("dashboard")
    config = tmp / "tuft.yaml"
    config.write_text(
        "api_keys:\n"
        f"  - {{key: {KEY_A}, tenant: team-a}}\n"
        f"  - {{key: {KEY_B}, tenant: team-b}}\n"
        f"  - {{key: {KEY_ADMIN}, tenant: operators}}\n"
        "dashboard_admin_tenants: [operators]\n"
    )
    server = embedded(tmp)
    server.args += ["--config", str(config)]
    server.start()
    proxy = ThreadingHTTPServer(("127.0.0.1", 0), type("Proxy", (_Proxy,), {"upstream": server.url}))
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    try:
        run_a, losses, norms, paths = _train_a(server)
        client_a = tinker.ServiceClient(base_url=server.url, api_key=KEY_A)
        run_a2 = resolved(client_a.create_lora_training_client(base_model="tuft/tiny-qwen3", rank=4)).model_id
        client_b = tinker.ServiceClient(base_url=server.url, api_key=KEY_B)
        training_b = resolved(client_b.create_lora_training_client(base_model="tuft/tiny-qwen3", rank=4))
        training_b.forward_backward([memorise_datum()], "cross_entropy").result(timeout=60)
        # An operator's pause (`tuft runs pause`) gives one run a state other than active, with a reason.
        with _database(server) as db, db.write() as s:
            admin.pause(s, run_a2)
            # A paused run takes no ops, so this one waits in the queue page. Submitted through the
            # queue's own code rather than the SDK, whose future would keep a long poll open.
            paused = s.get(Run, run_a2)
            assert paused is not None
            submit.submit_run_op(s, paused, paused.next_seq, OptimStepOp(adam=AdamParams(learning_rate=0.01)))
        url = f"http://127.0.0.1:{proxy.server_address[1]}{PREFIX}"
        yield World(server, url, run_a, run_a2, training_b.model_id, losses, norms, paths)
    finally:
        proxy.shutdown()
        server.stop()


@contextmanager
def _database(server: LiveServer) -> Iterator[Database]:
    """The embedded server's own SQLite database, as the admin CLI opens it."""
    db = Database(f"sqlite:///{server.data_dir / 'tuft.db'}", "test")
    try:
        yield db
    finally:
        db.dispose()


def _rest_run_ids(server: LiveServer, key: str) -> set[str]:
    """The runs the REST API lists for a key (`tinker run list`)."""
    if hasattr(tinker, "RestClient"):
        rest = tinker.RestClient(base_url=server.url, api_key=key)
    else:  # 0.25 has no RestClient
        rest = tinker.ServiceClient(base_url=server.url, api_key=key).create_rest_client()
    return {r.training_run_id for r in rest.list_training_runs().result(timeout=30).training_runs}


def _admin_runs(server: LiveServer) -> dict[str, dict[str, Any]]:
    """Run states as `tuft runs list` reads them from the database (the Tinker API has none)."""
    with _database(server) as db, db.read() as s:
        return {r["run_id"]: r for r in admin.run_rows(s)}


@pytest.fixture(scope="module")
def browser(world: World) -> Iterator[Any]:
    with _playwright()() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def _log_in(browser: Any, world: World, key: str) -> Any:
    page = browser.new_context().new_page()
    page.goto(f"{world.proxy_url}/dashboard")
    assert page.url == f"{world.proxy_url}/dashboard/login"  # relative redirects kept the prefix
    page.fill("input[name=key]", key)
    page.click("button[type=submit]")
    page.wait_for_url(f"{world.proxy_url}/dashboard/")
    return page


def _cells(page: Any, selector: str) -> list[str]:
    # text_content: rows inside a closed <details> have no rendered text.
    return [(t or "").strip() for t in page.locator(selector).all_text_contents()]


def test_tenant_pages_match_the_api(browser: Any, world: World, tmp_path: Path) -> None:
    page = _log_in(browser, world, KEY_A)
    cookie = next(c for c in page.context.cookies() if c["name"] == "tuft_dashboard_key")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == f"{PREFIX}/dashboard"

    # Runs: tenant a's two runs with the states and reason the database holds, not tenant b's.
    states = _admin_runs(world.server)
    shown = {
        row.get_attribute("data-run"): row.locator("td.status").inner_text()
        for row in page.locator("table.runs tbody tr").all()
    }
    assert set(shown) == _rest_run_ids(world.server, KEY_A) == {world.run_a, world.run_a2}
    assert shown == {run_id: states[run_id]["status"] for run_id in shown}
    assert shown[world.run_a2] == "paused"
    assert "paused by an operator" in page.locator(f'tr[data-run="{world.run_a2}"]').inner_text()
    page.screenshot(path=str(tmp_path / "runs.png"), full_page=True)

    # The run: loss:sum per step equals what forward_backward returned; grad_norm likewise.
    page.click(f'table.runs a:text-is("{world.run_a}")')
    page.wait_for_selector("table.facts")
    assert f"{PREFIX}/dashboard/runs/" in page.url
    fb_rows = page.locator('table.metrics tr[data-kind="forward_backward"]')
    steps = [int(s) for s in _cells(page, 'table.metrics tr[data-kind="forward_backward"] td:nth-child(2)')]
    assert steps == [0, 1, 2, 3]
    shown_losses = [float(v) for v in fb_rows.locator('td[data-metric="loss:sum"]').all_text_contents()]
    assert shown_losses == pytest.approx(world.losses, rel=1e-5)
    points = page.locator('figure[data-metric="forward_backward loss:sum"] circle')
    plotted = [(int(c.get_attribute("data-step")), float(c.get_attribute("data-value"))) for c in points.all()]
    assert plotted == [(i, pytest.approx(v, rel=1e-5)) for i, v in enumerate(world.losses)]
    if world.grad_norms[0] is not None:
        norms = page.locator('table.metrics tr[data-kind="optim_step"] td[data-metric="grad_norm"]')
        assert [float(v) for v in norms.all_text_contents()] == pytest.approx(world.grad_norms, rel=1e-5)
    # The op timeline: every op of the run, each finished after it started after it was queued.
    kinds = _cells(page, "table.ops tbody td:nth-child(2)")
    assert kinds.count("forward_backward") == 4 and kinds.count("optim_step") == 4
    assert page.locator("svg.timeline g[data-seq]").count() == len(kinds)
    # Its checkpoints, as the REST API lists them.
    assert sorted(_cells(page, "table.checkpoints tbody td:nth-child(4)")) == sorted(world.checkpoints)
    page.locator("details").first.evaluate("d => d.open = true")
    page.screenshot(path=str(tmp_path / "run.png"), full_page=True)

    # Another tenant's run: not listed, and its page is a 404 like an unknown one.
    reply = page.goto(f"{world.proxy_url}/dashboard/runs/{world.run_b}")
    assert reply.status == 404 and "No such run" in page.inner_text("main")

    for name in ("checkpoints", "workers", "queue"):
        page.goto(f"{world.proxy_url}/dashboard/{name}")
        page.screenshot(path=str(tmp_path / f"{name}.png"), full_page=True)
    page.goto(f"{world.proxy_url}/dashboard/queue")
    waiting = page.locator('table.queue tr[data-model="tuft/tiny-qwen3"][data-tenant="team-a"] td')
    assert waiting.all_text_contents()[2:4] == ["1", "0"]  # queued, running: the paused run's op
    assert float(waiting.nth(4).text_content() or "") >= 0
    assert page.locator('table.queue tr[data-tenant="team-b"]').count() == 0
    page.goto(f"{world.proxy_url}/dashboard/checkpoints")
    assert sorted(_cells(page, "table.checkpoints tbody td:nth-child(4)")) == sorted(world.checkpoints)
    page.goto(f"{world.proxy_url}/dashboard/workers")
    assert page.locator("table.workers tbody tr").count() >= 1
    assert "live" in _cells(page, "table.workers tbody td:nth-child(6)")

    # Log out: the cookie is gone and the pages send the browser back to the login form.
    page.click("header button[type=submit]")
    page.wait_for_url(f"{world.proxy_url}/dashboard/login")
    page.goto(f"{world.proxy_url}/dashboard/")
    assert page.url == f"{world.proxy_url}/dashboard/login"


def test_admin_sees_every_tenant(browser: Any, world: World) -> None:
    page = _log_in(browser, world, KEY_ADMIN)
    shown = {row.get_attribute("data-run") for row in page.locator("table.runs tbody tr").all()}
    assert shown == {world.run_a, world.run_a2, world.run_b}
    page.goto(f"{world.proxy_url}/dashboard/runs/{world.run_b}")
    assert "team-b" in page.inner_text("table.facts")
    page.goto(f"{world.proxy_url}/dashboard/queue")
    assert page.locator('table.queue tr[data-tenant="team-a"]').count() == 1


def test_tenant_b_sees_only_its_run(browser: Any, world: World) -> None:
    page = _log_in(browser, world, KEY_B)
    shown = {row.get_attribute("data-run") for row in page.locator("table.runs tbody tr").all()}
    assert shown == _rest_run_ids(world.server, KEY_B) == {world.run_b}
    page.goto(f"{world.proxy_url}/dashboard/checkpoints")
    assert page.locator("table.checkpoints").count() == 0  # tenant a's checkpoints are not listed
    page.goto(f"{world.proxy_url}/dashboard/queue")
    assert page.locator("table.queue").count() == 0  # nor tenant a's waiting op
    page.goto(f"{world.proxy_url}/dashboard/workers")
    assert world.run_a not in page.inner_text("table.workers")  # nor the runs a worker holds for a


def test_login_refusals_and_header_keys(world: World) -> None:
    base = f"{world.proxy_url}/dashboard"
    with httpx.Client() as http:
        assert http.get(f"{base}/").headers["location"] == "./login"
        bad = http.post(f"{base}/login", data={"key": "tml-not-a-key"})
        assert bad.status_code == 401 and "set-cookie" not in bad.headers
        forged = http.post(f"{base}/login", data={"key": KEY_A}, headers={"Sec-Fetch-Site": "cross-site"})
        assert forged.status_code == 403 and "set-cookie" not in forged.headers
        # Scripts may send the key as the SDK does.
        page = http.get(f"{base}/queue", headers={"X-API-Key": KEY_A})
        assert page.status_code == 200 and "Content-Security-Policy" in page.headers
        # A run id is echoed only escaped.
        hostile = http.get(f"{base}/runs/%3Cscript%3Ex%22", headers={"X-API-Key": KEY_A})
        assert hostile.status_code == 404 and "<script>" not in hostile.text and "&lt;script&gt;x&quot;" in hostile.text
