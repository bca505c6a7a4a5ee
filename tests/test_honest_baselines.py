"""Honest baselines: `receiver` is the receiver alone with one plain prefill (what a user runs
without C2C), T2T's answer step is one plain prefill too, and gate-closed C2C still equals the
receiver token for token."""

from __future__ import annotations

from dataclasses import replace

import torch

from c2c_core.models.fusion import c2c_prefill, plain_prefill
from c2c_core.bench.runner import Item, generate
from c2c_core.measure.timing import Timer

PROMPTS = ["What is the capital of France?", "Say hello in one short sentence.",
           "Write a haiku about coding.", "What is 25 * 17?"]


def _gen(pipe, cfg, mode, prompt):
    return generate(pipe, cfg, Item(1, prompt), mode, Timer(pipe.device, "event"))


def test_receiver_mode_is_one_plain_prefill(tiny_pipe):
    pipe, cfg = tiny_pipe
    cfg = replace(cfg, gen=replace(cfg.gen, ignore_eos=True, max_new_tokens=4))
    alone = _gen(pipe, cfg, "receiver", PROMPTS[0])
    fused = _gen(pipe, cfg, "c2c", PROMPTS[0])
    # one forward over the whole prompt; C2C's sectioned path needs two (section + last token)
    assert len(alone.stages["base_embedding"]) == 1 and len(alone.stages["base_prefill"]) == 1
    assert len(fused.stages["base_prefill"]) == 2
    assert alone.stages["teacher_prefill"] == [] and alone.projector_calls == 0
    assert fused.projector_calls > 0


def test_t2t_answer_step_is_one_plain_prefill(tiny_pipe):
    pipe, cfg = tiny_pipe
    cfg = replace(cfg, gen=replace(cfg.gen, ignore_eos=True, max_new_tokens=3, t2t_note_tokens=4))
    g = _gen(pipe, cfg, "t2t", PROMPTS[1])
    assert len(g.stages["teacher_prefill"]) == 1  # the sharer's note
    assert len(g.stages["base_prefill"]) == 1      # the receiver's answer: note + question at once
    assert g.projector_calls == 0


def test_gate_closed_c2c_equals_plain_receiver_token_for_token(tiny_pipe):
    """An untrained fuser's gates are closed: C2C must answer exactly what the receiver alone
    answers (the projector math runs, its output is gated off)."""
    pipe, cfg = tiny_pipe
    assert pipe.fuser.untrained
    cfg = replace(cfg, gen=replace(cfg.gen, ignore_eos=True, max_new_tokens=16))
    for p in PROMPTS:
        c2c = _gen(pipe, cfg, "c2c", p)
        alone = _gen(pipe, cfg, "receiver", p)
        assert len(c2c.tokens) == 16 and c2c.projector_calls > 0
        assert c2c.tokens == alone.tokens, p


def test_sectioned_and_plain_prefill_give_the_same_logits(tiny_pipe):
    """The two prefill paths differ in cost, not in result (gate closed)."""
    pipe, _ = tiny_pipe
    ids = torch.tensor([[5, 17, 33, 48, 61, 90, 7, 12]])
    with torch.inference_mode():
        _, sectioned, _ = c2c_prefill(pipe.receiver, pipe.sharer, pipe.fuser, ids, Timer(pipe.device))
        _, plain = plain_prefill(pipe.receiver, ids, Timer(pipe.device), "base_embedding",
                                 "base_prefill")
    assert torch.allclose(sectioned, plain, atol=1e-4, rtol=1e-4)
    assert sectioned.argmax(-1).item() == plain.argmax(-1).item()
