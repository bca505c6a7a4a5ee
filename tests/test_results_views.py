"""Results views that read right with few or mixed samples: per-file percentile lines, one y
scale side by side, points instead of a histogram below 20 samples, warnings when files ran
other prompts or machines, key columns first, uploaded records checked."""

from __future__ import annotations

import pandas as pd
import pytest

from c2c_core.report import analysis as A
from c2c_core.report import plots as P
from test_analysis import rec


def _file(n, scale=1.0, device="cpu", prompt=lambda i: f"prompt {i}"):
    out = []
    for i in range(n):
        r = rec(str(i), steps=[10.0 + i % 3, 11.0, 12.0, 13.0], scale=scale)
        r["prompt"] = prompt(i)
        r["run"] = {"device": device, "cpu": "Xeon", "threads": 2, "dtype": "float32"}
        out.append(r)
    return out


def test_percentile_lines_are_per_file():
    sf = pd.concat([A.steps_frame(_file(3), "fast"), A.steps_frame(_file(3, 2.0), "slow")])
    fig = P.decode_steps_fig(sf)
    lines = {t.name.split(" ")[0] + " " + t.name.split(" ")[1]: t.y[0] for t in fig.data
             if t.name and " p" in t.name and not t.name.startswith("sample")}
    assert set(lines) == {"fast p50", "fast p90", "slow p50", "slow p90"}
    assert lines["slow p50"] == 2 * lines["fast p50"]
    assert not fig.layout.shapes  # no combined line mixing the two files
    one = P.decode_steps_fig(A.steps_frame(_file(3), "fast"))
    assert len(one.layout.shapes) == 2  # one file: the p50 / p90 lines as before


def test_side_by_side_share_one_y_scale():
    a = P.stage_bars_fig(A.to_frame(_file(3), "a"))
    b = P.stage_bars_fig(A.to_frame(_file(3, 3.0), "b"))
    P.shared_y(a, b)
    assert a.layout.yaxis.range == b.layout.yaxis.range
    top = A.to_frame(_file(3, 3.0))["e2e_ms"].max()
    assert a.layout.yaxis.range[1] >= top  # the taller stack fits
    sa = P.decode_steps_fig(A.steps_frame(_file(2), "a"))
    sb = P.decode_steps_fig(A.steps_frame(_file(2, 2.0), "b"))
    P.shared_y(sa, sb)
    assert sa.layout.yaxis.range == sb.layout.yaxis.range and sa.layout.yaxis.range[1] >= 26


def test_few_samples_are_points_not_a_histogram():
    for n in (1, 5, 19):
        fig = P.decode_hist_fig(A.to_frame(_file(n), "f"))
        types = {t.type for t in fig.data}
        assert "histogram" not in types, n
        assert sum(len(t.x) for t in fig.data if t.hovertemplate
                   and "median" not in t.hovertemplate) == n  # every sample drawn
        assert ("box" in types) == (n >= 5)
    many = P.decode_hist_fig(A.to_frame(_file(200), "f"))
    assert {t.type for t in many.data} == {"histogram"}
    mixed = P.decode_hist_fig(pd.concat([A.to_frame(_file(200), "big"),
                                         A.to_frame(_file(3), "small")]))
    assert "histogram" not in {t.type for t in mixed.data}  # one small file: points for both


def test_differences_between_files_are_said():
    same = A.source_differences({"a": _file(3), "b": _file(3)})
    assert same == []
    other_prompts = A.source_differences({"a": _file(3), "b": _file(3, prompt=lambda i: f"q{i}")})
    assert len(other_prompts) == 1 and "different prompts" in other_prompts[0]
    gpu = A.source_differences({"a": _file(3), "b": _file(3, device="NVIDIA H100")})
    assert len(gpu) == 1 and "different machines" in gpu[0] and "NVIDIA H100 (b)" in gpu[0]


