"""Screenshots of the Results tab (1, 5 and 200 samples; two mixed files) in Debian chromium.

Writes synthetic but complete records (runner.make_record on made-up generations: prompt
lengths 20-400 tokens, decode steps with noise) to OUT, serves the app on a free port (no
model is loaded: the Results tab reads files), uploads each set, presses Analyze and saves the
first screen (1400x900) and the whole page. Usage: python scripts/results_shots.py [OUT]
"""

from __future__ import annotations

import os
import random
import socket
import sys
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from c2c_core.bench import runner  # noqa: E402
from c2c_core.io.prompts import PromptItem  # noqa: E402
from c2c_core.io.records import write_all  # noqa: E402

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


class _Tok:
    def decode(self, ids, skip_special_tokens=True):
        return "An answer of a few words."


def records(n: int, device: str = "cpu", speed: float = 1.0, modes=("c2c",), seed: int = 0,
            id_offset: int = 0) -> list[dict]:
    rng = random.Random(seed)
    pipe = SimpleNamespace(tokenizer=_Tok(), device=torch.device("cpu"), eos_ids=set(),
                           sharers=[SimpleNamespace(name="SmolLM2-135M-Instruct", tokenizer=_Tok())],
                           info={"receiver": "SmolLM2-135M-Instruct", "sharer": "SmolLM2-135M-Instruct"})
    from c2c_core.io.records import RUN_FIELDS
    meta = {k: None for k in RUN_FIELDS} | {"frontend": "cli"}  # every key a record carries (values made up here)
    meta.update({"run_id": f"synthetic{seed}", "device": device,
                 "cpu": "Intel Xeon" if device == "cpu" else "AMD EPYC", "threads": 2,
                 "dtype": "float32" if device == "cpu" else "bfloat16", "torch": "2.9.1",
                 "receiver": pipe.info["receiver"], "sharer": pipe.info["sharer"],
                 "max_new_tokens": 32, "ignore_eos": True})
    out = []
    for i in range(n):
        length = rng.randint(20, 400)
        item = PromptItem(id=i + 1 + id_offset, prompt=f"Question {i + 1 + id_offset} of the set?",
                          answer="A", answer_kind="choice")
        for mode in modes:
            base = speed * (1.0 if mode != "sharer" else 1.3)
            steps = [base * (11.0 + rng.gauss(0, 0.6)) for _ in range(31)]
            stages = {k: [] for k in runner.STAGES}
            stages["base_embedding"] = [0.05]
            stages["base_prefill"] = [base * 0.08 * length]
            if mode == "c2c":
                stages["teacher_embedding"] = [0.05]
                stages["teacher_prefill"] = [base * 0.08 * length]
                stages["projection"] = [base * 0.2] * 30
            stages["decode"] = steps
            pre = sum(sum(v) for v in stages.values()) - sum(steps)
            ttft = pre + 1.5
            g = runner.Generation(tokens=list(range(32)), stages=stages, ttft_ns=int(ttft * 1e6),
                                  e2e_ns=int((ttft + sum(steps) + 0.5) * 1e6),
                                  prompt_tokens=length, projector_calls=30 if mode == "c2c" else 0,
                                  peak_memory_mb=2300.0 + rng.random() * 20)
            rec = runner.make_record(pipe, item, mode, 0, g, meta)
            rec["correct"] = rng.random() < (0.6 if mode == "c2c" else 0.5)
            out.append(rec)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_app(defaults: dict | None = None):
    """The app on a free local port: (demo, port)."""
    from c2c_core.frontends.ui import build_app, launch_kwargs
    demo = build_app(defaults)
    port = free_port()
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True,
                **launch_kwargs())
    return demo, port


def launch_chromium(p):
    """Debian's chromium under playwright (never `playwright install`)."""
    return p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)


def main(out: str) -> list[str]:
    from playwright.sync_api import sync_playwright

    os.makedirs(out, exist_ok=True)
    sets = {
        "1-sample": {"one.jsonl": records(1)},
        "5-samples": {"five.jsonl": records(5, seed=5)},
        "200-samples": {"two-hundred.jsonl": records(200, seed=200)},
        "two-mixed-files": {
            "cpu-run.jsonl": records(40, modes=("c2c", "receiver"), seed=1),
            "gpu-run.jsonl": records(12, device="NVIDIA H100 80GB HBM3", speed=0.25,
                                     modes=("c2c", "receiver"), seed=2, id_offset=30)},
    }
    bad = sets["two-mixed-files"]["gpu-run.jsonl"][3]
    bad["timing"]["decode_total_ms"] += 40.0  # one broken record: the check must say so
    demo, port = serve_app()
    shots = []
    try:
        with sync_playwright() as p:
            browser = launch_chromium(p)
            for name, files in sets.items():
                paths = []
                for fname, recs in files.items():
                    path = os.path.join(out, fname)
                    write_all(path, recs)
                    paths.append(path)
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                page.set_default_timeout(60_000)
                page.goto(f"http://127.0.0.1:{port}/")
                page.get_by_role("tab", name="Results").click()
                page.set_input_files("#results-files input[type=file]", paths)
                page.wait_for_timeout(1500)
                page.click("#results-analyze")
                page.wait_for_function("() => (document.querySelector('#results-status')"
                                       " || {}).innerText?.includes('record(s)')")
                page.wait_for_timeout(2500)
                page.locator("#results-files").scroll_into_view_if_needed()
                page.evaluate("window.scrollTo(0, document.querySelector('#results-files')"
                              ".getBoundingClientRect().top + window.scrollY - 10)")
                page.wait_for_timeout(500)
                first = os.path.join(out, f"results-{name}-first-screen.png")
                page.screenshot(path=first)
                if len(files) > 1:  # open "Two files side by side"
                    page.locator("#results-pair").get_by_text("Two files side by side").click()
                    page.wait_for_timeout(1500)
                height = page.evaluate("document.documentElement.scrollHeight")
                page.set_viewport_size({"width": 1400, "height": height})
                page.wait_for_timeout(1200)
                full = os.path.join(out, f"results-{name}-full.png")
                page.screenshot(path=full)
                shots += [first, full]
                page.close()
            browser.close()
    finally:
        demo.close()
    return shots


if __name__ == "__main__":
    for s in main(sys.argv[1] if len(sys.argv) > 1 else "/work/shots/compare"):
        print(s)
