"""A run's report: `<output stem>.summary.json` beside its JSONL (the settings, the machine and
per-mode statistics in one JSON), and the self-contained HTML page of `report --html` (run
metadata, per-mode tables and the charts, plotly's JS inline so it opens offline).

Everything is read back from the records (their `run` object says the versions, device and
settings), so a summary of a resumed or appended file covers all of it. Records come from
strangers: every value on the HTML page is escaped.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import math
import os
import platform
from typing import Any, Iterable

import pandas as pd

from ..io.records import CONTENTION_SHARE, SETTINGS_KEYS, iter_jsonl, settings_digest
from . import analysis
from .summary import contention_note

#: Bumped when a key of the summary changes meaning.
SUMMARY_VERSION = 1
#: Per-record metrics summarized per mode (README "Run report"), in this order.
SUMMARY_METRICS = ("ttft_ms", "tpot_ms", "e2e_ms", "decode_avg_ms", "tokens_per_second")
SUMMARY_STATS = ("mean", "p50", "p90", "p99")
#: `run` keys that describe the machine and software (the rest are settings).
ENV_KEYS = ("tool_version", "git_commit", "python", "torch", "transformers", "device", "cuda",
            "cpu", "threads", "frontend", "world_size", "attn_implementation", "timing_method",
            "engine", "compile_s", "fresh_process", "prepared_shapes")
#: `run` keys that describe what ran, beside run.settings.
RUN_SETTING_KEYS = ("preset", "receiver", "sharer", "fuser", "fuser_hash", "weights", "dtype",
                    "warmup", "max_new_tokens", "ignore_eos", "do_sample", "seed")


def summary_path(output: str | os.PathLike) -> str:
    """`X.jsonl` -> `X.summary.json` (the profile's files are named from the same stem)."""
    output = os.fspath(output)
    stem = output[:-6] if output.endswith(".jsonl") else os.path.splitext(output)[0]
    return f"{stem}.summary.json"


def _clean(v: Any) -> Any:
    """Strict-JSON values: NaN/inf -> None, numpy scalars -> Python, containers recursively."""
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):
        try:
            v = v.item()
        except (TypeError, ValueError):
            return str(v)
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if v is None or isinstance(v, (str, int, float, bool)):
        return v
    return str(v)


def _one_or_all(values: list) -> Any:
    """A key's distinct values: the value when all records agree, else the list of them."""
    distinct = []
    for v in values:
        if v not in distinct:
            distinct.append(v)
    return distinct[0] if len(distinct) == 1 else distinct


class _RunFields:
    """Collects the `run` objects' distinct values while the records stream past."""

    def __init__(self) -> None:
        self.values: dict[str, list] = {}
        self.settings: dict[str, dict] = {}   # settings digest -> settings
        self.run_ids: list[str] = []
        self.started: list[str] = []
        self.digests: list[str | None] = []   # each record's settings digest, in file order

    def add(self, rec: Any) -> None:
        run = rec.get("run") if isinstance(rec, dict) else None
        st = run.get("settings") if isinstance(run, dict) else None
        self.digests.append(settings_digest(st) if isinstance(st, dict) else None)
        if not isinstance(run, dict):
            return
        for k in ENV_KEYS + RUN_SETTING_KEYS:
            if k in run:
                seen = self.values.setdefault(k, [])
                v = _clean(run[k])
                if v not in seen:
                    seen.append(v)
        if isinstance(st, dict):
            self.settings.setdefault(settings_digest(st), _clean(
                {k: st.get(k) for k in SETTINGS_KEYS}))
        rid = run.get("run_id")
        if isinstance(rid, str) and rid not in self.run_ids:
            self.run_ids.append(rid)
        at = run.get("started_at")
        if isinstance(at, str):
            self.started.append(at)

    def pick(self, keys: Iterable[str]) -> dict:
        return {k: _one_or_all(self.values[k]) for k in keys if k in self.values}


def _stream(records: Iterable[dict], fields: _RunFields) -> Iterable[dict]:
    for r in records:
        fields.add(r)
        yield r


