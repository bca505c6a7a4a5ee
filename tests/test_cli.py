"""`python -m c2c_core` end to end on the tiny pair: files written and valid, sharding, errors."""

from __future__ import annotations

import csv
import gzip
import json
import subprocess
import sys
import time

import pytest

from c2c_core.frontends.cli import main
from c2c_core.io.records import check_record, read_records
from conftest import HANG_S  # noqa: E402


@pytest.fixture()
def model_args(tiny_models):
    return ["--base_model", tiny_models["receiver"], "--teacher_model", tiny_models["sharer"],
            "--hidden_dim", "32", "--intermediate_dim", "32", "--device", "cpu",
            "--max_new_tokens", "6", "--warmup", "1"]


def test_profile_writes_jsonl_tsv_trace_and_stats(tmp_path, model_args, capsys):
    out = tmp_path / "prof.jsonl"
    assert main(["profile", "--prompt", "What is 25 * 17?", "--output", str(out), "--trace_gz",
                 *model_args]) == 0
    [rec] = read_records(out)
    assert check_record(rec) == [] and rec["prompt"] == "What is 25 * 17?"
    with open(tmp_path / "prof.tsv") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    stages = {r["field"]: float(r["ms"]) for r in rows}
    assert stages["projector_total_ms"] == pytest.approx(rec["timing"]["projector_total_ms"], abs=1e-3)
    assert stages["e2e_ms"] == pytest.approx(rec["timing"]["e2e_ms"], abs=1e-3)
    with gzip.open(tmp_path / "prof_trace.json.gz", "rt") as f:
        trace = json.load(f)
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"c2c/base_prefill", "c2c/teacher_prefill", "c2c/projection", "c2c/decode"} <= names
    stats = json.loads((tmp_path / "prof_stats.json").read_text())
    assert stats["top_ops_by_self_cpu"] and stats["stages"]["projection"]["count"] == 2
    assert "Wrote" in capsys.readouterr().out


def test_profile_without_output_uses_the_seed_names(tmp_path, model_args, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["profile", *model_args]) == 0
    for name in ("demo_timing_data.jsonl", "demo_timing_data.tsv", "demo_profiler_trace.json",
                 "demo_profiler_stats.json"):
        assert (tmp_path / name).stat().st_size > 0
    json.loads((tmp_path / "demo_profiler_trace.json").read_text())


def test_batch_builtin_prompts_overwrite_append_resume(tmp_path, model_args, capsys):
    out = tmp_path / "b.jsonl"
    assert main(["batch", "--output", str(out), *model_args]) == 0
    recs = read_records(out)
    assert [r["id"] for r in recs] == [1, 2, 3, 4, 5]
    assert all(check_record(r) == [] for r in recs)
    assert "decode ms/token p50" in capsys.readouterr().out  # the summary table
    assert main(["batch", "--output", str(out), "--prompts", "one", "two", *model_args]) == 0
    assert len(read_records(out)) == 2  # overwritten
    assert main(["batch", "--output", str(out), "--append", "--prompts", "x", *model_args]) == 0
    assert len(read_records(out)) == 3
    assert main(["batch", "--output", str(out), "--resume", *model_args]) == 0
    # resume keys on what ran (the input digest), not the row id: "one", "two", "x" are not
    # the built-in prompts 1 and 2, so all five built-ins run
    assert [r["id"] for r in read_records(out)] == [1, 2, 1, 1, 2, 3, 4, 5]
    assert main(["batch", "--output", str(out), "--resume", *model_args]) == 0
    assert len(read_records(out)) == 8  # all done: nothing runs twice


def test_dataset_shards_cover_every_sample_once(tmp_path, model_args):
    src = tmp_path / "p.jsonl"
    src.write_text("".join(json.dumps({"id": f"q{i}", "question": f"What is {i} + {i}?",
                                       "answer": str(2 * i)}) + "\n" for i in range(5)))
    outs = []
    for i in range(2):
        out = tmp_path / f"s{i}.jsonl"
        assert main(["dataset", "--dataset_file", str(src), "--shard", f"{i}/2",
                     "--output", str(out), *model_args]) == 0
        outs += read_records(out)
    assert [r["id"] for r in outs] == [f"q{i}" for i in range(5)]
    assert all(check_record(r) == [] for r in outs)
    assert all("correct" in r and r["answer"] == str(2 * int(r["id"][1:])) for r in outs)
    out = tmp_path / "o.jsonl"
    assert main(["dataset", "--dataset_file", str(src), "--offset", "1", "--num_samples", "2",
                 "--output", str(out), *model_args]) == 0
    assert [r["id"] for r in read_records(out)] == ["q1", "q2"]


