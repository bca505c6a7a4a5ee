"""The driver: run_one / run_many(pipeline, config, items) -> records, whichever engine runs.

Items x repeats x modes are interleaved per prompt so drift hits every mode equally; each record
is written and flushed as soon as it exists. One job loop for both engines (run_many): the eager
engine (engines/eager.py) generates one prompt at a time, the fast engine (engines/fast/) a batch
(fast.generate_batch) per job.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from ..engines import eager, fast
from ..engines.generation import (FRONTEND, RESUME_FIX, T2T_ANSWER_TEMPLATE,  # noqa: F401
                                  T2T_NOTE_INSTRUCTION, Generation, chat_ids,
                                  check_resume_settings, engine_of, make_record, modes_of,
                                  out_of_memory, planned_settings, prompt_format, run_metadata,
                                  run_settings,
                                  sharer_entries, start_generation, sweep_settings, sync_safe,
                                  timing_fields, to_item, with_settings)
from ..engines.limits import check_items
from ..io.prompts import PromptItem as Item
from ..io.records import MODES, JsonlWriter, is_done  # noqa: F401
from ..measure import cancel
from ..measure.timing import STAGES, Timer  # noqa: F401  (STAGES: runner.STAGES for scripts)
from ..models.loading import Pipeline
from ..spec.config import RunConfig


def generate(pipe: Pipeline, cfg: RunConfig, item: Item, mode: str, timer: Timer,
             repeat: int = 0) -> Generation:
    """One timed generation of `item` in `mode` by the engine the config resolves to (the fast
    engine runs it as a batch of one). The clock starts before tokenization."""
    if engine_of(pipe, cfg) == "fast":
        return fast.generate_batch(pipe, cfg, [item], mode, timer, [repeat])[0]
    return eager.generate(pipe, cfg, item, mode, timer, repeat)

# --- driving -------------------------------------------------------------------------------


def run_one(pipe: Pipeline, cfg: RunConfig, item: Item, mode: str = "c2c", repeat: int = 0,
            meta: dict | None = None, annotate: bool = False) -> dict:
    timer = Timer(pipe.device, cfg.timing, annotate=annotate)
    g = generate(pipe, cfg, item, mode, timer, repeat)
    return make_record(pipe, item, mode, repeat, g,
                       meta if meta is not None else run_metadata(pipe, cfg, timer.method_name))


def warm_up(pipe: Pipeline, cfg: RunConfig, item: Item, modes: Iterable[str]) -> None:
    """`cfg.warmup` full generations per mode with the same shapes; never recorded. The fast
    engine compiles its steps for these shapes first."""
    if engine_of(pipe, cfg) == "fast":
        fast.prepare_plan(pipe, cfg, [[item]], list(modes))
    for mode in modes:
        for _ in range(cfg.warmup):
            generate(pipe, cfg, item, mode, Timer(pipe.device, cfg.timing))


def generate_many(pipe: Pipeline, cfg: RunConfig, items: list, mode: str, timer: Timer,
                  repeats: list[int]) -> list[Generation]:
    """One timed generation of a batch of items in `mode`, one Generation per item: the fast
    engine's batch (fast.generate_batch), or the eager engine's single item (its batches are
    always of one)."""
    if engine_of(pipe, cfg) == "fast":
        return fast.generate_batch(pipe, cfg, items, mode, timer, repeats)
    assert len(items) == 1, "the eager engine generates one item at a time"
    return [eager.generate(pipe, cfg, items[0], mode, timer, repeats[0])]


def plan_jobs(cfg: RunConfig, items: list, modes: list[str], skip: set[tuple] | None,
              batch: int) -> list[tuple[list, int, str]]:
    """The job list of a run: (items of one batch, repeat, mode), in batches of `batch` items,
    per batch each repeat, modes interleaved (at batch 1: item, repeat, mode, so drift hits
    every mode equally); the items of a batch already done (`skip`) left out."""
    jobs = []
    for k in range(0, len(items), batch):
        chunk = items[k:k + batch]
        for r in range(cfg.repeats):
            for m in modes:
                todo = [it for it in chunk if not is_done(skip, it, m, r)]
                if todo:
                    jobs.append((todo, r, m))
    return jobs


def run_many(pipe: Pipeline, cfg: RunConfig, items: Iterable, writer: JsonlWriter | None = None,
             on_progress: Callable[[int, int, dict | None], None] | None = None,
             should_stop: Callable[[], bool] | None = None,
             skip: set[tuple] | None = None, meta: dict | None = None,
             keep: bool = True) -> list[dict]:
    """Every item x repeat x mode (modes interleaved per prompt so drift hits them equally), on
    either engine: the one job loop. The eager engine takes one item per generation; the fast
    engine batches of cfg.batch_size, every shape the run needs prepared (untimed; the seconds
    in run.compile_s) before anything is timed. Then `cfg.warmup` unrecorded generations of the
    first batch per mode, then the timed jobs.

    Each record is written (and flushed) as soon as it exists. `skip` holds (id, mode, repeat)
    keys already done (--resume). `meta` is the `run` object (default: a new one). A CUDA OOM
    ends the run with the engine's advice; what was written stays. `keep=False` streams: no
    record is held after `writer` and `on_progress` have seen it, and the list returned is
    empty (long runs keep flat memory; the file holds the records)."""
    items = [to_item(x) for x in items]
    for i, it in enumerate(items):
        if it.id is None:
            it.id = i + 1
    modes = modes_of(cfg)
    is_fast = engine_of(pipe, cfg) == "fast"
    jobs = plan_jobs(cfg, items, modes, skip, max(int(cfg.batch_size), 1) if is_fast else 1)
    if meta is None:
        meta = run_metadata(pipe, cfg, Timer(pipe.device, cfg.timing).method_name)
    out: list[dict] = []
    done = 0
    total = sum(len(j[0]) for j in jobs)
    # untimed, before any run: every item a job reads
    check_items(pipe, cfg, {id(it): it for j in jobs for it in j[0]}.values(), modes)
    if on_progress:
        on_progress(0, total, None)
    try:
        with cancel.scope(should_stop):  # a stop also ends the running generation
            if jobs and is_fast:
                eng = fast.engine_for(pipe)
                n0 = eng.prepared
                spent = fast.prepare_plan(pipe, cfg, [j[0] for j in jobs], modes)
                meta["compile_s"] = round(float(meta.get("compile_s") or 0.0) + spent, 3)
                meta["prepared_shapes"] = int(meta.get("prepared_shapes") or 0) + (
                    eng.prepared - n0)  # 0: every shape was ready (an earlier run prepared it)
                cancel.check()
            if jobs and cfg.warmup:
                cancel.say("warming up")
                for m in modes:
                    for _ in range(cfg.warmup):
                        generate_many(pipe, cfg, jobs[0][0], m, Timer(pipe.device, cfg.timing),
                                      [0] * len(jobs[0][0]))
            cancel.say("timed run")
            for todo, r, m in jobs:
                if should_stop and should_stop():
                    break
                gens = generate_many(pipe, cfg, todo, m, Timer(pipe.device, cfg.timing),
                                     [r] * len(todo))
                for it, g in zip(todo, gens, strict=True):
                    rec = make_record(pipe, it, m, r, g, meta)
                    if writer:
                        writer.write(rec)
                    done += 1
                    if keep:
                        out.append(rec)
                    if on_progress:
                        on_progress(done, total, rec)
                    del rec
                del gens
    except cancel.Cancelled:
        pass  # stopped mid-generation: that generation (batch) has no record; the others are kept
    except torch.OutOfMemoryError:
        fix = ("reduce --batch_size or --max_new_tokens, or use shorter prompts" if is_fast
               else "reduce --max_new_tokens or use shorter prompts")
        raise out_of_memory(pipe, done, fix) from None
    return out