def mode_statistics(df: pd.DataFrame) -> dict:
    """Per mode (MODES order): count, mean/p50/p90/p99 of TTFT, TPOT, E2E, decode ms/token and
    tok/s, the median of every stage (ms), accuracy where scored, answers cut off."""
    out: dict[str, Any] = {}
    if df.empty or "mode" not in df.columns:
        return out
    for mode in analysis.ordered_modes(df["mode"]):
        g = df[df["mode"] == mode]
        per: dict[str, Any] = {"count": int(len(g))}
        for m in SUMMARY_METRICS:
            s = pd.to_numeric(g[m], errors="coerce").dropna() if m in g.columns \
                else pd.Series(dtype=float)
            per[m] = ({"n": int(len(s)), **{st: _stat(s, st) for st in SUMMARY_STATS}}
                      if len(s) else None)
        per["stage_medians_ms"] = {
            f: _stat(pd.to_numeric(g[f], errors="coerce").dropna(), "p50")
            for f in analysis.E2E_STAGES if f in g.columns and g[f].notna().any()}
        scored = g["correct"].dropna() if "correct" in g.columns else pd.Series(dtype=float)
        if len(scored):
            per["accuracy"] = round(float(scored.astype(float).mean()), 4)
            per["n_scored"] = int(len(scored))
        if "truncated" in g.columns:
            per["truncated"] = int(g["truncated"].fillna(False).astype(bool).sum())
        out[str(mode)] = per
    return out


#: A sweep's per-shape table: the medians of these.
SHAPE_METRICS = ("ttft_ms", "tpot_ms", "e2e_ms", "decode_avg_ms", "tokens_per_second")


def shape_statistics(df: pd.DataFrame) -> list[dict]:
    """A length sweep's records per (mode, prompt tokens, output tokens, batch size): count and
    the medians; [] when no record id is a sweep id."""
    from ..io.records import parse_sweep_id
    if df.empty:
        return []
    shapes = df["id"].map(parse_sweep_id)
    known = shapes.notna()
    if not known.any():
        return []
    d = df[known].assign(input_len=[s.input_len for s in shapes[known]],
                         output_len=[s.output_len for s in shapes[known]],
                         batch=[s.batch for s in shapes[known]])
    rows = []
    for (mode, i, o, b), g in d.groupby(["mode", "input_len", "output_len", "batch"], sort=True):
        row: dict[str, Any] = {"mode": mode, "input_len": int(i), "output_len": int(o),
                               "batch": int(b), "count": int(len(g))}
        for m in SHAPE_METRICS:
            if m in g.columns:
                row[f"{m} p50"] = _stat(pd.to_numeric(g[m], errors="coerce").dropna(), "p50")
        rows.append(row)
    order = {m: k for k, m in enumerate(analysis.ordered_modes(d["mode"]))}
    return sorted(rows, key=lambda r: (r["input_len"], r["output_len"], r["batch"],
                                       order.get(r["mode"], 99)))


def _stat(s: pd.Series, stat: str) -> float | None:
    if not len(s):
        return None
    v = float(s.mean()) if stat == "mean" else float(s.quantile(int(stat[1:]) / 100))
    return round(v, 4) if math.isfinite(v) else None


def _cpu_share(df: pd.DataFrame) -> dict | None:
    if "cpu_share" not in df.columns:
        return None
    s = pd.to_numeric(df["cpu_share"], errors="coerce").dropna()
    if not len(s):
        return None
    med = float(s.median())
    return {"median": round(med, 4), "min": round(float(s.min()), 4), "n": int(len(s)),
            "threshold": CONTENTION_SHARE, "contended": med < CONTENTION_SHARE,
            "note": contention_note([float(x) for x in s]) or None}


