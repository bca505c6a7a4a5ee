"""Every record says what preparation it paid for (issue 25 item 3): `timing.late_prepare_ms` is
0 when every shape the generation used was ready, and the time of the preparation otherwise; the
summaries, report and compare leave such records out of their medians and say how many.

The fast engine runs without torch.compile here (preparing a shape still allocates its cache
and runs its warm-up steps, which is what a record then pays for)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from c2c_core.bench.runner import Item, run_many, run_one
from c2c_core.engines import fast
from c2c_core.io.records import check_record
from c2c_core.models.loading import load_pipeline
from c2c_core.report.analysis import compare_modes, summarize, to_frame, without_late
from c2c_core.spec.config import build_run_config

SHORT = "Say hello."
#: a prompt whose cache needs the next length bucket (over 64 positions with its new tokens)
LONG = " ".join(["The quick brown fox jumps over the lazy dog."] * 8)


@pytest.fixture(scope="module")
def fast_pipe(tiny_cfg_kwargs):
    cfg = build_run_config(**{**tiny_cfg_kwargs, "max_new_tokens": 4}, engine="fast",
                           ignore_eos=True, mode="receiver")
    pipe = load_pipeline(cfg)
    fast.engine_for(pipe, compile=False)
    return pipe, cfg


def _bucket(pipe, cfg, prompt):
    from c2c_core.plan.item import build_plan
    n = len(build_plan(pipe, cfg, Item(1, prompt), "receiver").ids)
    return fast.bucket(n + cfg.gen.max_new_tokens)


@pytest.fixture(scope="module")
def late_recs(fast_pipe):
    """Three records: a prepared shape, a shape outside the plan (prepared inside its record's
    clock), the same shape again (ready by then); and the engine's late count over them."""
    pipe, cfg = fast_pipe
    assert _bucket(pipe, cfg, SHORT) != _bucket(pipe, cfg, LONG)  # two shapes
    eng = fast.engine_for(pipe)
    fast.prepare_plan(pipe, cfg, [[Item(1, SHORT)]], ["receiver"])
    late0 = eng.late
    recs = [run_one(pipe, cfg, Item(1, SHORT), "receiver"),
            run_one(pipe, cfg, Item(2, LONG), "receiver"),   # its shape was never prepared
            run_one(pipe, cfg, Item(2, LONG), "receiver", repeat=1)]  # ready by now
    return recs, eng.late - late0


def test_a_shape_outside_the_plan_is_paid_by_its_record_only(late_recs):
    recs, late = late_recs
    assert late == 1
    paid = [r["timing"]["late_prepare_ms"] for r in recs]
    assert paid[0] == 0 and paid[1] > 0 and paid[2] == 0, paid
    assert paid[1] <= recs[1]["timing"]["other_ms"]  # outside every span
    assert all(check_record(r) == [] for r in recs), [check_record(r) for r in recs]

    df = to_frame(recs, "run.jsonl")
    table = summarize(df)
    assert table["count"].tolist() == [2]
    assert "1 record(s) paid for late preparation" in table.attrs["late_note"]
    assert "left out" in table.attrs["late_note"] and "--include_late" in table.attrs["late_note"]
    every = summarize(df, include_late=True)
    assert every["count"].tolist() == [3] and "counted" in every.attrs["late_note"]
    modes, _ = compare_modes(df)
    assert modes["count"].tolist() == [2] and modes.attrs["late_note"]


def test_records_of_a_ready_run_pay_nothing_and_checks_catch_a_wrong_value(fast_pipe):
    pipe, cfg = fast_pipe
    recs = run_many(pipe, cfg, [SHORT, LONG])  # every shape prepared before timing
    assert [r["timing"]["late_prepare_ms"] for r in recs] == [0, 0]
    assert without_late(to_frame(recs))[1] == ""
    bad = json.loads(json.dumps(recs[0]))
    bad["timing"]["late_prepare_ms"] = bad["timing"]["other_ms"] + 5
    assert any("late_prepare_ms" in p for p in check_record(bad))
    bad["timing"]["late_prepare_ms"] = -1
    assert "timing.late_prepare_ms < 0" in check_record(bad)
    old = json.loads(json.dumps(recs[0]))
    del old["timing"]["late_prepare_ms"]  # files written before the field stay valid
    assert check_record(old) == []


def test_a_shape_the_cap_freed_is_paid_by_the_record_that_prepares_it_again(tiny_cfg_kwargs,
                                                                            monkeypatch):
    """A cap that holds one shape's cache at a time: a run over two shapes prepares them both in
    warm-up, the second frees the first, and each record that needed a freed shape says so."""
    cfg = build_run_config(**{**tiny_cfg_kwargs, "max_new_tokens": 4}, engine="fast",
                           ignore_eos=True, mode="receiver", repeats=2)
    pipe = load_pipeline(cfg)
    Ls = [_bucket(pipe, cfg, p) for p in (SHORT, LONG)]
    small, big = sorted(fast.engine_for(pipe, compile=False).cache_nbytes("receiver", 1, L)
                        for L in Ls)
    monkeypatch.setenv(fast.CACHE_CAP_ENV, str((big + small / 2) / 2**20))  # not both
    pipe._fast_engine = None
    eng = fast.engine_for(pipe, compile=False)
    seen = []
    with pytest.warns(UserWarning, match="exceed"):
        recs = run_many(pipe, cfg, [SHORT, LONG],
                        on_progress=lambda k, n, rec: rec and seen.append(eng.late))
    assert eng.cache_evictions > 0
    paid = [r["timing"]["late_prepare_ms"] > 0 for r in recs]
    assert len(recs) == 4 and any(paid) and not all(paid)
    # warm-up prepares nothing late: the counter rises only inside generations
    assert paid == [b > a for a, b in zip([0] + seen, seen)], (paid, seen)
    assert all(check_record(r) == [] for r in recs)



def test_report_and_compare_say_how_many_records_they_leave_out(late_recs, tmp_path, capsys):
    from c2c_core.frontends.cli import main
    recs, _ = late_recs
    path = tmp_path / "run.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert main(["report", str(path)]) == 0
    out = capsys.readouterr()
    assert "1 record(s) paid for late preparation" in out.err and "left out" in out.err
    table = out.out.splitlines()
    assert any(line.split()[:2] == ["receiver", "2"] for line in table), out.out  # the count
    assert main(["report", str(path), "--include_late"]) == 0
    out = capsys.readouterr()
    assert "are counted" in out.err
    assert any(line.split()[:2] == ["receiver", "3"] for line in out.out.splitlines()), out.out
    main(["compare", str(path), str(path), "--min_pairs", "1"])
    out = capsys.readouterr()
    assert out.err.count("1 record(s) paid for late preparation") == 2  # A and B
    summary = json.loads(out.out.strip().splitlines()[-1])
    assert summary["pairs"] == {"receiver": 2}  # the late record has no pair left
    assert summary["late_records"] == {"a": 1, "b": 1} and summary["late_included"] is False


def test_the_results_tab_compares_without_them(late_recs):
    from c2c_core.frontends.ui.results_tab import compare_table
    recs, _ = late_recs
    df = to_frame(recs, "a.jsonl")
    table = compare_table(df, df.assign(source="b.jsonl"))
    assert set(table["pairs"]) == {2}


def test_the_run_summary_says_how_many_paid(late_recs):
    import io

    from c2c_core.report.summary import RunningSummary, print_summary
    recs, _ = late_recs
    out = io.StringIO()
    print_summary(recs, out)
    assert "1 of 3 record(s) paid for late preparation" in out.getvalue()
    assert RunningSummary(recs[:1]).late_note() == ""
