"""Issue 25 item 5, graph memory counted (tiny models, fp32, CPU, no torch.compile): what the
fast engine's preparations add to the device's reserved memory beyond its static caches (the
CUDA-graph pool, compiled steps' graph trees, cuBLAS workspaces) is held under the cache cap
beside the caches, shown in cache_stats(), counted in the refusal before a run; and
budget.estimate has a term for it. No GPU here: the device's reserved memory is faked through
the engine's `_reserved()`, which is 0 on a CPU."""

from __future__ import annotations

from dataclasses import replace

import pytest

from c2c_core.bench.runner import Item
from c2c_core.engines import budget, fast
from c2c_core.engines.fast.batch import check_one_generation_fits
from c2c_core.measure.timing import Timer
from c2c_core.models.loading import load_pipeline
from c2c_core.spec.config import build_run_config
from c2c_core.spec.errors import UserError

PROMPTS = ["Say hello.", "What is the capital of France?",
           "Explain machine learning in simple terms, please, with an example. " * 4]
G = 3 * 2**20  # what each faked preparation adds to the reserved memory beyond its caches


def _fake_gpu(monkeypatch, eng) -> dict:
    """The reserved memory of a device whose every prepared step grows it by G beyond the
    caches (a CUDA graph's pool): the caches' bytes plus G per step made so far."""
    made = {"steps": 0}
    make = eng._make_step

    def make_step(*a, **k):
        made["steps"] += 1
        return make(*a, **k)

    monkeypatch.setattr(eng, "_make_step", make_step)
    monkeypatch.setattr(eng, "_reserved", lambda: eng.cache_bytes + G * made["steps"])
    return made


def _items(prompts):
    return [Item(i + 1, p) for i, p in enumerate(prompts)]


def _gen(pipe, cfg, prompts, mode="c2c"):
    return fast.generate_batch(pipe, cfg, _items(prompts), mode, Timer(pipe.device))


def test_on_a_cpu_nothing_is_counted_as_graph_memory(pipe_cfg):
    pipe, cfg, eng = pipe_cfg
    eng.graphs = True  # prepared fills too: still no CUDA graph on a CPU
    assert eng._reserved() == 0
    fast.prepare_plan(pipe, cfg, [_items(PROMPTS[:1])], ["c2c", "receiver"])
    _gen(pipe, cfg, PROMPTS[:1])
    assert eng.graph_bytes == 0 and eng.cache_stats()["graph_mb"] == 0
    assert eng.held_bytes() == eng.cache_bytes > 0


def test_what_a_preparation_adds_beyond_its_caches_is_graph_memory(pipe_cfg, monkeypatch):
    pipe, cfg, eng = pipe_cfg
    made = _fake_gpu(monkeypatch, eng)
    fast.prepare_plan(pipe, cfg, [_items(PROMPTS[:1]), _items(PROMPTS[:2])], ["c2c"])
    assert made["steps"] == 2  # a receiver step per batch size; the caches grew reserved too
    assert eng.graph_bytes == 2 * G
    st = eng.cache_stats()
    assert st["graph_mb"] == 6.0 and st["held_mb"] == round(eng.cache_bytes / 2**20, 3)
    assert eng.held_bytes() == eng.cache_bytes + 2 * G
    # a generation of a prepared shape captures nothing: nothing more is counted
    _gen(pipe, cfg, PROMPTS[:1])
    assert eng.graph_bytes == 2 * G


def test_a_block_inside_another_is_counted_once(pipe_cfg, monkeypatch):
    """_graph_pool's anchor is measured on its own and inside a preparation (where the
    preparation's measure counts it): never twice."""
    pipe, cfg, eng = pipe_cfg
    reserved = {"v": 0}
    monkeypatch.setattr(eng, "_reserved", lambda: reserved["v"])
    with eng._measured():
        reserved["v"] += G
        with eng._measured():
            reserved["v"] += G
    assert eng.graph_bytes == 2 * G
    with eng._measured():  # reserved memory given back (empty_cache) counts as nothing
        reserved["v"] -= 4 * G
    assert eng.graph_bytes == 2 * G


