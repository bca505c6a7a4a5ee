"""Records keyed by what ran (issue 15): every record carries the digest of its input and of
the settings that change its numbers; --resume keys on (input digest, mode, repeat) and refuses
a file made with other settings; compare pairs on the digest, refuses other prompts under the
same ids (exit 2) and calls a contended run inconclusive (exit 3); CLI output edges are refused
before any model loads."""

from __future__ import annotations

import json
import os

import pytest

from c2c_core.io import records
from c2c_core.frontends.cli import main
from c2c_core.io.records import check_record, read_records
from c2c_core.bench.sweep import parse_lengths
from conftest import HANG_S  # noqa: E402


@pytest.fixture()
def model_args(tiny_models):
    return ["--base_model", tiny_models["receiver"], "--teacher_model", tiny_models["sharer"],
            "--hidden_dim", "32", "--intermediate_dim", "32", "--device", "cpu",
            "--max_new_tokens", "3", "--warmup", "0"]


def _last_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err)
    line = err[-1]
    assert line.startswith("error: ") or "error: " in line, err
    return line


# --- digests -------------------------------------------------------------------------------

def test_digest_names_the_input_not_its_row():
    from c2c_core.io.prompts import PromptItem
    a, b = PromptItem(1, "alpha one"), PromptItem(7, "alpha one")
    assert a.digest == b.digest and len(a.digest) == 16
    assert PromptItem(1, "BETA one").digest != a.digest
    ids = PromptItem("in4-out3", "<4 synthetic tokens>", input_ids=[5, 6, 7, 8])
    other_shape = PromptItem("in4-out5", "<4 synthetic tokens>", input_ids=[5, 6, 7, 8])
    assert ids.digest != other_shape.digest  # a sweep's output length is part of what it ran


def test_records_carry_input_and_settings_digests(tmp_path, model_args):
    out = tmp_path / "o.jsonl"
    assert main(["batch", "--prompts", "alpha one", "alpha two", "--output", str(out),
                 "--dtype", "float32", *model_args]) == 0
    recs = read_records(out)
    assert all(check_record(r) == [] for r in recs)
    assert recs[0]["input_digest"] == records.digest_input("alpha one")
    st = recs[0]["run"]["settings"]
    assert st["dtype"] == "float32" and st["device"] == "cpu" and st["max_new_tokens"] == 3
    assert st["engine"] in ("eager", "fast") and "auto" not in json.dumps(st)
    assert recs[0]["run"]["settings_digest"] == records.settings_digest(st)
    bad = dict(recs[0], run={**recs[0]["run"], "settings_digest": "0" * 16})
    assert any("settings_digest" in p for p in check_record(bad))


# --- resume --------------------------------------------------------------------------------

def test_resume_with_other_prompts_runs_every_new_prompt(tmp_path, model_args, capsys):
    """The issue's case: ids are row positions, so id-keyed resume ran 1 of 3 new prompts."""
    out = tmp_path / "o.jsonl"
    assert main(["batch", "--prompts", "alpha one", "alpha two", "--output", str(out),
                 *model_args]) == 0
    assert main(["batch", "--prompts", "BETA one", "BETA two", "BETA three", "--output",
                 str(out), "--resume", *model_args]) == 0
    prompts = [r["prompt"] for r in read_records(out)]
    assert prompts == ["alpha one", "alpha two", "BETA one", "BETA two", "BETA three"]
    # and a resume of the same prompts now runs nothing more
    capsys.readouterr()
    assert main(["batch", "--prompts", "BETA one", "BETA two", "BETA three", "--output",
                 str(out), "--resume", *model_args]) == 0
    assert len(read_records(out)) == 5
    assert "Resuming: 5 record(s) already in" in capsys.readouterr().err


def test_resume_counts_a_prompt_listed_twice(tmp_path, model_args):
    out = tmp_path / "o.jsonl"
    assert main(["batch", "--prompts", "same", "--output", str(out), *model_args]) == 0
    assert main(["batch", "--prompts", "same", "other", "same", "--output", str(out),
                 "--resume", *model_args]) == 0
    assert sorted(r["prompt"] for r in read_records(out)) == ["other", "same", "same"]


def test_resume_with_another_dtype_is_refused_before_loading(tmp_path, model_args, capsys,
                                                              monkeypatch):
    out = tmp_path / "o.jsonl"
    assert main(["batch", "--prompts", "alpha", "--output", str(out), "--dtype", "float32",
                 *model_args]) == 0
    before = out.read_bytes()
    from c2c_core.models import loading
    monkeypatch.setattr(loading, "load_pipeline", lambda cfg: pytest.fail("models loaded"))
    capsys.readouterr()
    assert main(["batch", "--prompts", "alpha", "beta", "--output", str(out), "--resume",
                 "--dtype", "bfloat16", *model_args[:-4], "--max_new_tokens", "5",
                 "--warmup", "0"]) == 2
    line = _last_error(capsys)
    assert "other settings" in line and "dtype float32 in the file, bfloat16 now" in line
    assert "max_new_tokens 3 in the file, 5 now" in line and "--append" in line
    assert out.read_bytes() == before  # nothing written, nothing lost


