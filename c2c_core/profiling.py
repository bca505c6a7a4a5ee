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

from .timing import STAGES

SEED_NAMES = {
    "jsonl": "demo_timing_data.jsonl",
    "tsv": "demo_timing_data.tsv",
    "trace": "demo_profiler_trace.json",
    "stats": "demo_profiler_stats.json",
}

STAGE_LABELS = {
    "base_embedding_ms": "receiver embedding",
    "base_prefill_ms": "receiver prefill",
    "teacher_embedding_ms": "sharer embedding",
    "teacher_prefill_ms": "sharer prefill",
    "projector_total_ms": "projection",
    "sharer_decode_ms": "sharer decode (t2t note)",
    "decode_total_ms": "decode",
    "other_ms": "other (sampling, bookkeeping)",
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
    for f, label in STAGE_LABELS.items():
        ms = t.get(f, 0.0) or 0.0
        rows.append({"stage": label, "field": f, "ms": round(ms, 3),
                     "pct_of_e2e": round(100.0 * ms / e2e, 2) if e2e else 0.0,
                     "count": counts.get(f, 1 if ms else 0)})
    rows.append({"stage": "end to end", "field": "e2e_ms", "ms": round(e2e, 3),
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
    Chrome trace (gzipped when the path ends in .gz). Returns the profiler."""
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
    return prof, result


def _device_us(evt) -> float:
    for name in ("self_device_time_total", "self_cuda_time_total"):
        v = getattr(evt, name, None)
        if v:
            return float(v)
    return 0.0


def op_stats(prof, top: int = 30) -> dict:
    """Top ops by self CPU time and by device time, with counts, plus per-stage totals."""
    avgs = prof.key_averages()
    ops = [e for e in avgs if not e.key.startswith("c2c/")]

    def row(e):
        return {"name": e.key, "count": e.count,
                "self_cpu_ms": round(e.self_cpu_time_total / 1000, 3),
                "cpu_total_ms": round(e.cpu_time_total / 1000, 3),
                "self_device_ms": round(_device_us(e) / 1000, 3)}

    by_cpu = sorted(ops, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    by_dev = sorted((e for e in ops if _device_us(e) > 0), key=_device_us, reverse=True)[:top]
    # Stage ranges: the host range (CPU event) and, on a GPU, its device-side mirror, summed
    # from the raw events so the result does not depend on how key_averages merges them.
    stages: dict[str, dict] = {}
    for e in prof.events():
        if not e.name.startswith("c2c/") or e.name[4:] not in STAGES:
            continue
        st = stages.setdefault(e.name[4:], {"count": 0, "cpu_total_ms": 0.0, "device_total_ms": 0.0})
        us = e.time_range.elapsed_us()
        if str(e.device_type).endswith("CPU"):
            st["count"] += 1
            st["cpu_total_ms"] += us / 1000
        else:
            st["device_total_ms"] += us / 1000
    for st in stages.values():
        st["cpu_total_ms"] = round(st["cpu_total_ms"], 3)
        st["device_total_ms"] = round(st["device_total_ms"], 3)
    return {"top_ops_by_self_cpu": [row(e) for e in by_cpu],
            "top_ops_by_device": [row(e) for e in by_dev],
            "stages": stages}


def write_json(obj, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)


def profile_item(pipe, cfg, item, paths: ProfilePaths, append: bool = False) -> tuple[dict, dict]:
    """The profile job: clean timed run(s) -> JSONL + TSV; then one warm, annotated run under
    the profiler -> Chrome trace + op stats. Returns (first record, stats)."""
    from .records import JsonlWriter
    from .runner import modes_of, run_many, run_one, to_item
    item = to_item(item)
    if item.id is None:
        item.id = 1
    with JsonlWriter(paths.jsonl, append=append) as w:
        recs = run_many(pipe, cfg, [item], writer=w)
    write_tsv(recs, paths.tsv)
    mode = modes_of(cfg)[0]
    prof, _ = profiled_run(lambda: run_one(pipe, cfg, item, mode, annotate=True),
                           pipe.device, paths.trace)
    stats = op_stats(prof)
    stats["profiled"] = {"id": item.id, "mode": mode, "note": "separate warm run; its times are"
                         " inflated by the profiler and are not the JSONL's numbers"}
    write_json(stats, paths.stats)
    return recs[0], stats
