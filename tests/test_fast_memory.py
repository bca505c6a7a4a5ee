"""Issue 19 part 3, the fast engine's memory (tiny models, fp32, CPU, no torch.compile): the
static caches stay under a byte cap as shapes change (least recently used freed first), a
repeated shape reuses its cache (the reuse ratio), the c2c sharer's cache holds its prompt only,
and peak memory is measured per generation from a reset."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from c2c_core.engines import fast
from c2c_core.bench.runner import Item, generate
from c2c_core.measure.timing import Timer

PROMPTS = ["Say hello.", "What is the capital of France?",
           "Explain machine learning in simple terms, please, with an example. " * 4]


def _gen(pipe, cfg, prompts, mode="c2c", engine="fast", **gen):
    c = replace(cfg, engine=engine, gen=replace(cfg.gen, **gen))
    if len(prompts) == 1:
        return [generate(pipe, c, Item(1, prompts[0]), mode, Timer(pipe.device))]
    return fast.generate_batch(pipe, c, [Item(i + 1, p) for i, p in enumerate(prompts)], mode,
                               Timer(pipe.device))


def test_held_bytes_stay_under_the_cap_as_shapes_change(pipe_cfg):
    pipe, cfg, eng = pipe_cfg
    shapes = [PROMPTS[:1], PROMPTS[2:], PROMPTS[:2], PROMPTS, PROMPTS[:1], PROMPTS[1:]]
    need = [sum(eng.cache_nbytes(*k[1:4]) for k in fast.shapes_of(
        pipe, cfg, [[Item(i, p) for i, p in enumerate(ps)]], ["c2c"])) for ps in shapes]
    eng.cache_cap = int(1.5 * max(need))  # the largest generation fits; not all of them
    assert sum(need) > eng.cache_cap
    for prompts in shapes:
        gens = _gen(pipe, cfg, prompts)
        assert eng.cache_bytes <= eng.cache_cap, eng.cache_stats()
        assert eng.cache_bytes == sum(eng.cache_nbytes(*k) for k in eng._caches)
        assert all(len(g.tokens) == 6 for g in gens)
    assert eng.cache_evictions > 0
    # every step left is bound to a cache still held (an evicted cache's step was dropped)
    assert {k[:3] for k in eng._steps} <= set(eng._caches)


@pytest.mark.filterwarnings("ignore:fast engine")
def test_evicted_shapes_give_the_same_tokens_when_prepared_again(pipe_cfg):
    pipe, cfg, eng = pipe_cfg
    eager = [_gen(pipe, cfg, [p], engine="eager")[0].tokens for p in PROMPTS]
    eng.cache_cap = eng.cache_nbytes("receiver", 1, 64) + eng.cache_nbytes("sharer", 1, 64)
    for _ in range(2):  # each prompt's shape pushes the others out
        assert [_gen(pipe, cfg, [p])[0].tokens for p in PROMPTS] == eager
    assert eng.cache_evictions >= 4


def test_a_repeated_shape_reuses_its_cache(pipe_cfg):
    pipe, cfg, eng = pipe_cfg
    _gen(pipe, cfg, PROMPTS[:1])
    first = eng.cache_stats()
    assert first["requests"] == 2 and first["reuses"] == 0  # receiver + sharer, both new
    for _ in range(3):
        _gen(pipe, cfg, PROMPTS[:1])
    st = eng.cache_stats()
    assert st["requests"] == 8 and st["reuses"] == 6 and st["reuse_ratio"] == 0.75
    assert st["evictions"] == 0 and st["caches"] == 2


def test_a_planned_run_reuses_every_cache(pipe_cfg):
    pipe, cfg, eng = pipe_cfg
    batches = [[Item(1, PROMPTS[0])], [Item(1, PROMPTS[2])]]
    fast.prepare_plan(pipe, cfg, batches, ["c2c", "receiver"])
    for b in batches:
        for mode in ("c2c", "receiver"):
            fast.generate_batch(pipe, cfg, b, mode, Timer(pipe.device))
    st = eng.cache_stats()
    assert st["requests"] == 6 and st["reuse_ratio"] == 1.0, st


@pytest.mark.parametrize("prompt", [PROMPTS[0], PROMPTS[2]])
def test_the_sharer_cache_holds_its_prompt_only(pipe_cfg, prompt):
    pipe, cfg, eng = pipe_cfg
    cfg = replace(cfg, gen=replace(cfg.gen, max_new_tokens=200))
    g = _gen(pipe, cfg, [prompt])[0]
    n = g.prompt_tokens - 1                   # the instruction section the sharer reads
    (s_key,) = [k for k in eng._caches if k[0] == "sharer"]
    (r_key,) = [k for k in eng._caches if k[0] == "receiver"]
    L = s_key[2]
    assert L == fast.sharer_len(n) and n <= L < n + fast.SHARER_ROUND
    assert eng._caches[s_key].layers[0].keys.shape[2] == L
    # the receiver's holds prompt + new tokens; the sharer's never does
    assert r_key[2] == fast.bucket(g.prompt_tokens + 200) > L
    planned = fast.shapes_of(pipe, cfg, [[Item(1, prompt)]], ["c2c"])
    assert ("cache", "sharer", 1, L) in planned


def test_the_cap_comes_from_the_environment_or_the_free_memory(monkeypatch):
    monkeypatch.setenv(fast.CACHE_CAP_ENV, "12.5")
    assert fast.cache_cap_bytes(torch.device("cpu")) == int(12.5 * 2**20)
    monkeypatch.delenv(fast.CACHE_CAP_ENV)
    from c2c_core.engines import budget
    monkeypatch.setattr(budget, "free_bytes", lambda d: 8 * 2**30)
    assert fast.cache_cap_bytes(torch.device("cpu")) == 4 * 2**30
    monkeypatch.setenv(fast.CACHE_CAP_ENV, "lots")
    from c2c_core.spec.errors import UserError
    with pytest.raises(UserError, match="C2C_CACHE_CAP_MB"):
        fast.cache_cap_bytes(torch.device("cpu"))


def test_peak_memory_is_measured_from_a_reset_per_generation(monkeypatch):
    """On CUDA every generation resets the allocator's peaks before it starts, so its peak never
    carries an earlier generation's (faked here: no GPU)."""
    from c2c_core.measure import memory
    calls, peak = [], {"v": 0}
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats",
                        lambda d=None: (calls.append("reset"), peak.update(v=0)))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d=None: peak["v"])
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda d=None: peak["v"])
    from c2c_core.measure import hardware
    monkeypatch.setattr(hardware, "nvml_energy_mj", lambda d: None)
    out = []
    for size in (900 * 2**20, 100 * 2**20):  # a big generation, then a small one
        m = memory.DeviceMemory(torch.device("cuda:0")).__enter__()
        peak["v"] = max(peak["v"], size)
        m.__exit__(None, None, None)
        out.append(m.allocated_mb)
    assert calls == ["reset", "reset"] and out == [900.0, 100.0]


