"""The C2C pipeline on tiny models: fusion semantics, fuser checkpoints, record invariants."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import pytest
import torch

from c2c_core.spec.config import build_run_config
from c2c_core.spec.errors import UserError
from c2c_core.models.fusion import c2c_prefill
from c2c_core.models.loading import load_pipeline
from c2c_core.models.projector import C2CProjector, load_fuser, save_fuser, untrained_fuser
from c2c_core.io.records import check_record, read_records
from c2c_core.bench.runner import Item, generate, run_many, run_one
from c2c_core.measure.timing import Timer
from conftest import HANG_S  # noqa: E402


def _tokens(pipe, cfg, mode, prompt="What is the capital of France?"):
    return generate(pipe, cfg, Item(1, prompt), mode, Timer(pipe.device, "event")).tokens


def _open_gates(fuser, value=1.0):
    for p in fuser.projectors:
        p.key_gate_logit.data.fill_(value)
        p.value_gate_logit.data.fill_(value)


def test_gate_closed_c2c_equals_receiver_token_for_token(tiny_pipe):
    pipe, cfg = tiny_pipe
    cfg = replace(cfg, gen=replace(cfg.gen, ignore_eos=True, max_new_tokens=12))
    c2c = _tokens(pipe, cfg, "c2c")
    alone = _tokens(pipe, cfg, "receiver")
    assert len(c2c) == 12
    assert c2c == alone


def test_open_gates_change_receiver_logits(tiny_models):
    cfg = build_run_config(base_model=tiny_models["receiver"], teacher_model=tiny_models["sharer"],
                           hidden_dim=32, intermediate_dim=32, device="cpu", dtype="float32")
    pipe = load_pipeline(cfg)
    ids = torch.tensor([[5, 17, 33, 48, 61, 90]])
    with torch.inference_mode():
        _, closed, calls = c2c_prefill(pipe.receiver, pipe.sharer, pipe.fuser, ids, Timer(pipe.device))
        _, alone, _ = c2c_prefill(pipe.receiver, None, None, ids, Timer(pipe.device))
        assert torch.equal(closed, alone)
        _open_gates(pipe.fuser)
        _, fused, _ = c2c_prefill(pipe.receiver, pipe.sharer, pipe.fuser, ids, Timer(pipe.device))
    assert calls == pipe.receiver.config.num_hidden_layers
    assert not torch.allclose(fused, alone)


def test_last_aligned_mapping_reads_the_last_sharer_layers(tiny_pipe):
    pipe, _ = tiny_pipe
    # receiver 2 layers, sharer 3 layers: t -> t + 1
    assert pipe.fuser.mapping == {0: [(1, 0)], 1: [(2, 1)]}


def test_fuser_folder_roundtrip_reproduces_outputs(tmp_path, tiny_pipe):
    pipe, _ = tiny_pipe
    fuser = untrained_fuser(pipe.receiver.config, pipe.sharer.config, 32, 32, 3, seed=7)
    _open_gates(fuser, 0.5)
    save_fuser(fuser, tmp_path / "final")
    (tmp_path / "config.json").write_text(json.dumps({"model": {"base_model": "a/receiver",
                                                                "teacher_model": "b/sharer"}}))
    loaded = load_fuser(str(tmp_path))
    assert loaded.mapping == fuser.mapping
    assert loaded.trained_for == {"base_model": "a/receiver", "teacher_model": "b/sharer"}
    assert len(loaded.content_hash) == 12
    src = (torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16))
    tgt = (torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16))
    for a, b in zip(fuser.projectors, loaded.projectors):
        ka, va = a(src, tgt)
        kb, vb = b(src, tgt)
        assert torch.equal(ka, kb) and torch.equal(va, vb)
        assert not torch.equal(ka, tgt[0])  # gates open: the projection contributes


def test_fuser_dtype_is_encoded_like_the_published_files(tmp_path):
    p = C2CProjector(16, 16, 2, 2, hidden_dim=8, intermediate_dim=8, dtype=torch.bfloat16)
    from c2c_core.models.projector import Fuser
    save_fuser(Fuser(torch.nn.ModuleList([p]), {0: [(0, 0)]}), tmp_path)
    spec = json.loads((tmp_path / "projector_0.json").read_text())
    assert spec["init_args"]["dtype"] == {"__type__": "torch.dtype", "value": "bfloat16"}
    assert load_fuser(str(tmp_path)).projectors[0].key_in.weight.dtype == torch.bfloat16


def test_fuser_missing_tensor_is_named(tmp_path, tiny_pipe):
    pipe, _ = tiny_pipe
    fuser = untrained_fuser(pipe.receiver.config, pipe.sharer.config, 32, 32, 3)
    save_fuser(fuser, tmp_path)
    sd = torch.load(tmp_path / "projector_1.pt")
    del sd["value_scalar_head.bias"]
    torch.save(sd, tmp_path / "projector_1.pt")
    with pytest.raises(UserError, match=r"projector_1\.pt is missing tensor 'value_scalar_head\.bias'"):
        load_fuser(str(tmp_path))


def test_fuser_shape_mismatch_and_wrong_pair_are_errors(tmp_path, tiny_pipe, tiny_models):
    pipe, _ = tiny_pipe
    fuser = untrained_fuser(pipe.receiver.config, pipe.sharer.config, 32, 32, 3)
    save_fuser(fuser, tmp_path)
    sd = torch.load(tmp_path / "projector_0.pt")
    sd["key_in.weight"] = torch.zeros(3, 3)
    torch.save(sd, tmp_path / "projector_0.pt")
    with pytest.raises(UserError, match=r"key_in\.weight' has shape \(3, 3\)"):
        load_fuser(str(tmp_path))
    # a fuser for the reversed pair does not fit the loaded pair
    rev = untrained_fuser(pipe.sharer.config, pipe.receiver.config, 32, 32, 3)
    save_fuser(rev, tmp_path / "rev")
    cfg = build_run_config(base_model=tiny_models["receiver"], teacher_model=tiny_models["sharer"],
                           fuser=str(tmp_path / "rev"), device="cpu")
    with pytest.raises(UserError, match="trained for another pair"):
        load_pipeline(cfg)


def test_trained_fuser_loads_into_pipeline_and_is_recorded(tmp_path, tiny_models, tiny_pipe):
    pipe, _ = tiny_pipe
    fuser = untrained_fuser(pipe.receiver.config, pipe.sharer.config, 32, 32, 3, seed=3)
    _open_gates(fuser)
    save_fuser(fuser, tmp_path / "final")
    (tmp_path / "config.json").write_text(json.dumps({"model": {"base_model": "Qwen/Qwen3-0.6B",
                                                                "teacher_model": "Qwen/Qwen3-4B-Base"}}))
    cfg = build_run_config(base_model=tiny_models["receiver"], teacher_model=tiny_models["sharer"],
                           fuser=str(tmp_path), device="cpu", warmup=0, max_new_tokens=4)
    with pytest.warns(UserWarning, match="trained for Qwen/Qwen3-0.6B"):
        p2 = load_pipeline(cfg)
    rec = run_one(p2, cfg, Item(1, "Say hello"))
    assert rec["run"]["fuser"] == os.path.abspath(str(tmp_path))
    assert rec["run"]["fuser_hash"] == p2.fuser.content_hash
    assert not check_record(rec)


def test_records_hold_the_invariants(tiny_pipe):
    pipe, cfg = tiny_pipe
    recs = run_many(pipe, replace(cfg, repeats=2), ["Say hello in one short sentence.", "What is 25 * 17?"])
    assert [(r["id"], r["repeat"]) for r in recs] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    for r in recs:
        assert check_record(r) == []
        t = r["timing"]
        assert len(r["decode_step_times_ms"]) == t["num_generated_tokens"] - 1
        assert t["projector_calls"] == 2 and t["projector_avg_ms"] > 0
        assert t["ttft_ms"] <= t["e2e_ms"]
        assert r["run"]["receiver"] and r["run"]["fuser"] == "untrained"
        assert r["run"]["timing_method"] == "perf_counter"
        assert set(r["model_config"]) == {"base_model", "teacher_model"}


def test_single_token_output_has_zero_decode_fields(tiny_pipe):
    pipe, cfg = tiny_pipe
    rec = run_one(pipe, replace(cfg, gen=replace(cfg.gen, max_new_tokens=1)), Item(1, "Hello"))
    t = rec["timing"]
    assert t["num_generated_tokens"] == 1 and rec["decode_step_times_ms"] == []
    assert t["decode_total_ms"] == 0 and t["decode_avg_ms"] == 0 and t["tokens_per_second"] == 0
    assert check_record(rec) == []


def test_sync_timing_and_sampling_are_reproducible(tiny_pipe):
    pipe, cfg = tiny_pipe
    scfg = replace(cfg, timing="sync", gen=replace(cfg.gen, do_sample=True, temperature=0.8,
                                                    top_p=0.9, top_k=20, seed=3, ignore_eos=True))
    a = run_one(pipe, scfg, Item(1, "Write a haiku about coding."))
    b = run_one(pipe, scfg, Item(1, "Write a haiku about coding."))
    assert a["response"] == b["response"] and a["run"]["timing_method"] == "sync"
    greedy = _tokens(pipe, replace(cfg, gen=replace(cfg.gen, ignore_eos=True)), "c2c")
    top1 = _tokens(pipe, replace(cfg, gen=replace(cfg.gen, ignore_eos=True, do_sample=True, top_k=1)), "c2c")
    assert greedy == top1


def test_cut_file_is_readable_up_to_its_last_whole_record(tmp_path, tiny_pipe):
    pipe, cfg = tiny_pipe
    path = tmp_path / "r.jsonl"
    from c2c_core.io.records import JsonlWriter
    with JsonlWriter(path) as w:
        run_many(pipe, cfg, ["a", "b", "c"], writer=w)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])  # the last record cut mid-line
    recs = read_records(path)
    assert [r["id"] for r in recs] == [1, 2]
    # appending after a cut drops the partial tail instead of gluing records together
    with JsonlWriter(path, append=True) as w:
        w.write(recs[0])
    assert [r["id"] for r in read_records(path)] == [1, 2, 1]


def test_dummy_weights_from_a_config_file(tmp_path, tiny_models):
    cfgfile = tmp_path / "tiny.json"
    cfgfile.write_text(json.dumps({"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
                                   "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3,
                                   "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                                   "vocab_size": 320, "tie_word_embeddings": True}))
    cfg = build_run_config(base_model=tiny_models["receiver"], teacher_model=f"dummy:{cfgfile}",
                           hidden_dim=16, intermediate_dim=16, device="cpu", warmup=0,
                           max_new_tokens=3)
    pipe = load_pipeline(cfg)
    assert pipe.info["sharer_weights"] == "dummy" and pipe.info["weights"] == "pretrained+dummy"
    assert check_record(run_one(pipe, cfg, Item(1, "Hello"))) == []


def test_shipped_dummy_configs_match_the_reference_table():
    from transformers import AutoConfig

    from c2c_core.spec.config import CONFIGS
    want = {"qwen3-0.6b": (28, 1024, 8, 128), "qwen3-4b-base": (36, 2560, 8, 128),
            "qwen2.5-0.5b-instruct": (24, 896, 2, 64), "smollm2-135m-instruct": (30, 576, 3, 64)}
    from c2c_core.models.projector import kv_shape
    for name, (layers, hidden, kv, hd) in want.items():
        c = AutoConfig.from_pretrained(os.path.join(CONFIGS, f"{name}.json"))
        assert (c.num_hidden_layers, c.hidden_size) == (layers, hidden)
        assert kv_shape(c) == (layers, kv, hd)


def test_input_errors_are_one_sentence(tiny_models):
    with pytest.raises(UserError, match="Unknown preset 'nope'"):
        build_run_config("nope")
    with pytest.raises(UserError, match="max_new_tokens=0 is out of range"):
        build_run_config(max_new_tokens=0)
    cfg = build_run_config(base_model="/no/such/folder", teacher_model=tiny_models["sharer"])
    with pytest.raises(UserError, match="does not exist"):
        load_pipeline(cfg)


def test_hub_model_fails_fast_when_offline(monkeypatch):
    import time
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = build_run_config("qwen3-0.6b+qwen2.5-0.5b")
    t = time.monotonic()
    with pytest.raises(UserError, match="Qwen/Qwen3-0.6B.*HF_HUB_OFFLINE"):
        load_pipeline(cfg)
    assert time.monotonic() - t < HANG_S  # a hang guard only


def test_out_of_memory_keeps_written_records(tmp_path, tiny_pipe, monkeypatch):
    from c2c_core.bench import runner
    from c2c_core.spec.errors import OutOfMemory
    from c2c_core.io.records import JsonlWriter
    pipe, cfg = tiny_pipe
    real, calls = runner.generate_many, []  # the job loop's generation, per batch

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*a, **k)

    monkeypatch.setattr(runner, "generate_many", flaky)
    path = tmp_path / "oom.jsonl"
    with pytest.raises(OutOfMemory, match="reduce --max_new_tokens or use shorter prompts"):
        with JsonlWriter(path) as w:
            runner.run_many(pipe, cfg, ["a", "b", "c", "d"], writer=w)
    assert [r["id"] for r in read_records(path)] == [1, 2]


def test_unreachable_hub_fails_fast_without_offline_flag(monkeypatch):
    import time

    from c2c_core.io import hub
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setattr(hub, "_reachable_cache", {})
    t = time.monotonic()
    with pytest.raises(UserError, match="cannot be reached"):
        hub.require_hub("Receiver model Qwen/Qwen3-0.6B")
    assert time.monotonic() - t < HANG_S  # a hang guard only
