"""What a person reads while and after a run: charts whose axis titles sit below their labels,
ids from 1, and the Dataset tab opening offline on prompts it can run."""

from __future__ import annotations

import pandas as pd
import pytest

from c2c_core.report import analysis, plots


def _frame():
    recs = []
    for src in ("batch-20261204-203000-long-name.jsonl", "dataset-20261204-204500.jsonl"):
        for mode in ("c2c", "receiver", "sharer", "t2t"):
            recs.append({"id": 1, "mode": mode, "repeat": 0, "prompt": "p",
                         "timing": {"ttft_ms": 10.0, "e2e_ms": 50.0, "decode_avg_ms": 2.0,
                                    "tokens_per_second": 400.0, "num_generated_tokens": 4}})
    return pd.concat([analysis.to_frame(recs[:4], "batch-20261204-203000-long-name.jsonl"),
                      analysis.to_frame(recs[4:], "dataset-20261204-204500.jsonl")])


def test_mode_chart_labels_are_two_short_lines_and_margins_grow_to_fit_them():
    figs = plots.mode_compare_figs(_frame())
    fig = figs["ttft_ms"]
    labels = [t.x[0] for t in fig.data]
    # file and mode on two lines: no long rotated label running into the axis title
    assert all("<br>" in x and " · " not in x for x in labels), labels
    assert fig.layout.xaxis.title.text == "file · mode"
    for f in [*figs.values(), plots.stage_bars_fig(_frame()), plots.decode_hist_fig(_frame())]:
        assert f.layout.xaxis.automargin is True and f.layout.yaxis.automargin is True
        assert f.layout.xaxis.title.standoff


def test_records_without_ids_are_numbered_from_one(tmp_path):
    from c2c_core.io.prompts import load_prompt_file
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    assert [i.id for i in load_prompt_file(str(f))] == [1, 2]
    df = analysis.to_frame([{"prompt": "x", "timing": {"ttft_ms": 1.0}}] * 2)
    assert list(df["id"]) == ["1", "2"]


def test_the_dataset_tab_opens_offline_on_the_shipped_sample_prompts(monkeypatch):
    pytest.importorskip("gradio")
    import gradio as gr

    from c2c_core.frontends.ui import dataset_tab
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with gr.Blocks():
        tab = dataset_tab.build_dataset_tab()
    assert tab.source.value == "file"
    assert tab.prompt_file.value["orig_name"] == "sample_prompts.jsonl"
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    with gr.Blocks():
        online = dataset_tab.build_dataset_tab()
    assert online.source.value == "hf" and online.prompt_file.value is None


def test_sweep_batch_rows_are_numbered_from_one(tiny_pipe):
    from c2c_core.bench.runner import Item
    from c2c_core.bench.sweep import batch_items, sweep_items
    pipe, _cfg = tiny_pipe
    item = sweep_items(pipe.tokenizer, [4])[0]
    rows = batch_items(pipe.tokenizer, item, 4, 2, 3)
    assert [r.id for r in rows] == ["in4-out2-b3.1", "in4-out2-b3.2", "in4-out2-b3.3"]
    assert rows[0].input_ids == item.input_ids and isinstance(rows[0], Item)
