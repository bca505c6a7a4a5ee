"""A run says its phases (compile per shape, warm-up, timed run, the profiled run for the trace)
and a Stop during the fast engine's compile ends it between two shapes."""

from __future__ import annotations

from dataclasses import replace

import pytest

from c2c_core.measure import cancel
from c2c_core.engines import fast
from c2c_core.spec.config import build_run_config
from c2c_core.models.loading import load_pipeline
from c2c_core.bench.runner import Item, run_many


@pytest.fixture(scope="module")
def fresh_pipe(tiny_cfg_kwargs):
    """Its own pipeline (the fast engine keeps prepared shapes per pipeline)."""
    cfg = build_run_config(**tiny_cfg_kwargs)
    return load_pipeline(cfg), cfg


def test_stop_during_compile_ends_between_two_shapes(fresh_pipe):
    pipe, cfg = fresh_pipe
    cfg = replace(cfg, engine="fast")
    items = [Item(id=1, prompt="Say hello in one short sentence.")]
    modes = ["c2c", "sharer"]  # a receiver step and a sharer step: two shapes to prepare
    eng = fast.engine_for(pipe)
    shapes = [k for k in fast.shapes_of(pipe, cfg, [items], modes) if k[0] == "step"]
    assert len(shapes) >= 2
    said, prepared = [], []
    real = eng.prepare

    def prepare(*k):
        prepared.append(k)
        real(*k)

    eng.prepare = prepare
    try:
        with cancel.scope(lambda: len(prepared) >= 1), cancel.reporting(said.append):
            with pytest.raises(cancel.Cancelled):
                fast.prepare_plan(pipe, cfg, [items], modes)
    finally:
        del eng.prepare
    assert len(prepared) == 1  # the shape in progress finished; the next never started
    assert said == [f"{'compiling' if eng.compile else 'preparing'} the {shapes_sorted(shapes)[0][1]}"
                    f" step for shape 1 of {len(shapes)} (batch 1,"
                    f" {shapes_sorted(shapes)[0][3]} tokens)"]


def shapes_sorted(shapes):
    return sorted(shapes, key=str)


def test_a_run_says_warm_up_then_timed_run(tiny_pipe):
    pipe, cfg = tiny_pipe
    said = []
    with cancel.reporting(said.append):
        run_many(pipe, replace(cfg, warmup=1, engine="eager"), ["Hi"])
    assert said == ["warming up", "timed run"]


def test_the_job_shows_the_phase_it_is_told():
    pytest.importorskip("gradio")
    from c2c_core.frontends.ui.jobs import Job, stopped_during
    job = Job(lambda j: None)
    job.set_phase("compiling the receiver step for shape 2 of 3 (batch 1, 128 tokens)")
    assert job.describe().startswith("Compiling the receiver step for shape 2 of 3 (batch 1,"
                                     " 128 tokens)… · ")
    assert job.fraction(None) is None  # a spinner, not a bar stuck at 0
    assert stopped_during(job.phase) == " during the fast engine's compile (at shape 2 of 3)"
    job.set_phase("timed run")
    assert job.phase == "running" and stopped_during(job.phase) == ""


def test_eta_in_mode_all_uses_each_modes_own_rate_and_does_not_jump(monkeypatch):
    """Mode all interleaves four modes of very different speeds: the ETA adds each mode's own
    seconds per record x its records to come, so at every record it is the true time left, and
    between records it counts down by at most the record in flight."""
    pytest.importorskip("gradio")
    from c2c_core.frontends.ui import jobs
    clock = [100.0]
    monkeypatch.setattr(jobs.time, "perf_counter", lambda: clock[0])
    speed = {"c2c": 2.0, "receiver": 1.0, "sharer": 3.0, "t2t": 6.0}
    modes = list(speed)
    prompts = 10
    job = jobs.Job(lambda j: None)
    job.modes = modes
    job.on_progress(0, prompts * 4, None)
    order = [m for _ in range(prompts) for m in modes]
    clock[0] += 30.0  # the first record also paid the warm-up: left out of the rates
    seen = []
    for k, mode in enumerate(order):
        clock[0] += speed[mode] if k else 0.0
        job.on_progress(k + 1, len(order), {"mode": mode, "batch_size": 1})
        eta = job.eta()
        true_left = sum(speed[m] for m in order[k + 1:])
        if k == len(order) - 1:
            assert eta is None  # done: nothing left to estimate
        elif k >= 4:  # from the second c2c record on, every mode has a timed record
            assert eta == pytest.approx(true_left), (k, eta, true_left)
            nxt = order[k + 1] if k + 1 < len(order) else None
            if nxt:  # half-way through the next record: half its time has gone
                clock[0] += speed[nxt] / 2
                assert job.eta() == pytest.approx(true_left - speed[nxt] / 2)
                clock[0] += speed[nxt] * 5  # a stall: never below the records still to come
                assert job.eta() == pytest.approx(true_left - speed[nxt])
                clock[0] -= speed[nxt] * 5.5
            seen.append(eta)
        else:
            assert eta is None  # no guessed rate for a mode not timed yet
    assert seen == sorted(seen, reverse=True)  # it only counts down
    assert "elapsed" in job.describe()


def test_loading_says_each_model_and_a_stop_then_says_so(tiny_cfg_kwargs):
    """Loading says what loads, in order, before the first generation; a stop in any of those
    phases reads "while the models loaded"."""
    from c2c_core.spec.config import build_run_config
    from c2c_core.models.loading import load_pipeline
    said = []
    cfg = build_run_config(**tiny_cfg_kwargs)
    with cancel.reporting(said.append):
        load_pipeline(cfg)
    assert said == ["loading the tokenizers", f"loading the receiver {cfg.receiver.source}",
                    f"loading the sharer {cfg.sharers[0].source}", "loading the fuser"]
    pytest.importorskip("gradio")
    from c2c_core.frontends.ui.jobs import stopped_during
    assert {stopped_during(p) for p in said} == {" while the models loaded"}
    assert stopped_during("assembling the Gemma GGUF from its packages") == \
        " while the models loaded"
