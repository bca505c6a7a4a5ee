"""Uploaded prompts files are bounded before they are decoded (issue 16, part 1): Parquet from
its footer, JSON arrays, JSONL and CSV as they stream; every refusal is one sentence naming the
file and the cap. The bombs here decode to at most ~2 GB, so a failing guard cannot hurt the
machine; where it matters, the check runs in a child process whose memory is watched."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pa = pytest.importorskip("pyarrow")
import pyarrow.parquet as pq  # noqa: E402

from c2c_core.spec.errors import UserError  # noqa: E402
from c2c_core.io.prompts import FileCaps, load_prompt_file  # noqa: E402

CAPS = FileCaps(100_000, 64 * 2**20, "C2C_MAX_FILE_ROWS", "C2C_MAX_FILE_MB")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def dictionary_bomb(path, rows: int, width: int, arrow_schema: bool = True) -> str:
    """A Parquet file of `rows` copies of one `width`-character prompt, dictionary encoded:
    a few hundred bytes on disk, rows x width once decoded. Written without ever expanding."""
    import numpy as np
    col = pa.DictionaryArray.from_arrays(pa.array(np.zeros(rows, dtype=np.int32)),
                                         pa.array(["a" * width]))
    pq.write_table(pa.table({"prompt": col}), str(path), compression="zstd",
                   store_schema=arrow_schema)
    return str(path)


def one_sentence(msg: str) -> None:
    assert "Traceback" not in msg and "\n" not in msg and msg.endswith(".")
    assert msg.count(". ") == 0, msg


def test_a_parquet_row_bomb_is_refused_from_its_footer(tmp_path, monkeypatch):
    path = dictionary_bomb(tmp_path / "bomb.parquet", 1_000_000, 2_000)  # 2 GB decoded
    assert os.path.getsize(path) < 1_000_000

    def never(*a, **k):
        raise AssertionError("rows were decoded before the footer was checked")
    monkeypatch.setattr(pq.ParquetFile, "iter_batches", never)
    monkeypatch.setattr(pq.ParquetFile, "read", never)
    with pytest.raises(UserError) as e:
        load_prompt_file(path, caps=CAPS)
    msg = str(e.value)
    assert "bomb.parquet" in msg and "1,000,000 rows" in msg and "C2C_MAX_FILE_ROWS" in msg
    one_sentence(msg)


def test_delta_byte_array_parquet_is_refused_from_its_footer(tmp_path, monkeypatch):
    path = tmp_path / "delta.parquet"
    pq.write_table(pa.table({"prompt": ["x" * 100] * 10}), str(path), use_dictionary=False,
                   column_encoding={"prompt": "DELTA_BYTE_ARRAY"})
    monkeypatch.setattr(pq.ParquetFile, "iter_batches", lambda *a, **k: 1 / 0)
    with pytest.raises(UserError, match="DELTA_BYTE_ARRAY"):
        load_prompt_file(path, caps=CAPS)


CHILD = textwrap.dedent("""
    import sys, psutil
    import pyarrow.parquet  # loaded in the server already (gradio, pandas): not the read
    from c2c_core.spec.errors import UserError
    from c2c_core.io.prompts import FileCaps, load_prompt_file
    p = psutil.Process()
    before = p.memory_info().rss
    try:
        load_prompt_file(sys.argv[1], caps=FileCaps(100_000, 64 * 2**20, "R", "C2C_MAX_FILE_MB"))
        print("READ")
    except UserError as e:
        print("REFUSED", e)
    print((p.memory_info().rss - before) / 2**20)
