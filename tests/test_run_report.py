"""The run report: every CLI run writes `<stem>.summary.json` (settings, environment, per-mode
statistics); `report --html` is one self-contained, escaped page; `run CONFIG.yaml` sweeps a
command over the axes a config file lists."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from c2c_core.frontends.cli import main
from c2c_core.io.records import read_records, write_all
from c2c_core.report.runreport import build_summary, summary_path


@pytest.fixture()
def model_args(tiny_models):
    return ["--base_model", tiny_models["receiver"], "--teacher_model", tiny_models["sharer"],
            "--hidden_dim", "32", "--intermediate_dim", "32", "--device", "cpu",
            "--max_new_tokens", "5", "--warmup", "0"]


@pytest.fixture(scope="module")
def run_file(tiny_models, tmp_path_factory):
    """A batch of two prompts in modes c2c and receiver, with its summary."""
    out = tmp_path_factory.mktemp("rr") / "b.jsonl"
    assert main(["batch", "--output", str(out), "--prompts", "What is 2+2?", "Name a color.",
                 "--mode", "all", "--base_model", tiny_models["receiver"], "--teacher_model",
                 tiny_models["sharer"], "--hidden_dim", "32", "--intermediate_dim", "32",
                 "--device", "cpu", "--max_new_tokens", "5", "--warmup", "0"]) == 0
    return out


def test_summary_path_sits_beside_the_jsonl():
    assert summary_path("runs/x.jsonl") == "runs/x.summary.json"
    assert summary_path("out.txt") == "out.summary.json"


def test_batch_writes_a_summary_with_settings_environment_and_statistics(run_file):
    s = json.loads((run_file.parent / "b.summary.json").read_text())
    recs = read_records(run_file)
    assert s["records"] == len(recs)
    # settings: what was asked, and what the records say ran
    assert s["settings"]["requested"]["command"] == "batch"
    assert s["settings"]["requested"]["mode"] == "all"
    assert s["settings"]["run_settings"][0]["device"] == "cpu"
    env = s["environment"]
    assert env["torch"] == torch.__version__ and env["transformers"] == transformers.__version__
    assert env["device"] == "cpu" and env["cpu"] and env["threads"] >= 1
    assert 0 < env["cpu_share"]["median"] <= 1.5 and env["cpu_share"]["n"] == len(recs)
    # per mode: count and the percentiles, the stage medians
    modes = s["modes"]
    assert set(modes) == {r["mode"] for r in recs}
    for mode, per in modes.items():
        mine = [r for r in recs if r["mode"] == mode]
        assert per["count"] == len(mine) == 2
        ttfts = sorted(r["timing"]["ttft_ms"] for r in mine)
        assert per["ttft_ms"]["p50"] == pytest.approx(sum(ttfts) / 2, rel=1e-3)
        assert per["ttft_ms"]["p50"] <= per["ttft_ms"]["p90"] <= per["ttft_ms"]["p99"]
        for m in ("tpot_ms", "e2e_ms", "decode_avg_ms", "tokens_per_second"):
            assert set(per[m]) >= {"n", "mean", "p50", "p90", "p99"}
        assert per["stage_medians_ms"]["decode_total_ms"] > 0


def test_summary_of_contended_records_says_so(run_file):
    recs = read_records(run_file)
    for r in recs:
        r["timing"]["cpu_share"] = 0.4
    s = build_summary(recs)
    assert s["environment"]["cpu_share"]["contended"] is True
    assert "another program was using the cores" in s["environment"]["cpu_share"]["note"]
    assert any("another program" in n for n in s["notes"])


def test_profile_and_sweep_write_their_summaries(tmp_path, model_args):
    prof = tmp_path / "p.jsonl"
    assert main(["profile", "--prompt", "Hi", "--output", str(prof), *model_args]) == 0
    s = json.loads((tmp_path / "p.summary.json").read_text())
    assert s["records"] == 1 and s["settings"]["requested"]["command"] == "profile"
    sw = tmp_path / "s.jsonl"
    assert main(["sweep", "--input_lens", "4,8", "--output_lens", "3", "--output", str(sw),
                 *model_args]) == 0
    s = json.loads((tmp_path / "s.summary.json").read_text())
    assert s["records"] == 2 and s["modes"]["c2c"]["count"] == 2
    # a sweep's summary also has each shape on its own
    assert [(r["input_len"], r["output_len"], r["count"]) for r in s["shapes"]] == [(4, 3, 1),
                                                                                   (8, 3, 1)]
    assert all(r["ttft_ms p50"] > 0 for r in s["shapes"])


def test_a_file_of_two_settings_is_summarized_per_run_too(run_file):
    recs = read_records(run_file)
    other = json.loads(json.dumps(recs))
    for r in other:
        r["run"]["settings"]["dtype"] = "bfloat16"
    s = build_summary(recs + other)
    assert s["modes"]["c2c"]["count"] == 4  # pooled
    assert [r["settings"]["dtype"] for r in s["runs"]] == ["float32", "bfloat16"]
    assert all(r["modes"]["c2c"]["count"] == 2 for r in s["runs"])
    assert any("2 runs with different settings" in n for n in s["notes"])


def test_report_html_is_one_escaped_self_contained_page(run_file, tmp_path, capsys):
    recs = read_records(run_file)
    for r in recs:  # strangers' records: markup in an id, a prompt and the run metadata
        r["id"] = "<script>alert('id')</script>"
        r["prompt"] = "</script><script>alert('prompt')</script>"
        r["run"]["cpu"] = "<img src=x onerror=alert('cpu')>"
    evil = tmp_path / "evil.jsonl"
    write_all(evil, recs)
    page = tmp_path / "r.html"
    assert main(["report", str(run_file), str(evil), "--html", str(page)]) == 0
    text = page.read_text(encoding="utf-8")
    assert "<script>alert" not in text and "<img src=x" not in text
    assert "&lt;img src=x onerror=alert(&#x27;cpu&#x27;)&gt;" in text  # shown, as text
    # the run metadata and per-mode tables, for both files
    assert "Run metadata" in text and torch.__version__ in text
    assert text.count("Statistics per mode") == 2 and "TTFT ms p50" in text
    assert "Stage medians" in text and "c2c over receiver" in text
    # the charts work offline: plotly's JS inline, no script loaded from elsewhere
    assert _loaded_from_elsewhere(text) == []
    assert text.count("Plotly.newPlot") >= 2 and len(text) > 1_000_000


def _loaded_from_elsewhere(text: str) -> list[str]:
    """The addresses the page's tags would load (script src, link href, img src)."""
    from html.parser import HTMLParser
    found = []

    class Tags(HTMLParser):
        def handle_starttag(self, tag, attrs):
            for k, v in attrs:
                if (tag, k) in {("script", "src"), ("link", "href"), ("img", "src")} and v:
                    found.append(v)
    Tags().feed(text)
    return found


