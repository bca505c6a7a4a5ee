"""The memory budget of what a client may ask: sharers, model size from the config, batch x
length through the KV-cache estimate, and one spelling per device. Each refusal comes before
anything loads, in one sentence, within a second."""

from __future__ import annotations

import time

import pytest

from c2c_core.engines import budget
from c2c_core.frontends import worker
from c2c_core.spec.config import ModelSpec, build_run_config
from c2c_core.spec.errors import UserError

pytest.importorskip("gradio")

from c2c_core.frontends.ui import guard, runcfg, sweep_tab  # noqa: E402
from conftest import HANG_S  # noqa: E402


# --- estimates from the configs -------------------------------------------------------------

@pytest.mark.parametrize("source,billions", [
    ("dummy:qwen3-0.6b", 0.596), ("dummy:qwen3-4b-base", 4.02), ("dummy:qwen3-8b", 8.19),
    ("dummy:qwen2.5-7b-instruct", 7.62), ("dummy:llama3.2-1b-instruct", 1.24),
    ("smollm2", 0.135),  # from the GGUF header, no weights read
])
def test_parameter_counts_from_configs_match_the_published_sizes(source, billions):
    n = budget.param_count(budget.spec_config(ModelSpec(source)))
    assert n == pytest.approx(billions * 1e9, rel=0.03)


def test_kv_cache_bytes_per_token_is_layers_kv_heads_head_dim_keys_and_values():
    cfg = {"num_hidden_layers": 36, "num_key_value_heads": 8, "head_dim": 128,
           "hidden_size": 4096, "num_attention_heads": 32}
    assert budget.kv_bytes_per_token(cfg, 2) == 36 * 8 * 128 * 2 * 2
    # no head_dim: hidden / heads
    assert budget.kv_bytes_per_token({"num_hidden_layers": 2, "hidden_size": 64,
                                      "num_attention_heads": 4}, 4) == 2 * 4 * 16 * 2 * 4


def test_estimate_counts_every_model_and_every_sequence():
    cfg = build_run_config("smollm2-demo", device="cpu", dtype="float32")
    one = budget.estimate(cfg, batch=1, tokens=100)
    many = budget.estimate(cfg, batch=8, tokens=100)
    assert one.weights == pytest.approx(2 * 0.135e9 * 4, rel=0.03)  # receiver and sharer
    assert many.kv == 8 * one.kv and many.weights == one.weights and not one.unknown
    unknown = budget.estimate(build_run_config(base_model="nobody/not-cached", device="cpu"))
    assert unknown.unknown == ["nobody/not-cached"]