@pytest.mark.filterwarnings("ignore:fast engine")
def test_under_graphs_an_evicted_cache_takes_its_fills_and_projection_with_it(pipe_cfg):
    """The prepared fills and the projection hold caches (the projection two: the receiver's and
    the sharer's); when the cap frees a cache, every callable bound to it goes too, and a shape
    needed again is prepared again with the same tokens."""
    pipe, cfg, eng = pipe_cfg
    eng.graphs = True
    shapes = [PROMPTS[:1], PROMPTS[2:], PROMPTS[:2], PROMPTS, PROMPTS[:1]]
    first = [g.tokens for g in _gen(pipe, cfg, PROMPTS[:1])]
    need = [sum(eng.cache_nbytes(*c) for c in {k[1:4] for k in fast.shapes_of(
        pipe, cfg, [[Item(i, p) for i, p in enumerate(ps)]], ["c2c"])}) for ps in shapes]
    eng.cache_cap = int(1.05 * max(need))  # the largest generation fits; not all of them
    assert sum(need) > eng.cache_cap
    for prompts in shapes:
        _gen(pipe, cfg, prompts)
        assert eng.cache_bytes <= eng.cache_cap, eng.cache_stats()
        for k in eng._steps:  # nothing prepared outlives a cache it writes into
            assert all(c in eng._caches for c in eng._binds.get(k, (k[:3],))), k
    assert eng.cache_evictions > 0
    kinds = {k[3][0] for k in eng._steps if isinstance(k[3], tuple)}
    assert kinds == {"fill", "proj"}, kinds
    assert [g.tokens for g in _gen(pipe, cfg, PROMPTS[:1])] == first


