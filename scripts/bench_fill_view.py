#!/usr/bin/env python
"""A prefill over the prompt's positions (what the fast engine runs: engine.cache_view) beside
the same prefill over the whole static cache (what it ran before issue 25 item 7), timed
interleaved in one process, for caches that keep more and more room for new tokens. The fill
is the one TTFT pays for; its cache length is bucket(prompt + --max_new_tokens). Prints per
cache length the median ms of both and the ratio whole / view, and checks that both fills
write the same keys:

    python scripts/bench_fill_view.py                          # smollm2-demo, 120 tokens, CPU
    python scripts/bench_fill_view.py --tokens 1000 --lengths 1024,4096,16384 --device cuda
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="smollm2-demo")
    ap.add_argument("--tokens", type=int, default=120, help="prompt positions filled")
    ap.add_argument("--lengths", default="128,512,2048,8192",
                    help="static cache lengths (prompt + room for new tokens), comma-separated")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    a = ap.parse_args()
    from c2c_core.engines.fast.engine import FastEngine, layout
    from c2c_core.measure.timing import on_device
    from c2c_core.models.loading import load_pipeline
    from c2c_core.spec.config import build_run_config
    cfg = build_run_config(a.preset, device=a.device, dtype=a.dtype, warmup=0)
    pipe = load_pipeline(cfg)
    eng = FastEngine(pipe, compile=False, graphs=False)
    dev = pipe.device
    q = a.tokens
    ids = torch.randint(100, 1000, (1, q + 1), generator=torch.Generator().manual_seed(0))
    rows = layout([ids[0].tolist()], [None], eng.pad_id(), dev)
    m = pipe.receiver
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    lengths = [int(x) for x in a.lengths.split(",")]
    print(f"# {a.preset} receiver, one row, a prefill of {q} positions, {a.dtype} on {dev},"
          f" {a.rounds} rounds interleaved; median ms")
    print(f"{'cache L':>8} {'view ms':>9} {'whole ms':>9} {'whole/view':>10}")
    with torch.inference_mode(), on_device(dev):
        emb = m.get_input_embeddings()(rows.ids[:, :q])
        ok = rows.ok_to(max(lengths))
        for L in lengths:
            cache = eng.cache("receiver", 1, L, use=False)
            fns = {w: eng._make_fill("receiver", cache, q, L, 0, whole=w) for w in (False, True)}
            times = {False: [], True: []}
            keys = {}
            for r in range(a.rounds + 1):  # round 0 warms both up, untimed
                for w in ((False, True) if r % 2 else (True, False)):
                    eng.cache("receiver", 1, L, use=False)
                    sync()
                    t0 = time.perf_counter()
                    fns[w](emb, ok[:, :L], rows.lp)
                    sync()
                    if r:
                        times[w].append((time.perf_counter() - t0) * 1000)
                    keys[w] = cache.layers[-1].keys[:, :, :q].float().clone()
            err = (keys[False] - keys[True]).abs().max().item()
            v, wh = statistics.median(times[False]), statistics.median(times[True])
            print(f"{L:>8} {v:>9.2f} {wh:>9.2f} {wh / v:>10.2f}   (max key diff {err:.1e})")
            eng._caches.clear()
            eng.cache_bytes = 0


if __name__ == "__main__":
    main()