def build_summary(records: Iterable[dict], settings: dict | None = None,
                  source: str = "") -> dict:
    """The summary of one run's records (an iterable: streamed, the decode-step lists are not
    kept). `settings`: what the caller was asked to run (its options), stored as given."""
    fields = _RunFields()
    df = analysis.to_frame(_stream(records, fields), source=source)
    env = fields.pick(ENV_KEYS)
    env["host"] = {"platform": platform.platform(), "machine": platform.machine(),
                   "cpu_count": os.cpu_count()}
    share = _cpu_share(df)
    if share is not None:
        env["cpu_share"] = share
    notes = [n for n in (analysis.duplicates_note(df), (share or {}).get("note")) if n]
    extra: dict[str, Any] = {}
    shapes = shape_statistics(df)
    if shapes:
        extra["shapes"] = shapes
    if len(fields.settings) > 1:  # an --append of other settings: also each run on its own
        notes.append(f"The file holds {len(fields.settings)} runs with different settings; the"
                     " per-mode statistics pool them, `runs` gives each on its own.")
        df = df.assign(_settings=fields.digests)
        extra["runs"] = [{"settings": fields.settings[dg],
                          "modes": mode_statistics(df[df["_settings"] == dg])}
                         for dg in fields.settings]
    return _clean({
        "summary_version": SUMMARY_VERSION,
        "source": source or None,
        "written_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "records": int(len(df)),
        "run_ids": fields.run_ids,
        "started_at": min(fields.started) if fields.started else None,
        "settings": {**({"requested": settings} if settings else {}),
                     **fields.pick(RUN_SETTING_KEYS),
                     "run_settings": list(fields.settings.values())},
        "environment": env,
        "modes": mode_statistics(df),
        **extra,
        "notes": notes,
    })


def write_text(path: str, text: str) -> str:
    """Write `text` via a temporary file and a rename: a reader never sees half a file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def write_json(path: str, obj: dict) -> str:
    """`obj` as strict JSON (NaN as null), written whole (write_text)."""
    return write_text(path, json.dumps(_clean(obj), indent=1, ensure_ascii=False,
                                       allow_nan=False) + "\n")


def write_summary(jsonl: str | os.PathLike, settings: dict | None = None) -> str | None:
    """Read `jsonl` back and write its summary beside it; the summary's path, or None when the
    file holds no record (a run stopped before its first one)."""
    jsonl = os.fspath(jsonl)
    if not os.path.exists(jsonl) or os.path.getsize(jsonl) == 0:
        return None
    summary = build_summary(iter_jsonl(jsonl, skip_bad_lines=True), settings,
                            source=os.path.basename(jsonl))
    if not summary["records"]:
        return None
    return write_json(summary_path(jsonl), summary)


# --- the HTML page -----------------------------------------------------------------------------

_STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
.note{background:#fff6e0;border-left:4px solid #e0a000;padding:6px 10px;margin:6px 0}
.small{color:#666;font-size:12px}
"""


def esc(v: Any) -> str:
    """A value as page text, HTML-escaped (quotes too)."""
    if isinstance(v, float):
        v = "" if not math.isfinite(v) else f"{v:.4g}" if abs(v) < 1e-3 and v else round(v, 3)
    elif isinstance(v, (list, tuple)):
        v = ", ".join(map(str, v))
    elif isinstance(v, dict):
        v = json.dumps(v, ensure_ascii=False, default=str)
    return html.escape("" if v is None else str(v), quote=True)


