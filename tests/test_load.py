"""`python -m c2c_core load`: the statistics on synthetic requests (report.load), the arrival
process, and whole runs against a fake OpenAI streaming server with known delays (no model).
Latencies are asserted only as lower bounds (the known delays): the machine is shared."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fake_openai import FakeServer  # noqa: E402

from c2c_core.frontends import load as F  # noqa: E402
from c2c_core.frontends.cli import main  # noqa: E402
from c2c_core.report import load as L  # noqa: E402
from c2c_core.spec.errors import UserError  # noqa: E402


def _req(sent, ttft, e2e, tokens=5, error=None, status=200, mode="c2c", rate=1.0, times=None,
         queue=None, stages=None):
    """A synthetic load record: `times` its text chunks' arrival (ms after sent)."""
    times = times if times is not None or error is not None else (
        [ttft + k * (e2e - ttft) / (tokens - 1) for k in range(tokens)] if tokens > 1 else [ttft])
    rec = {"kind": L.KIND, "point": 0, "mode": mode, "rate": rate, "concurrency": None,
           "sent_s": sent, "end_s": sent + e2e / 1000, "error": error, "status": status,
           "e2e_ms": e2e}
    if error is None:
        rec.update(ttft_ms=ttft, token_times_ms=times, output_tokens=tokens,
                   itl_ms=L.itl_of(times), tpot_ms=L.tpot_of(ttft, e2e, tokens))
    else:
        rec.update(ttft_ms=None)
    if queue is not None:
        rec["queue_ms"] = queue
    if stages is not None:
        rec["stages"] = stages
    return rec


# --- definitions ------------------------------------------------------------------------------

def test_tpot_and_itl_definitions():
    assert L.itl_of([100.0, 130.0, 150.0, 200.0]) == [30.0, 20.0, 50.0]
    assert L.itl_of([100.0]) == []
    # (E2E - TTFT) / (tokens - 1)
    assert L.tpot_of(100.0, 400.0, 4) == pytest.approx(100.0)
    assert L.tpot_of(100.0, 100.0, 1) is None
    assert L.tpot_of(None, 100.0, 3) is None


def test_point_statistics_percentiles_rates_and_goodput():
    ttfts = [10.0 * (k + 1) for k in range(10)]            # 10 .. 100 ms
    recs = [_req(sent=k * 0.5, ttft=t, e2e=t + 400, tokens=5) for k, t in enumerate(ttfts)]
    recs.append(_req(sent=5.0, ttft=None, e2e=20, error="HTTP 500: boom", status=500))
    st = L.point_stats(recs, slo={"ttft_ms": 55.0, "tpot_ms": 150.0})
    assert st["requests"] == 11 and st["completed"] == 10 and st["errors"] == 1
    assert st["error_rate"] == pytest.approx(1 / 11, abs=1e-4)
    assert st["ttft_ms"]["p50"] == pytest.approx(np.percentile(ttfts, 50))
    assert st["ttft_ms"]["p90"] == pytest.approx(np.percentile(ttfts, 90))
    assert st["ttft_ms"]["p99"] == pytest.approx(np.percentile(ttfts, 99))
    assert st["ttft_ms"]["mean"] == pytest.approx(np.mean(ttfts))
    assert st["tpot_ms"]["p50"] == pytest.approx(100.0)     # 400 ms over 4 gaps
    assert st["itl_ms"]["p50"] == pytest.approx(100.0)
    # the window: first sent 0 s, last end: the request sent at 4.5 s with E2E 500 ms -> 5.0 s;
    # the failed one ends at 5.02 s
    span = 5.02
    assert st["duration_s"] == pytest.approx(span)
    assert st["achieved_rps"] == pytest.approx(10 / span, rel=1e-3)
    assert st["output_tps"] == pytest.approx(50 / span, rel=1e-3)
    # TTFT <= 55 ms: 5 requests, TPOT 100 <= 150 for all
    assert st["goodput_rps"] == pytest.approx(5 / span, rel=1e-3)
    # a tighter TPOT bound fails every request
    assert L.point_stats(recs, slo={"tpot_ms": 99.0})["goodput_rps"] == 0
    # no SLO: goodput is the achieved rate
    assert L.point_stats(recs)["goodput_rps"] == st["achieved_rps"]


