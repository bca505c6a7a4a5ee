"""`compare` pairs records by (id, mode, repeat) and gates on the median of the per-pair ratios
with a bootstrap interval: a 20 % slowdown is caught on prompts whose lengths vary 10x, a noisy
re-run is not, and files that cannot be compared exit 2 instead of passing."""

from __future__ import annotations

import json

import numpy as np
import pytest

from c2c_core import analysis as A
from c2c_core.cli import main


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
    assert (t["verdict"] == "too few pairs").all() and not t["regression"].any()


def test_cli_compare_exit_codes(tmp_path, capsys):
    base = _write(tmp_path / "base.jsonl", _records(seed=1))
    slow = _write(tmp_path / "slow.jsonl", _records(factor=1.2, seed=2))
    rerun = _write(tmp_path / "rerun.jsonl", _records(seed=3))
    assert main(["compare", base, slow]) == 1
    out = capsys.readouterr().out
    assert "REGRESSION" in out and "c2c: 80 pair(s) by (id, mode, repeat)" in out
    assert json.loads(out.strip().splitlines()[-1])["pairs"] == {"c2c": 80}
    assert main(["compare", base, rerun]) == 0
    assert "No regression" in capsys.readouterr().out
    # a candidate without timing records must not pass the gate
    empty = _write(tmp_path / "notiming.jsonl", [{"id": i, "prompt": f"p{i}"} for i in range(40)])
    assert main(["compare", base, empty]) == 2
    assert "has no timing records" in capsys.readouterr().err
    # no prompt in common: nothing to pair
    other = _write(tmp_path / "other.jsonl",
                   _records(seed=4, ids={i: f"x{i}" for i in range(40)}))
    assert main(["compare", base, other]) == 2
    assert "share no prompt ids" in capsys.readouterr().err
    # too few pairs to tell a change from noise
    few = _write(tmp_path / "few.jsonl", _records(n_prompts=40, repeats=2, seed=5)[:3])
    assert main(["compare", base, few]) == 2
    assert "--min_pairs" in capsys.readouterr().err
