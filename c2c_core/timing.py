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

from .records import STAGES  # noqa: F401 - re-exported: stage name -> record field

TIMING_METHODS = ("event", "sync")


def now_ns() -> int:
    return time.perf_counter_ns()


class _Span:
    __slots__ = ("timer", "stage", "start", "end", "rf")

    def __init__(self, timer: "Timer", stage: str):
        self.timer, self.stage, self.start, self.end, self.rf = timer, stage, None, None, None

    def __enter__(self) -> "_Span":
        t = self.timer
        if t.annotate:
            self.rf = torch.profiler.record_function(f"c2c/{self.stage}")
            self.rf.__enter__()
        self.start = t._mark()
        return self

    def __exit__(self, *exc) -> None:
        t = self.timer
        self.end = t._mark()
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

    def span(self, stage: str) -> _Span:
        return _Span(self, stage)

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
        out: dict[str, list[float]] = {s: [] for s in STAGES}
        for sp in self.spans:
            if isinstance(sp.start, int):
                ms = (sp.end - sp.start) / 1e6
            else:
                ms = sp.start.elapsed_time(sp.end)
            out[sp.stage].append(ms)
        return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
