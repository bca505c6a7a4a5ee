"""Data as people have it: options as a list, a dict or one lettered string; answers as a
letter, "B. 9 lines", an index or the option text; GSM8K '####' answers; a max_new_tokens that
fits the source, and answers cut off by it said in every record and in the summaries."""

from __future__ import annotations

import json

import pytest

from c2c_core.frontends.cli import main
from c2c_core.spec.errors import UserError
from c2c_core.io.prompts import (PromptItem, _answer, _choices, default_max_new_tokens,
    extract_answer, load_prompt_file, score)
from c2c_core.io.records import check_record, read_records

LETTERED = "A. 3 lines\nB. 9 lines\nC. 12 lines\nD. 27 lines"
#: The MMLU export from the issue: options as one preformatted string, answer "B. 9 lines".
MMLU_ROWS = [
    {"question": "How many lines does a 3x3 tic-tac-toe board have if you count rows, columns"
                 " and both diagonals, plus one?", "options": LETTERED, "answer": "B. 9 lines"},
    {"question": "Which is largest?", "options": "A. 2\nB. 7\nC. 5", "answer": "B"},
    {"question": "Pick the colour of the sky.", "options": ["green", "blue"], "answer": 1},
    {"question": "Capital of France?", "options": {"A": "Rome", "B": "Paris"}, "answer": "Paris"},
]


@pytest.mark.parametrize("options, texts", [
    (["Paris", "London"], ["Paris", "London"]),
    ('["Paris", "London"]', ["Paris", "London"]),
    ({"text": ["Paris", "London"], "label": ["1", "2"]}, ["Paris", "London"]),
    ({"B": "London", "A": "Paris"}, ["Paris", "London"]),
    (LETTERED, ["3 lines", "9 lines", "12 lines", "27 lines"]),
    ("(A) 3 lines\n(B) 9\n  lines", ["3 lines", "9 lines"]),  # a wrapped option continues
    ("A) yes\r\nB) no\r\n", ["yes", "no"]),
])
def test_option_forms(options, texts):
    assert _choices(options, "row 1")[0] == texts


@pytest.mark.parametrize("options", ["red|blue", "A. only one", "B. starts at B\nC. then C", 7])
def test_options_that_cannot_be_read_are_one_sentence(options):
    with pytest.raises(UserError, match="row 1 has options that are not a list"):
        _choices(options, "row 1")


@pytest.mark.parametrize("answer, letter", [
    ("B", "B"), ("b", "B"), ("(B)", "B"), ("B.", "B"), ("B. 9 lines", "B"), ("B) 9 lines", "B"),
    ("9 lines", "B"), ("  9   LINES ", "B"), (1, "B"), ("1", "B"), ("27 lines", "D"),
])
def test_answer_forms_with_options(answer, letter):
    texts, labels = _choices(LETTERED, "row 1")
    assert _answer(answer, texts, labels) == (letter, "choice")


def test_answers_without_options():
    assert _answer("Natalia sold 48/2 = 24 clips.\n#### 72", [], []) == ("72", "number")
    assert _answer("#### 1,234", [], []) == ("1234", "number")
    assert _answer("Paris", [], []) == ("Paris", "text")
    assert _answer(None, [], []) == (None, None)
    texts, labels = _choices(LETTERED, "w")
    assert _answer("banana", texts, labels) == ("banana", "text")  # not an option: free text


def test_mmlu_style_file_reads_every_row(tmp_path):
    src = tmp_path / "mmlu.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in MMLU_ROWS))
    items = load_prompt_file(src)
    assert [i.answer for i in items] == ["B", "B", "B", "B"]
    assert all(i.answer_kind == "choice" for i in items)
    assert items[0].prompt.endswith("\nA. 3 lines\nB. 9 lines\nC. 12 lines\nD. 27 lines")
    assert [i.n_choices for i in items] == [4, 3, 2, 2]


def test_mmlu_style_csv(tmp_path):
    import csv
    src = tmp_path / "mmlu.csv"
    with open(src, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, ["question", "options", "answer"])
        w.writeheader()
        w.writerow({"question": "How many?", "options": LETTERED, "answer": "B. 9 lines"})
    [item] = load_prompt_file(src)
    assert (item.answer, item.answer_kind) == ("B", "choice")


def test_scoring_reads_letters_past_d_when_there_are_more_options():
    assert extract_answer("The answer is (G).", "choice", 10) == "G"
    assert extract_answer("G. because", "choice", 10) == "G"
    assert extract_answer("The answer is (G).", "choice") is None  # four options: A-D only
    assert score("Answer: E", "E", "choice", 5) is True


def test_default_max_new_tokens_per_source():
    gsm = [PromptItem(1, "q", "72", "number")]
    mmlu = [PromptItem(1, "q", "B", "choice")]
    assert default_max_new_tokens(gsm)[0] == 256
    assert default_max_new_tokens(mmlu)[0] == 64
    assert default_max_new_tokens([PromptItem(1, "q")])[0] == 64
    assert default_max_new_tokens(gsm + mmlu)[0] == 256


