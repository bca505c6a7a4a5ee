"""The one table `scripts/gpu_check.sh` ends with (issue 19 part 6): each figure of the issue's
table, its goal, ours (fast engine and eager) and the reference's, and whether the goal is met;
the same numbers go to <out>/gpu_check.json.

It only reads what the script's runs already wrote under <out> (so it runs, and is tested, on a
CPU with canned files):
- engines.json: the `engines` command's output; its last line starting with "{" is the JSON
  line (decode, TTFT and projection medians of both engines, batch B / batch 1 tokens/s, the
  decode floor ratios, compile_s);
- long-fast.jsonl, long-eager.jsonl: `sweep --input_lens 1024` records (TTFT at 1,024 tokens);
- compile_cache.json: `scripts/compile_cache_check.py`'s output (first and second process);
- engines-capture.json: the same `engines` run with C2C_FAST_STEP=capture (the decode step one
  CUDA graph of the step as it is, no compile): its decode, TTFT and warm-up seconds;
- fast-<preset>.jsonl, eager-<preset>.jsonl: `batch` records, used for the short-prompt figures
  only when engines.json is missing;
- reference.json (read only when a clone of thu-nics/C2C is at $C2C_REF or ../C2C): the
  reference's figures under the row keys below ({"decode_ms": 33.4, ...}), written by
  scripts/reference_timing.py.
A figure whose file is missing or failed shows "n/a" (null in the JSON), never a guess.

    python scripts/gpu_table.py [out_dir]        # default: $OUT or gpu_check_out
"""

from __future__ import annotations

import json
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESET = "qwen3-0.6b+qwen3-4b-base-dummy"
NA = "n/a"

#: key, figure, goal (op, value) or None. Goals are issue 19's ("What to build" 1 and 2).
ROWS = [
    ("decode_ms", "decode ms/token (batch 1)", ("<=", 1.0)),
    ("projection_ms", "projection ms (28 layers)", ("<=", 0.5)),
    ("ttft_ms", "TTFT ms, short prompt", ("<=", 15.0)),
    ("ttft_1024_ms", "TTFT ms, 1,024-token prompt", ("<=", 40.0)),
    ("compile_first_s", "compile + capture before the first result, first process (s)", None),
    ("compile_second_ratio", "second process's compile / first's", ("<=", 0.35)),
    ("batch_ratio", "batch B vs batch 1 tokens/s (x)", (">=", 40.0)),
    ("decode_floor_ratio", "decode over its floor (x)", None),
    # the other way to make the step one launch (C2C_FAST_STEP=capture): no compile at all
    ("capture_decode_ms", "decode ms/token (batch 1), step captured, not compiled", ("<=", 1.0)),
    ("capture_ttft_ms", "TTFT ms, short prompt, step captured", ("<=", 15.0)),
    ("capture_warmup_s", "warm-up s before the first result, step captured", None),
]


def _last_json_line(path: str) -> dict | None:
    """The last line of `path` that parses as a JSON object; None if there is none."""
    try:
        lines = open(path, encoding="utf-8", errors="replace").read().splitlines()
    except OSError:
        return None
    for ln in reversed(lines):
        ln = ln.strip()
        if ln.startswith("{"):
            try:
                obj = json.loads(ln)
            except ValueError:
                continue
            if isinstance(obj, dict):
                return obj
    return None


def _records(path: str) -> list[dict]:
    try:
        f = open(path, encoding="utf-8", errors="replace")
    except OSError:
        return []
    out = []
    with f:
        for ln in f:
            try:
                r = json.loads(ln)
            except ValueError:
                continue
            if isinstance(r, dict) and isinstance(r.get("timing"), dict):
                out.append(r)
    return out


def record_figures(path: str, mode: str = "c2c") -> dict:
    """Medians over `mode`'s records of a JSONL file: decode_ms, projection_ms, ttft_ms,
    prompt_tokens (empty when the file has none)."""
    ts = [r["timing"] for r in _records(path) if (r.get("mode") or "c2c") == mode]

    def med(k):
        xs = [t[k] for t in ts if isinstance(t.get(k), (int, float))]
        return statistics.median(xs) if xs else None
    if not ts:
        return {}
    return {"decode_ms": med("decode_avg_ms"), "projection_ms": med("projector_total_ms"),
            "ttft_ms": med("ttft_ms"), "prompt_tokens": med("prompt_tokens"), "n": len(ts)}


def find_reference(c2c_ref: str | None = None, root: str = ROOT) -> str | None:
    """The reference clone: $C2C_REF if it is a folder, else ../C2C beside the repository."""
    for d in (c2c_ref, os.path.join(os.path.dirname(root), "C2C")):
        if d and os.path.isdir(d):
            return d
    return None


def _num(v):
    return round(float(v), 3) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def met(value, goal) -> str:
    if goal is None or value is None:
        return NA
    op, g = goal
    return "yes" if (value <= g if op == "<=" else value >= g) else "no"


