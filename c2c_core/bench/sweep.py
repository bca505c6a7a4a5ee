"""Length sweeps: synthetic prompts of exact token lengths (the ids fed to the model, no chat
template) x fixed output lengths (ignore EOS), like vLLM's --input-len/--output-len."""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Callable

import torch

from ..spec.errors import UserError
from ..io.records import sweep_id
from .runner import Item, modes_of, run_many, run_metadata, sweep_settings, with_settings
from ..measure import cancel
from ..measure.timing import Timer


def parse_lengths(text: str, what: str) -> list[int]:
    """'16,64,256', '16 64 256' or '16, 64' -> [16, 64, 256]: commas and spaces alike."""
    try:
        vals = [int(x) for x in re.split(r"[,\s]+", str(text).strip()) if x]
    except ValueError:
        raise UserError(f"{what} '{text}' must be whole numbers separated by commas or spaces,"
                        " e.g. 16,64,256.") from None
    if not vals or any(v < 1 for v in vals):
        raise UserError(f"{what} '{text}' must list lengths >= 1.")
    return vals


def synthetic_ids(tokenizer, length: int, seed: int = 0) -> list[int]:
    """`length` ordinary (non-special) token ids drawn with a fixed seed."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    vocab = len(tokenizer)
    pool = torch.tensor([i for i in range(vocab) if i not in special])
    g = torch.Generator().manual_seed(seed + length)
    return pool[torch.randint(len(pool), (length,), generator=g)].tolist()


def sweep_items(tokenizer, input_lens: list[int], seed: int = 0) -> list[Item]:
    """One synthetic prompt per input length (its id is set per shape: records.sweep_id)."""
    return [Item(id=None, prompt=f"<{n} synthetic tokens>",
                 input_ids=synthetic_ids(tokenizer, n, seed)) for n in input_lens]


def shape_config(cfg, output_len: int, batch_size: int | None = None):
    """The run settings of one output length: exactly `output_len` tokens (EOS ignored)."""
    c = replace(cfg, gen=replace(cfg.gen, max_new_tokens=output_len, ignore_eos=True))
    if batch_size is not None:
        c = replace(c, batch_size=batch_size)
    c.gen.validate()
    return c


def sweep_meta(pipe, cfg, timer_method: str) -> dict:
    """The `run` object of a sweep (its max_new_tokens is then set per shape; its settings have
    none: the shape is part of each record's input digest)."""
    meta = run_metadata(pipe, replace(cfg, gen=replace(cfg.gen, ignore_eos=True)), timer_method)
    return with_settings(meta, sweep_settings(meta["settings"]))


def batch_items(tokenizer, item: Item, n: int, m: int, batch: int, seed: int = 0) -> list[Item]:
    """`batch` prompts of the shape (n tokens in, m out): the first row is the batch-1 prompt,
    the others other draws. Ids from records.sweep_id: 'in<N>-out<M>-b<B>.<row>', rows numbered
    from 1 like every id (batch 1 keeps 'in<N>-out<M>')."""
    return [replace(item, id=sweep_id(n, m, batch, i + 1),
                    input_ids=item.input_ids if i == 0 else
                    synthetic_ids(tokenizer, n, seed + 100003 * i)) for i in range(batch)]


def sweep_plan(cfg, input_lens: list[int], output_lens: list[int],
               batch_sizes: list[int] | None = None) -> list:
    """The sweep's shapes in the order `run_sweep` runs them, for a progress ETA by size: each
    row's size is its prompt + output tokens, and a shape of batch B has B rows per mode and
    repeat (its records per mode)."""
    from ..measure.progress import Shape
    return [Shape((n, m, b), float(n + m), float(cfg.repeats * b),
                  f"{n} tokens in, {m} out" + (f", batch {b}" if b > 1 else ""), b)
            for m in output_lens for b in (batch_sizes or [cfg.batch_size])
            for n in input_lens]


def run_sweep(pipe, cfg, input_lens: list[int], output_lens: list[int], writer=None,
              on_progress: Callable | None = None, should_stop: Callable | None = None,
              skip: set[tuple] | None = None, keep: bool = True,
              batch_sizes: list[int] | None = None) -> list[dict]:
    """Every input length x output length (x mode x repeat); each shape warms up first.

    Record ids are records.sweep_id's 'in<N>-out<M>' so a shape's records share an id across
    modes. `on_progress` gets (records done, records in the whole sweep, record | None) like
    run_many's. All records share one `run` object (one run_id); only its max_new_tokens
    follows the shape.
    `keep=False` streams as run_many does (an empty list is returned)."""
    items = sweep_items(pipe.tokenizer, input_lens, cfg.gen.seed)
    batch_sizes = batch_sizes or [cfg.batch_size]
    if any(b > 1 for b in batch_sizes):
        from ..spec.config import resolve_engine
        if resolve_engine(replace(cfg, batch_size=max(batch_sizes)), pipe.device) != "fast":
            raise UserError("--batch_sizes above 1 need the fast engine; use --engine fast or auto.")
    if any(not 1 <= b <= 1024 for b in batch_sizes):
        raise UserError(f"--batch_sizes {batch_sizes} must be between 1 and 1024.")
    per_shape = len(modes_of(cfg)) * cfg.repeats
    total = len(items) * len(output_lens) * per_shape * sum(batch_sizes)
    meta = sweep_meta(pipe, cfg, Timer(pipe.device, cfg.timing).method_name)
    out: list[dict] = []
    done = [0]
    if on_progress:
        on_progress(0, total, None)
    shapes = sweep_plan(cfg, input_lens, output_lens, batch_sizes)
    k = 0
    for m in output_lens:
        for b in batch_sizes:
            c = shape_config(cfg, m, b)
            for it, n in zip(items, input_lens):
                if should_stop and should_stop():
                    return out
                base = done[0]
                k += 1

                def report(k, _t, rec, base=base):
                    if rec is not None:
                        done[0] = base + k
                        if on_progress:
                            on_progress(base + k, total, rec)
                rows = batch_items(pipe.tokenizer, it, n, m, b, cfg.gen.seed)
                # each phase of the shape (warm-up, compile, timed run) says which shape it is
                with cancel.within(f"sweep shape {k} of {len(shapes)} ({shapes[k - 1].label})"):
                    out += run_many(pipe, c, rows, writer=writer, on_progress=report,
                                    should_stop=should_stop, skip=skip,
                                    meta={**meta, "max_new_tokens": m}, keep=keep)
    return out