def test_evictions_free_caches_but_never_graph_memory(pipe_cfg, monkeypatch):
    """A cap that holds two shapes' caches but not with their graph memory: the second shape
    evicts the first one's caches, the held bytes stay under the cap, and the graph memory is
    not lowered by the eviction (the shared pool and the graph trees keep their blocks)."""
    pipe, cfg, eng = pipe_cfg
    shapes = [PROMPTS[:1], PROMPTS[:2]]
    need = [sum(eng.cache_nbytes(*c) for c in {k[1:4] for k in fast.shapes_of(
        pipe, cfg, [_items(ps)], ["c2c"])}) for ps in shapes]
    g = need[0] // 2  # each step's graph memory: half the first shape's caches
    made = {"steps": 0}
    make = eng._make_step
    monkeypatch.setattr(eng, "_make_step", lambda *a, **k: (made.update(steps=made["steps"] + 1),
                                                            make(*a, **k))[1])
    monkeypatch.setattr(eng, "_reserved", lambda: eng.cache_bytes + g * made["steps"])
    eng.cache_cap = sum(need) + g  # both shapes' caches fit, not with both steps' graphs
    held = []
    for ps in shapes:
        fast.prepare_plan(pipe, cfg, [_items(ps)], ["c2c"])
        _gen(pipe, cfg, ps)
        assert eng.held_bytes() <= eng.cache_cap, eng.cache_stats()
        held.append(eng.graph_bytes)
    assert made["steps"] == 2 and eng.cache_evictions > 0
    # the eviction did not lower it; the second step's memory was counted (the fake allocator
    # gives the evicted cache's bytes back, so a little less than g may show)
    assert held[0] == g and held[0] < held[1] <= 2 * g
    assert eng.cache_stats()["graph_mb"] == round(held[1] / 2**20, 3)


def test_a_run_whose_caches_fit_but_not_with_the_graph_memory_is_refused(pipe_cfg):
    pipe, cfg, eng = pipe_cfg
    items = _items(PROMPTS)
    need = sum(eng.cache_nbytes(*c) for c in {k[1:4] for k in fast.shapes_of(
        pipe, cfg, [items], ["c2c"])})
    eng.cache_cap = need + G
    check_one_generation_fits(pipe, cfg, [items], ["c2c"])  # fits without graphs
    eng.graph_bytes = 2 * G  # held since earlier preparations
    with pytest.raises(UserError, match="cache cap") as e:
        fast.prepare_plan(pipe, cfg, [items], ["c2c"])
    assert "6.0 MB of CUDA-graph memory" in str(e.value) and "\n" not in str(e.value)
    assert not eng._ready


def test_captures_still_to_make_are_estimated_in_the_refusal(pipe_cfg):
    """On CUDA with captures (faked: nothing runs), a shape not prepared yet counts the
    estimate of its capture (budget.graph_bytes); once prepared, only what was measured."""
    pipe, cfg, eng = pipe_cfg
    eng.graphs = True  # the prefills are captured shapes too
    items = _items(PROMPTS)
    keys = fast.shapes_of(pipe, cfg, [items], ["c2c"])
    assert {k[0] for k in keys} >= {"step", "fill"}
    assert eng.graph_need(keys) == 0  # a CPU: nothing is captured
    eng.cuda = eng.compile = True
    est = eng.graph_need(keys)
    assert est >= budget.GRAPH_STREAMS * budget.CUBLAS_WORKSPACE_BYTES
    need = sum(eng.cache_nbytes(*c) for c in {k[1:4] for k in keys})
    eng.cache_cap = need + est - 1
    with pytest.raises(UserError, match="CUDA-graph memory"):
        check_one_generation_fits(pipe, cfg, [items], ["c2c"])
    eng.cache_cap = need + est
    check_one_generation_fits(pipe, cfg, [items], ["c2c"])
    # larger batches capture larger prefills; sampling keeps float32 logits too
    assert eng.graph_need(fast.shapes_of(pipe, cfg, [items + items], ["c2c"])) > est
    assert eng.graph_need(keys, sampling=True) > est
    eng._ready |= {k[1:] if k[0] == "step" else eng.fill_key(*k[1:]) for k in keys
                   if k[0] in ("step", "fill")}
    eng.graph_bytes = G
    assert eng.graph_need(keys) == G  # every capture made: what they hold was measured


# --- budget.estimate's graph term ---------------------------------------------------------

CONFIG = {"num_hidden_layers": 28, "hidden_size": 1024, "intermediate_size": 3072,
          "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
          "vocab_size": 151936, "tie_word_embeddings": True}


