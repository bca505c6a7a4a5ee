"""ZeroGPU (issue 25 item 9): with `spaces` installed and SPACES_ZERO_GPU set, the fast engine
uses its captured step and never calls inductor; an explicit C2C_FAST_STEP=compile is refused;
the app asks `spaces.GPU` for a duration computed from the job's size; records say whether a
run paid for preparation (run.fresh_process, run.prepared_shapes). A CPU or ordinary GPU Space
(the package installed, SPACES_ZERO_GPU unset) changes nothing.

No GPU and no real `spaces` here: a fake module stands in for it (sys.modules)."""

from __future__ import annotations

import math
import sys
import types
from dataclasses import replace

import pytest
import torch

from c2c_core.bench.runner import Item, generate, run_many
from c2c_core.engines import fast
from c2c_core.engines import generation
from c2c_core.io.records import check_record
from c2c_core.measure import zerogpu
from c2c_core.measure.timing import Timer
from c2c_core.spec.errors import UserError

PROMPT = "Say hello."


class FakeSpaces(types.ModuleType):
    """`spaces` as far as the app uses it: GPU(duration=...) returns a decorator; the
    durations asked for are kept."""

    def __init__(self):
        super().__init__("spaces")
        self.durations: list = []

    def GPU(self, task=None, *, duration=None, size=None):  # noqa: N802 - the package's name
        def wrap(fn):
            def call(*args, **kwargs):
                d = duration(*args, **kwargs) if callable(duration) else duration
                self.durations.append(d)
                return fn(*args, **kwargs)
            call.duration = duration
            return call
        return wrap(task) if callable(task) else wrap


@pytest.fixture
def spaces_installed(monkeypatch):
    fake = FakeSpaces()
    monkeypatch.setitem(sys.modules, "spaces", fake)
    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    monkeypatch.delenv("C2C_FAST_STEP", raising=False)
    return fake


@pytest.fixture
def zero(spaces_installed, monkeypatch):
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    return spaces_installed


@pytest.fixture
def no_inductor(monkeypatch):
    """torch.compile and the inductor cache set-up fail the test if anything calls them."""
    def refuse(*a, **k):
        raise AssertionError("torch.compile called on ZeroGPU")
    monkeypatch.setattr(torch, "compile", refuse)
    from c2c_core.engines import compile_cache
    monkeypatch.setattr(compile_cache, "setup", refuse)


def test_zerogpu_needs_the_package_and_the_variable(spaces_installed, monkeypatch):
    assert not zerogpu.on_zerogpu()  # an ordinary Space: spaces installed, no variable
    for v in ("1", "true", "True", "t"):
        monkeypatch.setenv("SPACES_ZERO_GPU", v)
        assert zerogpu.on_zerogpu()
    monkeypatch.setenv("SPACES_ZERO_GPU", "0")
    assert not zerogpu.on_zerogpu()
    monkeypatch.setenv("SPACES_ZERO_GPU", "1")
    monkeypatch.setitem(sys.modules, "spaces", None)  # the variable without the package
    assert not zerogpu.on_zerogpu()


def test_on_zerogpu_the_engine_captures_and_never_compiles(tiny_pipe, zero, no_inductor):
    """The captured step (a CPU has no graphs: the step runs as it is), prefills prepared as
    callables without inductor, the same tokens as the eager engine."""
    pipe, cfg = tiny_pipe
    old = getattr(pipe, "_fast_engine", None)
    eng = pipe._fast_engine = fast.FastEngine(pipe, compile=True, graphs=True)
    try:
        assert eng.step_mode == "capture" and not eng.inductor and eng.compile_cache is None
        assert eng.name == "fast-capture"
        assert eng.verb("step") == "preparing" and eng.verb("graph") == "preparing"
        c = replace(cfg, engine="fast", gen=replace(cfg.gen, ignore_eos=True, max_new_tokens=4))
        item = Item(1, PROMPT)
        fast.prepare_plan(pipe, c, [[item]], ["c2c"])
        got = fast.generate_batch(pipe, c, [item], "c2c", Timer(pipe.device))[0].tokens
        assert eng.prepared > 0 and eng.late == 0
        assert not any(hasattr(s, "_torchdynamo_orig_callable") for s in eng._steps.values())
    finally:
        pipe._fast_engine = old
    want = generate(pipe, replace(c, engine="eager"), item, "c2c", Timer(pipe.device)).tokens
    assert got == want