def table_html(df: pd.DataFrame, align_numbers: bool = True) -> str:
    """A DataFrame as an escaped HTML table (numbers right-aligned unless not `align_numbers`:
    a key-value table reads better aligned left)."""
    head = "".join(f"<th>{esc(c)}</th>" for c in df.columns)
    rows = []
    for row in df.itertuples(index=False):
        cells = []
        for v in row:
            num = align_numbers and isinstance(v, (int, float)) and not isinstance(v, bool)
            cells.append(f"<td{' class=num' if num else ''}>{esc(v)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _kv_table(per_source: dict[str, dict]) -> str:
    """Run metadata: one column per file, one row per key."""
    keys: list[str] = []
    for meta in per_source.values():
        keys += [k for k in meta if k not in keys]
    rows = [{"": k, **{src: meta.get(k) for src, meta in per_source.items()}} for k in keys]
    return table_html(pd.DataFrame(rows, columns=["", *per_source]), align_numbers=False)


def run_metadata(summary: dict) -> dict:
    """The flat key -> value rows of one file's metadata table (from build_summary)."""
    env = dict(summary.get("environment") or {})
    host = env.pop("host", {}) or {}
    share = env.pop("cpu_share", None)
    settings = dict(summary.get("settings") or {})
    run_settings = settings.pop("run_settings", [])
    settings.pop("requested", None)
    meta = {"records": summary.get("records"), "started at": summary.get("started_at"),
            "run ids": summary.get("run_ids"), **env, **settings}
    if share:
        meta["cpu_share (median)"] = share.get("median")
    if len(run_settings) == 1:
        meta.update({f"settings.{k}": v for k, v in run_settings[0].items()})
    elif run_settings:
        meta["settings"] = f"{len(run_settings)} different settings (shown apart below)"
    meta["host"] = f"{host.get('platform')} ({host.get('cpu_count')} CPUs)" if host else None
    return meta


def _stage_table(stats: dict[str, dict]) -> pd.DataFrame:
    rows = []
    for mode, per in stats.items():
        row = {"mode": mode}
        row.update({analysis.label(f): v for f, v in per.get("stage_medians_ms", {}).items()})
        rows.append(row)
    return pd.DataFrame(rows)


def _stats_table(stats: dict[str, dict]) -> pd.DataFrame:
    rows = []
    for mode, per in stats.items():
        row: dict[str, Any] = {"mode": mode, "count": per["count"]}
        for m in SUMMARY_METRICS:
            for st in SUMMARY_STATS:
                row[analysis.column(m, st)] = (per.get(m) or {}).get(st)
        if "accuracy" in per:
            row["accuracy"] = per["accuracy"]
        rows.append(row)
    return pd.DataFrame(rows)


def html_report(summaries: dict[str, dict], figs: list, notes: Iterable[str] = (),
                ratio_lines: Iterable[str] = (), title: str = "C2C timing report") -> str:
    """One self-contained page: notes, run metadata per file, per file and mode the
    statistics and stage medians, the mode ratios, then the charts (plotly's JS inline once)."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>"
             f"<style>{_STYLE}</style></head><body><h1>{esc(title)}</h1>",
             f"<p class=small>Written {esc(_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds'))}"
             f" from {esc(', '.join(summaries))}.</p>"]
    parts += [f"<div class=note>{esc(n)}</div>" for n in notes]
    parts.append("<h2>Run metadata</h2>")
    parts.append(_kv_table({src: run_metadata(s) for src, s in summaries.items()}))
    for src, s in summaries.items():
        stats = s.get("modes") or {}
        parts.append(f"<h2>Statistics per mode: {esc(src)}</h2>")
        parts.append(table_html(_stats_table(stats)) if stats else "<p>No records.</p>")
        if any(per.get("stage_medians_ms") for per in stats.values()):
            parts.append("<p class=small>Stage medians (ms)</p>" + table_html(_stage_table(stats)))
        if s.get("shapes"):
            parts.append("<p class=small>Per shape (medians)</p>"
                         + table_html(pd.DataFrame(s["shapes"])))
        parts += [f"<div class=note>{esc(n)}</div>" for n in s.get("notes") or []]
    lines = list(ratio_lines)
    if lines:
        parts.append("<h2>Modes compared</h2><ul>"
                     + "".join(f"<li>{esc(line)}</li>" for line in lines) + "</ul>")
    if figs:
        parts.append("<h2>Charts</h2>")
        for i, fig in enumerate(figs):
            # plotly serializes the figure's text as JSON with "<" escaped (no "</script>")
            parts.append(fig.to_html(full_html=False, include_plotlyjs=i == 0))
    parts.append("</body></html>")
    return "\n".join(parts)