def test_graph_bytes_grow_with_batch_and_prompt_length():
    f = budget.graph_bytes
    base = f(CONFIG, 1, 64, 128, 2)
    assert f(CONFIG, 4, 64, 128, 2) > base and f(CONFIG, 1, 512, 1024, 2) > base
    ws = budget.GRAPH_STREAMS * budget.CUBLAS_WORKSPACE_BYTES
    assert ws == 64 * 2**20  # two streams, PyTorch's default workspace on Hopper each
    # the activations term, by hand: batch x q x (6 hidden + 3 intermediate) x bytes
    act = 4 * 64 * (6 * 1024 + 3 * 3072) * 2
    mask = 4 * (64 * 64 + 128) * 3  # the prefill's q x q (it sees no further), the step's L
    logits = 4 * 151936 * 2
    assert f(CONFIG, 4, 64, 128, 2) == act + mask + logits + ws
    # eager attention materialises the scores (and softmax's float32 copy); sampling keeps
    # the step's float32 logits
    assert f(CONFIG, 4, 64, 128, 2, attn="eager") - f(CONFIG, 4, 64, 128, 2) == \
        4 * 16 * 64 * 64 * (2 + 4)
    assert f(CONFIG, 4, 64, 128, 2, sampling=True) - f(CONFIG, 4, 64, 128, 2) == 4 * 151936 * 4


def _cuda_estimate(monkeypatch, cfg, batch, tokens, env=None):
    """budget.estimate as on a GPU (none here): the device and its dtype faked."""
    monkeypatch.setattr(budget, "canonical_device", lambda name: "cuda:0")
    monkeypatch.setattr(budget, "dtype_name", lambda cfg, device: "bfloat16")
    monkeypatch.setenv("C2C_FAST_COMPILE", "1")
    for k, v in (env or {}).items():
        monkeypatch.setenv(k, v)
    return budget.estimate(cfg, batch, tokens, configs={cfg.receiver.source: CONFIG,
                                                        cfg.sharers[0].source: CONFIG})


def test_estimate_counts_graphs_on_cuda_only(monkeypatch):
    fast_cfg = build_run_config("smollm2-demo", device="cpu", dtype="float32", engine="fast")
    eager_cfg = replace(fast_cfg, engine="eager")
    assert budget.estimate(fast_cfg, 4, 1000).graphs == 0  # a CPU: no CUDA graphs
    one = _cuda_estimate(monkeypatch, fast_cfg, 1, 200)
    assert one.graphs > 0 and one.total == one.weights + one.kv + one.graphs
    assert _cuda_estimate(monkeypatch, fast_cfg, 8, 200).graphs > one.graphs
    assert _cuda_estimate(monkeypatch, fast_cfg, 1, 2000).graphs > one.graphs
    assert _cuda_estimate(monkeypatch, fast_cfg, 1, 0).graphs == 0  # the weights alone
    assert _cuda_estimate(monkeypatch, eager_cfg, 8, 200).graphs == 0
    off = {"C2C_FAST_PREFILL_GRAPHS": "0"}
    assert _cuda_estimate(monkeypatch, fast_cfg, 8, 200, off).graphs == 0
    assert _cuda_estimate(monkeypatch, fast_cfg, 8, 200, {"C2C_FAST_COMPILE": "0"}).graphs == 0


def test_the_refusal_names_the_graph_memory(monkeypatch):
    cfg = build_run_config("smollm2-demo", device="cpu", dtype="float32", engine="fast")
    est = _cuda_estimate(monkeypatch, cfg, 8, 2000)
    monkeypatch.setattr(budget, "_cuda", lambda: True)
    configs = {cfg.receiver.source: CONFIG, cfg.sharers[0].source: CONFIG}
    with pytest.raises(UserError, match="of CUDA-graph memory") as e:
        budget.check_fits(cfg, 8, 2000, free=int((est.total - 1) / budget.USABLE_SHARE),
                          configs=configs)
    msg = str(e.value)
    assert msg.count(". ") == 0 and msg.endswith(".") and "C2C_FAST_PREFILL_GRAPHS=0" in msg
    budget.check_fits(cfg, 8, 2000, free=int(est.total / budget.USABLE_SHARE) + 1,
                      configs=configs)


# --- peak memory reserved beside allocated ------------------------------------------------

@pytest.mark.parametrize("engine", ["eager", "fast"])
def test_both_engines_record_the_reserved_peak(pipe_cfg, monkeypatch, engine):
    """On CUDA (faked: the allocator's peaks) the eager and the fast engine both put the
    reserved peak in their records beside the allocated one: the fast engine's graph pools show
    only there, so it is the field to compare across engines."""
    from c2c_core.bench.runner import generate
    from c2c_core.engines.generation import make_record
    from c2c_core.measure import memory
    pipe, cfg, eng = pipe_cfg

    def exit_(self, *exc):
        if self._open:
            self._open = False
            self.allocated_mb, self.reserved_mb = 100.0, 164.0

    monkeypatch.setattr(memory.DeviceMemory, "__exit__", exit_)
    c = replace(cfg, engine=engine)
    item = Item(1, PROMPTS[0])
    g = generate(pipe, c, item, "c2c", Timer(pipe.device))
    t = make_record(pipe, item, "c2c", 0, g, {})["timing"]
    assert (t["peak_memory_mb"], t["peak_memory_reserved_mb"]) == (100.0, 164.0)


