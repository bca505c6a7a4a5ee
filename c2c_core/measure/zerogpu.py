"""Hugging Face ZeroGPU: whether we run on it, and how many GPU seconds a job asks for.

On a ZeroGPU Space every `@spaces.GPU` call runs in a worker process forked for it (the
`spaces` package reuses an idle worker when it can, so "fresh" is read, not assumed: the
records' `run.fresh_process`), CUDA exists only inside that call, and torch.compile is not
supported. The fast engine therefore uses its captured decode step there (no inductor), and the
app asks `spaces.GPU` for a duration computed from the job's size (`estimate_seconds`) instead of
a fixed one: ZeroGPU schedules a call only if the visitor's quota covers the duration asked
for, gives shorter requests priority in its queue, and refuses durations above its maximum.

What the `spaces` package (0.51.3) does, read from its source:
- `spaces.GPU(duration=...)`: `duration` is seconds (int or timedelta) or a callable that gets
  the decorated function's own arguments and returns one (called once per call, before the GPU
  is scheduled); the default is 60 s. The package caps nothing itself: the ZeroGPU server refuses
  a duration above its maximum ("ZeroGPU illegal duration"), which is not documented; Hugging
  Face staff gave it as 5 minutes for one call (zero-gpu-explorers discussion 7), hence MAX_S.
- It is active only with `SPACES_ZERO_GPU` set to 1, t or true (case-insensitive): a CPU or an
  ordinary GPU Space has the package installed too, and there `spaces.GPU` returns the function
  unchanged; `on_zerogpu()` follows the same rule.
- `import spaces` on ZeroGPU raises if CUDA was initialised before it ("CUDA has been initialized
  before importing the `spaces` package"): import it (`import_spaces()`) before anything touches
  CUDA; importing torch alone is fine. `on_zerogpu()` never imports it.

Layer: measure (imports nothing of c2c_core), so the engines and the front ends can both ask.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys

#: The environment variable Hugging Face sets on ZeroGPU hardware.
ZERO_ENV = "SPACES_ZERO_GPU"
#: Raise (or lower) the longest duration asked for, in seconds (default MAX_S).
MAX_ENV = "C2C_ZEROGPU_MAX_S"

# --- the duration model: estimates, not measurements ----------------------------------------
#: Seconds per token of one generation (prompt and new tokens alike): the reference C2C
#: implementation decodes at 28.8-30.6 ms/token on an H200 (docs C2C_REFERENCE.md, "Measured
#: reference"); ZeroGPU gives a slice of an H200, where batch-1 decode stays bound by kernel
#: launches, and the fast engine's captured step is faster than the reference, so this
#: over-estimates a decode step. A prompt token costs far less than a decode step; counting it
#: at the same rate is on purpose (a job asking too little is aborted, one asking too much only
#: waits a little longer in the queue).
S_PER_TOKEN = 0.030
#: Seconds to prepare one shape (allocate its static cache, run and capture its CUDA graph: a
#: handful of forwards, no compile). A guess, not measured here (no GPU): the records'
#: `run.compile_s` and `run.prepared_shapes` report what a call really paid.
PREPARE_S_PER_SHAPE = 5.0
#: Seconds every call pays before its first token: the worker process starts and the weights
#: are moved to the GPU (about 10 GB for the default Qwen3-0.6B + Qwen3-4B-Base pair in bf16).
#: A guess with room, for the same reason.
BASE_S = 30.0
#: The estimate is multiplied by this before it is clamped.
MARGIN = 1.25
#: The shortest duration asked for (ZeroGPU's own default is 60 s; less gets a better place in
#: the queue).
MIN_S = 30
#: The longest: 5 minutes (see the module's docstring); MAX_ENV overrides it.
MAX_S = 300


def _truthy(v: str | None) -> bool:
    return (v or "").strip().lower() in ("1", "t", "true")


def spaces_installed() -> bool:
    """The `spaces` package can be imported (without importing it)."""
    if "spaces" in sys.modules:
        return sys.modules["spaces"] is not None
    try:
        return importlib.util.find_spec("spaces") is not None
    except (ImportError, ValueError):
        return False


def on_zerogpu() -> bool:
    """True on ZeroGPU hardware: `spaces` installed and SPACES_ZERO_GPU set to 1/t/true (the
    package's own rule). A CPU or ordinary GPU Space has `spaces` too: False there."""
    return _truthy(os.environ.get(ZERO_ENV)) and spaces_installed()


def import_spaces():
    """`import spaces` on ZeroGPU (call it before CUDA is initialised), else None."""
    if not on_zerogpu():
        return None
    import spaces  # type: ignore
    return spaces


def max_seconds() -> int:
    """The longest duration asked for: C2C_ZEROGPU_MAX_S, else MAX_S."""
    v = os.environ.get(MAX_ENV, "").strip()
    try:
        return max(int(float(v)), MIN_S) if v else MAX_S
    except ValueError:
        return MAX_S


def estimate_seconds(tokens: float = 0, shapes: int = 0, wait_s: float = 0.0) -> int:
    """GPU seconds to ask for a job: (BASE_S (worker start, weights to the GPU) + `shapes` x
    PREPARE_S_PER_SHAPE + `tokens` x S_PER_TOKEN + `wait_s`) x MARGIN, rounded up and clamped to
    [MIN_S, max_seconds()]. `tokens`: the sum over the job's generations of their prompt + new
    tokens (a batch's rows share their steps: its longest row counts once); `shapes`: the shapes
    the fast engine prepares for it; `wait_s`: time the job waits by design (a load test's
    arrivals). Pure: no torch, no `spaces`."""
    work = (BASE_S + max(shapes, 0) * PREPARE_S_PER_SHAPE + max(tokens, 0) * S_PER_TOKEN
            + max(wait_s, 0.0))
    return int(min(max(math.ceil(work * MARGIN), MIN_S), max_seconds()))
