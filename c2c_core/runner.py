"""Timed generation: run_one / run_many(pipeline, config, items) -> records.

Modes (every record says which):
- c2c: sectioned prefill of receiver and sharer, projection into the receiver cache, receiver
  decode;
- receiver: the receiver alone, one plain prefill (what a user runs without C2C; C2C's second
  forward for the last token is part of C2C's cost, so it is not in this baseline);
- sharer: the sharer alone, one plain prefill (its decode goes into the decode fields);
- t2t: the sharer writes a short note (plain prefill), then the receiver answers with it in its
  prompt (plain prefill of note + question).
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Callable, Iterable

import torch

from . import cancel
from .config import RunConfig
from .errors import OutOfMemory, UserError
from .fusion import c2c_prefill, decode_step, fused_prefill, plain_prefill, sample  # noqa: F401
from .limits import check_context, check_items
from .loading import Pipeline
from .memory import DeviceMemory
from .prompts import PromptItem as Item
from .records import MODES, JsonlWriter, is_done
from .timing import STAGES, Timer, now_ns  # noqa: F401  (STAGES: runner.STAGES for scripts)
# the engine base (generation.py), re-exported: runner.<name> stays valid for every caller
from .generation import (FRONTEND, RESUME_FIX, T2T_ANSWER_TEMPLATE,  # noqa: F401
                         T2T_NOTE_INSTRUCTION, Generation, chat_ids, check_resume_settings,
                         engine_of, make_record, modes_of, planned_settings, prompt_format,
                         run_metadata, run_settings, sharer_entries, start_generation,
                         sweep_settings, sync_safe, timing_fields, to_item, with_settings)


# --- encoding ------------------------------------------------------------------------------


def _ids_tensor(ids: list[int], device) -> torch.Tensor:
    return torch.tensor([ids], dtype=torch.long, device=device)  # [1, T]


# --- generation ----------------------------------------------------------------------------

def _decode_loop(model, cache, logits, n_max: int, eos: set[int], cfg: RunConfig,
                 generator, timer: Timer, stage: str, on_first=None) -> list[int]:
    """Sample the first token from prefill logits, then one decode step per further token.

    Decode steps = tokens - 1: no forward whose logits would be thrown away."""
    g = cfg.gen
    tok = sample(logits, g.do_sample, g.temperature, g.top_p, g.top_k, generator)  # [1, 1]
    tid = int(tok.item())
    if on_first is not None:
        on_first()
    tokens = [tid]
    while len(tokens) < n_max and (g.ignore_eos or tid not in eos):
        cancel.check()  # Stop / a client gone: end within one decode step
        with timer.span(stage):
            logits = decode_step(model, tok, cache)
            tok = sample(logits, g.do_sample, g.temperature, g.top_p, g.top_k, generator)
        tid = int(tok.item())
        tokens.append(tid)
    return tokens


def generate(pipe: Pipeline, cfg: RunConfig, item: Item, mode: str, timer: Timer) -> Generation:
    """One timed generation of `item` in `mode`. The clock starts before tokenization."""
    if engine_of(pipe, cfg) == "fast":
        from .fast import generate_batch
        return generate_batch(pipe, cfg, [item], mode, timer)[0]
    dev = pipe.device
    mem = DeviceMemory(dev, enabled=timer.method != "off").__enter__()
    try:
        return _generate(pipe, cfg, item, mode, timer, mem)
    finally:
        mem.__exit__(None, None, None)


def _generate(pipe: Pipeline, cfg: RunConfig, item: Item, mode: str, timer: Timer,
              mem: DeviceMemory) -> Generation:
    dev = pipe.device
    generator, eos, ttft, mark_first, wall0, t0 = start_generation(pipe, cfg)
    sh1 = pipe.sharers[0]
    speaks = mode in ("sharer", "t2t")     # sharer 1 reads its own tokens and writes text
    enc = sh1.tokenizer if speaks else pipe.tokenizer
    fmt = prompt_format(sh1.tokenizer, cfg.chat_template) if speaks and item.input_ids is None else None
    if item.input_ids is not None:
        ids = list(item.input_ids)  # receiver ids: aligned below for a sharer that speaks
    elif mode == "t2t":
        ids = chat_ids(enc, T2T_NOTE_INSTRUCTION.format(question=item.prompt), cfg.chat_template)
    else:
        ids = chat_ids(enc, item.prompt, cfg.chat_template)
    if not ids:
        raise UserError(f"Prompt {item.id} encodes to no tokens; give it some text.")
    check_context(pipe, cfg, len(ids), mode, f"Prompt {item.id}")  # before any forward
    n_instr = len(ids) - 1
    active = list(enumerate(pipe.sharers, start=1)) if mode == "c2c" else \
        [(1, sh1)] if speaks else []
    feeds, aligned = {}, set()
    for k, sl in active:  # each sharer's ids: the receiver's, or aligned (host time, timed)
        if sl.aligner is None or (speaks and item.input_ids is None):
            feeds[k] = ids
        else:
            with timer.span("alignment", who=k):
                feeds[k] = sl.aligner.align(ids if speaks else ids[:n_instr])
            aligned.add(k)
    x = _ids_tensor(ids, dev)
    calls, sharer_tokens, by_calls = 0, [], {}
    with torch.inference_mode():
        if mode == "c2c":
            s_in = [(sl.model, _ids_tensor(feeds[k], dev)) for k, sl in active]
            cache, logits, by_calls = fused_prefill(pipe.receiver, s_in, pipe.fuser, x, timer,
                                                    pipe.fusion)
            calls = sum(by_calls.values())
            tokens = _decode_loop(pipe.receiver, cache, logits, cfg.gen.max_new_tokens, eos, cfg,
                                  generator, timer, "decode", mark_first)
        elif mode == "receiver":  # what a user runs without C2C: one plain prefill
            cache, logits = plain_prefill(pipe.receiver, x, timer, "base_embedding", "base_prefill")
            tokens = _decode_loop(pipe.receiver, cache, logits, cfg.gen.max_new_tokens, eos, cfg,
                                  generator, timer, "decode", mark_first)
        elif mode == "sharer":
            cache, logits = plain_prefill(sh1.model, _ids_tensor(feeds[1], dev), timer,
                                          "teacher_embedding", "teacher_prefill", who=1)
            tokens = _decode_loop(sh1.model, cache, logits, cfg.gen.max_new_tokens, sh1.eos_ids,
                                  cfg, generator, timer, "decode", mark_first)
        elif mode == "t2t":
            cache, logits = plain_prefill(sh1.model, _ids_tensor(feeds[1], dev), timer,
                                          "teacher_embedding", "teacher_prefill", who=1)
            sharer_tokens = _decode_loop(sh1.model, cache, logits, cfg.gen.t2t_note_tokens,
                                         sh1.eos_ids, _no_ignore_eos(cfg), generator, timer,
                                         "sharer_decode")
            del cache
            if item.input_ids is not None and sh1.aligner is None:
                # exact-length prompt: the note's ids, then the prompt's
                ids2 = [t for t in sharer_tokens if t not in sh1.eos_ids] + list(item.input_ids)
            elif item.input_ids is not None:  # the note re-encoded in the receiver's tokens
                note = sh1.tokenizer.decode(sharer_tokens, skip_special_tokens=True)
                ids2 = pipe.tokenizer(note, add_special_tokens=False)["input_ids"] + list(item.input_ids)
            else:
                note = sh1.tokenizer.decode(sharer_tokens, skip_special_tokens=True).strip()
                ids2 = chat_ids(pipe.tokenizer, T2T_ANSWER_TEMPLATE.format(
                    note=note, question=item.prompt), cfg.chat_template)
            check_context(pipe, cfg, len(ids), mode, f"Prompt {item.id}", len(ids2))
            x2 = _ids_tensor(ids2, dev)
            # the receiver reads note + question in one plain prefill, as a T2T user would run it
            cache, logits = plain_prefill(pipe.receiver, x2, timer, "base_embedding", "base_prefill")
            tokens = _decode_loop(pipe.receiver, cache, logits, cfg.gen.max_new_tokens, eos, cfg,
                                  generator, timer, "decode", mark_first)
            ids = ids2  # prompt_tokens = what the receiver read
        else:
            raise UserError(f"Unknown mode {mode}; use one of {', '.join(MODES)}.")
    t_end = now_ns()
    wall1 = time.time()
    stages = timer.finish()
    mem.__exit__(None, None, None)  # the peaks of this generation (stops the RSS poller)
    who = [{"model": sl.name, "alignment": sl.alignment if k in aligned else "none"}
           for k, sl in active]
    gen = Generation(tokens, stages, ttft[0] - t0, t_end - t0, len(ids), calls, sharer_tokens,
                      mem.allocated_mb, mem.reserved_mb, wall0, wall1, sharers=who,
                      by_sharer=timer.by_who, sharer_calls=by_calls,
                      speaker=1 if mode == "sharer" else 0, sharer_prompt_format=fmt)
    gen.cpu_share = mem.cpu_share
    gen.energy_j = mem.energy_j
    return gen


def _no_ignore_eos(cfg: RunConfig) -> RunConfig:
    """The T2T note always stops at EOS (it is capped by t2t_note_tokens)."""
    if not cfg.gen.ignore_eos:
        return cfg
    return replace(cfg, gen=replace(cfg.gen, ignore_eos=False))


# --- records -------------------------------------------------------------------------------


# --- driving -------------------------------------------------------------------------------


def run_one(pipe: Pipeline, cfg: RunConfig, item: Item, mode: str = "c2c", repeat: int = 0,
            meta: dict | None = None, annotate: bool = False) -> dict:
    timer = Timer(pipe.device, cfg.timing, annotate=annotate)
    g = generate(pipe, cfg, item, mode, timer)
    return make_record(pipe, item, mode, repeat, g,
                       meta if meta is not None else run_metadata(pipe, cfg, timer.method_name))


def warm_up(pipe: Pipeline, cfg: RunConfig, item: Item, modes: Iterable[str]) -> None:
    """`cfg.warmup` full generations per mode with the same shapes; never recorded. The fast
    engine compiles its steps for these shapes first."""
    if engine_of(pipe, cfg) == "fast":
        from .fast import prepare_plan
        prepare_plan(pipe, cfg, [[item]], list(modes))
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
        from .fast import run_many_fast
        check_items(pipe, cfg, items, modes)  # untimed, before any run
        out = run_many_fast(pipe, cfg, items, writer, on_progress, should_stop, skip, meta)
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
        sync_safe(pipe)
        raise OutOfMemory(
            f"CUDA out of memory after {done} record(s); reduce --max_new_tokens or use"
            " shorter prompts (records already written are kept).") from None
    return out


