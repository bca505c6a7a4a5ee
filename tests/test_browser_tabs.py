"""Tabs of one browser in a real browser (Debian chromium via playwright): they share one
session, and closing or reloading one of them never stops or hides another's work; a page of
another browser (another context: its own cookie) never sees it."""

from __future__ import annotations

import re

import pytest

from conftest import CHROMIUM, need_browser
from conftest import CHROMIUM_ARGS as ARGS

sync_api = need_browser()

RUN_TIMEOUT_MS = 180_000
# slow: end-to-end in Chromium (tens of seconds); the quick suite keeps one browser test
# (tests/test_browser_alignment.py), and this file's logic is tested without a browser too
pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture(scope="module")
def browser(app_server):
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def open_page(ctx, url):
    pg = ctx.new_page()
    pg.set_default_timeout(60_000)
    pg.goto(url)
    pg.wait_for_selector("#profile-run")
    return pg


def start_batch(page, n: int) -> int:
    page.get_by_role("tab", name="Batch").click()
    page.fill("#batch-prompts textarea", "\n".join(f"Count to {i}." for i in range(n)))
    page.click("#batch-run")
    # running (a record in), or on a fast machine already done before the first update
    page.wait_for_function("() => /Running: [1-9]|Done:/.test((document.querySelector("
                           "'#batch-status') || {}).innerText || '')", timeout=RUN_TIMEOUT_MS)
    text = page.inner_text("#batch-status")
    m = re.search(r"Running: \d+ of (\d+) record", text) or re.search(r"Done:\D*(\d+) record",
                                                                       text)
    return int(m.group(1))  # records to come


def listed_runs(page, expect: int = 0) -> list[str]:
    """The labels of the Results tab's "runs from this session" (listed again on each visit,
    by the tab's select event): once at least `expect` are listed (a loaded machine may answer
    late), else after a moment (a list that should stay empty gets the time to fill)."""
    page.get_by_role("tab", name="Batch").click()
    page.get_by_role("tab", name="Results").click()
    if expect:
        page.wait_for_function("(n) => document.querySelectorAll('#results-runs label').length"
                               " >= n", arg=expect, timeout=RUN_TIMEOUT_MS)
    else:
        page.wait_for_timeout(1500)
    return page.locator("#results-runs label").all_inner_texts()


def test_closing_a_tab_beside_a_running_job_leaves_it_running_and_listed(browser, app_server):
    url = app_server[1]
    ctx = browser.new_context(viewport={"width": 1400, "height": 900})
    a = open_page(ctx, url)
    b = open_page(ctx, url)  # a second tab of the same browser: the same session cookie
    start_batch(a, 30)
    b.close()  # the tab beside the running job goes away
    status = a.locator("#batch-status")
    a.wait_for_function("() => /Done:|Stopped|rror/.test(document.querySelector("
                        "'#batch-status').innerText)", timeout=RUN_TIMEOUT_MS)
    text = status.inner_text()
    assert "Done" in text, text  # never "Stopped": another tab's close stopped nothing
    n = int(re.search(r"Done:\D*(\d+) record", text).group(1))
    runs = listed_runs(a, 1)
    assert any(f"({n} records)" in r for r in runs), runs
    # a third tab opened and closed after the run: A's run stays listed there and here
    c = open_page(ctx, url)
    assert listed_runs(c, len(runs)) == runs
    c.close()
    a.wait_for_timeout(2000)
    assert listed_runs(a, len(runs)) == runs
    # another browser (its own cookie) sees none of it
    other = browser.new_context()
    assert listed_runs(open_page(other, url)) == []
    other.close()
    ctx.close()


def test_a_job_whose_page_is_reloaded_runs_on_into_the_session(browser, app_server):
    """Reloading the page that runs a job (another tab of the session open beside it): the job
    is not stopped; its records are all in the run the reloaded page lists."""
    url = app_server[1]
    ctx = browser.new_context(viewport={"width": 1400, "height": 900})
    a = open_page(ctx, url)
    b = open_page(ctx, url)
    before = set(listed_runs(b))
    total = start_batch(a, 30)
    a.reload()
    a.wait_for_selector("#profile-run")
    a.wait_for_function("() => /Models:/.test(document.querySelector('#model-status').innerText)")

    # a second job from the reloaded page starts only once the first has ended (one job on
    # the models at a time)
    a.get_by_role("tab", name="Batch").click()
    a.fill("#batch-prompts textarea", "Say hello.")
    assert a.input_value("#batch-prompts textarea") == "Say hello."
    a.click("#batch-run")
    a.wait_for_function("() => /Done:|Stopped|rror/.test(document.querySelector("
                        "'#batch-status').innerText)", timeout=RUN_TIMEOUT_MS)
    text = a.locator("#batch-status").inner_text()
    assert "Done" in text, text
    second = int(re.search(r"Done:\D*(\d+) record", text).group(1))
    runs = [r for r in listed_runs(a, len(before) + 2) if r not in before]
    assert len(runs) == 2, runs
    counts = sorted(int(re.search(r"\((\d+) records?\)", r).group(1)) for r in runs)
    assert sorted([second, total]) == counts, runs  # the first ran to its end: not stopped
    ctx.close()