def test_one_token_request_has_no_tpot_and_meets_a_tpot_bound():
    r = _req(sent=0, ttft=50, e2e=50, tokens=1)
    assert r["tpot_ms"] is None
    assert L.meets_slo(r, {"tpot_ms": 1.0})
    assert not L.meets_slo(r, {"ttft_ms": 10.0})


def test_ttft_split_medians():
    stages = {"teacher_prefill_ms": 30.0, "projector_total_ms": 5.0, "base_prefill_ms": 20.0}
    recs = [_req(sent=k, ttft=100.0, e2e=200, queue=10.0 * k, stages=stages) for k in range(3)]
    st = L.point_stats(recs)
    split = st["ttft_split_p50_ms"]
    assert split == {"queue_ms": 10.0, "sharer_prefill_ms": 30.0, "projection_ms": 5.0,
                     "note_ms": 0.0, "receiver_prefill_ms": 20.0, "other_ms": 35.0}
    # t2t: the sharer's note is its own part, not "other"
    t2t = {"teacher_prefill_ms": 30.0, "sharer_decode_ms": 40.0, "base_prefill_ms": 20.0}
    st = L.point_stats([_req(sent=0, ttft=100.0, e2e=200, queue=0.0, stages=t2t)])
    assert st["ttft_split_p50_ms"]["note_ms"] == 40.0 and st["ttft_split_p50_ms"]["other_ms"] == 10.0


def test_sustained_is_judged_against_the_rate_sent():
    """A short point's Poisson arrivals stray from the nominal rate: goodput is compared with
    the rate the requests were actually sent at."""
    st = {"rate": 0.0875, "sent_rps": 0.068, "goodput_rps": 0.075, "overloaded": False}
    assert L.sustains(st)
    assert not L.sustains({**st, "sent_rps": 0.2})
    assert L.point_stats([_req(sent=0, ttft=10, e2e=20)])["ttft_split_p50_ms"] is None


def test_parse_slo():
    assert L.parse_slo("ttft_ms=500, tpot_ms=50") == {"ttft_ms": 500.0, "tpot_ms": 50.0}
    assert L.parse_slo(None) == {}
    for bad in ("ttft=5", "ttft_ms=abc", "e2e_ms=-1", "ttft_ms"):
        with pytest.raises(UserError):
            L.parse_slo(bad)


# --- the overload rule ------------------------------------------------------------------------

def _steady(n=20, rate=10.0, e2e=50.0):
    return [_req(sent=k / rate, ttft=20, e2e=e2e, rate=rate) for k in range(n)]


def test_overload_rule_steady_server_is_not_overloaded():
    st = L.point_stats(_steady(), max_error_rate=0.05)
    assert not st["overloaded"], st["overload_reason"]


def test_overload_rule_queue_growth_by_ttft_halves():
    # one slot of 200 ms, arrivals every 100 ms: the k-th waits k * 100 ms
    recs = [_req(sent=k * 0.1, ttft=50 + 100 * k, e2e=200 + 100 * k, rate=10.0)
            for k in range(20)]
    st = L.point_stats(recs)
    assert st["overloaded"] and "TTFT median grew" in st["overload_reason"]
    # the same growth in a few ms (jitter) is no queue: the 50 ms floor
    small = [_req(sent=k * 0.1, ttft=1 + 0.5 * k, e2e=50, rate=10.0) for k in range(20)]
    assert not L.point_stats(small)["overloaded"]


def test_overload_rule_falling_behind_needs_in_flight_growth():
    # TTFT flat, but the requests stay longer and longer: in flight grows, achieved << offered
    recs = [_req(sent=k * 0.1, ttft=20, e2e=100 + 400 * k, rate=10.0) for k in range(20)]
    st = L.point_stats(recs)
    assert st["achieved_rps"] < 0.9 * 10
    assert st["in_flight_second_half"] >= 1.5 * st["in_flight_first_half"]
    assert st["overloaded"] and "in flight grew" in st["overload_reason"]
    # achieved below the offered rate with steady in-flight (a slow point, one long tail):
    # not overloaded by rule 1
    flat = _steady(n=10, rate=10.0, e2e=50.0)
    flat[-1] = _req(sent=0.9, ttft=20, e2e=3000, rate=10.0)
    st = L.point_stats(flat)
    assert st["achieved_rps"] < 9 and not st["overloaded"], st


