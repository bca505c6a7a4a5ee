"""Memory, measured: the RSS poller sees what happens between the generation's ends, unknown
memory is null (never 0), weights are reported per part, and run_many streams."""

from __future__ import annotations

import importlib.util
import os
import time
from dataclasses import replace

import numpy as np
import pytest
import torch

from c2c_core.measure import memory
from c2c_core.measure.memory import MB, PeakRSS, describe_weights, rss_bytes, weights_mb
from c2c_core.io.records import check_record
from c2c_core.bench.runner import Item, generate, run_many
from c2c_core.report.summary import RunningSummary
from c2c_core.measure.timing import Timer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_poller_catches_a_peak_between_start_and_end():
    """A 256 MB buffer that lives 100 ms inside the block and is gone before it ends: reading
    RSS at the two ends (the old way) sees nothing; the poller sees it."""
    assert rss_bytes() is not None  # Linux: /proc/self/statm
    with PeakRSS() as p:
        before = rss_bytes()
        buf = np.ones(256 * MB // 8)  # touched pages: resident
        during = rss_bytes()
        n = p.samples
        time.sleep(0.1)
        # and until the poller has read twice since: on a loaded machine its thread may not
        # have run in those 100 ms (a hang guard only bounds the wait)
        deadline = time.monotonic() + 60
        while p.samples < n + 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        del buf
        time.sleep(0.01)
    after = rss_bytes()
    if (during - before) / MB < 200:  # the allocator reused pages that were already resident
        pytest.skip(f"RSS grew only {(during - before) / MB:.0f} MB for a 256 MB buffer here")
    assert p.samples >= 4  # it really polled (every 5 ms; fewer on a loaded machine)
    assert p.peak >= during  # the poller saw the peak that neither end of the block shows
    assert p.peak_mb - max(before, after) / MB > 200


def test_generation_records_peak_rss_and_null_reserved_on_cpu(tiny_pipe):
    pipe, cfg = tiny_pipe
    cfg = replace(cfg, gen=replace(cfg.gen, max_new_tokens=4, ignore_eos=True))
    before = rss_bytes() / MB
    g = generate(pipe, cfg, Item(1, "Say hello"), "c2c", Timer(pipe.device))
    assert g.peak_memory_mb is not None and g.peak_memory_mb >= before * 0.9  # absolute RSS
    assert g.peak_memory_reserved_mb is None  # a CUDA allocator figure: unknown on a CPU
    off = generate(pipe, cfg, Item(1, "Say hello"), "c2c", Timer(pipe.device, "off"))
    assert off.peak_memory_mb is None  # timing off measures nothing


def test_unknown_memory_is_null_not_zero(tiny_pipe, monkeypatch):
    pipe, cfg = tiny_pipe
    monkeypatch.setattr(memory, "_READ_RSS", lambda: None)  # a platform that hides RSS
    [rec] = run_many(pipe, replace(cfg, gen=replace(cfg.gen, max_new_tokens=3)), ["Hi"])
    assert rec["timing"]["peak_memory_mb"] is None
    assert rec["timing"]["peak_memory_reserved_mb"] is None
    assert check_record(rec) == []
    bad = {**rec, "timing": {**rec["timing"], "ttft_ms": None}}
    assert "timing.ttft_ms is null" in check_record(bad)
    old = {**rec, "timing": {k: v for k, v in rec["timing"].items()
                             if k != "peak_memory_reserved_mb"},
           "run": {k: v for k, v in rec["run"].items() if k != "weights_mb"}}
    assert check_record(old) == []  # written before these fields existed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_reports_allocated_and_reserved(tiny_models):
    from c2c_core.spec.config import build_run_config
    from c2c_core.models.loading import load_pipeline
    cfg = build_run_config(base_model=tiny_models["receiver"], teacher_model=tiny_models["sharer"],
                           hidden_dim=32, intermediate_dim=32, device="cuda", warmup=0,
                           max_new_tokens=4)
    pipe = load_pipeline(cfg)
    g = generate(pipe, cfg, Item(1, "Say hello"), "c2c", Timer(pipe.device))
    assert 0 < g.peak_memory_mb <= g.peak_memory_reserved_mb


def test_weights_per_part(tiny_pipe):
    pipe, cfg = tiny_pipe
    w = pipe.info["weights_mb"]
    assert w["receiver"] > 0 and w["sharer"] > 0 and w["fuser"] > 0
    assert not w["sharer_is_receiver"]
    assert w["total"] == pytest.approx(w["receiver"] + w["sharer"] + w["fuser"], abs=0.2)
    expect = sum(p.numel() * 4 for p in pipe.fuser.projectors.parameters()) / MB  # fp32
    assert w["fuser"] == pytest.approx(expect, abs=0.05)
    same = weights_mb(pipe.receiver, pipe.receiver, pipe.fuser)
    assert same["sharer_is_receiver"]
    assert same["total"] == pytest.approx(same["receiver"] + same["fuser"], abs=0.2)
    assert "sharer = receiver" in describe_weights(same)
    text = pipe.describe()
    assert "receiver" in text and "fuser" in text and "MB" in text
    [rec] = run_many(pipe, replace(cfg, gen=replace(cfg.gen, max_new_tokens=2)), ["Hi"])
    assert rec["run"]["weights_mb"] == w


def test_running_summary_matches_pandas():
    import pandas as pd
    recs = [{"mode": m, "timing": {"decode_avg_ms": float(i), "tokens_per_second": 1000.0 / (i + 1),
                                   "ttft_ms": None if i == 3 else 2.0 * i}}
            for i in range(10) for m in ("c2c", "receiver")]
    t = RunningSummary(recs).table().set_index("mode")
    s = pd.Series([float(i) for i in range(10)])
    assert t.loc["c2c", "count"] == 10
    assert t.loc["c2c", "decode ms/token p90"] == pytest.approx(s.quantile(0.9))
    assert t.loc["receiver", "TTFT ms mean"] == pytest.approx(
        pd.Series([2.0 * i for i in range(10) if i != 3]).mean())


# slow: 5000 records (~1 min under load); quick: test_running_summary_matches_pandas
@pytest.mark.slow
def test_5000_record_run_keeps_flat_memory(capsys):
    """run_many(keep=False) holds no record: the heap grows by the running summary's 24 bytes
    per record, not by the records (keep=True, the control, grows by megabytes)."""
    spec = importlib.util.spec_from_file_location(
        "stream_memory", os.path.join(ROOT, "scripts", "stream_memory.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    flat = mod.synthetic_run(5000, keep=False, path=None, every=1000)
    held = mod.synthetic_run(2000, keep=True, path=None, every=1000)
    with capsys.disabled():
        print("\nstreaming heap MB per 1000 records:", [round(h, 2) for _, h, _ in flat])
    assert [d for d, _, _ in flat] == [1000, 2000, 3000, 4000, 5000]
    assert flat[-1][1] - flat[0][1] < 0.3
    assert held[-1][1] - held[0][1] > 2.0


CONTENDED = r"""
import os, sys, torch
from c2c_core.measure.memory import DeviceMemory
os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # every thread on one core
torch.set_num_threads(2)                                          # ... but two torch threads
a = torch.randn(384, 384)
for _ in range(30):  # warm the thread pool
    a @ a
with DeviceMemory(torch.device("cpu")) as m:
    for _ in range(1500):
        a @ a
print(m.cpu_share)
"""


# slow: pinned-thread subprocess (~45 s under load);
# quick: test_cpu_records_carry_cpu_share_and_a_busy_run_is_called_out
@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs CPU affinity (Linux)")
def test_cpu_share_reports_threads_that_did_not_get_their_cores():
    """Two torch threads squeezed onto one core can get at most half their threads' time: the
    generation's cpu_share must say so (a bound that a busier machine only lowers further)."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", CONTENDED], capture_output=True, text=True,
                         cwd=root, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert out.returncode == 0, out.stderr[-2000:]
    share = float(out.stdout.strip().splitlines()[-1])
    assert 0 < share < 0.6, share  # no lower bound: a busy machine lowers it further


def test_cpu_records_carry_cpu_share_and_a_busy_run_is_called_out(tiny_pipe, capsys, tmp_path):
    from c2c_core.frontends.cli import print_summary
    from c2c_core.report.summary import contention_note
    pipe, cfg = tiny_pipe
    [rec] = run_many(pipe, replace(cfg, gen=replace(cfg.gen, max_new_tokens=3)), ["Hi"])
    share = rec["timing"]["cpu_share"]
    assert isinstance(share, float) and 0 < share < 1.5 and check_record(rec) == []
    assert contention_note([1.0, 0.98, 0.7]) == ""          # one slow record is not a pattern
    note = contention_note([0.66, 0.64, 0.9])
    assert "64%" not in note and "66%" in note and "2 of 3" in note and "inflated" in note
    assert contention_note([]) == ""                        # CUDA records: no share, no note
    busy = [{**rec, "timing": {**rec["timing"], "cpu_share": 0.6}} for _ in range(3)]
    print_summary(busy)
    assert "another program was using the cores" in capsys.readouterr().out
    print_summary([rec])
    assert ("another program" in capsys.readouterr().out) == (share < 0.85)
    # a results file of such records: `report` warns per file, and so does the Results tab
    from c2c_core.frontends.cli import main
    from c2c_core.io.records import write_all
    path = str(tmp_path / "busy.jsonl")
    write_all(path, [{**r, "id": i} for i, r in enumerate(busy)])
    assert main(["report", path]) == 0
    err = capsys.readouterr().err
    assert "Warning: busy.jsonl:" in err and "60%" in err, err
    pytest.importorskip("gradio")
    from c2c_core.frontends.ui.results_tab import check_notes
    notes = check_notes({"busy": busy, "calm": [rec] * 3 if share >= 0.85 else []})
    busy_notes = [n for n in notes if "CPU threads' time" in n]
    # one sentence for the view, naming the busy file and its share, not the calm one
    assert len(busy_notes) == 1 and "busy 60%" in busy_notes[0] and "calm" not in busy_notes[0]
    assert busy_notes[0].count(". ") == 0 and busy_notes[0].endswith(".")
    from c2c_core.report.summary import contention_files
    two = contention_files({"a.jsonl": [0.5, 0.6], "b.jsonl": [0.7], "c.jsonl": [1.0]})
    assert two.startswith("CPU times inflated in a.jsonl 55%, b.jsonl 70% (") and "c.jsonl" not in two
