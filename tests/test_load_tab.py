"""The Load tab's sweep (frontends/load.app_load, what the app's worker runs) on the tiny pair:
our server on a free local port, the load generator's records, per point statistics, the
summary and HTML page beside the JSONL; Stop keeps every finished request; the tab's caps are
sentences."""

from __future__ import annotations

import json
import os
import threading
from dataclasses import replace

import pytest

from c2c_core.frontends.load_app import app_load, html_path
from c2c_core.io.prompts import PromptItem
from c2c_core.io.records import JsonlWriter, iter_jsonl
from c2c_core.measure import cancel
from c2c_core.report import load as L
from c2c_core.spec.errors import UserError

PROMPTS = ["What is the capital of France?", "Say hello.", "What is 25 * 17?"]


@pytest.fixture(scope="module")
def small(tiny_cfg_kwargs):
    """The tiny pair with loud weights (text in every answer: a stream without text is a failed
    request, as vLLM's bench counts it), EOS ignored, 4 tokens an answer."""
    from c2c_core.engines import fast
    from c2c_core.models.loading import load_pipeline
    from c2c_core.spec.config import build_run_config
    from conftest import loud_weights
    cfg = build_run_config(**{**tiny_cfg_kwargs, "max_new_tokens": 4}, engine="fast",
                           ignore_eos=True)
    pipe = load_pipeline(cfg)
    loud_weights(pipe)
    fast.engine_for(pipe, compile=False)
    return pipe, cfg


def _items():
    return [PromptItem(i + 1, p) for i, p in enumerate(PROMPTS)]


def test_app_load_writes_requests_points_and_pages(small, tmp_path):
    pipe, cfg = small
    path = str(tmp_path / "load-1.jsonl")
    seen = []
    with JsonlWriter(path) as w:
        points = app_load(pipe, cfg, _items(), writer=w,
                          on_progress=lambda d, t, r: seen.append((d, t, r is None)),
                          should_stop=lambda: False, modes=["c2c", "receiver"],
                          rates=[20.0], num_requests=3, slo={"ttft_ms": 60000}, slots=2)
    recs = list(iter_jsonl(path))
    assert not any(r.get("error") for r in recs), [r.get("error") for r in recs]
    assert len(recs) == 6 and all(L.is_load_record(r) for r in recs)
    assert not any(r.get("error") for r in recs), [r.get("error") for r in recs]
    assert {r["mode"] for r in recs} == {"c2c", "receiver"}
    assert seen[0] == (0, 6, True) and seen[-1][:2] == (6, 6)
    assert len(points) == 2 and all(p["requests"] == 3 for p in points)
    c2c = [r for r in recs if r["mode"] == "c2c"]
    # the server's own split of TTFT reached the client: the projection ran for c2c only
    assert all(r["server"]["stages"].get("projector_total_ms", 0) > 0 for r in c2c)
    summary = json.load(open(path[:-6] + ".summary.json"))
    assert summary["kind"] == "load_summary" and len(summary["points"]) == 2
    page = open(html_path(path)).read()
    assert "<script src=\"http" not in page and "latency" in page.lower()


def test_stop_keeps_finished_requests(small, tmp_path):
    pipe, cfg = small
    path = str(tmp_path / "load-2.jsonl")
    stop = threading.Event()

    def progress(done, total, rec):
        if done >= 2:
            stop.set()

    with JsonlWriter(path) as w, pytest.raises(cancel.Cancelled):
        app_load(pipe, cfg, _items(), writer=w, on_progress=progress, should_stop=stop.is_set,
                 modes=["receiver"], rates=[2.0], num_requests=10, slots=2)
    recs = list(iter_jsonl(path))
    assert 2 <= len(recs) < 10
    assert os.path.exists(path[:-6] + ".summary.json") or len(recs) < 10


@pytest.mark.parametrize("args, words", [
    (([], "1", 3, 8, 2, ""), "at least one mode"),
    ((["c2c"], "9", 3, 8, 2, ""), "cap of"),
    ((["c2c"], "1", 99, 8, 2, ""), "Requests per point"),
    ((["c2c"], "0.01", 6, 8, 2, ""), "take 600 s"),
    ((["c2c", "t2t", "receiver", "sharer"], "0.5,1,1.5,2", 3, 8, 2, ""), "points"),
    ((["c2c"], "1", 3, 8, 99, ""), "Slots"),
    ((["c2c"], "1", 3, 8, 2, "ttft=3"), "ttft"),
    ((["gpt"], "1", 3, 8, 2, ""), "Unknown mode"),
])
def test_tab_caps_are_sentences(args, words):
    from c2c_core.frontends.ui.load_tab import check_load
    with pytest.raises(UserError, match=words):
        check_load(*args)


def test_the_end_says_how_many_requests_failed(tmp_path):
    from c2c_core.frontends.ui.load_tab import render
    path = tmp_path / "load-3.jsonl"
    base = {"kind": L.KIND, "point": 0, "mode": "c2c", "rate": 1.0, "slo": {}, "sent_s": 0.0}
    recs = [{**base, "request": 0, "error": None, "status": 200, "ttft_ms": 10.0,
             "e2e_ms": 20.0, "token_times_ms": [10.0, 20.0], "output_tokens": 2, "end_s": 0.02},
            {**base, "request": 1, "error": "no text streamed", "status": 200, "end_s": 0.5}]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    status = render([], "**Done:** 2 record(s)", str(path))[0]
    assert "1 of 2 request(s) failed" in status and "no text streamed" in status


@pytest.mark.parametrize("args, box, words", [
    ((["c2c"], "1e9", 3, 8, 2, ""), 1, "Offered rate"),
    ((["c2c"], "x" * 300, 3, 8, 2, ""), 1, "Offered rates is 300 characters"),
    ((["c2c"], "1", 10**9, 8, 2, ""), 2, "Requests per point"),
    ((["c2c"], "1", 3, 10**9, 2, ""), 3, "Max tokens"),
    ((["c2c"], "1", 3, 8, -5, ""), 4, "Slots"),
    ((["c2c"], "1", 3, 8, 2, "ttft_ms=nan"), 5, "SLO ttft_ms=nan"),
    ((["c2c"], "1", 3, 8, 2, "speed=3"), 5, "SLO part 'speed=3'"),
])
def test_the_validator_marks_the_box_that_was_refused(args, box, words):
    """The page turns the refused box red with the sentence under it, not the first box; the
    SLO's sentence names the box, not the CLI's --slo flag."""
    from c2c_core.frontends.ui.load_tab import check_load
    from c2c_core.frontends.ui.texts import validator
    out = validator(check_load)(*args)
    bad = [i for i, v in enumerate(out) if not v["is_valid"]]
    assert bad == [box], out
    assert words in out[box]["message"] and "--slo" not in out[box]["message"]