def test_mmlu_style_file_runs_with_accuracy_shown(tmp_path, tiny_models, capsys):
    src = tmp_path / "mmlu.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in MMLU_ROWS))
    out = tmp_path / "o.jsonl"
    assert main(["dataset", "--dataset_file", str(src), "--output", str(out), "--mode",
                 "receiver", "--base_model", tiny_models["receiver"], "--teacher_model",
                 tiny_models["sharer"], "--hidden_dim", "32", "--intermediate_dim", "32",
                 "--device", "cpu", "--warmup", "0"]) == 0
    cap = capsys.readouterr()
    assert "max_new_tokens 64 (enough for a lettered answer)" in cap.err
    recs = read_records(out)
    assert len(recs) == 4 and all(check_record(r) == [] for r in recs)
    assert [r["answer"] for r in recs] == ["B"] * 4
    assert all(isinstance(r["correct"], bool) for r in recs)
    assert all(isinstance(r["truncated"], bool) for r in recs)
    n_right = sum(r["correct"] for r in recs)
    assert "accuracy" in cap.out and f"{n_right}/4 ({n_right / 4:.0%})" in cap.out
    n_cut = sum(r["truncated"] for r in recs)
    assert (f"{n_cut} of 4 answer(s) were cut off by max_new_tokens (64)" in cap.out) == (n_cut > 0)


def test_gsm8k_style_file_gets_room_to_answer(tmp_path, monkeypatch, capsys):
    from c2c_core.models import loading
    src = tmp_path / "gsm.jsonl"
    src.write_text(json.dumps({"question": "Natalia sold 48 clips in April and half as many in"
                                           " May. How many in all?",
                               "answer": "48/2 = 24\n48 + 24 = 72\n#### 72"}) + "\n")

    def stop(cfg):
        assert cfg.gen.max_new_tokens == 256
        raise UserError("stopped before loading")

    monkeypatch.setattr(loading, "load_pipeline", stop)
    assert main(["dataset", "--dataset_file", str(src), "--output", str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "max_new_tokens 256 (room to work out number answers, as in GSM8K)" in err
    monkeypatch.setattr(loading, "load_pipeline", lambda cfg: (_ for _ in ()).throw(
        UserError(f"max_new_tokens={cfg.gen.max_new_tokens}")))
    assert main(["dataset", "--dataset_file", str(src), "--max_new_tokens", "32", "--output",
                 str(tmp_path / "o.jsonl")]) == 2
    assert "max_new_tokens=32" in capsys.readouterr().err  # a given value wins


def test_truncated_says_whether_the_cap_cut_the_answer(tiny_pipe):
    from c2c_core.bench.runner import Generation, make_record, run_metadata
    pipe, cfg = tiny_pipe
    eos = next(iter(pipe.eos_ids))
    meta = run_metadata(pipe, cfg, "event")  # max_new_tokens 8
    item = PromptItem(1, "q")

    def rec(tokens, **m):
        g = Generation(tokens, {k: [] for k in ("base_embedding", "base_prefill",
                                                "teacher_embedding", "teacher_prefill",
                                                "projection", "sharer_decode", "decode")},
                       1, 2, 3)
        return make_record(pipe, item, "receiver", 0, g, {**meta, **m})["truncated"]

    other = (eos + 1) % len(pipe.tokenizer)
    assert rec([other] * 8) is True            # hit the cap, no EOS
    assert rec([other] * 7 + [eos]) is False   # ended with EOS on the last allowed token
    assert rec([other] * 3 + [eos]) is False   # ended early
    assert rec([other] * 8, ignore_eos=True) is None  # EOS ignored on purpose: not a cut-off


def test_dataset_tab_shows_answers_accuracy_and_cut_offs():
    pytest.importorskip("gradio")
    from c2c_core.frontends.ui.dataset_tab import accuracy_note, answers_table
    from conftest import SEED_RECORD
    recs = [dict(SEED_RECORD, id=i, mode="c2c", answer="B", correct=c, truncated=t,
                 run={"max_new_tokens": 64}) for i, (c, t) in enumerate(
                     [(True, False), (False, True), (True, False)])]
    table = answers_table(recs)
    assert list(table.columns[:6]) == ["id", "mode", "repeat", "answer", "correct", "cut off"]
    assert list(table["correct"]) == ["yes", "no", "yes"]
    assert list(table["cut off"]) == ["", "yes", ""]
    note = accuracy_note(recs)
    assert "Accuracy so far: 2 of 3 correct (67%)." in note
    assert "1 of 3 answer(s) were cut off by 'max new tokens' (64)" in note
    assert accuracy_note([dict(SEED_RECORD, id=1)]) == ""
    assert {"answer", "correct", "cut off"} <= set(answers_table([]).columns)
