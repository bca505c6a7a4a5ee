"""Cooperative cancellation of a running generation.

A job (the app's worker thread, a CLI run) installs a scope with a predicate such as
`stop_event.is_set`; the generation code calls `check()` before every decode step, before each
prefill and between projections, so a Stop or a client's disconnect ends the work within one
step. `check()` raises `Cancelled`, which unwinds the generation without writing a record (the
records already written stay). With no scope installed, `check()` costs one attribute lookup.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Callable, Iterator


class Cancelled(Exception):
    """The running job was asked to stop (Stop button, client gone, SIGTERM)."""


_local = threading.local()


@contextmanager
def scope(should_stop: Callable[[], bool] | None) -> Iterator[None]:
    """Within this block (in this thread), `check()` raises Cancelled once should_stop() or
    an enclosing scope's predicate is true (scopes nest: an inner run_many without a stop of
    its own keeps the job's)."""
    prev = getattr(_local, "fn", None)
    if should_stop is not None and prev is not None:
        _local.fn = lambda: prev() or should_stop()
    elif should_stop is not None:
        _local.fn = should_stop
    try:
        yield
    finally:
        _local.fn = prev


@contextmanager
def reporting(say_fn: Callable[[str], None] | None) -> Iterator[None]:
    """Within this block (in this thread), `say(phase)` hands the job's phase ("compiling
    shape 2 of 4", "timed run", ...) to `say_fn`: the app shows it while the job works."""
    prev = getattr(_local, "say", None)
    _local.say = say_fn
    try:
        yield
    finally:
        _local.say = prev


@contextmanager
def within(prefix: str) -> Iterator[None]:
    """Within this block, each phase said is said as "<prefix>: <phase>" (a sweep's shape
    before its warm-up and compile); nothing changes without a reporter."""
    prev = getattr(_local, "say", None)
    if prev is None:
        yield
        return
    with reporting(lambda phase: prev(f"{prefix}: {phase}")):
        yield


def say(phase: str) -> None:
    """The running job's phase, for the person waiting on it (nothing without a reporter)."""
    fn = getattr(_local, "say", None)
    if fn is not None:
        fn(phase)


def requested() -> bool:
    fn = getattr(_local, "fn", None)
    return bool(fn is not None and fn())


def check() -> None:
    fn = getattr(_local, "fn", None)
    if fn is not None and fn():
        raise Cancelled()
