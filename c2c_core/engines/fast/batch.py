"""The fast engine over a batch of items: every shape a run needs prepared before anything is
timed (prepare_plan), and one timed generation of a batch in one mode (generate_batch, one
Generation per item), which the one job loop (bench/runner.run_many) calls per job."""

from __future__ import annotations

import time
import warnings

import torch

from ...measure import cancel
from ...measure.timing import Timer, on_device
from ...models.stacked import stacked_for
from ...plan.item import build_plan, t2t_answer_bound, t2t_answer_ids
from ...spec.errors import UserError
from ..generation import Generation, sharers_of, start_generation
from .engine import (CACHE_CAP_ENV, bucket, engine_for, layout, prompt_bucket, sharer_len,
                     sharer_role)


# --- generation of a batch of items (the runner's `generate`, B >= 1) -----------------------

def shapes_of(pipe, cfg, batches: list[list], modes: list[str]) -> set[tuple]:
    """Every shape a run over `batches` x `modes` will use: ("step", role, B, L, greedy) decode
    steps, ("cache", role, B, L) c2c sharer caches, and under graphs ("fill", role, B, L, q, s)
    prefills of q positions from position s and ("proj", "receiver", B, L, n, ns) projections.
    The first three fields after the kind are always the cache it uses."""
    eng = engine_for(pipe)
    g = cfg.gen
    greedy = not g.do_sample
    keys = set()

    def fill(role, B, L, q, s=0):
        if eng.graphs and q > 0:
            keys.add(("fill", role, B, L, q, s))

    for items in batches:
        B = len(items)
        for mode in modes:
            plans = [build_plan(pipe, cfg, it, mode) for it in items]
            T = eng.prompt_len(max(len(p.ids) for p in plans))
            if mode in ("c2c", "receiver"):
                L = bucket(T + g.max_new_tokens)
                keys.add(("step", "receiver", B, L, greedy))
                cuts = cut_columns(plans, T)[0] if mode == "c2c" and T > 1 else []
                a = 0
                for c in cuts + [T - 1]:  # the receiver's sections, in order
                    fill("receiver", B, L, c - a, a)
                    a = c
                if cuts:  # each sharer reads the positions before the last cut
                    ns = cuts[-1]
                    for k in range(1, len(pipe.sharers) + 1):
                        keys.add(("cache", sharer_role(k), B, sharer_len(ns)))
                        fill(sharer_role(k), B, sharer_len(ns), ns)
                    if eng.graphs and eng._stacked_one():
                        keys.update(("proj", "receiver", B, L, c, ns) for c in cuts)
            elif mode == "sharer":
                L = bucket(T + g.max_new_tokens)
                keys.add(("step", "sharer", B, L, greedy))
                fill("sharer", B, L, T - 1)
            elif mode == "t2t":
                L = bucket(T + g.t2t_note_tokens)
                keys.add(("step", "sharer", B, L, greedy))
                fill("sharer", B, L, T - 1)
                T2 = answer_len(eng, pipe, cfg, items)
                L2 = bucket(T2 + g.max_new_tokens)
                keys.add(("step", "receiver", B, L2, greedy))
                fill("receiver", B, L2, T2 - 1)
    return keys


def answer_len(eng, pipe, cfg, items) -> int:
    """The t2t answer's padded length: under graphs the bucket of its bound (the note's length is
    only known after it is written), so the answer's prefill shape is prepared in warm-up."""
    bound = max(t2t_answer_bound(pipe, cfg, it) for it in items)
    return prompt_bucket(bound) if eng.graphs else bound


def _graphs_said(graphs: int) -> str:
    return (f" plus {graphs / 2**20:,.1f} MB of CUDA-graph memory held beside them"
            if graphs else "")


def check_one_generation_fits(pipe, cfg, batches: list[list], modes: list[str]) -> None:
    """Every cache one generation uses is held at once (it is never evicted under it), beside
    the graph memory the engine holds for its life (engine.graph_need: measured so far, or
    estimated for the run's captures still to make; 0 on a CPU): refuse, before anything runs,
    a run whose largest generation needs more than the cache cap with it."""
    eng = engine_for(pipe)
    worst, where, keys = 0, None, set()
    for items in batches:
        for mode in modes:
            ks = shapes_of(pipe, cfg, [items], [mode])
            keys |= ks
            need = sum(eng.cache_nbytes(*c) for c in {tuple(k[1:4]) for k in ks})
            if need > worst:
                worst, where = need, (len(items), mode)
    graphs = eng.graph_need(keys, cfg.gen.do_sample)
    if worst + graphs > eng.cache_cap:
        raise UserError(f"One generation of this run (batch {where[0]}, {where[1]} mode) needs"
                        f" {worst / 2**20:,.1f} MB of static caches{_graphs_said(graphs)}, more"
                        f" than the fast engine's cache cap ({eng.cache_cap / 2**20:,.1f} MB);"
                        f" raise {CACHE_CAP_ENV}, or use a smaller --batch_size or shorter"
                        " prompts or outputs.")


