"""CUDA checks of the fast engine (`pytest -m gpu`; skipped without a CUDA GPU): CUDA-graph
decode gives the eager engine's first tokens, events and sync-per-stage timing agree, the bf16
golden vectors hold on the GPU, batches run. Figures come from `python -m c2c_core engines`."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="needs a CUDA GPU")]

PRESET = os.environ.get("C2C_GPU_PRESET", "qwen3-0.6b+qwen3-4b-base-dummy")
PROMPT = "The quick brown fox jumps over the lazy dog while the cat watches quietly."


@pytest.fixture(scope="module")
def gpu_pipe():
    from c2c_core.config import build_run_config
    from c2c_core.loading import load_pipeline
    cfg = build_run_config(PRESET, device="cuda", dtype="bfloat16", max_new_tokens=32,
                           ignore_eos=True, warmup=1, chat_template=False)
    return load_pipeline(cfg), cfg


def _gen(pipe, cfg, engine, timing="event", mode="c2c", n=None):
    from c2c_core.runner import Item, generate, timing_fields
    from c2c_core.timing import Timer
    c = replace(cfg, engine=engine, gen=replace(cfg.gen, max_new_tokens=n or cfg.gen.max_new_tokens))
    g = generate(pipe, c, Item(1, PROMPT), mode, Timer(pipe.device, timing))
    return g, timing_fields(g)[0]


def test_cuda_graph_decode_matches_eager_first_tokens(gpu_pipe):
    from c2c_core import fast
    from c2c_core.runner import Item
    pipe, cfg = gpu_pipe
    eng = fast.engine_for(pipe, compile=True)
    for mode in ("c2c", "receiver"):
        fast.prepare_plan(pipe, replace(cfg, engine="fast"), [[Item(1, PROMPT)]], [mode])
        e, _ = _gen(pipe, cfg, "eager", mode=mode)
        f, t = _gen(pipe, cfg, "fast", mode=mode)
        # bf16: kernels differ (static cache, graphs), so only the first tokens must agree
        assert f.tokens[:8] == e.tokens[:8], (mode, e.tokens, f.tokens)
        assert len(f.stages["decode"]) == len(f.tokens) - 1
    assert eng.late == 0


def test_events_and_sync_agree(gpu_pipe):
    pipe, cfg = gpu_pipe
    for engine in ("eager", "fast"):
        runs = {m: [_gen(pipe, cfg, engine, m)[1] for _ in range(3)] for m in ("event", "sync")}
        med = {m: sorted(r["decode_avg_ms"] for r in runs[m])[1] for m in runs}
        # sync adds a synchronize per stage: never faster, and within 30% + 0.3 ms per token
        assert med["event"] <= med["sync"] * 1.3 + 0.3, (engine, med)
        assert med["sync"] <= med["event"] * 1.3 + 0.3, (engine, med)
        for r in runs["event"]:
            assert r["e2e_ms"] >= r["ttft_ms"] > 0 and r["other_ms"] >= -0.5


def test_golden_bf16_on_gpu():
    from safetensors import safe_open

    from c2c_core.projector import C2CProjector, Fuser
    from c2c_core.stacked import StackedFuser
    path = os.path.join(os.path.dirname(__file__), "golden", "c2c_projector.safetensors")
    with safe_open(path, "pt") as f:
        meta = json.loads(f.metadata()["meta"])
        t = {k: f.get_tensor(k).cuda() for k in f.keys()}
    dt = torch.bfloat16
    projs = []
    for i in range(len(meta["gates"])):
        p = C2CProjector(**meta["init_args"], dtype=dt).eval().cuda()
        p.load_state_dict({k[3:]: v.to(dt) for k, v in t.items() if k.startswith(f"p{i}.")})
        projs.append(p)
        x = {k: t[f"bfloat16.p{i}.{k}"] for k in ("src_k", "src_v", "tgt_k", "tgt_v")}
        with torch.no_grad():
            ok, _ = p((x["src_k"], x["src_v"]), (x["tgt_k"], x["tgt_v"]))
        torch.testing.assert_close(ok, t[f"bfloat16.p{i}.out_k"].to(dt), atol=3e-2, rtol=2e-2)
    st = StackedFuser(Fuser(torch.nn.ModuleList(projs), {i: [(i, i)] for i in range(len(projs))}))

    class L:
        def __init__(self, k, v):
            self.keys, self.values = k.clone(), v.clone()

    r = [L(t[f"bfloat16.p{i}.tgt_k"], t[f"bfloat16.p{i}.tgt_v"]) for i in range(len(projs))]
    s = [L(t[f"bfloat16.p{i}.src_k"], t[f"bfloat16.p{i}.src_v"]) for i in range(len(projs))]
    with torch.no_grad():
        st.project_caches(r, s, meta["tokens"])
    for i in range(len(projs)):
        torch.testing.assert_close(r[i].values, t[f"bfloat16.p{i}.out_v"].to(dt), atol=3e-2, rtol=2e-2)


def test_batches_on_gpu(gpu_pipe):
    from c2c_core.records import check_record
    from c2c_core.runner import run_many
    pipe, cfg = gpu_pipe
    c = replace(cfg, engine="fast", batch_size=4, gen=replace(cfg.gen, max_new_tokens=16))
    recs = run_many(pipe, c, [PROMPT, "Say hello.", "What is 25 * 17?", "Write a haiku."])
    assert [r["batch_index"] for r in recs] == [0, 1, 2, 3]
    assert all(check_record(r) == [] for r in recs)
    assert recs[0]["run"]["compile_s"] > 0 and recs[0]["run"]["engine"] == "fast"
