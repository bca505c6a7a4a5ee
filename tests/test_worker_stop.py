"""Stop acts during a step that never checks for it (a model load, a fast-engine compile): the
worker that does not end the stopped job in time is killed, the job ends saying so, and the
next job runs on a fresh worker."""

from __future__ import annotations

import os
import re
import threading
import time

import pytest

from c2c_core.io.records import read_records

pytest.importorskip("gradio")

from c2c_core.frontends import worker  # noqa: E402


def stuck_runner(pipe, cfg, items, **_kw):
    """A records runner (it runs in the worker) stuck in a step that never checks for a stop,
    as a compile is between its shapes: it says its phase, then sleeps for an hour."""
    from c2c_core.measure import cancel
    cancel.say("compiling the fast engine's graphs, shape 1 of 2")
    time.sleep(3600)


def _run(cfg, items, path, stop, on_desc=lambda d: None, runner=None):
    from c2c_core.frontends.ui.jobs import stream_records
    seen = {}

    def render(recs, status, file, summary=None):
        seen["status"], seen["n"] = status, len(recs)
        return status

    def progress(_frac, desc=""):
        on_desc(desc)

    for _ in stream_records(cfg, items, path, progress, render, stop=stop, runner=runner):
        pass
    return seen["status"].replace("*", "")


# slow: waits out a stuck step's grace (~40 s under load);
# quick: test_a_worker_that_ends_its_stopped_job_is_kept
@pytest.mark.slow
def test_stop_during_a_stuck_step_replaces_the_worker(tiny_cfg_kwargs, tmp_path, monkeypatch):
    from c2c_core.spec.config import build_run_config
    from c2c_core.io.prompts import resolve_prompts
    from c2c_core.frontends.ui.runcfg import models_status
    monkeypatch.setenv("C2C_APP_WORKER", "1")
    monkeypatch.setenv("C2C_WORKER_STOP_S", "0.5")
    worker.shutdown()
    cfg = build_run_config(**tiny_cfg_kwargs)
    items = resolve_prompts(prompts=["a", "b"])
    stop = threading.Event()
    order, stopped_at = [], []

    def on_desc(desc):  # the worker said it is compiling: press Stop
        if "ompiling" in desc and not stop.is_set():
            order.append("stuck")
            stopped_at.append(time.perf_counter())
            stop.set()

    status = _run(cfg, items, str(tmp_path / "stuck.jsonl"), stop, on_desc, stuck_runner)
    order.append("ended")
    print(f"Stop in a stuck step -> job ended: {time.perf_counter() - stopped_at[0]:.1f} s"
          f" (C2C_WORKER_STOP_S=0.5)")  # said, not asserted: the machine may be busy
    assert order == ["stuck", "ended"]
    assert "Stopped during the fast engine's compile" in status, status
    assert "model worker was restarted, so the next run loads its models again" in status
    w = worker.last_worker()
    assert not w.alive()  # killed: not left holding the device in its compile
    assert "restarted" in models_status()
    old = w.pid
    # the next job starts a fresh worker, loads the models again and runs to its end
    status = _run(cfg, items, str(tmp_path / "next.jsonl"), threading.Event())
    assert "Done" in status, status
    assert len(read_records(str(tmp_path / "next.jsonl"))) >= 2
    assert worker.last_worker().alive() and worker.last_worker().pid not in (None, old)
    worker.shutdown()


def test_a_worker_that_ends_its_stopped_job_is_kept(tiny_cfg_kwargs, tmp_path, monkeypatch):
    """A stop the worker honours in time (between decode steps) keeps the worker and its
    models: nothing is restarted, and the status line says nothing of it."""
    from c2c_core.spec.config import build_run_config
    from c2c_core.io.prompts import resolve_prompts
    monkeypatch.setenv("C2C_APP_WORKER", "1")
    monkeypatch.setenv("C2C_WORKER_STOP_S", "600")
    cfg = build_run_config(**{**tiny_cfg_kwargs, "max_new_tokens": 3000, "ignore_eos": True})
    items = resolve_prompts(prompts=["a", "b"])
    stop = threading.Event()

    def on_desc(desc):
        # a decode step's progress (", token N"), not the load's "loading the tokenizers": a
        # stop during the load would end the job before its JSONL is opened
        if re.search(r", token \d+", desc):
            stop.set()

    status = _run(cfg, items, str(tmp_path / "kept.jsonl"), stop, on_desc)
    assert "Stopped" in status and "restarted" not in status, status
    w = worker.last_worker()
    assert w.alive() and w.died is None
    worker.shutdown()
    assert os.path.exists(tmp_path / "kept.jsonl")


def test_in_process_load_stops_between_its_steps(tiny_cfg_kwargs, monkeypatch):
    """On the in-process path (no worker to kill) a Stop during a load is honoured between its
    steps: a stop set while the receiver loads ends the load before the sharer's weights."""
    from c2c_core.measure import cancel
    from c2c_core.models import loading
    from c2c_core.spec.config import build_run_config
    cfg = build_run_config(**tiny_cfg_kwargs)
    assert cfg.receiver.source != cfg.sharers[0].source  # two loads, with a step between
    loaded, stop = [], threading.Event()
    real = loading.load_model

    def load_model(spec, role, *a, **kw):  # the real load; Stop is pressed during the first
        loaded.append(role)
        out = real(spec, role, *a, **kw)
        stop.set()
        return out

    monkeypatch.setattr(loading, "load_model", load_model)
    with cancel.scope(stop.is_set), pytest.raises(cancel.Cancelled):
        loading.load_pipeline(cfg)
    assert loaded == ["Receiver"]