def build(out: str, reference_dir: str | None = None) -> dict:
    """The table as a dict: rows (key, figure, goal, fast, eager, reference, met) and the
    sources each number came from."""
    eng = _last_json_line(os.path.join(out, "engines.json")) or {}
    comp = _last_json_line(os.path.join(out, "compile_cache.json")) or {}
    ref = (_last_json_line(os.path.join(out, "reference.json")) or {}) if reference_dir else {}
    short = {e: record_figures(os.path.join(out, f"{e}-{PRESET}.jsonl")) for e in ("fast", "eager")}
    long = {e: record_figures(os.path.join(out, f"long-{e}.jsonl")) for e in ("fast", "eager")}
    sources = {}
    vals: dict[str, dict] = {k: {"fast": None, "eager": None} for k, _, _ in ROWS}
    for key, ekey in (("decode_ms", "decode_ms"), ("projection_ms", "projection_ms"),
                      ("ttft_ms", "ttft_ms")):
        for e in ("fast", "eager"):
            v = eng.get(f"{e}_{ekey}")
            src = "engines.json"
            if v is None and short[e].get(key) is not None:
                v, src = short[e][key], f"{e}-{PRESET}.jsonl (c2c)"
            vals[key][e] = _num(v)
            if v is not None:
                sources[f"{key}.{e}"] = src
    for e in ("fast", "eager"):
        vals["ttft_1024_ms"][e] = _num(long[e].get("ttft_ms"))
        if long[e]:
            sources[f"ttft_1024_ms.{e}"] = f"long-{e}.jsonl (c2c, {long[e]['n']} records)"
    if comp.get("first_s") is not None:
        vals["compile_first_s"]["fast"] = _num(comp["first_s"])
        sources["compile_first_s.fast"] = (f"compile_cache.json (cache {comp.get('first_state')},"
                                           " fresh C2C_CACHE)")
    elif eng.get("compile_s") is not None:
        vals["compile_first_s"]["fast"] = _num(eng["compile_s"])
        sources["compile_first_s.fast"] = f"engines.json (cache {eng.get('compile_cache')})"
    vals["compile_second_ratio"]["fast"] = _num(comp.get("ratio"))
    if comp.get("ratio") is not None:
        sources["compile_second_ratio.fast"] = (f"compile_cache.json (second {comp.get('second_s')}"
                                                f" s, cache {comp.get('second_state')})")
    batch = eng.get("batch")
    if batch is not None:
        vals["batch_ratio"]["fast"] = _num(eng.get(f"batch{batch}_over_batch1_tokens_per_second"))
    cap = _last_json_line(os.path.join(out, "engines-capture.json")) or {}
    for key, ckey in (("capture_decode_ms", "fast_decode_ms"), ("capture_ttft_ms", "fast_ttft_ms"),
                      ("capture_warmup_s", "compile_s")):
        vals[key]["fast"] = _num(cap.get(ckey))
        if cap.get(ckey) is not None:
            sources[f"{key}.fast"] = "engines-capture.json (C2C_FAST_STEP=capture)"
    vals["decode_floor_ratio"]["fast"] = _num(eng.get("fast_decode_floor_ratio"))
    vals["decode_floor_ratio"]["eager"] = _num(eng.get("eager_decode_floor_ratio"))
    ptoks = eng.get("prompt_tokens") or short["fast"].get("prompt_tokens")
    rows = []
    for key, figure, goal in ROWS:
        if key == "batch_ratio" and batch is not None:
            figure = f"batch {batch} vs batch 1 tokens/s (x)"
        if key == "ttft_ms" and ptoks:
            figure = f"TTFT ms, {int(ptoks)}-token prompt"
        rows.append({"key": key, "figure": figure,
                     "goal": f"{goal[0]} {goal[1]:g}" if goal else "none",
                     "fast": vals[key]["fast"], "eager": vals[key]["eager"],
                     "reference": _num(ref.get(key)), "met": met(vals[key]["fast"], goal)})
    return {"device": eng.get("device"), "dtype": eng.get("dtype"),
            "reference_clone": reference_dir, "rows": rows, "sources": sources}


def cell(v) -> str:
    """How a number is printed: exactly the JSON file's (rounded) value, or n/a."""
    return NA if v is None else str(v)


def render(table: dict) -> str:
    head = ["figure", "goal", "ours (fast)", "ours (eager)", "reference", "met"]
    body = [[r["figure"], r["goal"], cell(r["fast"]), cell(r["eager"]), cell(r["reference"]),
             r["met"]] for r in table["rows"]]
    w = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
    line = lambda xs: "| " + " | ".join(x.ljust(w[i]) for i, x in enumerate(xs)) + " |"  # noqa: E731
    out = [line(head), "|" + "|".join("-" * (n + 2) for n in w) + "|"] + [line(b) for b in body]
    ref = table["reference_clone"]
    out.append(f"reference: {ref} (figures from reference.json)" if ref else
               "reference: n/a (no clone of thu-nics/C2C at $C2C_REF or ../C2C)")
    out.append(f"device: {table['device'] or NA}, dtype {table['dtype'] or NA}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = argv[0] if argv else os.environ.get("OUT", "gpu_check_out")
    if not os.path.isdir(out):
        print(f"gpu_table: no folder {out} (run scripts/gpu_check.sh first).", file=sys.stderr)
        return 2
    table = build(out, find_reference(os.environ.get("C2C_REF")))
    print(render(table))
    with open(os.path.join(out, "gpu_check.json"), "w", encoding="utf-8") as f:
        json.dump(table, f, indent=1)
    print(f"(the same numbers: {os.path.join(out, 'gpu_check.json')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
