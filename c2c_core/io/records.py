"""The JSONL record schema: field names, writing (append + flush per record) and reading.

The seed's field names are a public contract (users' jq and pandas recipes read them): we add
fields, never rename. One record = one generation of one prompt (one mode, one repeat).

Kept as one module (over 500 lines) on purpose: the field table, check_record, the reader and
the writer are one contract; apart, a field could reach one and not the others.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from typing import IO, Any, Iterable, Iterator, NamedTuple

import numpy as np

from ..spec.config import MODES  # noqa: F401  (records.MODES for readers of the format)
from ..spec.errors import UserError

# --- field names ---------------------------------------------------------------------------

#: Top-level fields of the seed's format.
SEED_TOP_FIELDS = ["id", "prompt", "response", "model_config", "timing", "decode_step_times_ms"]


@dataclass(frozen=True)
class TimingField:
    """One `timing` field: how it is shown, and which timed stage (if any) it totals."""

    label: str                 # display name without the unit ("receiver prefill")
    unit: str                  # "ms", "tokens", "tok/s", ...
    stage: str | None = None   # the timer stage whose spans this field sums (c2c/<stage> ranges)
    run: int | None = None     # the stage's place in a c2c generation (charts stack them so)
    seed: bool = False         # part of the seed scripts' format (never renamed)


#: THE table of `timing` fields (MEASURE.md): name -> label, unit, stage. The seed's fields
#: first, in the seed's order, then ours. Every other list of timing fields, stage names or
#: field labels (the timer, the runner, the TSV stage table, the charts, the summaries) is
#: derived from it.
TIMING: dict[str, TimingField] = {
    # field: TimingField(label, unit[, stage, its place in the run], seed=...)
    "base_embedding_ms": TimingField("receiver embedding", "ms", "base_embedding", 2, seed=True),
    "base_prefill_ms": TimingField("receiver prefill", "ms", "base_prefill", 7, seed=True),
    "teacher_embedding_ms": TimingField("sharer embedding", "ms", "teacher_embedding", 3, seed=True),
    "teacher_prefill_ms": TimingField("sharer prefill", "ms", "teacher_prefill", 4, seed=True),
    # every projector call plus its write into the receiver cache
    "projector_total_ms": TimingField("projection", "ms", "projection", 6, seed=True),
    "projector_avg_ms": TimingField("projection per call", "ms", seed=True),
    "projector_calls": TimingField("projector calls", "calls", seed=True),
    # one receiver forward + sampling per new token after the first
    "decode_total_ms": TimingField("decode total", "ms", "decode", 8, seed=True),
    "decode_avg_ms": TimingField("decode", "ms/token", seed=True),
    # tokens produced, the first (from prefill) included
    "num_generated_tokens": TimingField("generated", "tokens", seed=True),
    # the seed's meaning: decode steps per second of decode time
    "tokens_per_second": TimingField("decode", "tok/s", seed=True),
    "prompt_tokens": TimingField("prompt length", "tokens"),
    "ttft_ms": TimingField("TTFT", "ms"),
    "e2e_ms": TimingField("E2E", "ms"),
    # e2e minus every stage and the batch wait: sampling, bookkeeping
    "other_ms": TimingField("other", "ms"),
    # batches (fast engine): from this row's last token to the batch's end, the steps the
    # batch still ran for other rows (0 at batch size 1, and for the batch's longest row)
    "batch_wait_ms": TimingField("waiting for the batch", "ms"),
    "tpot_ms": TimingField("TPOT", "ms/token"),
    "e2e_tokens_per_second": TimingField("end-to-end", "tok/s"),
    "decode_p50_ms": TimingField("decode step p50", "ms"),
    "decode_p90_ms": TimingField("decode step p90", "ms"),
    "decode_p99_ms": TimingField("decode step p99", "ms"),
    "peak_memory_mb": TimingField("peak memory", "MB"),
    "peak_memory_reserved_mb": TimingField("peak memory reserved", "MB"),
    # CPU: the CPU time the process got / (wall x torch threads); well below 1 = another
    # program took cores during the generation (its times are inflated); null on CUDA
    "cpu_share": TimingField("CPU share", "of threads"),
    # text-to-text mode: the sharer writes a note before the receiver answers
    "sharer_generated_tokens": TimingField("sharer note", "tokens"),
    "sharer_decode_ms": TimingField("sharer note decode", "ms", "sharer_decode", 5),
    # host time spent aligning the receiver's tokens to sharers with their own tokenizer
    "alignment_ms": TimingField("token alignment", "ms", "alignment", 1),
    # batches (fast engine): decode tokens per second of the whole batch (= tokens_per_second
    # at batch size 1)
    "batch_tokens_per_second": TimingField("batch decode", "tok/s"),
    # how close to the limit (hardware.py): the least time a decode step can take, the bytes
    # it must read (the decoding model's weights in their dtype + the KV cache so far, mean
    # over the steps; a batch's step reads every row's) / the card's memory bandwidth from
    # hardware.BANDWIDTH_GBS; null when the card is unknown (a CPU) or there is no decode step
    "decode_floor_ms": TimingField("decode floor", "ms/token"),
    # measured decode_avg_ms / decode_floor_ms (>= 1; null when the floor is)
    "decode_floor_ratio": TimingField("decode over floor", "x"),
    # the device's energy during the generation (a batch's: the whole batch), from NVML's
    # total-energy counter; null when not an NVIDIA GPU or not readable
    "energy_j": TimingField("energy", "J"),
    # energy_j / the tokens it produced (a batch's: every row's tokens)
    "joules_per_token": TimingField("energy per token", "J/token"),
    # fast engine: compile, capture or allocation this generation paid for inside its own
    # clock (a shape its run did not prepare before timing began, or one the cache cap freed);
    # part of other_ms; 0 when every shape was ready, and always 0 on the eager engine
    "late_prepare_ms": TimingField("late preparation", "ms"),
}

#: `timing` fields of the seed's format (units in the names; counts are plain ints).
SEED_TIMING_FIELDS = [k for k, f in TIMING.items() if f.seed]
#: `timing` fields we add (MEASURE.md "Derived fields"), plus the baselines' sharer fields.
EXT_TIMING_FIELDS = [k for k, f in TIMING.items() if not f.seed]

#: Timed stage -> the record field holding its total (ms), in the order a generation runs
#: them. The one list of stages: the timer, the runner, the profiler ranges (c2c/<stage>) and
#: the checks all read it.
STAGES = {f.stage: k for k, f in sorted(((k, f) for k, f in TIMING.items() if f.stage),
                                        key=lambda kf: kf[1].run)}

#: Stage fields whose sum, with `other_ms`, makes `e2e_ms` (run order).
STAGE_FIELDS = list(STAGES.values())

#: Stage -> field of a `timing.sharers` entry (the totals keep the seed's names).
SHARER_STAGES = {"teacher_embedding": "embedding_ms", "teacher_prefill": "prefill_ms",
                 "projection": "projection_ms", "alignment": "alignment_ms"}

#: Top-level fields we add next to `id`. `input_digest`: what the generation read (digest_input).
EXT_TOP_FIELDS = ["mode", "repeat", "run", "batch_size", "batch_index", "input_digest"]

#: Keys of the flat `run` metadata object (MEASURE.md).
#: `frontend` is "cli" or "app" (FRONTENDS): which front end ran the generation.
RUN_FIELDS = [
    "run_id", "frontend", "started_at", "tool_version", "git_commit", "python", "torch", "transformers",
    "device", "cuda", "cpu", "threads", "dtype", "attn_implementation", "timing_method", "warmup",
    "preset", "receiver", "sharer", "weights", "weights_mb", "fuser", "fuser_hash", "model_revisions",
    "max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "seed", "ignore_eos",
    "world_size", "rank",
    "engine", "compile_s",
    # whether this run paid for preparation: `fresh_process` (bool) is true when the run was the
    # first in its process (on ZeroGPU, a new GPU worker: weights moved to the GPU, every shape
    # prepared again); `prepared_shapes` (int >= 0) counts the shapes (decode steps, prefills,
    # projections, a server's slot steps) this run prepared before its first timed generation,
    # 0 when every shape it needed was ready in this process and always 0 on the eager engine;
    # their seconds are `compile_s`
    "fresh_process", "prepared_shapes",
    # the settings that change the numbers (SETTINGS_KEYS) and their digest: --resume refuses
    # a file made with other settings, and compare/report tell runs apart by them
    "settings", "settings_digest",
]


#: Fields that are null when the platform cannot measure them (never 0.0 for "unknown").
NULLABLE_FIELDS = {"timing.peak_memory_mb", "timing.peak_memory_reserved_mb", "run.weights_mb",
                   "timing.cpu_share", "timing.decode_floor_ms", "timing.decode_floor_ratio",
                   "timing.energy_j", "timing.joules_per_token"}
#: Fields that are never negative when known (the limit fields; null = unknown).
NON_NEGATIVE_FIELDS = ["decode_floor_ms", "decode_floor_ratio", "energy_j", "joules_per_token"]
#: Fields added after records were first written: an older record without them is still valid.
LATER_FIELDS = {"timing.peak_memory_reserved_mb", "run.weights_mb", "timing.alignment_ms",
                "timing.batch_tokens_per_second", "batch_size", "batch_index", "run.world_size",
                "run.rank", "run.engine", "run.compile_s", "run.frontend",
                "timing.cpu_share", "timing.batch_wait_ms", "input_digest", "run.settings",
                "run.settings_digest", "timing.decode_floor_ms", "timing.decode_floor_ratio",
                "timing.energy_j", "timing.joules_per_token", "timing.late_prepare_ms",
                "run.fresh_process", "run.prepared_shapes"}
#: A CPU run whose median timing.cpu_share is below this competed for its cores (about 1.0 on
#: an idle machine; 0.65 with one busy core beside a 2-thread run, decode 3.8x slower): its
#: times are inflated; `compare` calls such a run inconclusive.
CONTENTION_SHARE = 0.85
#: Values of run.frontend.
FRONTENDS = ["cli", "app"]


# --- sweep ids -----------------------------------------------------------------------------

class SweepShape(NamedTuple):
    """What a length sweep's record id says: prompt and output length, and for batch sizes
    above 1 the batch size and the record's row in the batch."""

    input_len: int
    output_len: int
    batch: int = 1
    row: int = 0


