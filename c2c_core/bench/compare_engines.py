"""`python -m c2c_core engines`: the eager and the fast engine side by side, interleaved in one
process on one machine (a benchmark that prints numbers, never a timed test).

Per repeat, in alternating order: one C2C generation on each engine (TTFT, projection, decode
ms/token), then the fast engine at batch 1 and at batch B (decode tokens/s of the whole batch).
Prints a table, then one JSON line of fast/eager ratios and batch-B/batch-1 tokens/s.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import replace

from ..report.analysis import column
from ..spec.errors import UserError
from ..io.prompts import BUILTIN_PROMPTS
from ..io.records import percentile
from ..report.summary import contention_note
from .runner import Item, generate, timing_fields
from ..measure import cancel
from ..measure.timing import Timer


def _med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _spread(xs: list[float]) -> str:
    return (f"{_med(xs):9.2f}  (p25 {percentile(xs, 25):.2f}, p75 {percentile(xs, 75):.2f},"
            f" n={len(xs)})")


def section_cost(pipe, cfg, item, repeats: int) -> dict | None:
    """What the reference's order costs the receiver's prefill on this prompt: the eager c2c
    prefill's base_prefill with the receiver filling section by section (what runs) against
    one fill of every position before the projection (the order used before, another
    computation on a sectioned plan), interleaved, medians. None for a one-section plan."""
    import torch
    from ..engines.eager import sharer_inputs
    from ..models.fusion import fused_prefill
    from ..plan.item import build_plan
    plan = build_plan(pipe, cfg, item, "c2c")
    segs = plan.segments()
    if len(segs) < 2:
        return None
    n = len(plan.ids) - 1
    ids = torch.tensor([plan.ids], device=pipe.device)
    keep = None if not plan.padded else torch.tensor([[0 if p else 1 for p in plan.pad]],
                                                     device=pipe.device)
    s_in = sharer_inputs(pipe, plan, pipe.device)
    got = {"sections": [], "one_fill": []}
    for r in range(repeats + 1):  # the first pair warms up
        order = (("sections", segs), ("one_fill", [(0, n, True)]))
        for name, sg in (order if r % 2 == 0 else order[::-1]):
            t = Timer(pipe.device, cfg.timing)
            with torch.inference_mode():
                fused_prefill(pipe.receiver, s_in, pipe.fuser, ids, t, pipe.fusion, keep, sg)
            if r:
                got[name].append(sum(t.finish().get("base_prefill", [])))
    a, b = _med(got["sections"]), _med(got["one_fill"])
    return {"segments": len(segs), "sections_ms": round(a, 3), "one_fill_ms": round(b, 3),
            "ratio": round(a / b, 4) if b else None}


#: The memory fields compare_engines sets side by side: on the fast engine the allocated peak
#: misses the CUDA-graph pools, which only the reserved peak counts (docs/numbers.md).
MEMORY_FIELDS = ("peak_memory_mb", "peak_memory_reserved_mb")


def memory_line(mem: dict) -> str:
    """The engines' peak memory, medians: mem[engine][field] is a list of the records' values
    (None left out). Reserved is null on a CPU."""
    def one(e):
        a, r = (mem[e][k] for k in MEMORY_FIELDS)
        return (f"{e} {_med(a):,.1f} MB allocated" if a else f"{e} allocated null") + (
            f", {_med(r):,.1f} MB reserved" if r else ", reserved null")
    note = ("; compare reserved across engines (the fast engine's CUDA-graph pools are not in"
            " allocated)" if mem["fast"][MEMORY_FIELDS[1]] else "")
    return f"peak memory (medians): {one('eager')}; {one('fast')}{note}"


def engines_bench(pipe, cfg, repeats: int = 5, batch: int = 8, prompt: str | None = None,
                  out=print, reference: str | None = None) -> dict:
    from ..engines import fast
    if cfg.gen.max_new_tokens < 2:
        raise UserError("engines needs --max_new_tokens >= 2 to have decode steps to compare.")
    if batch < 2:
        raise UserError(f"--bench_batch {batch} must be >= 2 to compare with batch 1.")
    repeats = max(repeats, 3)
    gen = replace(cfg.gen, ignore_eos=True)
    eager = replace(cfg, engine="eager", batch_size=1, gen=gen)
    fastc = replace(cfg, engine="fast", batch_size=1, gen=gen)
    item = Item(1, prompt or BUILTIN_PROMPTS[0])
    items = [Item(i + 1, BUILTIN_PROMPTS[i % len(BUILTIN_PROMPTS)]) for i in range(batch)]
    eng = fast.engine_for(pipe)
    compile_s = fast.prepare_plan(pipe, fastc, [[item], items[:1], items], ["c2c"])
    cancel.say("warming up both engines (not recorded)")
    for c in (eager, fastc):  # warm-up, unrecorded
        for _ in range(max(cfg.warmup, 1)):
            generate(pipe, c, item, "c2c", Timer(pipe.device, cfg.timing))
    for b in (items[:1], items):
        fast.generate_batch(pipe, fastc, b, "c2c", Timer(pipe.device, cfg.timing))
    m = {e: {"ttft_ms": [], "projector_total_ms": [], "decode_avg_ms": [], "e2e_ms": []}
         for e in ("eager", "fast")}
    from ..engines.floor import floor_for
    limits = {e: {"decode_floor_ms": [], "decode_floor_ratio": [], "joules_per_token": []}
              for e in ("eager", "fast")}
    mem = {e: {k: [] for k in MEMORY_FIELDS} for e in ("eager", "fast")}
    tps = {1: [], batch: []}
    same_tokens = True
    prompt_tokens = None
    shares: list[float] = []  # timing.cpu_share of every timed generation (CPU)
    for r in range(repeats):
        cancel.say(f"timed repeat {r + 1} of {repeats} (eager and fast interleaved, batch 1 and"
                   f" {batch})")
        order = (("eager", eager), ("fast", fastc)) if r % 2 == 0 else (("fast", fastc), ("eager", eager))
        toks = {}
        for name, c in order:
            g = generate(pipe, c, item, "c2c", Timer(pipe.device, cfg.timing))
            if g.decode_floor_ms is None:
                g.decode_floor_ms = floor_for(pipe, g)
            t, _ = timing_fields(g)
            for k in m[name]:
                m[name][k].append(t[k])
            for k in limits[name]:
                if t[k] is not None:
                    limits[name][k].append(t[k])
            for k in MEMORY_FIELDS:
                if t.get(k) is not None:
                    mem[name][k].append(t[k])
            toks[name] = g.tokens
            prompt_tokens = t.get("prompt_tokens")
            if t.get("cpu_share") is not None:
                shares.append(t["cpu_share"])
        same_tokens &= toks["eager"] == toks["fast"]
        for b in ((1, batch) if r % 2 == 0 else (batch, 1)):
            gs = fast.generate_batch(pipe, fastc, items[:b], "c2c", Timer(pipe.device, cfg.timing))
            tps[b].append(gs[0].batch_tokens_per_second)
    ratio = {k: _med(m["fast"][k]) / _med(m["eager"][k]) for k in m["fast"]}
    bratio = _med(tps[batch]) / _med(tps[1])
    dev = pipe.device.type
    out(f"device: {pipe.device} ({pipe.describe()}), threads {__import__('torch').get_num_threads()}")
    out(f"c2c, {gen.max_new_tokens} new tokens (ignore_eos), prompt {item.prompt!r};"
        f" fast engine {eng.name} (decode step: {eng.step_mode}; prefills and projection"
        f" {'prepared per prompt bucket' if eng.graphs else 'op by op'}),"
        f" compile+capture {compile_s:.1f} s in warm-up;"
        f" interleaved repeats: {repeats}")
    out(f"{'metric':24s} {'eager (median)':>14s} {'fast (median)':>40s}  fast/eager")
    for k in m["fast"]:  # headings from the one table of field names (analysis.column)
        out(f"{column(k, ''):24s} {_med(m['eager'][k]):14.2f} {_spread(m['fast'][k]):>40s}  {ratio[k]:.3f}")
    out(f"{'fast batch 1 tok/s':24s} {_spread(tps[1])}")
    out(f"{f'fast batch {batch} tok/s':24s} {_spread(tps[batch])}  x{bratio:.2f}")
    fp32 = pipe.dtype == __import__("torch").float32
    busy = contention_note(shares)
    if busy:  # the ratios are side by side, but a contended run's times are still inflated
        out(busy)
    out(f"greedy tokens identical (eager vs fast, batch 1): {same_tokens}"
        + ("" if fp32 else " (exact agreement is expected in fp32 only: the engines round"
                           " differently in half precision)"))
    from ..engines.compile_cache import describe, state
    from ..measure.hardware import BANDWIDTH_ENV, bandwidth_gbs, device_name
    med_or_none = lambda xs: round(_med(xs), 4) if xs else None  # noqa: E731
    floor = med_or_none(limits["fast"]["decode_floor_ms"])
    fr, er = (med_or_none(limits[e]["decode_floor_ratio"]) for e in ("fast", "eager"))
    if floor is None:
        out(f"decode floor: null ({device_name(pipe.device)}: memory bandwidth unknown; set"
            f" {BANDWIDTH_ENV}); decode/floor ratio: null")
    else:
        out(f"decode floor: {floor:.4f} ms/token (receiver weights + KV at"
            f" {bandwidth_gbs(device_name(pipe.device)):,.0f} GB/s); decode/floor ratio: fast"
            f" {fr:.2f}x, eager {er:.2f}x")
    jpt = {e: med_or_none(limits[e]["joules_per_token"]) for e in ("fast", "eager")}
    out("energy: " + (f"fast {jpt['fast']} J/token, eager {jpt['eager']} J/token (NVML)"
                      if jpt["fast"] is not None else "null (no NVML energy counter here)"))
    out(describe(compile_s, eng.compile_cache) + (" (the fast engine runs uncompiled)"
                                                  if not eng.compile else ""))
    cs = eng.cache_stats()
    out(f"static caches: {cs['held_mb']:,.1f} MB held (+ {cs['graph_mb']:,.1f} MB of graph"
        f" memory) of a {cs['cap_mb']:,.0f} MB cap ({cs['caches']} caches); cache reuse ratio"
        f" {cs['reuse_ratio']} ({cs['reuses']} of {cs['requests']} requests reused,"
        f" {cs['evictions']} evictions)")
    out(memory_line(mem))
    saved_ms = _med(m["eager"]["e2e_ms"]) - _med(m["fast"]["e2e_ms"])
    payback = compile_s * 1000.0 / saved_ms if saved_ms > 0 else None
    if payback is None:
        out("fast never pays back its warm-up here: it is not faster end to end")
    else:
        out(f"fast pays back its {compile_s:.1f} s warm-up after {payback:.0f} generations of this"
            f" size (~{payback * gen.max_new_tokens:,.0f} tokens) in one process")
    result = {"device": dev, "dtype": str(pipe.dtype).removeprefix("torch."),
              "engine_fast": eng.name, "fast_prefill_graphs": eng.graphs,
              "fast_step": eng.step_mode, "repeats": repeats, "max_new_tokens": gen.max_new_tokens,
              "compile_s": round(compile_s, 2),
              "ttft_ratio": round(ratio["ttft_ms"], 4),
              "projection_ratio": round(ratio["projector_total_ms"], 4),
              "decode_ratio": round(ratio["decode_avg_ms"], 4),
              "e2e_ratio": round(ratio["e2e_ms"], 4),
              "batch": batch, f"batch{batch}_over_batch1_tokens_per_second": round(bratio, 3),
              "eager_decode_ms": round(_med(m["eager"]["decode_avg_ms"]), 3),
              "fast_decode_ms": round(_med(m["fast"]["decode_avg_ms"]), 3),
              # the medians behind the ratios (scripts/gpu_table.py compares them with goals)
              "eager_ttft_ms": round(_med(m["eager"]["ttft_ms"]), 3),
              "fast_ttft_ms": round(_med(m["fast"]["ttft_ms"]), 3),
              "eager_projection_ms": round(_med(m["eager"]["projector_total_ms"]), 3),
              "fast_projection_ms": round(_med(m["fast"]["projector_total_ms"]), 3),
              "prompt_tokens": prompt_tokens,
              "same_tokens": same_tokens,
              "decode_floor_ms": floor, "fast_decode_floor_ratio": fr,
              "eager_decode_floor_ratio": er, "fast_joules_per_token": jpt["fast"],
              "compile_cache": state(eng.compile_cache),
              "compile_cache_dir": (eng.compile_cache or {}).get("dir"),
              "cache_reuse_ratio": cs["reuse_ratio"], "cache_held_mb": cs["held_mb"],
              "cache_evictions": cs["evictions"], "cache_graph_mb": cs["graph_mb"],
              **{f"{e}_{k}": (round(_med(mem[e][k]), 1) if mem[e][k] else None)
                 for e in ("eager", "fast") for k in MEMORY_FIELDS},
              "payback_generations": round(payback, 1) if payback is not None else None,
              "cpu_share": round(_med(shares), 3) if shares else None}
    if pipe.fuser is not None:
        cancel.say("timing the receiver prefill in segments against one fill")
    cost = section_cost(pipe, eager, item, repeats) if pipe.fuser is not None else None
    if cost:
        out(f"receiver prefill in {cost['segments']} segments (the reference's order):"
            f" {cost['sections_ms']:.2f} ms vs {cost['one_fill_ms']:.2f} ms in one fill before"
            f" the projection (eager, interleaved medians): x{cost['ratio']}")
    result["section_cost"] = cost
    result["reference_same_tokens"] = None
    if reference:
        from .reference import reference_tokens
        try:
            _, ref = reference_tokens(pipe, eager, item, reference, gen.max_new_tokens)
        except UserError as e:
            out(f"reference tokens: not compared ({e})")
        else:
            same = ref == toks["eager"]
            result["reference_same_tokens"] = same
            out(f"greedy tokens identical to the reference's (thu-nics/C2C RosettaModel on this"
                f" pipeline and plan, eager): {same}")
    out(json.dumps(result))
    return result
