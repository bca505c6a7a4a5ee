"""What the server's scheduler (bench/serving.py) hands its callers: a request's `Served` (its
tokens and clock), the `Ticket` to cancel or wait for it, and `QueueFull` (HTTP 429)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..spec.errors import UserError

#: The record kind of one served request (the JSONL family's `kind` field).
SERVED_KIND = "served"


class QueueFull(UserError):
    """The queue already holds max_queue requests (HTTP 429)."""


@dataclass
class Served:
    """One request's outcome and clock (module doc for what each time means)."""
    rid: str
    mode: str
    prompt_tokens: int
    tokens: list = field(default_factory=list)
    finish_reason: str = "length"          # "stop" | "length" | "abort" | "error"
    arrival_ns: int = 0
    admitted_ns: int = 0
    first_ns: int = 0
    end_ns: int = 0
    token_ns: list = field(default_factory=list)
    stages: dict = field(default_factory=dict)
    error: str | None = None
    record: dict | None = None
    note_tokens: int = 0
    batch: int = 1                          # arrivals that shared its prefill

    @property
    def queue_ms(self) -> float:
        return (self.admitted_ns - self.arrival_ns) / 1e6 if self.admitted_ns else None

    @property
    def ttft_ms(self) -> float | None:
        return (self.first_ns - self.arrival_ns) / 1e6 if self.first_ns else None

    @property
    def e2e_ms(self) -> float:
        return (self.end_ns - self.arrival_ns) / 1e6 if self.end_ns else None

    @property
    def itl_ms(self) -> list[float]:
        t = self.token_ns
        return [(b - a) / 1e6 for a, b in zip(t, t[1:])]

    @property
    def tpot_ms(self) -> float | None:
        if len(self.token_ns) < 2:
            return None
        return (self.token_ns[-1] - self.token_ns[0]) / 1e6 / (len(self.token_ns) - 1)


class Ticket:
    """A submitted request: cancel() it (a client gone), or wait() for its Served."""

    def __init__(self, req):  # the scheduler's own request (serving._Request)
        self._req = req
        self.rid = req.served.rid

    def cancel(self) -> None:
        self._req.cancelled = True
        self._req.sched._wake()

    def wait(self, timeout: float | None = None) -> Served:
        if not self._req.done.wait(timeout):
            raise TimeoutError(f"request {self.rid} did not finish within {timeout} s")
        return self._req.served
