"""The web app's named endpoints (profile, batch, dataset, analyze) called in-process through
gradio_client on the tiny model pair: files come back and their contents are valid."""

from __future__ import annotations

import gzip
import json
import os
import threading

import pytest

gr = pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402

from c2c_core.io.records import check_record, read_records  # noqa: E402

from conftest import SEED_RECORD  # noqa: E402


@pytest.fixture(scope="module")
def app_url(app_server):
    return app_server


@pytest.fixture(scope="module")
def client(app_url):
    return Client(app_url[1], verbose=False)


def valid_jsonl(path: str, n: int | None = None) -> list[dict]:
    recs = read_records(path)
    assert recs, f"{path} is empty"
    if n is not None:
        assert len(recs) == n
    for r in recs:
        assert check_record(r) == [], check_record(r)
    return recs


def test_endpoints_are_named(client):
    names = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert {"/profile", "/batch", "/dataset", "/analyze"} <= names


def test_model_jobs_share_one_queue_slot(app_url):
    demo, _ = app_url
    named = {fn.api_name: fn for fn in demo.fns.values() if fn.api_name}
    for name in ("profile", "batch", "dataset", "load_models"):
        assert named[name].concurrency_limit == 1
        assert named[name].concurrency_id == "model"
    assert demo.max_file_size == 50 * 1024 * 1024


def test_profile_returns_five_valid_files(client):
    status, response, stages, breakdown, steps, files = client.predict(
        prompt="What is 25 * 17?", api_name="/profile")
    assert "TTFT" in status and "ms" in status
    names = sorted(os.path.basename(f) for f in files)
    assert len(files) == 5
    by_ext = {("trace" if f.endswith("_trace.json.gz") else "stats" if f.endswith("_stats.json")
               else "summary" if f.endswith(".summary.json")
               else os.path.splitext(f)[1]): f for f in files}
    assert set(by_ext) == {".jsonl", ".tsv", "trace", "stats", "summary"}, names
    with open(by_ext["summary"]) as f:  # the run report: settings, machine, per-mode numbers
        summary = json.load(f)
    assert summary["records"] == 1 and summary["settings"]["requested"]["frontend"] == "app"
    assert summary["environment"]["frontend"] == "app" and summary["modes"]["c2c"]["count"] == 1
    rec = valid_jsonl(by_ext[".jsonl"], 1)[0]
    assert rec["prompt"] == "What is 25 * 17?" and rec["response"] == response
    with open(by_ext[".tsv"]) as f:
        head = f.readline().rstrip("\n").split("\t")
    assert head[:4] == ["id", "mode", "repeat", "stage"]
    with gzip.open(by_ext["trace"], "rt") as f:
        trace = json.load(f)
    assert any(str(e.get("name", "")).startswith("c2c/") for e in trace["traceEvents"])
    with open(by_ext["stats"]) as f:
        assert "top_ops_by_self_cpu" in json.load(f)
    assert "time (ms)" in stages["headers"]
    assert breakdown and steps


def test_profile_bad_input_is_one_readable_error(client):
    with pytest.raises(Exception) as e:
        client.predict(prompt="   ", api_name="/profile")
    assert "prompt is empty" in str(e.value)
    with pytest.raises(Exception) as e:
        client.predict(prompt="hi", receiver="/no/such/model/dir", api_name="/profile")
    assert "does not exist" in str(e.value)
    # the app keeps serving
    status, *_ = client.predict(prompt="hi", api_name="/profile")
    assert "TTFT" in status


def test_batch_writes_one_record_per_prompt_and_repeat(client):
    status, table, plot, file = client.predict(prompts="Hello\n\nWhat is 2+2?", repeats=2,
                                               api_name="/batch")
    assert "Done: 4 record" in status.replace("*", "")
    recs = valid_jsonl(file, 4)
    assert [(r["id"], r["repeat"]) for r in recs] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert len(table["data"]) == 4
    assert "TTFT (ms)" in table["headers"] and "decode (ms/token)" in table["headers"]
    assert plot


def test_batch_mode_all(client):
    _, _, _, file = client.predict(prompts="Hello", mode="all", api_name="/batch")
    assert [r["mode"] for r in valid_jsonl(file, 4)] == ["c2c", "receiver", "sharer", "t2t"]


def test_dataset_from_uploaded_file(client, tmp_path):
    src = tmp_path / "prompts.jsonl"
    src.write_text("\n".join(json.dumps({"question": f"What is {i} + {i}?", "answer": str(2 * i)})
                             for i in range(6)) + "\n")
    status, table, plot, file = client.predict(
        source="file", prompt_file=handle_file(str(src)), num_samples=3, offset=1,
        api_name="/dataset")
    recs = valid_jsonl(file, 3)
    assert [r["prompt"] for r in recs] == [f"What is {i} + {i}?" for i in (1, 2, 3)]
    assert all("correct" in r for r in recs)
    assert len(table["data"]) == 3


