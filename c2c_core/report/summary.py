"""A running summary of a run, fed one record at a time, so long runs need not keep their
records in memory (they are in the JSONL file): per mode, the count and the few numbers the CLI
and the app print (decode ms/token, tok/s, TTFT), 8 bytes per value."""

from __future__ import annotations

import math
import sys
from array import array
from typing import Iterable

from ..io.records import CONTENTION_SHARE  # the threshold lives with its field

#: The metrics summarized; their headings are analysis.column's ("decode ms/token p50").
METRICS = ("decode_avg_ms", "tokens_per_second", "ttft_ms")


def _q(xs: list[float], q: float) -> float:
    """pandas' default (linear) quantile; NaN for no values."""
    if not xs:
        return math.nan
    s = sorted(xs)
    pos = (len(s) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def contention_note(shares: list[float]) -> str:
    """The warning for a list of timing.cpu_share values (CPU records), or ''."""
    if not shares:
        return ""
    med = _q(shares, 0.5)
    low = sum(x < CONTENTION_SHARE for x in shares)
    if med >= CONTENTION_SHARE:
        return ""
    return (f"These generations got only {med:.0%} of their CPU threads' time (median"
            f" timing.cpu_share {med:.2f}; {low} of {len(shares)} below {CONTENTION_SHARE}):"
            " another program was using the cores (a browser or a second job on this machine?),"
            " or this process runs more threads than its CPU quota (a container), so these CPU"
            " times are inflated; rerun on an idle machine or with fewer --threads.")


def contention_files(shares: dict[str, list[float]]) -> str:
    """One sentence for a whole view (a run, the Results tab's files): which files' CPU
    generations did not get their threads' time, and how much they got; '' when none."""
    busy = []
    for name, xs in shares.items():
        if xs and _q(xs, 0.5) < CONTENTION_SHARE:
            busy.append(f"{name} {_q(xs, 0.5):.0%}")
    if not busy:
        return ""
    return (f"CPU times inflated in {', '.join(busy)} (median share of the CPU threads' time a"
            " generation got, timing.cpu_share): another program was using the cores or the"
            " process ran more threads than its CPU quota, so rerun on an idle machine.")


class RunningSummary:
    """`add(record)` per record; `table()` gives count, mean, p50, p90 per mode and metric."""

    def __init__(self, records: Iterable[dict] = ()):
        self.count = 0
        self.values: dict[str, dict[str, array]] = {}
        self.scored: dict[str, list[int]] = {}   # mode -> [right, scored]
        self.truncated = 0
        self.caps: set = set()                   # max_new_tokens of the cut-off records
        self.shares = array("d")                 # timing.cpu_share of CPU records
        self.late = 0                            # records with timing.late_prepare_ms > 0
        for r in records:
            self.add(r)

    def add(self, rec: dict) -> None:
        self.count += 1
        t = rec.get("timing") if isinstance(rec.get("timing"), dict) else (
            rec if rec.get("kind") == "load_request" else {})  # a load request: its own TTFT
        per = self.values.setdefault(str(rec.get("mode") or "c2c"),
                                     {m: array("d") for m in METRICS})
        for m, arr in per.items():
            v = t.get(m)
            arr.append(float(v) if isinstance(v, (int, float)) and not isinstance(v, bool)
                       else math.nan)
        late = t.get("late_prepare_ms")
        if isinstance(late, (int, float)) and not isinstance(late, bool) and late > 0:
            self.late += 1
        share = t.get("cpu_share")
        if isinstance(share, (int, float)) and not isinstance(share, bool):
            self.shares.append(float(share))
        if isinstance(rec.get("correct"), bool):
            sc = self.scored.setdefault(str(rec.get("mode") or "c2c"), [0, 0])
            sc[0] += rec["correct"]
            sc[1] += 1
        if rec.get("truncated") is True:
            self.truncated += 1
            run = rec.get("run")  # an uploaded file's `run` may be anything
            cap = run.get("max_new_tokens") if isinstance(run, dict) else None
            if isinstance(cap, int) and not isinstance(cap, bool):
                self.caps.add(cap)

    def truncation_note(self) -> str:
        """One sentence when answers were cut off by max_new_tokens, else ''."""
        if not self.truncated:
            return ""
        cap = f" ({', '.join(map(str, sorted(self.caps)))})" if self.caps else ""
        return (f"{self.truncated} of {self.count} answer(s) were cut off by max_new_tokens{cap}"
                " before they ended; pass a larger --max_new_tokens to let them finish.")

    def late_note(self) -> str:
        """One sentence when records paid for preparing a shape inside their own clock, else
        ''. This running summary counts them; `report` and `compare` leave them out."""
        if not self.late:
            return ""
        return (f"{self.late} of {self.count} record(s) paid for late preparation"
                " (timing.late_prepare_ms: a shape prepared inside their own clock, so their TTFT"
                " and E2E include it); report and compare leave them out of their medians.")

    def contention_note(self) -> str:
        """One sentence when the generations did not get their CPU threads' time (another
        program used the cores, so the CPU timings are inflated), else ''."""
        return contention_note(list(self.shares))

    def modes(self) -> list[str]:
        return list(self.values)

    def series(self, mode: str, metric: str) -> list[float]:
        """The known values of `metric` for `mode`, in record order."""
        return [v for v in self.values.get(mode, {}).get(metric, ()) if not math.isnan(v)]

    def table(self):
        import pandas as pd

        from .analysis import column
        rows = []
        for mode, per in self.values.items():
            row = {"mode": mode, "count": len(per["ttft_ms"])}
            for m in METRICS:
                xs = self.series(mode, m)
                row[column(m, "mean")] = sum(xs) / len(xs) if xs else math.nan
                row[column(m, "p50")] = _q(xs, 0.5)
                row[column(m, "p90")] = _q(xs, 0.9)
            if mode in self.scored:
                right, n = self.scored[mode]
                row["accuracy"] = f"{right}/{n} ({right / n:.0%})"
            rows.append(row)
        return pd.DataFrame(rows)

    def line(self) -> str:
        """One line for a status: median decode ms/token and TTFT per mode."""
        parts = []
        for mode in self.values:
            dec, ttft = _q(self.series(mode, "decode_avg_ms"), 0.5), _q(self.series(mode, "ttft_ms"), 0.5)
            bits = [f"decode {dec:.2f} ms/token" if not math.isnan(dec) else "",
                    f"TTFT {ttft:.1f} ms" if not math.isnan(ttft) else ""]
            if any(bits):
                parts.append(f"{mode}: " + ", ".join(b for b in bits if b) + " (medians)")
        return " · ".join(parts)


def print_summary(records, out=None) -> None:
    """count, mean/p50/p90 of decode ms/token and tok/s, ttft, per mode (records or a
    RunningSummary), and its truncation, late-preparation and contention notes: what the CLI
    prints after a run."""
    out = out or sys.stdout
    summary = records if isinstance(records, RunningSummary) else RunningSummary(records)
    if not summary.count:
        print("No records.", file=out)
        return
    print(summary.table().round(2).to_string(index=False), file=out)
    for note in (summary.truncation_note(), summary.late_note(), summary.contention_note()):
        if note:
            print(note, file=out)
