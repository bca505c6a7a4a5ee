"""Screenshots of the app's engine setting and the Sweep tab's latency vs throughput plot, in
Debian chromium, on the default pair (real SmolLM2 weights, through the app's worker process).

Serves the app on a free port, picks the engine in the run settings (default fast), runs a
sweep with several batch sizes from the Sweep tab as a user would, waits for it to finish and
saves the sidebar (engine setting) and the whole page. The fast engine compiles each shape in
warm-up first (minutes on a small CPU; the inductor disk cache makes reruns quicker).

Usage: python scripts/sweep_shots.py [OUT] [--engine fast] [--batch_sizes 1,4,8]
       [--input_lens 16] [--output_lens 32] [--dtype auto]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # results_shots

def main(argv: list[str] | None = None) -> list[str]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", default="artifacts/screenshots")
    from c2c_core.spec.config import ENGINES
    ap.add_argument("--engine", default="fast", choices=ENGINES)
    ap.add_argument("--batch_sizes", default="1,4,8")
    ap.add_argument("--input_lens", default="16")
    ap.add_argument("--output_lens", default="32")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--timeout_s", type=float, default=900)
    a = ap.parse_args(argv)
    from playwright.sync_api import sync_playwright

    from c2c_core.frontends import worker
    from results_shots import launch_chromium, serve_app
    os.makedirs(a.out, exist_ok=True)
    demo, port = serve_app({"dtype": a.dtype})
    shots = []
    try:
        with sync_playwright() as p:
            browser = launch_chromium(p)
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.set_default_timeout(60_000)
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_selector("#profile-run")  # tabs render when first shown
            page.locator("#engine input").click()
            page.get_by_role("option", name=a.engine, exact=True).click()
            page.wait_for_timeout(300)
            side = os.path.join(a.out, f"sweep-engine-setting-{a.engine}.png")
            page.screenshot(path=side)
            shots.append(side)
            page.get_by_role("tab", name="Sweep").click()
            page.wait_for_selector("#sweep-run")
            page.fill("#sweep-in textarea, #sweep-in input", a.input_lens)
            page.fill("#sweep-out textarea, #sweep-out input", a.output_lens)
            page.fill("#sweep-batch textarea, #sweep-batch input", a.batch_sizes)
            t0 = time.time()
            page.click("#sweep-run")
            page.wait_for_function(
                "() => { const t = (document.querySelector('#sweep-status') || {}).innerText"
                " || ''; return t.includes('Done') || t.includes('Error') ||"
                " t.includes('Stopped'); }", timeout=int(a.timeout_s * 1000))
            status = page.inner_text("#sweep-status")
            print(f"sweep finished in {time.time() - t0:.0f} s: {status}")
            page.wait_for_timeout(2000)
            height = page.evaluate("document.documentElement.scrollHeight")
            page.set_viewport_size({"width": 1400, "height": height})
            page.wait_for_timeout(1200)
            full = os.path.join(a.out, f"sweep-batch-curve-{a.engine}.png")
            page.screenshot(path=full)
            shots.append(full)
            browser.close()
    finally:
        demo.close()
        worker.shutdown()
    for s in shots:
        print(s)
    return shots


if __name__ == "__main__":
    main()
