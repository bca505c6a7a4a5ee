"""The driver: run_one / run_many(pipeline, config, items) -> records, whichever engine runs.

Items x repeats x modes are interleaved per prompt so drift hits every mode equally; each record
is written and flushed as soon as it exists. The eager engine (engines/eager.py) generates one
prompt at a time here; the fast engine (engines/fast/) takes the whole item list in batches.
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


def run_many(pipe: Pipeline, cfg: RunConfig, items: Iterable, writer: JsonlWriter | None = None,
             on_progress: Callable[[int, int, dict | None], None] | None = None,
             should_stop: Callable[[], bool] | None = None,
             skip: set[tuple] | None = None, meta: dict | None = None,
             keep: bool = True) -> list[dict]:
    """Every item x repeat x mode (modes interleaved per prompt so drift hits them equally).

    Each record is written (and flushed) as soon as it exists. `skip` holds (id, mode, repeat)
    keys already done (--resume). `meta` is the `run` object (default: a new one). A CUDA OOM
    ends the run with the seed's advice; what was written stays. `keep=False` streams: no
    record is held after `writer` and `on_progress` have seen it, and the list returned is
    empty (long runs keep flat memory; the file holds the records)."""
    items = [to_item(x) for x in items]
    for i, it in enumerate(items):
        if it.id is None:
            it.id = i + 1
    modes = modes_of(cfg)
    if engine_of(pipe, cfg) == "fast":
        check_items(pipe, cfg, items, modes)  # untimed, before any run
        out = fast.run_many_fast(pipe, cfg, items, writer, on_progress, should_stop, skip, meta)
        return out if keep else []
    jobs = [(it, r, m) for it in items for r in range(cfg.repeats) for m in modes
            if not is_done(skip, it, m, r)]
    if meta is None:
        meta = run_metadata(pipe, cfg, Timer(pipe.device, cfg.timing).method_name)
    out: list[dict] = []
    done = 0
    total = len(jobs)
    if on_progress:
        on_progress(0, total, None)
    check_items(pipe, cfg, {id(it): it for it, _, _ in jobs}.values(), modes)  # untimed, before any run
    try:
        with cancel.scope(should_stop):  # a stop also ends the running generation
            if jobs and cfg.warmup:
                cancel.say("warming up")
                warm_up(pipe, cfg, jobs[0][0], modes)
            cancel.say("timed run")
            for k, (it, r, m) in enumerate(jobs):
                if should_stop and should_stop():
                    break
                rec = run_one(pipe, cfg, it, m, r, meta)
                if writer:
                    writer.write(rec)
                done += 1
                if keep:
                    out.append(rec)
                if on_progress:
                    on_progress(k + 1, total, rec)
                del rec
    except cancel.Cancelled:
        pass  # stopped mid-generation: that generation has no record; the others are kept
    except torch.OutOfMemoryError:
        raise out_of_memory(pipe, done, "reduce --max_new_tokens or use shorter prompts") from None
    return out


