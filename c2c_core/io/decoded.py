"""Decoded-size budgets for what is read from a file a stranger gave, and one shared pool of them.

A file's size says little about the memory its contents take once decoded: a 5 KB Parquet file
can hold a million references to one string, and a 43 MB JSONL file 22 M decode steps (each a
Python float of 32 bytes once parsed). So readers count what they decode as they go, before
they build it, against a `DecodedBudget`; past it the file is refused in one sentence naming
the file and the limit. `MemoryPool` is a byte-count semaphore: analyses that run at once each
reserve the bytes they may decode, so together they stay within one budget (a count of
concurrent analyses alone let four large ones exhaust a server).
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from typing import Iterator

from ..spec.errors import UserError

MB = 2**20


def mb_text(n: int) -> str:
    return f"{n / MB:,.1f} MB"


def env_mb(name: str, default_mb: int) -> int:
    """Bytes from the environment variable `name`, in whole MB (at least 1); its default
    when unset or not a number."""
    try:
        v = int(os.environ.get(name, "").strip() or default_mb)
    except ValueError:
        v = default_mb
    return max(v, 1) * MB


#: Results files one analysis reads (the Results tab, `report`, `compare`): decoded MB at most.
RESULTS_SETTING = "C2C_MAX_RESULTS_MB"
#: The app's default: one analysis of files up to the upload cap (decode steps as 8-byte floats)
#: stays within about 300 MB of server memory.
RESULTS_MB_APP = 128
#: The CLI's default: a user's own files on their own machine; still refuses a bomb.
RESULTS_MB_CLI = 4096


class DecodedBudget:
    """Bytes decoded so far from one or more files, against `limit` (None: no limit). `name`
    is the file being read now (set it with `reading`), named in the refusal."""

    def __init__(self, limit: int | None, setting: str = "", name: str = "the file"):
        self.limit, self.setting, self.name, self.used = limit, setting, name, 0

    def reading(self, name: str) -> "DecodedBudget":
        self.name = name
        return self

    def add(self, nbytes: int) -> None:
        self.used += int(nbytes)
        if self.limit is not None and self.used > self.limit:
            raise self.refusal()

    def refusal(self) -> UserError:
        how = f" ({self.setting})" if self.setting else ""
        return UserError(f"{self.name} holds more than {mb_text(self.limit)} of data once decoded,"
                         f" the most read here for one analysis{how}: keep fewer records or"
                         " shorter decode-step arrays in a smaller file.")


class MemoryPool:
    """A byte-count semaphore: `reserve(n)` waits until n bytes of the pool are free and holds
    them until its block ends (a request over the whole pool waits for all of it)."""

    def __init__(self, total: int):
        self.total = int(total)
        self.free = self.total
        self._cond = threading.Condition()

    @contextmanager
    def reserve(self, nbytes: int, timeout: float = 300.0,
                busy: str = "The server is busy with other large analyses; try again in a"
                            " minute.") -> Iterator[int]:
        n = max(0, min(int(nbytes), self.total))
        with self._cond:
            if not self._cond.wait_for(lambda: self.free >= n, timeout=timeout):
                raise UserError(busy)
            self.free -= n
        try:
            yield n
        finally:
            with self._cond:
                self.free += n
                self._cond.notify_all()


__all__ = ["DecodedBudget", "MemoryPool", "env_mb", "mb_text", "MB", "RESULTS_SETTING",
           "RESULTS_MB_APP", "RESULTS_MB_CLI"]
