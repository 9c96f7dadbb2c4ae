"""The dashboard page in a real browser: Debian's headless Chromium, driven by playwright.

No browser is downloaded: playwright launches ``/usr/bin/chromium`` (``.ci/run``
installs Debian's ``chromium`` package when it is missing). Without it, or without
the ``playwright`` package, these tests are skipped with the reason.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from backbeat_sync import BackbeatConfig, Integration, StatusClaim
from backbeat_sync.dashboard import Dashboard
from backbeat_sync.transport.local import LocalBus

from .support import unique_bus

CHROMIUM = os.environ.get("BACKBEAT_TEST_CHROMIUM", "/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
#: Milliseconds a DOM condition may take (a loaded CI machine: generous, reached only on failure).
PATIENCE_MS = 30_000

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the dev extra)")
if not os.access(CHROMIUM, os.X_OK):
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)

HOSTILE_TASK = '<img src=x onerror="window.__pwned=1">'
HOSTILE_NOTES = "<script>window.__pwned=1</script><b>bold</b>"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One headless Chromium for the module."""
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh page; uncaught script errors are collected on ``page.errors``.

    ``bypass_csp``: playwright's ``wait_for_function`` evaluates strings, which the
    page's policy forbids; it also means the hostile-content test proves the page's
    escaping alone, not the policy behind it.
    """
    context = browser.new_context(viewport={"width": 1280, "height": 900}, bypass_csp=True)
    p = context.new_page()
    p.errors = []
    p.on("pageerror", lambda exc: p.errors.append(str(exc)))
    p.set_default_timeout(PATIENCE_MS)
    yield p
    context.close()


def hostile_claim(beat: int) -> bytes:
    return StatusClaim(
        cluster_id="web",
        agent_id="mallory",
        node_id="<i>n</i>",
        task_id=HOSTILE_TASK,
        beat_index=beat,
        state="executing",
        beats_left=3,
        progress=0.25,
        notes=HOSTILE_NOTES,
        sent_at="2026-12-01T08:00:00.000Z",
        operation_type="<svg onload=window.__pwned=1>",
        phase="executing",
    ).encode()


def test_page_shows_a_running_agent_live(page: Any) -> None:
    """Against a running agent: the beat index advances, the agent has a row, its operation a
    progress bar, and a hostile claim's fields are rendered as text (no element, no script run)."""
    bus = unique_bus()
    cfg = BackbeatConfig(cluster_id="web", agent_id="agent-1", nats_url=f"local://{bus}", tempo_bpm=600)
    with (
        Dashboard(cfg.evolve(agent_id="dash"), listen="127.0.0.1:0") as dash,
        Integration(cfg, "n-1") as agent,
    ):
        agent.start_p2p_operation("op-visible", "election", 1000)
        page.goto(dash.url)
        page.wait_for_function("document.getElementById('beat-index').textContent !== '–'")
        first = int(page.inner_text("#beat-index"))
        page.wait_for_function(f"Number(document.getElementById('beat-index').textContent) > {first}")
        assert page.inner_text("#stream-state") == "live"

        row = page.locator('tr.agent-row[data-agent="agent-1"]')
        row.wait_for()
        assert "n-1" in row.inner_text()

        bar = page.locator('tr.op-row[data-task="op-visible"] .progress')
        bar.wait_for()
        assert 0.0 <= float(bar.get_attribute("data-progress")) < 0.75
        assert "warned" not in bar.get_attribute("class")
        assert (
            page.locator('tr.op-row[data-task="op-visible"] .fill')
            .get_attribute("style")
            .startswith("width:")
        )

        beat = agent.get_health()["current_beat"]
        LocalBus.named(bus).publish("backbeat.status.web.mallory", hostile_claim(beat))
        hostile = page.locator("tr.op-row", has_text="window.__pwned=1</script>")
        hostile.wait_for()
        cells = hostile.locator("td").all_inner_texts()
        assert HOSTILE_TASK in cells
        assert HOSTILE_NOTES in cells
        assert "<svg onload=window.__pwned=1>" in cells
        assert page.evaluate("window.__pwned") is None
        assert page.locator("main img, main b, main script, main i, #operations svg").count() == 0
        assert page.errors == []


def test_page_stays_responsive_with_ten_thousand_operations(page: Any) -> None:
    """1,000 agents x 10 operations: the page shows 100 rows of each and says how many it left out."""
    bus = unique_bus()
    cfg = BackbeatConfig(cluster_id="big", agent_id="dash", nats_url=f"local://{bus}")
    with Dashboard(cfg, listen="127.0.0.1:0") as dash:
        from .test_dashboard import claim, frame, health

        dash.state.frame(frame(500, cluster="big"))
        for a in range(1000):
            dash.state.claim(health(500, agent=f"agent-{a:04d}"))
            for o in range(10):
                dash.state.claim(
                    claim(
                        f"op-{a}-{o}",
                        500,
                        agent=f"agent-{a:04d}",
                        cluster="big",
                        beats_left=10 - o,
                        progress=o / 10,
                    )
                )
        page.goto(dash.url)
        page.wait_for_function("document.querySelectorAll('#operations tr.op-row').length === 100")
        assert page.locator("#agents tr.agent-row").count() == 100
        assert "showing 100 of 10000" in page.inner_text("#operations tr.more")
        assert "10000 active" in page.inner_text("#ops-summary")
        page.fill("#filter", "agent-0042")
        page.wait_for_function("document.querySelectorAll('#operations tr.op-row').length === 10")
        assert page.locator("#agents tr.agent-row").count() == 1
        # a new beat still reaches the page: it is not frozen
        dash.state.frame(frame(501, cluster="big"))
        page.wait_for_function("document.getElementById('beat-index').textContent === '501'")
        assert page.errors == []


def test_page_asks_for_basic_auth(browser: Any) -> None:
    """With auth the page loads only with the credentials, and its stream then works."""
    cfg = BackbeatConfig(cluster_id="web", agent_id="dash", nats_url=f"local://{unique_bus()}")
    with Dashboard(cfg, listen="127.0.0.1:0", auth=("admin", "pw")) as dash:
        anonymous = browser.new_context()
        try:
            with pytest.raises(sync_api.Error, match="AUTH"):  # the browser refuses to show a 401 page
                anonymous.new_page().goto(dash.url)
            assert anonymous.request.get(dash.url).status == 401
        finally:
            anonymous.close()
        context = browser.new_context(
            http_credentials={"username": "admin", "password": "pw"}, bypass_csp=True
        )
        try:
            p = context.new_page()
            assert p.goto(dash.url).status == 200
            p.wait_for_function(
                "document.getElementById('stream-state').textContent === 'live'", timeout=PATIENCE_MS
            )
        finally:
            context.close()
