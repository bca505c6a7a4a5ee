"""The Load tab in a real browser (Debian chromium, playwright) on the tiny pair: a bounded
sweep (two modes, one rate, two requests each) runs through our server in the app's worker,
its status line shows the phase and one elapsed clock while it prepares, and at the end the
per-point table has a row per mode, the three plots are drawn and the JSONL, summary and HTML
report are offered; a rate past the tab's cap is refused with a sentence before anything
runs. Screenshots go to artifacts/screenshots/ (look at them)."""

from __future__ import annotations

import pytest

from conftest import CHROMIUM, SHOTS, need_browser
from conftest import CHROMIUM_ARGS as ARGS

sync_api = need_browser()
pytestmark = [pytest.mark.browser, pytest.mark.slow]  # test_browser_alignment: the quick one

RUN_TIMEOUT_MS = 240_000


@pytest.fixture(scope="module")
def page(app_server):
    _demo, url = app_server
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        pg = browser.new_page(viewport={"width": 1400, "height": 1400})
        pg.set_default_timeout(30_000)
        pg.goto(url)
        pg.wait_for_selector("#profile-run")
        pg.get_by_role("tab", name="Load").click()
        yield pg
        browser.close()


def _fill(page, elem: str, value: str) -> None:
    box = page.locator(f"#{elem} textarea, #{elem} input").first
    box.fill(value)
    box.press("Tab")


def test_a_rate_past_the_cap_is_refused_before_it_runs(page):
    _fill(page, "load-rates", "50")
    page.click("#load-run")
    page.wait_for_function("() => document.body.innerText.includes('cap of')",
                           timeout=RUN_TIMEOUT_MS)
    assert "Done" not in page.inner_text("#load-status")


def test_a_small_sweep_draws_its_points_and_offers_its_files(page):
    # the tiny models' greedy answers are special tokens (no text: a failed request, as vLLM's
    # bench counts it); sampled, with EOS ignored, they are text
    page.get_by_label("ignore EOS").check()
    page.get_by_text("Sampling").click()
    page.get_by_label("sample (off = greedy)").check()
    page.locator("#load-modes").get_by_label("t2t").uncheck()
    _fill(page, "load-rates", "2")
    _fill(page, "load-requests", "2")
    _fill(page, "load-max-tokens", "4")
    _fill(page, "load-slots", "2")
    page.click("#load-run")
    page.wait_for_function("() => /elapsed/.test(document.querySelector('#load-status')"
                           ".innerText)", timeout=RUN_TIMEOUT_MS)
    page.wait_for_function("() => /Done|Stopped|rror/.test(document.querySelector("
                           "'#load-status').innerText)", timeout=RUN_TIMEOUT_MS)
    page.wait_for_timeout(1500)  # the downloads' follow-up events
    page.screenshot(path=str(SHOTS / "load_tab.png"), full_page=True)
    status = page.inner_text("#load-status")
    assert "Done" in status, status
    rows = page.inner_text("#load-table")
    assert "c2c" in rows and "receiver" in rows, rows
    assert "failed" not in status, status
    assert page.locator("#load-latency .js-plotly-plot").count() == 1
    assert page.locator("#load-split .js-plotly-plot").count() == 1
    assert page.locator("#load-html").is_visible()
    assert page.locator("#load-summary").is_visible()
