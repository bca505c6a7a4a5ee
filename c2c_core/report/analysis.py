"""Records → DataFrames → summaries and comparisons (pure: pandas only, no I/O).

Accepts current records and the original scripts' legacy variants (SPEC.md): `normalize` maps
them onto the current shape, and everything downstream reads only that shape.

Kept as one module (over 500 lines) on purpose: every table (summary, compare, sweep, batch)
reads the same normalised frame and the one FIELDS table.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import pandas as pd

from ..io.records import (CONTENTION_SHARE, EXT_TIMING_FIELDS, MODES, SEED_TIMING_FIELDS,
    SETTINGS_KEYS, STAGE_FIELDS, TIMING, parse_sweep_id, percentile, settings_digest, settings_of,
    show_value)

TIMING_FIELDS = SEED_TIMING_FIELDS + EXT_TIMING_FIELDS

#: Raw key → (display name, unit): the one table every summary column and axis title uses.
#: The record's timing fields come from records.TIMING; the rest are columns made here.
FIELDS: dict[str, tuple[str, str]] = {
    **{k: (f.label, f.unit) for k, f in TIMING.items()},
    "ttft_other_ms": ("other before first token", "ms"),
    "prompt_chars": ("prompt length", "chars"),
    "response_chars": ("response length", "chars"),
    "n_steps": ("decode steps", "steps"),
    "step": ("decode step", "#"),
    "ms": ("step time", "ms"),
}

#: Stages up to the first token, in run order (every stage but decode); the last is the
#: remainder of `ttft_ms`.
TTFT_STAGES = [f for f in STAGE_FIELDS if f != "decode_total_ms"] + ["ttft_other_ms"]
#: Stages that add up to `e2e_ms` (records.STAGE_FIELDS, a batch row's wait, other_ms), in run
#: order.
E2E_STAGES = TTFT_STAGES[:-1] + ["decode_total_ms", "batch_wait_ms", "other_ms"]

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
    # how close to the limit (null, so NaN, on a CPU or without NVML)
    ("decode_floor_ratio", ("p50",)),
    ("joules_per_token", ("p50",)),
]
#: Summary metrics shown only when some record in the table has them (null on a CPU).
_WHEN_KNOWN = {"decode_floor_ratio", "joules_per_token"}
#: C2C against each baseline (docs/numbers.md): receiver = the cost of fusion over
#: the small model alone; t2t = cache vs text hand-over; sharer = against the large model alone.
_RATIO_PAIRS = {"c2c_over_t2t": ("c2c", "t2t"), "c2c_over_receiver": ("c2c", "receiver"),
                "c2c_over_sharer": ("c2c", "sharer")}
RATIO_METRICS = ("ttft_ms", "e2e_ms", "decode_avg_ms")
_KEYS = ["source", "id", "mode", "repeat"]
_ACCEPTED = set(TIMING_FIELDS) | {"num_decode_steps"}


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


def sweep_input_lens(ids: pd.Series) -> pd.Series:
    """The prompt length N of each length-sweep record id ('in<N>-out<M>', records.sweep_id);
    NaN where an id is not a sweep id."""
    return pd.to_numeric(ids.map(lambda x: getattr(parse_sweep_id(x), "input_len", None)),
                         errors="coerce")


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


#: From this many decode steps on, a record's steps are handled with numpy.
_LONG_STEPS = 4096


def _is_array(v: Any) -> bool:
    return type(v).__name__ == "ndarray"


def _steps(rec: dict, timing: dict) -> list[float] | None:
    """Decode step times in ms from whichever field the record has; None if it has none (a
    float array as read with a decoded-size budget, records.iter_jsonl)."""
    if _is_array(rec.get("decode_step_times_ms")):
        return rec["decode_step_times_ms"]
    if isinstance(rec.get("decode_step_times_ms"), list):
        vals = rec["decode_step_times_ms"]
        if len(vals) > _LONG_STEPS and set(map(type, vals)) <= {float, int}:
            return vals  # plain numbers already (bools, None and text need _num)
        return [_num(v) for v in vals]
    if isinstance(rec.get("timing_breakdown_ms"), list):
        return [_num(v) for v in rec["timing_breakdown_ms"]]
    if isinstance(timing.get("decode_steps"), list):  # seconds
        return [_num(v) * 1000.0 for v in timing["decode_steps"]]
    return None


def normalize(rec: dict, index: int) -> dict:
    """Map a current or legacy record onto the current shape (see module docstring).

    Missing `id` → `index + 1` (its place in the file, from 1), missing `mode` → "c2c"; legacy step lists become
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
    compact = steps is not None and (len(steps) > _LONG_STEPS or _is_array(steps))
    if compact:
        # a long generation (a million steps): the same numbers from numpy, in C, kept as
        # one float array (8 bytes a step; a list of Python floats took 32)
        import numpy as np
        arr = np.asarray(steps, dtype=float)
        if np.isnan(arr).any():
            arr = arr[~np.isnan(arr)]
        clean = arr  # the record's own array when it had no NaN: no copy
        if len(arr):
            timing.setdefault("decode_total_ms", float(arr.sum()))
            timing.setdefault("decode_avg_ms", float(arr.mean()))
            wanted = [q for q in (50, 90, 99) if f"decode_p{q}_ms" not in timing]
            for q, v in zip(wanted, np.percentile(arr, wanted) if wanted else []):
                timing[f"decode_p{q}_ms"] = float(v)
    else:
        clean = [s for s in steps or [] if not math.isnan(s)]
    legacy_steps = timing.pop("num_decode_steps", None)
    if not isinstance(rec.get("run"), dict):
        n = len(clean) if steps is not None else _num(
            legacy_steps if legacy_steps is not None else timing.get("num_generated_tokens"))
        if n > 0:
            timing["num_generated_tokens"] = int(n) + 1

    if compact and not len(clean):
        timing.setdefault("decode_total_ms", 0.0)
        timing.setdefault("decode_avg_ms", 0.0)
    elif steps is not None and not compact:
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
        "id": rec["id"] if rec.get("id") is not None else index + 1,  # numbered from 1
        "input_digest": rec["input_digest"] if isinstance(rec.get("input_digest"), str) else None,
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
        "truncated": _bool(rec.get("truncated")),
        "prompt_chars": chars["prompt"],
        "response_chars": chars["response"],
    }


