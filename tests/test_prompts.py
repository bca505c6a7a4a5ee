"""Prompt sources, selection and scoring (c2c_core/io/prompts.py), on real files in tmp_path."""

import csv
import json
import shutil
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from c2c_core.spec.errors import HubUnavailable, UserError
from c2c_core.io.prompts import (BUILTIN_PROMPTS, PromptItem, builtin_items, extract_answer,
    load_hf_dataset, load_prompt_file, parse_shard, resolve_prompts, score, select)
from conftest import HANG_S  # noqa: E402

ASSETS = Path(__file__).resolve().parents[1] / "assets"


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_csv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


# --- built-ins -------------------------------------------------------------------------------

def test_builtin_items():
    items = builtin_items()
    assert [i.prompt for i in items] == BUILTIN_PROMPTS
    assert [i.id for i in items] == [1, 2, 3, 4, 5]
    assert items[0].source == "builtin" and items[0].answer is None
    assert [i.id for i in builtin_items(["a", "b"])] == [1, 2]


# --- files -----------------------------------------------------------------------------------

def test_jsonl_field_fallback_and_ids(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "one"}, {"question": "two", "id": "q2"}, {"text": "three"},
        {"prompt": "four", "question": "ignored"}])
    items = load_prompt_file(f)
    assert [i.prompt for i in items] == ["one", "two", "three", "four"]
    assert [i.id for i in items] == [1, "q2", 3, 4]  # a row without an id: its number from 1
    assert items[0].source == "file:p.jsonl"


def test_field_option(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "no", "body": "yes"}])
    assert load_prompt_file(f, field="body")[0].prompt == "yes"


def test_json_array_and_json_lines(tmp_path):
    arr = tmp_path / "a.json"
    arr.write_text(json.dumps([{"prompt": "x"}, {"prompt": "y"}]), encoding="utf-8")
    assert [i.prompt for i in load_prompt_file(arr)] == ["x", "y"]
    lines = write_jsonl(tmp_path / "l.json", [{"prompt": "z"}])
    assert load_prompt_file(lines)[0].prompt == "z"


def test_csv(tmp_path):
    f = write_csv(tmp_path / "p.csv", [
        {"question": "Pick one", "options": '["red", "blue"]', "answer": "1"},
        {"question": "How many?", "options": "", "answer": "1,200"}])
    a, b = load_prompt_file(f)
    assert a.prompt == "Pick one\nA. red\nB. blue"
    assert (a.answer, a.answer_kind) == ("B", "choice")
    assert (b.prompt, b.answer, b.answer_kind) == ("How many?", "1200", "number")
    assert (a.id, b.id) == (1, 2) and b.source == "file:p.csv"  # numbered from 1, like "row 1"


def test_parquet_with_choices(tmp_path):
    f = tmp_path / "p.parquet"
    pq.write_table(pa.table({
        "question": ["Capital of France?", "Sky colour?"],
        "choices": [["Berlin", "Paris", "Rome", "Madrid"], ["green", "blue", "red", "black"]],
        "answer": [1, 1],
    }), f)
    items = load_prompt_file(f)
    assert items[0].prompt == "Capital of France?\nA. Berlin\nB. Paris\nC. Rome\nD. Madrid"
    assert [(i.answer, i.answer_kind) for i in items] == [("B", "choice"), ("B", "choice")]


def test_choices_dict_with_labels(tmp_path):
    f = write_jsonl(tmp_path / "arc.jsonl", [{
        "question": "Which is a gas?",
        "choices": {"text": ["ice", "steam", "rock"], "label": ["1", "2", "3"]},
        "answer": "2"}])
    item = load_prompt_file(f)[0]
    assert item.prompt == "Which is a gas?\nA. ice\nB. steam\nC. rock"
    assert (item.answer, item.answer_kind) == ("B", "choice")


def test_answer_kinds(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "a", "answer": "step\n#### 1,234"},
        {"prompt": "b", "answer": 42},
        {"prompt": "c", "answer": "Paris"},
        {"prompt": "d"}])
    got = [(i.answer, i.answer_kind) for i in load_prompt_file(f)]
    assert got == [("1234", "number"), ("42", "number"), ("Paris", "text"), (None, None)]


def test_sample_asset_loads():
    items = load_prompt_file(ASSETS / "sample_prompts.jsonl")
    assert len(items) == 6
    assert {i.answer_kind for i in items} >= {"choice", "number"}
    assert items[-1].answer == "72"


def test_missing_field_names_columns(tmp_path):
    f = write_csv(tmp_path / "p.csv", [{"q": "hi", "a": "x"}])
    with pytest.raises(UserError) as e:
        load_prompt_file(f)
    msg = str(e.value)
    assert "p.csv row 1" in msg and "q, a" in msg and "--field" in msg
    with pytest.raises(UserError, match="'body'"):
        load_prompt_file(f, field="body")


