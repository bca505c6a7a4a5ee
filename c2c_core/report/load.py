"""A load sweep's numbers (pure data, no I/O): per request records of `python -m c2c_core load`
(`kind: "load_request"`) -> per point statistics, goodput under SLOs, and the overload rule.

The definitions follow vLLM's `bench serve` (and agree with GuideLLM's), measured at the client:

- **sent** (`sent_s`): when the client opened the request, in seconds since the run started.
- **TTFT** (`ttft_ms`): from sent to the first streamed chunk that carries text.
- **E2E** (`e2e_ms`): from sent to the end of the stream (`data: [DONE]` or the connection's
  end).
- **ITL** (`itl_ms`): the gaps between successive text chunks (chunk k's arrival minus chunk
  k-1's); a request of n text chunks gives n-1 gaps. Percentiles of ITL pool every gap of every
  successful request of the point (as vLLM does), so long answers weigh more.
- **TPOT** (`tpot_ms`): (E2E - TTFT) / (output tokens - 1), per request, only for requests of
  more than one output token; percentiles are over requests.
- **output tokens**: the server's `usage.completion_tokens` when it sends usage, else the
  number of text chunks (one token a chunk, as OpenAI servers stream).
- **sent rate** (`sent_rps`): (requests - 1) / (last sent - first sent), the rate the arrival
  process actually drew (a short Poisson point may send faster or slower than offered).
- **achieved rate** (`achieved_rps`): successful requests / (last end - first sent) of the
  point; output tokens/s likewise (`output_tps`).
- **goodput** (`goodput_rps`): successful requests meeting every SLO given (`ttft_ms`,
  `tpot_ms`, `e2e_ms`: each a bound that the request's value must not exceed; a request of one
  token has no TPOT and meets a TPOT bound) / the same (last end - first sent). With no SLO,
  goodput equals the achieved rate.
- **errors**: requests that failed (an HTTP status other than 200, 429 a full queue, a stream
  error, a timeout, a refused connection); `error_rate` = errors / requests sent.
- **percentiles**: numpy's linear interpolation (records.percentile), over successful requests.
- **TTFT split** (medians over successful requests that carry the server's `c2c` object):
  queue (`queue_ms`), sharer prefill (`teacher_prefill_ms`), projection (`projector_total_ms`),
  receiver prefill (`base_prefill_ms`), and other = TTFT - the four (network, tokenizing,
  embeddings, the first decode step), each the median of its per-request values.

The overload rule is `overload_verdict` (one function, its rule in its docstring).
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Iterable

from ..io.records import percentile
from ..spec.errors import UserError

KIND = "load_request"
#: The metrics whose distribution is summarized per point, and the statistics given.
LATENCY_METRICS = ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")
STATS = ("mean", "p50", "p90", "p99")
#: The SLO keys --slo accepts: a request meets the SLO when its value is at most the bound.
SLO_KEYS = ("ttft_ms", "tpot_ms", "e2e_ms")
#: TTFT split: (column, the server's stage key or None for the queue) in pipeline order.
SPLIT_PARTS = (("queue_ms", None), ("sharer_prefill_ms", "teacher_prefill_ms"),
               ("projection_ms", "projector_total_ms"),
               # t2t: the sharer writes its note (every note token) before the receiver reads it
               ("note_ms", "sharer_decode_ms"),
               ("receiver_prefill_ms", "base_prefill_ms"))
#: Overload thresholds (overload_verdict).
ACHIEVED_SHARE = 0.9
INFLIGHT_GROWTH = 1.5
TTFT_GROWTH = 2.0
TTFT_GROWTH_FLOOR_MS = 50.0
DEFAULT_MAX_ERROR_RATE = 0.05
#: --find_max_goodput: a rate is sustained when goodput >= this share of the offered rate.
SUSTAIN_SHARE = 0.9


def is_load_record(rec: Any) -> bool:
    return isinstance(rec, dict) and rec.get("kind") == KIND


def parse_slo(text: str | None) -> dict[str, float]:
    """`ttft_ms=500,tpot_ms=50` -> {"ttft_ms": 500.0, "tpot_ms": 50.0}; '' or None -> {}."""
    out: dict[str, float] = {}
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        key, eq, value = part.partition("=")
        key = key.strip()
        if not eq or key not in SLO_KEYS:
            raise UserError(f"--slo part {part!r} is not KEY=MS with KEY one of"
                            f" {', '.join(SLO_KEYS)}, e.g. --slo ttft_ms=500,tpot_ms=50.")
        try:
            bound = float(value)
        except ValueError:
            raise UserError(f"--slo {key}={value!r} is not a number of milliseconds.") from None
        if not math.isfinite(bound) or bound <= 0:
            raise UserError(f"--slo {key}={value} must be a positive number of milliseconds.")
        out[key] = bound
    return out


# --- per request ----------------------------------------------------------------------------

def itl_of(token_times_ms: list[float] | None) -> list[float]:
    """Inter-token latencies: the gaps between successive text chunks' arrival times."""
    t = list(token_times_ms or [])
    return [b - a for a, b in zip(t, t[1:])]


