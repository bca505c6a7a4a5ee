"""Documented limits: context (prompt + new tokens) checked before any forward, fuser sizes,
repeats and warm-up, and the app's prompt-size cap."""

from __future__ import annotations

import time

import pytest

from c2c_core.engines import limits
from c2c_core.frontends.cli import main
from c2c_core.spec.config import ModelSpec, build_run_config
from c2c_core.spec.errors import UserError
from c2c_core.io.prompts import PromptItem
from c2c_core.io.records import read_records
from conftest import HANG_S  # noqa: E402


# --- context length from a config ---------------------------------------------------------

def test_context_length_reads_the_position_limit_not_the_sliding_window():
    assert limits.context_length({"max_position_embeddings": 8192}) == 8192
    # Qwen2-style: a sliding_window field even with use_sliding_window false; Mistral-style: on
    assert limits.context_length({"max_position_embeddings": 32768, "sliding_window": 4096,
                                  "use_sliding_window": False}) == 32768
    assert limits.context_length({"max_position_embeddings": 32768, "sliding_window": 4096,
                                  "use_sliding_window": True}) == 32768
    assert limits.context_length({"n_positions": 1024}) == 1024  # GPT-2 naming
    assert limits.context_length({"text_config": {"max_position_embeddings": 2048}}) == 2048
    assert limits.context_length({"hidden_size": 8}) is None
    assert limits.context_length(None) is None


def test_context_of_specs_without_loading_weights(tiny_models):
    assert limits.spec_context(ModelSpec(tiny_models["receiver"])) == 4096
    assert limits.spec_context(ModelSpec("dummy:qwen3-0.6b")) == 40960
    assert limits.spec_context(ModelSpec("smollm2")) == 8192  # from the GGUF header
    assert limits.spec_context(ModelSpec("nobody/not-cached-model")) is None


# --- the checks ---------------------------------------------------------------------------

def test_check_lengths_per_mode():
    ok = dict(receiver_ctx=100, sharer_ctx=50, max_new_tokens=10)
    limits.check_lengths(n_prompt=90, mode="receiver", **ok)  # exactly fits
    with pytest.raises(UserError, match=r"91 tokens \+ 10 new tokens = 101, over the receiver's"
                                        r" context of 100 tokens.*at most 9 fit"):
        limits.check_lengths(n_prompt=91, mode="receiver", **ok)
    # c2c: the sharer only prefills, so its limit is the prompt alone
    limits.check_lengths(n_prompt=50, mode="c2c", **ok)
    with pytest.raises(UserError, match="over the sharer's context of 50"):
        limits.check_lengths(n_prompt=51, mode="c2c", **ok)
    with pytest.raises(UserError, match="sharer's context of 50"):
        limits.check_lengths(n_prompt=41, mode="sharer", **ok)
    # t2t: sharer reads the prompt and writes the note; the receiver reads prompt + note
    with pytest.raises(UserError, match="t2t_note_tokens"):
        limits.check_lengths(n_prompt=30, mode="t2t", t2t_note_tokens=25, **ok)
    with pytest.raises(UserError, match="with the sharer's note .* receiver's"):
        limits.check_lengths(n_prompt=20, mode="t2t", t2t_note_tokens=10, n_answer_prompt=95, **ok)
    limits.check_lengths(n_prompt=20, mode="t2t", t2t_note_tokens=10, n_answer_prompt=90, **ok)
    limits.check_lengths(None, None, 10**9, "c2c", 10)  # no known limit: nothing to refuse


def test_runner_refuses_a_prompt_past_the_context_before_any_forward(tiny_pipe, tmp_path,
                                                                      monkeypatch):
    from c2c_core.models import fusion
    from c2c_core.bench import runner
    from c2c_core.io.records import JsonlWriter
    pipe, cfg = tiny_pipe  # context 4096, max_new_tokens 8
    forwards = []
    from c2c_core.engines import eager
    for name in ("fused_prefill", "plain_prefill"):  # every prefill the eager engine runs
        monkeypatch.setattr(eager, name, lambda *a, **k: forwards.append(1))
    monkeypatch.setattr(fusion, "c2c_prefill", lambda *a, **k: forwards.append(1))
    items = [PromptItem("short", "hi"), PromptItem("long", "x", input_ids=[5] * 4090)]
    out = tmp_path / "o.jsonl"
    with JsonlWriter(out) as w, pytest.raises(UserError) as e:
        runner.run_many(pipe, cfg, items, writer=w)
    assert "Prompt long is 4,090 tokens + 8 new tokens = 4,098" in str(e.value)
    assert "receiver's context of 4,096" in str(e.value)
    assert forwards == [] and read_records(out) == []  # refused before the first generation
    # generate() checks on its own too (warm-up, the app, the profiler go through it)
    with pytest.raises(UserError, match="4,098"):
        runner.generate(pipe, cfg, items[1], "receiver", runner.Timer(pipe.device, "event"))
    assert forwards == []


