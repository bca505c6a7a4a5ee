"""A stop ends a generation within one decode step, in every mode, warm-up included; records
already written are kept."""

from __future__ import annotations

import pytest

from c2c_core.measure import cancel
from c2c_core.bench import runner
from c2c_core.engines import eager
from c2c_core.spec.config import build_run_config
from c2c_core.io.records import MODES, JsonlWriter, read_records
from c2c_core.measure.timing import Timer


@pytest.fixture
def counted_steps(monkeypatch):
    steps = [0]
    real = eager.decode_step

    def step(*a, **k):
        steps[0] += 1
        return real(*a, **k)

    monkeypatch.setattr(eager, "decode_step", step)
    return steps


@pytest.mark.parametrize("mode", MODES)
def test_stop_ends_the_generation_within_one_decode_step(tiny_pipe, counted_steps, mode):
    pipe, cfg = tiny_pipe
    cfg = build_run_config(**{**_kw(cfg), "max_new_tokens": 500, "ignore_eos": True})
    stop_after = 7
    with cancel.scope(lambda: counted_steps[0] >= stop_after):
        with pytest.raises(cancel.Cancelled):
            runner.generate(pipe, cfg, runner.to_item("Say hello."), mode,
                            Timer(pipe.device, cfg.timing))
    assert counted_steps[0] == stop_after  # not one forward more


def test_a_stop_during_warm_up_ends_the_run_and_keeps_written_records(tiny_pipe, tmp_path,
                                                                       counted_steps):
    pipe, cfg = tiny_pipe
    path = str(tmp_path / "out.jsonl")
    cfg1 = build_run_config(**{**_kw(cfg), "max_new_tokens": 6, "warmup": 0})
    with JsonlWriter(path) as w:
        runner.run_many(pipe, cfg1, ["a", "b"], writer=w)
    assert len(read_records(path)) == 2
    cfg2 = build_run_config(**{**_kw(cfg), "max_new_tokens": 400, "ignore_eos": True,
                               "warmup": 3})
    counted_steps[0] = 0
    with JsonlWriter(path, append=True) as w:
        out = runner.run_many(pipe, cfg2, ["c", "d"], writer=w,
                              should_stop=lambda: counted_steps[0] >= 5)
    assert out == [] and counted_steps[0] == 5  # stopped inside the first warm-up generation
    assert [r["prompt"] for r in read_records(path)] == ["a", "b"]


def test_records_carry_their_wall_clock_span(tiny_pipe):
    pipe, cfg = tiny_pipe
    recs = runner.run_many(pipe, cfg, ["one", "two"])
    (a, b) = [(r["run"]["gen_start_unix"], r["run"]["gen_end_unix"]) for r in recs]
    assert a[0] < a[1] <= b[0] < b[1]


def _kw(cfg):
    return dict(base_model=cfg.receiver.source, teacher_model=cfg.sharer.source,
                hidden_dim=cfg.fuser.hidden_dim, intermediate_dim=cfg.fuser.intermediate_dim,
                device="cpu", dtype="float32", warmup=0)


def test_an_inner_run_without_its_own_stop_keeps_the_jobs(tiny_pipe, counted_steps):
    """The profile path calls run_many without should_stop inside the app job's scope: the
    job's Stop must still end it within one decode step."""
    pipe, cfg = tiny_pipe
    cfg = build_run_config(**{**_kw(cfg), "max_new_tokens": 300, "ignore_eos": True})
    with cancel.scope(lambda: counted_steps[0] >= 4):
        out = runner.run_many(pipe, cfg, ["a", "b"])
    assert out == [] and counted_steps[0] == 4
