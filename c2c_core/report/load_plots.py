"""A load sweep's charts and its self-contained HTML page (pure but for write_load_html):
latency against achieved throughput per mode, goodput against offered rate per mode, and the
TTFT split as stacked bars per mode and rate. Input: report.load.point_stats dicts."""

from __future__ import annotations

import datetime as _dt
from typing import Iterable

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from . import load as L
from .plots import MODE_COLORS, OTHER_MODE_COLOR, STAGE_COLORS, _empty, _style
from .runreport import _STYLE, esc, table_html, write_text

#: TTFT split parts -> (label, color), in stack order.
SPLIT_LOOK = {
    "queue_ms": ("queue", "#dadaeb"),
    "sharer_prefill_ms": ("sharer prefill", STAGE_COLORS["teacher_prefill_ms"]),
    "projection_ms": ("projection", STAGE_COLORS["projector_total_ms"]),
    "note_ms": ("sharer note (t2t)", "#9e9ac8"),
    "receiver_prefill_ms": ("receiver prefill", STAGE_COLORS["base_prefill_ms"]),
    "other_ms": ("other", STAGE_COLORS["other_ms"]),
}


def _modes(points: Iterable[dict]) -> list[str]:
    return list(dict.fromkeys(str(p.get("mode")) for p in points))


def _get(p: dict, key: str, sub: str | None = None):
    v = p.get(key)
    return (v or {}).get(sub) if sub else v


def latency_throughput_fig(points: list[dict]) -> go.Figure:
    """TTFT p50, TTFT p99 and TPOT p50 (ms) against achieved requests/s, one line per mode and
    metric (solid TTFT p50, dashed TTFT p99, dotted TPOT p50), points sorted by throughput."""
    pts = [p for p in points if p.get("completed")]
    if not pts:
        return _empty("Latency against throughput")
    fig = go.Figure()
    for mode in _modes(pts):
        mine = sorted((p for p in pts if str(p.get("mode")) == mode),
                      key=lambda p: p.get("achieved_rps") or 0)
        x = [p.get("achieved_rps") for p in mine]
        for key, sub, dash, what in (("ttft_ms", "p50", "solid", "TTFT p50"),
                                     ("ttft_ms", "p99", "dash", "TTFT p99"),
                                     ("tpot_ms", "p50", "dot", "TPOT p50")):
            fig.add_trace(go.Scatter(
                x=x, y=[_get(p, key, sub) for p in mine], mode="lines+markers",
                name=f"{mode} {what}", line=dict(color=MODE_COLORS.get(mode, OTHER_MODE_COLOR),
                                                 dash=dash)))
    return _style(fig, "Latency against achieved throughput", "achieved requests/s", "ms")


def goodput_fig(points: list[dict]) -> go.Figure:
    """Goodput (requests/s meeting the SLOs) against offered requests/s per mode, with the
    diagonal (every offered request served within the SLOs)."""
    pts = [p for p in points if p.get("rate")]
    if not pts:
        return _empty("Goodput against offered rate")
    fig = go.Figure()
    for mode in _modes(pts):
        mine = sorted((p for p in pts if str(p.get("mode")) == mode), key=lambda p: p["rate"])
        fig.add_trace(go.Scatter(x=[p["rate"] for p in mine],
                                 y=[p.get("goodput_rps") for p in mine], mode="lines+markers",
                                 name=mode,
                                 line=dict(color=MODE_COLORS.get(mode, OTHER_MODE_COLOR))))
    top = max(p["rate"] for p in pts)
    fig.add_trace(go.Scatter(x=[0, top], y=[0, top], mode="lines", name="offered",
                             line=dict(color="#999", dash="dot")))
    return _style(fig, "Goodput against offered rate", "offered requests/s",
                  "goodput (requests/s within the SLOs)")


def ttft_split_fig(points: list[dict]) -> go.Figure:
    """The TTFT medians split into queue, sharer prefill, projection, receiver prefill and other,
    stacked, one bar per rate, one panel per mode (points whose server sent no split left out)."""
    pts = [p for p in points if p.get("ttft_split_p50_ms")]
    if not pts:
        return _empty("TTFT split (the server sent no stage times)")
    modes = _modes(pts)
    fig = make_subplots(rows=1, cols=len(modes), subplot_titles=modes, shared_yaxes=True)
    for c, mode in enumerate(modes, start=1):
        mine = sorted((p for p in pts if str(p.get("mode")) == mode),
                      key=lambda p: (p.get("rate") or 0, p.get("concurrency") or 0))
        x = [f"{p['rate']:g}/s" if p.get("rate") else f"c{p.get('concurrency')}" for p in mine]
        for part, (name, color) in SPLIT_LOOK.items():
            fig.add_trace(go.Bar(x=x, y=[p["ttft_split_p50_ms"].get(part) for p in mine],
                                 name=name, marker_color=color, legendgroup=name,
                                 showlegend=c == 1), row=1, col=c)
    fig.update_layout(barmode="stack")
    return _style(fig, "TTFT split (medians) per offered rate", None, "ms")


def load_figs(points: list[dict]) -> list[go.Figure]:
    return [latency_throughput_fig(points), goodput_fig(points), ttft_split_fig(points)]


def load_html(summary: dict, title: str = "C2C load sweep") -> str:
    """One self-contained page: the run metadata, per mode its points' table, the overload and
    max-goodput sentences, the charts (plotly's JS inline once; every value escaped)."""
    points = summary.get("points") or []
    settings = dict((summary.get("settings") or {}).get("requested") or {})
    meta = {"run id": summary.get("run_id"), "started at": summary.get("started_at"),
            "url": (summary.get("settings") or {}).get("url"),
            "slo": (summary.get("settings") or {}).get("slo"),
            "interrupted": summary.get("interrupted"),
            **{k: v for k, v in (summary.get("environment") or {}).items()},
            **{f"--{k}": v for k, v in settings.items()}}
    if summary.get("source"):
        meta["source"] = summary["source"]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>"
             f"<style>{_STYLE}</style></head><body><h1>{esc(title)}</h1>",
             f"<p class=small>Written {esc(_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds'))}."
             " Definitions: docs/load.md.</p>",
             "<h2>Run metadata</h2>",
             table_html(pd.DataFrame([{"": k, "value": v} for k, v in meta.items()
                                      if v not in (None, {}, [])], columns=["", "value"]),
                        align_numbers=False)]
    for mode in _modes(points):
        mine = [p for p in points if str(p.get("mode")) == mode]
        parts.append(f"<h2>{esc(mode)}</h2>")
        parts.append(table_html(pd.DataFrame(L.table_rows(mine))))
        for p in mine:
            if p.get("overloaded"):
                parts.append(f"<div class=note>Overloaded at "
                             f"{esc(p.get('rate') or ('concurrency ' + str(p.get('concurrency'))))}"
                             f": {esc(p.get('overload_reason'))}</div>")
        best = (summary.get("max_goodput") or {}).get(mode)
        if best:
            parts.append(f"<p>Highest sustained rate: {esc(best.get('sustained_rps'))} req/s"
                         f" (not sustained: {esc(best.get('unsustained_rps'))}).</p>")
    parts.append("<h2>Charts</h2>")
    for i, fig in enumerate(load_figs(points)):
        parts.append(fig.to_html(full_html=False, include_plotlyjs=i == 0))
    parts.append("</body></html>")
    return "\n".join(parts)


def write_load_html(path: str, summary: dict) -> str:
    return write_text(path, load_html(summary))
