"""Documented limits, in one place, and the checks that enforce them before any forward.

- Context: prompt tokens + new tokens must fit the receiver's context, and the sharer's in the
  modes that run it (`check_context`, called by the runner on every generation and, untimed,
  on every prompt before a run starts; `check_lengths` for a sweep before its models load).
- Fuser sizes, repeats and warm-up runs: `MAX_*` in config.py (pure values, checked by
  config.validate_run_config); an untrained fuser's parameter count is checked against
  `MAX_FUSER_PARAMS` before it is built (projector.check_fuser_params).
- The web app's own caps (prompt characters, prompts and generations per job, uploads, disk)
  are in c2c_core/frontends/ui/guard.py.

No torch at import: the CLI and the app check these before any model loads.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any, Iterable

from ..spec.config import (MAX_FUSER_DIM, MAX_FUSER_LAYERS, MAX_FUSER_PARAMS, MAX_REPEATS,  # noqa: F401
    MAX_WARMUP, MIN_FUSER_LAYERS, check_run_sizes)
from ..spec.errors import UserError
from ..models.projector import check_fuser_params  # noqa: F401  (re-exported)

# --- sizes and counts --------------------------------------------------------------------

# --- context -----------------------------------------------------------------------------

#: Config fields that hold a model's context length, most common first.
_CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length",
                   "seq_length", "n_ctx")


def context_length(config: Any) -> int | None:
    """A model's context length in tokens from its config (a transformers config or its dict),
    None when the config names none.

    `sliding_window` is not a context limit: a sliding window bounds how far back each layer
    attends, not how many positions the model takes (and Qwen2 configs carry one even with
    use_sliding_window false), so only the position limit counts."""
    if config is None:
        return None
    d = config if isinstance(config, dict) else (
        config.to_dict() if hasattr(config, "to_dict") else vars(config))
    text = d.get("text_config")
    if isinstance(text, dict) and not any(d.get(k) for k in _CONTEXT_FIELDS):
        d = text  # multimodal configs keep the language model's fields in text_config
    for k in _CONTEXT_FIELDS:
        v = d.get(k)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def _fit(role: str, name: str, ctx: int | None, n_prompt: int, n_new: int, what: str,
         new_flag: str) -> None:
    if ctx is None or n_prompt + n_new <= ctx:
        return
    if n_new == 0:
        raise UserError(f"{what} is {n_prompt:,} tokens, over the {role}'s context of {ctx:,}"
                        f" tokens ({name}); shorten the prompt.")
    fix = (f"shorten the prompt or lower {new_flag} (at most {ctx - n_prompt:,} fit)"
           if n_prompt < ctx else "shorten the prompt")
    raise UserError(f"{what} is {n_prompt:,} tokens + {n_new:,} new tokens = {n_prompt + n_new:,},"
                    f" over the {role}'s context of {ctx:,} tokens ({name}); {fix}.")


def check_lengths(receiver_ctx: int | None, sharer_ctx: int | None, n_prompt: int, mode: str,
                  max_new_tokens: int, t2t_note_tokens: int = 0, what: str = "The prompt",
                  n_answer_prompt: int | None = None, names: tuple[str, str] = ("", "")) -> None:
    """Refuse a generation that would not fit the models' contexts (None = no known limit).

    c2c: receiver prompt + new tokens, sharer prompt (it only prefills); receiver: receiver;
    sharer: sharer prompt + new tokens; t2t: sharer prompt + note tokens, then the receiver's
    prompt with the note (`n_answer_prompt`, default prompt + note tokens) + new tokens."""
    rname, sname = names
    if mode in ("c2c", "receiver"):
        _fit("receiver", rname, receiver_ctx, n_prompt, max_new_tokens, what, "--max_new_tokens")
        if mode == "c2c":
            _fit("sharer", sname, sharer_ctx, n_prompt, 0, what, "")
    elif mode == "sharer":
        _fit("sharer", sname, sharer_ctx, n_prompt, max_new_tokens, what, "--max_new_tokens")
    elif mode == "t2t":
        _fit("sharer", sname, sharer_ctx, n_prompt, t2t_note_tokens,
             f"{what} (read by the sharer to write its note)", "--t2t_note_tokens")
        n2 = n_prompt + t2t_note_tokens if n_answer_prompt is None else n_answer_prompt
        _fit("receiver", rname, receiver_ctx, n2, max_new_tokens, f"{what} with the sharer's note",
             "--max_new_tokens")


def pipe_contexts(pipe) -> tuple[int | None, int | None]:
    """(receiver, sharer) context lengths of a loaded pipeline, read once and kept on it."""
    cached = pipe.info.get("contexts") if isinstance(getattr(pipe, "info", None), dict) else None
    if cached is None:
        cached = (context_length(getattr(getattr(pipe, "receiver", None), "config", None)),
                  context_length(getattr(getattr(pipe, "sharer", None), "config", None)))
        if isinstance(getattr(pipe, "info", None), dict):
            pipe.info["contexts"] = cached
    return cached


def check_context(pipe, cfg, n_prompt_tokens: int, mode: str, what: str = "The prompt",
                  n_answer_prompt: int | None = None) -> None:
    """`check_lengths` for a loaded pipeline and a RunConfig (cheap: integers only)."""
    rctx, sctx = pipe_contexts(pipe)
    info = pipe.info if isinstance(getattr(pipe, "info", None), dict) else {}
    check_lengths(rctx, sctx, n_prompt_tokens, mode, cfg.gen.max_new_tokens,
                  cfg.gen.t2t_note_tokens, what, n_answer_prompt,
                  (str(info.get("receiver", "")), str(info.get("sharer", ""))))


def check_items(pipe, cfg, items: Iterable, modes: Iterable[str]) -> None:
    """Every prompt of a run against the contexts before the first generation (untimed), so a
    too-long prompt is refused before any model runs rather than after hours of records."""
    rctx, sctx = pipe_contexts(pipe)
    if rctx is None and sctx is None:
        return
    from ..plan.item import T2T_ANSWER_TEMPLATE, build_plan, chat_ids
    modes = list(modes)
    for it in items:
        what = f"Prompt {it.id}"
        for mode in modes:
            # the ids the generation's plan gives the first model (its own template and, for a
            # sharer with its own tokenizer, the sectioned layout), so the check counts them
            n, n2 = len(build_plan(pipe, cfg, it, mode).ids), None
            if mode == "t2t" and it.input_ids is None:
                # the note's tokens, re-read by the receiver, plus its answer prompt around them
                n2 = cfg.gen.t2t_note_tokens + len(chat_ids(pipe.tokenizer, T2T_ANSWER_TEMPLATE.format(
                    note="", question=it.prompt), cfg.chat_template))
            check_context(pipe, cfg, n, mode, what, n2)


# --- contexts without loading the models (sweeps refuse before loading) ------------------

def _read_config(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        return d if isinstance(d, dict) else None
    except (OSError, ValueError):
        return None


#: GGUF metadata value types → struct format of a scalar (8 = string, 9 = array).
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q",
                 11: "q", 12: "d"}


# Kept rather than gguf.GGUFReader (issue 17 part 6): the reader builds a numpy view per array
# element (262k vocabulary strings, scores and types), measured 17.2 s and +690 MB RSS on the
# packaged Gemma-3-270M GGUF against 0.24 s here (72x; SmolLM2 3.6 s vs 0.08 s, 43x), and this
# runs before a sweep or a budget check, where the user waits.
def gguf_fields(path: str) -> dict:
    """The metadata of a GGUF file's header, read directly (the header comes first; no tensor is
    touched): key -> value, numeric arrays skipped and string arrays given as their length.
    Raises OSError, ValueError or struct.error on a file that is not GGUF."""
    out: dict = {}
    with open(path, "rb") as f:
        def read(fmt: str):
            return struct.unpack("<" + fmt, f.read(struct.calcsize("<" + fmt)))[0]

        def string() -> str:
            return f.read(read("Q")).decode("utf-8", "replace")

        def value(vtype: int):
            if vtype in _GGUF_SCALARS:
                return read(_GGUF_SCALARS[vtype])
            if vtype == 8:
                return string()
            if vtype == 9:
                itype, count = read("I"), read("Q")
                if itype in _GGUF_SCALARS:  # skip numeric arrays without reading them one by one
                    f.seek(count * struct.calcsize("<" + _GGUF_SCALARS[itype]), 1)
                else:
                    for _ in range(count):
                        value(itype)
                return count
            raise ValueError(f"unknown GGUF value type {vtype}")

        if f.read(4) != b"GGUF":
            raise ValueError("not a GGUF file")
        read("I")  # version
        read("Q")  # tensor count
        for _ in range(read("Q")):
            key = string()
            out[key] = value(read("I"))
    return out


def gguf_context_length(path: str) -> int | None:
    """`<architecture>.context_length` from a GGUF file's metadata header, None when the header
    has none."""
    m = gguf_fields(path)
    found = {k: v for k, v in m.items() if k.endswith(".context_length")}
    arch = m.get("general.architecture")
    if arch and f"{arch}.context_length" in found:
        return int(found[f"{arch}.context_length"])
    return int(next(iter(found.values()))) if found else None


def spec_context(spec) -> int | None:
    """A ModelSpec's context length from its config file alone (no weights, no network);
    None when the config is not on this machine yet (the runner checks after loading)."""
    src = spec.source
    if src.startswith("dummy:"):
        name = src[len("dummy:"):]
        from ..spec.config import CONFIGS
        path = name if name.endswith(".json") else os.path.join(CONFIGS, f"{name}.json")
        return context_length(_read_config(path))
    if src == "smollm2" or src.lower().endswith(".gguf"):
        from ..models import loading
        try:
            path = loading.smollm2_gguf_path() if src == "smollm2" else src
            return gguf_context_length(path)
        except (UserError, OSError, ValueError, struct.error):
            return None
    if os.path.isdir(src):
        return context_length(_read_config(os.path.join(src, "config.json")))
    try:
        from huggingface_hub import try_to_load_from_cache
        path = try_to_load_from_cache(src, "config.json", revision=spec.revision)
    except Exception:  # noqa: BLE001 - not a valid repo id, no cache: the runner checks later
        return None
    return context_length(_read_config(path)) if isinstance(path, str) else None


def check_sweep_context(cfg, ins: list[int], outs: list[int]) -> None:
    """The longest shape against the models' contexts, read from their config files: a sweep
    that cannot fit is refused before any model loads (the runner checks again after)."""
    from .generation import modes_of
    rctx, sctx = spec_context(cfg.receiver), spec_context(cfg.sharer)
    names = (cfg.receiver.source, cfg.sharer.source)
    for mode in modes_of(cfg):
        check_lengths(rctx, sctx, max(ins), mode, max(outs), cfg.gen.t2t_note_tokens,
                      f"--input_lens {max(ins)}", names=names)
