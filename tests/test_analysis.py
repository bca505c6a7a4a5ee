"""analysis.py and plots.py on records built here: current shape and the seed's legacy shapes."""

import math

import pandas as pd
import plotly.graph_objects as go
import pytest
from conftest import SEED_RECORD

from c2c_core.report import analysis as A
from c2c_core.report import plots as P
from c2c_core.io.records import EXT_TIMING_FIELDS, SEED_TIMING_FIELDS


def rec(id_, mode="c2c", steps=(10.0, 12.0, 14.0, 16.0), ttft=100.0, repeat=0, correct=None,
        prompt_tokens=20, scale=1.0):
    """A current-shape record; `scale` multiplies every time (a uniform slowdown)."""
    steps = [s * scale for s in steps]
    stages = {"base_embedding_ms": 1.0, "base_prefill_ms": 30.0, "teacher_embedding_ms": 2.0,
              "teacher_prefill_ms": 40.0, "projector_total_ms": 20.0, "sharer_decode_ms": 0.0}
    stages = {k: v * scale for k, v in stages.items()}
    ttft *= scale
    dec = sum(steps)
    e2e = ttft + dec + 1.0
    timing = {**stages, "projector_avg_ms": stages["projector_total_ms"] / 28,
              "projector_calls": 28,
              "decode_total_ms": dec, "decode_avg_ms": dec / len(steps),
              "num_generated_tokens": len(steps) + 1, "tokens_per_second": 1000 * len(steps) / dec,
              "prompt_tokens": prompt_tokens, "ttft_ms": ttft, "e2e_ms": e2e,
              "other_ms": e2e - sum(stages.values()) - dec, "tpot_ms": (e2e - ttft) / len(steps),
              "e2e_tokens_per_second": (len(steps) + 1) / e2e * 1000,
              "decode_p50_ms": 13.0, "decode_p90_ms": 15.4, "decode_p99_ms": 15.94,
              "peak_memory_mb": 100.0, "sharer_generated_tokens": 0}
    return {"id": id_, "mode": mode, "repeat": repeat, "prompt": f"prompt {id_}",
            "response": "ok", "model_config": {"base_model": "r", "teacher_model": "s"},
            "timing": timing, "decode_step_times_ms": steps, "run": {"device": "cpu"},
            "correct": correct}


SEED_STYLE = SEED_RECORD  # the fork's profiler output: steps in seconds, no id, no run

#: A flat variant: legacy names at top level, no step list.
FLAT_STYLE = {
    "id": 7, "prompt": "Say hello.", "response": "Hello!", "prompt_length": 10,
    "response_length": 6, "projector_ms": 5.0, "total_ms": 300.0, "num_decode_steps": 4,
    "throughput_tokens_per_sec": 20.0,
}


def test_normalize_seed_style():
    n = A.normalize(SEED_STYLE, 3)
    assert n["id"] == 4 and n["mode"] == "c2c" and n["repeat"] == 0
    assert n["decode_step_times_ms"] == pytest.approx([50.0, 60.0, 70.0])
    t = n["timing"]
    assert t["decode_total_ms"] == pytest.approx(180.0)
    assert t["decode_avg_ms"] == pytest.approx(60.0)
    assert t["tokens_per_second"] == pytest.approx(1000 / 60)
    assert t["decode_p50_ms"] == pytest.approx(60.0)
    assert t["projector_avg_ms"] == pytest.approx(10.0 / 28)
    assert t["num_generated_tokens"] == 4  # the seed counted decode steps; we count tokens
    assert "decode_steps" not in t


def test_normalize_flat_legacy_names():
    n = A.normalize(FLAT_STYLE, 0)
    t = n["timing"]
    assert n["id"] == 7
    assert t["projector_total_ms"] == 5.0 and t["e2e_ms"] == 300.0
    assert t["tokens_per_second"] == 20.0
    assert t["num_generated_tokens"] == 5 and "num_decode_steps" not in t
    assert n["decode_step_times_ms"] == [] and n["prompt_chars"] == 10 and n["response_chars"] == 6