def test_t2t_checks_the_receivers_prompt_with_the_note(tiny_pipe):
    from dataclasses import replace

    from c2c_core.bench import runner
    pipe, cfg = tiny_pipe
    c = replace(cfg, mode="t2t", gen=replace(cfg.gen, t2t_note_tokens=100))
    item = PromptItem("p", "x", input_ids=[5] * 3990)  # fits the sharer, not prompt + note + new
    with pytest.raises(UserError, match="with the sharer's note"):
        runner.run_many(pipe, c, [item])


def test_sweep_past_the_context_is_refused_before_models_load(tiny_models, tmp_path, capsys,
                                                              monkeypatch):
    from c2c_core.models import loading
    monkeypatch.setattr(loading, "load_pipeline", lambda cfg: pytest.fail("models loaded"))
    t = time.monotonic()
    rc = main(["sweep", "--input_lens", "16,10000", "--output_lens", "8",
               "--base_model", tiny_models["receiver"], "--teacher_model", tiny_models["sharer"],
               "--output", str(tmp_path / "s.jsonl")])
    assert time.monotonic() - t < HANG_S  # a hang guard; load_pipeline fails the test
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: --input_lens 10000 is 10,000 tokens")
    assert "context of 4,096 tokens" in err[-1] and "Traceback" not in "\n".join(err)


def test_sweep_on_the_default_preset_is_refused_before_models_load(tmp_path, capsys, monkeypatch):
    from c2c_core.models import loading
    monkeypatch.setattr(loading, "load_pipeline", lambda cfg: pytest.fail("models loaded"))
    t = time.monotonic()
    assert main(["sweep", "--input_lens", "10000", "--output", str(tmp_path / "s.jsonl")]) == 2
    assert time.monotonic() - t < HANG_S  # a hang guard; load_pipeline fails the test
    err = capsys.readouterr().err
    assert "over the receiver's context of 8,192 tokens (smollm2)" in err


# --- sizes and counts ---------------------------------------------------------------------

@pytest.mark.parametrize("kw, message", [
    ({"hidden_dim": 20000}, "--hidden_dim 20000 is out of range; use 1 to 4096"),
    ({"intermediate_dim": 0}, "--intermediate_dim 0 is out of range"),
    ({"num_layers": 1}, "--num_layers 1 is out of range; use 2 to 8"),
    ({"num_layers": 50}, "--num_layers 50 is out of range"),
    ({"repeats": 101}, "--repeats 101 is over the limit of 100"),
    ({"warmup": 21}, "--warmup 21 is over the limit of 20"),
])
def test_sizes_and_counts_have_documented_maxima(kw, message):
    with pytest.raises(UserError, match=message):
        build_run_config(**kw)
    build_run_config(hidden_dim=limits.MAX_FUSER_DIM, num_layers=limits.MAX_FUSER_LAYERS,
                     repeats=limits.MAX_REPEATS, warmup=limits.MAX_WARMUP)


def test_fuser_parameter_cap_is_checked_before_allocating():
    from transformers import AutoConfig

    from c2c_core.spec.config import CONFIGS
    r = AutoConfig.from_pretrained(f"{CONFIGS}/qwen3-0.6b.json")
    s = AutoConfig.from_pretrained(f"{CONFIGS}/qwen3-4b-base.json")
    n = limits.check_fuser_params(r, s, 1024, 1024, 3)  # the published fuser's sizes
    assert 0.5e9 < n < 0.6e9
    t = time.monotonic()
    with pytest.raises(UserError, match=r"6\.3 billion parameters .* limit of 2 billion"):
        limits.check_fuser_params(r, s, 4096, 4096, 3)
    assert time.monotonic() - t < HANG_S  # a hang guard (meta device: nothing allocated)


def test_load_pipeline_refuses_an_oversize_fuser(tiny_cfg_kwargs, monkeypatch):
    from c2c_core.models import loading
    from c2c_core.spec import config
    monkeypatch.setattr(config, "MAX_FUSER_PARAMS", 1000)  # the limit lives in config
    with pytest.raises(UserError, match="over the limit of 0 billion"):
        loading.load_pipeline(build_run_config(**tiny_cfg_kwargs))
