"""What a person sees in a real browser (Debian chromium, playwright) while a run starts and
where the hub cannot be reached: the Dataset tab opens on the shipped sample prompts although no
HF_*_OFFLINE variable is set (the hub's address refuses), and a run's status line shows its
phase and one elapsed clock that counts up during the warm-up (gradio's own timer hidden).
Screenshots go to artifacts/screenshots/ (look at them)."""

from __future__ import annotations

import re

import pytest

from conftest import CHROMIUM, SHOTS, free_port, long_generations, need_browser
from conftest import CHROMIUM_ARGS as ARGS

sync_api = need_browser()

RUN_TIMEOUT_MS = 90_000
# slow: end-to-end in Chromium (tens of seconds); the quick suite keeps one browser test
# (tests/test_browser_alignment.py), and this file's logic is tested without a browser too
pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture(scope="module")
def app_url(tiny_cfg_kwargs, tmp_path_factory):
    """The app on the tiny pair, built where nothing answers at the hub's address (the discard
    port refuses) and no offline variable is set."""
    pytest.importorskip("gradio")
    from c2c_core.frontends.ui import build_app, launch_kwargs, sessions
    from c2c_core.io import hub
    mp = pytest.MonkeyPatch()
    mp.setattr(sessions, "SESSION_ROOT", str(tmp_path_factory.mktemp("sessions")))
    mp.setenv("C2C_ALLOW_LOCAL_PATHS", "1")  # the tiny models are local folders
    build = pytest.MonkeyPatch()
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        build.delenv(var, raising=False)
    build.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    mp.setattr(hub, "_reachable_cache", {})
    try:
        demo = build_app(defaults=tiny_cfg_kwargs)
    finally:
        build.undo()  # the runs themselves load local folders, offline as every test
    port = free_port()
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True,
                **launch_kwargs())
    yield f"http://127.0.0.1:{port}/"
    demo.close()
    from c2c_core.frontends import worker
    worker.shutdown()
    mp.undo()


@pytest.fixture(scope="module")
def page(app_url):
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        pg = browser.new_page(viewport={"width": 1400, "height": 900})
        pg.set_default_timeout(30_000)
        pg.goto(app_url)
        pg.wait_for_selector("#profile-run")
        yield pg
        browser.close()


def test_dataset_tab_opens_on_the_sample_where_the_hub_is_unreachable(page):
    page.get_by_role("tab", name="Dataset").click()
    assert page.is_checked("#dataset-source input[value=file]")
    assert "sample_prompts" in page.inner_text("#dataset-file")


def hidden(page, selector: str) -> None:
    """Waits until gradio's element `selector` is on the page (it comes and goes with each
    update) and hidden; a shown one keeps this waiting until it fails."""
    page.wait_for_function("(sel) => { const e = document.querySelector(sel);"
                           " return e !== null && getComputedStyle(e).display === 'none'; }",
                           arg=selector, timeout=RUN_TIMEOUT_MS)


ELAPSED = re.compile(r"(\d+(?:\.\d)? s|\d+ min \d\d s) elapsed")


def test_the_warm_up_shows_its_phase_and_a_clock_that_counts_up(page):
    """A batch with a long warm-up: the status line says "Warm-up (not recorded)… · N s
    elapsed" and N moves on while no record has arrived; gradio's per-update timer is not
    shown beside it. Stop then ends the run."""
    page.get_by_role("tab", name="Batch").click()
    page.fill("#batch-prompts textarea", "Count to ten.\nName three colours.")
    page.fill("#warmup input", "20")  # 20 warm-ups of 300 tokens: still warming up at the Stop
    with long_generations(page):
        page.click("#batch-run")
        page.wait_for_function("() => /Warm-up \\(not recorded\\)… · .* elapsed/.test("
                               "document.querySelector('#batch-status').innerText)",
                               timeout=RUN_TIMEOUT_MS)
        first = page.inner_text("#batch-status")
        page.wait_for_function("(before) => { const t = document.querySelector('#batch-status')"
                               ".innerText; return /Warm-up/.test(t) && t !== before; }",
                               arg=first, timeout=RUN_TIMEOUT_MS)
        later = page.inner_text("#batch-status")
        assert ELAPSED.search(first) and ELAPSED.search(later), (first, later)
        assert ELAPSED.search(first).group(1) != ELAPSED.search(later).group(1)  # it counts on
        # the line carries its mark, and gradio's timer (it restarts at each update) is hidden
        assert page.locator("#batch-status .c2c-live").count() >= 1
        hidden(page, "#batch-status [data-testid=status-tracker] .progress-text")
        page.screenshot(path=str(SHOTS / "progress_warm_up.png"))
        page.click("#batch-stop")
        status = page.wait_for_function(
            "() => /Stopped/.test(document.querySelector('#batch-status').innerText)",
            timeout=RUN_TIMEOUT_MS)
        assert status
    page.fill("#warmup input", "0")


def test_a_sweep_names_its_shape_and_an_eta(page):
    """A sweep's line names the generation, the shape running (k of n, its tokens) and an ETA
    once one is known, with the one clock; the bar's own words are hidden beside it."""
    page.get_by_role("tab", name="Sweep").click()
    page.fill("#sweep-in textarea", "8,16,32,64,128")
    page.fill("#sweep-out textarea", "256")  # long enough to be seen between two updates
    page.click("#sweep-run")
    page.wait_for_function("() => / · shape [2-5] of 5 \\(.* tokens in, 256 out\\) · ETA .* elapsed/"
                           ".test(document.querySelector('#sweep-status').innerText)",
                           timeout=RUN_TIMEOUT_MS)
    hidden(page, "#sweep-status [data-testid=status-tracker] .progress-level-inner")
    page.screenshot(path=str(SHOTS / "progress_sweep_eta.png"))
    page.click("#sweep-stop")  # what is left is not what this test is about
    page.wait_for_function("() => /Stopped|Done/.test(document.querySelector('#sweep-status')"
                           ".innerText)", timeout=RUN_TIMEOUT_MS)
