"""Screenshots of the app while it works (Debian chromium, the offline smollm2 pairs):

1. a batch mid-run in mode `all` (progress text with per-mode ETA and elapsed time, status
   line readable beside the progress box),
2. Profile mid-run (its phase and elapsed time),
3. a second tab opened while the server holds another pair than the preset default (its model
   panel and status line show the held pair), and that tab's run on yet another pair saying
   what it will replace.

Usage: python scripts/progress_shots.py [OUT]   (default artifacts/screenshots/progress)
Looked at by eye; each file name says what it should show.
"""

from __future__ import annotations

import os
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(out: str) -> None:
    from playwright.sync_api import sync_playwright

    from c2c_core.frontends.ui import build_app, launch_kwargs
    os.makedirs(out, exist_ok=True)
    demo = build_app()
    port = free_port()
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True,
                **launch_kwargs())
    url = f"http://127.0.0.1:{port}/"

    def wait_text(page, sel, text, timeout=300_000):
        page.wait_for_function("([s, t]) => { const e = document.querySelector(s);"
                               " return e && e.innerText.includes(t); }", arg=[s := sel, text],
                               timeout=timeout)
        return s

    def snap(page, name):
        page.wait_for_timeout(300)
        page.screenshot(path=os.path.join(out, f"{name}.png"))
        print("wrote", name, flush=True)

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        ctx = browser.new_context(viewport={"width": 1400, "height": 900})
        a = ctx.new_page()
        a.set_default_timeout(120_000)
        a.goto(url)
        a.wait_for_selector("#profile-run")
        # 1. batch, mode all, mid-run
        a.click("button[role=tab]:has-text('Batch')")
        a.locator("#mode input").click()
        a.locator("[role=option]:has-text('all four')").click()
        a.locator("#max-new-tokens input").fill("24")
        a.locator("#batch-prompts textarea").fill("\n".join(
            ["What is 2+2?", "Name a color.", "Say hi.", "Count to three.", "Name a fruit."]))
        a.click("#batch-run")
        wait_text(a, "#batch-status", "ETA")
        time.sleep(1.5)
        snap(a, "1-batch-mode-all-mid-run-eta-elapsed")
        a.click("#batch-stop")
        wait_text(a, "#batch-status", "Stopped")
        # 2. profile mid-run
        a.click("button[role=tab]:has-text('Profile')")
        a.locator("#max-new-tokens input").fill("200")
        a.click("#profile-run")
        wait_text(a, "#profile-status", "now: the timed run")
        time.sleep(2.5)
        snap(a, "2-profile-mid-run-phase-elapsed")
        wait_text(a, "#profile-status", "TTFT", timeout=600_000)
        snap(a, "2b-profile-done")
        # 3. the server now holds smollm2+gemma3-demo; a new tab shows it
        a.locator("#preset input").click()
        a.locator("[role=option]:has-text('smollm2+gemma3-demo')").click()
        a.click("#load-models")
        a.wait_for_function("() => { const t = document.querySelector('#model-status').innerText;"
                            " return t.includes('held by the server') && t.includes('gemma'); }",
                            timeout=600_000)
        b = ctx.new_page()
        b.goto(url)
        b.wait_for_selector("#profile-run")
        b.wait_for_timeout(2000)
        snap(b, "3-second-tab-shows-the-held-pair")
        b.locator("#preset input").click()
        b.locator("[role=option]:has-text('smollm2-demo')").first.click()
        b.click("button[role=tab]:has-text('Batch')")
        b.locator("#batch-prompts textarea").fill("Say hi.")
        b.click("#batch-run")
        wait_text(b, "#batch-status", "in place of")
        snap(b, "3b-run-on-another-pair-says-what-it-replaces")
        wait_text(b, "#batch-status", "Done", timeout=600_000)
        browser.close()
    demo.close()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "artifacts", "screenshots",
        "progress"))
