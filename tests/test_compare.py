"""`compare` pairs records by (id, mode, repeat) and gates on the median of the per-pair ratios
with a bootstrap interval: a 20 % slowdown is caught on prompts whose lengths vary 10x, a noisy
re-run is not, and files that cannot be compared exit 2 instead of passing."""

from __future__ import annotations

import json

import numpy as np
import pytest

from c2c_core.report import analysis as A
from c2c_core.frontends.cli import main


def _records(n_prompts=40, repeats=2, factor=1.0, noise=0.08, seed=0, modes=("c2c",),
             ids=None):
    """Records of prompts from 100 to 1000 tokens: prefill-bound times grow with the length
    (ttft, e2e), decode per token a little; every value times `factor` and a lognormal noise
    of `noise` (the run-to-run scatter of a busy machine)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n_prompts):
        length = 100 + 900 * i / (n_prompts - 1)  # 10x range of prompt lengths
        for mode in modes:
            for r in range(repeats):
                jit = lambda: float(np.exp(rng.normal(0, noise)))  # noqa: E731
                ttft = 0.5 * length * factor * jit()
                dec = (20 + 0.01 * length) * factor * jit()
                e2e = ttft + 31 * dec
                out.append({
                    "id": (ids or {}).get(i, i), "mode": mode, "repeat": r,
                    "prompt": f"p{i}", "response": "x",
                    "timing": {"ttft_ms": ttft, "e2e_ms": e2e, "decode_avg_ms": dec,
                               "tokens_per_second": 1000 / dec, "prompt_tokens": int(length),
                               "num_generated_tokens": 32},
                    "run": {"device": "cpu"}})
    return out


def _write(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return str(path)


def test_unpaired_spread_would_hide_the_slowdown():
    """Why pairing: across prompts of 10x different lengths the spread dwarfs a 20 % change."""
    a = A.to_frame(_records(seed=1))
    b = A.to_frame(_records(factor=1.2, seed=2))
    change = b["ttft_ms"].median() - a["ttft_ms"].median()
    iqr = a["ttft_ms"].quantile(0.75) - a["ttft_ms"].quantile(0.25)
    assert change < iqr


def test_paired_compare_flags_20pct_slowdown_not_noise():
    base = A.to_frame(_records(seed=1))
    slow = A.compare_runs(base, A.to_frame(_records(factor=1.2, seed=2))).set_index("field")
    assert slow["regression"].all(), slow
    assert slow.loc["ttft_ms", "ratio B/A"] == pytest.approx(1.2, abs=0.04)
    assert slow.loc["ttft_ms", "CI low"] > 1.0
    assert (slow["pairs"] == 80).all()
    assert slow.loc["tokens_per_second", "ratio B/A"] < 1  # higher is better: worse is lower
    noisy = A.compare_runs(base, A.to_frame(_records(factor=1.0, seed=3))).set_index("field")
    assert not noisy["regression"].any() and not noisy["beyond_noise"].any(), noisy
    assert (noisy["verdict"] == "within noise").all()
    faster = A.compare_runs(base, A.to_frame(_records(factor=0.8, seed=4))).set_index("field")
    assert faster["beyond_noise"].all() and not faster["regression"].any()
    assert (faster["verdict"] == "better").all()


def test_bootstrap_interval_is_seeded_and_covers_the_median():
    x = np.random.default_rng(0).lognormal(0, 0.1, 200)
    lo, hi = A.bootstrap_median_ci(x)
    assert A.bootstrap_median_ci(x) == (lo, hi)
    assert lo < np.median(x) < hi and hi - lo < 0.1
    assert all(np.isnan(v) for v in A.bootstrap_median_ci([]))


def test_pairs_by_id_mode_and_repeat_only():
    a = _records(n_prompts=6, repeats=2, modes=("c2c", "receiver"), seed=1)
    b = [r for r in _records(n_prompts=6, repeats=1, modes=("c2c",), seed=2)]  # repeat 0 only
    t = A.compare_runs(A.to_frame(a), A.to_frame(b))
    assert set(t["mode"]) == {"c2c"} and (t["pairs"] == 6).all()
    p = A.pair_frame(A.to_frame(a), A.to_frame(b), "ttft_ms")
    assert sorted(p["repeat"].unique()) == [0] and sorted(p["id"]) == [str(i) for i in range(6)]


def test_too_few_pairs_are_not_judged():
    t = A.compare_runs(A.to_frame(_records(n_prompts=2, repeats=1)),
                       A.to_frame(_records(n_prompts=2, repeats=1, factor=3.0, seed=5)))
    assert (t["verdict"] == "too few pairs").all()
    # not judged is neither "no regression" nor "within noise": None, never False
    assert all(v is None for v in t["regression"]) and all(v is None for v in t["beyond_noise"])
    assert A.regressions(t).empty


def test_some_modes_judged_others_not(tmp_path, capsys):
    """A mode with enough pairs is judged; one with too few says n/a, in the table and JSON."""
    a = _records(n_prompts=8, repeats=1, modes=("c2c",), seed=1)
    a += _records(n_prompts=2, repeats=1, modes=("receiver",), seed=1)
    b = _records(n_prompts=8, repeats=1, modes=("c2c",), seed=2)
    b += _records(n_prompts=2, repeats=1, modes=("receiver",), factor=3.0, seed=2)
    t = A.compare_runs(A.to_frame(a), A.to_frame(b))
    assert all(v is None for v in t.loc[t["mode"] == "receiver", "regression"])
    assert all(v is False for v in t.loc[t["mode"] == "c2c", "regression"])
    pa, pb = _write(tmp_path / "a.jsonl", a), _write(tmp_path / "b.jsonl", b)
    assert main(["compare", pa, pb]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    rows = [line.split() for line in out if ("(ms" in line or "(tok/s)" in line)
            and not line.startswith("{")]
    assert len(rows) == 8
    assert rows and all(r[-1] == ("n/a" if r[0] == "receiver" else "False") for r in rows), out
    text = "\n".join(out)
    assert "receiver: 2 pair(s)" in text and "not judged (--min_pairs 5)" in text
    last = json.loads(out[-1])
    assert last["status"] == "ok" and last["exit"] == 0 and last["regressions"] == []
    assert last["pairs"] == {"c2c": 8, "receiver": 2}
    assert last["metrics"]["receiver"]["ttft_ms"]["regression"] is None
    assert last["metrics"]["receiver"]["ttft_ms"]["verdict"] == "too few pairs"
    assert last["metrics"]["c2c"]["ttft_ms"]["regression"] is False
    assert "receiver ttft_ms" in last["not_judged"] and "not judged" in last["reason"]


def test_cli_compare_exit_codes(tmp_path, capsys):
    base = _write(tmp_path / "base.jsonl", _records(seed=1))
    slow = _write(tmp_path / "slow.jsonl", _records(factor=1.2, seed=2))
    rerun = _write(tmp_path / "rerun.jsonl", _records(seed=3))
    def last_json(out):
        return json.loads(out.strip().splitlines()[-1])

    assert main(["compare", base, slow]) == 1
    out = capsys.readouterr().out
    assert "REGRESSION" in out and "c2c: 80 pair(s) by (id, mode, repeat)" in out
    j = last_json(out)
    assert j["pairs"] == {"c2c": 80} and j["status"] == "regression" and j["exit"] == 1
    assert "c2c ttft_ms" in j["regressions"] and "worse beyond the noise" in j["reason"]
    assert main(["compare", base, rerun]) == 0
    out = capsys.readouterr().out
    assert "No regression" in out
    j = last_json(out)
    assert j["status"] == "ok" and j["regressions"] == [] and j["not_judged"] == []
    assert j["metrics"]["c2c"]["e2e_ms"]["regression"] is False
    # every exit 2 still ends stdout with a JSON line, the reason being the error's sentence
    cannot = []

    def refused(argv, message):
        assert main(argv) == 2
        out, err = capsys.readouterr()
        assert message in err
        j = last_json(out)
        assert j["status"] == "cannot_compare" and j["exit"] == 2 and j["regressions"] == []
        assert message in j["reason"] and err.strip().endswith(j["reason"])
        cannot.append(j)
        return j

    # a candidate without timing records must not pass the gate
    empty = _write(tmp_path / "notiming.jsonl", [{"id": i, "prompt": f"p{i}"} for i in range(40)])
    refused(["compare", base, empty], "has no timing records")
    # no prompt in common: nothing to pair
    other = _write(tmp_path / "other.jsonl",
                   _records(seed=4, ids={i: f"x{i}" for i in range(40)}))
    refused(["compare", base, other], "share no prompt ids")
    # no record at all, and a file that is not there
    nothing = _write(tmp_path / "nothing.jsonl", [])
    refused(["compare", base, nothing], "holds no records")
    refused(["compare", base, str(tmp_path / "missing.jsonl")], "missing.jsonl")
    # too few pairs to tell a change from noise
    few = _write(tmp_path / "few.jsonl", _records(n_prompts=40, repeats=2, seed=5)[:3])
    j = refused(["compare", base, few], "--min_pairs")
    assert j["pairs"] == {"c2c": 3}
    assert j["metrics"]["c2c"]["ttft_ms"]["regression"] is None


def test_too_few_pairs_is_said_per_mode(tmp_path, capsys):
    """The file holds 8 pairs in all, but 2 per mode: the sentence says the count is per mode
    and names each mode's, and no row reads "regression False"."""
    recs = _records(n_prompts=2, repeats=1, modes=("c2c", "receiver", "sharer", "t2t"))
    path = _write(tmp_path / "a.jsonl", recs)
    assert main(["compare", path, path]) == 2
    out, err = capsys.readouterr()
    assert "each mode is judged on its own" in err
    assert "per mode c2c 2, receiver 2, sharer 2, t2t 2 (8 in all" in err
    assert "only 2 paired record(s);" not in err
    table = [line for line in out.splitlines() if "too few pairs" in line
             and not line.startswith("{")]
    assert len(table) == 16 and all(line.split()[-1] == "n/a" for line in table)
    assert "False" not in "\n".join(table)
    j = json.loads(out.strip().splitlines()[-1])
    assert j["status"] == "cannot_compare" and j["pairs"] == {m: 2 for m in
                                                             ("c2c", "receiver", "sharer", "t2t")}
    assert all(v["regression"] is None for m in j["metrics"].values() for v in m.values())
    assert len(j["not_judged"]) == 16