def prepare_plan(pipe, cfg, batches: list[list], modes: list[str]) -> float:
    """Compile/capture/allocate everything the run needs, on the models' device; returns the
    seconds it took now."""
    with on_device(pipe.device):
        return _prepare_plan(pipe, cfg, batches, modes)


def _prepare_plan(pipe, cfg, batches: list[list], modes: list[str]) -> float:
    eng = engine_for(pipe)
    before = eng.compile_s
    if pipe.fuser is not None and "c2c" in modes:
        # the stacked projector weights (a one-off copy of every projector, ~1 GB for the
        # published fusers) are built here, untimed, never inside a recorded projection span
        t0 = time.perf_counter()
        stacked_for(pipe.fuser)
        eng.compile_s += time.perf_counter() - t0
    keys = list(shapes_of(pipe, cfg, batches, modes))
    check_one_generation_fits(pipe, cfg, batches, modes)
    planned = sum(eng.cache_nbytes(*c) for c in {tuple(k[1:4]) for k in keys})
    graphs = eng.graph_need(keys, cfg.gen.do_sample)
    if planned + graphs > eng.cache_cap:
        warnings.warn(f"fast engine: this run's static caches ({planned / 2**20:,.0f} MB)"
                      f"{_graphs_said(graphs)}"
                      f" exceed the cache cap ({eng.cache_cap / 2**20:,.0f} MB, {CACHE_CAP_ENV}):"
                      " the"
                      " least recently used are freed as shapes change, and a shape needed again"
                      " is prepared again inside the generation that needs it (its records'"
                      " timing.late_prepare_ms).")
    # steps first (a fill's and a projection's warm-up writes into caches a step shares)
    keys.sort(key=lambda k: ({"step": 0, "cache": 1, "fill": 2, "proj": 3}[k[0]], str(k)))
    ready = {"step": lambda k: tuple(k[1:]), "fill": lambda k: eng.fill_key(*k[1:]),
             "proj": lambda k: eng.proj_key(*k[2:])}
    what = {"step": "step", "fill": "prefill", "proj": "projection"}
    todo = [k for k in keys if k[0] in ready and ready[k[0]](k) not in eng._ready]
    done = 0
    for k in keys:
        # a Stop or a client gone ends the run between two shapes: one shape's compile at most
        cancel.check()
        eng.begin()  # each shape on its own: the cap may free an earlier one for it
        if k[0] in ready:
            if ready[k[0]](k) not in eng._ready:
                done += 1
                cancel.say(f"{eng.verb('step' if k[0] == 'step' else 'graph')} the {k[1]}"
                           f" {what[k[0]]} for shape {done} of {len(todo)} (batch {k[2]},"
                           f" {k[3]} tokens)")
            if k[0] == "step":
                eng.prepare(*k[1:])
            elif k[0] == "fill":
                eng.prepare_fill(*k[1:])
            else:
                eng.prepare_proj(*k[2:])
        else:
            t0 = time.perf_counter()
            with torch.inference_mode():
                eng.cache(*k[1:], use=False)
            eng.compile_s += time.perf_counter() - t0
    return eng.compile_s - before


def generate_batch(pipe, cfg, items: list, mode: str, timer: Timer,
                   repeats: list[int] | None = None) -> list:
    """One timed generation of a batch of items in `mode`: one Generation per item, each with
    the batch's stage times (its own decode steps: those it took part in). The clock starts
    before tokenization."""
    from ...measure.memory import DeviceMemory
    from ...io.records import MODES
    if mode not in MODES:
        raise UserError(f"Unknown mode {mode}; use one of {', '.join(MODES)}.")
    with on_device(pipe.device):  # the models' device, not the thread's current one
        mem = DeviceMemory(pipe.device, enabled=timer.method != "off").__enter__()
        try:
            return _generate_batch(pipe, cfg, items, mode, timer, mem,
                                   repeats or [0] * len(items))
        finally:
            mem.__exit__(None, None, None)  # stops the RSS sampler on any exit


def cut_columns(plans, T: int) -> tuple[list[int], list[list[int | None]]]:
    """Where a batch left-padded to T projects: the columns where any row's projected section
    ends (plan.Plan.cut_at), in order, and per such column each row's section start there
    (None: no section of that row ends at that column). The batch's receiver fills stop at
    every one of these columns; a row's projection is written at its own columns only, so
    each row sees the reference's order whatever its batch mates' sections are (a row whose
    fill is split at a mate's column computes the same keys and values: nothing is projected
    in between for it). Rows of one pair and template usually share every column."""
    per_row = []
    for p in plans:
        lp = T - len(p.ids)
        cols = [lp + c for c in p.cut_at]
        per_row.append(dict(zip(cols, [lp + x for x in [0] + list(p.cut_at[:-1])])))
    cuts = sorted(set().union(*per_row)) if per_row else []
    return cuts, [[r.get(c) for r in per_row] for c in cuts]


