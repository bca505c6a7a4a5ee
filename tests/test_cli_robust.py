"""The CLI without tracebacks: every bad environment or input is one sentence and exit 2, with
the records already written kept; output locks; SIGTERM like Ctrl-C; a cache that N processes
can fill at once."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from c2c_core.io import fileio, records
from c2c_core.frontends.cli import main
from c2c_core.spec.errors import UserError
from c2c_core.io.records import check_record, read_records
from conftest import HANG_S  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture()
def model_args(tiny_models):
    return ["--base_model", tiny_models["receiver"], "--teacher_model", tiny_models["sharer"],
            "--hidden_dim", "32", "--intermediate_dim", "32", "--device", "cpu",
            "--max_new_tokens", "4", "--warmup", "0"]


def one_line_error(capsys, *expected: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    assert err and "error: " in err[-1], err
    line = err[-1][err[-1].index("error: "):]  # (a progress bar may share the line)
    for e in expected:
        assert e in line, line
    return line


# --- writing -------------------------------------------------------------------------------

def test_disk_full_mid_run_keeps_the_records_written(tmp_path, model_args, capsys, monkeypatch):
    real_open = open

    class FillsUp:
        """A file that takes two records, then says ENOSPC like a full disk."""

        def __init__(self, f):
            self.f, self.lines = f, 0

        def write(self, s):
            if self.lines >= 2:
                self.f.write(s[:10])  # half a line reaches the disk, as it may for real
                raise OSError(errno.ENOSPC, "No space left on device")
            self.lines += 1
            return self.f.write(s)

        def __getattr__(self, name):
            return getattr(self.f, name)

    def fake_open(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        return FillsUp(f) if "w" in mode or "a" in mode else f

    monkeypatch.setattr(records, "open", fake_open, raising=False)
    out = tmp_path / "o.jsonl"
    assert main(["batch", "--output", str(out), *model_args]) == 2
    one_line_error(capsys, "The disk is full", str(out), "the 2 record(s) written before are"
                   " kept", "--resume")
    monkeypatch.undo()
    recs = read_records(out)  # the cut tail is skipped; the two records are whole
    assert [r["id"] for r in recs] == [1, 2] and all(check_record(r) == [] for r in recs)
    # --resume drops the cut tail and goes on
    assert main(["batch", "--resume", "--output", str(out), *model_args]) == 0
    assert [r["id"] for r in read_records(out)] == [1, 2, 3, 4, 5]


def test_device_output_is_refused_before_loading(capsys, no_model_load):
    """/dev/full (a device, like a FIFO) is no results file: refused before any model loads;
    a disk that fills mid-run is test_disk_full_mid_run_keeps_the_records_written."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    assert main(["batch", "--prompts", "hi", "--output", "/dev/full"]) == 2
    one_line_error(capsys, "/dev/full is not a regular file")


def test_unwritable_output_is_found_before_models_load(tmp_path, capsys, no_model_load,
                                                       monkeypatch):
    real_open = open

    def read_only(path, mode="r", *a, **k):
        if str(path).startswith(str(tmp_path)) and ("a" in mode or "w" in mode):
            raise PermissionError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr(fileio, "open", read_only, raising=False)
    t = time.monotonic()
    assert main(["batch", "--output", str(tmp_path / "o.jsonl")]) == 2
    assert time.monotonic() - t < HANG_S  # a hang guard; no_model_load: before any load
    one_line_error(capsys, "read-only", "pick another --output")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="root writes into read-only folders")
def test_read_only_folder_for_real(tmp_path, capsys, no_model_load):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert main(["batch", "--output", str(ro / "o.jsonl")]) == 2
    finally:
        ro.chmod(0o700)
    one_line_error(capsys, "read-only")


@pytest.mark.parametrize("argv_tail, message", [
    (["--output", "{tmp}"], "is a folder; give a file name for --output"),
    (["--output", "{tmp}/f.txt/o.jsonl"], "is not a folder"),
])
def test_bad_output_paths(argv_tail, message, tmp_path, capsys, no_model_load):
    (tmp_path / "f.txt").write_text("x")
    argv = ["batch"] + [a.format(tmp=tmp_path) for a in argv_tail]
    assert main(argv) == 2
    one_line_error(capsys, message)


def test_a_second_run_on_a_locked_output_refuses(tmp_path, capsys, no_model_load):
    out = tmp_path / "o.jsonl"
    out.write_text("")
    with fileio.OutputLock(str(out)):  # another run holds the file
        for flags in (["--resume"], ["--append"], []):
            t = time.monotonic()
            assert main(["batch", "--output", str(out), *flags]) == 2
            assert time.monotonic() - t < HANG_S  # a hang guard: it does not wait for the lock
            one_line_error(capsys, f"{out} is being written by another run")
    assert out.read_text() == ""  # nothing truncated or appended by the refused runs


def test_the_lock_is_released_after_a_run(tmp_path, model_args):
    out = tmp_path / "o.jsonl"
    assert main(["batch", "--prompts", "a", "--output", str(out), *model_args]) == 0
    assert main(["batch", "--prompts", "b", "--append", "--output", str(out), *model_args]) == 0
    assert len(read_records(out)) == 2
    with fileio.OutputLock(str(out)):  # free again
        pass


