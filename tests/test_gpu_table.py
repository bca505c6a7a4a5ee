"""scripts/gpu_table.py, the table gpu_check.sh ends with (issue 19 part 6), on canned files: the
rows come from the engines JSON line, the 1,024-token sweep records and the compile check; the
met column compares the fast engine with the issue's goals; the reference is "n/a" without a
clone; the printed table and gpu_check.json hold the same numbers. Also the script's refusal
without a GPU (one sentence, exit 2)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys

import pytest

from conftest import run_group

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("gpu_table", os.path.join(ROOT, "scripts", "gpu_table.py"))
gt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gt)

ENGINES = {"device": "cuda", "dtype": "bfloat16", "engine_fast": "compiled", "repeats": 3,
           "max_new_tokens": 128, "compile_s": 90.7, "ttft_ratio": 0.825,
           "projection_ratio": 0.079, "decode_ratio": 0.087, "e2e_ratio": 0.1, "batch": 64,
           "batch64_over_batch1_tokens_per_second": 41.25, "eager_decode_ms": 25.4,
           "fast_decode_ms": 0.91234, "eager_ttft_ms": 120.0, "fast_ttft_ms": 99.0,
           "eager_projection_ms": 39.5, "fast_projection_ms": 0.47, "prompt_tokens": 17,
           "decode_floor_ms": 0.25, "fast_decode_floor_ratio": 3.65,
           "eager_decode_floor_ratio": 101.6, "compile_cache": "cold"}
COMPILE = {"preset": gt.PRESET, "first_s": 88.0, "second_s": 44.0, "first_state": "cold",
           "second_state": "warm", "ratio": 0.5, "cache": "/tmp/x"}


def _rec(mode, ttft, prompt_tokens=1024, id_="in1024-out8"):
    return {"id": id_, "mode": mode, "timing": {"ttft_ms": ttft, "decode_avg_ms": 1.0,
                                                "projector_total_ms": 0.4,
                                                "prompt_tokens": prompt_tokens}}


def _write(out, engines=True, compile_=True, long=True):
    os.makedirs(out, exist_ok=True)
    if engines:  # the table lines `engines` prints before its JSON line, as captured
        with open(os.path.join(out, "engines.json"), "w") as f:
            f.write("device: cuda:0 (...)\nmetric   eager  fast\n" + json.dumps(ENGINES) + "\n")
    if compile_:
        with open(os.path.join(out, "compile_cache.json"), "w") as f:
            f.write("first process: compile 88.0 s\n" + json.dumps(COMPILE) + "\n")
    if long:
        for e, ttfts in (("fast", [30.0, 35.0, 50.0]), ("eager", [300.0, 310.0, 320.0])):
            with open(os.path.join(out, f"long-{e}.jsonl"), "w") as f:
                for t in ttfts:
                    f.write(json.dumps(_rec("c2c", t)) + "\n")
                f.write(json.dumps(_rec("receiver", 1.0)) + "\n")  # another mode: not counted


def _rows(table):
    return {r["key"]: r for r in table["rows"]}


def test_rows_goals_and_met(tmp_path):
    out = str(tmp_path / "out")
    _write(out)
    rows = _rows(gt.build(out, None))
    assert list(rows) == [k for k, _, _ in gt.ROWS]
    d = rows["decode_ms"]
    assert (d["fast"], d["eager"], d["goal"], d["met"]) == (0.912, 25.4, "<= 1", "yes")
    p = rows["projection_ms"]
    assert (p["fast"], p["eager"], p["met"]) == (0.47, 39.5, "yes")
    t = rows["ttft_ms"]
    assert (t["fast"], t["eager"], t["goal"], t["met"]) == (99.0, 120.0, "<= 15", "no")
    assert "17-token" in t["figure"]
    long = rows["ttft_1024_ms"]  # medians of the c2c records only
    assert (long["fast"], long["eager"], long["goal"], long["met"]) == (35.0, 310.0, "<= 40", "yes")
    c1 = rows["compile_first_s"]  # the compile check's cold first process, not engines' compile_s
    assert (c1["fast"], c1["eager"], c1["goal"], c1["met"]) == (88.0, None, "none", "n/a")
    c2 = rows["compile_second_ratio"]
    assert (c2["fast"], c2["goal"], c2["met"]) == (0.5, "<= 0.35", "no")
    b = rows["batch_ratio"]
    assert (b["fast"], b["goal"], b["met"]) == (41.25, ">= 40", "yes")
    assert b["figure"].startswith("batch 64 vs batch 1")
    f = rows["decode_floor_ratio"]
    assert (f["fast"], f["eager"], f["met"]) == (3.65, 101.6, "n/a")
    for k in ("capture_decode_ms", "capture_ttft_ms", "capture_warmup_s"):
        assert rows[k]["fast"] is None and rows[k]["met"] == "n/a"  # no capture run: n/a


def test_the_captured_step_rows_come_from_their_own_engines_run(tmp_path):
    out = str(tmp_path / "out")
    _write(out)
    cap = {**ENGINES, "engine_fast": "fast-capture", "fast_step": "capture", "compile_s": 4.2,
           "fast_decode_ms": 1.31, "fast_ttft_ms": 9.5}
    with open(os.path.join(out, "engines-capture.json"), "w") as f:
        f.write("device: cuda:0 (...)\n" + json.dumps(cap) + "\n")
    table = gt.build(out, None)
    rows = _rows(table)
    d, t, w = rows["capture_decode_ms"], rows["capture_ttft_ms"], rows["capture_warmup_s"]
    assert (d["fast"], d["goal"], d["met"]) == (1.31, "<= 1", "no")
    assert (t["fast"], t["met"]) == (9.5, "yes") and (w["fast"], w["met"]) == (4.2, "n/a")
    assert rows["decode_ms"]["fast"] == 0.912  # the compiled step's row is unchanged
    assert table["sources"]["capture_decode_ms.fast"].startswith("engines-capture.json")


def test_missing_reference_and_missing_runs_are_na(tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    _write(out, compile_=False, long=False)
    # a reference.json without a clone is not read: the column stays n/a
    with open(os.path.join(out, "reference.json"), "w") as f:
        json.dump({"decode_ms": 33.4}, f)
    assert gt.find_reference(str(tmp_path / "nope"), root=str(tmp_path / "repo")) is None
    table = gt.build(out, None)
    rows = _rows(table)
    assert all(r["reference"] is None for r in table["rows"])
    assert rows["ttft_1024_ms"]["fast"] is None and rows["ttft_1024_ms"]["met"] == "n/a"
    assert rows["compile_second_ratio"]["met"] == "n/a"
    # without the compile check, the first compile is engines' compile_s
    assert rows["compile_first_s"]["fast"] == 90.7
    text = gt.render(table)
    assert "reference: n/a" in text
    for line in text.splitlines()[2:2 + len(gt.ROWS)]:
        assert line.split("|")[5].strip() == "n/a"  # the reference column


def test_reference_figures_when_a_clone_is_present(tmp_path):
    out = str(tmp_path / "out")
    _write(out)
    clone = tmp_path / "C2C"
    clone.mkdir()
    assert gt.find_reference(None, root=str(tmp_path / "repo")) == str(clone)  # ../C2C
    assert gt.find_reference(str(clone), root="/nonexistent") == str(clone)   # $C2C_REF
    with open(os.path.join(out, "reference.json"), "w") as f:
        json.dump({"decode_ms": 33.4, "projection_ms": 38.4, "ttft_ms": 128.0}, f)
    rows = _rows(gt.build(out, str(clone)))
    assert (rows["decode_ms"]["reference"], rows["ttft_ms"]["reference"]) == (33.4, 128.0)
    assert rows["batch_ratio"]["reference"] is None


def test_short_figures_fall_back_to_batch_records(tmp_path):
    out = str(tmp_path / "out")
    _write(out, engines=False)
    with open(os.path.join(out, f"fast-{gt.PRESET}.jsonl"), "w") as f:
        f.write(json.dumps(_rec("c2c", 12.0, 17, "1")) + "\n")
    rows = _rows(gt.build(out, None))
    assert (rows["ttft_ms"]["fast"], rows["ttft_ms"]["met"]) == (12.0, "yes")
    assert rows["ttft_ms"]["eager"] is None and rows["batch_ratio"]["fast"] is None


def test_printed_table_equals_json_file(tmp_path, capsys):
    out = str(tmp_path / "out")
    _write(out)
    assert gt.main([out]) == 0
    printed = capsys.readouterr().out.splitlines()
    saved = json.load(open(os.path.join(out, "gpu_check.json")))
    body = printed[2:2 + len(gt.ROWS)]
    assert len(saved["rows"]) == len(body) == len(gt.ROWS)
    for line, row in zip(body, saved["rows"]):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert cells[0] == row["figure"] and cells[1] == row["goal"] and cells[5] == row["met"]
        for cell, key in zip(cells[2:5], ("fast", "eager", "reference")):
            assert (None if cell == "n/a" else float(cell)) == row[key], (row["key"], key)


def test_dry_run_prints_the_table_from_existing_files(tmp_path):
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    out = str(tmp_path / "out")
    _write(out)
    env = {**os.environ, "OUT": out, "GPU_CHECK_DRY": "1", "PYTHON": sys.executable}
    r = run_group([bash, "scripts/gpu_check.sh"], cwd=ROOT, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "decode ms/token (batch 1)" in r.stdout and os.path.exists(os.path.join(out, "gpu_check.json"))


def test_refuses_without_a_gpu(tmp_path):
    bash = shutil.which("bash")
    if bash is None or shutil.which("nvidia-smi"):
        pytest.skip("needs a machine without nvidia-smi")
    env = {**os.environ, "OUT": str(tmp_path / "out")}
    env.pop("GPU_CHECK_DRY", None)
    r = run_group([bash, "scripts/gpu_check.sh"], cwd=ROOT, env=env, timeout=60)
    assert r.returncode == 2
    msg = (r.stdout + r.stderr).strip()
    assert len(msg.splitlines()) == 1 and "GPU" in msg, msg


def test_the_engines_json_line_feeds_the_table(tiny_pipe, tmp_path, monkeypatch):
    """The real `engines` JSON line (tiny models, CPU) carries every number the table reads."""
    from dataclasses import replace

    from c2c_core.bench.compare_engines import engines_bench
    from c2c_core.engines import compile_cache, fast
    monkeypatch.setenv("C2C_CACHE", str(tmp_path / "c2c"))
    monkeypatch.delenv(compile_cache.ENV, raising=False)
    pipe, cfg = tiny_pipe
    fast.engine_for(pipe, compile=False)
    lines = []
    res = engines_bench(pipe, replace(cfg, gen=replace(cfg.gen, max_new_tokens=4)), repeats=3,
                        batch=2, out=lines.append)
    out = tmp_path / "out"
    out.mkdir()
    (out / "engines.json").write_text("\n".join(lines) + "\n")
    rows = _rows(gt.build(str(out), None))
    for key, e in (("decode_ms", "fast"), ("decode_ms", "eager"), ("ttft_ms", "fast"),
                   ("ttft_ms", "eager"), ("projection_ms", "fast"), ("projection_ms", "eager")):
        want = res[f"{e}_{key}"]
        assert want is not None and rows[key][e] == round(want, 3), (key, e)
    assert rows["batch_ratio"]["fast"] == round(res["batch2_over_batch1_tokens_per_second"], 3)
    assert rows["batch_ratio"]["figure"].startswith("batch 2 vs batch 1")
    assert rows["compile_first_s"]["fast"] == res["compile_s"]
    assert rows["decode_floor_ratio"]["fast"] is None  # null on a CPU: n/a, not a guess
    assert rows["ttft_ms"]["figure"] == f"TTFT ms, {res['prompt_tokens']}-token prompt"