""")


@pytest.mark.parametrize("arrow_schema", [True, False], ids=["arrow-dictionary", "plain-parquet"])
def test_a_parquet_value_bomb_is_refused_with_the_server_memory_bounded(tmp_path, arrow_schema):
    """Rows under the cap but each a 20,000-character value from one dictionary entry: 2 GB of
    text from ~500 bytes. Refused while streaming, memory growing by tens of MB at most."""
    path = dictionary_bomb(tmp_path / "wide.parquet", 100_000, 20_000, arrow_schema)
    assert os.path.getsize(path) < 2_000
    out = subprocess.run([sys.executable, "-c", CHILD, path], capture_output=True, text=True,
                         cwd=ROOT, timeout=120, env={**os.environ, "PYTHONPATH": ROOT})
    lines = out.stdout.strip().splitlines()
    assert out.returncode == 0 and lines, out.stderr[-2000:]
    assert lines[0].startswith("REFUSED") and "wide.parquet" in lines[0], lines
    assert "C2C_MAX_FILE_MB" in lines[0]
    growth = float(lines[-1])
    assert growth < 80, f"the server process grew by {growth:.0f} MB reading a refused file"


def test_a_parquet_within_the_caps_still_reads(tmp_path):
    path = tmp_path / "ok.parquet"
    pq.write_table(pa.table({"question": [f"q{i}" for i in range(3000)],
                             "choices": [["a", "b"]] * 3000, "answer": [1] * 3000}),
                   str(path), row_group_size=700)
    items = load_prompt_file(path, caps=CAPS)
    assert len(items) == 3000 and items[2999].prompt == "q2999\nA. a\nB. b"
    assert items[0].answer == "B"


def test_a_json_array_streams_element_by_element(tmp_path, monkeypatch):
    """Tiny read chunks split every element across reads: the rows are those json.loads finds,
    and an error names the line it is on."""
    import c2c_core.io.prompts as prompts
    monkeypatch.setattr(prompts, "_JSON_CHUNK", 7)
    rows = [{"prompt": f"p {i} \u00e9 [x], {{y}}", "answer": i, "options": None} for i in range(50)]
    good = tmp_path / "rows.json"
    good.write_text("\n [\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]\n",
                    encoding="utf-8")
    assert [i.prompt for i in load_prompt_file(good, caps=CAPS)] == [r["prompt"] for r in rows]
    bad = tmp_path / "bad.json"
    bad.write_text('[\n{"prompt": "a"},\n{"prompt": "b"},\n{"prompt": oops}\n]', encoding="utf-8")
    with pytest.raises(UserError, match=r"bad.json is not valid JSON \(line 4\)"):
        load_prompt_file(bad, caps=CAPS)
    cut = tmp_path / "cut.json"
    cut.write_text('[{"prompt": "a"}, {"prompt": "b"', encoding="utf-8")
    with pytest.raises(UserError, match="cut.json"):
        load_prompt_file(cut, caps=CAPS)


def test_a_json_array_over_the_row_cap_is_refused_while_reading(tmp_path, monkeypatch):
    import c2c_core.io.prompts as prompts
    seen = []
    real = prompts._row_item
    monkeypatch.setattr(prompts, "_row_item", lambda *a: seen.append(1) or real(*a))
    path = tmp_path / "many.json"
    path.write_text(json.dumps([{"prompt": "x"}] * 5000), encoding="utf-8")
    with pytest.raises(UserError) as e:
        load_prompt_file(path, caps=FileCaps(1000, 2**20, "C2C_MAX_FILE_ROWS", "B"))
    assert "many.json" in str(e.value) and "C2C_MAX_FILE_ROWS" in str(e.value)
    one_sentence(str(e.value))
    assert len(seen) <= 1000  # refused at row 1,001, not after reading all 5,000


@pytest.mark.parametrize("ext, body", [
    (".jsonl", b'{"prompt": "x"}\n' * 3000),
    (".csv", b"prompt\n" + b"x\n" * 3000),
])
def test_jsonl_and_csv_over_the_row_cap_are_refused(tmp_path, ext, body):
    path = tmp_path / f"many{ext}"
    path.write_bytes(body)
    with pytest.raises(UserError, match=f"many{ext} has more than 1,000 rows"):
        load_prompt_file(path, caps=FileCaps(1000, 2**20, "C2C_MAX_FILE_ROWS", "B"))
    assert len(load_prompt_file(path)) == 3000  # the CLI (no caps) reads the user's own file


def test_a_file_larger_than_the_byte_cap_is_refused_before_reading(tmp_path):
    path = tmp_path / "big.jsonl"
    path.write_bytes(b'{"prompt": "' + b"x" * 3_000_000 + b'"}\n')
    with pytest.raises(UserError) as e:
        load_prompt_file(path, caps=FileCaps(10, 2**20, "R", "C2C_MAX_FILE_MB"))
    assert "big.jsonl holds 2.9 MB" in str(e.value) and "C2C_MAX_FILE_MB" in str(e.value)


@pytest.mark.parametrize("name", ["prompts.jsonl.gz", "prompts", "prompts.txt"])
def test_gzip_and_extension_less_prompt_files_get_a_sentence(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\x1f\x8b\x08\x00")
    with pytest.raises(UserError) as e:
        load_prompt_file(path)
    msg = str(e.value)
    assert msg.startswith(name) and ".jsonl" in msg and ".parquet" in msg
    if name.endswith(".gz"):
        assert "gzip" in msg


# --- the app: refusals our code says (not gradio's bare "400 Bad Request") --------------------

def test_the_dataset_validator_says_what_is_wrong_with_a_file_or_a_number(tmp_path):
    pytest.importorskip("gradio")
    from c2c_core.frontends.ui.dataset_tab import check_dataset
    from c2c_core.frontends.ui.guard import FieldError
    for name in ("p.jsonl.gz", "noext"):
        with pytest.raises(FieldError) as e:
            check_dataset("file", "", "", "test", str(tmp_path / name), 10, 0)
        assert e.value.field == "prompt_file" and e.value.args[0].startswith(name)
    for kw, field in ((dict(num_samples=-5), "num_samples"), (dict(num_samples=0), "num_samples"),
                      (dict(offset=-1), "offset")):
        with pytest.raises(FieldError) as e:
            check_dataset("hf", "gsm8k", "", "test", None, **{"num_samples": 10, **kw})
        assert e.value.field == field and "give" in str(e.value)


def test_results_files_of_another_type_get_a_sentence(tmp_path):
    pytest.importorskip("gradio")
    from c2c_core.frontends.ui.results_tab import load_sources
    gz, bare = tmp_path / "r.jsonl.gz", tmp_path / "r"
    gz.write_bytes(b"\x1f\x8b\x08\x00")
    bare.write_bytes(b'{"id": 1}\n')
    sources, errors = load_sources([str(gz), str(bare)], [], False, None)
    assert not sources and len(errors) == 2
    assert errors[0].startswith("r.jsonl.gz is not a JSONL results file") and "gzip" in errors[0]
    assert errors[1].startswith("r is not a JSONL results file")


def test_a_prompts_files_columns_reach_the_status_line_as_text(tmp_path):
    """A refused prompts file is named with its columns: tags among them are shown, not drawn."""
    pytest.importorskip("gradio")
    from c2c_core.frontends.ui.dataset_tab import run_dataset
    path = tmp_path / "cols.jsonl"
    path.write_text('{"<img src=http://127.0.0.1:9/x>": "a"}\n', encoding="utf-8")
    gen = run_dataset("file", "", "", "test", str(path), 1, 0, "", False, request=None,
                      progress=lambda *a, **k: None)
    status = next(gen)[0]
    assert "columns found: &lt;img src=http://127.0.0.1:9/x&gt;" in status, status
    assert "<img" not in status