def _feeds(plans, pipe, eng, dev, T: int, cuts: list[int], starts: list) -> list:
    """Per sharer: (k, its Rows left-padded to T, per cut column c its projection mask
    [B, c] bool, True where a row projects in the section that ends at c, or None when that
    is every position of [0, c) in every row)."""
    out = []
    for j, f0 in enumerate(plans[0].feeds):
        k = f0.who
        fs = [p.feeds[j] for p in plans]
        srows = layout([f.ids for f in fs], [f.pad for f in fs], eng.pad_id(f"sharer{k}"), dev, T)
        full = []  # each row's projected columns, over [0, last cut)
        for p, f in zip(plans, fs):
            proj = f.project if f.project is not None else [True] * p.last_start
            full.append([False] * (T - len(p.ids)) + list(proj))
        masks = []
        for c, st in zip(cuts, starts):
            rows = [[False] * c if a is None else [False] * a + (r + [False] * c)[a:c]
                    for r, a in zip(full, st)]
            # all True is decided on the host: reading the device's mask back would sync
            masks.append(None if all(all(r) for r in rows)
                         else torch.tensor(rows, dtype=torch.bool, device=dev))
        out.append((k, srows, masks))
    return out


def c2c_rows(pipe, eng, plans, T: int, with_sharer: bool = True) -> tuple:
    """A batch of plans left-padded to T as c2c_prefill takes it: (rows, cuts, feeds); cuts
    None and no feeds without the sharer (receiver mode, t2t answers) or without a position
    before the last token. The one set-up of the batch path, its first-token check and the
    continuous-batching arrivals (slots.prefill_c2c)."""
    dev = pipe.device
    rows = layout([p.ids for p in plans], [p.pad for p in plans], eng.pad_id(), dev, T)
    if not (with_sharer and T > 1):
        return rows, None, []
    cuts, starts = cut_columns(plans, T)
    return rows, cuts, _feeds(plans, pipe, eng, dev, T, cuts, starts)


def first_logits(pipe, cfg, items: list) -> torch.Tensor:
    """The c2c prefill of a batch of items (as _generate_batch runs it) and its first-token
    logits [B, V], no decode: what tests compare with the reference's forward."""
    from ...measure.timing import Timer, on_device
    eng = engine_for(pipe)
    eng.begin()
    plans = [build_plan(pipe, cfg, it, "c2c") for it in items]
    B, dev = len(plans), pipe.device
    T = eng.prompt_len(max(len(p.ids) for p in plans))
    L = bucket(T + cfg.gen.max_new_tokens)
    with torch.inference_mode(), on_device(dev):
        eng.ensure("receiver", B, L, False)
        rows, cuts, feeds = c2c_rows(pipe, eng, plans, T)
        _, logits, _ = eng.c2c_prefill(rows, feeds, L, True, Timer(dev), False, cuts)
    return logits


def _sharer_alone(eng, rows_ids: list, n_max: int, eos, ignore_eos: bool, g, gens, timer: Timer,
                  stage: str, on_first=None):
    """Sharer 1 alone over its own prompt rows (sharer mode's answer, t2t's note): its prefill
    in the teacher spans, then up to n_max tokens decoded in `stage`."""
    B = len(rows_ids)
    greedy = not g.do_sample
    T = eng.prompt_len(max(len(r) for r in rows_ids))
    rows = layout(rows_ids, [None] * B, eng.pad_id("sharer"), eng.device, T)
    L = bucket(T + n_max)
    eng.ensure("sharer", B, L, greedy)
    cache, first = eng.plain_prefill("sharer", rows, L, timer, "teacher_embedding",
                                     "teacher_prefill", greedy, who=1)
    return eng.decode("sharer", cache, L, first, rows, T, n_max, g, eos, ignore_eos, gens, timer,
                      stage, on_first)