def test_run_config_refuses_an_output_file_for_its_folder(tmp_path, capsys):
    cfg = _config(tmp_path, "command: batch\noutput: out.jsonl\n")
    assert main(["run", str(cfg)]) == 2
    assert "output is a folder for the experiment's files" in capsys.readouterr().err


def _config(tmp_path, text: str):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(text)
    return cfg


def _models_yaml(tiny_models, out) -> str:
    return (f"output: {out}\nbase_model: {tiny_models['receiver']}\n"
            f"teacher_model: [{tiny_models['sharer']}]\nhidden_dim: 32\nintermediate_dim: 32\n"
            "device: cpu\nmax_new_tokens: 4\nwarmup: 0\n")


def test_run_config_sweeps_every_combination_into_its_own_file(tmp_path, tiny_models, capsys):
    out = tmp_path / "exp"
    cfg = _config(tmp_path, _models_yaml(tiny_models, out)
                  + "command: batch\nprompts: [\"One plus one?\", \"Two plus two?\"]\n"
                    "dtype: [float32, bfloat16]\nbatch_size: [1, 2]\n")
    page = tmp_path / "exp.html"
    assert main(["run", str(cfg), "--html", str(page)]) == 0
    whole = json.loads((out / "experiment.summary.json").read_text())
    assert whole["status"] == "complete" and whole["axes"] == ["batch_size", "dtype"]
    points = whole["points"]
    assert len(points) == 4
    assert {(p["settings"]["dtype"], p["settings"]["batch_size"]) for p in points} == {
        ("float32", 1), ("float32", 2), ("bfloat16", 1), ("bfloat16", 2)}
    for p in points:
        recs = read_records(p["output"])
        assert len(recs) == 2 and p["records"] == 2  # the prompt list passed whole
        assert {r["run"]["dtype"] for r in recs} == {p["settings"]["dtype"]}
        assert {r.get("batch_size", 1) for r in recs} == {p["settings"]["batch_size"]}
        assert p["modes"]["c2c"]["count"] == 2
        assert json.loads(open(p["summary"]).read())["records"] == 2
    text = page.read_text(encoding="utf-8")
    assert text.count("Statistics per mode") == 4
    # a point with the models of the one before it keeps them: (float32, 2), (bfloat16, 2)
    said = capsys.readouterr()
    assert said.err.count("Models of the previous point kept") == 2
    # the closing table: a row per point and mode with its axes and medians
    table = said.out[said.out.index("Wrote " + str(out / "experiment.summary.json")):]
    assert "TTFT ms p50" in table and "bfloat16" in table
    assert sum(line.split()[:1] in (["p01"], ["p02"], ["p03"], ["p04"])
               for line in table.splitlines()) == 4