def test_normalize_current_is_unchanged_and_breakdown_list_in_ms():
    r = rec("a")
    n = A.normalize(r, 0)
    assert n["timing"] == r["timing"] and n["decode_step_times_ms"] == r["decode_step_times_ms"]
    legacy = {"prompt": "p", "timing_breakdown_ms": [2.0, 4.0]}
    assert A.normalize(legacy, 0)["timing"]["decode_avg_ms"] == pytest.approx(3.0)
    assert A.normalize({}, 5)["id"] == 6  # empty record: no crash; its place from 1


def test_to_frame_columns_and_nan():
    df = A.to_frame([rec("a"), SEED_STYLE, FLAT_STYLE, {}], source="f.jsonl")
    assert len(df) == 4
    for k in SEED_TIMING_FIELDS + EXT_TIMING_FIELDS + ["source", "id", "mode", "repeat", "prompt",
                                                       "correct", "n_steps"]:
        assert k in df.columns
    assert list(df["id"]) == ["a", "2", "7", "4"]  # a record without id: its place, from 1
    assert (df["source"] == "f.jsonl").all() and (df["mode"] == "c2c").all()
    assert math.isnan(df.loc[1, "ttft_ms"]) and math.isnan(df.loc[3, "decode_avg_ms"])
    assert list(df["n_steps"]) == [4, 3, 4, 0]
    assert df.loc[0, "ttft_other_ms"] == pytest.approx(100 - 93)
    assert df["correct"].isna().all()


def test_steps_frame():
    s = A.steps_frame([rec("a"), SEED_STYLE], source="x")
    assert list(s.columns) == ["source", "id", "mode", "repeat", "step", "ms"]
    assert list(s["step"]) == [1, 2, 3, 4, 1, 2, 3]
    assert s[s["id"] == "2"]["ms"].tolist() == pytest.approx([50.0, 60.0, 70.0])


def test_summarize_numbers():
    recs = [rec(str(i), steps=[float(v)] * 4, ttft=float(10 * v), correct=c)
            for i, (v, c) in enumerate([(10, True), (20, False), (30, None), (40, True)])]
    s = A.summarize(A.to_frame(recs, source="s"))
    assert len(s) == 1
    row = s.iloc[0]
    assert row["count"] == 4
    assert row[A.column("decode_avg_ms", "p50")] == 25.0
    assert row["decode ms/token p50"] == 25.0
    assert row["decode ms/token p90"] == pytest.approx(37.0)
    assert row["TTFT ms mean"] == 250.0
    assert row["decode tok/s p50"] == pytest.approx(round((50 + 100 / 3) / 2, 1))
    assert row["accuracy"] == pytest.approx(0.667) and row["n_scored"] == 3
    # unscored group → NaN accuracy; empty frame → empty summary with the columns
    assert math.isnan(A.summarize(A.to_frame([rec("a")])).iloc[0]["accuracy"])
    assert A.summarize(A.to_frame([])).empty


def test_slowest():
    df = A.to_frame([rec("a"), rec("b", scale=3), rec("c", scale=2), SEED_STYLE])
    top = A.slowest(df, n=3)  # decode totals: a 52, b 156, c 104, seed record 180
    assert list(top["id"]) == ["4", "b", "c"]
    assert list(A.slowest(df, n=10, by="ttft_ms")["id"])[-1] == "4"  # NaN last


def test_compare_modes_ratios():
    recs = []
    for i in range(3):
        recs += [rec(str(i), "c2c", ttft=100.0), rec(str(i), "t2t", ttft=400.0, steps=[20.0] * 4),
                 rec(str(i), "receiver", ttft=50.0)]
    table, ratios = A.compare_modes(A.to_frame(recs))
    assert list(table["mode"]) == ["c2c", "receiver", "t2t"]
    assert ratios["c2c_over_t2t"]["ttft_ms"] == pytest.approx(0.25)
    assert ratios["c2c_over_t2t"]["decode_avg_ms"] == pytest.approx(13 / 20, abs=1e-3)
    assert ratios["c2c_over_t2t"]["n"] == 3 and ratios["c2c_over_t2t"]["paired"]
    assert ratios["c2c_over_receiver"]["ttft_ms"] == pytest.approx(2.0)
    _, only = A.compare_modes(A.to_frame([rec("a"), rec("a", "receiver")]))
    assert set(only) == {"c2c_over_receiver"}