# --- frames -------------------------------------------------------------------------------

def _row(n: dict, source: str) -> dict:
    t = n["timing"]
    row: dict[str, Any] = {"source": source, "id": str(n["id"]), "mode": n["mode"],
                           "repeat": n["repeat"], "prompt": n["prompt"],
                           "input_digest": n["input_digest"]}
    row.update({k: _num(t.get(k)) for k in TIMING_FIELDS})
    row.update({k: _num(v) for k, v in t.items() if k not in row})
    ttft = row["ttft_ms"]
    before = sum(row[k] for k in TTFT_STAGES[:-1] if not math.isnan(row[k]))
    row["ttft_other_ms"] = max(ttft - before, 0.0) if not math.isnan(ttft) else math.nan
    row["prompt_chars"] = _num(n["prompt_chars"])
    row["response_chars"] = _num(n["response_chars"])
    row["correct"] = n["correct"]
    row["truncated"] = n["truncated"]
    row["device"] = n["run"].get("device")  # report groups by it when runs used several
    tokens = row["num_generated_tokens"]
    steps = len(n["decode_step_times_ms"])
    row["n_steps"] = steps if steps or math.isnan(tokens) else max(int(tokens) - 1, 0)
    return row


def to_frame(records: Iterable[dict], source: str = "") -> pd.DataFrame:
    """One row per record: keys, prompt, every timing field (NaN if missing), correct, n_steps."""
    rows = [_row(normalize(r, i), source) for i, r in enumerate(records)]
    base = ["source", "id", "mode", "repeat", "prompt", "input_digest", *TIMING_FIELDS,
            "ttft_other_ms",
            "prompt_chars", "response_chars", "correct", "n_steps", "truncated"]
    df = pd.DataFrame(rows, columns=list(dict.fromkeys(base + [k for r in rows for k in r])))
    df["correct"] = df["correct"].astype("boolean")
    df["truncated"] = df["truncated"].astype("boolean")
    df["repeat"] = df["repeat"].astype("int64")
    df["n_steps"] = df["n_steps"].astype("int64")
    return df