def tpot_of(ttft_ms: float | None, e2e_ms: float | None, output_tokens: int | None) -> float | None:
    """(E2E - TTFT) / (output tokens - 1); None for a request of at most one token."""
    if ttft_ms is None or e2e_ms is None or not output_tokens or output_tokens < 2:
        return None
    return (e2e_ms - ttft_ms) / (output_tokens - 1)


def ok(rec: dict) -> bool:
    """A successful request: no error and a first token."""
    return not rec.get("error") and rec.get("ttft_ms") is not None


def meets_slo(rec: dict, slo: dict[str, float]) -> bool:
    """Every bound in `slo` holds for this (successful) request; a missing TPOT (one token)
    meets a TPOT bound."""
    if not ok(rec):
        return False
    for key, bound in slo.items():
        v = rec.get(key)
        if v is None and key == "tpot_ms":
            continue
        if v is None or v > bound:
            return False
    return True


def ttft_split(rec: dict) -> dict[str, float] | None:
    """The request's TTFT in parts (SPLIT_PARTS and other_ms) from the server's `c2c` object,
    or None when the server sent none. A part the server did not report counts 0."""
    if rec.get("queue_ms") is None and not rec.get("stages"):
        return None
    ttft = rec.get("ttft_ms")
    if ttft is None:
        return None
    stages = rec.get("stages") or {}
    parts = {}
    for col, key in SPLIT_PARTS:
        v = rec.get("queue_ms") if key is None else stages.get(key)
        parts[col] = float(v) if isinstance(v, (int, float)) else 0.0
    parts["other_ms"] = max(ttft - sum(parts.values()), 0.0)
    return parts


# --- per point ------------------------------------------------------------------------------

def _dist(values: list[float]) -> dict[str, float | None]:
    vals = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return {st: None for st in STATS}
    out = {"mean": round(statistics.fmean(vals), 3)}
    out.update({f"p{q}": round(percentile(vals, q), 3) for q in (50, 90, 99)})
    return out


def _end_s(rec: dict) -> float:
    """When the request ended, in run seconds (sent + E2E; a failed one at its end_s)."""
    if rec.get("end_s") is not None:
        return float(rec["end_s"])
    return float(rec["sent_s"]) + float(rec.get("e2e_ms") or 0.0) / 1000


def in_flight(records: list[dict], t: float) -> int:
    """Requests sent at or before run time `t` and not ended by then."""
    return sum(1 for r in records if r["sent_s"] <= t < _end_s(r))


def mean_in_flight(records: list[dict], a: float, b: float) -> float:
    """The time-averaged number of requests in flight over run times [a, b] (each request
    counts for the share of [a, b] between its send and its end); 0 for an empty window."""
    if b <= a:
        return 0.0
    busy = sum(max(0.0, min(_end_s(r), b) - max(r["sent_s"], a)) for r in records)
    return busy / (b - a)