def test_profile_checks_its_output_before_loading(tmp_path, capsys, no_model_load):
    (tmp_path / "p.jsonl").mkdir()
    assert main(["profile", "--output", str(tmp_path / "p.jsonl")]) == 2
    one_line_error(capsys, "is a folder")


# --- reading -------------------------------------------------------------------------------

def test_report_on_a_folder(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    one_line_error(capsys, f"{tmp_path} is a folder, not a JSONL file", "*.jsonl")


def test_results_with_list_and_dict_ids_report_without_traceback(tmp_path, capsys):
    from conftest import SEED_RECORD
    f = tmp_path / "r.jsonl"
    f.write_text("".join(json.dumps(dict(SEED_RECORD, id=i, mode=m)) + "\n"
                         for i, m in (([1, 2], "c2c"), ([1, 2], "receiver"), ({"a": 1}, "c2c"))))
    assert main(["report", str(f)]) == 0
    assert main(["compare", str(f), str(f)]) == 2  # 2 pairs: too few to judge, one sentence
    assert "Traceback" not in capsys.readouterr().err


def test_prompt_file_with_a_list_id_is_one_sentence(tmp_path, capsys, no_model_load):
    src = tmp_path / "p.jsonl"
    src.write_text(json.dumps({"id": [1, 2], "prompt": "hi"}) + "\n")
    assert main(["dataset", "--dataset_file", str(src), "--output", str(tmp_path / "o.jsonl")]) == 2
    one_line_error(capsys, "row 1 has an id that is a list")


def test_report_flags_duplicate_keys(tmp_path, capsys):
    from conftest import SEED_RECORD
    f = tmp_path / "r.jsonl"
    recs = [dict(SEED_RECORD, id=1, mode="c2c", repeat=0), dict(SEED_RECORD, id=2, mode="c2c"),
            dict(SEED_RECORD, id=1, mode="c2c", repeat=0)]
    f.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert main(["report", str(f)]) == 0
    err = capsys.readouterr().err
    assert "Warning: 1 (id, mode, repeat) key(s) occur more than once (r.jsonl: id 1 c2c" \
           " repeat 0 x2)" in err
    f.write_text("".join(json.dumps(r) + "\n" for r in recs[:2]))
    assert main(["report", str(f)]) == 0
    assert "more than once" not in capsys.readouterr().err


def test_base_model_folder_that_is_not_a_model(tmp_path, capsys, no_model_load):
    assert main(["batch", "--base_model", str(tmp_path), "--output", str(tmp_path / "o.jsonl")]) == 2
    one_line_error(capsys, f"Receiver model folder {tmp_path} has no config.json")


def test_model_folder_without_weights(tmp_path, tiny_models, capsys):
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(tiny_models["receiver"], broken)
    for f in broken.glob("*.safetensors"):
        f.unlink()
    assert main(["batch", "--base_model", str(broken), "--teacher_model", tiny_models["sharer"],
                 "--device", "cpu", "--output", str(tmp_path / "o.jsonl")]) == 2
    one_line_error(capsys, f"could not be loaded from the folder {broken}")


def test_undecodable_input_names_the_line_and_encoding_reads_it(tmp_path, model_args, capsys):
    src = tmp_path / "latin.jsonl"
    src.write_bytes('{"prompt": "plain"}\n{"prompt": "caf\u00e9 au lait"}\n'.encode("latin-1"))
    out = tmp_path / "o.jsonl"
    assert main(["dataset", "--dataset_file", str(src), "--output", str(out), *model_args]) == 2
    one_line_error(capsys, "latin.jsonl line 2 is not valid utf-8", "--encoding latin-1")
    assert main(["dataset", "--dataset_file", str(src), "--encoding", "latin-1", "--output",
                 str(out), *model_args]) == 0
    assert [r["prompt"] for r in read_records(out)] == ["plain", "caf\u00e9 au lait"]
    assert main(["dataset", "--dataset_file", str(src), "--encoding", "klingon", "--output",
                 str(out), *model_args]) == 2
    one_line_error(capsys, "--encoding klingon is not an encoding")


def test_undecodable_csv_names_the_line(tmp_path):
    from c2c_core.io.prompts import load_prompt_file
    src = tmp_path / "p.csv"
    src.write_bytes("prompt\nfine\nna\u00efve\n".encode("cp1252"))
    with pytest.raises(UserError, match="p.csv line 3 is not valid utf-8"):
        load_prompt_file(src)
    assert [i.prompt for i in load_prompt_file(src, encoding="cp1252")] == ["fine", "na\u00efve"]


# --- signals and concurrent runs (real processes) ---------------------------------------------

def _wait_for_records(path, n, proc, timeout=240):
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        if os.path.exists(path) and len(read_records(path)) >= n:
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended early: {proc.communicate()}")
        time.sleep(0.2)
    pytest.fail("no records appeared")


# slow: a CLI subprocess run to its SIGTERM (~1 min under load);
# quick: the output lock tests here, test_cancel's kept records
@pytest.mark.slow
def test_sigterm_is_like_ctrl_c_and_the_output_is_locked_meanwhile(tmp_path, tiny_models, capsys):
    out = tmp_path / "o.jsonl"
    argv = [sys.executable, "-m", "c2c_core", "batch", "--output", str(out),
            "--base_model", tiny_models["receiver"], "--teacher_model", tiny_models["sharer"],
            "--hidden_dim", "32", "--intermediate_dim", "32", "--device", "cpu", "--warmup", "0",
            "--max_new_tokens", "1500", "--ignore_eos", "--repeats", "20"]
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_records(out, 1, proc)
        # a second run on the same output (here in this process) refuses while the first holds it
        assert main(argv[3:6] + ["--resume"] + argv[6:]) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            f"error: {out} is being written by another run; wait for it to finish or give this"
            " run another --output.")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert f"Terminated; records already written to {out} are kept." in err
    assert "Traceback" not in err
    recs = read_records(out)
    assert recs and all(check_record(r) == [] for r in recs)
    # the stopped run still gets its report, of every record it wrote
    summary = json.loads((tmp_path / "o.summary.json").read_text())
    assert summary["records"] == len(recs) and summary["modes"]["c2c"]["count"] == len(recs)