def test_an_explicit_compile_step_is_refused_on_zerogpu(tiny_pipe, zero, monkeypatch):
    pipe, _ = tiny_pipe
    monkeypatch.setenv("C2C_FAST_STEP", "compile")
    with pytest.raises(UserError, match=r"C2C_FAST_STEP=compile cannot run on ZeroGPU.*unset"
                                        r" C2C_FAST_STEP or set C2C_FAST_STEP=capture\."):
        fast.FastEngine(pipe, compile=True)
    monkeypatch.setenv("C2C_FAST_STEP", "capture")  # what the sentence says works
    assert fast.FastEngine(pipe, compile=True).step_mode == "capture"


def test_an_ordinary_space_keeps_the_compiled_step(tiny_pipe, spaces_installed):
    pipe, _ = tiny_pipe
    assert fast.engine.step_mode() == "compile"
    eng = fast.FastEngine(pipe, compile=False)
    assert eng.step_mode == "compile" and not eng.inductor and eng.name == "fast-nocompile"


# --- records: did this run pay for preparation? --------------------------------------------

def test_the_first_run_in_a_process_pays_for_preparation_the_second_does_not(tiny_pipe,
                                                                             monkeypatch):
    """A fresh process (the pid count reset, as in a forked ZeroGPU worker) and a new engine:
    the first run prepares its shapes and says so; the same run again finds them ready."""
    pipe, cfg = tiny_pipe
    c = replace(cfg, engine="fast", mode="receiver",
                gen=replace(cfg.gen, ignore_eos=True, max_new_tokens=4))
    monkeypatch.setattr(generation, "_PROCESS_RUNS", {"pid": None, "runs": 0})
    old = getattr(pipe, "_fast_engine", None)
    pipe._fast_engine = fast.FastEngine(pipe, compile=False)
    try:
        first = run_many(pipe, c, [PROMPT])
        second = run_many(pipe, c, [PROMPT])
    finally:
        pipe._fast_engine = old
    r1, r2 = first[0]["run"], second[0]["run"]
    assert r1["fresh_process"] is True and r1["prepared_shapes"] > 0 and r1["compile_s"] >= 0
    assert r2["fresh_process"] is False and r2["prepared_shapes"] == 0
    assert first[0]["timing"]["late_prepare_ms"] == 0 == second[0]["timing"]["late_prepare_ms"]
    assert check_record(first[0]) == [] and check_record(second[0]) == []
    eager = run_many(pipe, replace(c, engine="eager"), [PROMPT])[0]
    assert eager["run"]["prepared_shapes"] == 0 and eager["run"]["fresh_process"] is False
    assert check_record(eager) == []

    from c2c_core.report.runreport import ENV_KEYS, build_summary
    assert {"fresh_process", "prepared_shapes"} <= set(ENV_KEYS)  # X.summary.json carries them
    flat = str(build_summary(first + second))
    assert "'fresh_process': [True, False]" in flat, flat[:2000]


def test_the_record_fields_are_checked(tiny_pipe):
    pipe, cfg = tiny_pipe
    rec = run_many(pipe, replace(cfg, engine="eager", mode="receiver",
                                 gen=replace(cfg.gen, max_new_tokens=2)), [PROMPT])[0]
    assert check_record(rec) == []
    bad = {**rec, "run": {**rec["run"], "fresh_process": "yes", "prepared_shapes": -1}}
    assert set(check_record(bad)) == {"run.fresh_process is not true or false",
                                      "run.prepared_shapes is not a whole number >= 0"}
    old = {**rec, "run": {k: v for k, v in rec["run"].items()
                          if k not in ("fresh_process", "prepared_shapes")}}
    assert check_record(old) == []  # files written before the fields are still valid


# --- the duration asked for ---------------------------------------------------------------

def test_the_estimate_grows_with_the_job_and_is_clamped(monkeypatch):
    monkeypatch.delenv(zerogpu.MAX_ENV, raising=False)
    small = zerogpu.estimate_seconds(50, shapes=2)
    assert zerogpu.MIN_S <= small < zerogpu.MAX_S
    assert zerogpu.estimate_seconds(0) == max(zerogpu.MIN_S,
                                              math.ceil(zerogpu.BASE_S * zerogpu.MARGIN))
    mid = zerogpu.estimate_seconds(1000, shapes=4)
    assert small < mid
    assert zerogpu.estimate_seconds(1000, shapes=8) > mid  # more shapes to prepare
    assert zerogpu.estimate_seconds(10_000_000, shapes=50) == zerogpu.MAX_S
    monkeypatch.setenv(zerogpu.MAX_ENV, "600")
    assert zerogpu.estimate_seconds(10_000_000, shapes=50) == 600
    monkeypatch.setenv(zerogpu.MAX_ENV, "5")  # never below the floor
    assert zerogpu.estimate_seconds(10_000_000) == zerogpu.MIN_S
    monkeypatch.delenv(zerogpu.MAX_ENV)
    assert zerogpu.estimate_seconds(1000, wait_s=60) > zerogpu.estimate_seconds(1000)