def test_overload_rule_error_rate():
    recs = _steady(n=20)
    recs[3] = _req(sent=0.3, ttft=None, e2e=1, error="HTTP 429: full", status=429)
    assert not L.point_stats(recs, max_error_rate=0.05)["overloaded"]   # 1/20 = 5%: not above
    recs[4] = _req(sent=0.4, ttft=None, e2e=1, error="HTTP 429: full", status=429)
    st = L.point_stats(recs, max_error_rate=0.05)
    assert st["overloaded"] and st["errors_429"] == 2 and "failed" in st["overload_reason"]
    assert not L.point_stats(recs, max_error_rate=0.2)["overloaded"]


def test_overload_verdict_on_a_stats_dict():
    base = {"rate": 10.0, "achieved_rps": 10.0, "in_flight_first_half": 1.0,
            "in_flight_second_half": 1.0, "ttft_p50_first_half_ms": 50.0,
            "ttft_p50_second_half_ms": 60.0, "error_rate": 0.0, "errors": 0, "requests": 20}
    assert L.overload_verdict(base) == (False, "")
    assert L.overload_verdict({**base, "achieved_rps": 5.0, "in_flight_second_half": 4.0})[0]
    assert not L.overload_verdict({**base, "achieved_rps": 5.0})[0]
    assert L.overload_verdict({**base, "ttft_p50_second_half_ms": 200.0})[0]
    assert L.overload_verdict({**base, "error_rate": 0.5, "errors": 10})[0]


def test_sustains():
    assert L.sustains({"rate": 2.0, "goodput_rps": 1.9, "overloaded": False})
    assert not L.sustains({"rate": 2.0, "goodput_rps": 1.7, "overloaded": False})
    assert not L.sustains({"rate": 2.0, "goodput_rps": 2.0, "overloaded": True})


# --- arrivals ---------------------------------------------------------------------------------

@pytest.mark.parametrize("burstiness", [0.5, 1.0, 4.0])
def test_arrival_gaps_have_the_rate_as_mean_and_gamma_spread(burstiness):
    rng = np.random.default_rng(7)
    gaps = F.arrival_gaps(4.0, 40_000, burstiness, rng)
    assert gaps.mean() == pytest.approx(0.25, rel=0.05)
    # gamma with shape k: coefficient of variation 1 / sqrt(k) (1 for Poisson)
    assert gaps.std() / gaps.mean() == pytest.approx(1 / np.sqrt(burstiness), rel=0.08)


def test_send_times_by_count_and_duration():
    rng = np.random.default_rng(1)
    t = F.send_times(10.0, 1.0, rng, num_requests=5, duration=None)
    assert len(t) == 5 and t[0] == 0 and all(b >= a for a, b in zip(t, t[1:]))
    t = F.send_times(50.0, 1.0, np.random.default_rng(2), num_requests=None, duration=2.0)
    assert max(t) < 2.0 and 60 < len(t) < 140      # ~100 expected


# --- whole runs against a fake server ---------------------------------------------------------