_SWEEP_ID = re.compile(r"in(\d+)-out(\d+)(?:-b(\d+)\.(\d+))?")


def sweep_id(input_len: int, output_len: int, batch: int = 1, row: int = 0) -> str:
    """The record id of a sweep shape: 'in<N>-out<M>', and 'in<N>-out<M>-b<B>.<row>' for a
    batch of B > 1 (batch 1 keeps the short id, so a shape's records share an id across modes)."""
    base = f"in{int(input_len)}-out{int(output_len)}"
    return base if batch == 1 else f"{base}-b{int(batch)}.{int(row)}"


def parse_sweep_id(value: Any) -> SweepShape | None:
    """The shape in a sweep record id (the inverse of `sweep_id`); None for any other id."""
    m = _SWEEP_ID.fullmatch(str(value))
    if m is None:
        return None
    n, out, b, row = m.groups()
    return SweepShape(int(n), int(out), 1 if b is None else int(b), 0 if row is None else int(row))


# --- building ------------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float:
    """numpy's default (linear-interpolated) percentile as a plain float, 0.0 for an empty list."""
    if len(values) == 0:
        return 0.0
    return float(np.percentile(values, q, method="linear"))


def r3(x: float) -> float:
    """Round to 3 decimals (µs resolution for ms fields) for a compact, stable file."""
    return round(float(x), 3)