def _generate_batch(pipe, cfg, items: list, mode: str, timer: Timer, mem, repeats) -> list:
    from ...measure.timing import now_ns
    from ..floor import floor_for
    eng = engine_for(pipe)
    eng.begin()  # the caches this generation takes are not evicted under it
    late0 = eng.late_s  # what this generation pays below to prepare a shape not ready
    dev = pipe.device
    g = cfg.gen
    greedy = not g.do_sample
    gens, _, ttft, mark_first, wall0, t0 = start_generation(pipe, cfg, list(zip(items, repeats)))
    plans = [build_plan(pipe, cfg, it, mode, timer, r) for it, r in zip(items, repeats)]
    eos = plans[0].eos
    rows_ids = [p.ids for p in plans]
    B = len(plans)
    calls, notes = {}, [[] for _ in plans]
    with torch.inference_mode():
        if mode in ("c2c", "receiver"):
            T = eng.prompt_len(max(len(r) for r in rows_ids))
            L = bucket(T + g.max_new_tokens)
            eng.ensure("receiver", B, L, greedy)
            rows, cuts, feeds = c2c_rows(pipe, eng, plans, T, mode == "c2c")
            cache, first, calls = eng.c2c_prefill(rows, feeds, L, mode == "c2c", timer, greedy,
                                                  cuts)
            dec = eng.decode("receiver", cache, L, first, rows, T, g.max_new_tokens, g, eos,
                             g.ignore_eos, gens, timer, "decode", mark_first)
        elif mode == "sharer":
            dec = _sharer_alone(eng, rows_ids, g.max_new_tokens, eos, g.ignore_eos, g, gens,
                                timer, "decode", mark_first)
        else:  # t2t: the note stops at EOS (capped by t2t_note_tokens), then the answer
            notes = _sharer_alone(eng, rows_ids, g.t2t_note_tokens, pipe.sharers[0].eos_ids,
                                  False, g, gens, timer, "sharer_decode").tokens
            rows_ids = [t2t_answer_ids(pipe, cfg, it, nt) for it, nt in zip(items, notes)]
            T = max(len(r) for r in rows_ids)
            bound = answer_len(eng, pipe, cfg, items)  # the cache planned in warm-up
            rows = layout(rows_ids, [None] * B, eng.pad_id(), dev, max(T, bound) if eng.graphs else T)
            T = rows.ids.shape[1]
            L = bucket(max(T, bound) + g.max_new_tokens)
            eng.ensure("receiver", B, L, greedy)
            cache, first, _ = eng.c2c_prefill(rows, [], L, False, timer, greedy)
            dec = eng.decode("receiver", cache, L, first, rows, T, g.max_new_tokens, g, eos,
                             g.ignore_eos, gens, timer, "decode", mark_first)
    t_end = now_ns()
    wall1 = time.time()
    stages = timer.finish()
    mem.__exit__(None, None, None)  # the peaks of this generation
    longest = max(len(t) for t in dec.tokens)
    # the batch's steps that produced a token (not the late EOS check's step past the end)
    dec_ms = sum(stages["decode"][:longest - 1])
    dec_tokens = sum(len(t) - 1 for t in dec.tokens)
    batch_tps = dec_tokens / (dec_ms / 1000.0) if dec_ms > 0 else 0.0
    # a batch step reads every row's cache: mean positions per step over the batch (hardware.py)
    kv_ctx = float(sum(len(r) + len(t) / 2 for r, t in zip(rows_ids, dec.tokens)))
    all_tokens = sum(len(t) for t in dec.tokens)
    note_longest = max(len(t) for t in notes)
    out = []
    for i, toks in enumerate(dec.tokens):
        st = dict(stages)
        st["decode"] = stages["decode"][:len(toks) - 1]
        st["sharer_decode"] = stages["sharer_decode"][:max(len(notes[i]) - 1, 0)]
        # the steps the batch still ran for longer rows: this row's wait, not its "other"; a
        # step past the longest row (the EOS check's lag on CUDA, engine.eos_lag) is "other"
        wait = (stages["decode"][len(toks) - 1:longest - 1]
                + stages["sharer_decode"][max(len(notes[i]) - 1, 0):max(note_longest - 1, 0)])
        gen = Generation(toks, st, ttft[0] - t0, t_end - t0, len(rows_ids[i]),
                         sum(calls.values()), notes[i], mem.allocated_mb, mem.reserved_mb,
                         wall0, wall1, sharers=sharers_of(pipe, plans[i]),
                         by_sharer=timer.by_who, sharer_calls=dict(calls),
                         speaker=1 if mode == "sharer" else 0,
                         sharer_prompt_format=plans[i].prompt_format)
        gen.batch_size, gen.batch_index, gen.batch_tokens_per_second = B, i, batch_tps
        gen.cpu_share = mem.cpu_share
        gen.batch_wait = list(wait)
        gen.late_prepare_ms = (eng.late_s - late0) * 1000.0  # the batch's clock: every row's
        gen.kv_context_tokens, gen.energy_j, gen.energy_tokens = kv_ctx, mem.energy_j, all_tokens
        gen.decode_floor_ms = floor_for(pipe, gen, pipe.sharer if mode == "sharer" else None)
        if mode == "c2c":
            gen.sections = plans[i].sections_record()
        out.append(gen)
    return out

