"""Prompt sources → `PromptItem` lists: built-in prompts, local JSONL/JSON/CSV/Parquet files and
Hugging Face datasets; row selection (offset, sample count, shards) and answer scoring.

No torch here: the CLI and the UI validate the prompt options before any model loads.

Kept as one module (over 500 lines) on purpose: the file formats, hub datasets and row
selection share one set of bounds (C2C_MAX_FILE_ROWS / _MB) and one set of error sentences.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from string import ascii_uppercase
from typing import Any, Iterable, Iterator

from . import hub
from ..spec.errors import UserError
from .decoded import env_mb
from .fileio import read_text
from .records import digest_input, iter_jsonl

BUILTIN_PROMPTS = [
    "Say hello in one short sentence.",
    "What is the capital of France?",
    "Explain machine learning in simple terms.",
    "Write a haiku about coding.",
    "What is 25 * 17?",
]

#: Fields tried, in order, for a row's text when no --field is given.
TEXT_FIELDS = ("prompt", "question", "text")
#: Fields holding multiple-choice options, appended to the prompt as "A. ..." lines.
CHOICE_FIELDS = ("options", "choices")
FILE_TYPES = (".jsonl", ".json", ".csv", ".parquet")

#: Short dataset names → (hub repository, default config).
DATASET_ALIASES = {
    "gsm8k": ("openai/gsm8k", "main"),
    "openai/gsm8k": ("openai/gsm8k", "main"),
    "mmlu": ("cais/mmlu", "all"),
    "cais/mmlu": ("cais/mmlu", "all"),
}


@dataclass
class PromptItem:
    """One prompt to run, with its gold answer when the source has one."""

    id: str | int  # the row's "id" field, else its 0-based row index; builtins 1..n
    prompt: str  # text given to the model (choices appended as "\nA. ...")
    answer: str | None = None  # normalized gold answer: number text, letter, or free text
    answer_kind: str | None = None  # 'number' | 'choice' | 'text' | None
    source: str = ""  # "builtin", "prompts", "file:my.jsonl", "hf:openai/gsm8k/main/test"
    input_ids: list[int] | None = None  # exact ids fed as is (length sweeps): no chat template
    n_choices: int | None = None  # multiple choice: how many options (letters A..), for scoring

    @property
    def digest(self) -> str:
        """What this item feeds the model, as records.digest_input (the record's input_digest)."""
        if self.input_ids is not None:
            return digest_input(None, self.input_ids, str(self.id))
        return digest_input(self.prompt)


class PromptList(list):
    """The selected prompts, and the malformed rows skipped on the way ('line 3', 'row 7')."""

    skipped: list[str]

    def __init__(self, items=(), skipped: list[str] | None = None):
        super().__init__(items)
        self.skipped = list(skipped or [])


def skipped_note(items) -> str:
    """One sentence about rows --skip_bad_lines dropped, or '' when none were."""
    bad = getattr(items, "skipped", [])
    if not bad:
        return ""
    shown = ", ".join(bad[:10]) + (" …" if len(bad) > 10 else "")
    return f"Skipped {len(bad)} malformed row(s): {shown}."


def builtin_items(prompts: list[str] | None = None) -> list[PromptItem]:
    """The built-in prompts (or the given list) with ids 1..n, as in the seed's batch script."""
    source = "builtin" if prompts is None else "prompts"
    return [PromptItem(i, p, source=source)
            for i, p in enumerate(BUILTIN_PROMPTS if prompts is None else prompts, start=1)]


# --- rows → items ----------------------------------------------------------------------------

def _number(text: str) -> str | None:
    """Canonical number text ('1,234.0' → '1234', '3.50' → '3.5'); None if not a number."""
    try:
        d = Decimal(text.replace(",", "").strip())
    except InvalidOperation:
        return None
    if not d.is_finite():
        return None
    return str(int(d)) if d == d.to_integral_value() else format(d.normalize(), "f")


#: One line of a preformatted option string: "A. text", "A) text", "(A) text", "A: text".
_LETTERED_LINE = re.compile(r"^\s*\(?([A-Za-z])\s*[.):]\s*(.*?)\s*$")


def _lettered(text: str) -> list[str] | None:
    """The option texts of one preformatted string ("A. 3 lines\nB. 9 lines\n..."), lettered
    A, B, C... in order (a line without a letter continues the option above); None otherwise."""
    texts: list[str] = []
    for line in text.strip().splitlines():
        m = _LETTERED_LINE.match(line)
        if m and m.group(1).upper() == ascii_uppercase[len(texts) % 26]:
            texts.append(m.group(2))
        elif texts and line.strip():
            texts[-1] = f"{texts[-1]} {line.strip()}"
        elif line.strip():
            return None
    return texts if len(texts) >= 2 else None


def _choices(value: Any, where: str) -> tuple[list[str], list[str]]:
    """Choice texts and their source labels from a list, a {'text', 'label'} dict (ARC), a
    {'A': text, 'B': text} dict, one preformatted lettered string, or their JSON."""
    if value is None:
        return [], []
    if isinstance(value, str):
        raw = value
        try:
            value = json.loads(value)
        except (json.JSONDecodeError, RecursionError):
            value = _lettered(raw)
            if value is None:
                raise UserError(f"{where} has options that are not a list (nor lettered lines);"
                                ' write them as a JSON list like ["Paris", "London"] or as lines'
                                ' "A. Paris", "B. London".') from None
    if hasattr(value, "tolist"):  # numpy arrays from Parquet
        value = value.tolist()
    if isinstance(value, dict) and "text" in value:
        texts = [str(t) for t in value.get("text") or []]
        labels = [str(x) for x in value.get("label") or []]
        labels = labels if len(labels) == len(texts) else []
    elif isinstance(value, dict) and value and all(
            isinstance(k, str) and len(k.strip()) == 1 and k.strip().isalpha() for k in value):
        keys = sorted(value, key=lambda k: k.strip().upper())
        texts, labels = [str(value[k]) for k in keys], [k.strip() for k in keys]
    elif isinstance(value, (list, tuple)):
        texts, labels = [str(t) for t in value], []
    else:
        raise UserError(f"{where} has options that are not a list; write them as a JSON list like"
                        ' ["Paris", "London"].')
    if len(texts) > len(ascii_uppercase):
        raise UserError(f"{where} has {len(texts)} options; at most 26 can be lettered A-Z.")
    return texts, labels


_LETTER_ANSWER = re.compile(r"^\(?([A-Za-z])\s*(?:[.):]\s*(.*))?$", re.DOTALL)


def _same_text(a: str, b: str) -> bool:
    return " ".join(a.split()).casefold() == " ".join(b.split()).casefold()


def _answer(value: Any, texts: list[str], labels: list[str]) -> tuple[str | None, str | None]:
    """Normalize a gold answer: a letter for multiple choice (from a label, a letter, "B. 9
    lines", "(B)", the option's text, or a 0-based index), the number after GSM8K's '####',
    any other number, else free text."""
    if value is None or str(value).strip() == "":
        return None, None
    s = str(value).strip()
    if texts:
        letters = ascii_uppercase[:len(texts)]
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(texts):
            return letters[value], "choice"
        if s in labels:
            return letters[labels.index(s)], "choice"
        m = _LETTER_ANSWER.match(s)  # "B", "b", "(B)", "B.", "B. 9 lines", "B) 9 lines"
        if m and m.group(1).upper() in letters:
            return m.group(1).upper(), "choice"
        same = [i for i, t in enumerate(texts) if _same_text(s, t)]
        if len(same) == 1:
            return letters[same[0]], "choice"
        if s.isdigit() and int(s) < len(texts):
            return letters[int(s)], "choice"
        return s, "text"
    if "####" in s:
        s = s.rsplit("####", 1)[1].strip()
    n = _number(s)
    return (n, "number") if n is not None else (s, "text")


def _row_item(row: dict, index: int, field: str | None, source: str, where: str) -> PromptItem:
    """One source row → PromptItem; `where` names the row in errors (e.g. "my.csv row 3")."""
    key = next((k for k in ([field] if field else TEXT_FIELDS) if k in row), None)
    if key is None:
        wanted = f"'{field}'" if field else "'prompt', 'question' or 'text'"
        cols = ", ".join(map(str, row)) or "none"
        raise UserError(f"{where} has no {wanted} field (columns found: {cols}); pass --field"
                        " with the column that holds the prompt.")
    text = "" if row[key] is None else str(row[key])
    if not text.strip():
        raise UserError(f"{where} has an empty '{key}'; fill it in or pass --skip_bad_lines to"
                        " skip such rows.")
    choice_key = next((k for k in CHOICE_FIELDS if row.get(k) not in (None, "")), None)
    texts, labels = _choices(row.get(choice_key), where)
    text += "".join(f"\n{ascii_uppercase[i]}. {t}" for i, t in enumerate(texts))
    answer, kind = _answer(row.get("answer"), texts, labels)
    rid = row.get("id")
    if rid is not None and not isinstance(rid, (str, int, float)):
        raise UserError(f"{where} has an id that is a {type(rid).__name__}, not a string or a"
                        " number; fix the id or drop the field (rows are then numbered).")
    return PromptItem(index if rid in (None, "") else rid, text, answer, kind, source,
                      n_choices=len(texts) or None)


def _items(rows: Iterable[dict], field: str | None, source: str, name: str,
           skip_bad_lines: bool, skipped: list[str] | None = None) -> list[PromptItem]:
    """Rows → items; with `skip_bad_lines` rows without usable text are dropped (named in
    `skipped`), but a source where no row is usable still raises the first row's error."""
    items, first_error = [], None
    for i, row in enumerate(rows):
        try:
            # a row without an id is numbered from 1, as it is named in messages ("row 3")
            items.append(_row_item(row, i + 1, field, source, f"{name} row {i + 1}"))
        except UserError as e:
            if not skip_bad_lines:
                raise
            first_error = first_error or e
            if skipped is not None:
                skipped.append(f"row {i + 1}")
    if not items:
        raise first_error or UserError(f"{name} has no rows; add at least one prompt.")
    return items


# --- local files -----------------------------------------------------------------------------

@dataclass(frozen=True)
class FileCaps:
    """How much of a prompts file a reader may take in: rows, and decoded text in bytes. A
    file over either is refused (in one sentence naming the file, the cap and the fix) while it
    is read, before the rows are materialised: Parquet from its footer first, JSON, JSONL and
    CSV as they stream. `where` names the setting that raises the cap (the app's environment
    variables); the CLI reads a user's own files and passes none."""

    rows: int
    bytes: int
    rows_setting: str = ""
    bytes_setting: str = ""

    def too_many_rows(self, name: str, n: int | None = None) -> UserError:
        has = f"{n:,} rows" if n is not None else f"more than {self.rows:,} rows"
        how = f" ({self.rows_setting})" if self.rows_setting else ""
        return UserError(f"{name} has {has}; at most {self.rows:,} are read here{how}: keep the"
                         " rows you want to run in a smaller file.")

    def too_big(self, name: str, n: int | None = None) -> UserError:
        has = f"{_mb_text(n)} of data" if n is not None else f"more than {_mb_text(self.bytes)}" \
            " of data once decoded"
        how = f" ({self.bytes_setting})" if self.bytes_setting else ""
        return UserError(f"{name} holds {has}; at most {_mb_text(self.bytes)} are read here{how}:"
                         " keep the rows you want to run in a smaller file.")


def _mb_text(n: int) -> str:
    return f"{n / 2**20:,.1f} MB"


#: The CLI's caps on a prompts file (its user's own file): far above any real prompts file,
#: still refusing one that decodes to gigabytes. The app's variables raise them here too.
CLI_FILE_ROWS, CLI_FILE_MB = 10_000_000, 512


def cli_file_caps() -> FileCaps:
    """The caps `dataset --dataset_file` reads a prompts file under (C2C_MAX_FILE_ROWS and
    C2C_MAX_FILE_MB when set, else CLI_FILE_ROWS and CLI_FILE_MB)."""
    try:
        rows = int(os.environ.get("C2C_MAX_FILE_ROWS", "").strip() or CLI_FILE_ROWS)
    except ValueError:
        rows = CLI_FILE_ROWS
    return FileCaps(max(rows, 1), env_mb("C2C_MAX_FILE_MB", CLI_FILE_MB), "C2C_MAX_FILE_ROWS",
                    "C2C_MAX_FILE_MB")


class _Budget:
    """Rows and decoded bytes read so far from one file, checked against its caps."""

    def __init__(self, name: str, caps: FileCaps | None):
        self.name, self.caps, self.rows, self.bytes = name, caps, 0, 0

    def add(self, rows: int = 0, nbytes: int = 0) -> None:
        self.rows += rows
        self.bytes += nbytes
        if self.caps is None:
            return
        if self.rows > self.caps.rows:
            raise self.caps.too_many_rows(self.name)
        if self.bytes > self.caps.bytes:
            raise self.caps.too_big(self.name)


class _Bytes:
    """A _Budget as records.iter_jsonl counts a line: bytes only, before the line is parsed."""

    def __init__(self, budget: _Budget):
        self.budget = budget

    def add(self, nbytes: int) -> None:  # decode steps read as an array: 8 bytes a value
        self.budget.add(nbytes=nbytes)

    def count_line(self, raw: bytes) -> None:
        self.budget.add(nbytes=_text_data_bytes(raw, 0, len(raw)))


def _text_data_bytes(text: str | bytes, start: int, end: int) -> int:
    """The data a JSON text holds, measured before it is parsed as _arrow_bytes measures a
    Parquet row: its characters, and 8 bytes for each value (one per ',' or ':', so a list of
    a million one-digit numbers counts 10 MB, not 2)."""
    sep = (b",", b":") if isinstance(text, bytes) else (",", ":")
    return end - start + _VALUE_BYTES * (text.count(sep[0], start, end)
                                         + text.count(sep[1], start, end))


#: Parquet encodings whose decoded size the reader can bound (DELTA_BYTE_ARRAY stores each value
#: as a prefix of the previous one: a few bytes can decode to gigabytes).
_PARQUET_ENCODINGS = {"PLAIN", "RLE", "BIT_PACKED", "PLAIN_DICTIONARY", "RLE_DICTIONARY",
                      "DELTA_BINARY_PACKED", "DELTA_LENGTH_BYTE_ARRAY", "BYTE_STREAM_SPLIT"}
_PARQUET_WIDTH = {"BOOLEAN": 1, "INT32": 4, "FLOAT": 4, "INT64": 8, "DOUBLE": 8, "INT96": 12}
#: Bytes of decoded values one Parquet batch may hold at most.
_PARQUET_BATCH_BYTES = 4 * 2**20
#: Text values in list columns of a Parquet prompts file: past both the total and the mean per
#: row, the file is refused from its footer.
_PARQUET_LIST_TEXT_TOTAL, _PARQUET_LIST_TEXT_PER_ROW = 65_536, 256

#: Row groups and columns a Parquet prompts file may have (its footer is read whole).
_PARQUET_MAX_GROUPS, _PARQUET_MAX_COLUMNS = 10_000, 1_000


def _parquet_rows(path: str, name: str, caps: FileCaps | None) -> Iterator[dict]:
    """Rows of a Parquet file, bounded before they are decoded: the footer's row count, row
    groups, columns, encodings and column sizes are checked first; then the rows stream in
    batches small enough that even the longest value the file can hold keeps a batch within
    _PARQUET_BATCH_BYTES, each batch counted against the caps before it becomes Python rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    unreadable = (f"{name} is not a readable Parquet file; re-export it (e.g. with pandas"
                  " DataFrame.to_parquet).")
    try:
        pf = pq.ParquetFile(path)
        md = pf.metadata
    except (pa.ArrowException, OSError, ValueError):
        raise UserError(unreadable) from None
    budget = _Budget(name, caps)
    if caps is not None and md.num_rows > caps.rows:
        raise caps.too_many_rows(name, md.num_rows)
    if md.num_row_groups > _PARQUET_MAX_GROUPS or md.num_columns > _PARQUET_MAX_COLUMNS:
        raise UserError(f"{name} has {md.num_row_groups:,} row groups and {md.num_columns:,}"
                        f" columns; at most {_PARQUET_MAX_GROUPS:,} and {_PARQUET_MAX_COLUMNS:,}"
                        " are read: re-export it with the columns you need.")
    known, longest = 0, 1
    # text inside lists: how many values a row may hold is bounded from the footer, before
    # Arrow decodes anything (a dictionary-encoded list of a million references to one string
    # is a few KB on disk; how Arrow's reader materialises it is not ours to bound)
    for i in range(md.num_columns):
        col_schema = md.schema.column(i)
        if col_schema.physical_type != "BYTE_ARRAY" or col_schema.max_repetition_level == 0:
            continue
        n = sum(md.row_group(g).column(i).num_values for g in range(md.num_row_groups))
        if n > _PARQUET_LIST_TEXT_TOTAL and n > _PARQUET_LIST_TEXT_PER_ROW * max(1, md.num_rows):
            raise UserError(f"{name}'s list column {col_schema.path.split('.')[0]!r} holds"
                            f" {n:,} text values in {md.num_rows:,} row(s); at most"
                            f" {_PARQUET_LIST_TEXT_PER_ROW} per row are read: re-export the file"
                            " without that column or with shorter lists.")
    for g in range(md.num_row_groups):
        rg = md.row_group(g)
        for c in range(rg.num_columns):
            col = rg.column(c)
            odd = set(col.encodings) - _PARQUET_ENCODINGS
            if odd:
                raise UserError(f"{name} uses the Parquet encoding {sorted(odd)[0]}, which this"
                                " reader does not decode (its size cannot be bounded); re-export"
                                " it with default settings.")
            width = _PARQUET_WIDTH.get(col.physical_type)
            if width is not None:  # fixed width: the decoded size is exact
                known += col.num_values * width
            else:  # text: at least 8 bytes a value (a dictionary-encoded value is an index of
                #    a bit or two: 1 M values of one 1 KB string fit in 5 KB), and the chunk
                known += max(col.total_uncompressed_size, col.num_values * _VALUE_BYTES)
                longest = max(longest, col.total_uncompressed_size)
    if caps is not None and known > caps.bytes:
        raise caps.too_big(name, known)
    batch = max(1, min(1024, _PARQUET_BATCH_BYTES // longest))
    # text columns stay dictionaries while they are counted (list elements included): read
    # plain, one row of a million references to one string decodes to a million copies
    text = [md.schema.column(i).path for i in range(md.num_columns)
            if md.schema.column(i).physical_type == "BYTE_ARRAY"]
    try:
        pf = pq.ParquetFile(path, read_dictionary=text)
        # one row group at a time (Arrow reads a nested dictionary column of one group only)
        for rb in (rb for g in range(md.num_row_groups)
                   for rb in pf.iter_batches(batch_size=batch, row_groups=[g])):
            # what the batch's rows hold once they are Python values, counted on the Arrow
            # arrays (a dictionary's value once per row that refers to it), before they exist
            budget.add(nbytes=sum(_arrow_bytes(c) for c in rb.columns))
            for row in rb.to_pylist():
                budget.add(rows=1)
                yield row
    except (pa.ArrowException, OSError, KeyError):
        raise UserError(unreadable) from None


#: Bytes a decoded value that is not text counts (and the least a text value counts in the
#: footer's bound: a Python object and the slot that points at it).
_VALUE_BYTES = 8


def _arrow_bytes(arr: Any) -> int:
    """The size of an Arrow array's values once they are Python values (text by its length, 8
    bytes any other value and each list), computed on the arrays: a dictionary
    value counts once per reference, a list's elements and a struct's fields each."""
    import pyarrow as pa
    import pyarrow.compute as pc
    if isinstance(arr, pa.ChunkedArray):
        return sum(_arrow_bytes(c) for c in arr.chunks)
    t = arr.type
    if pa.types.is_dictionary(t):
        per = _text_lengths(arr.dictionary)  # bytes of each dictionary value
        idx = arr.indices
        nulls = idx.null_count
        idx = idx.drop_null().to_numpy(zero_copy_only=False)
        return int(per[idx].sum()) + _VALUE_BYTES * nulls if len(per) else _VALUE_BYTES * nulls
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t) \
            or pa.types.is_map(t):
        return _VALUE_BYTES * len(arr) + _arrow_bytes(arr.flatten())
    if pa.types.is_struct(t):
        return sum(_arrow_bytes(arr.field(i)) + len(t.field(i).name) * len(arr)
                   for i in range(t.num_fields))
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) \
            or pa.types.is_large_binary(t):
        return int(pc.sum(pc.binary_length(arr)).as_py() or 0) + _VALUE_BYTES * arr.null_count
    return _VALUE_BYTES * len(arr)


def _text_lengths(values: Any) -> "Any":
    """Bytes each value of a dictionary counts (text: its length; others: 8), as numpy."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    t = values.type
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) \
            or pa.types.is_large_binary(t):
        return pc.binary_length(values).fill_null(_VALUE_BYTES).to_numpy(
            zero_copy_only=False).astype(np.int64)
    return np.full(len(values), _VALUE_BYTES, dtype=np.int64)