def test_key_columns_lead_the_summary():
    cols = list(A.summarize(A.to_frame(_file(3), "f")).columns)
    assert cols[:6] == ["source", "mode", "count", "decode ms/token p50", "TTFT ms p50",
                        "accuracy"]


def test_uploaded_records_are_checked():
    import pytest
    pytest.importorskip("gradio")
    from c2c_core.frontends.ui.results_tab import check_notes
    good = _file(3)
    for r in good:  # rec() builds consistent numbers; give it every field check_record wants
        r.update(mode="c2c", repeat=0)
    from c2c_core.io.records import RUN_FIELDS
    for r in good:
        r["run"] = {k: r["run"].get(k) for k in RUN_FIELDS} | {"frontend": "cli"}
        r["timing"]["sharer_decode_ms"] = 0.0
    assert check_notes({"good": good}) == []
    bad = [dict(r, timing=dict(r["timing"])) for r in good]
    bad[1]["timing"]["decode_total_ms"] += 50
    notes = check_notes({"bad": bad})
    assert len(notes) == 1 and "1 of 3 record(s)" in notes[0] and "record 2" in notes[0]
    assert "decode_total_ms" in notes[0]
    legacy = [{k: v for k, v in r.items() if k != "run"} for r in bad]
    assert check_notes({"seed": legacy}) == []  # the seed's format is read as such


def test_mode_ratios_pair_within_a_file_only():
    """Two machines' files with the same ids: c2c of one must not meet receiver of the other."""
    cpu = [rec(str(i), m, ttft=t) for i in range(3) for m, t in (("c2c", 200.0), ("receiver", 100.0))]
    gpu = [rec(str(i), m, ttft=t) for i in range(3) for m, t in (("c2c", 20.0), ("receiver", 10.0))]
    df = pd.concat([A.to_frame(cpu, "cpu"), A.to_frame(gpu, "gpu")], ignore_index=True)
    _, ratios = A.compare_modes(df)
    r = ratios["c2c_over_receiver"]
    assert r["n"] == 6 and r["paired"]
    # per pair the ratio is 2 (100 / 50 would be the machines mixed)
    assert r["ttft_ms"] == pytest.approx(2.0)
    only_cpu_c2c = pd.concat([A.to_frame(cpu[::2], "cpu"), A.to_frame(gpu[1::2], "gpu")])
    _, none = A.compare_modes(only_cpu_c2c)
    assert not none["c2c_over_receiver"]["paired"]  # nothing pairs across the two files


def test_ratios_text_names_the_median_of_per_prompt_ratios():
    """The Results tab's line shows the median of per-prompt ratios and says so, not "paired by
    id" beside a ratio of medians (which for these records is 0.5, on the other side of 1)."""
    pytest.importorskip("gradio")
    from c2c_core.frontends.ui.results_tab import ratios_md
    from test_analysis import skewed_records
    table, ratios = A.compare_modes(A.to_frame(skewed_records()))
    text = ratios_md(ratios, table)
    assert "TTFT **1.25×**" in text and "0.50×" not in text
    assert "(median of the per-prompt ratios, n=3 pair(s) matched by id and repeat)" in text
    assert "paired by id" not in text
    apart = A.compare_modes(A.to_frame([rec("a", "c2c"), rec("b", "t2t")]))[1]
    assert "ratio of the medians of all records" in ratios_md(apart)


def test_a_vs_b_table_says_not_judged():
    """Too few pairs: the A-vs-B table's regression is "n/a", not False."""
    pytest.importorskip("gradio")
    from c2c_core.frontends.ui.results_tab import compare_table
    t = compare_table(A.to_frame(_file(3), "a"), A.to_frame(_file(3, 3.0), "b"))
    assert (t["verdict"] == "too few pairs").all() and (t["regression"] == "n/a").all()
    many = compare_table(A.to_frame(_file(8), "a"), A.to_frame(_file(8, 3.0), "b"))
    assert all(v is True for v in many["regression"])