def test_empty_text_row(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "ok"}, {"prompt": "  "}, {"prompt": "ok2"}])
    with pytest.raises(UserError, match=r"p\.jsonl row 2 has an empty 'prompt'"):
        load_prompt_file(f)
    items = load_prompt_file(f, skip_bad_lines=True)
    assert [(i.id, i.prompt) for i in items] == [(1, "ok"), (3, "ok2")]  # row numbers, from 1


def test_malformed_jsonl_line(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": oops\n{"prompt": "d"}\n',
                 encoding="utf-8")
    with pytest.raises(UserError, match="line 3"):
        load_prompt_file(f)
    assert [i.prompt for i in load_prompt_file(f, skip_bad_lines=True)] == ["a", "b", "d"]


def test_all_rows_bad_still_raises(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [{"x": 1}, {"x": 2}])
    with pytest.raises(UserError, match="columns found: x"):
        load_prompt_file(f, skip_bad_lines=True)


def test_bad_options(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "options": "red|blue"}])
    with pytest.raises(UserError, match="row 1 has options that are not a list"):
        load_prompt_file(f)


def test_file_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_prompt_file(tmp_path / "missing.jsonl")
    (tmp_path / "p.txt").write_text("hi\n")
    with pytest.raises(UserError, match=r"unsupported file type '\.txt'"):
        load_prompt_file(tmp_path / "p.txt")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(UserError, match="no rows"):
        load_prompt_file(tmp_path / "empty.jsonl")
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(UserError, match="not a readable Parquet"):
        load_prompt_file(tmp_path / "bad.parquet")


# --- selection -------------------------------------------------------------------------------

def items_of(n):
    return [PromptItem(i, f"p{i}") for i in range(n)]


def test_select_offset_num_samples():
    ids = lambda xs: [x.id for x in xs]  # noqa: E731
    assert ids(select(items_of(10), offset=3, num_samples=4)) == [3, 4, 5, 6]
    assert ids(select(items_of(10), offset=8, num_samples=5)) == [8, 9]
    assert ids(select(items_of(10), num_samples=2)) == [0, 1]
    assert ids(select(items_of(10), offset=2, num_samples=7, shard=(1, 3))) == [5, 6]
    assert ids(select(items_of(10), shard="0/3")) == [0, 1, 2, 3]


@pytest.mark.parametrize("n_items", [0, 1, 2, 3, 7, 10, 11, 100])
@pytest.mark.parametrize("offset,num", [(0, None), (1, 5), (2, 50)])
def test_shards_concatenate_to_unsharded(n_items, offset, num):
    items = items_of(n_items)
    whole = select(items, offset, num)
    parts = [select(items, offset, num, shard=f"{i}/3") for i in range(3)]
    assert sum(parts, []) == whole
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_parse_shard():
    assert parse_shard("0/1") == (0, 1)
    assert parse_shard(" 2 / 4 ") == (2, 4)
    for bad in ["3/3", "-1/3", "1/0", "1", "a/b", "1/2/3"]:
        with pytest.raises(UserError, match="0 <= i < n"):
            parse_shard(bad)


# --- resolve_prompts -------------------------------------------------------------------------

def test_resolve_sources(tmp_path):
    assert len(resolve_prompts()) == 5
    assert [i.id for i in resolve_prompts(num_samples=2, offset=1)] == [2, 3]
    assert resolve_prompts(prompt="Hi?")[0].prompt == "Hi?"
    assert [i.prompt for i in resolve_prompts(prompts=["a", "b"])] == ["a", "b"]
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": str(i)} for i in range(7)])
    got = resolve_prompts(dataset_file=str(f), offset=1, num_samples=5, shard="1/2")
    assert [i.prompt for i in got] == ["4", "5"]


def test_resolve_errors(tmp_path):
    with pytest.raises(UserError, match=r"^The prompt is empty; type a question\.$"):
        resolve_prompts(prompt="   ")
    with pytest.raises(UserError, match="Prompt 2 of the list is empty"):
        resolve_prompts(prompts=["a", ""])
    with pytest.raises(UserError, match="one prompt source"):
        resolve_prompts(prompt="a", dataset_file="x.jsonl")
    with pytest.raises(UserError, match="--num_samples"):
        resolve_prompts(num_samples=0)
    with pytest.raises(UserError, match="--offset 9 skips all 5 rows"):
        resolve_prompts(offset=9)
    with pytest.raises(UserError, match="shard 5/6 of 5 selected rows is empty"):
        resolve_prompts(shard="5/6")
    with pytest.raises(UserError, match="--shard"):
        resolve_prompts(shard="5/5")


# --- Hugging Face datasets -------------------------------------------------------------------

def test_hf_dataset_offline_fails_fast():
    t0 = time.perf_counter()
    with pytest.raises(HubUnavailable, match="gsm8k"):
        load_hf_dataset("gsm8k")
    with pytest.raises(UserError, match="cais/mmlu"):
        resolve_prompts(dataset="cais/mmlu", num_samples=3)
    assert time.perf_counter() - t0 < HANG_S  # a hang guard; offline, nothing retries