def test_a_failing_point_stops_the_experiment_and_keeps_what_ran(tmp_path, tiny_models,
                                                                  capsys):
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_text(json.dumps({"prompt": "What is 3 + 4?"}) + "\n")
    bad.write_text('{"prompt": "ok"}\n{not json}\n')
    out = tmp_path / "exp"
    cfg = _config(tmp_path, _models_yaml(tiny_models, out)
                  + f"command: dataset\ndataset_file: [{good}, {bad}]\n")
    assert main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "line 2" in err[-1] and "Traceback" not in err[-2]
    whole = json.loads((out / "experiment.summary.json").read_text())
    assert whole["status"] == "stopped" and whole["points_planned"] == 2
    first, second = whole["points"]
    assert first["status"] == "done" and first["records"] == 1
    assert len(read_records(first["output"])) == 1  # the finished point's records are kept
    assert second["status"] == "failed" and second["records"] == 0


@pytest.mark.parametrize("body, said", [
    ("dtpye: [float32]\n", "unknown key 'dtpye' for command batch; allowed keys: command,"
                           " output,"),
    ("command: engines\n", "command 'engines' cannot run from a config file"),
    ("dtype: [float32, float99]\n", "float99"),
    ("batch_size: []\n", "batch_size is an empty list"),
    ("ignore_eos: maybe\n", "exp.yaml: ignore_eos is a switch: give it true or false"),
    ("dtype: float32\ndtype: [bfloat16]\n", "key 'dtype' is given twice (lines 9 and 10)"),
    ("- a\n- b\n", "must hold a mapping of settings"),
    ("dtype: [float32\n", "is not valid YAML"),
])
def test_run_config_refuses_a_bad_file_in_one_sentence_before_any_run(tmp_path, tiny_models,
                                                                       capsys, body, said):
    out = tmp_path / "exp"
    head = "" if body.startswith("-") else _models_yaml(tiny_models, out)
    cfg = _config(tmp_path, head + body)
    assert main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: ") and said in err[-1]
    assert "Traceback" not in "\n".join(err)
    assert not (out / "experiment.summary.json").exists()  # nothing ran
