"""One C2C whatever the path (issue 18): the eager engine, the fast engine at batch 1 and the fast
engine at batch 4 give the same tokens, for every mode x {same tokenizer, a sharer with its own
tokenizer, two sharers in parallel, two sharers in sequence} (CPU, fp32, greedy). Sampled with
a fixed seed, batch 1 and batch 4 give the same tokens in each engine (each row samples from its
own generator, seeded from (seed, prompt id, repeat)), and the two engines agree.

The models are tiny and random, with weights scaled up and the fuser's gates open, so tokens
vary and the projection changes what the receiver says (else equality would prove little)."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace

import pytest
import torch

from c2c_core.bench.runner import Item, generate
from c2c_core.engines import fast
from c2c_core.io.records import MODES, check_record
from c2c_core.bench.runner import make_record, run_metadata
from c2c_core.measure.timing import Timer
from c2c_core.models.loading import load_pipeline
from c2c_core.spec.config import build_run_config

from conftest import loud_weights, open_fuser

PROMPTS = ["What is the capital of France?", "Say hello.",
           "Explain machine learning in simple terms, please, with an example.",
           "Name three colours and one number: 42."]


def _loud(pipe) -> None:
    loud_weights(pipe)
    open_fuser(pipe, 1)  # random projectors too: the projection is not a copy of the input
    fast.engine_for(pipe, compile=False)


PAIRS = ["same", "own_tokenizer", "two_parallel", "two_sequential"]


@pytest.fixture(scope="module")
def pairs(tiny_cfg_kwargs, tiny_models, other_sharer):
    out = {}
    kw = {**tiny_cfg_kwargs, "max_new_tokens": 6, "t2t_note_tokens": 4}
    for name in PAIRS:
        over = {}
        if name == "own_tokenizer":
            over = {"teacher_model": other_sharer}
        elif name.startswith("two"):
            over = {"teacher_model": [tiny_models["sharer"], other_sharer],
                    "fusion": name.split("_")[1]}
        cfg = build_run_config(**{**kw, **over}, ignore_eos=True)
        pipe = load_pipeline(cfg)
        _loud(pipe)
        out[name] = (pipe, cfg)
    return out


def _tokens(pipe, cfg, mode, engine, batch, **gen):
    c = replace(cfg, engine=engine, gen=replace(cfg.gen, **gen))
    items = [Item(i + 1, p) for i, p in enumerate(PROMPTS)]
    if engine == "eager" or batch == 1:
        return [generate(pipe, c, it, mode, Timer(pipe.device)).tokens for it in items]
    return [g.tokens for g in fast.generate_batch(pipe, c, items, mode, Timer(pipe.device))]


@contextmanager
def graphs(pipe, on: bool = True, lag: int = 1):
    """The fast engine as on a GPU: prefills and projection as prepared callables over prompts
    padded to a bucket (not compiled here: compile is off in tests) and the EOS check `lag`
    steps late."""
    eng = fast.engine_for(pipe)
    was = eng.graphs, eng.eos_lag
    eng.graphs, eng.eos_lag = on, lag
    try:
        yield eng
    finally:
        eng.graphs, eng.eos_lag = was


def _matrix():
    """Every (mode, pair). The quick suite keeps every mode on the one-sharer pair and c2c (the
    mode where the pairs differ) on the other tokenizer and two parallel sharers; the rest of
    the matrix (up to ~25 s a case under load) is marked slow and runs with `-m slow` and CI."""
    for mode in MODES:
        for pair in PAIRS:
            quick = pair == "same" or (mode == "c2c" and pair in ("own_tokenizer", "two_parallel"))
            yield pytest.param(mode, pair, marks=() if quick else pytest.mark.slow,
                               id=f"{mode}-{pair}")


@pytest.mark.parametrize("mode,pair", list(_matrix()))
def test_eager_fast_and_batches_give_the_same_tokens(pairs, pair, mode):
    pipe, cfg = pairs[pair]
    eager = _tokens(pipe, cfg, mode, "eager", 1)
    assert len({tuple(t) for t in eager}) > 1 or len(set(eager[0])) > 1, eager  # tokens vary
    assert _tokens(pipe, cfg, mode, "fast", 1) == eager
    assert _tokens(pipe, cfg, mode, "fast", 4) == eager
    with graphs(pipe) as eng:  # bucketed prompts, prepared prefills and projection
        assert _tokens(pipe, cfg, mode, "fast", 1) == eager
        assert _tokens(pipe, cfg, mode, "fast", 4) == eager
        assert any(k[3][0] == "fill" for k in eng._steps if isinstance(k[3], tuple))


def test_the_projection_changes_the_answer(pairs):
    """The matrix would prove little if the sharer had no effect on the receiver's tokens."""
    for name in PAIRS:
        pipe, cfg = pairs[name]
        assert _tokens(pipe, cfg, "c2c", "eager", 1) != _tokens(pipe, cfg, "receiver", "eager", 1)


