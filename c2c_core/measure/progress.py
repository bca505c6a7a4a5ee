"""How long a run has left, and how a person reads elapsed time: the ETA of a run whose records
come in shapes (a sweep's token lengths and batch sizes) and modes of different speeds, shared
by the app's progress line and the CLI's sweep.

The estimate never counts records as equal: each mode's records are timed per shape; a shape not
timed yet is estimated from a timed one, scaled up by its size (tokens per row) when it is
larger, and taken at the larger shape's own time when it is smaller, so that while cost grows
with size no faster than linearly the estimate does not fall below the work left. A shape not
started yet also adds its first generation (its warm-up and the fast engine's compile), which
is left out of the per-record times.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass
from typing import Any, Callable, Hashable


def fmt_seconds(s: float) -> str:
    """'4.2 s', '42 s', '3 min 05 s'."""
    if s < 10:
        return f"{max(s, 0):.1f} s"
    s = int(round(s))
    return f"{s // 60} min {s % 60:02d} s" if s >= 60 else f"{s} s"


@dataclass(frozen=True)
class Shape:
    """One shape of a run, in run order: `key` (what `shape_key` gives for its records), its
    size per row (`weight`, e.g. prompt + output tokens), its records per mode, and the rows of
    one generation (`batch`: the first generation's rows are its first mode's)."""
    key: Hashable
    weight: float
    per_mode: float
    label: str = ""
    batch: int = 1


class Eta:
    """Seconds left of a run (see the module's docstring). Feed it `start(total)` when the
    run's records start, then `record(mode, shape, batch)` as each arrives; `left()` is None
    until every mode still to run has a timed record (no guessed rate), and after the last
    record. `clock` is injectable (tests use a fake one)."""

    def __init__(self, modes: list[str], plan: list[Shape] | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        self.modes = list(modes)
        self.plan = list(plan) if plan else None
        self.clock = clock
        self.total = 0
        self.count = 0
        self.last_at: float | None = None
        self.last_mode: str | None = None
        self.last_shape: Hashable = None
        self.done: collections.Counter = collections.Counter()   # (mode, shape) -> records
        self.secs: collections.Counter = collections.Counter()   # (mode, shape) -> timed seconds
        self.timed: collections.Counter = collections.Counter()  # (mode, shape) -> timed records
        self.first: dict = {}                                    # shape -> first generation's s
        self.seen: collections.Counter = collections.Counter()   # shape -> records
        self.batch: dict = {}                                    # shape -> its batch size

    # --- feeding -----------------------------------------------------------------------------

    def start(self, total: int, now: float | None = None) -> None:
        self.total = total
        self.last_at = self.clock() if now is None else now
        if self.plan is None and self.modes:
            self.plan = [Shape(None, 1.0, total / len(self.modes))]

    def record(self, mode: str | None, shape: Hashable = None, batch: int = 1,
               now: float | None = None) -> None:
        """A record of `mode` and `shape` arrived (the rows of one batch arrive together: the
        generation's time goes to its first row, the others take what little passed since)."""
        now = self.clock() if now is None else now
        if self.last_at is None:
            self.last_at = now
        took = now - self.last_at
        if shape not in self.batch:
            self.batch[shape] = batch if isinstance(batch, int) and batch > 0 else 1
        if self.seen[shape] < self.batch[shape]:  # the shape's first generation: its warm-up,
            self.first[shape] = self.first.get(shape, 0.0) + took  # the compile, not a rate
        else:
            self.secs[(mode, shape)] += took
            self.timed[(mode, shape)] += 1
        self.seen[shape] += 1
        self.done[(mode, shape)] += 1
        self.count += 1
        self.last_at, self.last_mode, self.last_shape = now, mode, shape

    # --- estimating --------------------------------------------------------------------------

    def _weight(self, key: Hashable) -> float:
        for s in self.plan or ():
            if s.key == key:
                return s.weight
        return 1.0

    def _scaled(self, known: dict[Hashable, float], key: Hashable) -> float | None:
        """`known` (shape -> seconds) carried over to shape `key`: its own when known; else the
        largest smaller-or-equal shape's, scaled up by size; else the smallest larger one's."""
        if key in known:
            return known[key]
        if not known:
            return None
        w = self._weight(key)
        below = [k for k in known if self._weight(k) <= w]
        if below:
            k = max(below, key=self._weight)
            return known[k] * w / max(self._weight(k), 1e-9)
        return known[min(known, key=self._weight)]

    def per_record(self, mode: str | None, key: Hashable) -> float | None:
        """Expected seconds of one record of `mode` at shape `key`."""
        known = {s: self.secs[(m, s)] / self.timed[(m, s)] for (m, s) in self.timed
                 if m == mode and self.timed[(m, s)]}
        return self._scaled(known, key)

    def first_generation(self, key: Hashable) -> float:
        return self._scaled(self.first, key) or 0.0

    def left_of(self, mode: str | None, key: Hashable, per_mode: float) -> float:
        return max(per_mode - self.done[(mode, key)], 0.0)

    def next_record(self) -> tuple[str | None, Shape] | None:
        """The (mode, shape) most likely to come next: the current shape's next mode in turn,
        or the first mode of the next shape with records left."""
        shapes = self.plan or []
        cur = next((s for s in shapes if s.key == self.last_shape), None)
        order = ([cur] if cur is not None else []) + [s for s in shapes if s is not cur]
        for s in order:
            modes = [m for m in self.modes if self.left_of(m, s.key, s.per_mode) > 0]
            if not modes:
                continue
            if s is cur and self.last_mode in self.modes:
                i = self.modes.index(self.last_mode)
                turn = [self.modes[(i + k) % len(self.modes)] for k in range(1, len(self.modes) + 1)]
                return next(m for m in turn if m in modes), s
            return modes[0], s
        return None

    def left(self, now: float | None = None) -> float | None:
        """Seconds left; None before every mode still to run has a timed record, and when done.
        Between records it counts down by the time the record in flight has run, at most that
        record's expected time (it never falls to 0 while work is left, nor jumps back)."""
        if not self.plan or not self.modes or not self.total or self.count >= self.total:
            return None
        now = self.clock() if now is None else now
        todo = 0.0
        for s in self.plan:
            fresh = not self.seen[s.key] and any(self.left_of(m, s.key, s.per_mode)
                                                 for m in self.modes)
            if fresh:  # its first generation (warm-up, compile and its first mode's rows)
                todo += self.first_generation(s.key)
            for i, m in enumerate(self.modes):
                n = self.left_of(m, s.key, s.per_mode) - (s.batch if fresh and i == 0 else 0)
                if n <= 0:
                    continue
                rate = self.per_record(m, s.key)
                if rate is None:
                    return None
                todo += rate * n
        nxt = self.next_record()
        if nxt is None or self.last_at is None:
            return max(todo, 0.0)
        mode, s = nxt
        expect = (self.per_record(mode, s.key) or 0.0) + (
            0.0 if self.seen[s.key] else self.first_generation(s.key))
        return max(todo - min(max(now - self.last_at, 0.0), expect), 0.0)

    def shape_at(self) -> tuple[int, Shape] | None:
        """(1-based index, shape) of the shape running now (the next one with records left)."""
        nxt = self.next_record()
        if nxt is None or not self.plan or len(self.plan) < 2:
            return None
        return self.plan.index(nxt[1]) + 1, nxt[1]


def shape_key(rec: Any) -> Hashable:
    """A record's shape for `Eta`: its sweep shape (prompt tokens, output tokens, batch), from
    its id; None for records of no sweep (one shape of unknown size)."""
    from ..io.records import parse_sweep_id
    if not isinstance(rec, dict):
        return None
    shp = parse_sweep_id(rec.get("id"))
    return None if shp is None else (shp.input_len, shp.output_len, shp.batch)