def duplicates(df: pd.DataFrame) -> pd.DataFrame:
    """The rows whose (source, id, mode, repeat) occurs more than once for the same input
    (input digest): one generation recorded twice (e.g. two runs appended into one file, or a
    file given twice)."""
    keys = [k for k in _KEYS if k in df.columns]
    if df.empty or not keys:
        return df.head(0)
    if "input_digest" in df.columns and "id" in keys:  # other prompts under one id (a resume
        #                                               of another prompt file) are no copies
        what = df["input_digest"].where(df["input_digest"].notna(), "id:" + df["id"].astype(str))
        return df[df.assign(_what=what).duplicated([*keys, "_what"], keep=False)]
    return df[df.duplicated(keys, keep=False)]


def duplicates_note(df: pd.DataFrame) -> str:
    """One sentence naming duplicate (id, mode, repeat) records, or '' when there are none."""
    dup = duplicates(df)
    if dup.empty:
        return ""
    keys = [k for k in _KEYS if k in dup.columns]
    groups = dup.groupby(keys, sort=False, dropna=False).size()
    shown = []
    for key, count in list(groups.items())[:3]:
        k = dict(zip(keys, key if isinstance(key, tuple) else (key,)))
        where = f"{k['source']}: " if k.get("source") else ""
        shown.append(f"{where}id {k.get('id')} {k.get('mode')} repeat {k.get('repeat')} x{count}")
    more = " …" if len(groups) > 3 else ""
    return (f"{len(groups)} (id, mode, repeat) key(s) occur more than once ({'; '.join(shown)}"
            f"{more}); each copy counts in the statistics, so remove the repeated lines (or"
            " rerun into a new file) for a fair summary.")


def steps_frame(records: Iterable[dict], source: str = "") -> pd.DataFrame:
    """Long form of the decode steps: source, id, mode, repeat, step (1-based), ms."""
    import numpy as np
    parts = []
    for i, r in enumerate(records):
        n = normalize(r, i)
        ms = np.asarray(n["decode_step_times_ms"], dtype=float)
        if not len(ms):
            continue
        # one frame per record, built from arrays: a record may hold a million steps
        parts.append(pd.DataFrame({"source": source, "id": str(n["id"]), "mode": n["mode"],
                                   "repeat": n["repeat"], "step": np.arange(1, len(ms) + 1),
                                   "ms": ms}))
    if not parts:
        return pd.DataFrame(columns=_KEYS + ["step", "ms"])
    return pd.concat(parts, ignore_index=True)[_KEYS + ["step", "ms"]]


def step_runs(records: Iterable[dict], source: str = "") -> list[tuple[tuple, Any]]:
    """Each record's decode steps, compact: ((source, id, mode, repeat), float array of ms),
    step i being the array's (i+1)-th value. 8 bytes a step and no per-step rows (a steps
    frame repeats four keys on every one of millions of rows); plots.decode_steps_fig draws
    them."""
    import numpy as np
    out = []
    for i, r in enumerate(records):
        n = normalize(r, i)
        ms = n["decode_step_times_ms"]
        if len(ms):
            out.append(((source, str(n["id"]), n["mode"], n["repeat"]),
                        ms if _is_array(ms) else np.asarray(ms, dtype=float)))
    return out


# --- summaries ----------------------------------------------------------------------------

def _stat(s: pd.Series, stat: str) -> float:
    s = s.dropna()
    if s.empty:
        return math.nan
    return float(s.mean() if stat == "mean" else s.quantile(int(stat[1:]) / 100))


