"""The ETA a person waits by: per mode and per shape, never below the work left while a sweep
grows to its largest shape (before, it counted records as equal and fell to 0.0 s with a minute
of the largest shape to go). Fake clocks throughout: no test here waits or times anything."""

from __future__ import annotations

import pytest

from c2c_core.measure.progress import Eta, Shape, fmt_seconds

MODES = ["c2c", "receiver"]
INS, OUT, REPEATS, WARM = [16, 64, 256, 1024], 32, 2, 3.0


def cost(mode: str, n: int) -> float:
    """Seconds of one record: a fixed part and a part that grows with the prompt, slower than
    the tokens do (as prefill does), different per mode."""
    return {"c2c": 1.0 + 0.004 * n, "receiver": 0.5 + 0.002 * n}[mode]


def plan(batch: int = 1) -> list[Shape]:
    return [Shape((n, OUT, batch), float(n + OUT), float(REPEATS * batch), batch=batch)
            for n in INS]


def timeline(batch: int = 1):
    """(mode, shape, seconds) of each generation in run order: each shape's first generation
    also pays its warm-up; a batch's rows arrive together."""
    out = []
    for n in INS:
        first = True
        for _r in range(REPEATS):
            for m in MODES:
                out.append((m, (n, OUT, batch), cost(m, n) + (WARM if first else 0.0)))
                first = False
    return out


def run(eta: Eta, batch: int = 1):
    """Feeds `eta` the sweep on a fake clock; yields (estimate, true seconds left) at each
    record, half-way through the next generation, and in a stall of the next generation."""
    clock = [0.0]
    eta.clock = lambda: clock[0]
    gens = timeline(batch)
    eta.start(len(gens) * batch)
    for k, (mode, shape, secs) in enumerate(gens):
        clock[0] += secs
        for _row in range(batch):
            eta.record(mode, shape, batch)
        left = sum(s for _m, _s, s in gens[k + 1:])
        yield eta.left(), left
        if k + 1 < len(gens):
            nxt = gens[k + 1][2]
            clock[0] += nxt / 2
            yield eta.left(), left - nxt / 2
            clock[0] += nxt * 3  # a stall: the generation runs 3.5x its time
            yield eta.left(), max(left - nxt * 3.5, 0.0)
            clock[0] -= nxt * 3.5


@pytest.mark.parametrize("batch", [1, 4])
def test_the_sweep_eta_never_falls_below_the_work_left(batch):
    seen = []
    for est, left in run(Eta(MODES, plan(batch)), batch):
        if est is None:
            continue
        seen.append(est)
        assert est >= left - 1e-9, (est, left)
        if left > 0:
            assert est > 0
    assert len(seen) > 10  # an estimate from the first shape's second round on
    assert run_ends_with_none(batch)


def run_ends_with_none(batch: int) -> bool:
    eta = Eta(MODES, plan(batch))
    return list(run(eta, batch))[-1][0] is None  # done: nothing left to estimate


def test_counting_records_as_equal_underestimates_the_largest_shape():
    """What the shapes fix: the same run, its records taken as one shape, says less than the
    work left while the largest prompt is still to come."""
    under = [est < left - 1.0 for est, left in run(Eta(MODES, None)) if est is not None]
    assert any(under)


def test_the_next_shape_counts_its_warm_up_and_size():
    eta = Eta(MODES, plan(), clock=lambda: 0.0)
    eta.start(16, now=0.0)
    t = 0.0
    for m, s, secs in timeline()[:4]:  # the first shape, both rounds
        t += secs
        eta.record(m, s, 1, now=t)
    # left: three shapes, each scaled from the first by size: its first generation (warm-up
    # and a c2c row), then the other c2c row and both receiver rows
    w0 = INS[0] + OUT
    c2c, rcv = cost("c2c", INS[0]), cost("receiver", INS[0])
    want = sum(((WARM + c2c) + (REPEATS - 1) * c2c + REPEATS * rcv) * (n + OUT) / w0
               for n in INS[1:])
    assert eta.left(now=t) == pytest.approx(want)
    assert eta.shape_at() == (2, plan()[1])


def test_one_record_per_shape_still_gets_an_eta():
    """A sweep of one mode and one repeat: every record is its shape's first generation (it
    also pays the warm-up), so no record is ever "timed"; the next shapes are still estimated
    from the first generations, scaled by size."""
    shapes = [Shape((n, OUT, 1), float(n + OUT), 1.0) for n in INS]
    eta = Eta(["c2c"], shapes, clock=lambda: 0.0)
    eta.start(len(INS), now=0.0)
    eta.record("c2c", shapes[0].key, 1, now=WARM + cost("c2c", INS[0]))
    w0 = INS[0] + OUT
    want = sum((WARM + cost("c2c", INS[0])) * (n + OUT) / w0 for n in INS[1:])
    assert eta.left(now=WARM + cost("c2c", INS[0])) == pytest.approx(want)
    assert want >= sum(WARM + cost("c2c", n) for n in INS[1:])  # not below the work left


def test_no_guess_before_every_mode_is_timed():
    eta = Eta(MODES, plan(), clock=lambda: 0.0)
    eta.start(16, now=0.0)
    eta.record("c2c", plan()[0].key, 1, now=5.0)  # the first generation: warm-up, not a rate
    eta.record("receiver", plan()[0].key, 1, now=5.5)
    assert eta.left(now=5.5) is None  # c2c has no timed record yet
    eta.record("c2c", plan()[0].key, 1, now=6.6)
    assert eta.left(now=6.6) is not None


def test_seconds_read_as_a_person_reads_them():
    assert [fmt_seconds(s) for s in (-1, 4.24, 42.4, 185)] == ["0.0 s", "4.2 s", "42 s",
                                                                "3 min 05 s"]


def test_the_progress_line_says_phase_shape_eta_and_elapsed(monkeypatch):
    """The app's line for a sweep: the phase while models load, then the generation, the shape
    running (k of n), an ETA never below the work left, and one elapsed clock."""
    pytest.importorskip("gradio")
    from c2c_core.frontends.ui import jobs
    clock = [100.0]
    monkeypatch.setattr(jobs.time, "perf_counter", lambda: clock[0])
    job = jobs.Job(lambda j: None)
    job.modes, job.plan = list(MODES), plan()
    job.set_phase("loading the receiver smollm2")
    clock[0] += 3.0
    assert job.describe() == "Loading the receiver smollm2… · 3.0 s elapsed"
    gens = timeline()
    job.on_progress(0, len(gens), None)
    for k, (mode, shape, secs) in enumerate(gens[:6]):
        clock[0] += secs
        job.on_progress(k + 1, len(gens), {"mode": mode, "id": f"in{shape[0]}-out{OUT}",
                                           "batch_size": 1})
    text = job.describe()
    left = sum(s for _m, _s, s in gens[6:])
    assert text.startswith(f"generation 7 of {len(gens)} · shape 2 of {len(INS)} · ETA ")
    assert text.endswith(f" · {jobs.fmt_seconds(clock[0] - 100.0)} elapsed")
    assert job.eta() >= left