# --- each endpoint's duration, from the job's own arguments ------------------------------------

SETTINGS = dict(mode="c2c", max_new_tokens=64, warmup=1, repeats=1, engine="auto", batch_size=1)


def test_each_job_asks_more_as_it_grows(monkeypatch):
    from c2c_core.frontends.ui import durations as d
    monkeypatch.setenv(zerogpu.MAX_ENV, "100000")  # unclamped: only growth is looked at
    one = d.batch({"prompts": "What is 2+2?", **SETTINGS})
    assert d.batch({"prompts": "What is 2+2?\n" * 20, **SETTINGS}) > one
    assert d.batch({"prompts": "What is 2+2?", **SETTINGS, "max_new_tokens": 512}) > one
    assert d.batch({"prompts": "What is 2+2?", **SETTINGS, "mode": "all"}) > one
    assert d.batch({"prompts": "What is 2+2?", **SETTINGS, "repeats": 5}) > one
    assert d.batch({"prompts": "x" * 3000, **SETTINGS}) > one  # a longer prompt
    # the eager engine prepares no shapes
    assert d.batch({"prompts": "What is 2+2?", **SETTINGS, "engine": "eager"}) < one
    assert d.profile({"prompt": "What is 2+2?", **SETTINGS}) > one  # its profiled runs
    assert d.dataset({"num_samples": 40, **SETTINGS}) > d.dataset({"num_samples": 4, **SETTINGS})
    assert d.sweep({"input_lens": "16,64", "output_lens": "32", "batch_sizes": "1", **SETTINGS}) \
        < d.sweep({"input_lens": "16,64,256", "output_lens": "32,128", "batch_sizes": "1,4",
                    **SETTINGS})
    small = dict(modes=["c2c"], rates="1", requests=4, max_tokens=32, slots=4, slo="")
    assert d.load(small) < d.load({**small, "rates": "0.5"})  # arrivals take longer
    assert d.load(small) < d.load({**small, "modes": ["c2c", "t2t"]})


def test_each_job_is_clamped(monkeypatch):
    from c2c_core.frontends.ui import durations as d
    monkeypatch.delenv(zerogpu.MAX_ENV, raising=False)
    assert d.batch({"prompts": "hi", **SETTINGS}) >= zerogpu.MIN_S
    assert d.batch({"prompts": "hi\n" * 500, **SETTINGS, "max_new_tokens": 4096}) == zerogpu.MAX_S
    assert d.dataset({"num_samples": None, **SETTINGS}) == zerogpu.MAX_S  # every row: unknown
    assert d.load_models({}) == zerogpu.MAX_S  # a download's time is not in the arguments


def test_gpu_hands_spaces_a_duration_function_of_the_call(zero):
    """gpu(f) wraps with spaces.GPU(duration=<callable>); spaces calls it with the call's own
    arguments (positional and keyword, the run settings as **settings), and a function that
    fails asks for the longest duration instead of failing the call."""
    from c2c_core.frontends.ui import durations as d
    from c2c_core.frontends.ui.durations import gpu, space_runtime

    def run_batch(prompts: str, request=None, progress=None, **settings):
        return f"ran {len(prompts.splitlines())}"

    wrapped = gpu(d.batch)(run_batch)
    assert callable(wrapped.duration)
    assert wrapped("a\nb", None, None, **SETTINGS) == "ran 2"
    assert wrapped(prompts="a\nb\nc", **{**SETTINGS, "max_new_tokens": 2048}) == "ran 3"
    small, big = zero.durations
    assert small == d.batch({"prompts": "a\nb", **SETTINGS}) and big > small

    def broken(a):
        raise ValueError("bad input")
    gpu(broken)(run_batch)("a", **SETTINGS)
    assert zero.durations[-1] == zerogpu.max_seconds()
    assert gpu(45)(run_batch).duration == 45  # a fixed duration still passes as is
    assert space_runtime()


def test_an_ordinary_space_and_no_spaces(spaces_installed, monkeypatch):
    """Without SPACES_ZERO_GPU the package is still used as it was (it returns the function
    unchanged on such hardware); without the package gpu() returns the function itself."""
    from c2c_core.frontends.ui.durations import gpu, space_runtime
    assert not space_runtime()

    def f(prompts, **settings):
        return 1
    monkeypatch.setitem(sys.modules, "spaces", None)
    assert gpu(lambda a: 10)(f) is f


