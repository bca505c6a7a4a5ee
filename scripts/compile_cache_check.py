"""First process vs second process: the fast engine's compile time with the compile cache cold
and then warm (issue 19 part 2; goal: second <= 0.35 x first).

Runs two child processes one after the other on a fresh C2C_CACHE (a temporary folder unless
--cache is given), each loading the preset and preparing the fast engine's c2c shapes for one
prompt at batch 1 (`fast.prepare_plan`, the warm-up every fast run does), and prints each
compile time, the cache state inductor reported, and the ratio, then one JSON line.

    python scripts/compile_cache_check.py [--preset smollm2-demo] [--max_new_tokens 8]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child(preset: str, max_new_tokens: int, device: str, tokenizer: str | None) -> None:
    import torch  # noqa: F401
    from c2c_core.engines import compile_cache, fast
    from c2c_core.spec.config import build_run_config
    from c2c_core.models.loading import load_pipeline
    from c2c_core.io.prompts import BUILTIN_PROMPTS
    from c2c_core.bench.runner import Item
    cfg = build_run_config(preset, tokenizer=tokenizer, max_new_tokens=max_new_tokens,
                           engine="fast", device=device)
    pipe = load_pipeline(cfg)
    eng = fast.engine_for(pipe, compile=True)
    s = fast.prepare_plan(pipe, cfg, [[Item(1, BUILTIN_PROMPTS[0])]], ["c2c"])
    info = eng.compile_cache or {}
    print(json.dumps({"compile_s": round(s, 2), "state": compile_cache.state(info),
                      "dir": info.get("dir"), "hits": info.get("hits"),
                      "misses": info.get("misses"), "device": str(pipe.device)}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="smollm2-demo")
    ap.add_argument("--max_new_tokens", type=int, default=8)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--tokenizer", default=None, help="tokenizer for dummy weights (as the CLI's)")
    ap.add_argument("--cache", default=None, help="C2C_CACHE to use (default: a fresh temp folder)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.preset, a.max_new_tokens, a.device, a.tokenizer)
        return 0
    cache = a.cache or tempfile.mkdtemp(prefix="c2c-compile-check-")
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    env.update(C2C_CACHE=cache, PYTHONPATH=ROOT, C2C_FAST_COMPILE="1")
    runs = []
    for which in ("first", "second"):
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", "--preset",
                              a.preset, "--max_new_tokens", str(a.max_new_tokens),
                              "--device", a.device]
                             + (["--tokenizer", a.tokenizer] if a.tokenizer else []), env=env, capture_output=True, text=True)
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
        if out.returncode or not line:
            print(out.stdout[-2000:], out.stderr[-4000:], file=sys.stderr)
            return 1
        r = json.loads(line[-1])
        runs.append(r)
        print(f"{which} process: compile {r['compile_s']:.1f} s (cache {r['state']},"
              f" {r['hits']} FX graph hit(s), {r['misses']} miss(es), {r['dir']}) on {r['device']}")
    ratio = runs[1]["compile_s"] / runs[0]["compile_s"] if runs[0]["compile_s"] else None
    print(f"second / first: {ratio:.3f} (goal <= 0.35)" if ratio is not None else "no compile")
    print(json.dumps({"preset": a.preset, "first_s": runs[0]["compile_s"],
                      "second_s": runs[1]["compile_s"], "first_state": runs[0]["state"],
                      "second_state": runs[1]["state"],
                      "ratio": round(ratio, 3) if ratio is not None else None, "cache": cache}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