#: The largest single element of a JSON array (one prompt row) the streaming reader takes.
_JSON_ELEMENT_CAP = 64 * 2**20
_JSON_CHUNK = 1 << 20


def _json_array_rows(path: str, name: str, encoding: str | None, budget: _Budget
                     ) -> Iterator[dict]:
    """The objects of a JSON array file, one at a time (the whole array is never one Python
    value): a bounded buffer of text, each element decoded with raw_decode as it completes."""
    decoder = json.JSONDecoder()
    ws = re.compile(r"[\s,]*")
    # an element is decoded before it is counted: its text may cost up to 16x in objects
    element_cap = _JSON_ELEMENT_CAP if budget.caps is None else \
        max(_JSON_CHUNK, min(_JSON_ELEMENT_CAP, budget.caps.bytes // 16))
    line = 1  # line of the buffer's start, for error messages

    def bad(e: json.JSONDecodeError) -> UserError:
        return UserError(f"{name} is not valid JSON (line {line + e.lineno - 1}); fix it or"
                         " write one object per line as .jsonl.")

    with _text_stream(path, name, encoding) as f:
        buf = f.read(_JSON_CHUNK)
        pos = len(buf) - len(buf.lstrip())
        if not buf.startswith("[", pos):
            raise UserError(f"{name} must be a list of {{...}} objects, one per prompt.")
        pos, eof, need = pos + 1, False, _JSON_CHUNK

        def refill(n: int) -> None:
            """Drop what was read (counting its lines) and append n more characters: the
            buffer is cut once per half chunk, not once per row."""
            nonlocal buf, pos, eof, line
            more = f.read(n)
            eof = not more
            line += buf.count("\n", 0, pos)
            buf, pos = buf[pos:] + more, 0

        while True:
            pos = ws.match(buf, pos).end()
            if pos == len(buf):
                if not eof:
                    refill(_JSON_CHUNK)
                    continue
                raise UserError(f"{name} ends before its closing ']'; fix it or write one object"
                                " per line as .jsonl.")
            if buf[pos] == "]":
                return
            try:
                obj, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError as e:
                if eof:
                    raise bad(e) from None
                if len(buf) - pos > element_cap:
                    raise UserError(f"{name} has one row longer than"
                                    f" {_mb_text(element_cap)}; a prompt row is far"
                                    " shorter: check the file.") from None
                refill(need)  # the element continues: read as much again
                need *= 2
                continue
            except RecursionError:
                raise UserError(f"{name} nests too deeply to read; write one flat object per"
                                " prompt (one per line as .jsonl).") from None
            need = _JSON_CHUNK
            budget.add(rows=1, nbytes=_text_data_bytes(buf, pos, end))
            if not isinstance(obj, dict):
                raise UserError(f"{name} must be a list of {{...}} objects, one per prompt.")
            pos = end
            if len(buf) - pos < _JSON_CHUNK // 2 and not eof:
                refill(_JSON_CHUNK)
            yield obj


@contextmanager
def _text_stream(path: str, name: str, encoding: str | None) -> Iterator[io.TextIOBase]:
    """The file as text decoded strictly; an undecodable byte is said as read_text says it
    (with its line), so streaming readers keep read_text's message."""
    enc = encoding or "utf-8-sig"
    try:
        import codecs
        codecs.lookup(enc)
    except LookupError:
        raise UserError(f"--encoding {encoding} is not an encoding Python knows; use e.g."
                        " utf-8, latin-1 or cp1252.") from None
    try:
        f = open(path, encoding=enc, errors="strict", newline="")
    except OSError as e:
        raise UserError(f"Could not read {name} ({e.strerror or e}); check the path.") from None
    try:
        with f:
            yield f
    except UnicodeDecodeError:
        read_text(path, encoding)  # raises the sentence naming the line
        raise


def _csv_rows(path: str, name: str, encoding: str | None, budget: _Budget) -> Iterator[dict]:
    """A CSV file's rows. A field over the csv module's limit (131,072 characters; no prompt a
    model here takes is that long, and a longer text belongs in a .jsonl file) or holding a NUL
    character is refused in one sentence naming the file and its line, as is a row the csv
    module cannot parse (its error reached the app as a bare exception, the CLI as a
    traceback)."""
    with _text_stream(path, name, encoding) as f:
        reader = csv.DictReader(f)
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                line = reader.reader.line_num
                if "field larger than field limit" in str(e):
                    raise UserError(f"{name} line {line:,} has a field over"
                                    f" {csv.field_size_limit():,} characters, the most a CSV"
                                    " field may hold here: shorten it, or give the prompts as"
                                    " a .jsonl file.") from None
                raise UserError(f"{name} line {line:,} is not CSV this reader can parse"
                                f" ({_csv_reason(e)}): save it as CSV again, or give the"
                                " prompts as a .jsonl file.") from None
            values = [v for v in row.values() if isinstance(v, str)]
            values += [x for v in row.values() if isinstance(v, list) for x in v]
            if any("\x00" in v for v in values) or any("\x00" in k for k in row if k):
                raise UserError(f"{name} line {reader.line_num:,} holds a NUL character, which"
                                " no text prompt has: save the file as plain-text CSV.")
            budget.add(rows=1, nbytes=sum(len(v) for v in values) + _VALUE_BYTES * len(values))
            yield row


def _csv_reason(e: Exception) -> str:
    """The csv module's complaint, short and without the row's text."""
    return str(e).split(":")[0][:80] or "malformed row"


def _read_rows(path: str, ext: str, skip_bad_lines: bool,
               bad_lines: list[int] | None = None, encoding: str | None = None,
               caps: FileCaps | None = None) -> Iterator[dict]:
    name = os.path.basename(path)
    budget = _Budget(name, caps)
    if caps is not None:
        size = os.path.getsize(path)
        if size > caps.bytes:
            raise caps.too_big(name, size)
    if ext == ".csv":
        yield from _csv_rows(path, name, encoding, budget)
    elif ext == ".parquet":
        yield from _parquet_rows(path, name, caps)
    elif ext == ".json" and _first_char(path) == "[":
        yield from _json_array_rows(path, name, encoding, budget)
    else:  # .jsonl, or .json holding JSON lines
        for row in iter_jsonl(path, skip_bad_lines=skip_bad_lines, bad_lines=bad_lines,
                              cut_tail_ok=False, encoding=encoding or "utf-8-sig",
                              budget=_Bytes(budget)):
            budget.add(rows=1)
            yield row


def _first_char(path: str) -> str:
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        return f.read(4096).lstrip()[:1]


def check_file_type(path: str | os.PathLike) -> str:
    """The prompts file's extension (lower case); a type no reader takes (gzip, none) is refused
    in one sentence naming the file."""
    name = os.path.basename(os.fspath(path))
    ext = os.path.splitext(name)[1].lower()
    if ext not in FILE_TYPES:
        raise UserError(f"{name}: unsupported file type '{ext or '(none)'}'; use a .jsonl, .json,"
                        " .csv or .parquet file" + (" (unpacked: gzip files are not read)"
                                                    if ext in (".gz", ".gzip") else "") + ".")
    return ext


def load_prompt_file(path: str | os.PathLike, field: str | None = None,
                     skip_bad_lines: bool = False, encoding: str | None = None,
                     caps: FileCaps | None = None) -> list[PromptItem]:
    """Prompts from a .jsonl/.json, .csv or .parquet file (text from `field`, else the first of
    'prompt', 'question', 'text'; 'options'/'choices' appended as A-D lines); with `caps`, a
    file over them is refused while it is read."""
    path = os.fspath(path)
    name = os.path.basename(path)
    ext = check_file_type(path)
    if os.path.isdir(path):
        raise UserError(f"{path} is a folder; pass a prompts file.")
    if not os.path.isfile(path):
        raise UserError(f"Prompt file not found: {path}; check the path.")
    bad_lines: list[int] = []
    skipped: list[str] = []
    items = _items(_read_rows(path, ext, skip_bad_lines, bad_lines, encoding, caps), field,
                   f"file:{name}", name, skip_bad_lines, skipped)
    return PromptList(items, [f"line {n}" for n in bad_lines] + skipped)


# --- Hugging Face datasets -------------------------------------------------------------------

@contextmanager
def _datasets_cache_only() -> Iterator[None]:
    """Make `datasets` use its local cache only: no hub calls, so no retry stall."""
    import datasets.config as cfg
    saved = cfg.HF_HUB_OFFLINE
    cfg.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        cfg.HF_HUB_OFFLINE = saved


def _split_or_config_error(e: Exception, repo: str, config: str | None,
                           split: str) -> UserError | None:
    """A one-sentence UserError for `datasets`' wrong-split or wrong-config error, else None."""
    msg = str(e)
    listed = re.search(r"\[.*?\]", msg)
    available = listed.group(0) if listed else "see the dataset page"
    if "Unknown split" in msg:
        return UserError(f"Dataset {repo} has no split '{split}' (available: {available}); pass"
                         " --split with one of them.")
    if "BuilderConfig" in msg and "not found" in msg:
        return UserError(f"Dataset {repo} has no config '{config}' (available: {available});"
                         " pass --dataset_config with one of them.")
    if "Config name is missing" in msg:
        return UserError(f"Dataset {repo} needs a config (available: {available}); pass"
                         " --dataset_config with one of them.")
    return None


def load_hf_dataset(name: str, config: str | None = None, split: str = "test",
                    field: str | None = None, num_rows: int | None = None) -> list[PromptItem]:
    """Prompts from a Hugging Face dataset (GSM8K, MMLU or any with a text field), local cache
    first; the hub is tried only when it can be reached, so offline this fails at once."""
    import datasets

    repo, default_config = DATASET_ALIASES.get(name.strip().lower(), (name.strip(), None))
    config = config or default_config
    split_arg = f"{split}[:{num_rows}]" if num_rows else split
    what = f"Dataset {repo}" + (f" (config {config})" if config else "")
    try:
        with _datasets_cache_only():
            ds = datasets.load_dataset(repo, config, split=split_arg)
    except (ConnectionError, ValueError, FileNotFoundError) as e:  # not cached, or a bad split
        err = _split_or_config_error(e, repo, config, split)
        if err is not None:
            raise err from None
        hub.require_hub(what, datasets=True)
        ds = _download(repo, config, split, split_arg, what)
    source = "hf:" + "/".join(p for p in (repo, config, split) if p)
    return _items(ds, field, source, f"{repo} {split}", skip_bad_lines=False)


def _download(repo: str, config: str | None, split: str, split_arg: str, what: str) -> Any:
    """`load_dataset` from the hub, its errors said as one-sentence UserErrors."""
    import datasets

    try:
        return datasets.load_dataset(repo, config, split=split_arg)
    except FileNotFoundError:  # includes datasets' DatasetNotFoundError (unknown or gated)
        raise UserError(f"Dataset {repo} was not found on the Hugging Face hub or is gated; check"
                        " the name (e.g. gsm8k, cais/mmlu), log in for gated datasets, or pass"
                        " --dataset_file with a local file.") from None
    except ConnectionError as e:
        raise UserError(f"{what} could not be downloaded ({e}); check the network or pass"
                        " --dataset_file with a local copy.") from None
    except ValueError as e:
        err = _split_or_config_error(e, repo, config, split)
        if err is None:
            raise
        raise err from None


# --- selection -------------------------------------------------------------------------------

def parse_shard(s: str) -> tuple[int, int]:
    """'i/n' → (i, n) with 0 <= i < n."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(s))
    if not m or not int(m.group(1)) < int(m.group(2)):
        raise UserError(f"--shard '{s}' is not valid; write i/n with 0 <= i < n (e.g. 0/4 for the"
                        " first of four shards).")
    return int(m.group(1)), int(m.group(2))


def _as_shard(shard: tuple[int, int] | str | None) -> tuple[int, int] | None:
    """A validated (i, n) from "i/n", a pair, or None/"" for no sharding."""
    if shard in (None, ""):
        return None
    return parse_shard(shard if isinstance(shard, str) else f"{shard[0]}/{shard[1]}")


def select(items: list[PromptItem], offset: int = 0, num_samples: int | None = None,
           shard: tuple[int, int] | str | None = None) -> list[PromptItem]:
    """Skip `offset` rows, keep the next `num_samples`, then keep contiguous block i of n
    (the first blocks one longer when it does not divide), so shards 0..n-1 concatenated
    equal the unsharded selection."""
    chosen = items[offset:] if num_samples is None else items[offset:offset + num_samples]
    shard = _as_shard(shard)
    if shard is None:
        return chosen
    i, n = shard
    size, extra = divmod(len(chosen), n)
    start = i * size + min(i, extra)
    return chosen[start:start + size + (i < extra)]


def resolve_prompts(*, prompt: str | None = None, prompts: list[str] | None = None,
                    dataset: str | None = None, dataset_config: str | None = None,
                    split: str = "test", dataset_file: str | os.PathLike | None = None,
                    field: str | None = None, offset: int = 0, num_samples: int | None = None,
                    shard: tuple[int, int] | str | None = None,
                    skip_bad_lines: bool = False, encoding: str | None = None,
                    caps: FileCaps | None = None) -> list[PromptItem]:
    """The prompts a run will use, from exactly one source (built-ins when none is given),
    validated before any model loads."""
    sources = {"--prompt": prompt is not None, "--prompts": prompts is not None,
               "--dataset": bool(dataset), "--dataset_file": bool(dataset_file)}
    given = [flag for flag, used in sources.items() if used]
    if len(given) > 1:
        raise UserError(f"Give one prompt source, not {' and '.join(given)}.")
    if offset < 0:
        raise UserError(f"--offset is {offset}; it must be 0 or more.")
    if num_samples is not None and num_samples < 1:
        raise UserError(f"--num_samples is {num_samples}; it must be at least 1.")
    shard = _as_shard(shard)

    if prompt is not None:
        if not prompt.strip():
            raise UserError("The prompt is empty; type a question.")
        items, what = builtin_items([prompt]), "the prompt"
    elif prompts is not None:
        if not prompts:
            raise UserError("The prompt list is empty; give at least one prompt.")
        for i, p in enumerate(prompts, start=1):
            if not str(p).strip():
                raise UserError(f"Prompt {i} of the list is empty; remove it or type a question.")
        items, what = builtin_items(list(prompts)), "the prompt list"
    elif dataset:
        num_rows = offset + num_samples if num_samples is not None else None
        items = load_hf_dataset(dataset, dataset_config, split, field, num_rows)
        what = f"dataset {dataset} ({split})"
    elif dataset_file:
        items = load_prompt_file(dataset_file, field, skip_bad_lines, encoding, caps)
        what = os.path.basename(os.fspath(dataset_file))
    else:
        items, what = builtin_items(), "the built-in prompts"

    chosen = select(items, offset, num_samples, shard)
    if not chosen:
        if offset >= len(items):
            raise UserError(f"No prompts to run: --offset {offset} skips all {len(items)} rows of"
                            f" {what}; use a smaller --offset.")
        available = len(select(items, offset, num_samples))
        raise UserError(f"No prompts to run: shard {shard[0]}/{shard[1]} of {available} selected"
                        f" rows is empty; use at most {available} shards.")
    return PromptList(chosen, getattr(items, "skipped", []))


# --- generation length per source -----------------------------------------------------------

#: max_new_tokens when none is given, by the answers a source carries: worked number answers
#: (GSM8K) need room to reason before the number, most run past 64 tokens; a letter or a short
#: text fits in 64. Records say `truncated` when an answer still hit the cap.
NEW_TOKENS_BY_ANSWER = {"number": 256, "choice": 64, "text": 64, None: 64}


def default_max_new_tokens(items: Iterable[PromptItem]) -> tuple[int, str]:
    """(max_new_tokens, why) for these prompts when the user gave none."""
    kinds = {it.answer_kind for it in items} or {None}
    kind = max(kinds, key=lambda k: NEW_TOKENS_BY_ANSWER.get(k, 64))
    n = NEW_TOKENS_BY_ANSWER.get(kind, 64)
    why = {"number": "room to work out number answers, as in GSM8K",
           "choice": "enough for a lettered answer"}.get(kind, "the default")
    return n, why


# --- scoring ---------------------------------------------------------------------------------

_NUMBER = re.compile(r"(?<!\d)-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


@functools.lru_cache(maxsize=32)
def _choice_patterns(n_choices: int) -> tuple[re.Pattern, re.Pattern]:
    """The "answer is B" and standalone "(B)" / "B." / "B" patterns for letters A..(n-th)."""
    r = f"[A-{ascii_uppercase[max(1, min(n_choices, 26)) - 1]}]"
    return (re.compile(rf"(?i:answer)(?:\s+is)?\s*:?\s*\(?({r})\b"),
            re.compile(rf"\(({r})\)|(?<!\w)({r})[.):](?=\s|$)|^\s*({r})\s*$", re.MULTILINE))


_MARKED_CHOICE, _STANDALONE_CHOICE = _choice_patterns(4)


def extract_answer(response: str, kind: str, n_choices: int | None = None) -> str | None:
    """The answer in a model response: 'number' → the last number (canonical text); 'choice' →
    the letter (A-D, or A to the `n_choices`-th letter) after "answer (is)", else the first
    standalone "(B)", "B." or "B"; 'text' → the stripped response."""
    if kind == "number":
        found = _NUMBER.findall(response)
        return _number(found[-1]) if found else None
    if kind == "choice":
        marked, standalone = _choice_patterns(n_choices or 4)
        m = marked.search(response) or standalone.search(response)
        return next(g for g in m.groups() if g) if m else None
    if kind == "text":
        return response.strip()
    raise ValueError(f"unknown answer kind {kind!r}")


def score(response: str, answer: str | None, kind: str | None,
          n_choices: int | None = None) -> bool | None:
    """Whether a response holds the gold answer; None when there is no answer. Free-text
    answers count when they appear in the response (case-insensitive)."""
    if answer is None:
        return None
    if kind in ("number", "choice"):
        return extract_answer(response, kind, n_choices) == answer
    return answer.strip().lower() in response.lower()
