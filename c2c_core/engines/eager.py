"""The eager engine: one generation of one prompt in one mode, every stage timed.

Modes (every record says which):
- c2c: sectioned prefill of receiver and sharer in the reference's order (each projected
  section written into the receiver cache before the next section runs), receiver decode;
- receiver: the receiver alone, one plain prefill (what a user runs without C2C; C2C's second
  forward for the last token is part of C2C's cost, so it is not in this baseline);
- sharer: the sharer alone, one plain prefill (its decode goes into the decode fields);
- t2t: the sharer writes a short note (plain prefill), then the receiver answers with it in its
  prompt (plain prefill of note + question).

The faithful baseline: plain transformers forwards with dynamic caches. The fast engine
(engines/fast/) runs the same workload with static caches and compiled steps; neither engine
imports the other (tests/test_layers.py).
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch

from ..io.prompts import PromptItem as Item
from ..measure import cancel
from ..measure.memory import DeviceMemory
from ..measure.timing import Timer, now_ns, on_device
from ..models.fusion import decode_step, fused_prefill, plain_prefill, sample
from ..models.loading import Pipeline
from ..spec.config import MODES, RunConfig
from ..spec.errors import UserError
from ..plan.item import build_plan, t2t_answer_ids
from .generation import Generation, sharers_of, start_generation
from .limits import check_context

# --- encoding ------------------------------------------------------------------------------


def _ids_tensor(ids: list[int], device) -> torch.Tensor:
    return torch.tensor([ids], dtype=torch.long, device=device)  # [1, T]


def _keep(pad: list[bool] | None, device) -> torch.Tensor | None:
    """A plan's padding as an attention mask [1, T] (1 real, 0 padding); None without padding."""
    if not pad or not any(pad):
        return None
    return torch.tensor([[0 if p else 1 for p in pad]], dtype=torch.long, device=device)


def sharer_inputs(pipe, plan, device) -> list[tuple]:
    """fused_prefill's sharers: (model, ids [1, T], keep mask or None, projection mask or None)."""
    return [(pipe.sharers[f.who - 1].model, _ids_tensor(f.ids, device), _keep(f.pad, device),
             None if f.project is None else torch.tensor(f.project, device=device))
            for f in plan.feeds]


# --- generation ----------------------------------------------------------------------------

def _decode_loop(model, cache, logits, n_max: int, eos: set[int], cfg: RunConfig,
                 gens, timer: Timer, stage: str, on_first=None,
                 keep: torch.Tensor | None = None) -> list[int]:
    """Sample the first token from prefill logits, then one decode step per further token.
    `keep`: the prompt's attention mask when it holds padding (it grows by one per token).

    Decode steps = tokens - 1: no forward whose logits would be thrown away."""
    g = cfg.gen
    tok = sample(logits, g, gens)  # [1, 1]
    tid = int(tok.item())
    if on_first is not None:
        on_first()
    tokens = [tid]
    while len(tokens) < n_max and (g.ignore_eos or tid not in eos):
        cancel.check()  # Stop / a client gone: end within one decode step
        with timer.span(stage):
            if keep is not None:
                keep = torch.cat([keep, keep.new_ones(1, 1)], 1)
            logits = decode_step(model, tok, cache, keep)
            tok = sample(logits, g, gens)
        tid = int(tok.item())
        tokens.append(tid)
    return tokens


def generate(pipe: Pipeline, cfg: RunConfig, item: Item, mode: str, timer: Timer,
             repeat: int = 0) -> Generation:
    """One timed generation of `item` in `mode`. The clock starts before tokenization."""
    with on_device(pipe.device):  # the models' device, not the thread's current one
        mem = DeviceMemory(pipe.device, enabled=timer.method != "off").__enter__()
        try:
            return _generate(pipe, cfg, item, mode, timer, mem, repeat)
        finally:
            mem.__exit__(None, None, None)


