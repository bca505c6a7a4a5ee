"""Issue 19 part 1 on a CPU: the fast engine's GPU path (prefills and projection as callables
prepared per (batch, prompt bucket), the prompt's last token through the decode step, the EOS
check one step late) gives the tokens of the plain path, prepares every shape in warm-up, and
puts the one step past the end in `other_ms`, never in a row's decode steps or wait. Compiling
is slow on shared cores: one test compiles; the rest run the same callables uncompiled."""

from __future__ import annotations

import warnings
from dataclasses import replace

import pytest

from c2c_core.bench.runner import Item, generate, run_many, timing_fields
from c2c_core.engines import fast
from c2c_core.engines.fast import batch as fast_batch
from c2c_core.io.records import MODES, check_record
from c2c_core.measure.timing import Timer
from c2c_core.models.loading import load_pipeline
from c2c_core.spec.config import build_run_config

from conftest import loud_weights

PROMPTS = ["What is the capital of France?", "Say hello.",
           "Explain machine learning in simple terms, please, with an example.",
           "Name three colours and one number: 42."]


@pytest.fixture(scope="module")
def loud(tiny_cfg_kwargs):
    cfg = build_run_config(**{**tiny_cfg_kwargs, "max_new_tokens": 6, "t2t_note_tokens": 4},
                           engine="fast")
    pipe = load_pipeline(cfg)
    loud_weights(pipe)
    fast.engine_for(pipe, compile=False)
    return pipe, cfg


def _engine(pipe, graphs: bool, lag: int):
    eng = fast.engine_for(pipe)
    eng.graphs, eng.eos_lag = graphs, lag
    return eng


def test_prompt_buckets():
    assert [fast.prompt_bucket(n) for n in (1, 16, 17, 128, 129, 1000, 1024, 1025)] == \
        [16, 16, 32, 128, 192, 1024, 1024, 1280]


# slow: every shape of a mixed run prepared (~28 s under load);
# quick: test_late_prepare (a prepared shape pays nothing, an unplanned one its own record)
@pytest.mark.slow
def test_every_shape_is_prepared_in_warm_up(loud):
    """Under graphs a run lists its fills and its projection among its shapes, prepares them
    before anything is timed (t2t's answer too, whose length is known only after the note),
    and no generation prepares anything late."""
    pipe, cfg = loud
    eng = _engine(pipe, True, 1)
    try:
        items = [Item(i + 1, p) for i, p in enumerate(PROMPTS)]
        keys = fast.shapes_of(pipe, cfg, [items[:2], items[2:]], list(MODES))
        kinds = {k[0] for k in keys}
        assert kinds == {"step", "cache", "fill", "proj"}, kinds
        assert all(k[3] == fast.bucket(k[3]) for k in keys if k[0] == "step")
        late = eng.late
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a late prepare would warn (when compiling)
            recs = run_many(pipe, replace(cfg, batch_size=2, mode="all", repeats=1),
                            PROMPTS)
        assert eng.late == late
        assert len(recs) == len(PROMPTS) * len(MODES)
        assert all(check_record(r) == [] for r in recs)
        # prompt_tokens are the prompt's own, never the bucket's padding
        eager = {(r["id"], r["mode"]): r for r in run_many(
            pipe, replace(cfg, engine="eager", batch_size=1, mode="all", repeats=1), PROMPTS)}
        for r in recs:
            e = eager[(r["id"], r["mode"])]
            assert r["timing"]["prompt_tokens"] == e["timing"]["prompt_tokens"]
            assert r["response"] == e["response"], (r["mode"], r["id"])
    finally:
        _engine(pipe, False, 0)


def test_the_eos_check_one_step_late_keeps_tokens_and_puts_that_step_in_other(loud,
                                                                            monkeypatch):
    """Rows stop at EOS as before; the batch runs exactly one step past its longest row; that
    step's time is in other_ms (never in a row's decode steps or its batch wait)."""
    pipe, cfg = loud
    c = replace(cfg, gen=replace(cfg.gen, ignore_eos=True, max_new_tokens=8))
    items = [Item(i + 1, p) for i, p in enumerate(PROMPTS)]
    free = [g.tokens for g in fast.generate_batch(pipe, c, items, "receiver", Timer(pipe.device))]
    eos = {row[2] for row in free}  # every row ends by its 3rd token, well before the cap
    real = fast_batch.build_plan

    def plan_with_eos(*a, **k):
        p = real(*a, **k)
        p.eos = set(eos)
        return p

    monkeypatch.setattr(fast_batch, "build_plan", plan_with_eos)
    c = replace(c, gen=replace(c.gen, ignore_eos=False))
    out = {}
    for lag in (0, 1):
        eng = _engine(pipe, False, lag)
        steps = []
        key = ("receiver", 4, fast.bucket(max(len(plan_with_eos(pipe, c, it, "receiver").ids)
                                               for it in items) + 8), True)
        eng.prepare(*key)
        step = eng._steps[key]
        eng._steps[key] = lambda *a, step=step, steps=steps: (steps.append(1), step(*a))[1]
        try:
            gens = fast.generate_batch(pipe, c, items, "receiver", Timer(pipe.device))
        finally:
            eng._steps[key] = step
        out[lag] = gens, len(steps)
    _engine(pipe, False, 0)
    (g0, n0), (g1, n1) = out[0], out[1]
    assert [g.tokens for g in g0] == [g.tokens for g in g1]
    assert all(g.tokens[-1] in eos for g in g0)
    longest = max(len(g.tokens) for g in g0)
    assert longest < 8  # every row ended early, so the late check had a step to run past
    assert n0 == longest and n1 == longest + 1  # the last prompt token + steps (+ one late)
    for g in g1:
        t, steps = timing_fields(g)
        assert len(steps) == len(g.tokens) - 1
        assert len(g.batch_wait) == longest - len(g.tokens)
        assert t["other_ms"] > 0


