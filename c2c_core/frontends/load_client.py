"""The `load` command's client side: when requests are sent (Poisson or gamma arrivals) and one
streamed completion measured at the client (TTFT, the text chunks' arrival times, E2E, usage,
the server's `c2c` object when it sends one). report.load defines every number."""

from __future__ import annotations

import asyncio
import json
import math
import time
from typing import Any

import numpy as np

from ..report import load as L
from ..spec.errors import UserError


# --- arrivals -------------------------------------------------------------------------------

def arrival_gaps(rate: float, n: int, burstiness: float = 1.0,
                 rng: np.random.Generator | None = None) -> np.ndarray:
    """`n` gaps (seconds) between arrivals at `rate` requests/s: gamma-distributed with shape
    `burstiness` and scale 1 / (rate x burstiness), so the mean gap is 1 / rate whatever the
    burstiness; 1 is a Poisson process (exponential gaps), below 1 burstier, above 1 more
    regular (vLLM's bench serve does the same). rate inf: all at once."""
    if rate <= 0 or burstiness <= 0:
        raise UserError(f"rate {rate} and burstiness {burstiness} must be positive.")
    if math.isinf(rate):
        return np.zeros(n)
    rng = rng or np.random.default_rng()
    return rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)


def send_times(rate: float, burstiness: float, rng: np.random.Generator,
               num_requests: int | None, duration: float | None) -> list[float]:
    """Send offsets (s) from the point's start: the first at 0, then the gaps; `num_requests`
    of them, or all that fall within `duration`."""
    if num_requests is not None:
        gaps = arrival_gaps(rate, max(num_requests - 1, 0), burstiness, rng)
        return [0.0] + list(np.cumsum(gaps))
    out, t = [0.0], 0.0
    while True:
        t += float(arrival_gaps(rate, 1, burstiness, rng)[0])
        if t >= duration:
            return out
        out.append(t)


# --- one request ----------------------------------------------------------------------------

def _chunk_text(obj: dict) -> str:
    text = ""
    for c in obj.get("choices") or []:
        if isinstance(c, dict):
            t = c.get("text")
            if t is None and isinstance(c.get("delta"), dict):
                t = c["delta"].get("content")
            text += t or ""
    return text


async def stream_request(client, endpoint: str, model: str, prompt: str, max_tokens: int,
                         timeout: float, t0: float) -> dict:
    """One streamed completion: the timings of module report.load, measured here. `t0`: the
    run's start (perf_counter); every time in the result is relative to it (s) or to the send
    (ms)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}}
    rec: dict[str, Any] = {"error": None, "status": None, "ttft_ms": None, "e2e_ms": None,
                           "token_times_ms": [], "output_tokens": None, "prompt_tokens": None}
    sent = time.perf_counter()
    rec["sent_s"] = round(sent - t0, 6)
    chunks = 0
    server: dict | None = None

    async def run() -> None:
        nonlocal chunks, server
        async with client.stream("POST", endpoint, json=body) as resp:
            rec["status"] = resp.status_code
            if resp.status_code != 200:
                raw = (await resp.aread()).decode("utf-8", "replace")
                msg = raw[:300]
                try:
                    err = json.loads(raw).get("error")
                    msg = err.get("message", msg) if isinstance(err, dict) else str(err or msg)
                except (ValueError, AttributeError):
                    pass
                rec["error"] = f"HTTP {resp.status_code}: {msg}"
                return
            async for line in resp.aiter_lines():
                now = time.perf_counter()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                try:
                    obj = json.loads(data)
                except ValueError:
                    rec["error"] = f"bad stream chunk: {data[:100]}"
                    return
                if not isinstance(obj, dict):
                    continue
                if obj.get("error"):
                    e = obj["error"]
                    rec["error"] = f"stream error: {e.get('message') if isinstance(e, dict) else e}"
                    return
                if _chunk_text(obj):
                    chunks += 1
                    rec["token_times_ms"].append(round((now - sent) * 1000, 3))
                usage = obj.get("usage")
                if isinstance(usage, dict):
                    rec["prompt_tokens"] = usage.get("prompt_tokens")
                    rec["output_tokens"] = usage.get("completion_tokens")
                if isinstance(obj.get("c2c"), dict):
                    server = obj["c2c"]

    try:
        await asyncio.wait_for(run(), timeout)
    except asyncio.TimeoutError:
        rec["error"] = f"timeout after {timeout:g} s"
    except asyncio.CancelledError:
        raise
    except Exception as e:  # a refused or dropped connection, a protocol error: a failed request
        rec["error"] = f"{type(e).__name__}: {str(e)[:200]}"
    end = time.perf_counter()
    rec["end_s"] = round(end - t0, 6)
    rec["e2e_ms"] = round((end - sent) * 1000, 3)
    if rec["error"] is None and not rec["token_times_ms"]:
        rec["error"] = "no text streamed"
    if rec["error"] is None:
        rec["ttft_ms"] = rec["token_times_ms"][0]
        if rec["output_tokens"] is None:
            rec["output_tokens"] = chunks
            rec["output_tokens_from"] = "chunks"
        rec["itl_ms"] = [round(x, 3) for x in L.itl_of(rec["token_times_ms"])]
        rec["tpot_ms"] = L.tpot_of(rec["ttft_ms"], rec["e2e_ms"], rec["output_tokens"])
        if rec["tpot_ms"] is not None:
            rec["tpot_ms"] = round(rec["tpot_ms"], 3)
    if server is not None:
        rec["server"] = server
        rec["queue_ms"] = server.get("queue_ms")
        rec["stages"] = server.get("stages")
    return rec
