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


def _offline_env(monkeypatch, endpoint: str | None = None):
    """No HF_*_OFFLINE variable; the hub endpoint `endpoint`, checked afresh."""
    from c2c_core.io import hub
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    if endpoint:
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setattr(hub, "_reachable_cache", {})


def _dataset_tab():
    import gradio as gr

    from c2c_core.frontends.ui import dataset_tab
    with gr.Blocks():
        return dataset_tab.build_dataset_tab()


def test_the_dataset_tab_opens_offline_on_the_shipped_sample_prompts(monkeypatch):
    pytest.importorskip("gradio")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tab = _dataset_tab()
    assert tab.source.value == "file"
    assert tab.prompt_file.value["orig_name"] == "sample_prompts.jsonl"


def test_the_dataset_tab_opens_on_the_sample_where_the_hub_cannot_be_reached(monkeypatch):
    """No offline variable set, but nothing answers at the hub's address (the discard port
    refuses): the tab still opens on prompts it can run. Where the hub answers (a local
    listener stands in for it), it opens on the hub dataset."""
    pytest.importorskip("gradio")
    import socket

    from c2c_core.io import hub
    _offline_env(monkeypatch, "http://127.0.0.1:9")
    tab = _dataset_tab()
    assert tab.source.value == "file"
    assert tab.prompt_file.value["orig_name"] == "sample_prompts.jsonl"
    assert hub._reachable_cache == {"http://127.0.0.1:9": False}  # checked once, remembered
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        _offline_env(monkeypatch, f"http://127.0.0.1:{srv.getsockname()[1]}")
        online = _dataset_tab()
    assert online.source.value == "hf" and online.prompt_file.value is None


def test_an_address_that_never_answers_counts_as_offline(monkeypatch):
    """A connect that hangs (here: name resolution that never returns) is given up after the
    probe's timeout rather than waited for."""
    import threading

    from c2c_core.io import hub
    release = threading.Event()

    def hang(*_a, **_k):
        release.wait()
        raise OSError("name resolution gave up")

    monkeypatch.setattr(hub.socket, "create_connection", hang)
    try:
        assert hub.probe("https://huggingface.co", timeout_s=0.05) is False
    finally:
        release.set()


def test_the_hub_error_in_the_page_has_a_clean_link(monkeypatch):
    """The unreachable-hub sentence as the Dataset tab's status line shows it: the address is
    left whole for the page to link (no backslash inside it), the rest stays escaped."""
    pytest.importorskip("gradio")
    import re

    from c2c_core.io.prompts import load_hf_dataset
    from c2c_core.frontends.ui.texts import md_text, status_md, ui_message
    from c2c_core.spec.errors import UserError
    _offline_env(monkeypatch, "http://127.0.0.1:9")
    with pytest.raises(UserError) as err:
        load_hf_dataset("gsm8k", split="test", num_rows=2)
    line = status_md(md_text(ui_message(err.value)), "error")
    assert "cannot be reached" in line and "upload a prompts file" in line, line
    link = re.search(r"http\S*", line).group(0)
    assert link.rstrip(",.)") == "http://127.0.0.1:9", line
    assert "(https:" not in line and "\\" not in link
    assert md_text("a_b (see https://x.org/a_b)") == "a\\_b \\(see https://x.org/a_b)"


def test_sweep_batch_rows_are_numbered_from_one(tiny_pipe):
    from c2c_core.bench.runner import Item
    from c2c_core.bench.sweep import batch_items, sweep_items
    pipe, _cfg = tiny_pipe
    item = sweep_items(pipe.tokenizer, [4])[0]
    rows = batch_items(pipe.tokenizer, item, 4, 2, 3)
    assert [r.id for r in rows] == ["in4-out2-b3.1", "in4-out2-b3.2", "in4-out2-b3.3"]
    assert rows[0].input_ids == item.input_ids and isinstance(rows[0], Item)