# slow: two CLI runs and a report (~22 s under load);
# quick: the digest and resume tests here
@pytest.mark.slow
def test_append_with_other_settings_is_a_second_run_that_report_shows_apart(tmp_path,
                                                                             model_args, capsys):
    out = tmp_path / "o.jsonl"
    for dtype in ("float32", "bfloat16"):
        assert main(["batch", "--prompts", "alpha", "beta", "--mode", "all",
                     "--t2t_note_tokens", "2", "--output", str(out), "--dtype", dtype,
                     "--append", *model_args]) == 0
    assert len(read_records(out)) == 16
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    cap = capsys.readouterr()
    assert "holds 2 runs with different settings" in cap.err
    assert "o.jsonl [dtype float32]" in cap.out and "o.jsonl [dtype bfloat16]" in cap.out
    ratios = json.loads(cap.out.strip().splitlines()[-1])["ratios"]
    assert "c2c_over_receiver in o.jsonl [dtype float32]" in ratios
    assert "c2c_over_receiver in o.jsonl [dtype bfloat16]" in ratios


def test_older_files_without_digests_resume_by_id_with_a_note(tmp_path, model_args, capsys):
    out = tmp_path / "o.jsonl"
    assert main(["batch", "--prompts", "one", "two", "--output", str(out), *model_args]) == 0
    old = []
    for r in read_records(out):  # as an older version wrote them
        r.pop("input_digest")
        r["run"].pop("settings")
        r["run"].pop("settings_digest")
        old.append(r)
    records.write_all(out, old[:1])
    capsys.readouterr()
    assert main(["batch", "--prompts", "one", "two", "--output", str(out), "--resume",
                 *model_args]) == 0
    err = capsys.readouterr().err
    assert "1 record(s) in the file carry no input digest" in err and "matched by id" in err
    assert [r["prompt"] for r in read_records(out)] == ["one", "two"]


def test_sweep_resume_keys_on_the_shape(tmp_path, model_args):
    out = tmp_path / "s.jsonl"
    base = ["sweep", "--output_lens", "2", "--output", str(out), *model_args]
    assert main(base + ["--input_lens", "4"]) == 0
    assert main(base + ["--input_lens", "4 6", "--resume"]) == 0
    recs = read_records(out)
    assert [r["id"] for r in recs] == ["in4-out2", "in6-out2"]
    assert all(check_record(r) == [] for r in recs)
    assert recs[0]["run"]["settings"]["max_new_tokens"] is None  # the shape says it


# --- compare -------------------------------------------------------------------------------

def _recs(prompts, ms=10.0, share=None, with_digest=True):
    out = []
    for i, p in enumerate(prompts, start=1):
        for r in range(3):
            t = {"ttft_ms": ms * (1 + i / 10), "e2e_ms": 3 * ms, "decode_avg_ms": ms / 10,
                 "tokens_per_second": 100 / ms}
            if share is not None:
                t["cpu_share"] = share
            rec = {"id": i, "mode": "c2c", "repeat": r, "prompt": p, "timing": t,
                   "decode_step_times_ms": [ms / 10], "run": {"device": "cpu"}}
            if with_digest:
                rec["input_digest"] = records.digest_input(p)
            out.append(rec)
    return out


def _write(path, recs):
    records.write_all(path, recs)
    return str(path)


def _compare(capsys, a, b):
    code = main(["compare", a, b, "--min_pairs", "3"])
    cap = capsys.readouterr()
    return code, cap, json.loads(cap.out.strip().splitlines()[-1])


def test_compare_refuses_other_prompts_under_the_same_ids(tmp_path, capsys):
    a = _write(tmp_path / "a.jsonl", _recs(["p1", "p2", "p3", "p4"]))
    b = _write(tmp_path / "b.jsonl", _recs(["p1", "X2", "X3", "p4"]))
    code, cap, last = _compare(capsys, a, b)
    assert code == 2 and last["status"] == "cannot_compare"
    assert "2 of the 4 prompt id(s) found in both" in last["reason"]
    assert "different prompts" in last["reason"]
    # older files (no digests) are told apart by their prompt text the same way
    a = _write(tmp_path / "a0.jsonl", _recs(["p1", "p2"], with_digest=False))
    b = _write(tmp_path / "b0.jsonl", _recs(["p1", "Q"], with_digest=False))
    code, _, last = _compare(capsys, a, b)
    assert code == 2 and "1 of the 2 prompt id(s)" in last["reason"]


def test_compare_pairs_the_same_prompts_under_other_ids(tmp_path, capsys):
    a_recs = _recs(["p1", "p2", "p3", "p4"])
    b_recs = [dict(r, id=r["id"] + 100, timing=dict(r["timing"], ttft_ms=r["timing"]["ttft_ms"]
                                                    * 1.5)) for r in a_recs]
    a, b = _write(tmp_path / "a.jsonl", a_recs), _write(tmp_path / "b.jsonl", b_recs)
    code, cap, last = _compare(capsys, a, b)
    assert code == 1 and last["paired_by"] == "input_digest"
    assert last["pairs"] == {"c2c": 12} and "c2c ttft_ms" in last["regressions"]