# --- the converted-weights cache ------------------------------------------------------------

BUILDER = textwrap.dedent("""
    import os, sys, time
    from c2c_core.io.fileio import build_once
    out, log = sys.argv[1], sys.argv[2]
    def build(tmp):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\\n")
        os.makedirs(tmp)
        for i in range(5):  # slow, many files: a reader must never see a part of them
            with open(os.path.join(tmp, f"part{i}"), "w") as f:
                f.write("x" * 1000)
            time.sleep(0.05)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            f.write("{}")
    build_once(out, build)
    assert sorted(os.listdir(out)) == ["config.json"] + [f"part{i}" for i in range(5)]
    assert all(os.path.getsize(os.path.join(out, f"part{i}")) == 1000 for i in range(5))
""")


def _kill_all(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.communicate()


def test_cache_folder_built_once_by_concurrent_processes(tmp_path):
    out, log = tmp_path / "cache" / "model-abc", tmp_path / "builds.log"
    env = dict(os.environ, PYTHONPATH=ROOT)
    procs = [subprocess.Popen([sys.executable, "-c", BUILDER, str(out), str(log)], env=env,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    try:
        for p in procs:
            _, err = p.communicate(timeout=240)
            assert p.returncode == 0, err
    finally:
        _kill_all(procs)  # on a failure or a timeout none of them outlives the test
    assert len(log.read_text().split()) == 1  # one process converted; three reused its folder
    assert not [p for p in os.listdir(out.parent) if ".tmp-" in p]  # no temp folders left


def test_failed_cache_build_leaves_nothing(tmp_path):
    out = tmp_path / "cache" / "m"

    def build(tmp):
        os.makedirs(tmp)
        open(os.path.join(tmp, "half"), "w").close()
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(UserError, match="The disk is full.*C2C_CACHE"):
        fileio.build_once(str(out), build)
    assert not out.exists() and os.listdir(out.parent) == ["m.lock"]

    def good(tmp):
        os.makedirs(tmp)
        open(os.path.join(tmp, "config.json"), "w").close()

    assert fileio.build_once(str(out), good) is True
    assert fileio.build_once(str(out), lambda tmp: pytest.fail("built twice")) is False


@pytest.mark.slow
def test_concurrent_smollm2_conversion(tmp_path):
    """Three shard processes converting the real SmolLM2 GGUF into an empty cache at once."""
    env = dict(os.environ, PYTHONPATH=ROOT, C2C_CACHE=str(tmp_path / "cache"))
    code = ("import torch; from c2c_core.models.loading import load_gguf, smollm2_gguf_path;"
            "m, t, out = load_gguf(smollm2_gguf_path(), torch.float32); print(out)")
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = []
    try:
        for p in procs:
            o, e = p.communicate(timeout=900)
            assert p.returncode == 0, e
            outs.append(o.strip())
    finally:
        _kill_all(procs)
    assert len(set(outs)) == 1
    assert not [p for p in os.listdir(os.path.dirname(outs[0])) if ".tmp-" in p]


def test_deeply_nested_json_is_one_sentence(tmp_path, capsys, no_model_load):
    deep = "[" * 100_000 + "]" * 100_000
    src = tmp_path / "p.jsonl"
    src.write_text('{"prompt": "ok"}\n' + deep + "\n")
    assert main(["dataset", "--dataset_file", str(src), "--output", str(tmp_path / "o.jsonl")]) == 2
    one_line_error(capsys, "p.jsonl line 2 nests too deeply to read")
    src = tmp_path / "p.json"
    src.write_text(deep)
    assert main(["dataset", "--dataset_file", str(src), "--output", str(tmp_path / "o.jsonl")]) == 2
    one_line_error(capsys, "p.json nests too deeply to read")
    res = tmp_path / "r.jsonl"
    res.write_text(deep + "\n")
    assert main(["report", str(res)]) == 2
    one_line_error(capsys, "r.jsonl line 1 nests too deeply to read")