def point_stats(records: Iterable[dict], slo: dict[str, float] | None = None,
                max_error_rate: float = DEFAULT_MAX_ERROR_RATE) -> dict:
    """The statistics of one point's requests (module docstring) and its overload verdict."""
    recs = sorted(records, key=lambda r: r["sent_s"])
    slo = dict(slo or {})
    if not recs:
        return {"requests": 0}
    first = recs[0]
    good = [r for r in recs if ok(r)]
    first_sent = recs[0]["sent_s"]
    last_end = max(_end_s(r) for r in recs)
    span = max(last_end - first_sent, 1e-9)
    last_sent = recs[-1]["sent_s"]
    out_tokens = sum(int(r.get("output_tokens") or 0) for r in good)
    errors = [r for r in recs if not ok(r)]
    st: dict[str, Any] = {
        "mode": first.get("mode"),
        "rate": first.get("rate"),
        "concurrency": first.get("concurrency"),
        "point": first.get("point"),
        "requests": len(recs),
        "completed": len(good),
        "errors": len(errors),
        "error_rate": round(len(errors) / len(recs), 4),
        "errors_429": sum(1 for r in errors if r.get("status") == 429),
        "duration_s": round(span, 4),
        "sent_rps": round((len(recs) - 1) / (last_sent - first_sent), 4)
        if len(recs) > 1 and last_sent > first_sent else None,
        "achieved_rps": round(len(good) / span, 4),
        "output_tps": round(out_tokens / span, 3),
        "output_tokens": out_tokens,
        "prompt_tokens_mean": _dist([r.get("prompt_tokens") for r in good
                                     if r.get("prompt_tokens") is not None])["mean"],
        "slo": slo,
        "goodput_rps": round(sum(1 for r in good if meets_slo(r, slo)) / span, 4),
    }
    for m in LATENCY_METRICS:
        vals = ([g for r in good for g in (r.get("itl_ms") or itl_of(r.get("token_times_ms")))]
                if m == "itl_ms" else [r.get(m) for r in good])
        st[m] = _dist(vals)
    splits = [s for s in (ttft_split(r) for r in good) if s is not None]
    st["ttft_split_p50_ms"] = ({k: round(statistics.median(s[k] for s in splits), 3)
                                for k in splits[0]} if splits else None)
    # the overload evidence: the requests in flight, time-averaged over the first and the
    # second half of the sending window, and the TTFT medians of the first and second half of
    # the requests by send time
    # (the window starts after the ramp-up: the shortest E2E after the first send)
    e2es = [r["e2e_ms"] for r in good if r.get("e2e_ms") is not None]
    w0 = first_sent + (min(e2es) / 1000 if e2es else 0.0)
    if e2es and last_sent - w0 >= min(e2es) / 1000:
        mid = w0 + (last_sent - w0) / 2
        st["in_flight_first_half"] = round(mean_in_flight(recs, w0, mid), 3)
        st["in_flight_second_half"] = round(mean_in_flight(recs, mid, last_sent), 3)
    else:  # a sending window too short to see a trend
        st["in_flight_first_half"] = st["in_flight_second_half"] = None
    st["in_flight_end"] = in_flight(recs, last_sent)
    half = len(recs) // 2
    h1 = [r["ttft_ms"] for r in recs[:half] if ok(r)]
    h2 = [r["ttft_ms"] for r in recs[half:] if ok(r)]
    st["ttft_p50_first_half_ms"] = round(statistics.median(h1), 3) if h1 else None
    st["ttft_p50_second_half_ms"] = round(statistics.median(h2), 3) if h2 else None
    st["overloaded"], st["overload_reason"] = overload_verdict(st, max_error_rate)
    return st