#: c2c and t2t TTFT per prompt where the two statistics land on opposite sides of 1: per-prompt
#: ratios 0.01, 1.25, 1.5 (median 1.25, C2C slower on 2 of 3 prompts), medians 50 / 100 = 0.5.
SKEWED_TTFT = {"0": (1.0, 100.0), "1": (50.0, 40.0), "2": (300.0, 200.0)}


def skewed_records():
    return [rec(i, m, ttft=t) for i, (c, tt) in SKEWED_TTFT.items()
            for m, t in (("c2c", c), ("t2t", tt))]


def test_mode_ratio_is_the_median_of_per_prompt_ratios():
    _, ratios = A.compare_modes(A.to_frame(skewed_records()))
    r = ratios["c2c_over_t2t"]
    assert r["ttft_ms"] == pytest.approx(1.25)  # not 50 / 100 = 0.5, the ratio of medians
    assert r["n"] == 3 and r["paired"] and r["stat"] == "median of per-pair ratios"
    assert A.ratio_words(r) == ("median of the per-prompt ratios, n=3 pair(s) matched by id"
                                " and repeat")


def test_mode_ratio_pairs_by_id_and_repeat():
    """c2c ran two repeats, t2t one: only repeat 0 pairs; a t2t prompt alone pairs with nothing."""
    recs = [rec("a", "c2c", ttft=100.0), rec("a", "c2c", ttft=900.0, repeat=1),
            rec("a", "t2t", ttft=200.0), rec("b", "t2t", ttft=10.0)]
    r = A.compare_modes(A.to_frame(recs))[1]["c2c_over_t2t"]
    assert r["n"] == 1 and r["ttft_ms"] == pytest.approx(0.5)
    apart = [rec("a", "c2c", ttft=100.0), rec("b", "t2t", ttft=400.0)]  # nothing pairs
    r = A.compare_modes(A.to_frame(apart))[1]["c2c_over_t2t"]
    assert not r["paired"] and r["stat"] == "ratio of medians" and r["ttft_ms"] == 0.25
    assert "ratio of the medians of all records" in A.ratio_words(r)


def test_compare_runs_flags_slowdown_only():
    def run(scale):
        return [rec(str(i), steps=[10.0 + i, 11.0, 12.0, 13.0], ttft=100.0 + i, scale=scale)
                for i in range(8)]
    base, slow = run(1), run(2)
    a = A.to_frame(base)
    same = A.compare_runs(a, A.to_frame(base))
    assert not same["beyond_noise"].any() and not same["regression"].any()
    out = A.compare_runs(a, A.to_frame(slow)).set_index("field")
    assert out["regression"].all()
    assert out.loc["decode_avg_ms", "change %"] == pytest.approx(100.0)
    assert out.loc["tokens_per_second", "change %"] == pytest.approx(-50.0, abs=0.5)
    faster = A.compare_runs(A.to_frame(slow), a).set_index("field")
    assert faster["beyond_noise"].all() and not faster["regression"].any()


def _mixed_frame():
    recs = [rec(str(i), m, prompt_tokens=p, ttft=float(p), correct=True)
            for i, p in enumerate([16, 64, 256, 1024]) for m in ("c2c", "t2t")]
    return pd.concat([A.to_frame(recs, "a.jsonl"), A.to_frame([SEED_STYLE], "seed.jsonl")],
                     ignore_index=True), recs


def _has_data(fig):
    return isinstance(fig, go.Figure) and len(fig.data) > 0


def _is_empty(fig):
    notes = [a.text for a in fig.layout.annotations]
    return isinstance(fig, go.Figure) and not fig.data and "No data" in notes