def test_the_results_table_shows_reserved_beside_allocated():
    pytest.importorskip("gradio")
    from c2c_core.frontends.ui.render import records_table
    recs = [{"id": "a", "mode": "c2c", "repeat": 0, "prompt": "p", "response": "r",
             "timing": {"ttft_ms": 1.0, "e2e_ms": 2.0, "peak_memory_mb": 100.0,
                        "peak_memory_reserved_mb": 164.0}},
            {"id": "b", "mode": "c2c", "repeat": 0, "prompt": "p", "response": "r",
             "timing": {"ttft_ms": 1.0, "e2e_ms": 2.0, "peak_memory_mb": 90.0}}]  # older file
    df = records_table(recs)
    cols = list(df.columns)
    assert cols.index("peak memory reserved (MB)") == cols.index("peak memory (MB)") + 1
    assert df["peak memory reserved (MB)"].iloc[0] == 164.0
    assert df["peak memory reserved (MB)"].isna().iloc[1]
    assert list(records_table([]).columns) == cols


def test_engines_sets_the_peaks_side_by_side_and_says_to_compare_reserved():
    from c2c_core.bench.compare_engines import memory_line
    gpu = {"eager": {"peak_memory_mb": [100.0, 102.0, 101.0], "peak_memory_reserved_mb": [120.0]},
           "fast": {"peak_memory_mb": [98.0], "peak_memory_reserved_mb": [180.0, 182.0, 181.0]}}
    line = memory_line(gpu)
    assert ("eager 101.0 MB allocated, 120.0 MB reserved; fast 98.0 MB allocated,"
            " 181.0 MB reserved; compare reserved across engines") in line
    cpu = {"eager": {"peak_memory_mb": [300.0], "peak_memory_reserved_mb": []},
           "fast": {"peak_memory_mb": [310.0], "peak_memory_reserved_mb": []}}
    line = memory_line(cpu)
    assert "eager 300.0 MB allocated, reserved null; fast 310.0 MB allocated, reserved null" \
        in line and "compare reserved" not in line


def test_a_slot_groups_steps_count_as_graph_memory(pipe_cfg, monkeypatch):
    """The continuous-batching slot group compiles (on CUDA records) one step per batch size
    outside prepare(): those recordings are graph memory too; its own cache (allocated before,
    outside the engine's LRU) is not counted as such."""
    from c2c_core.engines.fast.slots import SlotGroup
    pipe, cfg, eng = pipe_cfg
    made = _fake_gpu(monkeypatch, eng)
    g = SlotGroup(pipe, "receiver", 3, 64, True)
    assert made["steps"] == len(g.sizes) == 3  # batch sizes 1, 2 and 3
    assert eng.graph_bytes == 3 * G


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_the_captures_are_measured_as_graph_memory(tiny_cfg_kwargs, monkeypatch):
    """On a GPU (tiny models, captured steps: no inductor compile) preparing a run grows the
    device's reserved memory beyond the caches: it shows as graph memory, held under the cap.
    How close the estimate comes is printed, not asserted (no GPU figure is assumed here)."""
    monkeypatch.setenv("C2C_FAST_STEP", "capture")
    cfg = build_run_config(**{**tiny_cfg_kwargs, "device": "cuda", "max_new_tokens": 6},
                           engine="fast", ignore_eos=True)
    pipe = load_pipeline(cfg)
    eng = fast.engine_for(pipe, compile=True)
    assert eng.graphs and eng.graph_bytes == 0
    items = _items(PROMPTS)
    est = eng.graph_need(fast.shapes_of(pipe, cfg, [items], ["c2c"]))
    fast.prepare_plan(pipe, cfg, [items], ["c2c"])
    assert eng.graph_bytes > 0 and eng.cache_stats()["graph_mb"] > 0
    assert eng.held_bytes() == eng.cache_bytes + eng.graph_bytes
    print(f"graph memory measured {eng.graph_bytes / 2**20:.1f} MB, estimated"
          f" {est / 2**20:.1f} MB")
    before = eng.graph_bytes
    _gen(pipe, cfg, PROMPTS)  # every shape prepared: nothing more is captured
    assert eng.graph_bytes == before
