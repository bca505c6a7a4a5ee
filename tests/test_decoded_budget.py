"""Issue 29 item 1: what a stranger's file decodes to is counted while it is parsed, and refused
in one sentence naming the file and the limit before the memory is spent; Results analyses
keep decode steps as arrays, draw them downsampled, and share one memory pool."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

from c2c_core.io.decoded import DecodedBudget, MemoryPool
from c2c_core.io.prompts import FileCaps, load_prompt_file
from c2c_core.io.records import check_record, read_records
from c2c_core.report import analysis, plots
from c2c_core.spec.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MB = 2**20


def _long_record(i: int, n: int, step: str = "1") -> str:
    """One results line whose decode steps are n copies of `step` (written as text: a
    list of n Python floats is what the reader must never build)."""
    head = json.dumps({"id": i, "mode": "c2c", "prompt": "p", "response": "r",
                       "run": {"device": "cpu"}, "timing": {"ttft_ms": 5.0}})
    return head[:-1] + ', "decode_step_times_ms": [' + ",".join([step] * n) + "]}\n"


def _write(path, lines) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(lines)
    return str(path)


def _list_bomb(path, refs: int = 1_000_000, width: int = 1024) -> str:
    """A Parquet file of one row whose list column holds `refs` references to one `width`-char
    string, dictionary encoded: a few KB that decode to refs x width bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    d = pa.DictionaryArray.from_arrays(pa.array(np.zeros(refs, dtype=np.int32)),
                                       pa.array(["a" * width]))
    lst = pa.ListArray.from_arrays(pa.array([0, refs], type=pa.int32()), d)
    pq.write_table(pa.table({"prompt": ["hi"], "options": lst}), str(path), compression="zstd")
    return str(path)


# --- records --------------------------------------------------------------------------------

def test_a_record_with_many_decode_steps_is_refused_while_it_is_parsed(tmp_path):
    """300 k one-digit steps are a 600 KB line; as 8-byte floats 2.4 MB: past a 1 MB budget,
    refused in one sentence naming the file and the limit."""
    path = _write(tmp_path / "steps.jsonl", [_long_record(0, 300_000)])
    assert os.path.getsize(path) < MB
    with pytest.raises(UserError) as e:
        read_records(path, budget=DecodedBudget(MB, "C2C_MAX_RESULTS_MB"))
    msg = str(e.value)
    assert "steps.jsonl" in msg and "1.0 MB" in msg and "C2C_MAX_RESULTS_MB" in msg
    assert msg.count(". ") == 0 and "\n" not in msg  # one sentence
    # within the budget: the steps come back as one float array, 8 bytes a step
    budget = DecodedBudget(8 * MB)
    (rec,) = read_records(path, budget=budget)
    steps = rec["decode_step_times_ms"]
    assert isinstance(steps, np.ndarray) and steps.dtype == np.float64
    assert len(steps) == 300_000 and float(steps.sum()) == 300_000.0
    assert 300_000 * 8 <= budget.used < 4 * MB


def test_compact_steps_read_the_same_numbers_as_json(tmp_path):
    rng = np.random.default_rng(0)
    vals = [round(float(x), 3) for x in rng.uniform(0.1, 500, 1000)] + [7, 1e-3, 2.5e2]
    lines = [json.dumps({"id": 1, "decode_step_times_ms": vals}) + "\n",
             # not plain numbers, or the key in a nested object: parsed whole, as json does
             json.dumps({"id": 2, "decode_step_times_ms": [1.0, None, "x"]}) + "\n",
             json.dumps({"id": 3, "x": {"decode_step_times_ms": [1, 2]}}) + "\n",
             json.dumps({"id": 4, "decode_step_times_ms": []}) + "\n"]
    path = _write(tmp_path / "r.jsonl", lines)
    plain = read_records(path)
    compact = read_records(path, budget=DecodedBudget(None))
    assert np.array_equal(compact[0]["decode_step_times_ms"], np.array(vals, dtype=float))
    assert compact[1] == plain[1] and compact[2] == plain[2]
    assert len(compact[3]["decode_step_times_ms"]) == 0
    # the record checks judge a compact record as they judge its list form
    assert check_record(compact[0]) == check_record(plain[0])
    # numbers without their comma are no JSON with a budget either (not read as one number)
    bad = _write(tmp_path / "bad.jsonl", ['{"id": 1, "decode_step_times_ms": [1 2]}\n'])
    for budget in (None, DecodedBudget(None)):
        with pytest.raises(UserError, match="bad.jsonl line 1 is not valid JSON"):
            read_records(bad, budget=budget)


