"""DataFrames and records → plotly figures (pure). Empty input gives a "No data" figure."""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .analysis import (E2E_STAGES, TTFT_STAGES, label, name, ordered_modes, sweep_input_lens,
    to_frame)
from ..io.records import parse_sweep_id

TEMPLATE = "plotly_white"

#: One color per stage (both "other" remainders share grey).
STAGE_COLORS = {
    "alignment_ms": "#fdd0a2",
    "base_embedding_ms": "#9ecae1",
    "base_prefill_ms": "#3182bd",
    "teacher_embedding_ms": "#fdae6b",
    "teacher_prefill_ms": "#e6550d",
    "sharer_decode_ms": "#a63603",
    "projector_total_ms": "#31a354",
    "decode_total_ms": "#756bb1",
    "decode_avg_ms": "#756bb1",
    "ttft_other_ms": "#bdbdbd",
    "batch_wait_ms": "#dadaeb",
    "other_ms": "#bdbdbd",
}
#: One color per mode.
MODE_COLORS = {"c2c": "#1b9e77", "receiver": "#7570b3", "sharer": "#d95f02", "t2t": "#e7298a"}
OTHER_MODE_COLOR = "#7f7f7f"
#: One color per file when several are drawn together.
SOURCE_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
#: Below this many samples in a group a histogram says little: points (and a box) instead.
FEW_SAMPLES = 20


def _mode_color(mode: str) -> str:
    return MODE_COLORS.get(mode, OTHER_MODE_COLOR)


def _style(fig: go.Figure, title: str, x: str | None = None, y: str | None = None) -> go.Figure:
    fig.update_layout(template=TEMPLATE, title=dict(text=title, x=0.01),
                      margin=dict(l=60, r=20, t=60, b=50), legend=dict(title_text=""))
    # long or rotated tick labels grow the margin, and the axis title sits below them (it
    # overlapped the labels of the mode charts with a fixed margin)
    fig.update_xaxes(automargin=True, title_standoff=12)
    fig.update_yaxes(automargin=True, title_standoff=8)
    if x:
        fig.update_xaxes(title_text=x)
    if y:
        fig.update_yaxes(title_text=y)
    return fig


def _empty(title: str) -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(text="No data", showarrow=False, font=dict(size=16),
                       xref="paper", yref="paper", x=0.5, y=0.5)
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return _style(fig, title)


def _has(df: pd.DataFrame | None, col: str) -> bool:
    if df is None or col not in df.columns:
        return False
    return bool(pd.to_numeric(df[col], errors="coerce").notna().any())


def _stages_with_data(df: pd.DataFrame, stages: Iterable[str]) -> list[str]:
    return [s for s in stages if _has(df, s) and bool((df[s].fillna(0) > 0).any())]


def _sample_labels(df: pd.DataFrame) -> pd.Series:
    """A label per row: the id, plus mode / source / repeat where those vary."""
    out = (df["id"] if "id" in df.columns else df.index.to_series()).astype(str)
    for col, fmt in (("mode", "{}"), ("source", "{}"), ("repeat", "r{}")):
        if col in df.columns and df[col].nunique() > 1:
            out = out + " · " + df[col].map(fmt.format)
    return out


