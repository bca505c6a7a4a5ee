"""Continuous batching (bench/serving.py over engines/fast/slots.py) on tiny models in fp32:
each request's greedy tokens equal its batch-1 tokens whatever runs beside it, in every mode,
with arrivals at random steps; slots are freed at once; a full queue and bad requests are
refused with a sentence; records of served requests; nothing is prepared while serving."""

from __future__ import annotations

import random
import threading
from dataclasses import replace

import pytest

from c2c_core.bench.serving import QueueFull, Scheduler, SERVED_KIND
from c2c_core.engines import fast
from c2c_core.io.prompts import PromptItem
from c2c_core.io.records import MODES
from c2c_core.measure.timing import Timer
from c2c_core.models.loading import load_pipeline
from c2c_core.spec.config import build_run_config
from c2c_core.spec.errors import UserError

from conftest import HANG_S, loud_weights, other_sharer  # noqa: F401

PROMPTS = ["What is the capital of France?", "Say hello.",
           "Explain machine learning in simple terms, please, with an example.",
           "Write a haiku about coding.", "What is 25 * 17?",
           "Paris is the capital of France. Hello there, friend!"]


def _loud(kw, **over):
    cfg = build_run_config(**{**kw, "max_new_tokens": 8, **over}, engine="fast")
    pipe = load_pipeline(cfg)
    loud_weights(pipe)
    fast.engine_for(pipe, compile=False)
    return pipe, cfg


@pytest.fixture(scope="module")
def loud(tiny_cfg_kwargs):
    return _loud(tiny_cfg_kwargs)


def _batch_one(pipe, cfg, prompt, mode, n):
    c = replace(cfg, gen=replace(cfg.gen, max_new_tokens=n))
    return fast.generate_batch(pipe, c, [PromptItem(1, prompt)], mode, Timer(pipe.device))[0]


def _drive(sched, arrivals, seed):
    """Submit (mode, prompt, n) requests at random turns of the loop (several may arrive at
    one turn), turning until every request ended; returns the Served per request."""
    rng = random.Random(seed)
    pending = list(arrivals)
    tickets = []
    turns = 0
    while pending or any(not t._req.done.is_set() for t in tickets):
        k = rng.choice([0, 0, 1, 1, 2]) if pending else 0
        for _ in range(min(k, len(pending))):
            mode, p, n = pending.pop(0)
            tickets.append(sched.submit(mode, PromptItem(len(tickets) + 1, p), n))
        sched.turn()
        turns += 1
        assert turns < 2000, "the scheduler stopped making progress"
    return [t.wait(0) for t in tickets]


