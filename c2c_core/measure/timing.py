"""Stage names (defined once) and the timer every timed region goes through.

Methods (MEASURE.md):
- "event": CUDA events recorded on the current stream at stage boundaries, one synchronize at
  the end of the generation; on a CPU this is `time.perf_counter_ns()` (nothing to wait for).
- "sync": the seed's style: synchronize the device around every stage and read the host clock.
- "off": no stage timing at all (only the host clock for ttft/e2e); used to measure the cost of
  measuring.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..spec.config import TIMING_METHODS  # noqa: F401 - re-exported: the --timing choices
from ..io.records import STAGES  # noqa: F401 - re-exported: stage name -> record field


def now_ns() -> int:
    return time.perf_counter_ns()


#: Stages that are host work only (no device kernels): timed with the host clock under every
#: method, so a CUDA event cannot stretch them over earlier queued GPU work.
HOST_STAGES = {"alignment"}


class _Span:
    __slots__ = ("timer", "stage", "start", "end", "rf", "who")

    def __init__(self, timer: "Timer", stage: str, who: int | None = None):
        self.timer, self.stage, self.start, self.end, self.rf = timer, stage, None, None, None
        self.who = who  # sharer number (1, 2, ...) for per-sharer totals; None otherwise

    def __enter__(self) -> "_Span":
        t = self.timer
        if t.annotate:
            self.rf = torch.profiler.record_function(f"c2c/{self.stage}")
            self.rf.__enter__()
        self.start = now_ns() if self.stage in HOST_STAGES and t.method != "off" else t._mark()
        return self

    def __exit__(self, *exc) -> None:
        t = self.timer
        self.end = now_ns() if isinstance(self.start, int) and self.stage in HOST_STAGES else t._mark()
        if self.rf is not None:
            self.rf.__exit__(*exc)
        if self.start is not None:
            t.spans.append(self)


@dataclass
class Timer:
    """Collects spans of one generation; `finish()` turns them into milliseconds."""

    device: torch.device
    method: str = "event"          # event | sync | off
    annotate: bool = False         # wrap spans in record_function("c2c/<stage>") for traces
    spans: list = field(default_factory=list)
    by_who: dict = field(default_factory=dict)  # after finish(): sharer -> stage -> [ms]

    def __post_init__(self) -> None:
        self.cuda = self.device.type == "cuda"
        # events go on the model's device stream, not the current device's (--device cuda:1)
        self.stream = torch.cuda.current_stream(self.device) if self.cuda else None
        if self.method not in TIMING_METHODS + ("off",):
            raise ValueError(f"unknown timing method {self.method}")

    @property
    def method_name(self) -> str:
        """What the record says was used."""
        if self.method in ("sync", "off"):
            return self.method
        return "cuda_event" if self.cuda else "perf_counter"

    def span(self, stage: str, who: int | None = None) -> _Span:
        return _Span(self, stage, who)

    def _mark(self):
        if self.method == "off":
            return None
        if self.method == "sync":
            if self.cuda:
                torch.cuda.synchronize(self.device)
            return now_ns()
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record(self.stream)
            return ev
        return now_ns()

    def finish(self) -> dict[str, list[float]]:
        """Wait for the device once, then return each stage's span durations in ms."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self.by_who = {}
        out: dict[str, list[float]] = {s: [] for s in STAGES}
        for sp in self.spans:
            if isinstance(sp.start, int):
                ms = (sp.end - sp.start) / 1e6
            else:
                ms = sp.start.elapsed_time(sp.end)
            out[sp.stage].append(ms)
            if sp.who is not None:
                self.by_who.setdefault(sp.who, {}).setdefault(sp.stage, []).append(ms)
        return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def on_device(device: torch.device):
    """A context that makes `device` the current CUDA device (torch.cuda.device), so that
    everything which uses the *current* device or stream (graph capture, events recorded
    without a stream, new streams, allocations by index) uses the models' device, whatever
    device the thread had (`--device cuda:1` outside torchrun); nothing on a CPU."""
    import contextlib
    if device.type != "cuda":
        return contextlib.nullcontext()
    return torch.cuda.device(device)