def _run(tmp_path, url, *extra, name="load"):
    out = tmp_path / f"{name}.jsonl"
    rc = main(["load", "--url", url, "--output", str(out), *extra])
    return rc, out


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_run_measures_known_delays_and_writes_jsonl_summary_html(tmp_path, capsys):
    html = tmp_path / "load.html"
    with FakeServer.process(ttft_s=0.08, itl_s=0.02, tokens=4) as srv:
        rc, out = _run(tmp_path, srv.url, "--modes", "c2c,t2t", "--rates", "20",
                       "--num_requests", "6", "--html", str(html), "--slo", "ttft_ms=5000")
    assert rc == 0
    recs = _lines(out)
    assert len(recs) == 12 and all(r["kind"] == "load_request" for r in recs)
    assert [r["mode"] for r in recs[:6]] == ["c2c"] * 6 and recs[0]["rate"] == 20.0
    assert all(r["error"] is None and r["output_tokens"] == 4 for r in recs)
    # per request only what the delays guarantee: a chunk never comes early (two chunks read
    # together give a gap of ~0, so a single ITL has no lower bound)
    assert all(r["ttft_ms"] >= 80 and r["e2e_ms"] >= 80 + 3 * 20 for r in recs)
    assert all(r["token_times_ms"][-1] >= 80 + 3 * 20 for r in recs)
    summary = json.loads((tmp_path / "load.summary.json").read_text())
    assert summary["kind"] == "load_summary"
    assert summary["settings"]["requested"]["rates"] == [20.0]
    assert [p["mode"] for p in summary["points"]] == ["c2c", "t2t"]
    for p in summary["points"]:
        assert p["requests"] == 6 and p["errors"] == 0
        assert p["ttft_ms"]["p50"] >= 80 and p["e2e_ms"]["p50"] >= 80 + 3 * 20
        # ITL and TPOT have no lower bound a busy machine keeps (a client starved of its CPU
        # reads the chunks together: gaps of ~0, seen in CI at ITL p50 0.07 ms); they must be
        # what the point's own records give: every chunk gap, and (E2E - TTFT) / (tokens - 1)
        mine = [r for r in recs if r["mode"] == p["mode"]]
        gaps = [g for r in mine for g in np.diff(r["token_times_ms"])]
        tpots = [(r["e2e_ms"] - r["ttft_ms"]) / (r["output_tokens"] - 1) for r in mine]
        assert p["itl_ms"]["p50"] == pytest.approx(float(np.percentile(gaps, 50)), abs=0.01)
        assert p["tpot_ms"]["p50"] == pytest.approx(float(np.percentile(tpots, 50)), abs=0.01)
        split = p["ttft_split_p50_ms"]
        assert split["sharer_prefill_ms"] == pytest.approx(32.0)
        assert split["receiver_prefill_ms"] == pytest.approx(24.0)
    page = html.read_text()
    assert "<script src=\"http" not in page and "<script src='http" not in page
    assert "plotly" in page.lower() and "Goodput against offered rate" in page
    assert "TTFT split" in page
    err = capsys.readouterr().err
    assert "Load point 1 of 2: c2c at 20 req/s" in err and "Load point 2 of 2" in err

    # report and compare read the load file: its per-point table, the per-point differences
    assert main(["report", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "TTFT p50" in printed and json.loads(printed.strip().splitlines()[-1])["kind"] == "load"
    page2 = tmp_path / "report.html"
    assert main(["report", str(out), "--html", str(page2)]) == 0
    assert "Latency against achieved throughput" in page2.read_text()
    capsys.readouterr()
    assert main(["compare", str(out), str(out)]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["kind"] == "load" and last["status"] == "ok"
    rows = [r for r in last["rows"] if r["metric"] == "ttft_ms p50"]
    assert len(rows) == 2 and all(r["B/A"] == 1 for r in rows)


def test_429_counts_errors_and_stops_raising_the_rate(tmp_path, capsys):
    with FakeServer.process(status=429) as srv:
        rc, out = _run(tmp_path, srv.url, "--modes", "c2c", "--rates", "20,40",
                       "--num_requests", "5")
    assert rc == 0
    recs = _lines(out)
    assert len(recs) == 5                     # the 40 req/s point never ran
    assert all(r["status"] == 429 and r["error"].startswith("HTTP 429") for r in recs)
    assert "queue is full" in recs[0]["error"]
    summary = json.loads((tmp_path / "load.summary.json").read_text())
    (p,) = summary["points"]
    assert p["errors"] == 5 and p["errors_429"] == 5 and p["overloaded"]
    assert "c2c" in summary["stopped"]
    assert "c2c is overloaded at 20 req/s" in capsys.readouterr().err


def test_growing_queue_is_overloaded_and_the_sweep_stops(tmp_path, capsys):
    # one request at a time, 80 ms each (12.5/s at most): 40 req/s makes the queue grow, the
    # k-th request waiting about k x 55 ms
    with FakeServer.process(ttft_s=0.06, itl_s=0.01, tokens=3, slots=1) as srv:
        rc, out = _run(tmp_path, srv.url, "--modes", "c2c,t2t", "--rates", "40,80",
                       "--num_requests", "20", "--burstiness", "50")
    assert rc == 0
    summary = json.loads((tmp_path / "load.summary.json").read_text())
    assert [(p["mode"], p["rate"]) for p in summary["points"]] == [("c2c", 40.0), ("t2t", 40.0)]
    for p in summary["points"]:
        assert p["overloaded"] and p["errors"] == 0, p
        assert p["ttft_p50_second_half_ms"] > p["ttft_p50_first_half_ms"]
        assert p["ttft_split_p50_ms"]["queue_ms"] > 0
    assert set(summary["stopped"]) == {"c2c", "t2t"}
    err = capsys.readouterr().err
    assert "its higher rates are skipped" in err
    assert len(_lines(out)) == 40


def test_find_max_goodput_bisects_between_sustained_and_not(tmp_path, capsys):
    with FakeServer.process(ttft_s=0.04, itl_s=0.005, tokens=3, slots=1) as srv:
        rc, out = _run(tmp_path, srv.url, "--modes", "c2c", "--rates", "4,100",
                       "--num_requests", "6", "--burstiness", "100", "--find_max_goodput")
    assert rc == 0
    summary = json.loads((tmp_path / "load.summary.json").read_text())
    best = summary["max_goodput"]["c2c"]
    rates = [p["rate"] for p in summary["points"]]
    assert rates[:2] == [4.0, 100.0] and len(rates) == 2 + len(best["bisected"])
    # between 4 and 100 req/s; between 0 and 4 when a busy machine did not sustain even 4
    low, high = (4, 100) if L.sustains(summary["points"][0]) else (0, 4)
    assert best["bisected"] and all(low < r < high for r in best["bisected"])
    assert best["unsustained_rps"] is not None and best["unsustained_rps"] <= 100
    if best["sustained_rps"] is not None:      # the machine may be too busy even at 4 req/s
        assert best["sustained_rps"] < best["unsustained_rps"]
    out_text = capsys.readouterr().out
    assert "c2c sustains" in out_text


def test_ctrl_c_keeps_finished_requests_and_writes_the_finished_points(tmp_path, monkeypatch,
                                                                        capsys):
    real = F.LoadRun._point

    async def stop_at_second(self, client, p, k, n):
        if k == 2:
            raise KeyboardInterrupt
        return await real(self, client, p, k, n)
    monkeypatch.setattr(F.LoadRun, "_point", stop_at_second)
    with FakeServer.process(ttft_s=0.01, itl_s=0.005, tokens=2) as srv:
        rc, out = _run(tmp_path, srv.url, "--modes", "c2c,t2t", "--rates", "30",
                       "--num_requests", "4")
    assert rc == 130
    assert len(_lines(out)) == 4
    summary = json.loads((tmp_path / "load.summary.json").read_text())
    assert summary["interrupted"] is True and len(summary["points"]) == 1
    assert "Interrupted" in capsys.readouterr().err


def test_closed_loop_concurrency(tmp_path):
    with FakeServer.process(ttft_s=0.02, itl_s=0.005, tokens=2, c2c=False) as srv:
        rc, out = _run(tmp_path, srv.url, "--modes", "receiver", "--concurrency", "2",
                       "--num_requests", "6")
    assert rc == 0
    recs = _lines(out)
    assert len(recs) == 6 and all(r["concurrency"] == 2 and r["rate"] is None for r in recs)
    assert all("stages" not in r for r in recs)  # a server without the c2c object
    summary = json.loads((tmp_path / "load.summary.json").read_text())
    assert summary["points"][0]["ttft_split_p50_ms"] is None


def test_refusals_before_any_request(tmp_path, capsys):
    with FakeServer.process() as srv:
        rc, out = _run(tmp_path, srv.url, "--modes", "nope")
    assert rc == 2 and "serves the models" in capsys.readouterr().err
    for bad in (["--rates", "1,x"], ["--rates", "0"], ["--slo", "ttft=1"],
                ["--duration", "1", "--num_requests", "2"], ["--max_error_rate", "2"]):
        assert main(["load", "--url", "http://127.0.0.1:9", "--output",
                     str(tmp_path / "x.jsonl"), *bad]) == 2, bad


def test_report_refuses_mixing_load_and_timing_files(tmp_path, capsys):
    a = tmp_path / "a.jsonl"
    a.write_text(json.dumps(_req(sent=0, ttft=10, e2e=30)) + "\n")
    b = tmp_path / "b.jsonl"
    b.write_text(json.dumps({"id": 1, "mode": "c2c", "timing": {"ttft_ms": 1.0}}) + "\n")
    assert main(["report", str(a), str(b)]) == 2
    assert "load runs only with load runs" in capsys.readouterr().err


def test_without_url_starts_and_closes_our_own_server(tmp_path, monkeypatch):
    """No --url: serve's load_scheduler(cfg, slots, max_queue, max_prompt_tokens) and
    start_server(scheduler, host, port=0) are called with the model flags' config, the sweep
    runs against the handle's URL, and both are closed at the end (stand-ins for serve's API)."""
    import types
    calls = {}

    class Sched:
        def close(self):
            calls["sched_closed"] = True

    def load_scheduler(cfg, slots, max_queue, max_prompt_tokens, writer=None):
        calls["sched"] = (cfg, slots, max_queue, max_prompt_tokens)
        return Sched()

    fake = FakeServer(ttft_s=0.01, itl_s=0.005, tokens=2)

    class Handle:
        url = fake.url

        def close(self):
            calls["server_closed"] = True
            fake.__exit__(None, None, None)

    def start_server(scheduler, host="127.0.0.1", port=0):
        calls["server"] = (type(scheduler).__name__, host, port)
        fake.__enter__()
        return Handle()

    monkeypatch.setitem(sys.modules, "c2c_core.bench.serving",
                        types.SimpleNamespace(load_scheduler=load_scheduler))
    monkeypatch.setitem(sys.modules, "c2c_core.frontends.serve",
                        types.SimpleNamespace(start_server=start_server))
    out = tmp_path / "own.jsonl"
    rc = main(["load", "--modes", "c2c", "--rates", "20", "--num_requests", "3", "--slots", "2",
               "--max_queue", "7", "--output", str(out), "--preset", "smollm2-demo"])
    assert rc == 0
    cfg, slots, max_queue, max_prompt = calls["sched"]
    assert (slots, max_queue, max_prompt) == (2, 7, 2048)
    assert cfg.receiver.source == "smollm2"
    assert calls["server"] == ("Sched", "127.0.0.1", 0)
    assert calls["server_closed"] and calls["sched_closed"]
    assert len(_lines(out)) == 3


def test_prompts_file_and_timeouts(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "first"}\n{"prompt": "second"}\n')
    with FakeServer.process(ttft_s=1.5, itl_s=0.01, tokens=2) as srv:
        rc, out = _run(tmp_path, srv.url, "--modes", "c2c", "--rates", "50",
                       "--num_requests", "3", "--prompts_file", str(prompts), "--timeout", "0.3")
    assert rc == 0
    recs = _lines(out)
    # two prompts in the file (the built-in five would give 0, 1, 2)
    assert sorted(r["prompt_index"] for r in recs) == [0, 0, 1]
    assert all(r["error"] == "timeout after 0.3 s" and r["ttft_ms"] is None for r in recs)
    assert all(r["e2e_ms"] >= 300 for r in recs)
    summary = json.loads((tmp_path / "load.summary.json").read_text())
    (p,) = summary["points"]
    assert p["errors"] == 3 and p["completed"] == 0 and p["overloaded"]
    assert p["ttft_ms"]["p50"] is None and p["achieved_rps"] == 0


def test_a_hostile_first_line_is_left_to_the_reader(tmp_path, capsys):
    """The load sniff reads 4 KiB and no JSON: a deeply nested first line gets report's own
    one-sentence refusal; the sniff looks past a BOM and blank lines before the first record."""
    deep = tmp_path / "deep.jsonl"
    deep.write_text("[" * 100_000 + "]" * 100_000 + "\n")
    assert not F.load_files([str(deep)])
    assert main(["report", str(deep)]) == 2
    lead = tmp_path / "lead.jsonl"
    lead.write_bytes(b"\xef\xbb\xbf\n" + json.dumps(_req(sent=0, ttft=10, e2e=30)).encode() + b"\n")
    assert F.load_files([str(lead)])


def test_modes_take_turns_per_rate_with_the_same_arrivals(tmp_path, monkeypatch):
    schedules = []
    real = F.send_times

    def recorded(*a, **kw):
        schedules.append(real(*a, **kw))
        return schedules[-1]
    monkeypatch.setattr(F, "send_times", recorded)
    with FakeServer.process(ttft_s=0.01, itl_s=0.005, tokens=2) as srv:
        rc, out = _run(tmp_path, srv.url, "--modes", "c2c,t2t", "--rates", "30,60",
                       "--num_requests", "4", "--burstiness", "0.5")
    assert rc == 0
    points = json.loads((tmp_path / "load.summary.json").read_text())["points"]
    order = [(p["mode"], p["rate"]) for p in points]
    assert order[:2] == [("c2c", 30.0), ("t2t", 30.0)]
    if len(order) == 4:  # neither mode judged overloaded at 30/s on this machine
        assert order[2:] == [("c2c", 60.0), ("t2t", 60.0)]
    # both modes at 30/s were sent on one seeded schedule; another rate draws its own
    assert len(schedules) == len(order) and schedules[0] == schedules[1]
    assert len(schedules[0]) == 4 and schedules[0][0] == 0
    if len(order) == 4:
        assert schedules[2] == schedules[3] and schedules[2] != schedules[0]
