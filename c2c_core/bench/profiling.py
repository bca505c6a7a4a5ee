"""The profile command's extra outputs: TSV stage table, Chrome trace, op statistics.

The trace comes from a separate, warm run under torch.profiler (the profiler slows what it
watches), never from the run whose numbers go into the JSONL.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
from dataclasses import dataclass

import torch

from ..io.records import STAGE_FIELDS, STAGES, TIMING

SEED_NAMES = {
    "jsonl": "demo_timing_data.jsonl",
    "tsv": "demo_timing_data.tsv",
    "trace": "demo_profiler_trace.json",
    "stats": "demo_profiler_stats.json",
}


@dataclass
class ProfilePaths:
    jsonl: str
    tsv: str
    trace: str
    stats: str


def profile_paths(output: str | None, gz: bool = False) -> ProfilePaths:
    """Seed names without --output; with X.jsonl: X.tsv, X_trace.json[.gz], X_stats.json."""
    if not output:
        p = ProfilePaths(**SEED_NAMES)
    else:
        stem = output[:-6] if output.endswith(".jsonl") else os.path.splitext(output)[0]
        p = ProfilePaths(output, f"{stem}.tsv", f"{stem}_trace.json", f"{stem}_stats.json")
    if gz:
        p.trace += ".gz"
    return p


def stage_rows(record: dict) -> list[dict]:
    """One row per stage: field, ms, share of e2e, count (projector calls / decode steps)."""
    t = record["timing"]
    e2e = t.get("e2e_ms") or 0.0
    counts = {"projector_total_ms": t.get("projector_calls", 0),
              "decode_total_ms": len(record.get("decode_step_times_ms", [])),
              "sharer_decode_ms": max(t.get("sharer_generated_tokens", 0) - 1, 0)}
    rows = []
    for f in STAGE_FIELDS + ["batch_wait_ms", "other_ms"]:  # run order; other = e2e minus the rest
        ms = t.get(f, 0.0) or 0.0
        if f == "batch_wait_ms" and not ms:
            continue  # a row of a batch only
        rows.append({"stage": TIMING[f].label, "field": f, "ms": round(ms, 3),
                     "pct_of_e2e": round(100.0 * ms / e2e, 2) if e2e else 0.0,
                     "count": counts.get(f, 1 if ms else 0)})
    rows.append({"stage": TIMING["e2e_ms"].label, "field": "e2e_ms", "ms": round(e2e, 3),
                 "pct_of_e2e": 100.0 if e2e else 0.0, "count": t.get("num_generated_tokens", 0)})
    return rows


def write_tsv(records: list[dict], path: str) -> None:
    """A stage table per record (id, mode, repeat columns), tab-separated."""
    cols = ["id", "mode", "repeat", "stage", "field", "ms", "pct_of_e2e", "count"]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\t".join(cols) + "\n")
        for r in records:
            for row in stage_rows(r):
                vals = [r.get("id"), r.get("mode", "c2c"), r.get("repeat", 0)] + [row[c] for c in cols[3:]]
                f.write("\t".join(str(v) for v in vals) + "\n")


def profiled_run(run, device: torch.device, trace_path: str):
    """Run `run()` (a warm generation with annotated spans) under torch.profiler and export a
    Chrome trace (gzipped when the path ends in .gz). Returns what `run()` returned."""
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts, record_shapes=False) as prof:
        result = run()
    os.makedirs(os.path.dirname(os.path.abspath(trace_path)), exist_ok=True)
    if trace_path.endswith(".gz"):
        raw = trace_path[:-3]
        prof.export_chrome_trace(raw)
        with open(raw, "rb") as src, gzip.open(trace_path, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.remove(raw)
    else:
        prof.export_chrome_trace(trace_path)
    return result


def load_trace(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return json.load(f).get("traceEvents", [])


_DEVICE_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}


def op_stats(events: list[dict], top: int = 30) -> dict:
    """Top ops by self CPU time and by device time (kernels attributed to the op that launched
    them), with counts, plus per-stage totals of the c2c/<stage> ranges.

    Computed from the exported Chrome trace: profiler.key_averages() took ~30 s for a 64-token
    generation on a CPU, this takes about a second."""
    ops: dict[str, dict] = {}
    by_ext: dict = {}
    threads: dict[tuple, list[dict]] = {}
    stages: dict[str, dict] = {}
    kernels: dict[str, dict] = {}
    for e in events:
        if e.get("ph") != "X":
            continue
        cat, name = e.get("cat"), e.get("name", "")
        if cat in ("cpu_op", "user_annotation"):
            threads.setdefault((e.get("pid"), e.get("tid")), []).append(e)
        if cat in ("user_annotation", "gpu_user_annotation") and name.startswith("c2c/") \
                and name[4:] in STAGES:
            st = stages.setdefault(name[4:], {"count": 0, "cpu_total_ms": 0.0, "device_total_ms": 0.0})
            if cat == "user_annotation":
                st["count"] += 1
                st["cpu_total_ms"] += e.get("dur", 0) / 1000
            else:
                st["device_total_ms"] += e.get("dur", 0) / 1000
        elif cat == "cpu_op":
            o = ops.setdefault(name, {"name": name, "count": 0, "self_cpu_ms": 0.0,
                                      "cpu_total_ms": 0.0, "self_device_ms": 0.0})
            o["count"] += 1
            o["cpu_total_ms"] += e.get("dur", 0) / 1000
            ext = (e.get("args") or {}).get("External id")
            if ext is not None:
                by_ext[ext] = o
        elif cat in _DEVICE_CATS:
            k = kernels.setdefault(name, {"name": name[:120], "count": 0, "device_ms": 0.0})
            k["count"] += 1
            k["device_ms"] += e.get("dur", 0) / 1000
            o = by_ext.get((e.get("args") or {}).get("External id"))
            if o is not None:
                o["self_device_ms"] += e.get("dur", 0) / 1000
    # self CPU time: an op's duration minus that of its direct children on the same thread
    for evs in threads.values():
        evs.sort(key=lambda e: (e["ts"], -e.get("dur", 0)))
        stack: list[tuple[float, dict]] = []  # (end, op stats or None)
        for e in evs:
            ts, dur = e["ts"], e.get("dur", 0)
            while stack and stack[-1][0] <= ts:
                stack.pop()
            if stack and stack[-1][1] is not None:
                stack[-1][1]["self_cpu_ms"] -= dur / 1000
            o = ops.get(e["name"]) if e.get("cat") == "cpu_op" else None
            if o is not None:
                o["self_cpu_ms"] += dur / 1000
            stack.append((ts + dur, o))

    def rounded(d):
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in d.items()}

    all_ops = list(ops.values())
    return {
        "top_ops_by_self_cpu": [rounded(o) for o in sorted(
            all_ops, key=lambda o: o["self_cpu_ms"], reverse=True)[:top]],
        "top_ops_by_device": [rounded(o) for o in sorted(
            (o for o in all_ops if o["self_device_ms"] > 0), key=lambda o: o["self_device_ms"],
            reverse=True)[:top]],
        "top_kernels": [rounded(k) for k in sorted(
            kernels.values(), key=lambda k: k["device_ms"], reverse=True)[:top]],
        "stages": {k: rounded(v) for k, v in stages.items()},
    }


def write_json(obj, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)


def profile_item(pipe, cfg, item, paths: ProfilePaths, append: bool = False) -> tuple[dict, dict]:
    """The profile job: clean timed run(s) -> JSONL + TSV; then one warm, annotated run under
    the profiler -> Chrome trace + op stats. Returns (first record, stats)."""
    from ..io.records import JsonlWriter
    from .runner import generate, modes_of, run_many, to_item
    from ..measure.timing import Timer
    item = to_item(item)
    if item.id is None:
        item.id = 1
    with JsonlWriter(paths.jsonl, append=append) as w:
        recs = run_many(pipe, cfg, [item], writer=w)
    write_tsv(recs, paths.tsv)
    mode = modes_of(cfg)[0]
    from ..measure import cancel
    cancel.check()
    cancel.say("profiled run for the trace")
    profiled_run(lambda: generate(pipe, cfg, item, mode, Timer(pipe.device, cfg.timing, annotate=True)),
                 pipe.device, paths.trace)
    cancel.say("writing the trace and op statistics")
    stats = op_stats(load_trace(paths.trace))
    stats["profiled"] = {"id": item.id, "mode": mode, "note": "separate warm run; its times are"
                         " inflated by the profiler and are not the JSONL's numbers"}
    write_json(stats, paths.stats)
    return recs[0], stats
