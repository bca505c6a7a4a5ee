"""The web app in a real browser (Debian chromium driven by playwright) on the tiny model pair:
profile a prompt, run a small batch, watch the plots render, download the JSONL and check it,
stop a dataset run and keep its records, upload a malformed JSONL and read the error.
Screenshots go to artifacts/screenshots/ (look at them: layout is checked by eye)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from conftest import CHROMIUM, HANG_S, SHOTS, long_generations, need_browser
from conftest import CHROMIUM_ARGS as ARGS

sync_api = need_browser()

from c2c_core.io.records import check_record, read_records  # noqa: E402

RUN_TIMEOUT_MS = 90_000
# slow: end-to-end in Chromium (about a minute; its tests build on each other, so the module
# runs whole); the quick suite keeps one browser test (tests/test_browser_alignment.py) and
# tests each tab's logic without a browser
pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture(scope="module")
def app_url(app_server):
    return app_server[1]


@pytest.fixture(scope="module")
def page(app_url):
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        ctx = browser.new_context(viewport={"width": 1400, "height": 900}, accept_downloads=True)
        pg = ctx.new_page()
        pg.set_default_timeout(30_000)
        pg.goto(app_url)
        pg.wait_for_selector("#profile-run")
        yield pg
        browser.close()


def shot(page, name: str) -> None:
    """The whole page. The sidebar is position:fixed, so instead of a full_page screenshot
    (which draws fixed elements where the scroll left them) the viewport grows to the page."""
    page.wait_for_timeout(400)  # let plotly finish its transitions
    size = page.viewport_size
    height = page.evaluate("document.documentElement.scrollHeight")
    page.set_viewport_size({"width": size["width"], "height": max(height, size["height"])})
    page.wait_for_timeout(300)
    page.screenshot(path=str(SHOTS / f"{name}.png"))
    page.set_viewport_size(size)


def wait_text(page, selector: str, text: str, timeout: int = RUN_TIMEOUT_MS) -> str:
    page.wait_for_function(
        "([sel, text]) => { const e = document.querySelector(sel);"
        " return e && e.innerText.includes(text); }", arg=[selector, text], timeout=timeout)
    return page.inner_text(selector)


def wait_plot(page, selector: str, trace: str = "g.trace") -> None:
    """A plotly chart with at least one drawn trace inside `selector`."""
    page.wait_for_selector(f"{selector} .js-plotly-plot .main-svg {trace}", timeout=RUN_TIMEOUT_MS)


def download(page, target: str, suffix: str | None, dest: Path) -> Path:
    """Click a file link inside a gr.File box (by suffix) or a DownloadButton; save the file."""
    if suffix:
        link = page.locator(f"{target} a[download$='{suffix}']").first
    else:
        page.wait_for_selector(f"{target}:not([disabled])")
        link = page.locator(target)
    with page.expect_download() as d:
        link.click()
    out = dest / d.value.suggested_filename
    d.value.save_as(out)
    return out


def table_rows(page, box: str) -> int:
    """Data rows of a gr.Dataframe (its grid counts the header row too)."""
    return int(page.get_attribute(f"{box} [role=grid]", "aria-rowcount")) - 1


def valid_records(path: Path, n: int) -> list[dict]:
    recs = read_records(path)
    assert len(recs) == n
    for r in recs:
        assert check_record(r) == []
    return recs


def test_page_opens(page):
    assert "C2C timing workbench" in page.title()
    wait_text(page, "#model-status", "Models:")
    shot(page, "01_start")


def test_profile_renders_plots_and_downloads(page, tmp_path):
    page.fill("#profile-prompt textarea", "What is the capital of France?")
    page.click("#profile-run")
    status = wait_text(page, "#profile-status", "TTFT")
    assert "ms/token" in status
    wait_plot(page, "#profile-breakdown", "g.trace.bars")
    wait_plot(page, "#profile-steps", "g.trace.scatter")
    assert "time (ms)" in page.inner_text("#profile-breakdown")
    assert "step time (ms)" in page.inner_text("#profile-steps")
    assert "receiver prefill" in page.inner_text("#profile-stages")
    for suffix in (".tsv", "_trace.json.gz", "_stats.json"):  # the file list follows the run
        page.wait_for_selector(f"#profile-files a[download$='{suffix}']", timeout=RUN_TIMEOUT_MS)
        assert page.locator(f"#profile-files a[download$='{suffix}']").count() == 1
    rec = valid_records(download(page, "#profile-files", ".jsonl", tmp_path), 1)[0]
    assert rec["prompt"] == "What is the capital of France?"
    shot(page, "02_profile")


def test_batch_fills_table_and_downloads(page, tmp_path):
    page.get_by_role("tab", name="Batch").click()
    page.fill("#batch-prompts textarea", "Say hello.\nWhat is 25 * 17?\nWrite a haiku.")
    page.click("#batch-run")
    wait_text(page, "#batch-status", "Done")
    wait_plot(page, "#batch-plot", "g.trace.bars")
    table = page.inner_text("#batch-table")
    assert "TTFT (ms)" in table and "decode (ms/token)" in table
    assert table_rows(page, "#batch-table") == 3
    recs = valid_records(download(page, "#batch-file", None, tmp_path), 3)
    assert [r["prompt"] for r in recs] == ["Say hello.", "What is 25 * 17?", "Write a haiku."]
    # the run's summary.json is offered beside it: settings, machine, statistics per mode
    summary = json.loads(download(page, "#batch-summary", None, tmp_path).read_text())
    assert summary["records"] == 3 and summary["modes"]["c2c"]["count"] == 3
    assert summary["settings"]["requested"]["command"] == "batch"
    shot(page, "03_batch")


def test_every_run_tab_has_a_stop_that_ends_its_job(page, tmp_path):
    """Batch (like Profile, Sweep and Dataset) has its own Stop: a long batch ends within a
    step, keeps its finished records, and the status says so."""
    page.get_by_role("tab", name="Batch").click()
    page.fill("#batch-prompts textarea", "\n".join(f"Count to {i}." for i in range(60)))
    with long_generations(page):  # never done before the Stop, however fast the machine
        page.click("#batch-run")
        # a record of this run is in (the table may still show the previous run's rows)
        page.wait_for_function("() => /Running: [1-9]/.test((document.querySelector("
                               "'#batch-status') || {}).innerText || '')",
                               timeout=RUN_TIMEOUT_MS)
        page.click("#batch-stop")
        status = wait_text(page, "#batch-status", "Stopped")
    n = int(status.split("after ")[1].split(" of")[0])
    assert 1 <= n < 60
    valid_records(download(page, "#batch-file", None, tmp_path), n)
    for tab, sel in (("Profile", "#profile-stop"), ("Sweep", "#sweep-stop")):
        page.get_by_role("tab", name=tab).click()
        assert page.locator(sel).is_visible(), sel


def test_dataset_stop_keeps_finished_records(page, tmp_path):
    src = tmp_path / "many_prompts.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"Count to {i}."}) + "\n" for i in range(400)))
    page.get_by_role("tab", name="Dataset").click()
    # offline, the tab opens on the shipped sample prompts, ready to run; clear them for ours
    assert "sample_prompts" in page.inner_text("#dataset-file")
    assert page.is_checked("#dataset-source input[value=file]")
    page.locator("#dataset-file button[aria-label='Clear']").first.click()
    page.set_input_files("#dataset-file input[type=file]", str(src))
    page.wait_for_function("document.querySelector('#dataset-source input[value=file]').checked")
    page.get_by_label("number of samples").fill("400")
    page.click("#dataset-run")
    page.wait_for_function("(n) => Number(document.querySelector('#dataset-table [role=grid]')"
                           ".getAttribute('aria-rowcount')) > n", arg=1, timeout=RUN_TIMEOUT_MS)
    page.click("#dataset-stop")
    status = wait_text(page, "#dataset-status", "Stopped")
    n = int(status.split("after ")[1].split(" of")[0])
    assert 1 <= n < 400
    path = download(page, "#dataset-file-out", None, tmp_path)
    valid_records(path, n)
    wait_plot(page, "#dataset-plot")  # points and a box below 20 samples, bars from 20
    shot(page, "04_dataset_stopped")


def test_results_malformed_upload_says_the_line(page, tmp_path):
    bad = tmp_path / "broken_results.jsonl"
    bad.write_text('{"id": 1, "timing": {}}\n{"id": 2, "timing": \n')
    bad.write_text(bad.read_text() + '{"id": 3}\n')
    page.get_by_role("tab", name="Results").click()
    page.set_input_files("#results-files input[type=file]", str(bad))
    page.click("#results-analyze")
    status = wait_text(page, "#results-status", "line 2")
    assert "broken_results.jsonl line 2 is not valid JSON" in status
    assert "Traceback" not in page.content()
    shot(page, "05_results_error")


def test_results_of_this_session(page):
    page.get_by_role("tab", name="Results").click()
    runs = page.locator("#results-runs label")
    runs.first.wait_for()
    assert runs.count() >= 3  # profile, batch, dataset of this session
    runs.nth(0).click()
    runs.nth(1).click()
    page.click("#results-analyze")
    wait_text(page, "#results-status", "record(s) from 2 file(s)")
    wait_plot(page, "#results-hist")  # points and a box below 20 samples, bars from 20
    wait_plot(page, "#results-steps", "g.trace.scatter")
    assert "decode (ms/token)" in page.inner_text("#results-hist")
    assert "TTFT ms mean" in page.inner_text("#results-summary")
    page.get_by_text("Two files side by side").click()
    wait_plot(page, "#results-b-bars", "g.trace.bars")
    shot(page, "06_results")


def test_waiting_job_shows_its_queue_place(page, app_url):
    """Model jobs share one slot: a profile clicked while another client's batch runs waits,
    and the page says so."""
    from gradio_client import Client
    page.get_by_role("tab", name="Profile").click()
    job = Client(app_url, verbose=False).submit(prompts="one\ntwo", max_new_tokens=600,
                                                ignore_eos=True, api_name="/batch")
    try:
        # the batch must hold the slot before the click (a fixed 300 ms wait was a race on a
        # loaded machine); the bounds below are hang guards only
        deadline = time.time() + HANG_S
        while job.status().code.name not in ("PROCESSING", "ITERATING", "PROGRESS"):
            assert time.time() < deadline, "the batch never started"
            page.wait_for_timeout(50)
        page.click("#profile-run")
        text = wait_text(page, "#profile-status", "queue: 1/", timeout=HANG_S * 1000)
        assert "one model job runs at a time" in text
        shot(page, "07_waiting_in_queue")
    finally:
        job.result()
    wait_text(page, "#profile-status", "TTFT")