def test_profile_after_a_stop_does_not_show_the_previous_response(tiny_models, monkeypatch):
    """A finished Profile, then one stopped before it recorded anything: the page then shows no
    response, stage table, charts or files (before, the previous run's stayed as if current);
    the new run's first update already clears them."""
    pytest.importorskip("gradio")
    from c2c_core.frontends.ui import profile_tab, sessions
    monkeypatch.setenv("C2C_APP_WORKER", "0")  # in this process: the tiny pair loads in seconds
    monkeypatch.setenv("C2C_ALLOW_LOCAL_PATHS", "1")  # as app.py sets it for a local server
    settings = dict(receiver=tiny_models["receiver"], sharer=tiny_models["sharer"],
                    device="cpu", dtype="float32", fuser_hidden_dim=32,
                    fuser_intermediate_dim=32, max_new_tokens=8, ignore_eos=True, warmup=0,
                    mode="c2c")

    from types import SimpleNamespace
    page = SimpleNamespace(cookies={})  # one page's requests (its session key sticks to it)

    def run():
        return list(profile_tab.run_profile("Say hello.", page, lambda *a, **k: None,
                                            **settings))

    done = run()[-1]
    assert "Done" in done[0] and len(done[2]) and done[5]  # (the tiny model may say nothing)
    # Stop pressed as the profile starts (from inside the job: the loaded tiny pair can finish
    # before the page's first update, so a Stop sent on that update would come too late)
    from c2c_core.bench import profiling
    profile_item = profiling.profile_item

    def stopped_as_it_starts(*a, **k):
        sessions.request_stop(page)
        return profile_item(*a, **k)

    monkeypatch.setattr(profiling, "profile_item", stopped_as_it_starts)
    stopped = run()
    first, last = stopped[0], stopped[-1]
    assert "Stopped" in last[0] and "nothing was recorded" in last[0]
    for out in (first, last):
        status, response, stages, breakdown, steps, files = out
        assert response == "" and len(stages) == 0 and files is None, status
        assert not breakdown.data and not steps.data


def test_a_run_says_its_phase_and_one_clock_from_the_first_update(tiny_cfg_kwargs, tmp_path,
                                                                  monkeypatch):
    """Batch, Dataset and Sweep: the status line leads with the phase and the time since the
    run started from its first update on, and moves on while no record arrives (a compile, a
    long warm-up); gradio's own timer is hidden beside such a line (the .c2c-live mark)."""
    pytest.importorskip("gradio")
    import threading

    from conftest import HANG_S
    from c2c_core.bench.runner import run_many
    from c2c_core.frontends.ui import jobs
    from c2c_core.io.prompts import resolve_prompts
    from c2c_core.measure import cancel
    from c2c_core.spec.config import build_run_config
    monkeypatch.setenv("C2C_APP_WORKER", "0")
    monkeypatch.setattr(jobs, "ALIVE_EVERY_S", 0.0)  # every tick updates the line
    compiling = "compiling the receiver step for shape 1 of 2 (batch 1, 16 tokens)"
    seen = threading.Event()
    lines: list[str] = []

    def progress(*_a, **_k):
        pass

    def runner(pipe, cfg, items, **kw):
        cancel.say(compiling)
        seen.wait(HANG_S)  # until the page has been told about the compile
        return run_many(pipe, cfg, items, **kw)

    def render(recs, status, file, summary=None):
        return status, len(recs), file

    cfg = build_run_config(**tiny_cfg_kwargs)
    outs = []
    for out in jobs.stream_records(cfg, resolve_prompts(prompts=["a", "b"]),
                                   str(tmp_path / "r.jsonl"), progress, render,
                                   stop=threading.Event(), runner=runner):
        outs.append(out)
        lines.append(out[0])
        if "Compiling the receiver step" in out[0]:
            seen.set()
    assert lines[0].startswith(jobs.LIVE + "Loading models… · ") and "elapsed" in lines[0]
    ticking = [o for o in outs[1:] if o[1] == gr_skip()]
    said = [o[0] for o in ticking if "Compiling the receiver step for shape 1 of 2" in o[0]]
    assert said and all(s.startswith(jobs.LIVE) and s.endswith(" elapsed") for s in said)
    assert jobs.LIVE not in lines[-1] and "Done" in lines[-1]
    from c2c_core.frontends.ui import CSS
    assert ':has(.c2c-live) > [data-testid="status-tracker"] .progress-text' in CSS


def gr_skip():
    import gradio as gr
    return gr.skip()