@pytest.mark.parametrize("pair", ["same", "own_tokenizer"])
def test_sampled_rows_depend_on_their_seed_only(pairs, pair):
    pipe, cfg = pairs[pair]
    s = dict(do_sample=True, temperature=1.0, top_p=0.95, top_k=50, seed=7)
    eager = _tokens(pipe, cfg, "c2c", "eager", 1, **s)
    assert _tokens(pipe, cfg, "c2c", "fast", 1, **s) == eager
    assert _tokens(pipe, cfg, "c2c", "fast", 4, **s) == eager
    with graphs(pipe):
        assert _tokens(pipe, cfg, "c2c", "fast", 1, **s) == eager
        assert _tokens(pipe, cfg, "c2c", "fast", 4, **s) == eager
    greedy = _tokens(pipe, cfg, "c2c", "eager", 1)
    assert eager != greedy  # it did sample
    other_seed = _tokens(pipe, cfg, "c2c", "eager", 1, **{**s, "seed": 8})
    assert other_seed != eager


@pytest.mark.parametrize("pair", PAIRS)
def test_both_engines_write_the_same_record_fields(pairs, pair):
    """timing.sharers (names, alignment, calls), sharer_prompt_format and the alignment fields
    come out of either engine alike, and check_record accepts both."""
    pipe, cfg = pairs[pair]
    for mode in MODES:
        recs = {}
        for engine in ("eager", "fast"):
            c = replace(cfg, engine=engine)
            g = generate(pipe, c, Item(1, PROMPTS[0]), mode, Timer(pipe.device))
            recs[engine] = make_record(pipe, Item(1, PROMPTS[0]), mode, 0, g,
                                       run_metadata(pipe, c, "sync"))
        e, f = recs["eager"], recs["fast"]
        assert check_record(e) == [] and check_record(f) == [], (check_record(e), check_record(f))
        strip = ("ms", "tokens_per_second")
        for key in ("sharers",):
            a = [{k: v for k, v in x.items() if not k.endswith(strip)} for x in e["timing"][key]]
            b = [{k: v for k, v in x.items() if not k.endswith(strip)} for x in f["timing"][key]]
            assert a == b, (mode, a, b)
        assert e.get("sharer_prompt_format") == f.get("sharer_prompt_format")
        assert e["timing"]["projector_calls"] == f["timing"]["projector_calls"]
        assert e["timing"]["prompt_tokens"] == f["timing"]["prompt_tokens"]
        assert (e["timing"]["alignment_ms"] > 0) == (f["timing"]["alignment_ms"] > 0)
        assert e["response"] == f["response"]


@pytest.fixture(scope="module")
def sliding_sharer(tiny_models, tmp_path_factory):
    """A tiny Gemma 3 sharer (the receiver's tokenizer) with a sliding window of 8 positions in
    two of its three layers: prompts and caches far longer than the window."""
    from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig
    tok = AutoTokenizer.from_pretrained(tiny_models["receiver"])
    d = str(tmp_path_factory.mktemp("sliding") / "sharer")
    torch.manual_seed(3)
    cfg = Gemma3TextConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                           num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=16, sliding_window=8, max_position_embeddings=512,
                           layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                           eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id,
                           bos_token_id=tok.eos_token_id)
    Gemma3ForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.mark.parametrize("mode", MODES)
