"""A CSV prompts file whose field is longer than the csv module's limit (131,072 characters), or
holds a NUL character, is refused in one sentence naming the file, its line and the fix: in the
CLI (exit 2, no traceback) and in the app (the Dataset tab's status line and error), not
`_csv.Error: field larger than field limit` (issue 29, part 4)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from c2c_core.io.prompts import FileCaps, load_prompt_file
from c2c_core.spec.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPS = FileCaps(100_000, 64 * 2**20, "C2C_MAX_FILE_ROWS", "C2C_MAX_FILE_MB")

FILES = {
    # name: (content, words the sentence must hold)
    "wide.csv": ("prompt\nshort\n" + "a" * 140_000 + "\n", ("wide.csv line 3",
                                                            "131,072 characters", ".jsonl")),
    "wideheader.csv": ("x" * 140_000 + "\nhi\n", ("wideheader.csv line 1", "131,072")),
    "nul.csv": ("prompt\n" + "\x00" * 1_000 + "\n", ("nul.csv line 2", "NUL character")),
    "nulwide.csv": ("prompt\n" + "\x00" * 140_000 + "\n", ("nulwide.csv line 2", "131,072")),
    "nulcol.csv": ("prompt,other\nhi,a\x00b\n", ("nulcol.csv line 2", "NUL character")),
}


def one_sentence(msg: str) -> None:
    assert "Traceback" not in msg and "\n" not in msg.strip() and msg.strip().endswith(".")
    assert msg.count(". ") == 0, msg


@pytest.fixture
def files(tmp_path):
    out = {}
    for name, (text, words) in FILES.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
        out[name] = (str(tmp_path / name), words)
    return out


@pytest.mark.parametrize("name", list(FILES))
@pytest.mark.parametrize("caps", [None, CAPS], ids=["cli", "app"])
def test_the_reader_refuses_in_one_sentence(files, name, caps):
    path, words = files[name]
    with pytest.raises(UserError) as e:
        load_prompt_file(path, caps=caps)
    msg = str(e.value)
    for w in words:
        assert w in msg, msg
    one_sentence(msg)


def test_a_long_field_within_the_limit_still_reads(tmp_path):
    path = tmp_path / "long.csv"
    path.write_text("prompt\n" + "b" * 131_000 + "\n", encoding="utf-8")
    assert len(load_prompt_file(path)[0].prompt) == 131_000


@pytest.mark.parametrize("name", ["wide.csv", "nul.csv"])
def test_the_cli_says_one_sentence_and_exits_non_zero(files, name, tmp_path):
    path, words = files[name]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    # a preset that would load models is never reached: the file is read first
    proc = subprocess.run([sys.executable, "-m", "c2c_core", "dataset", "--dataset_file", path,
                           "--output", str(tmp_path / "out.jsonl")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode not in (0, 1), (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr and "_csv.Error" not in proc.stderr, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr[-2000:]
    for w in words:
        assert w in lines[0], lines[0]
    one_sentence(lines[0].removeprefix("error: "))
    assert not os.path.exists(tmp_path / "out.jsonl")


@pytest.mark.parametrize("name", ["wide.csv", "nul.csv"])
def test_the_dataset_tab_says_the_sentence(files, name):
    """The Dataset tab's handler (what the page and the `dataset` API endpoint run): its status
    line and its error carry the sentence, not gradio's bare exception."""
    gr = pytest.importorskip("gradio")
    from c2c_core.frontends.ui.dataset_tab import run_dataset
    path, words = files[name]
    gen = run_dataset("file", "", "", "test", path, 1, 0, "", False, request=None,
                      progress=lambda *a, **k: None)
    status = next(gen)[0]
    with pytest.raises(gr.Error) as e:
        next(gen)
    for w in words:
        assert w in status and w in e.value.message, (status, e.value.message)