def test_mode_all_writes_each_mode_per_prompt(tmp_path, model_args):
    out = tmp_path / "all.jsonl"
    assert main(["batch", "--prompts", "Say hi", "--mode", "all", "--output", str(out),
                 "--t2t_note_tokens", "4", *model_args]) == 0
    recs = read_records(out)
    assert [r["mode"] for r in recs] == ["c2c", "receiver", "sharer", "t2t"]
    assert all(check_record(r) == [] for r in recs)
    t2t = recs[3]["timing"]
    assert t2t["sharer_generated_tokens"] >= 1 and t2t["teacher_prefill_ms"] > 0
    assert recs[2]["timing"]["base_prefill_ms"] == 0 and recs[2]["timing"]["teacher_prefill_ms"] > 0


@pytest.mark.parametrize("argv, message", [
    (["batch", "--preset", "nope"], "Unknown preset 'nope'"),
    (["profile", "--prompt", "  "], "prompt is empty"),
    (["batch", "--max_new_tokens", "0"], "max_new_tokens=0 is out of range"),
    (["dataset", "--dataset_file", "/no/such.jsonl"], "/no/such.jsonl"),
    (["batch", "--base_model", "./no/such/dir"], "does not exist"),
    (["dataset", "--dataset", "gsm8k"], "gsm8k"),
])
def test_input_errors_exit_nonzero_with_one_line(argv, message, tmp_path, capsys):
    t = time.monotonic()
    assert main(argv + ["--output", str(tmp_path / "x.jsonl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]
    assert "Traceback" not in "\n".join(err)
    assert time.monotonic() - t < HANG_S  # a hang guard only (the machine may be loaded)


def test_malformed_line_is_named_and_can_be_skipped(tmp_path, model_args, capsys):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": oops}\n{"prompt": "d"}\n')
    out = tmp_path / "o.jsonl"
    assert main(["dataset", "--dataset_file", str(src), "--output", str(out), *model_args]) == 2
    assert "line 3" in capsys.readouterr().err
    assert main(["dataset", "--dataset_file", str(src), "--skip_bad_lines", "--output", str(out),
                 *model_args]) == 0
    assert [r["prompt"] for r in read_records(out)] == ["a", "b", "d"]


def test_module_entry_point_runs(tmp_path, model_args):
    out = tmp_path / "m.jsonl"
    p = subprocess.run([sys.executable, "-m", "c2c_core", "batch", "--prompts", "hi", "--output",
                        str(out), *model_args], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert len(read_records(out)) == 1


def test_skipped_rows_are_reported(tmp_path, model_args, capsys):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"prompt": "a"}\n{"prompt": oops}\n{"prompt": ""}\n{"prompt": "d"}\n')
    out = tmp_path / "o.jsonl"
    assert main(["dataset", "--dataset_file", str(src), "--skip_bad_lines", "--output", str(out),
                 *model_args]) == 0
    assert "Skipped 2 malformed row(s): line 2, row 2." in capsys.readouterr().err


def _report(tmp_path, capsys, recs):
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert main(["report", str(path)]) == 0
    return capsys.readouterr().out


def test_report_prints_the_statistic_it_names(tmp_path, capsys):
    """Per-prompt ratios 0.01, 1.25, 1.5: the line says "median of the per-prompt ratios" and
    shows 1.25, not the ratio of medians 0.5 on the other side of 1."""
    from test_analysis import skewed_records
    out = _report(tmp_path, capsys, skewed_records())
    line = next(x for x in out.splitlines() if x.startswith("c2c over t2t:"))
    assert line.startswith("c2c over t2t: TTFT 1.25, ")
    assert line.endswith("(median of the per-prompt ratios, n=3 pair(s) matched by id and"
                         " repeat; below 1 = c2c faster)")
    r = json.loads(out.strip().splitlines()[-1])["ratios"]["c2c_over_t2t"]
    assert r["ttft_ms"] == 1.25 and r["stat"] == "median of per-pair ratios" and r["n"] == 3


def test_report_without_answers_has_no_accuracy_column(tmp_path, capsys):
    from test_analysis import rec
    recs = [rec(str(i), m) for i in range(2) for m in ("c2c", "receiver")]
    out = _report(tmp_path, capsys, recs)
    table = out.split("c2c over receiver")[0]
    assert "NaN" not in table and "accuracy" not in table and "n_scored" not in table
    # scored in one mode only: its accuracy shows, the other mode's is blank, not NaN
    recs = [rec(str(i), "c2c", correct=i == 0) for i in range(2)]
    recs += [rec(str(i), "receiver") for i in range(2)]
    out = _report(tmp_path, capsys, recs)
    table = out.split("c2c over receiver")[0]
    assert "accuracy" in table and "NaN" not in table and " 0.5 " in table
