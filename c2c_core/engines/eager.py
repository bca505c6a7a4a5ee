"""The eager engine: one generation of one prompt in one mode, every stage timed.

Modes (every record says which):
- c2c: sectioned prefill of receiver and sharer, projection into the receiver cache, receiver
  decode;
- receiver: the receiver alone, one plain prefill (what a user runs without C2C; C2C's second
  forward for the last token is part of C2C's cost, so it is not in this baseline);
- sharer: the sharer alone, one plain prefill (its decode goes into the decode fields);
- t2t: the sharer writes a short note (plain prefill), then the receiver answers with it in its
  prompt (plain prefill of note + question).

The faithful baseline: plain transformers forwards with dynamic caches. The fast engine
(engines/fast.py) runs the same workload with static caches and compiled steps; neither engine
imports the other (tests/test_layers.py).
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch

from ..io.prompts import PromptItem as Item
from ..measure import cancel
from ..measure.memory import DeviceMemory
from ..measure.timing import Timer, now_ns
from ..models.fusion import decode_step, fused_prefill, plain_prefill, sample
from ..models.loading import Pipeline
from ..spec.config import MODES, RunConfig
from ..spec.errors import UserError
from .generation import (T2T_ANSWER_TEMPLATE, T2T_NOTE_INSTRUCTION, Generation, chat_ids,
                         prompt_format, start_generation)
from .limits import check_context

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
    mem = DeviceMemory(pipe.device, enabled=timer.method != "off").__enter__()
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
    return gen


def _no_ignore_eos(cfg: RunConfig) -> RunConfig:
    """The T2T note always stops at EOS (it is capped by t2t_note_tokens)."""
    if not cfg.gen.ignore_eos:
        return cfg
    return replace(cfg, gen=replace(cfg.gen, ignore_eos=False))
