"""The Profile tab's Token alignment table in a real browser, on the packaged SmolLM2 <- Gemma
pair (different tokenizers): it appears when Profile is pressed (tokenizers only: before the
model job has done anything), collapsed, and its cells show token texts such as <|im_start|>
as text. The model job it started is stopped at once."""

from __future__ import annotations

import pytest

from conftest import CHROMIUM, free_port, need_browser
from conftest import CHROMIUM_ARGS as ARGS

sync_api = need_browser()

# Not slow: the quick suite's one real-browser test (about 15 s: the page opens, Profile is
# pressed, a panel opens); the other browser files are marked slow.
pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    from c2c_core.frontends import worker
    from c2c_core.frontends.ui import build_app, launch_kwargs, sessions
    saved, sessions.SESSION_ROOT = sessions.SESSION_ROOT, str(tmp_path_factory.mktemp("sessions"))
    demo = build_app(defaults={"preset": "smollm2+gemma3-demo", "max_new_tokens": 2,
                               "warmup": 0})
    port = free_port()
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True,
                **launch_kwargs())
    yield f"http://127.0.0.1:{port}/"
    demo.close()
    worker.shutdown()
    sessions.SESSION_ROOT = saved


def open_accordion(page, box: str, inside: str, tries: int = 3) -> None:
    """Open the accordion `box` until `inside` shows. Its header is a button that toggles; a
    click that lands while the page redraws (the stopped job's last update) can be lost, so the
    header's own `open` class is checked and the click repeated, never toggled back."""
    header = page.locator(f"{box} > button.label-wrap")
    for _ in range(tries):
        if "open" not in (header.get_attribute("class") or "").split():
            header.click()
        try:
            page.wait_for_selector(inside, state="visible", timeout=20_000)
            return
        except sync_api.TimeoutError:
            continue
    raise AssertionError(f"{inside} never showed; {box}'s header class:"
                         f" {header.get_attribute('class')!r}")


def test_profile_shows_the_token_alignment_collapsed(url):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.set_default_timeout(60_000)
        page.goto(url)
        page.wait_for_selector("#profile-run")
        assert not page.locator("#profile-alignment").is_visible()  # until Profile is pressed
        page.fill("#profile-prompt textarea", "What is 25 * 17?")
        page.click("#profile-run")
        page.wait_for_selector("#profile-alignment", state="visible")
        page.click("#profile-stop")  # the model job is not what this test is about
        assert not page.locator("#profile-alignment-table").is_visible()  # collapsed
        open_accordion(page, "#profile-alignment", "#profile-alignment-table [role=grid]")
        page.wait_for_function(
            "() => document.querySelector('#profile-alignment-table').innerText"
            ".includes('<|im_start|>')")
        text = page.inner_text("#profile-alignment-table")
        # token texts as text (the grid draws the first rows only: template and pads)
        assert '"<|im_start|>"' in text and '"<start_of_turn>"' in text and "pad" in text
        note = page.inner_text("#profile-alignment")
        assert "receiver positions" in note and "gemma3" in note
        browser.close()