def overload_verdict(st: dict, max_error_rate: float = DEFAULT_MAX_ERROR_RATE
                     ) -> tuple[bool, str]:
    """Is the server overloaded at this point? (verdict, the reason in words; '' when not).

    Overloaded when any of:
    1. it falls behind: the achieved rate < 0.9 x the rate sent (`offered`; open loop only) AND the
       requests in flight grew over the sending window: their time-averaged number over its
       second half is >= 1.5 x, and at least 1 more than, over its first half (a server that
       keeps up holds it steady, rate x mean E2E; a queue makes it grow). The window runs from
       the first send plus the shortest E2E (the ramp-up: nothing can have ended before) to
       the last send; a window shorter than that shortest E2E shows no trend and is not
       judged by this rule;
    2. its queue grows: the TTFT median of the second half of the requests (by send time) is
       more than 2 x the first half's, and at least 50 ms more (a few ms of jitter is no queue);
    3. it refuses or fails: the error rate (429s and failures over requests sent) exceeds
       `max_error_rate` (default 0.05).
    `st` is point_stats' dict (the keys it reads: rate, achieved_rps, in_flight_first_half,
    in_flight_second_half, ttft_p50_first_half_ms, ttft_p50_second_half_ms, error_rate, errors,
    requests)."""
    reasons = []
    rate = offered(st)
    if rate and st.get("achieved_rps") is not None and st["achieved_rps"] < ACHIEVED_SHARE * rate:
        h1, h2 = st.get("in_flight_first_half"), st.get("in_flight_second_half")
        if h1 is not None and h2 is not None and h2 >= max(INFLIGHT_GROWTH * h1, h1 + 1):
            reasons.append(f"it completed {st['achieved_rps']:.3g} requests/s of the {rate:.3g}"
                           f" sent while the requests in flight grew from {h1:.2g} on average"
                           f" in the first half of the sending to {h2:.2g} in the second")
    a, b = st.get("ttft_p50_first_half_ms"), st.get("ttft_p50_second_half_ms")
    if a is not None and b is not None and b > TTFT_GROWTH * a and b - a >= TTFT_GROWTH_FLOOR_MS:
        reasons.append(f"the TTFT median grew from {a:.0f} ms in the first half of the requests"
                       f" to {b:.0f} ms in the second (a growing queue)")
    if st.get("error_rate", 0) > max_error_rate:
        reasons.append(f"{st.get('errors')} of {st.get('requests')} requests failed"
                       f" ({st['error_rate']:.0%} > --max_error_rate {max_error_rate:g})")
    return bool(reasons), "; ".join(reasons)


def offered(st: dict) -> float | None:
    """The rate the server was offered at this point: the requests actually sent per second
    (`sent_rps`) when known, else the point's nominal rate. A short point's Poisson arrivals
    stray far from the nominal rate (8 requests at 0.0875/s were sent at 0.068/s): judged
    against the nominal rate, a server that kept up would fail for the sampler's luck."""
    sent = st.get("sent_rps")
    return sent if isinstance(sent, (int, float)) and sent > 0 else st.get("rate")


def sustains(st: dict) -> bool:
    """For --find_max_goodput: the point was not overloaded and its goodput is at least 90% of
    the rate it was offered (`offered`: the rate actually sent)."""
    rate = offered(st)
    return bool(st.get("rate")) and not st.get("overloaded") and \
        st.get("goodput_rps", 0) >= SUSTAIN_SHARE * rate


def point_key(rec: dict) -> tuple:
    """The point a request belongs to: (point index, mode, rate, concurrency)."""
    return (rec.get("point"), rec.get("mode"), rec.get("rate"), rec.get("concurrency"))


def group_points(records: Iterable[dict]) -> dict[tuple, list[dict]]:
    """Load records -> {point_key: its records}, in the order the points first appear."""
    out: dict[tuple, list[dict]] = {}
    for r in records:
        if is_load_record(r):
            out.setdefault(point_key(r), []).append(r)
    return out


