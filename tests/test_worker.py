"""The app's runner process: jobs go to a spawned worker, the UI process never generates,
a stop reaches the worker within a step, a dead worker fails one job in a sentence and the next
job gets a fresh worker; every record says which front end ran it."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import pytest

from c2c_core.io.records import check_record, read_records

pytest.importorskip("gradio")
from gradio_client import Client  # noqa: E402

from c2c_core.frontends import worker  # noqa: E402
from conftest import HANG_S  # noqa: E402


@pytest.fixture(scope="module")
def url(app_server):
    return app_server[1]


@pytest.fixture
def ui_never_generates(monkeypatch):
    """In this (the UI's) process, any generation fails the test: the worker does them."""
    import c2c_core.bench.profiling
    import c2c_core.bench.runner

    def forbidden(*_a, **_k):
        raise AssertionError("the UI process ran a generation")
    monkeypatch.setenv("C2C_APP_WORKER", "1")
    for mod, name in ((c2c_core.bench.runner, "generate"), (c2c_core.bench.runner, "run_many"),
                      (c2c_core.bench.runner, "run_one"), (c2c_core.bench.profiling, "profile_item")):
        monkeypatch.setattr(mod, name, forbidden)


def test_batch_profile_and_sweep_run_in_the_worker_process(url, ui_never_generates):
    from c2c_core.frontends.ui.runcfg import models_status
    c = Client(url, verbose=False)
    status, _table, _fig, path = c.predict(prompts="What is 25 * 17?\nSay hello.", repeats=2,
                                           max_new_tokens=6, warmup=0, api_name="/batch")
    assert "Done" in status, status
    recs = read_records(path)
    assert len(recs) == 4
    assert all(check_record(r) == [] and r["run"]["frontend"] == "app" for r in recs)
    w = worker.last_worker()
    assert w.alive() and w.pid != os.getpid()
    status, response, _stages, _b, _s, files = c.predict(prompt="What is 25 * 17?",
                                                         max_new_tokens=6, api_name="/profile")
    # the JSONL, TSV, trace and op stats, and the run's summary.json
    assert "TTFT" in status and " cpu " in status and len(files) == 5
    assert any(f.endswith(".summary.json") for f in files), files
    prof = [f for f in files if f.endswith(".jsonl")][0]
    assert read_records(prof)[0]["run"]["frontend"] == "app"
    status, _t, _p, path, _b = c.predict(input_lens="4,8", output_lens="3", warmup=0,
                                     api_name="/sweep")
    assert "Done" in status and len(read_records(path)) == 2
    assert worker.last_worker().pid == w.pid  # one worker served every job
    # the status line is the worker's: it describes the pipeline it holds
    assert "Models:" in models_status() and "loaded in" in models_status()


# slow: a 3000-step record through the worker (a minute under load);
# quick: test_cancel's stop within a step, test_worker_stop's kept worker
@pytest.mark.slow
def test_stop_reaches_the_worker_within_a_step(tiny_cfg_kwargs, tmp_path, monkeypatch):
    """The Stop flag (set in the UI process) ends the worker's generation mid-way: a long
    record is cut off, the records before it are kept, and the worker stays up."""
    from c2c_core.spec.config import build_run_config
    from c2c_core.io.prompts import resolve_prompts
    from c2c_core.frontends.ui.jobs import stream_records
    monkeypatch.setenv("C2C_APP_WORKER", "1")
    # a worker that has not ended a stopped job in C2C_WORKER_STOP_S is replaced: a loaded
    # machine must not turn this stop into a restart (test_worker_stop tests that path)
    monkeypatch.setenv("C2C_WORKER_STOP_S", "600")
    cfg = build_run_config(**{**tiny_cfg_kwargs, "max_new_tokens": 3000, "ignore_eos": True})
    items = resolve_prompts(prompts=["a", "b", "c"])
    stop = threading.Event()
    path = str(tmp_path / "stop.jsonl")
    seen = {}

    def render(recs, status, file, summary=None):
        seen["status"], seen["n"] = status, len(recs)
        return status

    def progress(_frac, desc=""):
        # per-token progress from the worker's shared counter: stop mid-way through record 2
        if "token" in desc and "generation 2 " in desc and "at" not in seen:
            seen["at"] = time.perf_counter()
            stop.set()

    gen = stream_records(cfg, items, path, progress, render, stop=stop)
    t0 = time.perf_counter()
    for _ in gen:
        # a hang guard only: whether the stop reached the worker is judged below by what was
        # written (record 2 cut short), never by how soon
        assert time.perf_counter() - t0 < 5 * HANG_S
    ended = time.perf_counter()
    recs = read_records(path)
    assert "at" in seen, seen
    assert "Stopped after 1 of 3" in seen["status"].replace("*", ""), seen
    assert len(recs) == 1 and recs[0]["timing"]["num_generated_tokens"] == 3000
    step_ms = recs[0]["timing"]["decode_avg_ms"]
    print(f"stop -> worker ended: {1000 * (ended - seen['at']):.0f} ms (decode step {step_ms:.2f} ms)")
    # the stop cut record 2 short (a whole record is 3000 steps; had the stop not reached the
    # worker, record 2 would be written): checked above by what was written, not by seconds
    assert worker.last_worker().alive()


# slow: kills a worker mid-job (~30 s under load);
# quick: test_a_worker_that_died_while_idle_is_replaced_not_waited_on
@pytest.mark.slow
def test_a_killed_worker_fails_the_job_in_one_sentence_and_the_next_job_works(url, monkeypatch):
    from c2c_core.frontends.ui import runcfg, sessions
    monkeypatch.setenv("C2C_APP_WORKER", "1")
    c = Client(url, verbose=False)
    # make sure the worker has its models, then start a long job and kill the worker mid-way
    c.predict(prompts="hi", max_new_tokens=2, warmup=0, api_name="/batch")
    w = worker.last_worker()
    old = w.pid
    sess = sessions.SESSION_ROOT
    before = {os.path.join(r, f) for r, _, fs in os.walk(sess) for f in fs}
    job = c.submit(prompts="one\ntwo\nthree", max_new_tokens=600, ignore_eos=True, repeats=5,
                   warmup=0, api_name="/batch")
    deadline = time.time() + 120
    while True:  # until the long job's first record is in its file
        new = sorted({os.path.join(r, f) for r, _, fs in os.walk(sess) for f in fs
                      if f.endswith(".jsonl")} - before)
        if new and open(new[0]).read().count("\n") >= 1:
            break
        assert time.time() < deadline, "the long job never wrote a record"
        time.sleep(0.05)
    os.kill(old, signal.SIGKILL)
    with pytest.raises(Exception) as e:
        job.result(timeout=120)
    msg = str(e.value)
    assert "worker process" in msg and "SIGKILL" in msg and "Traceback" not in msg, msg
    kept = read_records(new[0])
    assert kept and all(check_record(r) == [] for r in kept)  # finished records stay
    assert "none loaded" in runcfg.models_status() and "worker process" in \
        runcfg.models_status()
    # the next job starts a fresh worker and works
    status, *_ , path = c.predict(prompts="What is 25 * 17?", max_new_tokens=4, warmup=0,
                                  api_name="/batch")
    assert "Done" in status and len(read_records(path)) == 1
    assert worker.last_worker().pid not in (None, old) and worker.last_worker().alive()


def test_in_process_path_still_works(url, monkeypatch):
    """C2C_APP_WORKER=0 (and ZeroGPU) run the job in the UI process: same outputs."""
    monkeypatch.setenv("C2C_APP_WORKER", "0")
    c = Client(url, verbose=False)
    status, _t, _f, path = c.predict(prompts="What is 25 * 17?", max_new_tokens=4, warmup=0,
                                     api_name="/batch")
    assert "Done" in status
    recs = read_records(path)
    assert recs[0]["run"]["frontend"] == "app" and check_record(recs[0]) == []
    status, *_ = c.predict(prompt="Say hello.", max_new_tokens=4, api_name="/profile")
    assert "TTFT" in status


def test_zerogpu_keeps_the_in_process_path(monkeypatch):
    monkeypatch.delenv("C2C_APP_WORKER", raising=False)
    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    assert worker.enabled()
    # every Gradio Space has `spaces` installed: only ZeroGPU hardware leaves the worker
    monkeypatch.setitem(sys.modules, "spaces", type(sys)("spaces"))
    assert worker.enabled()
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    assert not worker.enabled()  # the @spaces.GPU function runs in a process of its own
    monkeypatch.delenv("SPACES_ZERO_GPU")
    monkeypatch.delitem(sys.modules, "spaces")
    monkeypatch.setenv("C2C_APP_WORKER", "0")
    assert not worker.enabled()


def test_cli_records_say_cli(tiny_cfg_kwargs, tmp_path):
    from c2c_core.frontends.cli import main
    out = tmp_path / "cli.jsonl"
    rc = main(["batch", "--prompts", "Hello", "--base_model", tiny_cfg_kwargs["base_model"],
               "--teacher_model", tiny_cfg_kwargs["teacher_model"], "--hidden_dim", "32",
               "--intermediate_dim", "32", "--device", "cpu", "--dtype", "float32",
               "--warmup", "0", "--max_new_tokens", "4", "--output", str(out)])
    assert rc == 0
    rec = read_records(out)[0]
    assert rec["run"]["frontend"] == "cli" and check_record(rec) == []
    rec["run"]["frontend"] = "web"
    assert any("frontend" in p for p in check_record(rec))


def test_overhead_app_vs_cli_prints_the_ratio(tiny_cfg_kwargs, capsys):
    """The benchmark runs (the ratio's goal is checked by reading its output, not here)."""
    import json
    from c2c_core.frontends.cli import main
    rc = main(["overhead", "--app_vs_cli", "--prompts", "Hello", "What is 2+2?",
               "--base_model", tiny_cfg_kwargs["base_model"], "--teacher_model",
               tiny_cfg_kwargs["teacher_model"], "--hidden_dim", "32", "--intermediate_dim", "32",
               "--device", "cpu", "--dtype", "float32", "--max_new_tokens", "3"])
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    res = json.loads(lines[-1])
    assert res["prompts"] == 2 and res["repeats"] == 5 and res["app_over_cli_decode_ratio"] > 0
    assert any("ratio app/CLI" in x for x in lines)


def test_a_worker_that_died_while_idle_is_replaced_not_waited_on(url, monkeypatch):
    """The worker is killed between jobs and reaped by its reader thread: the next job must
    start a fresh worker (its death read from the process sentinel), not wait forever."""
    monkeypatch.setenv("C2C_APP_WORKER", "1")
    c = Client(url, verbose=False)
    c.predict(prompts="hi", max_new_tokens=2, warmup=0, api_name="/batch")
    w = worker.last_worker()
    old = w.pid
    os.kill(old, signal.SIGKILL)
    deadline = time.time() + HANG_S  # a hang guard only
    while w.alive():  # the sentinel says so, whoever reaped the process
        assert time.time() < deadline, "a killed worker still reads as alive"
        time.sleep(0.05)
    t0 = time.time()
    status, *_, path = c.predict(prompts="What is 25 * 17?", max_new_tokens=4, warmup=0,
                                 api_name="/batch")
    assert "Done" in status
    # a hang guard only: the next job starts a new worker process, which loads its models
    assert time.time() - t0 < 5 * HANG_S
    assert worker.last_worker().pid not in (None, old)