def _generate(pipe: Pipeline, cfg: RunConfig, item: Item, mode: str, timer: Timer,
              mem: DeviceMemory, repeat: int) -> Generation:
    if mode not in MODES:
        raise UserError(f"Unknown mode {mode}; use one of {', '.join(MODES)}.")
    dev = pipe.device
    gens, _, ttft, mark_first, wall0, t0 = start_generation(pipe, cfg, [(item, repeat)])
    plan = build_plan(pipe, cfg, item, mode, timer, repeat)  # host work, inside the clock
    ids, eos = plan.ids, plan.eos
    check_context(pipe, cfg, len(ids), mode, f"Prompt {item.id}")  # before any forward
    sh1 = pipe.sharers[0]
    x = _ids_tensor(ids, dev)
    calls, sharer_tokens, by_calls = 0, [], {}
    with torch.inference_mode():
        if mode == "c2c":
            keep = _keep(plan.pad, dev)
            s_in = sharer_inputs(pipe, plan, dev)
            cache, logits, by_calls = fused_prefill(pipe.receiver, s_in, pipe.fuser, x, timer,
                                                    pipe.fusion, keep, plan.segments())
            calls = sum(by_calls.values())
            tokens = _decode_loop(pipe.receiver, cache, logits, cfg.gen.max_new_tokens, eos, cfg,
                                  gens, timer, "decode", mark_first, keep)
        elif mode == "receiver":  # what a user runs without C2C: one plain prefill
            cache, logits = plain_prefill(pipe.receiver, x, timer, "base_embedding", "base_prefill")
            tokens = _decode_loop(pipe.receiver, cache, logits, cfg.gen.max_new_tokens, eos, cfg,
                                  gens, timer, "decode", mark_first)
        elif mode == "sharer":
            cache, logits = plain_prefill(sh1.model, x, timer, "teacher_embedding",
                                          "teacher_prefill", who=1)
            tokens = _decode_loop(sh1.model, cache, logits, cfg.gen.max_new_tokens, eos,
                                  cfg, gens, timer, "decode", mark_first)
        else:  # t2t
            cache, logits = plain_prefill(sh1.model, x, timer, "teacher_embedding",
                                          "teacher_prefill", who=1)
            sharer_tokens = _decode_loop(sh1.model, cache, logits, cfg.gen.t2t_note_tokens,
                                         sh1.eos_ids, _no_ignore_eos(cfg), gens, timer,
                                         "sharer_decode")
            del cache
            ids2 = t2t_answer_ids(pipe, cfg, item, sharer_tokens)
            check_context(pipe, cfg, len(ids), mode, f"Prompt {item.id}", len(ids2))
            x2 = _ids_tensor(ids2, dev)
            # the receiver reads note + question in one plain prefill, as a T2T user would run it
            cache, logits = plain_prefill(pipe.receiver, x2, timer, "base_embedding", "base_prefill")
            tokens = _decode_loop(pipe.receiver, cache, logits, cfg.gen.max_new_tokens, eos, cfg,
                                  gens, timer, "decode", mark_first)
            ids = ids2  # prompt_tokens = what the receiver read
    t_end = now_ns()
    wall1 = time.time()
    stages = timer.finish()
    mem.__exit__(None, None, None)  # the peaks of this generation (stops the RSS poller)
    gen = Generation(tokens, stages, ttft[0] - t0, t_end - t0, len(ids), calls, sharer_tokens,
                     mem.allocated_mb, mem.reserved_mb, wall0, wall1,
                     sharers=sharers_of(pipe, plan), by_sharer=timer.by_who,
                     sharer_calls=by_calls, speaker=1 if mode == "sharer" else 0,
                     sharer_prompt_format=plan.prompt_format)
    gen.cpu_share = mem.cpu_share
    gen.energy_j = mem.energy_j
    if mode == "c2c":
        gen.sections = plan.sections_record()
    return gen


def first_logits(pipe: Pipeline, cfg: RunConfig, item: Item) -> torch.Tensor:
    """The c2c prefill of one item (as _generate runs it) and its first-token logits [1, V], no
    decode: what tests compare with the reference's forward."""
    plan = build_plan(pipe, cfg, item, "c2c")
    dev = pipe.device
    with torch.inference_mode():
        _, logits, _ = fused_prefill(pipe.receiver, sharer_inputs(pipe, plan, dev), pipe.fuser, _ids_tensor(plan.ids, dev),
                                     Timer(dev), pipe.fusion, _keep(plan.pad, dev),
                                     plan.segments())
    return logits


def _no_ignore_eos(cfg: RunConfig) -> RunConfig:
    """The T2T note always stops at EOS (it is capped by t2t_note_tokens)."""
    if not cfg.gen.ignore_eos:
        return cfg
    return replace(cfg, gen=replace(cfg.gen, ignore_eos=False))