def _round(key: str, x: float) -> float:
    unit = FIELDS.get(key, ("", ""))[1]
    return round(x, 1 if unit == "tok/s" else 4 if unit == "J/token" else 2)


# --- preparation a record paid for (timing.late_prepare_ms) ---------------------------------

#: How the CLI's report and compare count such records anyway (late_note's default remedy).
INCLUDE_LATE = "--include_late counts them"


def paid_late(df: pd.DataFrame) -> pd.Series:
    """True for the rows whose generation paid for preparing a shape inside its own clock
    (timing.late_prepare_ms > 0: a compile, capture or cache allocation in its TTFT and E2E)."""
    if "late_prepare_ms" not in df.columns:
        return pd.Series(False, index=df.index)
    return pd.to_numeric(df["late_prepare_ms"], errors="coerce").fillna(0) > 0


def without_late(df: pd.DataFrame, include: bool = False,
                 fix: str = INCLUDE_LATE) -> tuple[pd.DataFrame, str]:
    """`df` without the records that paid for late preparation (all of it when `include`), and
    one sentence saying how many there are and what was done with them ('' when none)."""
    late = paid_late(df)
    n = int(late.sum())
    if not n:
        return df, ""
    what = (f"{n} record(s) paid for late preparation (timing.late_prepare_ms > 0: a shape"
            " prepared inside their own clock)")
    if include:
        return df, f"{what} and are counted in the medians."
    return df[~late], f"{what} and are left out of the medians; {fix}."


def summarize(df: pd.DataFrame, by: Iterable[str] = ("source", "mode"),
              include_late: bool = False) -> pd.DataFrame:
    """Per group: count, TTFT / E2E / decode ms/token / tok/s statistics, accuracy, n_scored.
    Records that paid for late preparation are left out unless `include_late`; the table's
    attrs["late_note"] says how many (without_late)."""
    df, late_note = without_late(df, include_late)
    keys = [k for k in by if k in df.columns]
    stat_cols = [column(m, s) for m, stats in _SUMMARY_STATS for s in stats]
    # the numbers people look for first lead (visible without scrolling sideways), then the rest
    lead = [column("decode_avg_ms", "p50"), column("ttft_ms", "p50"), "accuracy"]
    cols = keys + ["count"] + lead + [c for c in stat_cols if c not in lead] + ["n_scored"]
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
    out = pd.DataFrame(rows, columns=cols)
    # the limit columns only where some record knows them (a GPU in the table, NVML)
    unknown = [column(m, s) for m, stats in _SUMMARY_STATS if m in _WHEN_KNOWN for s in stats
               if out[column(m, s)].isna().all()]
    out = out.drop(columns=unknown)
    out.attrs["late_note"] = late_note
    return out


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


#: How each mode ratio was computed (its "stat"), in words for the CLI, the app and the JSON.
RATIO_STATS = {
    "median of per-pair ratios": "median of the per-prompt ratios, n={n} pair(s) matched by id"
                                 " and repeat",
    "ratio of medians": "ratio of the medians of all records, at least {n} per mode: no prompt"
                        " ran in both modes, so none pair",
}


def ratio_words(r: dict) -> str:
    """What a mode ratio (compare_modes) is, in words: "median of the per-prompt ratios, n=2
    pair(s) matched by id and repeat" or, when nothing paired, the ratio of medians."""
    stat = r.get("stat") or ("median of per-pair ratios" if r.get("paired") else "ratio of medians")
    return RATIO_STATS.get(stat, stat).format(n=r.get("n"))