def test_a_sliding_window_sharer_past_its_window(tiny_cfg_kwargs, sliding_sharer, mode):
    """The fast engine gives a sliding-window sharer the model's own attention (its sliding
    layers drop keys past the window) in its prefill and in its decode steps, with caches far
    longer than the window: the eager tokens, batch 1 and batch 4."""
    cfg = build_run_config(**{**tiny_cfg_kwargs, "teacher_model": sliding_sharer,
                              "max_new_tokens": 6, "t2t_note_tokens": 12}, ignore_eos=True)
    pipe = load_pipeline(cfg)
    _loud(pipe)
    g = torch.Generator().manual_seed(1)  # Gemma's scaled embeddings want smaller weights
    with torch.no_grad():
        for _, p in pipe.sharers[0].model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (p.shape[-1] ** -0.5 if p.dim() == 2 else 0.1))
    eager = _tokens(pipe, cfg, mode, "eager", 1)
    if mode == "sharer":
        assert len({tuple(t) for t in eager}) > 1, eager  # the rows differ
    assert _tokens(pipe, cfg, mode, "fast", 1) == eager
    assert _tokens(pipe, cfg, mode, "fast", 4) == eager


@pytest.mark.parametrize("direction", ["receiver_templated", "receiver_plain"])
def test_align_shows_the_plan_the_engines_run(tiny_cfg_kwargs, tiny_models, other_sharer,
                                              direction):
    """`align` (plan/show.py) and the engines' plan (plan/item.py) agree position by position:
    receiver ids, sharer ids and the projected positions. receiver_plain: the receiver reads
    plain text and the sharer's closing template is longer, so the receiver's sequence ends in
    padding, which both cut."""
    from c2c_core.bench.runner import Item as It
    from c2c_core.plan.item import build_plan
    from c2c_core.plan.show import plan_view
    if direction == "receiver_templated":
        kw = {"teacher_model": other_sharer}
    else:
        kw = {"base_model": other_sharer, "teacher_model": tiny_models["receiver"]}
    cfg = build_run_config(**{**tiny_cfg_kwargs, **kw})
    pipe = load_pipeline(cfg)
    for prompt in PROMPTS:
        plan = build_plan(pipe, cfg, It(1, prompt), "c2c")
        view = plan_view(pipe.tokenizer, [sl.tokenizer for sl in pipe.sharers], prompt,
                         cfg.alignment, cfg.chat_template)
        assert list(view.receiver_ids) == plan.ids
        f = plan.feeds[0]
        assert view.sharer_ids(0) == f.ids
        tail = plan.last_start  # the last section: nothing projected there
        assert view.projection_mask(0)[:tail] == (f.project or [True] * tail)
        assert not any(view.projection_mask(0)[tail:])
        if direction == "receiver_plain":
            assert plan.pad is None or not plan.pad[-1]


def test_the_context_check_counts_the_plans_ids(pairs, monkeypatch):
    """check_items (before any generation) counts what each mode's plan feeds the first model:
    the sharer's own ids in sharer/t2t mode, not the receiver's encoding of the prompt."""
    from c2c_core.engines import limits
    from c2c_core.plan.item import build_plan, chat_ids
    pipe, cfg = pairs["own_tokenizer"]
    seen = []
    monkeypatch.setattr(limits, "check_context", lambda p, c, n, mode, *a: seen.append((mode, n)))
    monkeypatch.setattr(limits, "pipe_contexts", lambda p: (4096, 4096))
    item = Item(1, PROMPTS[2])
    limits.check_items(pipe, cfg, [item], ["c2c", "sharer"])
    want = {m: len(build_plan(pipe, cfg, item, m).ids) for m in ("c2c", "sharer")}
    assert dict(seen) == want
    assert want["sharer"] != len(chat_ids(pipe.tokenizer, PROMPTS[2], cfg.chat_template))