def test_plots_return_figures():
    df, recs = _mixed_frame()
    assert _has_data(P.stage_breakdown_fig(recs[0]))
    assert _has_data(P.stage_breakdown_fig(SEED_STYLE))
    many = [rec(str(i)) for i in range(30)]
    steps_fig = P.decode_steps_fig(A.steps_frame(many))
    assert len(steps_fig.data) == 20 and len(steps_fig.layout.shapes) == 2
    assert _has_data(P.decode_steps_fig(A.steps_frame([SEED_STYLE])))
    hist = P.decode_hist_fig(df)
    # few samples: every one a point, one row per source (a histogram below 20 says little)
    assert {t.y[0] for t in hist.data} == {"a.jsonl (n=8)", "seed.jsonl (n=1)"}
    assert _has_data(P.stage_bars_fig(df))
    figs = P.mode_compare_figs(df)
    assert set(figs) == {"ttft_ms", "e2e_ms", "decode_avg_ms", "tokens_per_second"}
    assert all(_has_data(f) for f in figs.values())
    # two files: the bars are file · mode, and the axis says so
    one = df[df["source"] == "a.jsonl"]
    two = P.mode_compare_figs(pd.concat([one, one.assign(source="b.jsonl")]))
    assert two["ttft_ms"].layout.xaxis.title.text == "file · mode"
    assert P.mode_compare_figs(one)["ttft_ms"].layout.xaxis.title.text == "mode"
    sweep = P.sweep_fig(A.to_frame(recs))
    assert _has_data(sweep) and sweep.layout.xaxis.type == "log"
    for fig in [P.stage_breakdown_fig(recs[0]), hist, sweep, *figs.values()]:
        assert fig.layout.template.layout.paper_bgcolor is not None  # plotly_white applied
    assert "ms" in P.stage_bars_fig(df).layout.yaxis.title.text


def test_plots_empty_input():
    empty = A.to_frame([])
    assert _is_empty(P.stage_breakdown_fig({}))
    assert _is_empty(P.decode_steps_fig(A.steps_frame([])))
    assert _is_empty(P.decode_hist_fig(empty))
    assert _is_empty(P.stage_bars_fig(empty))
    assert all(_is_empty(f) for f in P.mode_compare_figs(empty).values())
    assert _is_empty(P.sweep_fig(empty))
    # legacy rows without the field swept over
    assert _is_empty(P.sweep_fig(A.to_frame([SEED_STYLE])))


def test_sweep_fig_uses_the_swept_length_and_only_sweep_records():
    recs = []
    for mode, tokens in (("c2c", 16), ("t2t", 80)):  # t2t's receiver also reads the note
        r = rec("in16-out8")
        r["mode"], r["timing"]["prompt_tokens"] = mode, tokens
        recs.append(r)
    recs.append(rec("plain"))  # not a sweep record: left out when sweep records are present
    fig = P.sweep_fig(A.to_frame(recs))
    xs = {x for tr in fig.data for x in tr.x}
    assert xs == {16}
    assert fig.layout.xaxis.title.text == "prompt length (tokens)"


def test_sweep_fig_over_batch_sizes_draws_the_smallest_and_says_so():
    """A batch's stage times are the whole batch's: mixing sizes in one median would draw a
    point no run had. The stage plot keeps the smallest size; the batch curve shows the rest."""
    small, big = rec("in16-out8"), rec("in16-out8-b4.0")
    big["timing"]["base_prefill_ms"] = small["timing"]["base_prefill_ms"] * 10
    fig = P.sweep_fig(A.to_frame([small, big, rec("in16-out8-b4.1")]))
    prefill = [tr for tr in fig.data if tr.name == "receiver prefill"][0]
    assert list(prefill.y) == [small["timing"]["base_prefill_ms"]]
    assert "batch size 1" in fig.layout.title.text
    alone = P.sweep_fig(A.to_frame([small]))
    assert "batch size" not in alone.layout.title.text  # one size: nothing to say