def stage_breakdown_fig(record: dict) -> go.Figure:
    """One record: stacked bar of the stages to the first token, and a decode bar."""
    title = "Stage breakdown"
    row = to_frame([record]).iloc[0] if isinstance(record, dict) and record else None
    if row is None:
        return _empty(title)
    stages = [s for s in TTFT_STAGES if row[s] > 0]
    decode = row["decode_total_ms"]
    if not stages and not decode > 0:
        return _empty(title)
    fig = go.Figure()
    for s in stages:
        fig.add_bar(y=["to first token"], x=[row[s]], orientation="h", name=name(s),
                    marker_color=STAGE_COLORS[s],
                    hovertemplate=f"{name(s)}: %{{x:.2f}} ms<extra></extra>")
    if decode > 0:
        fig.add_bar(y=["decode"], x=[decode], orientation="h",
                    name=f"decode ({row['n_steps']} steps)",
                    marker_color=STAGE_COLORS["decode_total_ms"],
                    hovertemplate="decode: %{x:.2f} ms<extra></extra>")
    parts = [f"{name(k)} {row[k]:.1f} ms" for k in ("ttft_ms", "e2e_ms") if not math.isnan(row[k])]
    title = f"Stage breakdown, sample {row['id']} ({row['mode']})"
    if parts:
        title += "<br><sup>" + " · ".join(parts) + "</sup>"
    fig.update_layout(barmode="stack")
    fig.update_yaxes(categoryorder="array", categoryarray=["decode", "to first token"])
    return _style(fig, title, x="time (ms)")


def _step_runs(df: pd.DataFrame, keys: list[str]) -> list[tuple[tuple, np.ndarray, np.ndarray]]:
    """(key, steps, ms) per run, in order of first appearance, rows of one key together.
    A steps frame lists each record's steps contiguously: runs are found where the keys
    change (numpy over positions, not a groupby over millions of text keys)."""
    steps = df["step"].to_numpy()
    ms = df["ms"].to_numpy(dtype=float)
    if not keys:
        return [((), steps, ms)]
    starts = [0] + (np.flatnonzero(np.diff(steps.astype(float)) <= 0) + 1).tolist()
    heads = df.iloc[starts][keys]
    bounds = starts + [len(df)]
    merged: dict[tuple, list[int]] = {}
    for i, key in enumerate(heads.itertuples(index=False, name=None)):
        merged.setdefault(key, []).append(i)
    tails = df.iloc[[b - 1 for b in bounds[1:]]][keys].itertuples(index=False, name=None)
    if any(len(v) > 1 for v in merged.values()) or any(
            t != h for t, h in zip(tails, heads.itertuples(index=False, name=None))):
        # runs split across the frame (or many tiny ones): pandas groups them exactly
        return [(k if isinstance(k, tuple) else (k,), g["step"].to_numpy(),
                 g["ms"].to_numpy(dtype=float))
                for k, g in df.groupby(keys, sort=False)]
    return [(key, steps[bounds[i]:bounds[i + 1]], ms[bounds[i]:bounds[i + 1]])
            for key, (i,) in merged.items()]