def test_check_fits_refuses_over_the_free_memory_and_credits_what_a_swap_frees():
    cfg = build_run_config("smollm2-demo", device="cpu", dtype="float32")
    est = budget.estimate(cfg, 4, 1000)
    need = est.total
    with pytest.raises(UserError, match=r"needs about .* GB .* KV cache .* more than .* of RAM"
                                        r" .*smaller batch or shorter lengths"):
        budget.check_fits(cfg, 4, 1000, free=int((est.weights + est.kv // 4) / 0.85))
    budget.check_fits(cfg, 4, 1000, free=need * 2)
    # the models loaded now are freed by the swap: their bytes count as available
    budget.check_fits(cfg, 4, 1000, free=need // 2, held_bytes=need)
    with pytest.raises(UserError, match="pick smaller models"):
        budget.check_fits(cfg, 1, 0, free=1000)


def test_the_fast_engine_is_estimated_at_its_static_cache_length_not_its_tokens():
    """The fast engine allocates a cache per (batch, length bucket): a prompt padded to its
    bucket, then a power of two. 1,040 tokens take a 2,048-position cache, so the estimate (and
    the refusal's sentence) counts 2,048; the eager engine's dynamic cache counts 1,040."""
    from c2c_core.engines.shapes import bucket, cache_len_at_most, prompt_bucket
    fast = build_run_config("smollm2-demo", device="cpu", dtype="float32", engine="fast")
    eager = build_run_config("smollm2-demo", device="cpu", dtype="float32", engine="eager")
    e, f = budget.estimate(eager, 4, 1040), budget.estimate(fast, 4, 1040)
    assert e.positions == 1040 and f.positions == 2048 and f.kv == e.kv * 2048 // 1040
    # the bound covers every split of the tokens into prompt and new tokens
    for tokens in (1, 17, 64, 100, 129, 1000, 1040, 5000):
        for new in range(0, tokens, max(tokens // 7, 1)):  # a prompt has a token at least
            assert bucket(prompt_bucket(tokens - new) + new) <= cache_len_at_most(tokens)
    with pytest.raises(UserError, match="static caches hold up to 2,048 positions"):
        budget.check_fits(fast, 4, 1040, free=int(e.total / 0.85) + 1)
    budget.check_fits(eager, 4, 1040, free=int(e.total / 0.85) + 1)


# --- one spelling per device ---------------------------------------------------------------

def test_device_spellings_name_one_cpu_and_odd_names_are_refused_in_a_sentence():
    for name in ("cpu", "cpu:0", "cpu:1", " CPU "):
        assert budget.canonical_device(name) == "cpu"
    assert budget.canonical_device("") == budget.canonical_device("auto") == "auto"
    for bad in ("meta", "mps", "gpu", "cpu:x", "cuda:-1", "<img src=x>"):
        with pytest.raises(UserError, match=r"^Device .* use auto, cpu or cuda\[:N\]\.$"):
            budget.canonical_device(bad)


def test_alternating_spellings_keep_one_worker_and_one_loaded_pair():
    from c2c_core.frontends.manager import ModelManager
    keys = {worker.device_key(build_run_config("smollm2-demo", device=d))
            for d in ("cpu", "cpu:0", "cpu:1", "cpu")}
    assert keys == {"cpu"}
    pairs = {ModelManager.key_of(build_run_config("smollm2-demo", device=d))
             for d in ("cpu", "cpu:0", "cpu:1")}
    assert len(pairs) == 1
    try:
        ws = {id(worker.worker_for(build_run_config("smollm2-demo", device=d)))
              for d in ("cpu:0", "cpu:1", "cpu", "cpu:1")}
        assert len(ws) == 1  # not killed and restarted per spelling (none was started here)
    finally:
        worker.shutdown()


def test_the_app_normalises_the_device_it_passes_on():
    assert runcfg.run_config({"preset": "smollm2-demo", "device": "cpu:1"}).device == "cpu"


# --- refusals in the app, before anything queues -----------------------------------------------

def _refused(fn, *args, **kw) -> str:
    from c2c_core.models import loading
    t0 = time.perf_counter()
    # before any load (configs only): said by failing any load, not by a time bound
    with pytest.MonkeyPatch.context() as mp, pytest.raises(UserError) as e:
        mp.setattr(loading, "load_pipeline", lambda cfg: pytest.fail("models loaded"))
        fn(*args, **kw)
    assert time.perf_counter() - t0 < HANG_S  # a hang guard only
    msg = str(e.value)
    assert msg.count(". ") == 0 and msg.endswith(".") and "Traceback" not in msg
    return msg


def test_too_many_sharers_are_refused_and_the_cap_is_configurable(monkeypatch):
    three = {"receiver": "smollm2", "sharer": "smollm2, smollm2, smollm2", "device": "cpu"}
    msg = _refused(runcfg.run_config, three)
    assert "3 sharers given" in msg and "C2C_MAX_SHARERS" in msg
    fifty = dict(three, sharer=",".join(["smollm2"] * 50))
    assert "50 sharers" in _refused(runcfg.run_config, fifty)
    runcfg.run_config(dict(three, sharer="smollm2, smollm2"))  # the published setups: 1-2
    monkeypatch.setenv("C2C_MAX_SHARERS", "3")
    runcfg.run_config(three)


@pytest.mark.parametrize("preset", ["qwen3-8b+qwen2.5-7b-dummy", "qwen3-8b+qwen2.5-7b"])
def test_seven_to_eight_billion_parameter_models_are_refused_on_a_cpu(preset, monkeypatch):
    monkeypatch.setenv("C2C_ALLOW_LOCAL_PATHS", "0")
    settings = {"preset": preset, "device": "cpu"}
    if preset.endswith("-dummy"):
        msg = _refused(runcfg.run_config, settings)
        assert "billion parameters" in msg and "C2C_MAX_CPU_PARAMS_M" in msg
    # by hand too: one 8B receiver with a small sharer
    msg = _refused(runcfg.run_config, {"receiver": "dummy:qwen3-8b", "sharer": "smollm2",
                                       "device": "cpu", "dtype": "float32"})
    assert "8.2 billion" in msg or "RAM" in msg


def test_a_sweep_of_batch_1024_by_8000_tokens_is_refused_for_its_kv_cache():
    msg = _refused(sweep_tab.check_sweep, "8000", "16", "1024", preset="smollm2-demo",
                   device="cpu", engine="fast")
    assert "KV cache" in msg and "1,024 x 8,016 tokens" in msg and "smaller batch" in msg
    sweep_tab.check_sweep("64", "16", "4", preset="smollm2-demo", device="cpu", engine="fast")


def test_budget_check_uses_the_models_held_now(monkeypatch):
    """A run on the pair that is loaded needs only its KV cache: its weights are in use."""
    cfg = build_run_config("smollm2-demo", device="cpu", dtype="float32")
    w = budget.estimate(cfg).weights
    monkeypatch.setattr(budget, "free_bytes", lambda device: w // 10)
    with pytest.raises(UserError, match="RAM"):
        guard.check_budget(cfg, None)
    guard.check_budget(cfg, cfg)


def test_the_worker_checks_models_whose_config_it_fetched_before_dropping_the_loaded_pair():
    """A hub model whose config was not on the machine when the job was accepted: the worker
    checks it once preflight has read the config, before anything is unloaded or loaded."""
    from c2c_core.frontends.manager import ModelManager
    m = ModelManager()
    m.before_load = worker._budget_check(m)
    eight_b = budget.spec_config(ModelSpec("dummy:qwen3-8b"))
    cfg = build_run_config(base_model="some/hub-model", teacher_model="smollm2", device="cpu")
    with pytest.raises(UserError, match="billion parameters"):
        m.before_load(cfg, {"some/hub-model": eight_b})
    small = budget.spec_config(ModelSpec("dummy:qwen3-0.6b"))
    m.before_load(cfg, {"some/hub-model": small})


def test_gpu_free_memory_comes_from_nvidia_smi_without_a_cuda_context(monkeypatch):
    import subprocess
    from types import SimpleNamespace
    seen = []

    def fake_run(cmd, **kw):
        seen.append(cmd)
        return SimpleNamespace(returncode=0, stdout="81234\n")
    monkeypatch.setattr(subprocess, "run", fake_run)
    assert budget.free_bytes("cuda:1") == 81234 * 2**20
    assert seen[0][-2:] == ["-i", "1"]
    monkeypatch.setenv("SPACES_ZERO_GPU", "1")
    assert budget.free_bytes("cuda:0") is None  # ZeroGPU: not readable outside its call


def test_a_dataset_of_long_prompts_in_big_batches_is_refused_once_its_prompts_are_known(
        monkeypatch):
    from c2c_core.io.prompts import PromptItem
    cfg = build_run_config("smollm2-demo", device="cpu", dtype="float32", engine="fast",
                           batch_size=64)
    items = [PromptItem(i, "word " * 3000) for i in range(1, 65)]
    kv = budget.estimate(cfg, 64, 15000 + cfg.gen.max_new_tokens).kv
    monkeypatch.setattr(budget, "free_bytes", lambda device: int(kv / 2 / 0.85))
    with pytest.raises(UserError, match=r"largest batch needs .* KV cache .* 64 x 15,"):
        budget.check_batches(cfg, items)
    budget.check_batches(cfg, [PromptItem(i, "short") for i in range(1, 65)])  # these fit
    budget.check_batches(build_run_config("smollm2-demo", device="cpu"), items)  # batch 1