def test_analysis_of_compact_steps_matches_the_list_form(tmp_path):
    path = _write(tmp_path / "r.jsonl", [_long_record(i, 5000, f"{i + 1}.5") for i in range(2)])
    plain, compact = read_records(path), read_records(path, budget=DecodedBudget(None))
    a, b = analysis.to_frame(plain, "f"), analysis.to_frame(compact, "f")
    for col in ("decode_total_ms", "decode_avg_ms", "decode_p50_ms", "n_steps"):
        assert list(a[col]) == pytest.approx(list(b[col]))
    runs = analysis.step_runs(compact, "f")
    assert [k for k, _ in runs] == [("f", "0", "c2c", 0), ("f", "1", "c2c", 0)]
    # the record's own array, not a copy (it held no NaN)
    assert runs[0][1] is compact[0]["decode_step_times_ms"]


def test_long_step_runs_are_drawn_downsampled():
    rec = {"id": 1, "mode": "c2c", "decode_step_times_ms": np.arange(100_000, dtype=float)}
    fig = plots.decode_steps_fig(analysis.step_runs([rec], "f"), max_points=2_000)
    lines = [t for t in fig.data if t.name and t.name.startswith("sample")]
    assert len(lines) == 1 and len(lines[0].y) <= 2_001
    assert "mean of every 50 steps" in fig.layout.title.text
    # the p50 line is over every step, not over the drawn means
    assert any("p50 49999.50 ms" in (a.text or "") for a in fig.layout.annotations)


# --- the shared pool --------------------------------------------------------------------------

def test_the_pool_makes_a_second_large_analysis_wait_its_turn():
    pool = MemoryPool(100)
    first_in, release, second_in = threading.Event(), threading.Event(), threading.Event()

    def first():
        with pool.reserve(80):
            first_in.set()
            release.wait(30)

    def second():
        with pool.reserve(50):
            second_in.set()

    a = threading.Thread(target=first)
    a.start()
    assert first_in.wait(30)
    b = threading.Thread(target=second)
    b.start()
    # 80 + 50 > 100: the second waits as long as the first holds its bytes
    assert not second_in.wait(0.5) and pool.free == 20
    with pool.reserve(20):  # a small one fits beside the first
        assert pool.free == 0
    release.set()
    assert second_in.wait(30)
    a.join(30)
    b.join(30)
    assert pool.free == 100
    # a wait past its bound is said in a sentence
    with pool.reserve(100):
        with pytest.raises(UserError, match="busy with other large analyses"):
            with pool.reserve(1, timeout=0.05):
                pass


# --- the app's helper and the CLI --------------------------------------------------------------

def test_the_results_tab_refuses_a_file_past_its_budget_and_keeps_the_others(tmp_path,
                                                                               monkeypatch):
    pytest.importorskip("gradio")
    from c2c_core.frontends.ui import guard, results_tab
    small = _write(tmp_path / "small.jsonl", [_long_record(0, 10)])
    big = _write(tmp_path / "big.jsonl", [_long_record(0, 300_000)])
    monkeypatch.setenv("C2C_MAX_RESULTS_MB", "1")
    sources, errors = results_tab.load_sources([small, big], [], False, None,
                                               guard.results_budget())
    assert list(sources) == ["small"]
    assert len(errors) == 1 and "big.jsonl holds more than 1.0 MB" in errors[0]
    assert "C2C_MAX_RESULTS_MB" in errors[0] and "Traceback" not in errors[0]
    with results_tab._analysis_memory([big], [], None) as budget:
        status = results_tab._analyze([big], [], False, None, budget)[0]
    assert "big.jsonl holds more than 1.0 MB" in status.replace("\\", "")
    assert guard.analyses_pool().free == guard.analyses_pool().total  # given back


def _cli(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "c2c_core", *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **env})


def test_report_refuses_a_file_past_the_budget_in_one_sentence(tmp_path):
    path = _write(tmp_path / "steps.jsonl", [_long_record(0, 300_000)])
    r = _cli(["report", path], {"C2C_MAX_RESULTS_MB": "1"})
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "steps.jsonl holds more than 1.0 MB" in r.stderr and "C2C_MAX_RESULTS_MB" in r.stderr
    ok = _cli(["report", path], {})  # the CLI's own default takes it
    assert ok.returncode == 0, ok.stderr[-2000:]


# --- prompt files ----------------------------------------------------------------------------