def test_compare_on_a_contended_run_is_inconclusive_never_a_regression(tmp_path, capsys):
    a = _write(tmp_path / "a.jsonl", _recs(["p1", "p2", "p3", "p4"], share=0.99))
    b = _write(tmp_path / "b.jsonl", _recs(["p1", "p2", "p3", "p4"], ms=20.0, share=0.61))
    code, cap, last = _compare(capsys, a, b)
    assert code == 3 and last["status"] == "inconclusive" and last["regressions"] == []
    assert "inconclusive: CPU contention" in last["reason"] and "0.61" in last["reason"]
    assert "REGRESSION" not in cap.out and "INCONCLUSIVE" in cap.out
    verdicts = {m["verdict"] for m in last["metrics"]["c2c"].values()}
    assert verdicts == {"inconclusive: CPU contention"}
    # the same files without contention: the slowdown is a regression
    b2 = _write(tmp_path / "b2.jsonl", _recs(["p1", "p2", "p3", "p4"], ms=20.0, share=0.97))
    assert _compare(capsys, a, b2)[0] == 1


def test_results_tab_compare_follows_the_same_rules():
    from c2c_core.report import analysis
    from c2c_core.frontends.ui.results_tab import compare_table
    a = analysis.to_frame(_recs(["p1", "p2", "p3", "p4"] * 2, share=0.99), "a")
    b = analysis.to_frame(_recs(["p1", "p2", "p3", "p4"] * 2, ms=20.0, share=0.6), "b")
    t = compare_table(a, b)
    assert set(t["verdict"]) == {"inconclusive: CPU contention"}
    assert set(t["regression"]) == {"n/a"}
    other = analysis.to_frame(_recs(["p1", "Q2", "Q3", "p4"] * 2, share=0.99), "c")
    t = compare_table(a, other)
    assert len(t) == 1 and "cannot compare" in t["verdict"].iloc[0]
    assert "4 of the 8 prompt id(s)" in t["verdict"].iloc[0]


# --- CLI edges -----------------------------------------------------------------------------

def test_empty_output_is_refused_before_loading(capsys, no_model_load):
    assert main(["batch", "--output", ""]) == 2
    assert "--output is empty" in _last_error(capsys)
    assert main(["profile", "--output", " "]) == 2
    assert "--output is empty" in _last_error(capsys)


def test_fifo_output_is_refused_before_loading(tmp_path, capsys, no_model_load):
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    assert main(["batch", "--output", str(fifo)]) == 2
    assert "is not a regular file" in _last_error(capsys)


def test_unwritable_sweep_html_is_refused_before_the_sweep(tmp_path, capsys, no_model_load):
    (tmp_path / "f.txt").write_text("x")
    assert main(["sweep", "--input_lens", "4", "--output", str(tmp_path / "s.jsonl"),
                 "--html", str(tmp_path / "f.txt" / "plot.html")]) == 2
    assert "is not a folder; fix the --html path" in _last_error(capsys)
    assert main(["sweep", "--input_lens", "4", "--output", str(tmp_path / "s.jsonl"),
                 "--html", str(tmp_path)]) == 2
    assert "give a file name for --html" in _last_error(capsys)
    assert not os.path.exists(tmp_path / "s.jsonl")


def test_lengths_take_commas_and_spaces_alike():
    assert parse_lengths("16 32", "--input_lens") == [16, 32]
    assert parse_lengths("16, 32,64", "--input_lens") == [16, 32, 64]
    assert parse_lengths(" 8 ", "--input_lens") == [8]
    from c2c_core.spec.errors import UserError
    with pytest.raises(UserError, match="whole numbers separated by commas or spaces"):
        parse_lengths("16;32", "--input_lens")


def test_other_prompts_under_one_id_are_not_duplicates():
    """A file resumed with another prompt file holds id 1 twice, for two prompts: no copies."""
    from c2c_core.report import analysis
    recs = _recs(["alpha"]) + _recs(["BETA"])
    assert analysis.duplicates_note(analysis.to_frame(recs, "o.jsonl")) == ""
    copy = _recs(["alpha"]) * 2
    assert "occur more than once" in analysis.duplicates_note(analysis.to_frame(copy, "o.jsonl"))


def test_a_sweep_that_cannot_fit_is_refused_before_loading(tmp_path, capsys, no_model_load):
    """sweep --batch_sizes 1024 --input_lens 7000 sat for minutes on a CPU; the memory estimate
    (weights + KV cache from the models' configs) refuses it at once, naming both."""
    import time
    t = time.monotonic()
    assert main(["sweep", "--engine", "fast", "--batch_sizes", "1024", "--input_lens", "7000",
                 "--output", str(tmp_path / "s.jsonl")]) == 2
    assert time.monotonic() - t < HANG_S  # a hang guard; no_model_load: before loading
    line = _last_error(capsys)
    assert "needs about" in line and "KV cache" in line and "1,024 x 7,032 tokens" in line
    assert "this machine" in line and not os.path.exists(tmp_path / "s.jsonl")
