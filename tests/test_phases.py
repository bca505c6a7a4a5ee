"""A run says its phases (compile per shape, warm-up, timed run, the profiled run for the trace)
and a Stop during the fast engine's compile ends it between two shapes."""

from __future__ import annotations

from dataclasses import replace

import pytest

from c2c_core import cancel, fast
from c2c_core.config import build_run_config
from c2c_core.loading import load_pipeline
from c2c_core.runner import Item, run_many


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
    shapes = [k for k in fast.plan(pipe, cfg, [items], modes) if k[0] == "step"]
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
    from c2c_core.ui.common import Job, stopped_during
    job = Job(lambda j: None)
    job.set_phase("compiling the receiver step for shape 2 of 3 (batch 1, 128 tokens)")
    assert job.describe() == ("Compiling the receiver step for shape 2 of 3 (batch 1, 128"
                              " tokens)…")
    assert job.fraction(None) is None  # a spinner, not a bar stuck at 0
    assert stopped_during(job.phase) == " during the fast engine's compile (at shape 2 of 3)"
    job.set_phase("timed run")
    assert job.phase == "running" and stopped_during(job.phase) == ""