def _ratio(df: pd.DataFrame, a: str, b: str) -> dict:
    """Mode a over mode b per metric: the median of the per-pair ratios a/b, a pair being the
    same (id, repeat) in both modes, as `compare` pairs records (a key met twice counts once,
    at its median). With several files a prompt pairs only within its own file (never one
    machine's c2c with another's receiver). When nothing pairs: the ratio of the medians of all
    records, marked `paired` False. `n` is the number of pairs (unpaired: the smaller record
    count); `stat` names the statistic."""
    metrics = [m for m in RATIO_METRICS if m in df.columns]
    keys = (["source"] if "source" in df.columns else []) + ["id", "repeat"]
    d = df.assign(id=df["id"].astype(str))
    per_key = d.groupby(["mode", *keys])[metrics].median()  # a key met twice: its median
    va, vb = per_key.loc[a], per_key.loc[b]
    common = va.index.intersection(vb.index)
    paired = len(common) > 0
    out: dict[str, Any] = {}
    for m in RATIO_METRICS:
        if m not in metrics:
            out[m] = math.nan
            continue
        if paired:
            both = pd.concat([va.loc[common, m], vb.loc[common, m]], axis=1).dropna()
            both = both[both.iloc[:, 1] > 0]
            r = (both.iloc[:, 0] / both.iloc[:, 1]).median() if len(both) else math.nan
        else:
            ma, mb = d.loc[d["mode"] == a, m].median(), d.loc[d["mode"] == b, m].median()
            r = ma / mb if mb and not math.isnan(mb) else math.nan
        out[m] = round(float(r), 3) if not math.isnan(r) else math.nan
    out["n"] = len(common) if paired else int(min((d["mode"] == a).sum(), (d["mode"] == b).sum()))
    out["paired"] = paired
    out["stat"] = "median of per-pair ratios" if paired else "ratio of medians"
    return out


def devices(df: pd.DataFrame) -> list[str]:
    """The distinct `run.device` values of the records (none for legacy files)."""
    if "device" not in df.columns:
        return []
    return [str(d) for d in dict.fromkeys(df["device"].dropna())]


def compare_modes(df: pd.DataFrame, include_late: bool = False) -> tuple[pd.DataFrame, dict]:
    """Summary per mode, and the ratios c2c over t2t / receiver / sharer: the median of the
    per-prompt ratios, paired by (id, repeat) (`_ratio`). Records that paid for late
    preparation are left out of both unless `include_late` (the table's attrs["late_note"]).

    When the records come from several devices (a multi-GPU or multi-node run), the table has
    one row per (device, mode) and each ratio is also given per device ("... on <device>").
    When a `run` column names several runs (a file holding runs of other settings, split by
    split_runs), the same holds per run ("... in <run>")."""
    df, late_note = without_late(df, include_late)
    table, ratios = _compare_modes(df)
    table.attrs["late_note"] = late_note
    return table, ratios


