"""Issue 16, part 5, in a real browser: a results file whose fields (run.device, cpu, dtype,
mode, id) and file name hold HTML tags is analysed; no tag renders as an element and no request
leaves the page. The app runs without models (nothing here needs one)."""

from __future__ import annotations

import json

import pytest

from conftest import CHROMIUM, SHOTS, free_port, need_browser
from conftest import CHROMIUM_ARGS as ARGS

sync_api = need_browser()

OUTSIDE = "http://127.0.0.1:9/x"
TAG = f"<img src={OUTSIDE}>"
# slow: end-to-end in Chromium (tens of seconds); the quick suite keeps one browser test
# (tests/test_browser_alignment.py), and this file's logic is tested without a browser too
pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture(scope="module")
def bare_app(tmp_path_factory):
    from c2c_core.frontends.ui import build_app, launch_kwargs, sessions
    saved, sessions.SESSION_ROOT = sessions.SESSION_ROOT, str(tmp_path_factory.mktemp("sessions"))
    demo = build_app()
    port = free_port()
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True,
                **launch_kwargs())
    yield f"http://127.0.0.1:{port}"
    demo.close()
    sessions.SESSION_ROOT = saved


def _record(i: int, mode: str, run: dict) -> dict:
    return {"id": f"q{i}<b>bold</b>" if i == 1 else i, "mode": mode, "repeat": 0,
            "prompt": f"prompt {i} <img src={OUTSIDE}?p>", "response": "r", "correct": True,
            "run": run,
            "timing": {"ttft_ms": 10.0 + i, "e2e_ms": 100.0 + i, "decode_total_ms": 6.0,
                       "decode_avg_ms": 1.5 + i / 10, "num_generated_tokens": 5,
                       "tokens_per_second": 600.0, "base_prefill_ms": 4.0},
            "decode_step_times_ms": [1.5, 1.6, 1.4, 1.5]}


def test_tags_in_a_results_file_render_as_text_and_load_nothing(bare_app, tmp_path):
    evil = {"device": f"cuda{TAG}", "cpu": f"{TAG}cpu", "dtype": f"bf16{TAG}",
            "max_new_tokens": 8}
    a = tmp_path / "tagged<i>a<i>.jsonl"
    a.write_text("".join(json.dumps(_record(i, m, evil)) + "\n" for i in range(3)
                         for m in (f"c2c{TAG}", "t2t")), encoding="utf-8")
    b = tmp_path / "plain.jsonl"
    b.write_text("".join(json.dumps(_record(i, "c2c", {"device": "cpu", "cpu": "x86",
                                                       "dtype": "float32"})) + "\n"
                         for i in range(3)), encoding="utf-8")
    bad = tmp_path / "bad<img src=x>.jsonl"  # unreadable: its name goes to a toast and the status
    bad.write_text("not json\n", encoding="utf-8")
    SHOTS.mkdir(parents=True, exist_ok=True)
    outside: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.set_default_timeout(60_000)
        page.on("request", lambda r: None if r.url.startswith((bare_app, "data:", "blob:"))
                else outside.append(r.url))
        page.goto(bare_app)
        page.get_by_role("tab", name="Results").click()
        page.set_input_files("#results-files input[type=file]", [str(a), str(b), str(bad)])
        page.wait_for_timeout(1500)
        page.click("#results-analyze")
        page.wait_for_function(
            "() => { const e = document.querySelector('#results-status');"
            " return e && e.innerText.includes('record(s) from 2 file(s)'); }", timeout=60_000)
        page.wait_for_selector("#results-hist .js-plotly-plot .main-svg g.trace")
        page.get_by_text("Two files side by side").click()
        page.wait_for_selector("#results-a-bars .js-plotly-plot .main-svg g.trace")
        status = page.inner_text("#results-status")
        ratios = page.inner_text("#results-ratios")
        table = page.inner_text("#results-summary")
        charts = page.evaluate("() => [...document.querySelectorAll('.js-plotly-plot')]"
                               ".map(e => e.textContent).join(' ')")
        imgs = page.evaluate("() => [...document.querySelectorAll('img')].map(i => i.src)")
        # plotly draws <b> as a bold tspan: an id's tags must not become one
        bolds = page.evaluate("() => [...document.querySelectorAll('.js-plotly-plot tspan')]"
                              ".filter(t => (t.getAttribute('style') || '').includes('bold'))"
                              ".length")
        page.wait_for_timeout(1500)  # an <img> would have fetched by now
        page.set_viewport_size({"width": 1400, "height": page.evaluate(
            "document.documentElement.scrollHeight")})
        page.screenshot(path=str(SHOTS / "08_results_tags_as_text.png"))
        browser.close()
    # every tag is there, as text
    assert TAG in status and "cuda" in status, status
    assert f"c2c{TAG}" in ratios, ratios
    assert TAG in table
    assert f"c2c{TAG}" in charts and "q1<b>bold</b>" in charts
    assert "bad<img src=x>.jsonl" in status or "bad" in status
    # none is an element, and nothing was fetched from outside the app
    assert not [s for s in imgs if "127.0.0.1:9" in s or s.endswith("/x")], imgs
    assert bolds == 0
    assert outside == [], outside