# --- writing -------------------------------------------------------------------------------

class JsonlWriter:
    """Writes one record per line, flushed (and fsynced) at once so a crash loses nothing."""

    def __init__(self, path: str | os.PathLike, append: bool = False):
        self.path = os.fspath(path)
        d = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(d, exist_ok=True)
        if append:
            _ensure_ends_with_newline(self.path)
        self._f: IO[str] = open(self.path, "a" if append else "w", encoding="utf-8")
        self.count = 0

    def write(self, record: dict) -> None:
        try:
            self._f.write(json.dumps(record, ensure_ascii=False) + "\n")
            self._f.flush()
        except OSError as e:  # disk full, quota, a vanished mount: the written records stay
            from .fileio import os_error_sentence
            self._drop_partial()
            raise UserError(f"{os_error_sentence(e, self.path)}; the {self.count} record(s)"
                            " written before are kept (rerun with --resume to go on).") from None
        try:
            os.fsync(self._f.fileno())
        except OSError:  # pragma: no cover - e.g. a pipe
            pass
        self.count += 1

    def _drop_partial(self) -> None:
        """After a failed write: close without flushing the rest of the record (a line cut
        mid-way is dropped by the next --append/--resume, and skipped by every reader)."""
        try:
            self._f.close()  # retries the flush once, then closes the file whatever happens
        except OSError:
            pass

    def close(self) -> None:
        if not self._f.closed:
            try:
                self._f.close()
            except OSError:  # the failed tail of a full disk; write() already said so
                pass

    def __enter__(self) -> "JsonlWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _ensure_ends_with_newline(path: str) -> None:
    """Appending after a line cut mid-way (a killed run) must not glue two records together:
    drop the partial tail."""
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return
        cut = data.rfind(b"\n") + 1
        f.seek(cut)
        f.truncate()


