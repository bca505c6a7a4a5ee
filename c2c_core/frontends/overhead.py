"""Benchmarks that print numbers (never timed tests): ratios measured side by side, interleaved,
in one process on one machine."""

from __future__ import annotations

import json
import statistics
from dataclasses import replace

from ..spec.errors import UserError
from ..io.records import percentile
from ..bench.runner import Item, generate, warm_up
from ..measure.timing import Timer, now_ns, sync


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


def app_vs_cli(pipe, cfg, prompts: list[str], repeats: int = 5, out=print) -> dict:
    """(c) The same prompts through the web app's path (its worker process, fed and read by
    `stream_records` with the Batch tab's table and chart redrawn as records arrive, as in the
    page) and through the CLI's path (run_many in this process), interleaved `repeats` times
    (>= 5, neither path always first). Prints decode ms/token per path and the ratio app/CLI
    with its spread over the rounds; the last line is JSON. Fixed length (ignore EOS); each
    path warms up per round (cfg.warmup >= 1) the same way."""
    import os
    import tempfile

    from . import worker
    from ..io.prompts import resolve_prompts
    from ..io.records import JsonlWriter, read_records
    from ..bench.runner import run_many
    from .ui import batch_tab, jobs, runcfg
    repeats = max(repeats, 5)
    if cfg.gen.max_new_tokens < 2:
        raise UserError("overhead needs --max_new_tokens >= 2 to have decode steps to compare.")
    cfg = replace(cfg, warmup=max(cfg.warmup, 1), repeats=1,
                  gen=replace(cfg.gen, ignore_eos=True))
    items = resolve_prompts(prompts=prompts)
    saved = os.environ.get("C2C_APP_WORKER")
    os.environ["C2C_APP_WORKER"] = "1"  # the app's default path, whatever this shell says
    dec: dict[str, list[float]] = {"app": [], "cli": []}
    rounds: dict[str, list[float]] = {"app": [], "cli": []}
    share: dict[str, list[float]] = {"app": [], "cli": []}
    try:
        with tempfile.TemporaryDirectory() as d:
            runcfg.load_models(cfg)  # start the worker and load its models (not timed)
            for r in range(repeats):
                for front in (("cli", "app") if r % 2 == 0 else ("app", "cli")):
                    path = os.path.join(d, f"{front}-{r}.jsonl")
                    if front == "cli":
                        with JsonlWriter(path) as w:
                            run_many(pipe, cfg, items, writer=w)
                    else:
                        for _ in jobs.stream_records(cfg, items, path,
                                                       lambda *a, **k: None, batch_tab.render):
                            pass
                    recs = read_records(path)
                    if len(recs) != len(items) or {x["run"]["frontend"] for x in recs} != {front}:
                        raise RuntimeError(f"the {front} path wrote {len(recs)} record(s) of"
                                           f" {len(items)}, or the wrong run.frontend")
                    ms = [x["timing"]["decode_avg_ms"] for x in recs]
                    share[front] += [x["timing"]["cpu_share"] for x in recs
                                     if x["timing"].get("cpu_share") is not None]
                    dec[front] += ms
                    rounds[front].append(statistics.median(ms))
            pid = worker.worker_for(cfg).pid
    finally:
        worker.shutdown()
        if saved is None:
            os.environ.pop("C2C_APP_WORKER", None)
        else:
            os.environ["C2C_APP_WORKER"] = saved
    ratio = statistics.median(dec["app"]) / statistics.median(dec["cli"])
    per_round = [a / c for a, c in zip(rounds["app"], rounds["cli"])]
    dev = "cuda" if pipe.device.type == "cuda" else "cpu"
    out(f"device: {pipe.device} ({pipe.describe()}); worker process pid {pid}, this process"
        f" pid {os.getpid()}")
    out(f"{len(items)} prompts x {repeats} rounds per path, {cfg.gen.max_new_tokens} tokens"
        " (ignore_eos), paths interleaved")
    out(f"(c) app (worker process) decode ms/token: {_spread(dec['app'])}")
    out(f"    CLI (this process)    decode ms/token: {_spread(dec['cli'])}")
    out(f"    ratio app/CLI = {ratio:.4f} (goal <= 1.03); per round: {_spread(per_round)},"
        f" min {min(per_round):.4f}, max {max(per_round):.4f}")
    if share["app"] and share["cli"]:
        out(f"    timing.cpu_share app {statistics.median(share['app']):.3f}, CLI"
            f" {statistics.median(share['cli']):.3f} (medians; below 0.85 = cores taken by"
            " another program)")
    result = {"device": dev, "repeats": repeats, "prompts": len(items),
              "max_new_tokens": cfg.gen.max_new_tokens,
              "app_decode_ms_per_token": round(statistics.median(dec["app"]), 4),
              "cli_decode_ms_per_token": round(statistics.median(dec["cli"]), 4),
              "app_over_cli_decode_ratio": round(ratio, 4),
              "per_round_ratio_p25": round(percentile(per_round, 25), 4),
              "per_round_ratio_p75": round(percentile(per_round, 75), 4),
              "goal_app_over_cli": 1.03,
              "cpu_share_app": round(statistics.median(share["app"]), 3) if share["app"] else None,
              "cpu_share_cli": round(statistics.median(share["cli"]), 3) if share["cli"] else None}
    out(json.dumps(result))
    return result