def test_dataset_bad_file_names_the_line(client, tmp_path):
    src = tmp_path / "broken.jsonl"
    src.write_text('{"prompt": "ok"}\n{"prompt": \n{"prompt": "ok"}\n')
    with pytest.raises(Exception) as e:
        client.predict(source="file", prompt_file=handle_file(str(src)), api_name="/dataset")
    assert "broken.jsonl line 2" in str(e.value)
    assert "--skip_bad_lines" not in str(e.value)  # said with the page's words


def test_analyze_current_and_seed_files(client, tmp_path):
    _, _, _, batch_file = client.predict(prompts="Hello\nWhat is 2+2?", api_name="/batch")
    seed = tmp_path / "seed_timing.jsonl"
    seed.write_text(json.dumps(SEED_RECORD) + "\n" + json.dumps(SEED_RECORD) + "\n")
    out = client.predict(files=[handle_file(batch_file), handle_file(str(seed))],
                         api_name="/analyze")
    status, summary = out[0].replace("*", ""), out[1]
    assert "4 record(s) from 2 file(s)" in status
    assert len(summary["data"]) == 2
    assert any("ms/token" in h for h in summary["headers"])
    compare = out[11]
    # the batch file and the seed file ran other prompts under the same ids: as `compare`,
    # the A-vs-B view refuses to set one prompt against another
    assert compare["headers"] == ["metric", "verdict"]
    assert "cannot compare" in compare["data"][0][1] and "different prompts" in compare["data"][0][1]
    same = client.predict(files=[handle_file(batch_file), handle_file(batch_file)],
                          api_name="/analyze")[11]
    assert same["data"] and "median A" in same["headers"]


def test_analyze_malformed_file_says_which_line(client, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1}\nnot json at all\n{"id": 2}\n')
    status = client.predict(files=[handle_file(str(bad))], api_name="/analyze")[0]
    assert "bad.jsonl line 2 is not valid JSON" in status
    status = client.predict(files=[handle_file(str(bad))], skip_bad_lines=True,
                            api_name="/analyze")[0].replace("*", "")
    assert "2 record(s) from 1 file(s)" in status


def test_two_clients_queue_and_get_their_own_files(client, app_url):
    other = Client(app_url[1], verbose=False)
    jobs = [c.submit(prompts=p, api_name="/batch") for c, p in ((client, "one"), (other, "two"))]
    files = [j.result()[3] for j in jobs]
    recs = [valid_jsonl(f, 1)[0]["prompt"] for f in files]
    assert recs == ["one", "two"]


def test_session_folders_are_separate():
    from c2c_core.spec.errors import UserError
    from c2c_core.frontends.ui.sessions import end_session, new_run_path, session_run_path, session_runs

    from c2c_core.frontends.ui import guard

    class Req:  # the same client-chosen hash; the server minted each its own cookie
        def __init__(self, h):
            self.session_hash = h
            self.cookies = {guard.SESSION_COOKIE: guard.mint_session()}

    a, b = Req("same"), Req("same")
    path = new_run_path(a, "batch")
    with open(path, "w") as f:
        f.write('{"id": 1}\n')
    name = os.path.basename(path)
    assert [n for _, n in session_runs(a)] == [name]
    assert session_runs(b) == []
    assert session_run_path(a, name) == path
    a_key = os.path.basename(os.path.dirname(path))
    for bad in (name, f"../{a_key}/{name}", path):
        with pytest.raises(UserError):
            session_run_path(b, bad)
    end_session(a)  # what closing the tab does
    assert not os.path.exists(path)
    end_session(b)


def test_stop_flag_ends_a_run_and_keeps_records(tiny_cfg_kwargs, tmp_path, monkeypatch):
    """The Stop button's mechanism: the flag ends run_many after the current generation."""
    from c2c_core.spec.config import build_run_config
    from c2c_core.io.prompts import resolve_prompts
    from c2c_core.frontends.ui import jobs
    from c2c_core.frontends.ui.jobs import stream_records

    monkeypatch.setattr(jobs, "TABLE_EVERY_S", 0.0)

    cfg = build_run_config(**tiny_cfg_kwargs)
    items = resolve_prompts(prompts=[f"prompt {i}" for i in range(50)])
    stop = threading.Event()
    path = str(tmp_path / "stopped.jsonl")
    outs = []

    def render(recs, status, file, summary=None):
        if len(recs) >= 2:
            stop.set()
        outs.append((len(recs), status, file))
        return status

    list(stream_records(cfg, items, path, lambda *a, **k: None, render, stop=stop))
    n, status, file = outs[-1]
    assert "Stopped after" in status.replace("*", "") and file == path
    assert 2 <= n < 50
    valid_jsonl(path, n)


