"""A prefill attends over the prompt's positions, not over the whole static cache (issue 25
item 7): the cache keeps room for --max_new_tokens, and a fill that read all of it would make
TTFT grow with the output length. And every prepared callable of one cache reads one shared
input set (item 5), counted in the cache's bytes and freed with it."""

from __future__ import annotations

import pytest
import torch

from c2c_core.bench.runner import Item, generate
from c2c_core.engines import fast
from c2c_core.engines.fast.batch import first_logits
from c2c_core.engines.fast.engine import cache_view
from c2c_core.measure.timing import Timer
from c2c_core.models.loading import load_pipeline
from c2c_core.plan.item import build_plan
from c2c_core.spec.config import build_run_config

PROMPT = "Name three primary colours and say why they are primary."


@pytest.fixture(scope="module")
def view_pipe(tiny_cfg_kwargs):
    cfg = build_run_config(**{**tiny_cfg_kwargs, "max_new_tokens": 4}, engine="fast",
                           ignore_eos=True)
    return load_pipeline(cfg), cfg


def _keys_seen(monkeypatch):
    """(queries, keys) of every sdpa attention call of the models (query [B, heads, q, D])."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    seen = []
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def spy(module, query, key, *a, **kw):
        seen.append((query.shape[-2], key.shape[-2]))
        return sdpa(module, query, key, *a, **kw)

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "sdpa", spy)
    return seen


@pytest.mark.parametrize("graphs", [False, True])
def test_a_prefill_reads_its_prompt_not_the_room_kept_for_new_tokens(view_pipe, monkeypatch,
                                                                      graphs):
    """The same c2c generation with 4 and with 900 new tokens allowed (caches of 64 and 1,024
    positions): every prefill query block attends over the same number of positions (its
    section's end), the first token and the receiver cache's prompt positions are identical,
    and only the one-token steps read the whole cache."""
    pipe, cfg = view_pipe
    seen_by_L, firsts, prompt_kv = {}, {}, {}
    for new in (4, 900):
        c = cfg.__class__(**{**cfg.__dict__, "gen": cfg.gen.__class__(
            **{**cfg.gen.__dict__, "max_new_tokens": new})})
        eng = pipe._fast_engine = fast.FastEngine(pipe, compile=False, graphs=graphs)
        fast.prepare_plan(pipe, c, [[Item(1, PROMPT)]], ["c2c"])
        seen = _keys_seen(monkeypatch)
        logits = first_logits(pipe, c, [Item(1, PROMPT)])
        monkeypatch.undo()
        T = eng.prompt_len(len(build_plan(pipe, c, Item(1, PROMPT), "c2c").ids))
        L = fast.bucket(T + new)
        fills = sorted({k for q, k in seen if q > 1})
        assert fills and max(fills) <= T - 1, (seen, T)  # the sections, never L
        assert any(k == L for q, k in seen if q == 1)     # the step reads the whole cache
        seen_by_L[L] = fills
        firsts[L] = logits
        prompt_kv[L] = eng._caches[("receiver", 1, L)].layers[0].keys[:, :, :T - 1].clone()
    (a, b) = sorted(seen_by_L)
    assert a <= 128 and b == 1024
    assert seen_by_L[a] == seen_by_L[b]
    assert torch.allclose(firsts[a], firsts[b], atol=1e-5)
    assert torch.allclose(prompt_kv[a], prompt_kv[b], atol=1e-6)


def test_a_view_writes_into_its_cache_and_moves_its_write_position(view_pipe):
    pipe, _ = view_pipe
    eng = fast.FastEngine(pipe, compile=False, graphs=False)
    cache = eng.cache("receiver", 1, 128, use=False)
    v = cache_view(cache, 40)
    assert cache_view(cache, 40) is v and cache_view(cache, 128) is cache
    lv, lc = v.layers[0], cache.layers[0]
    assert lv.keys.shape[-2] == 40 and lv.max_cache_len == 40
    assert lv.keys.data_ptr() == lc.keys.data_ptr()
    k = torch.randn(1, lv.keys.shape[1], 3, lv.keys.shape[-1])
    lc.cumulative_length.fill_(10)
    lv.update(k, k)
    assert int(lc.cumulative_length) == 13
    assert torch.equal(lc.keys[:, :, 10:13], k) and torch.equal(lc.values[:, :, 10:13], k)


def test_prepared_callables_of_one_cache_share_one_input_set(view_pipe, monkeypatch):
    """Two fills of one cache (the c2c sections) and its step read views of one buffer set,
    made with the cache, counted in cache_nbytes and gone when the cache is evicted."""
    pipe, cfg = view_pipe
    eng = fast.FastEngine(pipe, compile=False, graphs=True)
    statics = []
    real = eng._ready_callable

    def spy(fn, static, what, reset=None):
        statics.append((what, static))
        return real(fn, static, what, reset)

    monkeypatch.setattr(eng, "_ready_callable", spy)
    eng.prepare_fill("receiver", 2, 128, 40, 0)
    eng.prepare_fill("receiver", 2, 128, 8, 40)
    eng.prepare_fill("receiver", 2, 256, 8, 0)
    (w1, a), (w2, b), (_, other) = statics
    assert w1 == w2 == "receiver prefill"
    assert tuple(a[0].shape) == (2, 40, a[0].shape[2]) and tuple(b[0].shape) == (2, 8,
                                                                                  a[0].shape[2])
    assert a[0].is_contiguous() and b[0].is_contiguous()
    assert a[0].untyped_storage().data_ptr() == b[0].untyped_storage().data_ptr()
    assert a[1] is b[1] and a[2] is b[2]                      # the padding mask, left padding
    assert other[1] is not a[1]                               # another cache: its own set
    cache = eng._caches[("receiver", 2, 128)]
    assert cache._c2c_inputs["ok"] is a[1]
    H = a[0].shape[2]
    assert cache._c2c_inputs["emb"].numel() == 2 * 128 * H  # sized for the cache's L
    assert eng.inputs_nbytes("receiver", 2, 128) == 2 * 128 * H * 4 + 2 * 128 + 5 * 8
    assert eng.cache_bytes == sum(eng.cache_nbytes(*k) for k in eng._caches)
    # without prepared fills no embeddings buffer is made, and none is counted
    plain = fast.FastEngine(pipe, compile=False, graphs=False)
    plain.prepare("receiver", 2, 128, True)
    assert plain._caches[("receiver", 2, 128)]._c2c_inputs["emb"] is None
    assert eng.cache_nbytes("receiver", 2, 128) - plain.cache_nbytes("receiver", 2, 128) == \
        2 * 128 * H * 4


def test_a_wrong_input_shape_is_refused_when_the_callable_is_prepared():
    from c2c_core.engines.fast.engine import _expect
    _expect((torch.zeros(2, 3), torch.zeros(())), [(2, 3), ()], "x")
    with pytest.raises(AssertionError, match=r"the receiver prefill would be prepared for"
                                             r" inputs \[\(2, 3\)\]"):
        _expect((torch.zeros(2, 3),), [(2, 4)], "the receiver prefill")


def test_the_same_tokens_with_a_long_output_room(view_pipe):
    """End to end through the runner: greedy tokens of the first 4 are the same whether the
    cache keeps room for 4 or for 300 new tokens (EOS ignored)."""
    pipe, cfg = view_pipe
    out = {}
    for new in (4, 300):
        c = cfg.__class__(**{**cfg.__dict__, "gen": cfg.gen.__class__(
            **{**cfg.gen.__dict__, "max_new_tokens": new})})
        pipe._fast_engine = fast.FastEngine(pipe, compile=False, graphs=False)
        out[new] = generate(pipe, c, Item(1, PROMPT), "c2c", Timer(pipe.device)).tokens[:4]
    assert out[4] == out[300]
