"""Benchmarks that print numbers (never timed tests): ratios measured side by side, interleaved,
in one process on one machine."""

from __future__ import annotations

import json
import statistics
from dataclasses import replace

from .errors import UserError
from .records import percentile
from .runner import Item, generate, warm_up
from .timing import Timer, now_ns, sync


def _spread(xs: list[float]) -> str:
    return (f"median {statistics.median(xs):.2f} (p25 {percentile(xs, 25):.2f},"
            f" p75 {percentile(xs, 75):.2f}, n={len(xs)})")


def overhead(pipe, cfg, repeats: int = 5, prompt: str = "Say hello in one short sentence.",
             out=print) -> dict:
    """(a) e2e with timing on / timing off, same C2C generation; (b) C2C decode ms/token /
    receiver-alone decode ms/token. Variants interleaved `repeats` times (>= 5); fixed length
    (--ignore_eos) so every repeat does the same work."""
    repeats = max(repeats, 5)
    if cfg.gen.max_new_tokens < 2:
        raise UserError("overhead needs --max_new_tokens >= 2 to have decode steps to compare.")
    cfg = replace(cfg, warmup=max(cfg.warmup, 1), gen=replace(cfg.gen, ignore_eos=True))
    item = Item(1, prompt)
    warm_up(pipe, cfg, item, ["c2c", "receiver"])
    e2e = {"on": [], "off": []}
    dec = {"c2c": [], "receiver": []}
    for r in range(repeats):
        for method in (("on", "off") if r % 2 == 0 else ("off", "on")):  # neither always first
            timer = Timer(pipe.device, cfg.timing if method == "on" else "off")
            sync(pipe.device)
            t0 = now_ns()
            generate(pipe, cfg, item, "c2c", timer)
            sync(pipe.device)
            e2e[method].append((now_ns() - t0) / 1e6)
        for mode in ("c2c", "receiver"):
            g = generate(pipe, cfg, item, mode, Timer(pipe.device, cfg.timing))
            steps = g.stages["decode"]
            dec[mode].append(sum(steps) / len(steps))
    ra = statistics.median(e2e["on"]) / statistics.median(e2e["off"])
    rb = statistics.median(dec["c2c"]) / statistics.median(dec["receiver"])
    dev = "cuda" if pipe.device.type == "cuda" else "cpu"
    goal_a = 1.02 if dev == "cuda" else 1.05
    out(f"device: {pipe.device} ({pipe.describe()})")
    out(f"generation: {cfg.gen.max_new_tokens} tokens (ignore_eos), prompt {prompt!r}")
    out(f"(a) e2e timing on  ms: {_spread(e2e['on'])}")
    out(f"    e2e timing off ms: {_spread(e2e['off'])}")
    out(f"    ratio on/off = {ra:.4f} (goal <= {goal_a})")
    out(f"(b) c2c decode ms/token:      {_spread(dec['c2c'])}")
    out(f"    receiver decode ms/token: {_spread(dec['receiver'])}")
    out(f"    ratio c2c/receiver = {rb:.4f} (goal <= 1.05)")
    result = {"device": dev, "repeats": repeats, "max_new_tokens": cfg.gen.max_new_tokens,
              "timing_overhead_ratio": round(ra, 4), "c2c_over_receiver_decode_ratio": round(rb, 4),
              "goal_timing": goal_a, "goal_decode": 1.05}
    out(json.dumps(result))
    return result