def decode_steps_fig(steps, max_lines: int = 20, max_points: int = 2_000) -> go.Figure:
    """Step latency per decode step, one line per run (at most `max_lines`), p50/p90 marked
    (over every step). `steps`: a steps frame (analysis.steps_frame) or the compact runs of
    analysis.step_runs ((key, float array) per record: no per-step rows). A run longer than
    `max_points` steps is drawn as the mean of each k steps, and the title says so."""
    title = "Decode step latency"
    keys = ["source", "id", "mode", "repeat"]
    if isinstance(steps, pd.DataFrame):
        if not _has(steps, "ms") or "step" not in steps.columns:
            return _empty(title)
        df = steps.dropna(subset=["ms"])
        keys = [k for k in keys if k in df.columns]
        groups = _step_runs(df, keys)
    else:  # compact runs: step i of a run is its (i+1)-th value
        groups = [(k, None, np.asarray(y, dtype=float)) for k, y in steps or [] if len(y)]
        if not groups:
            return _empty(title)
    heads = pd.DataFrame([k for k, _, _ in groups], columns=keys) if keys else pd.DataFrame(
        index=[0])
    labels = list(_sample_labels(heads))
    src_at = keys.index("source") if "source" in keys else None
    src_of = [k[src_at] if src_at is not None else None for k, _, _ in groups]
    sources = list(dict.fromkeys(src_of)) if src_at is not None else []
    several = len(sources) > 1
    shown = list(range(len(groups)))[:max_lines]
    if several:  # the first runs of every file, not only of the first file
        per = max(1, max_lines // len(sources))
        shown = [i for src in sources for i in [i for i in range(len(groups))
                                                if src_of[i] == src][:per]]
    fig = go.Figure()
    thinned = 0
    for i in shown:
        _, x, y = groups[i]
        color = SOURCE_COLORS[sources.index(src_of[i]) % len(SOURCE_COLORS)] if several else None
        if len(y) > max_points:  # a million steps would be a million points in the page
            k = -(-len(y) // max_points)
            thinned = max(thinned, k)
            cut = len(y) // k * k
            xs = np.arange(1, cut + 1, k) if x is None else x[:cut:k]
            ys = y[:cut].reshape(-1, k).mean(axis=1)
            if cut < len(y):
                xs = np.append(xs, cut + 1 if x is None else x[cut])
                ys = np.append(ys, y[cut:].mean())
            x, y = xs, ys
        elif x is None:
            x = np.arange(1, len(y) + 1)
        fig.add_scatter(x=x, y=y, name=f"sample {labels[i]}",
                        mode="lines+markers" if len(x) <= 50 else "lines",
                        line=dict(color=color, width=1) if color else None,
                        opacity=0.55 if several else 1.0,
                        hovertemplate="step %{x}: %{y:.2f} ms<extra></extra>")

    def quantiles(ys: list) -> list[float]:
        # one float32 copy of the steps (4 bytes a step: the lines are labelled to 0.01 ms),
        # partitioned in place (np.percentile would copy it again)
        every = np.empty(sum(len(y) for y in ys), dtype=np.float32)
        at = 0
        for y in ys:
            every[at:at + len(y)] = y
            at += len(y)
        return [float(v) for v in np.percentile(every, [50, 90], overwrite_input=True)]

    if several:  # one p50 / p90 per file: files from different machines must not be mixed
        lo = min(float(x[0]) if x is not None else 1.0 for _, x, _ in groups)
        hi = max(float(x[-1]) if x is not None else float(len(y)) for _, x, y in groups)
        for i, src in enumerate(sources):
            qs = quantiles([g[2] for g, s in zip(groups, src_of) if s == src])
            for q, dash, v in ((50, "dash", qs[0]), (90, "dot", qs[1])):
                fig.add_scatter(x=[lo, hi], y=[v, v], mode="lines", name=f"{src} p{q} {v:.2f} ms",
                                legendrank=1,  # listed before the samples
                                line=dict(color=SOURCE_COLORS[i % len(SOURCE_COLORS)], dash=dash,
                                          width=2.5),
                                hovertemplate=f"{src} p{q}: {v:.2f} ms<extra></extra>")
    else:
        # p50 labelled at the left, p90 at the right: close values must not overprint
        qs = quantiles([g[2] for g in groups])
        for q, dash, where, v in ((50, "dash", "bottom left", qs[0]),
                                  (90, "dot", "top right", qs[1])):
            fig.add_hline(y=v, line_dash=dash, line_color="#444",
                          annotation_text=f"p{q} {v:.2f} ms", annotation_position=where)
    if len(groups) > len(shown):
        title += f" ({len(shown)} of {len(groups)} runs shown; p50/p90 over all"
        title += " of each file)" if several else ")"
    elif several:
        title += " (p50 / p90 per file)"
    if thinned:
        title += f"; long runs drawn as the mean of every {thinned:,} steps"
    return _style(fig, title, x=label("step"), y=label("ms"))


def decode_hist_fig(df: pd.DataFrame, bins: int = 50) -> go.Figure:
    """Histogram of decode ms/token; overlaid per source (or per mode) when several. Groups
    with fewer than FEW_SAMPLES samples get every sample as a point (and a box from 5 on)."""
    title = "Decode time per token"
    if not _has(df, "decode_avg_ms"):
        return _empty(title)
    d = df.dropna(subset=["decode_avg_ms"])
    by = next((c for c in ("source", "mode") if c in d.columns and d[c].nunique() > 1), None)
    groups = list(d.groupby(by, sort=False)) if by else [("all", d)]
    # several files or modes: one row each (overlaid histograms of runs far apart squash each
    # into a bar or two); few samples: every sample a point
    if len(groups) > 1 or len(d) < FEW_SAMPLES:
        return _strip(groups, by, title)
    bins = min(bins, max(10, math.ceil(2 * len(d) ** (1 / 3))))  # Rice's rule: no comb of 1s
    lo, hi = float(d["decode_avg_ms"].min()), float(d["decode_avg_ms"].max())
    size = (hi - lo) / bins if hi > lo else max(abs(lo) * 0.01, 1e-3)
    xbins = dict(start=lo, end=hi + size, size=size)
    fig = go.Figure()
    for key, g in groups:
        fig.add_histogram(x=g["decode_avg_ms"], name=str(key), xbins=xbins,
                          opacity=0.6 if by else 1.0,
                          marker_color=_mode_color(key) if by == "mode" else None)
    fig.update_layout(barmode="overlay", showlegend=by is not None)
    return _style(fig, title, x=label("decode_avg_ms"), y="samples (count)")


def _strip(groups: list, by: str | None, title: str) -> go.Figure:
    """Decode ms/token of few samples: one row per group, every sample a point, the median a
    bar, a box from 5 samples on (a box of 2 points would claim quartiles it does not have)."""
    fig = go.Figure()
    names = []
    for i, (key, g) in enumerate(groups):
        x = g["decode_avg_ms"].astype(float)
        row = f"{key} (n={len(x)})" if by else f"n={len(x)}"
        names.append(row)
        color = (_mode_color(key) if by == "mode" else
                 SOURCE_COLORS[i % len(SOURCE_COLORS)] if by else "#756bb1")
        labels = _sample_labels(g)
        if len(x) >= 5:
            pts = "all" if len(x) <= 500 else "outliers"
            fig.add_box(x=x, y=[row] * len(x), name=row, orientation="h", boxpoints=pts,
                        jitter=0.4, pointpos=0,
                        marker=dict(color=color, size=8 if len(x) < FEW_SAMPLES else 5,
                                    opacity=0.8 if len(x) < FEW_SAMPLES else 0.5),
                        line=dict(color=color), fillcolor="rgba(0,0,0,0)", showlegend=False,
                        text=labels, hoveron="points",
                        hovertemplate="%{text}: %{x:.2f} ms/token<extra></extra>")
        else:
            fig.add_scatter(x=x, y=[row] * len(x), mode="markers", name=row, showlegend=False,
                            marker=dict(color=color, size=11, line=dict(color="white", width=1)),
                            text=labels, hovertemplate="%{text}: %{x:.2f} ms/token<extra></extra>")
        med = float(x.median())
        fig.add_scatter(x=[med], y=[row], mode="markers", showlegend=False,
                        marker=dict(symbol="line-ns", size=26, line=dict(color="#222", width=2)),
                        hovertemplate=f"median {med:.2f} ms/token<extra></extra>")
    fig.update_yaxes(type="category", categoryorder="array", categoryarray=names[::-1])
    lo = min(float(g["decode_avg_ms"].min()) for _, g in groups)
    hi = max(float(g["decode_avg_ms"].max()) for _, g in groups)
    pad = (hi - lo) * 0.1 if hi > lo else max(abs(hi) * 0.05, 0.05)
    fig.update_xaxes(range=[max(lo - pad, 0), hi + pad])
    n = sum(len(g) for _, g in groups)
    what = "each one shown" if n <= 500 else "box and outliers"
    return _style(fig, f"{title} ({n} sample{'s' if n != 1 else ''}: {what}, | = median)",
                  x=label("decode_avg_ms"))


def shared_y(*figs: go.Figure) -> None:
    """Give side-by-side figures one y range (0 to the largest stacked or drawn value)."""
    top = 0.0
    for fig in figs:
        stacks: dict = {}
        for tr in fig.data:
            ys = [float(v) for v in (tr.y if tr.y is not None else []) if v == v]
            if getattr(tr, "type", "") == "bar" and fig.layout.barmode == "stack":
                for x, v in zip(tr.x if tr.x is not None else [], tr.y if tr.y is not None else []):
                    stacks[x] = stacks.get(x, 0.0) + (float(v) if v == v else 0.0)
            elif ys:
                top = max(top, max(ys))
        if stacks:
            top = max(top, max(stacks.values()))
    if top > 0:
        for fig in figs:
            if fig.data:
                fig.update_yaxes(range=[0, top * 1.05], autorange=False)


def stage_bars_fig(df: pd.DataFrame) -> go.Figure:
    """Per-sample stacked stage times (they add up to E2E when the record has every stage)."""
    title = "Stage times per sample"
    stages = _stages_with_data(df, E2E_STAGES) if df is not None else []
    if not stages:
        return _empty(title)
    x = _sample_labels(df)
    fig = go.Figure()
    for s in stages:
        fig.add_bar(x=x, y=df[s].fillna(0), name=name(s), marker_color=STAGE_COLORS[s],
                    hovertemplate=f"%{{x}}<br>{name(s)}: %{{y:.2f}} ms<extra></extra>")
    fig.update_layout(barmode="stack")
    fig.update_xaxes(type="category")
    return _style(fig, title, x="sample (id)", y="time (ms)")


def mode_compare_figs(df: pd.DataFrame, metrics: Iterable[str] = (
        "ttft_ms", "e2e_ms", "decode_avg_ms", "tokens_per_second")) -> dict[str, go.Figure]:
    """Per metric: median per mode (and source when several), error bars p10–p90."""
    figs = {}
    for m in metrics:
        title = f"{label(m)} by mode (median, p10–p90)"
        if not _has(df, m) or "mode" not in df.columns:
            figs[m] = _empty(title)
            continue
        d = df.dropna(subset=[m])
        several = "source" in d.columns and d["source"].nunique() > 1
        keys = ["source", "mode"] if several else ["mode"]
        order = {mode: i for i, mode in enumerate(ordered_modes(d["mode"]))}
        groups = sorted(d.groupby(keys, sort=False), key=lambda kg: (kg[0][:-1], order[kg[0][-1]]))
        fig = go.Figure()
        for key, g in groups:
            mode = key[-1]
            med, p10, p90 = (float(g[m].quantile(q)) for q in (0.5, 0.1, 0.9))
            # file and mode on two lines: shorter labels, not rotated over the axis title
            fig.add_bar(x=["<br>".join(map(str, key)) + f" (n={len(g)})"], y=[med],
                        marker_color=_mode_color(mode), showlegend=False,
                        error_y=dict(type="data", symmetric=False, array=[p90 - med],
                                     arrayminus=[med - p10]),
                        hovertemplate=(f"median %{{y:.2f}}<br>p10 {p10:.2f} · p90 {p90:.2f}"
                                       "<extra></extra>"))
        figs[m] = _style(fig, title, x="file · mode" if several else "mode", y=label(m))
    return figs


# prefill-side stages grow with the prompt; decode is shown per token so output length drops out
SWEEP_STAGES = TTFT_STAGES[:-1] + ["decode_avg_ms"]


def sweep_fig(df: pd.DataFrame, x: str = "prompt_tokens") -> go.Figure:
    """Median time of each stage (decode: per token) against prompt length, one panel per mode.

    When the frame holds sweep records (ids 'in<N>-out<M>'), only those are drawn and x is the
    swept length N (a t2t receiver reads the note too, so its prompt_tokens is longer)."""
    title = "Stage times vs prompt length"
    if df is not None and "id" in df.columns:
        n = sweep_input_lens(df["id"])
        if n.notna().any():
            df, x = df.assign(sweep_len=n)[n.notna()], "sweep_len"
            # a sweep over batch sizes: a batch's stages are the whole batch's, so medians over
            # several sizes mix different work; draw the smallest size and say which
            bs = df["id"].map(lambda v: getattr(parse_sweep_id(v), "batch", 1))
            if bs.nunique() > 1:
                df = df[bs == bs.min()]
                title += f" (batch size {int(bs.min())}; other sizes in the batch curve)"
    if not _has(df, x):
        return _empty(title)
    d = df.assign(**{x: pd.to_numeric(df[x], errors="coerce")}).dropna(subset=[x])
    stages = _stages_with_data(d, SWEEP_STAGES)
    if not stages:
        return _empty(title)
    modes = ordered_modes(d["mode"]) if "mode" in d.columns else ["all"]
    d = d if "mode" in d.columns else d.assign(mode="all")
    fig = make_subplots(rows=1, cols=len(modes), shared_yaxes=True,
                        subplot_titles=modes if len(modes) > 1 else None)
    for col, mode in enumerate(modes, start=1):
        med = d[d["mode"] == mode].groupby(x)[stages].median().sort_index()
        for s in stages:
            legend = "decode (per token)" if s == "decode_avg_ms" else name(s)
            fig.add_scatter(x=med.index, y=med[s], mode="lines+markers", name=legend,
                            legendgroup=s, showlegend=col == 1, line_color=STAGE_COLORS[s],
                            hovertemplate=f"{legend}: %{{y:.2f}} ms at %{{x}}<extra></extra>",
                            row=1, col=col)
    lo, hi = float(d[x].min()), float(d[x].max())
    if lo > 0 and hi / lo >= 20:
        fig.update_xaxes(type="log")
        ticks = sorted(d[x].unique())
        if len(ticks) <= 12:  # label the lengths that were run, not log decades
            fig.update_xaxes(tickvals=ticks, ticktext=[f"{t:g}" for t in ticks])
    fig.update_xaxes(title_text="prompt length (tokens)")
    fig.update_yaxes(title_text="time (ms)", row=1, col=1)
    return _style(fig, title)


def batch_curve_fig(records: Iterable[dict]) -> go.Figure:
    """Latency against throughput: median decode ms/token (y) against the batch's decode tokens/s
    (x), one point per batch size, one line per mode (and prompt length, when several)."""
    title = "Latency vs throughput (batch size)"
    rows = []
    for r in records:
        t = r.get("timing") or {}
        tps = t.get("batch_tokens_per_second")
        if tps is None or t.get("decode_avg_ms") is None:
            continue
        shape = parse_sweep_id(r.get("id"))
        rows.append({"mode": r.get("mode", "c2c"), "batch_size": int(r.get("batch_size") or 1),
                     "len": None if shape is None else shape.input_len,
                     "ms": t["decode_avg_ms"], "tps": tps})
    if not rows:
        return _empty(title)
    d = pd.DataFrame(rows)
    lens = sorted(x for x in d["len"].dropna().unique())
    fig = go.Figure()
    for mode in ordered_modes(d["mode"]):
        for n in (lens or [None]):
            g = d[(d["mode"] == mode) & ((d["len"] == n) if n is not None else True)]
            if g.empty:
                continue
            med = g.groupby("batch_size")[["ms", "tps"]].median().sort_index()
            label_ = mode if len(lens) <= 1 else f"{mode}, {n:g} tokens in"
            fig.add_scatter(x=med["tps"], y=med["ms"], mode="lines+markers+text",
                            text=[f"B={b}" for b in med.index], textposition="top center",
                            name=label_, line_color=_mode_color(mode),
                            hovertemplate="batch %{text}: %{x:.1f} tok/s, %{y:.2f} ms/token"
                                          "<extra>" + label_ + "</extra>")
    return _style(fig, title, x="batch decode throughput (tokens/s)",
                  y="decode latency (ms/token, per row)")