def fake_hub_cache(tmp_path, repo, config, dataset_name, splits):
    """Lay out a `datasets` cache entry for `repo`, as a download would have left it."""
    import datasets
    files = {}
    for split, columns in splits.items():
        files[split] = str(tmp_path / f"{split}.parquet")
        pq.write_table(pa.table(columns), files[split])
    datasets.load_dataset("parquet", data_files=files, cache_dir=str(tmp_path / "build"))
    built = next((tmp_path / "build" / "parquet").glob("*/0.0.0/*/"))
    cache = tmp_path / "hf_datasets"
    dst = cache / repo.replace("/", "___") / config / "0.0.0" / "0123abcd"
    dst.mkdir(parents=True)
    for split in splits:
        shutil.copy(built / f"parquet-{split}.arrow", dst / f"{dataset_name}-{split}.arrow")
    info = json.loads((built / "dataset_info.json").read_text())
    info.update(dataset_name=dataset_name, config_name=config)
    for s in info["splits"].values():
        s["dataset_name"] = dataset_name
    (dst / "dataset_info.json").write_text(json.dumps(info))
    return cache


def test_hf_dataset_from_local_cache(tmp_path, monkeypatch):
    import datasets
    gsm = {"question": [f"q{i}" for i in range(5)],
           "answer": [f"work\n#### {i},000" for i in range(5)]}
    cache = fake_hub_cache(tmp_path, "openai/gsm8k", "main", "gsm8k",
                           {"test": gsm, "train": gsm})
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    items = load_hf_dataset("gsm8k", num_rows=3)
    assert [(i.id, i.prompt, i.answer, i.answer_kind) for i in items] == [
        (1, "q0", "0", "number"), (2, "q1", "1000", "number"), (3, "q2", "2000", "number")]
    assert items[0].source == "hf:openai/gsm8k/main/test"
    got = resolve_prompts(dataset="gsm8k", offset=1, num_samples=2)
    assert [i.id for i in got] == [2, 3]  # rows 2 and 3
    with pytest.raises(UserError, match=r"no split 'validation' \(available: \['test', 'train'\]\)"):
        load_hf_dataset("gsm8k", split="validation")


def test_hf_mmlu_from_local_cache(tmp_path, monkeypatch):
    import datasets
    mmlu = {"question": ["2+2?"], "subject": ["math"], "choices": [["3", "4", "5", "6"]],
            "answer": [1]}
    cache = fake_hub_cache(tmp_path, "cais/mmlu", "all", "mmlu", {"test": mmlu})
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    item = load_hf_dataset("cais/mmlu")[0]
    assert item.prompt == "2+2?\nA. 3\nB. 4\nC. 5\nD. 6"
    assert (item.answer, item.answer_kind, item.source) == ("B", "choice", "hf:cais/mmlu/all/test")


# --- scoring ---------------------------------------------------------------------------------

@pytest.mark.parametrize("response,expected", [
    ("She sold 48 + 24 = 72 clips.\n#### 72", "72"),
    ("The total is $1,234.", "1234"),
    ("So the answer is 18.0", "18"),
    ("It drops to -5 degrees", "-5"),
    ("pages 3-5", "5"),
    ("Half is 2.50", "2.5"),
    ("no digits here", None),
])
def test_extract_number(response, expected):
    assert extract_answer(response, "number") == expected


@pytest.mark.parametrize("response,expected", [
    ("Answer: B", "B"),
    ("The correct answer is (C).", "C"),
    ("the answer is: D because ...", "D"),
    ("I think (A) is right", "A"),
    ("B. Paris is the capital", "B"),
    ("C", "C"),
    ("A cat is an animal.", None),
    ("The answer is a guess", None),
])
def test_extract_choice(response, expected):
    assert extract_answer(response, "choice") == expected


def test_score():
    assert score("... #### 72", "72", "number") is True
    assert score("I get 71", "72", "number") is False
    assert score("Answer: B", "B", "choice") is True
    assert score("Answer: C", "B", "choice") is False
    assert score("It is paris.", "Paris", "text") is True
    assert score("anything", None, None) is None
    with pytest.raises(ValueError):
        extract_answer("x", "essay")


@pytest.mark.parametrize("exc,match", [
    ("not_found", "Dataset nope/x was not found on the Hugging Face hub"),
    (ConnectionError("timed out"), r"could not be downloaded \(timed out\)"),
    (ValueError("BuilderConfig 'zz' not found. Available: ['a', 'b']"),
     r"no config 'zz' \(available: \['a', 'b'\]\); pass --dataset_config"),
])
def test_hf_hub_errors_translated(monkeypatch, exc, match):
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    def fake_load(*args, **kwargs):
        if datasets.config.HF_HUB_OFFLINE:  # the cache-only try: nothing cached
            raise ConnectionError("offline")
        raise DatasetNotFoundError("Dataset 'nope/x' doesn't exist") if exc == "not_found" else exc

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    monkeypatch.setattr("c2c_core.io.prompts.hub.require_hub", lambda *a, **k: None)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    with pytest.raises(UserError, match=match):
        load_hf_dataset("nope/x", config="zz")
