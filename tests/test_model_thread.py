"""The app's in-process path runs every job on one long-lived model thread (issue 25 item 6):
torch.compile's CUDA-graph state is per thread, so a new thread per job would re-warm and
re-record the compiled step inside the first timed spans of each job."""

from __future__ import annotations

import threading

import pytest

from c2c_core.bench.runner import run_many
from c2c_core.io.records import read_records


def test_two_in_process_jobs_run_on_one_model_thread_and_still_stop(tiny_cfg_kwargs, tmp_path,
                                                                    monkeypatch):
    pytest.importorskip("gradio")
    from c2c_core.frontends.ui import jobs
    from c2c_core.io.prompts import resolve_prompts
    from c2c_core.spec.config import build_run_config
    monkeypatch.setenv("C2C_APP_WORKER", "0")  # the in-process path (as on ZeroGPU)
    monkeypatch.setattr(jobs, "TABLE_EVERY_S", 0.0)
    cfg = build_run_config(**{**tiny_cfg_kwargs, "max_new_tokens": 3})
    ran_on = []

    def runner(pipe, cfg, items, **kw):  # run_many, noting the thread it runs on
        ran_on.append(threading.get_ident())
        return run_many(pipe, cfg, items, **kw)

    last = []
    for k, n in ((1, 2), (2, 20)):
        stop = threading.Event()
        path = str(tmp_path / f"job{k}.jsonl")

        def render(recs, status, file, summary=None):
            if k == 2 and len(recs) >= 1:
                stop.set()  # the second job is stopped: the Stop reaches the model thread
            last[:] = [len(recs), status]
            return status

        items = resolve_prompts(prompts=[f"prompt {i}" for i in range(n)])
        list(jobs.stream_records(cfg, items, path, lambda *a, **k: None, render, stop=stop,
                                 runner=runner))
        if k == 1:
            assert "Done" in last[1] and len(read_records(path)) == 2
        else:
            assert "Stopped after" in last[1].replace("*", "") and 1 <= last[0] < 20
    assert len(ran_on) == 2 and ran_on[0] == ran_on[1]  # one thread for both jobs
    assert ran_on[0] != threading.get_ident()
    names = {t.ident: t.name for t in threading.enumerate()}
    assert names.get(ran_on[0], "").startswith("c2c-model")  # alive, kept for the next job


def test_a_forked_child_makes_its_own_model_thread(monkeypatch):
    """ZeroGPU runs each call in a forked child, where the parent's thread does not exist: a
    new process id gets a model thread of its own (one that runs), the same id keeps its own."""
    pytest.importorskip("gradio")
    from c2c_core.frontends.ui import jobs
    first = jobs.model_thread()
    assert jobs.model_thread() is first
    parent_thread = first.submit(threading.get_ident).result()
    monkeypatch.setattr(jobs.os, "getpid", lambda: -1)  # as in a child
    child = jobs.model_thread()
    assert child is not first and jobs.model_thread() is child
    assert child.submit(threading.get_ident).result() != parent_thread