def _compare_modes(df: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    if df.empty or "mode" not in df.columns:
        return summarize(df, by=["mode"], include_late=True), {}
    order = ordered_modes(df["mode"])
    table = summarize(df, by=["mode"], include_late=True).set_index("mode").loc[order].reset_index()
    ratios = {k: _ratio(df, a, b) for k, (a, b) in _RATIO_PAIRS.items()
              if a in order and b in order}
    runs = [r for r in dict.fromkeys(df["run"]) if isinstance(r, str)] if "run" in df.columns else []
    col, groups, word = ("run", runs, "in") if len(runs) > 1 else ("device", devices(df), "on")
    if len(groups) > 1:
        parts = []
        for d in groups:
            g = df[df[col] == d]
            t = summarize(g, by=["mode"], include_late=True)
            t = t.set_index("mode").loc[ordered_modes(g["mode"])].reset_index()
            parts.append(t.assign(**{col: d}))
            gm = set(g["mode"])
            ratios.update({f"{k} {word} {d}": _ratio(g, a, b) for k, (a, b) in _RATIO_PAIRS.items()
                           if a in gm and b in gm})
        table = pd.concat(parts, ignore_index=True)
        table = table[[col] + [c for c in table.columns if c != col]]
    return table, ratios


def _series(df: pd.DataFrame, m: str) -> pd.Series:
    if m not in df.columns:
        return pd.Series(dtype=float)
    return pd.to_numeric(df[m], errors="coerce").dropna()


PAIR_KEYS = ["id", "mode", "repeat"]
COMPARE_METRICS = ("ttft_ms", "e2e_ms", "decode_avg_ms", "tokens_per_second")


def pair_on(df_a: pd.DataFrame, df_b: pd.DataFrame) -> str:
    """What pairs the records of two runs: "input_digest" (what each generation read) when
    every record of both carries one, else "id" (files written before digests existed)."""
    def full(df: pd.DataFrame) -> bool:
        return "input_digest" in df.columns and len(df) > 0 and df["input_digest"].notna().all()
    return "input_digest" if full(df_a) and full(df_b) else "id"


def prompt_mismatch(df_a: pd.DataFrame, df_b: pd.DataFrame) -> tuple[int, int]:
    """(ids that ran different prompts in A and B, ids the two share): a prompt id of one file
    naming another prompt in the other (row positions of other inputs). Prompts are told apart
    by input digest, or by text for records without one."""
    def prompts(df: pd.DataFrame) -> dict[str, set]:
        key = df["input_digest"].where(df["input_digest"].notna(), "text:" + df["prompt"]) \
            if "input_digest" in df.columns else "text:" + df["prompt"]
        out: dict[str, set] = {}
        for i, k in zip(df["id"].astype(str), key):
            out.setdefault(i, set()).add(k)
        return out
    pa, pb = prompts(df_a), prompts(df_b)
    shared = set(pa) & set(pb)
    return sum(1 for i in shared if pa[i] != pb[i]), len(shared)


def median_cpu_share(df: pd.DataFrame) -> float | None:
    """The median timing.cpu_share of a run's CPU records (None when none has one)."""
    s = _series(df, "cpu_share")
    return float(s.median()) if len(s) else None


def contended(df: pd.DataFrame) -> float | None:
    """The median cpu_share when it is below records.CONTENTION_SHARE (the run competed for
    its cores, so its CPU times are inflated), else None."""
    m = median_cpu_share(df)
    return m if m is not None and m < CONTENTION_SHARE else None


#: The verdict of every metric when either run competed for its CPU cores.
CONTENDED = "inconclusive: CPU contention"


def contention_reason(shares: dict[str, float | None]) -> str:
    """Why a comparison is inconclusive ('' when no run is contended): `shares` maps each
    run's name to its contended median cpu_share (None: not contended)."""
    bad = {k: v for k, v in shares.items() if v is not None}
    if not bad:
        return ""
    said = "; ".join(f"{k} got a median {v:.0%} of its CPU threads' time (cpu_share {v:.2f})"
                     for k, v in bad.items())
    return (f"{CONTENDED}: {said}, below {CONTENTION_SHARE}, so its CPU times are inflated by"
            " another program and a change cannot be told from the contention; rerun on an"
            " idle machine.")


def mark_contended(table: pd.DataFrame) -> pd.DataFrame:
    """A compare_runs table whose every verdict is CONTENDED and nothing judged (regression
    None), for runs whose CPU times another program inflated."""
    out = table.copy()
    out["verdict"] = CONTENDED
    out["beyond_noise"] = pd.Series([None] * len(out), index=out.index, dtype=object)
    out["regression"] = pd.Series([None] * len(out), index=out.index, dtype=object)
    return out


def pair_frame(df_a: pd.DataFrame, df_b: pd.DataFrame, metric: str,
               on: str = "id") -> pd.DataFrame:
    """Records of A and B that share (`on`, mode, repeat) (`on`: "id" or "input_digest", see
    pair_on), with both values of `metric` and the ratio B/A per pair. A key met twice in one
    file (an appended re-run) counts once, at its median. Pairs with a missing value or A <= 0
    are left out."""
    keys = [on, "mode", "repeat"]
    cols = ["id", "mode", "repeat", "a", "b", "ratio"]
    if metric not in df_a.columns or metric not in df_b.columns:
        return pd.DataFrame(columns=cols)

    def per_key(df: pd.DataFrame) -> pd.Series:
        d = df.assign(id=df["id"].astype(str), _v=pd.to_numeric(df[metric], errors="coerce"))
        return d.dropna(subset=["_v"]).groupby(keys, sort=False)["_v"].median()

    both = pd.concat([per_key(df_a).rename("a"), per_key(df_b).rename("b")], axis=1,
                     join="inner")
    both = both[both["a"] > 0]
    out = both.reset_index()
    if on != "id":  # show the pair by A's id
        ids = df_a.assign(id=df_a["id"].astype(str)).drop_duplicates(keys).set_index(keys)["id"]
        out.insert(0, "id", [ids.get(tuple(k), "") for k in out[keys].itertuples(index=False)])
    out["ratio"] = out["b"] / out["a"]
    return out[cols]


def bootstrap_median_ci(x, level: float = 0.95, n_boot: int = 2000,
                        seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of the median of `x` (seeded: the same data
    give the same interval). NaNs for an empty `x`."""
    import numpy as np
    x = np.asarray(x, dtype=float)
    x = x[~np.isnan(x)]
    if x.size == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    meds = np.empty(n_boot)
    block = max(1, 2_000_000 // x.size)  # bounded memory for long files
    for i in range(0, n_boot, block):
        k = min(block, n_boot - i)
        meds[i:i + k] = np.median(x[rng.integers(0, x.size, size=(k, x.size))], axis=1)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(meds, [tail, 100 - tail])
    return float(lo), float(hi)


def compare_runs(df_a: pd.DataFrame, df_b: pd.DataFrame,
                 metrics: Iterable[str] = COMPARE_METRICS, threshold: float = 0.05,
                 min_pairs: int = 5, level: float = 0.95, seed: int = 0,
                 on: str | None = None) -> pd.DataFrame:
    """Run B against run A, per mode both hold and per metric, on paired records.

    Records pair by (input digest, mode, repeat) (`on`; default pair_on: by id for files
    without digests), so a prompt is only ever set against itself and prompts
    of very different lengths do not hide a change. The gate is the median of the per-pair
    ratios B/A with a seeded bootstrap confidence interval (`level`):
    `beyond_noise` when the interval excludes 1 and the median ratio differs from 1 by more than
    `threshold`; `regression` when it is also in the worse direction (higher for times, lower
    for tok/s). Fewer than `min_pairs` pairs give the verdict "too few pairs", and
    `beyond_noise` and `regression` None (not judged), never False.
    The medians of A and B are over the paired records only.
    """
    rows = []
    on = on or pair_on(df_a, df_b)
    modes_a = list(dict.fromkeys(df_a["mode"])) if "mode" in df_a.columns else []
    modes_b = set(df_b["mode"]) if "mode" in df_b.columns else set()
    for mode in [m for m in modes_a if m in modes_b]:
        da, db = df_a[df_a["mode"] == mode], df_b[df_b["mode"] == mode]
        for m in metrics:
            p = pair_frame(da, db, m, on)
            n = len(p)
            ratio = float(p["ratio"].median()) if n else math.nan
            lo, hi = bootstrap_median_ci(p["ratio"], level, seed=seed) if n else (math.nan,) * 2
            higher_better = m in HIGHER_IS_BETTER
            judged = n >= max(min_pairs, 1)
            beyond = bool(judged and (lo > 1 or hi < 1) and abs(ratio - 1) > threshold)
            worse = ratio < 1 if higher_better else ratio > 1
            if not judged:
                verdict = "too few pairs"
            elif not beyond:
                verdict = "within noise"
            else:
                verdict = "worse" if worse else "better"
            rows.append({
                "mode": mode, "field": m, "metric": label(m), "pairs": n,
                "median A": round(float(p["a"].median()), 3) if n else math.nan,
                "median B": round(float(p["b"].median()), 3) if n else math.nan,
                "ratio B/A": round(ratio, 4) if n else math.nan,
                "CI low": round(lo, 4) if n else math.nan,
                "CI high": round(hi, 4) if n else math.nan,
                "change %": round((ratio - 1) * 100, 1) if n else math.nan,
                # not judged: neither flag is False (that would read as "checked, fine")
                "verdict": verdict, "beyond_noise": beyond if judged else None,
                "regression": bool(beyond and worse) if judged else None,
            })
    cols = ["mode", "field", "metric", "pairs", "median A", "median B", "ratio B/A", "CI low",
            "CI high", "change %", "verdict", "beyond_noise", "regression"]
    out = pd.DataFrame(rows, columns=cols)
    for c in ("beyond_noise", "regression"):  # True / False / None: keep None, not NaN
        out[c] = out[c].astype(object)
    return out


def regressions(table: pd.DataFrame) -> pd.DataFrame:
    """The rows of a compare_runs table judged a regression (None, not judged, is not one)."""
    import numpy as np
    return table[table["regression"].map(lambda v: isinstance(v, (bool, np.bool_)) and bool(v))]


def has_timing(df: pd.DataFrame, metrics: Iterable[str] = COMPARE_METRICS) -> bool:
    """True when at least one record carries a value of one of `metrics`."""
    return any(_series(df, m).size for m in metrics)


def split_runs(name: str, records: list[dict]) -> list[tuple[str, list[dict]]]:
    """A file's records per run settings (`run.settings`): one (name, records) when they all
    share one, else one entry per settings, named by the settings that differ ("o.jsonl
    [dtype float32]"), so summaries never pool two settings (an --append of another run)."""
    groups: dict[Any, tuple[dict | None, list[dict]]] = {}
    for r in records:
        st = settings_of(r)
        groups.setdefault(None if st is None else settings_digest(st), (st, []))[1].append(r)
    if len(groups) < 2:
        return [(name, records)]
    known = [st for st, _ in groups.values() if st is not None]
    differ = [k for k in SETTINGS_KEYS if len({repr(st.get(k)) for st in known}) > 1]
    out = []
    for st, recs in groups.values():
        what = ("settings not recorded" if st is None else
                ", ".join(f"{k} {show_value(st.get(k))}" for k in differ))
        out.append((f"{name} [{what}]", recs))
    return out


#: `run` keys that say on what machine and with what settings a file was made.
MACHINE_KEYS = ("device", "cpu", "threads")
SETTING_KEYS = ("dtype", "torch", "transformers", "attn_implementation", "timing_method",
                "receiver", "sharer", "fuser_hash", "max_new_tokens", "ignore_eos", "do_sample")


def _run_values(records: list[dict], key: str) -> list[str]:
    vals = []
    for r in records:
        run = r.get("run") if isinstance(r, dict) else None
        if isinstance(run, dict) and key in run:
            vals.append(str(run[key]))
    return list(dict.fromkeys(vals))


def source_differences(sources: dict[str, list[dict]]) -> list[str]:
    """Sentences saying where files to be compared differ: the prompts they ran (ids and
    texts), the machine (`run` device, cpu, threads) and the settings (dtype, versions,
    models, lengths). Empty when they match or there is only one file."""
    if len(sources) < 2:
        return []
    notes = []
    prompts = {}
    for name, recs in sources.items():
        keys = set()
        for i, r in enumerate(recs):
            n = normalize(r, i)
            keys.add((str(n["id"]), n["prompt"]))
        prompts[name] = keys
    sets = list(prompts.values())
    if any(s != sets[0] for s in sets[1:]):
        common = set.intersection(*sets)
        union = set.union(*sets)
        notes.append(f"The files ran different prompts: {len(common)} of {len(union)} (id, prompt)"
                     " pairs are in every file; compare like with like (the pair table uses"
                     " only the shared ones).")
    for what, keys in (("machines", MACHINE_KEYS), ("settings", SETTING_KEYS)):
        diffs = []
        for k in keys:
            per = {name: _run_values(recs, k) for name, recs in sources.items()}
            known = {name: v for name, v in per.items() if v}
            if len({tuple(v) for v in known.values()}) > 1:
                diffs.append(f"{k} " + " vs ".join(f"{'/'.join(v)} ({name})"
                                                   for name, v in known.items()))
        if diffs:
            notes.append(f"The files ran on different {what}: " + "; ".join(diffs) + ".")
    return notes