def points_from_records(records: Iterable[dict], slo: dict | None = None,
                        max_error_rate: float = DEFAULT_MAX_ERROR_RATE) -> list[dict]:
    """Every point's statistics, recomputed from its requests (report / compare). The SLO is the
    one the records were run with (`slo` in each record) unless `slo` is given."""
    pts = []
    for recs in group_points(records).values():
        use = slo if slo is not None else (recs[0].get("slo") or {})
        mer = recs[0].get("max_error_rate", max_error_rate)
        pts.append(point_stats(recs, use, mer))
    return pts


# --- tables ---------------------------------------------------------------------------------

#: The printed per-point table: column -> (stat dict key, sub key or None).
TABLE_COLUMNS = (
    ("mode", "mode", None), ("rate", "rate", None), ("conc", "concurrency", None),
    ("n", "requests", None), ("err", "errors", None), ("sent/s", "sent_rps", None),
    ("req/s", "achieved_rps", None),
    ("good/s", "goodput_rps", None), ("out tok/s", "output_tps", None),
    ("TTFT p50", "ttft_ms", "p50"), ("TTFT p99", "ttft_ms", "p99"),
    ("TPOT p50", "tpot_ms", "p50"), ("ITL p50", "itl_ms", "p50"), ("E2E p50", "e2e_ms", "p50"),
    ("E2E p99", "e2e_ms", "p99"), ("overloaded", "overloaded", None),
)


def table_rows(points: list[dict]) -> list[dict]:
    """One row per point (TABLE_COLUMNS), ms columns in ms."""
    rows = []
    for st in points:
        row = {}
        for col, key, sub in TABLE_COLUMNS:
            v = st.get(key)
            if sub is not None:
                v = (v or {}).get(sub)
            if col == "rate" and v is None:
                v = ""
            if col == "conc" and v is None:
                v = ""
            row[col] = v
        rows.append(row)
    return rows


def format_table(points: list[dict]) -> str:
    """The per-point table as fixed-width text."""
    rows = table_rows(points)
    if not rows:
        return "(no points)"
    cols = list(rows[0])

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, bool):
            return "yes" if v else "no"
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)
    cells = [[cell(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


#: compare: the per-point numbers set side by side (key, sub key), and whether higher is better.
COMPARE_FIELDS = (("achieved_rps", None, True), ("goodput_rps", None, True),
                  ("output_tps", None, True), ("error_rate", None, False),
                  ("ttft_ms", "p50", False), ("ttft_ms", "p99", False),
                  ("tpot_ms", "p50", False), ("itl_ms", "p50", False), ("e2e_ms", "p50", False))


def _match_key(st: dict) -> tuple:
    return (st.get("mode"), st.get("rate"), st.get("concurrency"))


def compare_points(a: list[dict], b: list[dict]) -> list[dict]:
    """Rows of (mode, rate, concurrency, metric, A, B, B - A, B / A) for the points both runs
    hold (matched by mode and offered rate or concurrency; a point run twice in one file, its
    last). Rows in A's order."""
    bmap = {_match_key(st): st for st in b}
    rows = []
    for st in a:
        other = bmap.get(_match_key(st))
        if other is None:
            continue
        for key, sub, higher in COMPARE_FIELDS:
            va, vb = st.get(key), other.get(key)
            if sub is not None:
                va, vb = (va or {}).get(sub), (vb or {}).get(sub)
            metric = key if sub is None else f"{key} {sub}"
            diff = None if va is None or vb is None else round(vb - va, 4)
            ratio = (round(vb / va, 4) if va not in (None, 0) and vb is not None else None)
            better = (None if diff is None or diff == 0 else (diff > 0) == higher)
            rows.append({"mode": st.get("mode"), "rate": st.get("rate"),
                         "concurrency": st.get("concurrency"), "metric": metric, "A": va,
                         "B": vb, "B-A": diff, "B/A": ratio,
                         "B better": None if better is None else bool(better)})
    return rows