def test_token_counter_counts_generated_tokens(tiny_pipe):
    """Per-token progress of long runs counts top-level forwards: one per generated token."""
    from dataclasses import replace

    from c2c_core.bench.runner import Item, run_one
    from c2c_core.frontends.ui.jobs import token_counter
    pipe, cfg = tiny_pipe
    cfg = replace(cfg, gen=replace(cfg.gen, max_new_tokens=12, ignore_eos=True))
    for mode in ("c2c", "sharer"):
        with token_counter(pipe, True) as counter:
            rec = run_one(pipe, cfg, Item(1, "Hello"), mode)
        assert counter[0] == rec["timing"]["num_generated_tokens"] == 12
    with token_counter(pipe, True) as counter:
        pass
    run_one(pipe, cfg, Item(1, "Hello"))
    assert counter[0] == 0  # the hooks are gone after the block


def test_dataset_not_cached_offline_fails_at_once(client):
    """Offline (conftest sets HF_*_OFFLINE) an uncached dataset is said in one sentence with
    the page's own fix, without a retry stall."""
    import time
    t0 = time.perf_counter()
    with pytest.raises(Exception) as e:
        client.predict(source="hf", dataset_name="no-such-owner/no-such-dataset",
                       api_name="/dataset")
    msg = str(e.value)
    assert "no-such-owner/no-such-dataset" in msg and "upload a prompts file" in msg
    assert "--" not in msg
    from conftest import HANG_S
    assert time.perf_counter() - t0 < HANG_S  # a hang guard; offline, nothing retries


def test_analyze_compares_modes_with_ratios(client, tmp_path, tiny_pipe):
    from dataclasses import replace

    from c2c_core.io.records import write_all
    from c2c_core.bench.runner import run_many
    pipe, cfg = tiny_pipe
    recs = run_many(pipe, replace(cfg, mode="all", gen=replace(cfg.gen, t2t_note_tokens=3)),
                    ["Say hello", "What is 25 * 17?"])
    path = tmp_path / "all_modes.jsonl"
    write_all(path, recs)
    out = client.predict(files=[handle_file(str(path))], api_name="/analyze")
    modes, ratios, sweep = out[6], out[-4], out[-1]
    assert [row[0] for row in modes["data"]] == ["c2c", "receiver", "sharer", "t2t"]
    assert "C2C ÷ T2T" in ratios and "C2C ÷ receiver" in ratios
    assert "median of the per-prompt ratios, n=2 pair(s)" in ratios
    assert sweep  # a figure comes back even for non-sweep records


def test_sweep_endpoint_runs_the_length_grid(client):
    status, table, fig, path, _ = client.predict(input_lens="3,9", output_lens="2,4",
                                                 api_name="/sweep")
    recs = valid_jsonl(path, 4)
    got = sorted((r["timing"]["prompt_tokens"], r["timing"]["num_generated_tokens"]) for r in recs)
    assert got == [(3, 2), (3, 4), (9, 2), (9, 4)]
    with pytest.raises(Exception, match="Prompt lengths 'abc' must be whole numbers separated by commas or spaces"):
        client.predict(input_lens="abc", output_lens="2", api_name="/sweep")


def test_sweep_endpoint_batch_sizes_draw_latency_vs_throughput(client):
    """Batch sizes on the fast engine: one record per row, batch fields, the second plot."""
    status, table, fig, path, bfig = client.predict(
        input_lens="3", output_lens="3", batch_sizes="1,2", engine="fast", api_name="/sweep")
    recs = valid_jsonl(path, 3)
    assert sorted((r["batch_size"], r["batch_index"]) for r in recs) == [(1, 0), (2, 0), (2, 1)]
    assert {r["run"]["engine"] for r in recs} == {"fast"}
    assert all(r["timing"]["batch_tokens_per_second"] > 0 for r in recs)
    assert "B=2" in json.dumps(bfig)
    with pytest.raises(Exception, match="need the fast engine"):
        client.predict(input_lens="3", output_lens="2", batch_sizes="1,2", engine="eager",
                       api_name="/sweep")


def test_ratios_text_shows_accuracy_beside_latency():
    import pandas as pd

    from c2c_core.frontends.ui.results_tab import NO_RATIOS, ratios_md
    table = pd.DataFrame({"mode": ["c2c", "t2t"], "accuracy": [0.5, 0.25], "n_scored": [4, 4]})
    text = ratios_md({"c2c_over_t2t": {"ttft_ms": 0.5, "e2e_ms": 0.6, "decode_avg_ms": 1.0,
                                       "n": 4, "paired": True}}, table)
    assert "C2C ÷ T2T" in text and "TTFT **0.50×**" in text and "c2c **50%** (4 scored)" in text
    assert ratios_md({}, None) == NO_RATIOS