@pytest.mark.parametrize("ignore_eos", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_each_request_equals_its_batch_of_one(loud, ignore_eos):
    pipe, cfg = loud
    cfg = replace(cfg, gen=replace(cfg.gen, ignore_eos=ignore_eos))
    sched = Scheduler(pipe, cfg, slots=3, max_queue=64, max_prompt_tokens=64)
    rng = random.Random(7)
    arrivals = [(rng.choice(MODES), rng.choice(PROMPTS), rng.randint(1, 8)) for _ in range(10)]
    for m in MODES:  # every mode at least twice
        arrivals += [(m, PROMPTS[0], 8), (m, PROMPTS[2], 5)]
    rng.shuffle(arrivals)
    eng = fast.engine_for(pipe)
    late0 = eng.late
    served = _drive(sched, arrivals, seed=3)
    assert eng.late == late0  # nothing was prepared while serving
    for (mode, p, n), sv in zip(arrivals, served):
        one = _batch_one(pipe, cfg, p, mode, n)
        assert sv.tokens == one.tokens, (mode, p, n)
        assert sv.finish_reason in ("stop", "length")
        assert len(sv.token_ns) == len(sv.tokens)
        assert sv.arrival_ns <= sv.admitted_ns <= sv.first_ns <= sv.end_ns
        if mode == "t2t":
            assert sv.note_tokens == len(one.sharer_tokens)
    assert {sv.batch for sv in served} != {1}, "no prefill was ever shared: the test is weak"
    # rows moved down when an earlier slot freed, and steps ran on fewer rows than slots
    assert sched.groups["receiver"].moves > 0
    # every slot was free at the end, and the groups never ran out of room for good
    assert all(not g.active for g in sched.groups.values())
    assert sched.stats()["served"] == len(arrivals)


def test_requests_overlap_in_the_decode_batch(loud):
    """Arrivals join a running batch: some step ran several requests at once, and a request
    that arrives while another decodes gets its first token before the other's last."""
    pipe, cfg = loud
    cfg = replace(cfg, gen=replace(cfg.gen, ignore_eos=True))
    sched = Scheduler(pipe, cfg, slots=4, max_queue=8, max_prompt_tokens=64)
    a = sched.submit("receiver", PromptItem(1, PROMPTS[2]), 8)
    sched.turn()
    sched.turn()
    b = sched.submit("c2c", PromptItem(2, PROMPTS[1]), 3)
    while not (a._req.done.is_set() and b._req.done.is_set()):
        sched.turn()
    sa, sb = a.wait(0), b.wait(0)
    assert sb.first_ns < sa.end_ns and sb.end_ns <= sa.end_ns
    assert sa.tokens == _batch_one(pipe, cfg, PROMPTS[2], "receiver", 8).tokens
    assert sb.tokens == _batch_one(pipe, cfg, PROMPTS[1], "c2c", 3).tokens


def test_refusals_are_sentences(loud):
    pipe, cfg = loud
    sched = Scheduler(pipe, cfg, slots=1, max_queue=2, max_prompt_tokens=16)
    with pytest.raises(UserError, match="serves"):
        sched.submit("gpt-4", "Hi", 2)
    with pytest.raises(UserError, match="max_tokens=99"):
        sched.submit("c2c", "Hi", 99)
    with pytest.raises(UserError, match="max_prompt_tokens"):
        sched.submit("receiver", " ".join(["word"] * 40), 2)
    sched.submit("receiver", "Hi", 2)
    sched.submit("receiver", "Hi", 2)
    with pytest.raises(QueueFull, match="queue is full"):
        sched.submit("receiver", "Hi", 2)
    assert sched.stats()["rejected"] == 1


def test_cancel_frees_the_slot_and_queue(loud):
    pipe, cfg = loud
    cfg = replace(cfg, gen=replace(cfg.gen, ignore_eos=True))
    sched = Scheduler(pipe, cfg, slots=1, max_queue=4, max_prompt_tokens=64)
    a = sched.submit("receiver", PROMPTS[0], 8)
    b = sched.submit("receiver", PROMPTS[1], 2)
    sched.turn()
    assert len(sched.groups["receiver"].active) == 1 and sched.stats()["queued"] == 1
    a.cancel()
    sched.turn()  # a leaves, b takes its slot at once
    assert a.wait(0).finish_reason == "abort" and sched.stats()["aborted"] == 1
    while not b._req.done.is_set():
        sched.turn()
    assert b.wait(0).tokens == _batch_one(pipe, cfg, PROMPTS[1], "receiver", 2).tokens


def test_thread_streams_tokens_and_writes_records(loud, tmp_path):
    from c2c_core.io.records import JsonlWriter, iter_jsonl
    pipe, cfg = loud
    out = tmp_path / "served.jsonl"
    with JsonlWriter(str(out)) as w:
        sched = Scheduler(pipe, cfg, slots=2, max_queue=8, writer=w,
                          max_prompt_tokens=64).start()
        try:
            got, done = [], threading.Event()
            t = sched.submit("c2c", PROMPTS[0], 6, on_token=got.extend,
                             on_done=lambda sv: done.set())
            assert done.wait(HANG_S)
            sv = t.wait(0)
        finally:
            sched.close()
    assert got == sv.tokens and sv.tokens
    recs = list(iter_jsonl(str(out)))
    assert len(recs) == 1 and recs[0]["kind"] == SERVED_KIND and recs[0]["mode"] == "c2c"
    tm = recs[0]["timing"]
    assert tm["num_generated_tokens"] == len(sv.tokens)
    assert tm["queue_ms"] <= tm["ttft_ms"] <= tm["e2e_ms"]
    assert tm["projector_total_ms"] > 0 and tm["teacher_prefill_ms"] > 0
    assert len(recs[0]["itl_ms"]) == len(sv.tokens) - 1
    assert recs[0]["run"]["slots"] == 2
    from c2c_core.frontends.cli import main
    assert main(["report", str(out)]) == 0  # report reads served records


@pytest.mark.slow
def test_own_tokenizer_sharer_equals_batch_of_one(tiny_cfg_kwargs, other_sharer):
    """The sectioned c2c of a sharer with its own tokenizer (the reference's order) through
    slots."""
    pipe, cfg = _loud({**tiny_cfg_kwargs, "teacher_model": other_sharer})
    sched = Scheduler(pipe, cfg, slots=2, max_queue=16, max_prompt_tokens=96)
    arrivals = [("c2c", p, 6) for p in PROMPTS[:4]]
    served = _drive(sched, arrivals, seed=5)
    for (mode, p, n), sv in zip(arrivals, served):
        assert sv.tokens == _batch_one(pipe, cfg, p, mode, n).tokens, p


def test_tight_columns_move_the_block_and_keep_tokens(loud):
    """A receiver group with barely more columns than one request needs: arrivals wait for
    room (first come, first served), the occupied block moves left and right, and every
    request still gets its batch-1 tokens."""
    from c2c_core.engines.fast.slots import SlotGroup
    from c2c_core.plan.item import build_plan
    pipe, cfg = loud
    cfg = replace(cfg, gen=replace(cfg.gen, ignore_eos=True))
    sched = Scheduler(pipe, cfg, slots=3, max_queue=64, max_prompt_tokens=64)
    longest = max(len(build_plan(pipe, cfg, PromptItem(1, p), "c2c").ids) for p in PROMPTS[:4])
    g = SlotGroup(pipe, "receiver", 3, longest + 8 + 6, True)
    sched.groups["receiver"] = g
    arrivals = [(m, p, 8) for p in PROMPTS[:4] for m in ("receiver", "c2c")]
    served = _drive(sched, arrivals, seed=11)
    assert g.shifts > 0
    for (mode, p, n), sv in zip(arrivals, served):
        assert sv.tokens == _batch_one(pipe, cfg, p, mode, n).tokens, (mode, p)