def test_a_small_parquet_list_bomb_is_refused_before_it_is_materialised(tmp_path):
    """One row, a list of 1 M references to one 1 KB string (about 5 KB): refused by the
    64 MB budget, and the process that read it never came near the 1 GB it decodes to."""
    path = _list_bomb(tmp_path / "bomb.parquet")
    assert os.path.getsize(path) < 20_000
    code = textwrap.dedent(f"""
        import resource, sys
        from c2c_core.io.prompts import FileCaps, load_prompt_file
        from c2c_core.spec.errors import UserError
        try:
            load_prompt_file({path!r}, caps=FileCaps(100_000, 64 * 2**20, "C2C_MAX_FILE_ROWS",
                                                      "C2C_MAX_FILE_MB"))
            print("READ")
        except UserError as e:
            print(e)
        # this process's own peak (VmHWM): ru_maxrss of a child started by a large process
        # (pytest after loading models) includes its parent's RSS at the fork
        print(next(int(ln.split()[1]) for ln in open("/proc/self/status")
                   if ln.startswith("VmHWM:")) // 1024)
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, text=True, capture_output=True,
                       timeout=600)
    said, peak_mb = r.stdout.strip().splitlines()[-2:]
    # refused from the footer: Arrow's reader never sees it
    assert ("bomb.parquet's list column 'options' holds 1,000,000 text values in 1 row(s)"
            in said), r.stderr[-2000:]
    assert int(peak_mb) < 500, peak_mb  # 1.1 GB when the rows were counted after decoding


def _list_rows(path, rows: int, refs: int, width: int = 1024) -> str:
    """`rows` rows, each a list of `refs` references to one `width`-char string (dictionary
    encoded): a few KB that decode to rows x refs x width bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    d = pa.DictionaryArray.from_arrays(pa.array(np.zeros(rows * refs, dtype=np.int32)),
                                       pa.array(["a" * width]))
    offsets = pa.array(np.arange(rows + 1, dtype=np.int32) * refs)
    lst = pa.ListArray.from_arrays(offsets, d)
    pq.write_table(pa.table({"prompt": ["hi"] * rows, "notes": lst}), str(path),
                   compression="zstd")
    return str(path)


def test_short_lists_of_one_long_string_are_counted_before_they_are_rows(tmp_path):
    """300 rows of 250 references to one 1 KB string (under the footer's per-row bound):
    75 MB once decoded, refused by the count on Arrow's arrays, naming the budget."""
    path = _list_rows(tmp_path / "rows.parquet", 300, 250)
    assert os.path.getsize(path) < 100_000
    caps = FileCaps(100_000, 64 * 2**20, "C2C_MAX_FILE_ROWS", "C2C_MAX_FILE_MB")
    with pytest.raises(UserError, match=r"rows.parquet holds more than 64.0 MB of data once"
                                        r" decoded.*C2C_MAX_FILE_MB"):
        load_prompt_file(path, caps=caps)
    # the same lists under a larger budget are read (the footer rule leaves them alone)
    rows = load_prompt_file(path, caps=FileCaps(100_000, 256 * 2**20, "C2C_MAX_FILE_ROWS",
                                                "C2C_MAX_FILE_MB"))
    assert len(rows) == 300


def test_dataset_cli_refuses_the_parquet_list_bomb_in_one_sentence(tmp_path):
    path = _list_bomb(tmp_path / "bomb.parquet")
    r = _cli(["dataset", "--dataset_file", path], {"C2C_MAX_FILE_MB": "64"})
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "bomb.parquet's list column 'options' holds 1,000,000 text values" in r.stderr


def test_a_jsonl_row_of_many_numbers_counts_each_value(tmp_path):
    """600 KB of text under a 1 MB cap, but 200 k values: 8 bytes each, refused."""
    path = _write(tmp_path / "p.jsonl",
                  [json.dumps({"prompt": "q", "options": [1] * 200_000}) + "\n"])
    assert os.path.getsize(path) < MB
    caps = FileCaps(100, MB, "C2C_MAX_FILE_ROWS", "C2C_MAX_FILE_MB")
    with pytest.raises(UserError, match=r"p.jsonl holds more than 1.0 MB.*C2C_MAX_FILE_MB"):
        load_prompt_file(path, caps=caps)
    ok = _write(tmp_path / "ok.jsonl", [json.dumps({"prompt": f"q{i}"}) + "\n" for i in range(50)])
    assert len(load_prompt_file(ok, caps=caps)) == 50