# --- reading -------------------------------------------------------------------------------

def iter_jsonl(path: str | os.PathLike, skip_bad_lines: bool = False,
               bad_lines: list[int] | None = None, cut_tail_ok: bool = True,
               encoding: str | None = None, budget: Any = None) -> Iterator[dict]:
    """Yield the JSON objects of a JSONL file.

    With `budget` (anything with `add(nbytes)`, e.g. decoded.DecodedBudget) each line's decoded
    cost is counted before it is parsed (`line_cost`), and a record's `decode_step_times_ms`
    list of plain numbers comes back as a float64 numpy array (8 bytes a step, not a Python
    float of 32), parsed straight from its text.

    A last line without its newline that does not parse is a record cut mid-write: with
    `cut_tail_ok` (results files) it is skipped silently, everything before it being intact;
    input files pass False, so a typo on their last line is reported. Any other malformed line is an error
    naming its line number, unless `skip_bad_lines` (then its number goes to `bad_lines`).
    Results files (`encoding` None) are read as UTF-8, a bad byte replaced; input files pass an
    encoding ('utf-8-sig' by default) and are decoded strictly.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise UserError(f"File not found: {path}; check the path.")
    if os.path.isdir(path):
        raise UserError(f"{path} is a folder, not a JSONL file; pass the files in it (e.g."
                        f" {os.path.join(path, '*.jsonl')}).")
    name = os.path.basename(path)
    if encoding is not None and not _splits_on_newline_bytes(encoding):
        # UTF-16 and the like: lines cannot be found in the bytes; decode the whole file
        from .fileio import read_text
        lines = [(ln + "\n").encode("utf-8") for ln in read_text(path, encoding).split("\n")]
        lines[-1] = lines[-1][:-1]
        encoding = "utf-8"
        f = io.BytesIO(b"".join(lines))
    else:
        try:
            f = open(path, "rb")
        except OSError as e:
            raise UserError(f"Could not read {path} ({e.strerror or e}); check the path.") from None
    # one line at a time: a file's text is never held whole (results files of 15 MB, uploads)
    with f:
        first = True
        for i, raw in enumerate(f):
            last = not raw.endswith(b"\n")  # the text after the final newline
            steps, whole = None, raw
            if budget is not None:
                raw, steps = _compact_steps(raw, budget)
                if hasattr(budget, "count_line"):  # the budget measures lines its own way
                    budget.count_line(raw)
                else:
                    budget.add(line_cost(raw))
            if encoding is None:
                line = raw.decode("utf-8", errors="replace")
            else:  # input files: decoded strictly, a bad byte named by its line
                try:
                    line = raw.decode(encoding if first else _no_bom(encoding))
                except LookupError:
                    raise UserError(f"--encoding {encoding} is not an encoding Python knows; use"
                                    " e.g. utf-8, latin-1 or cp1252.") from None
                except UnicodeDecodeError as e:
                    raise UserError(f"{name} line {i + 1} is not valid {e.encoding} (byte"
                                    f" 0x{raw[e.start]:02x}); pass --encoding with the file's"
                                    " encoding (e.g. --encoding latin-1) or re-save it as"
                                    " UTF-8.") from None
            first = False
            s = line.strip()
            if not s:
                continue
            try:
                obj = json.loads(s)
            except (json.JSONDecodeError, RecursionError) as e:
                deep = isinstance(e, RecursionError)  # [[[[... nested past Python's limit
                if last and cut_tail_ok and not deep:  # unterminated tail: a record cut mid-write
                    return
                if skip_bad_lines:
                    if bad_lines is not None:
                        bad_lines.append(i + 1)
                    continue
                what = "nests too deeply to read" if deep else "is not valid JSON"
                raise UserError(
                    f"{name} line {i + 1} {what}; fix or delete that line"
                    " (or pass --skip_bad_lines to skip it).") from None
            if not isinstance(obj, dict):
                if skip_bad_lines:
                    if bad_lines is not None:
                        bad_lines.append(i + 1)
                    continue
                raise UserError(
                    f"{name} line {i + 1} is not a JSON object; each line must be"
                    " one {...} record.")
            if steps is not None:
                if obj.get("decode_step_times_ms") == []:
                    obj["decode_step_times_ms"] = steps
                else:  # the key stood in a nested object: the line is parsed whole after all
                    budget.add(line_cost(whole) - 8 * len(steps))
                    del steps
                    obj = json.loads(whole.decode(encoding or "utf-8", errors="replace"))
            yield obj


#: A record's decode steps as its text holds them: the key, then a flat list.
_STEPS_KEY = re.compile(rb'"decode_step_times_ms"\s*:\s*\[')
#: Bytes a list of plain JSON numbers is made of (no strings, nulls, bools or nesting).
_NUMBER_BYTES = b"0123456789+-.eE, \t\r\nNaIfinity"
#: Two numbers with only white space between them (numpy would read the first and stop).
_GAP = re.compile(rb"[0-9.]\s+[0-9.+\-NI]")
#: Bytes of Python objects a parsed record holds per byte of its text, and per value in it
#: (a float, an int or a short string: 24-50 bytes, plus the list or dict slot pointing at it).
COST_PER_CHAR, COST_PER_VALUE = 4, 32


def line_cost(raw: bytes) -> int:
    """An upper estimate of the memory one JSON line takes once parsed into Python objects
    (4x its text, measured on full records, plus 32 bytes per value: a list of one-digit
    numbers costs 16x its text)."""
    return COST_PER_CHAR * len(raw) + COST_PER_VALUE * (raw.count(b",") + raw.count(b":"))


def _compact_steps(raw: bytes, budget: Any) -> tuple[bytes, "np.ndarray | None"]:
    """(the line without its decode steps' numbers, those numbers as a float64 array) when the
    line holds `"decode_step_times_ms": [<plain numbers>]` once; else (raw, None) and the line is
    parsed whole. The array's 8 bytes a step are charged to `budget` before it is made."""
    m = _STEPS_KEY.search(raw)
    if m is None:
        return raw, None
    end = raw.find(b"]", m.end())
    if end < 0 or _STEPS_KEY.search(raw, end) is not None:
        return raw, None
    body = raw[m.end():end]
    if body.translate(None, _NUMBER_BYTES) or _GAP.search(body):  # text, null, true, a nested
        return raw, None  # list or "1 2" (numbers without their comma): the line is parsed whole
    n = body.count(b",") + 1 if body.strip() else 0
    budget.add(8 * n)
    arr = np.fromstring(body, dtype=np.float64, sep=",") if n else np.empty(0)
    if len(arr) != n:  # "1,,2" or "1e": not numbers after all; the whole line is parsed
        budget.add(-8 * n)
        return raw, None
    return raw[:m.end()] + raw[end:], arr


def _splits_on_newline_bytes(encoding: str) -> bool:
    try:
        return "\n".encode(encoding) == b"\n" and "\u00e9\n".encode(encoding).count(b"\n") == 1
    except (LookupError, UnicodeError):
        return True  # an unknown name is refused where the first line is decoded


def _no_bom(encoding: str) -> str:
    """Lines after the first: a BOM can only start a file."""
    return "utf-8" if encoding.lower().replace("_", "-") == "utf-8-sig" else encoding


def read_records(path: str | os.PathLike, skip_bad_lines: bool = False,
                 budget: Any = None) -> list[dict]:
    """A results file's records; with `budget` (decoded.DecodedBudget) counted as they are
    parsed, and their decode steps as numpy arrays (see iter_jsonl)."""
    if budget is not None and hasattr(budget, "reading"):
        budget.reading(os.path.basename(os.fspath(path)))
    return list(iter_jsonl(path, skip_bad_lines=skip_bad_lines, budget=budget))


# --- what ran: input and settings digests, and what --resume finds done -------------------

#: The settings that change a record's numbers, in `run.settings` (config-level names: what
#: the user asked for, resolved: "auto" never appears). A file whose records carry other values
#: is refused by --resume; `compare` and `report` name them.
SETTINGS_KEYS = ("receiver", "sharers", "fuser", "alignment", "fusion", "dtype", "device",
                 "engine", "max_new_tokens", "ignore_eos", "do_sample", "temperature", "top_p",
                 "top_k", "seed", "t2t_note_tokens", "chat_template", "timing_method")


def _digest(obj: Any) -> str:
    raw = json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(raw.encode("utf-8")).hexdigest()[:16]


def digest_input(prompt: str | None, input_ids: list[int] | None = None,
                 shape: str | None = None) -> str:
    """16 hex digits naming what a generation read: the prompt text, or for exact-length
    prompts (a sweep) the token ids with their shape id (output length and batch row are part
    of what a sweep record measures). Row positions never enter it, so the same prompt in
    another file (or at another row) has the same digest."""
    if input_ids is not None:
        return _digest({"ids": [int(x) for x in input_ids], "shape": shape})
    return _digest({"text": str(prompt)})


def settings_digest(settings: dict) -> str:
    return _digest({k: settings.get(k) for k in SETTINGS_KEYS})


def settings_of(rec: dict) -> dict | None:
    """A record's `run.settings`, or None for records written before they existed."""
    run = rec.get("run") if isinstance(rec, dict) else None
    s = run.get("settings") if isinstance(run, dict) else None
    return s if isinstance(s, dict) else None


def show_value(v: Any) -> str:
    """A setting's value as said in a sentence (lists joined with +, None as 'none')."""
    if isinstance(v, list):
        return " + ".join(map(str, v)) or "none"
    return "none" if v is None else str(v)


def settings_diff(old: dict, new: dict) -> list[str]:
    """'dtype float32 in the file, bfloat16 now' style phrases for each setting that differs."""
    return [f"{k} {show_value(old.get(k))} in the file, {show_value(new.get(k))} now"
            for k in SETTINGS_KEYS if old.get(k) != new.get(k)]


def record_key(rec: dict) -> tuple[str, str, str]:
    """(input digest, mode, repeat); records written before digests existed key on their id
    ('id:<id>'), as --resume always did."""
    d = rec.get("input_digest")
    first = str(d) if isinstance(d, str) and d else f"id:{rec.get('id')}"
    return (first, rec.get("mode") or "c2c", str(rec.get("repeat", 0) or 0))


class Done:
    """What a results file already holds, for --resume: a count per (input digest, mode,
    repeat), so a prompt listed twice runs twice, and records without a digest (older files)
    matched by id. `take` says whether a generation is already done, using up one record."""

    def __init__(self, records: Iterable[dict] = ()):
        self.counts: Counter = Counter()
        self.by_id: Counter = Counter()   # every record by (id, mode, repeat)
        self.legacy = 0   # records without input_digest (matched by id)
        self.total = 0
        self.settings: dict[str, dict] = {}   # settings digest -> run.settings seen
        for r in records:
            self.add(r)

    def add(self, rec: dict) -> None:
        k = record_key(rec)
        self.legacy += k[0].startswith("id:")
        self.counts[k] += 1
        self.by_id[(f"id:{rec.get('id')}",) + k[1:]] += 1
        self.total += 1
        s = settings_of(rec)
        if s is not None:
            self.settings.setdefault(settings_digest(s), s)

    def settings_conflict(self, settings: dict, where: str, fix: str) -> str | None:
        """The sentence refusing to resume into `where` when records in it were made with
        other settings than `settings` (None when they match or carry none)."""
        want = settings_digest(settings)
        for digest, s in self.settings.items():
            if digest != want:
                diff = "; ".join(settings_diff(s, settings))
                return (f"{where} holds records made with other settings ({diff}), and resuming"
                        f" would mix the two in one run; {fix}.")
        return None

    def take(self, digest: str | None, id_: Any, mode: str, repeat: int) -> bool:
        """`digest` None: match by id alone (a sweep shape, whose id names its input when the
        settings match, as --resume has checked)."""
        keys = [(digest, mode, str(repeat)), (f"id:{id_}", mode, str(repeat))]
        pools = [(self.counts, keys[0]), (self.counts, keys[1])] if digest else \
            [(self.by_id, keys[1])]
        for pool, k in pools:
            if pool.get(k, 0) > 0:
                pool[k] -= 1
                return True
        return False

    def note(self) -> str:
        """One line when some records could only be matched by id."""
        if not self.legacy:
            return ""
        return (f"{self.legacy} record(s) in the file carry no input digest (written by an older"
                " version); they are matched by id, so rerun into a new file if the prompts"
                " changed.")

    def __bool__(self) -> bool:
        return self.total > 0


def done_records(path: str | os.PathLike) -> Done:
    """The records already in a file, for --resume (an absent file holds none)."""
    if not os.path.exists(path):
        return Done()
    return Done(iter_jsonl(path, skip_bad_lines=True))


def is_done(skip: Any, item: Any, mode: str, repeat: int) -> bool:
    """Whether --resume found (item, mode, repeat) done: `skip` is a Done, or a set of
    (id, mode, repeat) tuples (a distributed unit's partly done keys), or None."""
    if not skip:
        return False
    if isinstance(skip, Done):
        return skip.take(getattr(item, "digest", None), item.id, mode, repeat)
    return (str(item.id), mode, str(repeat)) in skip


# --- validation (used by tests and by `analyze`) -------------------------------------------

def check_record(rec: dict, tol_ms: float = 0.5) -> list[str]:
    """Return the invariants a record breaks (empty list = valid)."""
    problems = []
    for k in SEED_TOP_FIELDS + EXT_TOP_FIELDS:
        if k not in rec and k not in LATER_FIELDS:
            problems.append(f"missing top-level field {k}")
    t = rec.get("timing", {})
    if not isinstance(t, dict):
        return problems + ["timing is not an object"]
    for k in SEED_TIMING_FIELDS + EXT_TIMING_FIELDS:
        if k not in t:
            if f"timing.{k}" not in LATER_FIELDS:
                problems.append(f"missing timing.{k}")
        elif t[k] is None and f"timing.{k}" not in NULLABLE_FIELDS:
            problems.append(f"timing.{k} is null")
    run = rec.get("run", {})
    problems += [f"missing run.{k}" for k in RUN_FIELDS
                 if k not in (run if isinstance(run, dict) else {}) and f"run.{k}" not in LATER_FIELDS]
    num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    problems += [f"timing.{k} is not a number" for k, v in t.items()
                 if k in SEED_TIMING_FIELDS + EXT_TIMING_FIELDS and v is not None and not num(v)]
    steps = rec.get("decode_step_times_ms")
    # (types first: a record may hold a million steps; JSON numbers are int or float)
    compact = isinstance(steps, np.ndarray) and steps.ndim == 1  # read with a budget
    if not compact and (not isinstance(steps, list) or not (
            set(map(type, steps)) <= {int, float} or all(num(x) for x in steps))):
        problems.append("decode_step_times_ms is not a list of numbers")
    d = rec.get("input_digest")
    if d is not None and not (isinstance(d, str) and re.fullmatch(r"[0-9a-f]{16}", d)):
        problems.append("input_digest is not 16 hex digits")
    if isinstance(run, dict) and run.get("settings") is not None:  # null: not recorded
        st = run["settings"]
        if not isinstance(st, dict):
            problems.append("run.settings is not an object")
        elif run.get("settings_digest") != settings_digest(st):
            problems.append("run.settings_digest does not match run.settings")
    if isinstance(run, dict):
        # (null: not known, e.g. a record rebuilt from an older file's fields)
        fp, ps = run.get("fresh_process"), run.get("prepared_shapes")
        if fp is not None and not isinstance(fp, bool):
            problems.append("run.fresh_process is not true or false")
        if ps is not None and (not isinstance(ps, int) or isinstance(ps, bool) or ps < 0):
            problems.append("run.prepared_shapes is not a whole number >= 0")
    fe = run.get("frontend", "cli") if isinstance(run, dict) else "cli"
    if fe not in FRONTENDS:
        problems.append(f"run.frontend is {fe!r}, not one of {FRONTENDS}")
    if problems:
        return problems
    steps = rec["decode_step_times_ms"]
    n = t["num_generated_tokens"]
    if len(steps) != max(n - 1, 0):
        problems.append(f"{len(steps)} decode steps for {n} tokens (want N-1)")
    total = float(steps.sum()) if isinstance(steps, np.ndarray) else sum(steps)
    if abs(total - t["decode_total_ms"]) > tol_ms:
        problems.append("decode_total_ms != sum(decode_step_times_ms)")
    # a stage an older file lacks: 0; a row's wait for its batch is part of its e2e too
    stage_sum = sum(t.get(k) or 0 for k in STAGE_FIELDS + ["batch_wait_ms"])
    if stage_sum > t["e2e_ms"] + tol_ms:
        problems.append(f"stages sum {stage_sum:.3f} ms > e2e {t['e2e_ms']:.3f} ms")
    if t["ttft_ms"] > t["e2e_ms"] + tol_ms:
        problems.append("ttft_ms > e2e_ms")
    if t["other_ms"] < -tol_ms:
        problems.append("other_ms < 0")
    late = t.get("late_prepare_ms")  # older files: absent
    if late is not None and late < 0:
        problems.append("timing.late_prepare_ms < 0")
    elif late is not None and late > t["other_ms"] + tol_ms:  # prepared outside every span
        problems.append(f"timing.late_prepare_ms {late:.3f} > other_ms {t['other_ms']:.3f}")
    problems += _check_sharers(t, tol_ms)
    problems += _check_sections(t)
    problems += _check_limits(t, rec.get("batch_size"))
    return problems


def _check_limits(t: dict, batch_size: Any) -> list[str]:
    """The limit fields: never negative; the ratio is decode_avg_ms / decode_floor_ms (null
    with the floor); joules_per_token goes with energy_j (energy / tokens at batch size 1)."""
    out = [f"timing.{k} < 0" for k in NON_NEGATIVE_FIELDS if (t.get(k) or 0) < 0]
    if out:
        return out
    floor, ratio, avg = t.get("decode_floor_ms"), t.get("decode_floor_ratio"), t["decode_avg_ms"]
    if ratio is not None and not floor:
        out.append("timing.decode_floor_ratio without timing.decode_floor_ms")
    elif floor and avg > 0 and ratio is None:
        out.append("timing.decode_floor_ratio is null beside a decode floor")
    elif floor and ratio is not None and abs(ratio - avg / floor) > 1e-3 + 1e-4 * ratio:
        out.append(f"timing.decode_floor_ratio {ratio} != decode_avg_ms / decode_floor_ms"
                   f" ({avg / floor:.3f})")
    e, jpt, n = t.get("energy_j"), t.get("joules_per_token"), t["num_generated_tokens"]
    if (e is None) != (jpt is None) and n:
        out.append("timing.joules_per_token and timing.energy_j: one is null, not both")
    elif e is not None and jpt is not None and n:
        if jpt > e + 1e-3:
            out.append("timing.joules_per_token > timing.energy_j")
        elif (batch_size or 1) == 1 and abs(jpt * n - e) > 1e-3 + 1e-6 * n:
            out.append("timing.joules_per_token != energy_j / num_generated_tokens")
    return out


#: `timing.sharers` entry field -> the total it must add up to.
SHARER_TOTALS = {**{f: STAGES[stage] for stage, f in SHARER_STAGES.items()},
                 "projector_calls": "projector_calls"}


def _check_sharers(t: dict, tol_ms: float) -> list[str]:
    """`timing.sharers` (optional: one entry per sharer that ran) must add up to the totals."""
    sh = t.get("sharers")
    if sh is None:
        return []
    if not isinstance(sh, list) or not all(isinstance(e, dict) for e in sh):
        return ["timing.sharers is not a list of objects"]
    if not sh:
        return []
    out = []
    for f, total in SHARER_TOTALS.items():
        if any(not isinstance(e.get(f), (int, float)) for e in sh):
            out.append(f"a timing.sharers entry lacks {f}")
        elif abs(sum(e[f] for e in sh) - t[total]) > (0 if f == "projector_calls" else tol_ms):
            out.append(f"timing.sharers {f} do not add up to timing.{total}")
    return out


def _check_sections(t: dict) -> list[str]:
    """`timing.sections` (optional, c2c): the prefill's sections in order, from position 0 to
    the prompt's end, each {start, end, projected}; the last one (the last token) never
    projected."""
    sec = t.get("sections")
    if sec is None:
        return []
    ok = isinstance(sec, list) and sec and all(
        isinstance(e, dict) and isinstance(e.get("start"), int) and isinstance(e.get("end"), int)
        and isinstance(e.get("projected"), bool) for e in sec)
    if not ok:
        return ["timing.sections is not a list of {start, end, projected}"]
    if sec[0]["start"] != 0 or any(a["end"] != b["start"] for a, b in zip(sec, sec[1:])) \
            or any(e["end"] < e["start"] for e in sec):
        return ["timing.sections do not follow each other from position 0"]
    if sec[-1]["end"] != t.get("prompt_tokens") or sec[-1]["projected"]:
        return ["timing.sections do not end at the prompt's last token, unprojected"]
    return []


def write_all(path: str | os.PathLike, records: Iterable[dict]) -> None:
    with JsonlWriter(path) as w:
        for r in records:
            w.write(r)
