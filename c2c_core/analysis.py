"""Records → DataFrames → summaries and comparisons (pure: pandas only, no I/O).

Accepts current records and the original scripts' legacy variants (SPEC.md): `normalize` maps
them onto the current shape, and everything downstream reads only that shape.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import pandas as pd

from .records import EXT_TIMING_FIELDS, MODES, SEED_TIMING_FIELDS, STAGE_FIELDS, percentile

TIMING_FIELDS = SEED_TIMING_FIELDS + EXT_TIMING_FIELDS

#: Raw key → (display name, unit): the one table every summary column and axis title uses.
FIELDS: dict[str, tuple[str, str]] = {
    "alignment_ms": ("token alignment", "ms"),
    "base_embedding_ms": ("receiver embedding", "ms"),
    "base_prefill_ms": ("receiver prefill", "ms"),
    "teacher_embedding_ms": ("sharer embedding", "ms"),
    "teacher_prefill_ms": ("sharer prefill", "ms"),
    "sharer_decode_ms": ("sharer decode", "ms"),
    "projector_total_ms": ("projection", "ms"),
    "projector_avg_ms": ("projection per call", "ms"),
    "projector_calls": ("projector calls", "calls"),
    "decode_total_ms": ("decode total", "ms"),
    "decode_avg_ms": ("decode", "ms/token"),
    "decode_p50_ms": ("decode step p50", "ms"),
    "decode_p90_ms": ("decode step p90", "ms"),
    "decode_p99_ms": ("decode step p99", "ms"),
    "num_generated_tokens": ("generated", "tokens"),
    "tokens_per_second": ("decode", "tok/s"),
    "e2e_tokens_per_second": ("end-to-end", "tok/s"),
    "prompt_tokens": ("prompt length", "tokens"),
    "sharer_generated_tokens": ("sharer note", "tokens"),
    "ttft_ms": ("TTFT", "ms"),
    "e2e_ms": ("E2E", "ms"),
    "tpot_ms": ("TPOT", "ms/token"),
    "other_ms": ("other", "ms"),
    "ttft_other_ms": ("other before first token", "ms"),
    "peak_memory_mb": ("peak memory", "MB"),
    "prompt_chars": ("prompt length", "chars"),
    "response_chars": ("response length", "chars"),
    "n_steps": ("decode steps", "steps"),
    "step": ("decode step", "#"),
    "ms": ("step time", "ms"),
}

#: Stages up to the first token, in run order; the last is the remainder of `ttft_ms`.
TTFT_STAGES = ["alignment_ms", "base_embedding_ms", "teacher_embedding_ms", "teacher_prefill_ms",
               "sharer_decode_ms", "projector_total_ms", "base_prefill_ms", "ttft_other_ms"]
#: Stages that add up to `e2e_ms` (records.STAGE_FIELDS + other_ms), in run order.
E2E_STAGES = TTFT_STAGES[:-1] + ["decode_total_ms", "other_ms"]

#: Metrics where a higher value is better (all others: lower is better).
HIGHER_IS_BETTER = {"tokens_per_second", "e2e_tokens_per_second", "accuracy"}

#: Legacy flat names (top level, in `timing` or in a `timing_breakdown_ms` object) → ours.
LEGACY_NAMES = {
    "projector_ms": "projector_total_ms",
    "total_ms": "e2e_ms",
    "throughput_tokens_per_sec": "tokens_per_second",
}

# summarize(): metric → statistics reported
_SUMMARY_STATS = [
    ("ttft_ms", ("mean", "p50", "p90")),
    ("e2e_ms", ("mean", "p50", "p90")),
    ("decode_avg_ms", ("mean", "p50", "p90", "p99")),
    ("tokens_per_second", ("mean", "p50")),
]
_RATIO_PAIRS = {"c2c_over_t2t": ("c2c", "t2t"), "c2c_over_receiver": ("c2c", "receiver")}
_RATIO_METRICS = ("ttft_ms", "e2e_ms", "decode_avg_ms")
_KEYS = ["source", "id", "mode", "repeat"]
_ACCEPTED = set(TIMING_FIELDS) | {"num_decode_steps"}

assert set(E2E_STAGES) == set(STAGE_FIELDS) | {"other_ms"}, "stage lists out of sync"


# --- labels -------------------------------------------------------------------------------

def name(key: str) -> str:
    """Display name of a raw key, without unit ("TTFT")."""
    return FIELDS.get(key, (key, ""))[0]


def label(key: str) -> str:
    """Axis title of a raw key, with unit ("TTFT (ms)")."""
    n, unit = FIELDS.get(key, (key, ""))
    return f"{n} ({unit})" if unit else n


def column(key: str, stat: str) -> str:
    """Summary column name ("decode ms/token p50")."""
    n, unit = FIELDS.get(key, (key, ""))
    return " ".join(p for p in (n, unit, stat) if p)


# --- normalizing --------------------------------------------------------------------------

def _num(x: Any) -> float:
    """float(x); NaN for None, bools, and anything not a number."""
    if x is None or isinstance(x, bool):
        return math.nan
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def _bool(x: Any) -> bool | None:
    """A `correct` value as True/False, None when unscored or unreadable."""
    if isinstance(x, bool):
        return x
    if isinstance(x, (int, float)) and x in (0, 1):
        return bool(x)
    if isinstance(x, str) and x.strip().lower() in ("true", "false"):
        return x.strip().lower() == "true"
    return None


def _steps(rec: dict, timing: dict) -> list[float] | None:
    """Decode step times in ms from whichever field the record has; None if it has none."""
    if isinstance(rec.get("decode_step_times_ms"), list):
        return [_num(v) for v in rec["decode_step_times_ms"]]
    if isinstance(rec.get("timing_breakdown_ms"), list):
        return [_num(v) for v in rec["timing_breakdown_ms"]]
    if isinstance(timing.get("decode_steps"), list):  # seconds
        return [_num(v) * 1000.0 for v in timing["decode_steps"]]
    return None


def normalize(rec: dict, index: int) -> dict:
    """Map a current or legacy record onto the current shape (see module docstring).

    Missing `id` → `index`, missing `mode` → "c2c"; legacy step lists become
    `decode_step_times_ms`; decode totals, percentiles and tok/s are derived from the steps when
    absent. Records without `run` come from the seed's scripts, whose `num_generated_tokens`
    counted decode steps: it becomes tokens (steps + 1) as MEASURE.md defines it.
    """
    rec = rec if isinstance(rec, dict) else {}
    t_in = rec.get("timing") if isinstance(rec.get("timing"), dict) else {}
    breakdown = rec.get("timing_breakdown_ms")
    timing: dict[str, Any] = {}
    for src in (t_in, breakdown if isinstance(breakdown, dict) else {}, rec):
        for k, v in src.items():
            k = LEGACY_NAMES.get(k, k)
            numeric = isinstance(v, (int, float)) and not isinstance(v, bool)
            # extension fields in `timing` are kept; elsewhere only names we know
            if numeric and k not in timing and (k in _ACCEPTED or src is t_in):
                timing[k] = v

    steps = _steps(rec, t_in)
    clean = [s for s in steps or [] if not math.isnan(s)]
    legacy_steps = timing.pop("num_decode_steps", None)
    if not isinstance(rec.get("run"), dict):
        n = len(clean) if steps is not None else _num(
            legacy_steps if legacy_steps is not None else timing.get("num_generated_tokens"))
        if n > 0:
            timing["num_generated_tokens"] = int(n) + 1

    if steps is not None:
        timing.setdefault("decode_total_ms", sum(clean))
        timing.setdefault("decode_avg_ms", sum(clean) / len(clean) if clean else 0.0)
        if clean:
            for q in (50, 90, 99):
                timing.setdefault(f"decode_p{q}_ms", percentile(clean, q))
    avg = _num(timing.get("decode_avg_ms"))
    if "tokens_per_second" not in timing and not math.isnan(avg):
        timing["tokens_per_second"] = 1000.0 / avg if avg > 0 else 0.0
    calls = _num(timing.get("projector_calls"))
    if "projector_avg_ms" not in timing and calls > 0 and "projector_total_ms" in timing:
        timing["projector_avg_ms"] = timing["projector_total_ms"] / calls

    prompt = rec.get("prompt") or rec.get("question") or rec.get("text") or ""
    response = rec.get("response") or ""
    repeat = _num(rec.get("repeat"))
    model_config = rec.get("model_config") if isinstance(rec.get("model_config"), dict) else {
        k: rec[k] for k in ("base_model", "teacher_model") if k in rec}
    # legacy files stored text lengths in characters; otherwise measure the text
    chars = {k: rec.get(f"{k}_length") for k in ("prompt", "response")}
    chars = {k: len(str(text)) if chars[k] is None else chars[k]
             for k, text in (("prompt", prompt), ("response", response))}
    return {
        "id": rec["id"] if rec.get("id") is not None else index,
        "mode": rec.get("mode") or "c2c",
        "repeat": 0 if math.isnan(repeat) else int(repeat),
        "prompt": str(prompt),
        "response": str(response),
        "model_config": model_config,
        "timing": timing,
        "decode_step_times_ms": clean,
        "run": rec.get("run") if isinstance(rec.get("run"), dict) else {},
        "correct": _bool(rec.get("correct")),
        "answer": rec.get("answer"),
        "prompt_chars": chars["prompt"],
        "response_chars": chars["response"],
    }


# --- frames -------------------------------------------------------------------------------

def _row(n: dict, source: str) -> dict:
    t = n["timing"]
    row: dict[str, Any] = {"source": source, "id": str(n["id"]), "mode": n["mode"],
                           "repeat": n["repeat"], "prompt": n["prompt"]}
    row.update({k: _num(t.get(k)) for k in TIMING_FIELDS})
    row.update({k: _num(v) for k, v in t.items() if k not in row})
    ttft = row["ttft_ms"]
    before = sum(row[k] for k in TTFT_STAGES[:-1] if not math.isnan(row[k]))
    row["ttft_other_ms"] = max(ttft - before, 0.0) if not math.isnan(ttft) else math.nan
    row["prompt_chars"] = _num(n["prompt_chars"])
    row["response_chars"] = _num(n["response_chars"])
    row["correct"] = n["correct"]
    tokens = row["num_generated_tokens"]
    steps = len(n["decode_step_times_ms"])
    row["n_steps"] = steps if steps or math.isnan(tokens) else max(int(tokens) - 1, 0)
    return row


def to_frame(records: Iterable[dict], source: str = "") -> pd.DataFrame:
    """One row per record: keys, prompt, every timing field (NaN if missing), correct, n_steps."""
    rows = [_row(normalize(r, i), source) for i, r in enumerate(records)]
    base = ["source", "id", "mode", "repeat", "prompt", *TIMING_FIELDS, "ttft_other_ms",
            "prompt_chars", "response_chars", "correct", "n_steps"]
    df = pd.DataFrame(rows, columns=list(dict.fromkeys(base + [k for r in rows for k in r])))
    df["correct"] = df["correct"].astype("boolean")
    df["repeat"] = df["repeat"].astype("int64")
    df["n_steps"] = df["n_steps"].astype("int64")
    return df


def steps_frame(records: Iterable[dict], source: str = "") -> pd.DataFrame:
    """Long form of the decode steps: source, id, mode, repeat, step (1-based), ms."""
    rows = []
    for i, r in enumerate(records):
        n = normalize(r, i)
        rows += [(source, str(n["id"]), n["mode"], n["repeat"], j, ms)
                 for j, ms in enumerate(n["decode_step_times_ms"], start=1)]
    return pd.DataFrame(rows, columns=_KEYS + ["step", "ms"])


# --- summaries ----------------------------------------------------------------------------

def _stat(s: pd.Series, stat: str) -> float:
    s = s.dropna()
    if s.empty:
        return math.nan
    return float(s.mean() if stat == "mean" else s.quantile(int(stat[1:]) / 100))


def _round(key: str, x: float) -> float:
    return round(x, 1 if FIELDS.get(key, ("", ""))[1] == "tok/s" else 2)


def summarize(df: pd.DataFrame, by: Iterable[str] = ("source", "mode")) -> pd.DataFrame:
    """Per group: count, TTFT / E2E / decode ms/token / tok/s statistics, accuracy, n_scored."""
    keys = [k for k in by if k in df.columns]
    stat_cols = [column(m, s) for m, stats in _SUMMARY_STATS for s in stats]
    cols = keys + ["count"] + stat_cols + ["accuracy", "n_scored"]
    rows = []
    for key, g in (df.groupby(keys, sort=False, dropna=False) if keys else [((), df)]):
        if g.empty:
            continue
        row: dict[str, Any] = dict(zip(keys, key))
        row["count"] = len(g)
        for m, stats in _SUMMARY_STATS:
            for s in stats:
                row[column(m, s)] = (_round(m, _stat(g[m], s)) if m in g.columns else math.nan)
        scored = g["correct"].dropna() if "correct" in g.columns else pd.Series(dtype=float)
        row["accuracy"] = round(float(scored.astype(float).mean()), 3) if len(scored) else math.nan
        row["n_scored"] = len(scored)
        rows.append(row)
    return pd.DataFrame(rows, columns=cols)


def slowest(df: pd.DataFrame, n: int = 10, by: str = "decode_total_ms") -> pd.DataFrame:
    """The `n` rows with the largest `by` (NaN last), with their keys and main metrics."""
    cols = [c for c in dict.fromkeys(_KEYS + ["prompt", by, "ttft_ms", "e2e_ms", "decode_avg_ms",
                                              "n_steps"]) if c in df.columns]
    if by not in df.columns:
        return df.head(0)[cols]
    top = df.sort_values(by, ascending=False, na_position="last").head(n)
    return top[cols].reset_index(drop=True)


def ordered_modes(modes: Iterable[str]) -> list[str]:
    """The distinct modes, in MODES order first, then any others as met."""
    present = list(dict.fromkeys(modes))
    return [m for m in MODES if m in present] + [m for m in present if m not in MODES]


def _ratio(df: pd.DataFrame, a: str, b: str) -> dict:
    """Ratio of medians a/b per metric over the ids both modes ran (all rows when none)."""
    metrics = [m for m in _RATIO_METRICS if m in df.columns]
    per_id = df.groupby(["mode", "id"])[metrics].median()  # repeats collapse to their median
    va, vb = per_id.loc[a], per_id.loc[b]
    common = va.index.intersection(vb.index)
    paired = len(common) > 0
    if paired:
        va, vb = va.loc[common], vb.loc[common]
    out: dict[str, Any] = {}
    for m in _RATIO_METRICS:
        if m not in metrics:
            out[m] = math.nan
            continue
        both = pd.concat([va[m], vb[m]], axis=1).dropna() if paired else None
        ma = (both.iloc[:, 0] if paired else va[m]).median()
        mb = (both.iloc[:, 1] if paired else vb[m]).median()
        out[m] = round(float(ma / mb), 3) if mb and not math.isnan(mb) else math.nan
    out["n"] = len(common) if paired else min(len(va), len(vb))
    out["paired"] = paired
    return out


def compare_modes(df: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """Summary per mode, and ratios of medians (c2c over t2t / receiver), paired by id."""
    if df.empty or "mode" not in df.columns:
        return summarize(df, by=["mode"]), {}
    order = ordered_modes(df["mode"])
    table = summarize(df, by=["mode"]).set_index("mode").loc[order].reset_index()
    ratios = {k: _ratio(df, a, b) for k, (a, b) in _RATIO_PAIRS.items()
              if a in order and b in order}
    return table, ratios


def _series(df: pd.DataFrame, m: str) -> pd.Series:
    if m not in df.columns:
        return pd.Series(dtype=float)
    return pd.to_numeric(df[m], errors="coerce").dropna()


def compare_runs(df_a: pd.DataFrame, df_b: pd.DataFrame,
                 metrics: Iterable[str] = ("ttft_ms", "e2e_ms", "decode_avg_ms",
                                           "tokens_per_second"),
                 threshold: float = 0.05) -> pd.DataFrame:
    """Run B against run A, per metric: medians, change %, IQRs and two flags.

    `beyond_spread`: the medians differ by more than the larger IQR and by more than
    `threshold` (relative to A). `regression`: beyond spread and in the worse direction
    (higher for times, lower for tok/s and accuracy).
    """
    rows = []
    for m in metrics:
        a, b = _series(df_a, m), _series(df_b, m)
        med_a, med_b = a.median(), b.median()
        iqr_a = a.quantile(0.75) - a.quantile(0.25)
        iqr_b = b.quantile(0.75) - b.quantile(0.25)
        diff = med_b - med_a
        beyond = bool(abs(diff) > max(iqr_a, iqr_b) and abs(diff) > threshold * abs(med_a))
        worse = diff < 0 if m in HIGHER_IS_BETTER else diff > 0
        rows.append({
            "field": m, "metric": label(m),
            "median A": round(med_a, 3), "median B": round(med_b, 3),
            "change %": round(diff / med_a * 100, 1) if med_a else math.nan,
            "IQR A": round(iqr_a, 3), "IQR B": round(iqr_b, 3),
            "n A": len(a), "n B": len(b),
            "beyond_spread": beyond, "regression": bool(beyond and worse),
        })
    return pd.DataFrame(rows)
