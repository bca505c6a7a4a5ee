"""The fast engine's shape rules, torch-free, for the engine and for the memory estimate
(budget.py) alike: static cache lengths (powers of two >= BUCKET_MIN covering prompt + new
tokens), the prompt buckets a batch is left-padded to when its prefills are prepared
callables, and the c2c sharer's prompt-only cache length."""

from __future__ import annotations

BUCKET_MIN = 64
#: The sharer's prefill-only cache (c2c mode) is sized to its prompt rounded up to this many
#: positions: it never decodes.
SHARER_ROUND = 64


def bucket(n: int) -> int:
    """The static cache length for n positions: a power of two >= BUCKET_MIN."""
    L = BUCKET_MIN
    while L < n:
        L *= 2
    return L


def _prompt_step(n: int) -> int:
    return 16 if n <= 128 else 64 if n <= 1024 else 256


def prompt_bucket(n: int) -> int:
    """The prompt length a batch is left-padded to when its prefills are prepared (compiled or
    graph-captured), so that a run prepares a few prefill shapes, not one per prompt length: a
    multiple of 16 up to 128, of 64 up to 1,024, then of 256."""
    step = _prompt_step(n)
    return max(-(-n // step), 1) * step


def sharer_len(n: int) -> int:
    """The c2c sharer cache length for a prompt section of n positions (a multiple of
    SHARER_ROUND): the prompt only, never prompt + max_new_tokens."""
    return max(-(-n // SHARER_ROUND), 1) * SHARER_ROUND


def cache_len_at_most(tokens: int) -> int:
    """The longest static cache the fast engine may allocate for a sequence of `tokens` positions
    (prompt + new tokens, split unknown): its prompt padded to a bucket (at most one bucket step
    more), then the power-of-two length bucket."""
    return bucket(tokens + _prompt_step(tokens) - 1)