@pytest.mark.filterwarnings("ignore:fast engine")
def test_a_ready_shape_is_kept_while_its_generation_prepares_another(pipe_cfg):
    """Issue 25 part 2: the receiver's step and fills are ready, the sharer's fill is not (it was
    freed); preparing it inside the generation needs room, and the least recently used cache is
    the receiver's, which this generation is about to use. It stays: a ready shape a generation
    needs counts as in use (before: the step went with its cache and first() hit a KeyError)."""
    pipe, cfg, eng = pipe_cfg
    eng.graphs = True
    want = _gen(pipe, cfg, PROMPTS[:1])[0].tokens
    s_key = next(k for k in eng._caches if k[0] == "sharer")
    for k in [k for k in eng._steps if k[:3] == s_key]:  # the sharer's cache and fill freed
        del eng._steps[k]
        eng._ready.discard(k)
    eng._caches.pop(s_key)
    eng.cache_bytes -= eng.cache_nbytes(*s_key)
    eng.cache_cap = eng.cache_bytes  # no room: the next cache evicts the least recently used
    assert _gen(pipe, cfg, PROMPTS[:1])[0].tokens == want
    assert any(k[0] == "receiver" for k in eng._caches)


def test_a_generation_larger_than_the_cap_is_refused_before_it_runs(pipe_cfg):
    """Issue 25 part 2: a generation's caches are held together, so a run whose largest
    generation needs more than the cap is refused in one sentence before anything runs."""
    from c2c_core.spec.errors import UserError
    pipe, cfg, eng = pipe_cfg
    items = [Item(i + 1, p) for i, p in enumerate(PROMPTS)]
    eng.cache_cap = eng.cache_nbytes("receiver", 3, 64)  # less than batch 3's caches
    with pytest.raises(UserError, match="cache cap") as e:
        fast.prepare_plan(pipe, cfg, [items], ["c2c"])
    assert "C2C_CACHE_CAP_MB" in str(e.value) and "\n" not in str(e.value)
    assert not eng._ready  # nothing was prepared


def test_a_slot_group_is_held_under_the_cap_beside_the_caches(pipe_cfg):
    """A server's slot group keeps its own cache outside the LRU: it counts in what the cap
    holds while it lives (a batch run's caches make room for it, then evict around it), a
    second group that would not fit beside it is refused in one sentence, and its bytes are
    given back when it goes."""
    import gc
    from c2c_core.engines.fast.slots import SlotGroup
    from c2c_core.spec.errors import UserError
    pipe, cfg, eng = pipe_cfg
    _gen(pipe, cfg, PROMPTS[:1], mode="receiver")
    from c2c_core.plan.item import build_plan
    n = len(build_plan(pipe, cfg, Item(3, PROMPTS[2]), "receiver").ids)
    big = eng.cache_nbytes("receiver", 1, fast.bucket(n + cfg.gen.max_new_tokens))
    group = SlotGroup(pipe, "receiver", 2, 64, True)
    assert eng.group_bytes() == group.nbytes > 0
    assert eng.cache_stats()["slots_mb"] == round(group.nbytes / 2**20, 3)
    eng.cache_cap = group.nbytes + big  # the group and one batch cache, no more
    evicted = eng.cache_evictions
    _gen(pipe, cfg, PROMPTS[2:3], mode="receiver")  # another bucket: the first cache goes
    assert eng.held_bytes() <= eng.cache_cap, eng.cache_stats()
    assert eng.cache_evictions > evicted
    eng.cache_cap = 2 * group.nbytes - 1  # a second group would not fit beside the first
    with pytest.raises(UserError, match=r"The receiver's 2 slots of 64 positions need .* MB of"
                                        r" cache beside .* MB held already, more than the fast"
                                        r" engine's cap .*; use fewer --slots"):
        SlotGroup(pipe, "receiver", 2, 64, True)
    del group
    gc.collect()
    assert eng.group_bytes() == 0
    SlotGroup(pipe, "receiver", 2, 64, True)  # fits once the first is gone
