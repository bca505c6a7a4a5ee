"""Baselines and sweeps: modes, T2T stages, exact-length prompts, run-to-run compare."""

from __future__ import annotations

import json
from dataclasses import replace

from c2c_core.frontends.cli import main
from c2c_core.io.records import check_record, digest_input, read_records
from c2c_core.bench.runner import run_many
from c2c_core.bench.sweep import run_sweep, synthetic_ids


def test_every_mode_gives_complete_records_and_receiver_equals_c2c(tiny_pipe):
    pipe, cfg = tiny_pipe
    cfg = replace(cfg, mode="all", gen=replace(cfg.gen, ignore_eos=True, t2t_note_tokens=5))
    recs = run_many(pipe, cfg, ["What is 25 * 17?", "Say hello"])
    assert [(r["id"], r["mode"]) for r in recs] == [
        (i, m) for i in (1, 2) for m in ("c2c", "receiver", "sharer", "t2t")]
    for r in recs:
        assert check_record(r) == [], (r["mode"], check_record(r))
        # null where this platform cannot measure: reserved memory (CUDA), the decode floor
        # (no known bandwidth on a CPU) and energy (NVML)
        assert {k for k, v in r["timing"].items() if v is None} == {
            "peak_memory_reserved_mb", "decode_floor_ms", "decode_floor_ratio", "energy_j",
            "joules_per_token"}
    by = {(r["id"], r["mode"]): r for r in recs}
    for i in (1, 2):
        assert by[i, "c2c"]["response"] == by[i, "receiver"]["response"]  # gate closed
        assert by[i, "receiver"]["timing"]["teacher_prefill_ms"] == 0
        s = by[i, "sharer"]["timing"]
        assert s["base_prefill_ms"] == 0 and s["teacher_prefill_ms"] > 0 and s["decode_total_ms"] > 0


def test_t2t_holds_both_stages_within_e2e(tiny_pipe):
    pipe, cfg = tiny_pipe
    cfg = replace(cfg, mode="t2t", gen=replace(cfg.gen, ignore_eos=True, t2t_note_tokens=6))
    [r] = run_many(pipe, cfg, ["What is the capital of France?"])
    t = r["timing"]
    assert t["sharer_generated_tokens"] >= 1 and len(r["sharer_decode_step_times_ms"]) == t["sharer_generated_tokens"] - 1
    sharer_part = t["teacher_embedding_ms"] + t["teacher_prefill_ms"] + t["sharer_decode_ms"]
    receiver_part = t["base_embedding_ms"] + t["base_prefill_ms"] + t["decode_total_ms"]
    assert sharer_part > 0 and receiver_part > 0
    assert sharer_part + receiver_part <= t["e2e_ms"]
    assert t["ttft_ms"] > sharer_part  # the user's ttft: question to the receiver's first token
    assert t["projector_calls"] == 0 and "sharer_note" in r


def test_sweep_lengths_are_exact_in_tokens(tiny_pipe, tmp_path):
    pipe, cfg = tiny_pipe
    ids = synthetic_ids(pipe.tokenizer, 37)
    assert len(ids) == 37 and not set(ids) & set(pipe.tokenizer.all_special_ids)
    recs = run_sweep(pipe, cfg, [1, 5, 40], [3, 6])
    got = sorted((r["timing"]["prompt_tokens"], r["timing"]["num_generated_tokens"]) for r in recs)
    assert got == sorted((i, o) for i in (1, 5, 40) for o in (3, 6))
    assert {r["id"] for r in recs} == {f"in{i}-out{o}" for i in (1, 5, 40) for o in (3, 6)}
    assert all(check_record(r) == [] for r in recs)
    one = next(r for r in recs if r["timing"]["prompt_tokens"] == 1)
    assert one["timing"]["projector_calls"] == 0  # no instruction section to project


def test_sweep_and_report_cli(tmp_path, tiny_models, capsys):
    out, html = tmp_path / "sw.jsonl", tmp_path / "sw.html"
    args = ["--base_model", tiny_models["receiver"], "--teacher_model", tiny_models["sharer"],
            "--hidden_dim", "32", "--intermediate_dim", "32", "--warmup", "0"]
    assert main(["sweep", "--input_lens", "4,16", "--output_lens", "3", "--mode", "all",
                 "--t2t_note_tokens", "3", "--output", str(out), "--html", str(html), *args]) == 0
    assert len(read_records(out)) == 8 and html.stat().st_size > 10_000
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    text = capsys.readouterr().out
    ratios = json.loads(text.strip().splitlines()[-1])["ratios"]
    assert ratios["c2c_over_t2t"]["n"] == 2 and ratios["c2c_over_receiver"]["paired"]
    assert "c2c over t2t" in text


def _rewrite(src, dst, factor):
    """Copy src with its latency metrics set to a fixed base (a few % of spread, as on a quiet
    machine) times `factor`: compare's verdict must not depend on how loaded this machine is."""
    with open(src) as f, open(dst, "w") as g:
        for i, line in enumerate(f):
            r = json.loads(line)
            t = r["timing"]
            base = 10.0 * (1 + 0.01 * (i % 5))
            for k in ("ttft_ms", "e2e_ms", "decode_avg_ms"):
                t[k] = base * factor
            t["tokens_per_second"] = 1000 / t["decode_avg_ms"]
            t["cpu_share"] = 0.98  # as a quiet machine (a contended one is "inconclusive")
            g.write(json.dumps(r) + "\n")


def test_compare_flags_a_2x_slowdown_and_not_a_copy(tmp_path, tiny_models, capsys):
    a = tmp_path / "a.jsonl"
    assert main(["batch", "--base_model", tiny_models["receiver"], "--teacher_model",
                 tiny_models["sharer"], "--hidden_dim", "32", "--intermediate_dim", "32",
                 "--repeats", "4", "--max_new_tokens", "6", "--ignore_eos", "--output", str(a)]) == 0
    base = tmp_path / "base.jsonl"
    _rewrite(a, base, 1.0)
    _rewrite(a, tmp_path / "copy.jsonl", 1.0)
    _rewrite(a, tmp_path / "slow.jsonl", 2.0)
    capsys.readouterr()
    assert main(["compare", str(base), str(tmp_path / "copy.jsonl")]) == 0
    assert "No regression" in capsys.readouterr().out
    assert main(["compare", str(base), str(tmp_path / "slow.jsonl")]) == 1
    assert "REGRESSION" in capsys.readouterr().out
    assert main(["compare", str(base), str(tmp_path / "slow.jsonl"), "--mode", "t2t"]) == 2
    recs = read_records(base)
    other = tmp_path / "other.jsonl"
    # the same prompts under other ids pair by their input digest
    other.write_text("".join(json.dumps({**r, "id": f"x{r['id']}"}) + "\n" for r in recs))
    capsys.readouterr()
    assert main(["compare", str(base), str(other)]) == 0
    # other prompts under other ids: nothing to pair, cannot judge
    other.write_text("".join(json.dumps({**r, "id": f"x{r['id']}", "prompt": "other " + r["prompt"],
                                         "input_digest": digest_input("other " + r["prompt"])})
                             + "\n" for r in recs))
    capsys.readouterr()
    assert main(["compare", str(base), str(other)]) == 2
    assert "share no prompt inputs" in capsys.readouterr().err