def test_compiled_prefills_and_projection_give_the_eager_tokens(tiny_cfg_kwargs):
    """torch.compile of the fills, the stacked projection and the step (as on a GPU, without
    the graphs): eager tokens in c2c, every compile in warm-up (run.compile_s), none late."""
    cfg = build_run_config(**{**tiny_cfg_kwargs, "max_new_tokens": 5, "warmup": 1},
                           engine="fast", ignore_eos=True)
    pipe = load_pipeline(cfg)
    loud_weights(pipe)
    from torch._dynamo.utils import counters
    eng = fast.FastEngine(pipe, compile=True, graphs=True)
    pipe._fast_engine = eng
    fast.prepare_plan(pipe, cfg, [[Item(1, p)] for p in PROMPTS[:2]], ["c2c"])
    compiled = counters["stats"]["unique_graphs"]
    recs = run_many(pipe, cfg, PROMPTS[:2])
    # nothing compiles once warm-up is over (a strided input would recompile the step inside
    # the prefill span, unseen by `late`)
    assert counters["stats"]["unique_graphs"] == compiled
    assert eng.late == 0 and recs[0]["run"]["compile_s"] >= 0 and eng.compile_s > 0
    kinds = {k[3][0] for k in eng._ready if isinstance(k[3], tuple)}
    assert kinds == {"fill", "proj"}, eng._ready
    for r, p in zip(recs, PROMPTS[:2]):
        e = generate(pipe, replace(cfg, engine="eager"), Item(1, p), "c2c", Timer(pipe.device))
        assert r["response"] == pipe.tokenizer.decode(e.tokens, skip_special_tokens=True)
        assert check_record(r) == []


def test_the_step_mode_is_checked_and_capture_on_a_cpu_runs_the_step_uncompiled(loud,
                                                                               monkeypatch):
    """C2C_FAST_STEP=capture makes the CUDA decode step one captured graph of the step as it is
    (no compile); a CPU has no graphs, so there it runs uncompiled, with the same tokens. A
    mistyped mode is refused in one sentence naming the two it takes."""
    from c2c_core.spec.errors import UserError
    pipe, cfg = loud
    monkeypatch.setenv("C2C_FAST_STEP", "turbo")
    with pytest.raises(UserError, match=r"C2C_FAST_STEP=turbo .*compile \(default\) or"
                                        r" C2C_FAST_STEP=capture"):
        fast.FastEngine(pipe, compile=True)
    monkeypatch.setenv("C2C_FAST_STEP", "capture")
    old = pipe._fast_engine
    eng = pipe._fast_engine = fast.FastEngine(pipe, compile=True)
    try:
        assert eng.name == "fast-capture" and eng.step_mode == "capture"
        c = replace(cfg, gen=replace(cfg.gen, ignore_eos=True))
        item = Item(1, PROMPTS[0])
        got = fast.generate_batch(pipe, c, [item], "c2c", Timer(pipe.device))[0].tokens
        step = [v for k, v in eng._steps.items() if isinstance(k[3], bool)]
        assert step and not any(hasattr(s, "_torchdynamo_orig_callable") for s in step)
    finally:
        pipe._fast_engine = old
    assert got == generate(pipe, replace(c, engine="eager"), item, "c2c",
                           Timer(pipe.device)).tokens


@pytest.mark.parametrize("compile_,step_mode,cuda,kind,said", [
    (False, "compile", True, "graph", "preparing"), (True, "compile", True, "step", "compiling"),
    (True, "compile", True, "graph", "capturing"), (True, "capture", True, "step", "capturing"),
    (True, "compile", False, "graph", "compiling"), (True, "capture", False, "step", "preparing"),
])
def test_the_progress_line_says_what_warm_up_does(compile_, step_mode, cuda, kind, said):
    """The app's progress line and the late-shape warning name what happens: a compile, a CUDA
    graph capture, or only allocating."""
    from types import SimpleNamespace
    eng = SimpleNamespace(compile=compile_, step_mode=step_mode, cuda=cuda)
    assert fast.FastEngine.verb(eng, kind) == said
