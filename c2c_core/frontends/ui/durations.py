"""The GPU seconds each app job asks ZeroGPU for, from the job's own arguments (issue 25 item 9),
and the decorator that asks for them (`gpu`).

`spaces.GPU(duration=f)` calls `f` with the arguments of the call it wraps, before the GPU is
scheduled, in the web server's process: so these functions read only those arguments (prompt
text, dataset row count, sweep lists, load settings and the run settings) and load nothing;
on arguments the job's own checks will refuse they may raise, and gpu() then asks for the
longest duration (the job itself says what is wrong). The arithmetic and its
constants (estimates, with where they come from) are measure/zerogpu.py's `estimate_seconds`;
here is only what a job is made of:

- tokens: the sum over the job's generations (a fast-engine batch counts once: its rows share
  every step) of prompt + new tokens (+ the t2t note's tokens in t2t mode), warm-up generations
  included; a prompt's tokens are estimated from its characters (CHARS_PER_TOKEN).
- shapes: the distinct (batch size, cache bucket) pairs per mode x the shapes one such pair
  prepares in that mode (SHAPES_PER_MODE), on the fast engine; none on the eager one.
- wait: seconds a load test spends by design waiting for its Poisson arrivals.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from ...engines.shapes import bucket
from ...io.prompts import BUILTIN_PROMPTS
from ...measure.zerogpu import estimate_seconds, max_seconds
from ...spec.config import ALL_MODES, MODES, GenerationConfig

#: Characters per token of a prompt, low on purpose (English text runs about 4; a low figure
#: counts more tokens, so a longer duration).
CHARS_PER_TOKEN = 3
#: Tokens the chat template and the c2c instruction add around a prompt (an estimate).
TEMPLATE_TOKENS = 32
#: A dataset row's prompt tokens when the rows are not read yet (the duration is asked before
#: the dataset loads): an estimate for short benchmark questions.
DATASET_PROMPT_TOKENS = 256
#: Shapes one (batch, bucket) pair prepares per mode (engines/fast/batch.py shapes_of): c2c: the
#: receiver's step and prefill, the sharer's prefill and the projection; receiver and sharer:
#: a step and a prefill; t2t: both models' step and prefill.
SHAPES_PER_MODE = {"c2c": 4, "receiver": 2, "sharer": 2, "t2t": 4}
#: Generations a profile job runs per mode beside its warm-up: the measured run and the
#: profiled one (bench/profiling.py), counted with one more for room.
PROFILE_RUNS = 3


def _num(v: Any, default: float) -> float:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return default
    return x if math.isfinite(x) else default


def _modes(settings: dict) -> list[str]:
    mode = settings.get("mode") or "c2c"
    return list(MODES) if mode == ALL_MODES else [str(mode)]


def _note(mode: str) -> int:
    return GenerationConfig().t2t_note_tokens if mode == "t2t" else 0


def _prompt_tokens(text: str) -> int:
    return TEMPLATE_TOKENS + math.ceil(len(text or "") / CHARS_PER_TOKEN)


def _lengths(text: Any) -> list[int]:
    from ...bench.sweep import parse_lengths
    return parse_lengths(str(text or ""), "lengths")


def run_seconds(prompt_tokens: list[int], settings: dict, extra_runs: int = 0) -> int:
    """A batch of prompts (their estimated tokens, in run order) under the run settings: every
    prompt x repeat x mode, in the fast engine's batches of batch_size, plus warm-up runs of
    the first batch per mode (and `extra_runs` more per mode: a profile's)."""
    new = int(_num(settings.get("max_new_tokens"), GenerationConfig().max_new_tokens))
    repeats = max(int(_num(settings.get("repeats"), 1)), 1)
    warmup = max(int(_num(settings.get("warmup"), 1)), 0)
    is_fast = (settings.get("engine") or "auto") != "eager"
    B = max(int(_num(settings.get("batch_size"), 1)), 1) if is_fast else 1
    chunks = [prompt_tokens[k:k + B] for k in range(0, len(prompt_tokens), B)] or [[0]]
    tokens, shapes = 0.0, 0
    for mode in _modes(settings):
        per = [max(c) + new + _note(mode) for c in chunks]       # a batch's longest row
        tokens += sum(per) * repeats + per[0] * (warmup + extra_runs)
        if is_fast:
            pairs = {(len(c), bucket(p)) for c, p in zip(chunks, per)}
            shapes += len(pairs) * SHAPES_PER_MODE.get(mode, 4)
    return estimate_seconds(tokens, shapes)


# --- one per endpoint: the wrapped function's arguments, by name -------------------------------

def load_models(a: dict) -> int:
    """Loading a pair may download it: a time no argument tells; the longest duration."""
    return max_seconds()


def profile(a: dict) -> int:
    return run_seconds([_prompt_tokens(a.get("prompt") or "")], a, extra_runs=PROFILE_RUNS)


def batch(a: dict) -> int:
    lines = [p.strip() for p in str(a.get("prompts") or "").splitlines() if p.strip()]
    return run_seconds([_prompt_tokens(p) for p in lines], a)


def dataset(a: dict) -> int:
    n = a.get("num_samples")
    if n in (None, "") or _num(n, 0) < 1:  # every row: as many as a job may run
        return max_seconds()
    return run_seconds([DATASET_PROMPT_TOKENS] * int(_num(n, 1)), a)


def sweep(a: dict) -> int:
    """Each point (prompt length x output length x batch size) is its own run per mode: its
    warm-up and repeats, each one batch of b rows of exactly n prompt tokens (counted once: the
    rows share every step), and its shapes."""
    ins, outs = _lengths(a.get("input_lens")), _lengths(a.get("output_lens"))
    bss = _lengths(a.get("batch_sizes") or "1")
    repeats = max(int(_num(a.get("repeats"), 1)), 1)
    warmup = max(int(_num(a.get("warmup"), 1)), 0)
    is_fast = (a.get("engine") or "auto") != "eager"
    tokens, shapes = 0.0, 0
    for mode in _modes(a):
        pairs = set()
        for m in outs:
            for b in bss:
                for n in ins:
                    tokens += (n + m + _note(mode)) * (repeats + warmup)
                    pairs.add((b, bucket(n + m + _note(mode))))
        shapes += len(pairs) * SHAPES_PER_MODE.get(mode, 4) if is_fast else 0
    return estimate_seconds(tokens, shapes)


def load(a: dict) -> int:
    """A load test: every mode x rate point sends `requests` Poisson arrivals at `rate` req/s
    (about requests / rate seconds of arrivals), each of a built-in prompt and up to max_tokens
    new tokens; the slot groups prepare a step per batch size (powers of two up to the slots)."""
    modes = list(a.get("modes") or [])
    from ..load import _parse_list
    rates = _parse_list(str(a.get("rates") or ""), "rates", float)
    n = max(int(_num(a.get("requests"), 1)), 1)
    t = max(int(_num(a.get("max_tokens"), 1)), 1)
    slots = max(int(_num(a.get("slots"), 1)), 1)
    prompt = max(_prompt_tokens(p) for p in BUILTIN_PROMPTS)
    wait = len(modes) * sum(n / r for r in rates if r > 0)
    tokens = len(modes) * len(rates) * n * (prompt + t + max(_note(m) for m in modes or ["c2c"]))
    sizes = slots.bit_length() + 1
    shapes = sizes * 2 + len(modes) * 2  # both decoding models' slot steps, prefills per mode
    return estimate_seconds(tokens, shapes, wait_s=wait)


# --- the decorator ------------------------------------------------------------------------

def gpu(duration: int | Callable[[dict], int] = 120) -> Callable:
    """`spaces.GPU(duration=...)` where the `spaces` package is installed (on a CPU or ordinary
    GPU Space the package itself returns the function unchanged); a no-op elsewhere.

    `duration`: seconds, or a function of the wrapped call's arguments by name (the run
    settings passed as **settings merged in; this module has one per endpoint) that spaces
    calls before each call to ask ZeroGPU for that many seconds. It never fails the call: a
    function that raises (arguments the job's own checks will refuse) asks for the longest
    duration, zerogpu.max_seconds()."""
    import inspect

    from ...measure import zerogpu

    def wrap(fn: Callable) -> Callable:
        if not zerogpu.spaces_installed():
            return fn
        import spaces  # type: ignore
        if not callable(duration):
            return spaces.GPU(duration=duration)(fn)
        sig = inspect.signature(fn)

        def seconds(*args, **kwargs) -> int:
            try:
                bound = sig.bind_partial(*args, **kwargs).arguments
                named = {k: v for k, v in bound.items()
                         if sig.parameters[k].kind is not inspect.Parameter.VAR_KEYWORD}
                for k, p in sig.parameters.items():
                    if p.kind is inspect.Parameter.VAR_KEYWORD:
                        named.update(bound.get(k) or {})
                return int(duration(named))
            except Exception:  # noqa: BLE001 - the job's own checks say what is wrong
                return zerogpu.max_seconds()

        return spaces.GPU(duration=seconds)(fn)

    return wrap


def space_runtime() -> bool:
    """True on ZeroGPU hardware (the `spaces` package installed and SPACES_ZERO_GPU set, as
    Hugging Face sets it there); a CPU or ordinary GPU Space has the package too: False."""
    from ...measure.zerogpu import on_zerogpu
    return on_zerogpu()