# --- only the shapes the call needs --------------------------------------------------------------

def test_a_load_job_prepares_only_its_modes_slot_groups(tiny_cfg_kwargs):
    """The Load tab's scheduler gets the job's modes: a c2c/receiver sweep makes no sharer slot
    group (a t2t or sharer one does), and its served records say what the groups prepared."""
    from c2c_core.bench.serving import Scheduler
    from c2c_core.models.loading import load_pipeline
    from c2c_core.spec.config import build_run_config
    cfg = build_run_config(**{**tiny_cfg_kwargs, "max_new_tokens": 4}, engine="fast")
    pipe = load_pipeline(cfg)
    eng = fast.engine_for(pipe, compile=False)
    s = Scheduler(pipe, cfg, slots=2, max_queue=4, max_prompt_tokens=32,
                  modes=["c2c", "receiver"])
    try:
        assert set(s.groups) == {"receiver"} and s.modes == ["c2c", "receiver"]
        assert s._prepared[0] == len(s.groups["receiver"].sizes) == 2  # steps of 1 and 2 slots
        with pytest.raises(UserError, match="serves c2c, receiver"):
            s.submit("t2t", "hi")
    finally:
        s.close()
    s = Scheduler(pipe, cfg, slots=2, max_queue=4, max_prompt_tokens=32, modes=["t2t"])
    try:
        assert set(s.groups) == {"receiver", "sharer"}
        # the receiver's columns grow by the t2t answer's room: both groups are new
        assert s._prepared[0] == 4
    finally:
        s.close()
    s = Scheduler(pipe, cfg, slots=2, max_queue=4, max_prompt_tokens=32, modes=["t2t"])
    try:
        assert s._prepared[0] == 0  # the same job again: its groups were kept, nothing to pay
    finally:
        s.close()
    every = Scheduler(pipe, cfg, slots=2, max_queue=4, max_prompt_tokens=32)  # `serve`
    try:
        assert set(every.groups) == {"receiver", "sharer"} and len(every.modes) == 4
    finally:
        every.close()
    assert eng.prepared >= 4


def test_the_app_wraps_every_model_job_with_its_duration(zero):
    """Built on (fake) ZeroGPU, each model endpoint is a spaces.GPU function whose duration is
    computed from the call: e.g. the batch endpoint's grows with its prompt list."""
    from c2c_core.frontends.ui import build_app
    from c2c_core.frontends.ui import durations as d
    demo = build_app()
    fns = {bf.api_name: bf.fn for bf in demo.fns.values()
           if getattr(bf, "api_name", None) in ("load_models", "profile", "batch", "dataset",
                                                 "sweep", "load")}
    assert set(fns) == {"load_models", "profile", "batch", "dataset", "sweep", "load"}
    assert all(callable(f.duration) for f in fns.values())
    batch = fns["batch"].duration
    assert batch("a\nb", None, None, **SETTINGS) == d.batch({"prompts": "a\nb", **SETTINGS})
    assert batch("a\n" * 40, None, None, **SETTINGS) > batch("a", None, None, **SETTINGS)
    assert fns["sweep"].duration("16,64", "32", "1", **SETTINGS) == d.sweep(
        {"input_lens": "16,64", "output_lens": "32", "batch_sizes": "1", **SETTINGS})


def test_the_app_refuses_a_compile_step_before_the_job_queues(zero, monkeypatch):
    """The endpoints' validators (run_config) say the sentence, so no GPU time is asked for."""
    from c2c_core.frontends.ui.runcfg import run_config
    settings = {"preset": "smollm2-demo", "device": "cpu", "dtype": "float32", **SETTINGS}
    assert run_config(settings).engine == "auto"
    monkeypatch.setenv("C2C_FAST_STEP", "compile")
    with pytest.raises(UserError, match="C2C_FAST_STEP=compile cannot run on ZeroGPU"):
        run_config(settings)
    assert run_config({**settings, "engine": "eager"}).engine == "eager"


def test_the_done_line_says_what_the_job_paid():
    from c2c_core.frontends.ui.jobs import prepare_note
    paid = prepare_note({"engine": "fast", "prepared_shapes": 6, "compile_s": 4.2,
                         "fresh_process": True})
    assert paid.startswith("Preparation in a fresh process: 6 shape(s) in 4.2 s")
    assert "none" in prepare_note({"engine": "fast", "prepared_shapes": 0, "compile_s": 0.0,
                                   "fresh_process": False})
    assert prepare_note({"engine": "eager", "prepared_shapes": 0}) == ""
    assert prepare_note({"engine": "fast"}) == "" == prepare_note(None)  # an older record
