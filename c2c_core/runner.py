"""Timed generation: run_one / run_many(pipeline, config, items) -> records.

Modes (every record says which):
- c2c: sectioned prefill of receiver and sharer, projection into the receiver cache, receiver
  decode;
- receiver: the receiver alone, one plain prefill (what a user runs without C2C; C2C's second
  forward for the last token is part of C2C's cost, so it is not in this baseline);
- sharer: the sharer alone, one plain prefill (its decode goes into the decode fields);
- t2t: the sharer writes a short note (plain prefill), then the receiver answers with it in its
  prompt (plain prefill of note + question).
"""

from __future__ import annotations

import contextvars
import datetime as _dt
import functools
import os
import platform
import subprocess
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable

import torch

from . import __version__, cancel
from .config import ALL_MODES, RunConfig
from .errors import OutOfMemory, UserError
from .fusion import c2c_prefill, decode_step, fused_prefill, plain_prefill, sample
from .limits import check_context, check_items
from .loading import Pipeline
from .memory import DeviceMemory
from .prompts import PromptItem as Item
from .prompts import score
from .records import (MODES, SHARER_STAGES, JsonlWriter, is_done, percentile, r3,
                      settings_conflict, settings_digest)
from .timing import STAGES, Timer, now_ns, sync

#: Which front end started the run, written into every record as `run.frontend`: "cli" unless
#: the web app's runner (its worker process, or its job thread on ZeroGPU) sets "app".
FRONTEND: contextvars.ContextVar[str] = contextvars.ContextVar("c2c_frontend", default="cli")

T2T_NOTE_INSTRUCTION = (
    "Write a short background note with facts that would help someone answer the question"
    " below. Do not answer the question itself.\n\nQuestion: {question}")
T2T_ANSWER_TEMPLATE = "Background note:\n{note}\n\nQuestion: {question}"


@dataclass
class Generation:
    tokens: list[int]
    stages: dict[str, list[float]]
    ttft_ns: int
    e2e_ns: int
    prompt_tokens: int
    projector_calls: int = 0
    sharer_tokens: list[int] = field(default_factory=list)
    peak_memory_mb: float | None = None          # CUDA max allocated / CPU sampled peak RSS
    peak_memory_reserved_mb: float | None = None  # CUDA max reserved; None on a CPU
    wall_start: float = 0.0   # time.time() at the start and end of the generation, so that
    wall_end: float = 0.0     # records of one server can be checked for overlap
    sharers: list[dict] = field(default_factory=list)   # per sharer that ran: name, alignment
    by_sharer: dict = field(default_factory=dict)        # sharer number -> stage -> [ms]
    sharer_calls: dict = field(default_factory=dict)     # sharer number -> projector calls
    speaker: int = 0                                     # who wrote `tokens`: 0 receiver, k sharer k
    sharer_prompt_format: str | None = None              # sharer/t2t: "chat_template" or "plain"
    batch_size: int = 1                          # the fast engine generates batches
    batch_index: int = 0
    batch_tokens_per_second: float | None = None  # decode tokens/s of the whole batch
    cpu_share: float | None = None  # CPU: CPU time got / (wall x threads); None on CUDA
    batch_wait: list[float] = field(default_factory=list)  # batch steps run after this row ended


# --- encoding ------------------------------------------------------------------------------

def prompt_format(tokenizer, chat_template: bool = True) -> str:
    """How chat_ids encodes for this tokenizer: "chat_template", or "plain" text (with the
    tokenizer's own special tokens, e.g. BOS) when it has no template or templates are off."""
    return "chat_template" if chat_template and getattr(tokenizer, "chat_template", None) else "plain"


def chat_ids(tokenizer, text: str, chat_template: bool = True) -> list[int]:
    if prompt_format(tokenizer, chat_template) == "chat_template":
        out = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                            add_generation_prompt=True, tokenize=True,
                                            enable_thinking=False)
        if hasattr(out, "keys"):  # BatchEncoding
            out = out["input_ids"]
        return list(out)
    return tokenizer(text, add_special_tokens=True)["input_ids"]


def _ids_tensor(ids: list[int], device) -> torch.Tensor:
    return torch.tensor([ids], dtype=torch.long, device=device)  # [1, T]


# --- generation ----------------------------------------------------------------------------

def _decode_loop(model, cache, logits, n_max: int, eos: set[int], cfg: RunConfig,
                 generator, timer: Timer, stage: str, on_first=None) -> list[int]:
    """Sample the first token from prefill logits, then one decode step per further token.

    Decode steps = tokens - 1: no forward whose logits would be thrown away."""
    g = cfg.gen
    tok = sample(logits, g.do_sample, g.temperature, g.top_p, g.top_k, generator)  # [1, 1]
    tid = int(tok.item())
    if on_first is not None:
        on_first()
    tokens = [tid]
    while len(tokens) < n_max and (g.ignore_eos or tid not in eos):
        cancel.check()  # Stop / a client gone: end within one decode step
        with timer.span(stage):
            logits = decode_step(model, tok, cache)
            tok = sample(logits, g.do_sample, g.temperature, g.top_p, g.top_k, generator)
        tid = int(tok.item())
        tokens.append(tid)
    return tokens


def engine_of(pipe: Pipeline, cfg: RunConfig) -> str:
    """eager | fast. The fast engine runs one sharer fed the receiver's own ids: several
    sharers or token alignment run on the eager engine (asked for explicitly, a refusal)."""
    from .config import resolve_engine
    engine = resolve_engine(cfg, pipe.device)
    sharers = getattr(pipe, "sharers", None) or []
    if engine == "fast" and (len(sharers) > 1 or any(getattr(s, "aligner", None) for s in sharers)):
        if cfg.engine == "fast" or cfg.batch_size > 1:
            raise UserError("The fast engine runs one sharer that reads the receiver's tokens;"
                            " with several sharers or token alignment use --engine eager and"
                            " --batch_size 1.")
        return "eager"
    return engine


def generate(pipe: Pipeline, cfg: RunConfig, item: Item, mode: str, timer: Timer) -> Generation:
    """One timed generation of `item` in `mode`. The clock starts before tokenization."""
    if engine_of(pipe, cfg) == "fast":
        from .fast import generate_batch
        return generate_batch(pipe, cfg, [item], mode, timer)[0]
    dev = pipe.device
    mem = DeviceMemory(dev, enabled=timer.method != "off").__enter__()
    try:
        return _generate(pipe, cfg, item, mode, timer, mem)
    finally:
        mem.__exit__(None, None, None)


def start_generation(pipe: Pipeline, cfg: RunConfig) -> tuple:
    """What every generation (both engines) sets up before its clock starts, then the clock:
    (sampling generator or None, EOS ids, first-token times, the marker that appends to them,
    wall-clock start, t0 in ns). A stop asked for before this point ends it here."""
    gen = None
    if cfg.gen.do_sample:
        gen = torch.Generator(device=pipe.device).manual_seed(cfg.gen.seed)
    eos = pipe.eos_ids
    ttft: list[int] = []
    cancel.check()
    wall0 = time.time()
    return gen, eos, ttft, (lambda: ttft.append(now_ns())), wall0, now_ns()


def _generate(pipe: Pipeline, cfg: RunConfig, item: Item, mode: str, timer: Timer,
              mem: DeviceMemory) -> Generation:
    dev = pipe.device
    generator, eos, ttft, mark_first, wall0, t0 = start_generation(pipe, cfg)
    sh1 = pipe.sharers[0]
    speaks = mode in ("sharer", "t2t")     # sharer 1 reads its own tokens and writes text
    enc = sh1.tokenizer if speaks else pipe.tokenizer
    fmt = prompt_format(sh1.tokenizer, cfg.chat_template) if speaks and item.input_ids is None else None
    if item.input_ids is not None:
        ids = list(item.input_ids)  # receiver ids: aligned below for a sharer that speaks
    elif mode == "t2t":
        ids = chat_ids(enc, T2T_NOTE_INSTRUCTION.format(question=item.prompt), cfg.chat_template)
    else:
        ids = chat_ids(enc, item.prompt, cfg.chat_template)
    if not ids:
        raise UserError(f"Prompt {item.id} encodes to no tokens; give it some text.")
    check_context(pipe, cfg, len(ids), mode, f"Prompt {item.id}")  # before any forward
    n_instr = len(ids) - 1
    active = list(enumerate(pipe.sharers, start=1)) if mode == "c2c" else \
        [(1, sh1)] if speaks else []
    feeds, aligned = {}, set()
    for k, sl in active:  # each sharer's ids: the receiver's, or aligned (host time, timed)
        if sl.aligner is None or (speaks and item.input_ids is None):
            feeds[k] = ids
        else:
            with timer.span("alignment", who=k):
                feeds[k] = sl.aligner.align(ids if speaks else ids[:n_instr])
            aligned.add(k)
    x = _ids_tensor(ids, dev)
    calls, sharer_tokens, by_calls = 0, [], {}
    with torch.inference_mode():
        if mode == "c2c":
            s_in = [(sl.model, _ids_tensor(feeds[k], dev)) for k, sl in active]
            cache, logits, by_calls = fused_prefill(pipe.receiver, s_in, pipe.fuser, x, timer,
                                                    pipe.fusion)
            calls = sum(by_calls.values())
            tokens = _decode_loop(pipe.receiver, cache, logits, cfg.gen.max_new_tokens, eos, cfg,
                                  generator, timer, "decode", mark_first)
        elif mode == "receiver":  # what a user runs without C2C: one plain prefill
            cache, logits = plain_prefill(pipe.receiver, x, timer, "base_embedding", "base_prefill")
            tokens = _decode_loop(pipe.receiver, cache, logits, cfg.gen.max_new_tokens, eos, cfg,
                                  generator, timer, "decode", mark_first)
        elif mode == "sharer":
            cache, logits = plain_prefill(sh1.model, _ids_tensor(feeds[1], dev), timer,
                                          "teacher_embedding", "teacher_prefill", who=1)
            tokens = _decode_loop(sh1.model, cache, logits, cfg.gen.max_new_tokens, sh1.eos_ids,
                                  cfg, generator, timer, "decode", mark_first)
        elif mode == "t2t":
            cache, logits = plain_prefill(sh1.model, _ids_tensor(feeds[1], dev), timer,
                                          "teacher_embedding", "teacher_prefill", who=1)
            sharer_tokens = _decode_loop(sh1.model, cache, logits, cfg.gen.t2t_note_tokens,
                                         sh1.eos_ids, _no_ignore_eos(cfg), generator, timer,
                                         "sharer_decode")
            del cache
            if item.input_ids is not None and sh1.aligner is None:
                # exact-length prompt: the note's ids, then the prompt's
                ids2 = [t for t in sharer_tokens if t not in sh1.eos_ids] + list(item.input_ids)
            elif item.input_ids is not None:  # the note re-encoded in the receiver's tokens
                note = sh1.tokenizer.decode(sharer_tokens, skip_special_tokens=True)
                ids2 = pipe.tokenizer(note, add_special_tokens=False)["input_ids"] + list(item.input_ids)
            else:
                note = sh1.tokenizer.decode(sharer_tokens, skip_special_tokens=True).strip()
                ids2 = chat_ids(pipe.tokenizer, T2T_ANSWER_TEMPLATE.format(
                    note=note, question=item.prompt), cfg.chat_template)
            check_context(pipe, cfg, len(ids), mode, f"Prompt {item.id}", len(ids2))
            x2 = _ids_tensor(ids2, dev)
            # the receiver reads note + question in one plain prefill, as a T2T user would run it
            cache, logits = plain_prefill(pipe.receiver, x2, timer, "base_embedding", "base_prefill")
            tokens = _decode_loop(pipe.receiver, cache, logits, cfg.gen.max_new_tokens, eos, cfg,
                                  generator, timer, "decode", mark_first)
            ids = ids2  # prompt_tokens = what the receiver read
        else:
            raise UserError(f"Unknown mode {mode}; use one of {', '.join(MODES)}.")
    t_end = now_ns()
    wall1 = time.time()
    stages = timer.finish()
    mem.__exit__(None, None, None)  # the peaks of this generation (stops the RSS poller)
    who = [{"model": sl.name, "alignment": sl.alignment if k in aligned else "none"}
           for k, sl in active]
    gen = Generation(tokens, stages, ttft[0] - t0, t_end - t0, len(ids), calls, sharer_tokens,
                      mem.allocated_mb, mem.reserved_mb, wall0, wall1, sharers=who,
                      by_sharer=timer.by_who, sharer_calls=by_calls,
                      speaker=1 if mode == "sharer" else 0, sharer_prompt_format=fmt)
    gen.cpu_share = mem.cpu_share
    return gen


def _no_ignore_eos(cfg: RunConfig) -> RunConfig:
    """The T2T note always stops at EOS (it is capped by t2t_note_tokens)."""
    if not cfg.gen.ignore_eos:
        return cfg
    return replace(cfg, gen=replace(cfg.gen, ignore_eos=False))


# --- records -------------------------------------------------------------------------------

def timing_fields(g: Generation) -> tuple[dict, list[float]]:
    """The seed's timing fields plus the derived ones (MEASURE.md), and the decode steps."""
    # Round the raw spans first and derive every sum from the rounded values, so the fields in
    # the file add up exactly (decode_total = sum of steps; e2e = stages + other).
    s = {k: [r3(x) for x in v] for k, v in g.stages.items()}
    tot = {f: r3(sum(s.get(k, ()))) for k, f in STAGES.items()}
    sharers = sharer_entries(g)
    for stage, f in SHARER_STAGES.items():  # totals = the sum of the per-sharer entries
        if sharers and abs(sum(e[f] for e in sharers) - tot[STAGES[stage]]) < 0.002:
            tot[STAGES[stage]] = r3(sum(e[f] for e in sharers))
    steps = s["decode"]
    n = len(g.tokens)
    dec_total = tot["decode_total_ms"]
    dec_avg = dec_total / len(steps) if steps else 0.0
    proj_total = tot["projector_total_ms"]
    e2e = r3(g.e2e_ns / 1e6)
    wait = r3(sum(r3(x) for x in g.batch_wait))
    ttft = g.ttft_ns / 1e6
    t = {
        "base_embedding_ms": tot["base_embedding_ms"],
        "base_prefill_ms": tot["base_prefill_ms"],
        "teacher_embedding_ms": tot["teacher_embedding_ms"],
        "teacher_prefill_ms": tot["teacher_prefill_ms"],
        "projector_total_ms": proj_total,
        "projector_avg_ms": proj_total / g.projector_calls if g.projector_calls else 0.0,
        "projector_calls": g.projector_calls,
        "decode_total_ms": dec_total,
        "decode_avg_ms": dec_avg,
        "num_generated_tokens": n,
        "tokens_per_second": 1000.0 / dec_avg if dec_avg > 0 else 0.0,
        "prompt_tokens": g.prompt_tokens,
        "ttft_ms": ttft,
        "e2e_ms": e2e,
        "other_ms": e2e - sum(tot.values()) - wait,
        "batch_wait_ms": wait,
        "tpot_ms": (e2e - ttft) / (n - 1) if n > 1 else 0.0,
        "e2e_tokens_per_second": n / (e2e / 1000.0) if e2e > 0 else 0.0,
        "decode_p50_ms": percentile(steps, 50),
        "decode_p90_ms": percentile(steps, 90),
        "decode_p99_ms": percentile(steps, 99),
        "peak_memory_mb": g.peak_memory_mb,                    # None = unknown, never 0
        "peak_memory_reserved_mb": g.peak_memory_reserved_mb,
        "cpu_share": g.cpu_share,                              # None on CUDA
        "sharer_generated_tokens": len(g.sharer_tokens),
        "sharer_decode_ms": tot["sharer_decode_ms"],
    }
    t["batch_tokens_per_second"] = (t["tokens_per_second"] if g.batch_tokens_per_second is None
                                    else g.batch_tokens_per_second)
    ints = {"projector_calls", "num_generated_tokens", "prompt_tokens", "sharer_generated_tokens"}
    t = {k: (v if k in ints or v is None else r3(v)) for k, v in t.items()}
    t["alignment_ms"] = tot["alignment_ms"]
    t["sharers"] = sharers
    return t, steps


def sharer_entries(g: Generation) -> list[dict]:
    """One entry per sharer that ran: its model, how its ids were made, its stage times (sums of
    the rounded spans, like the totals) and projector calls."""
    out = []
    for k, who in enumerate(g.sharers, start=1):
        st = g.by_sharer.get(k, {})
        e = {"model": who["model"], "alignment": who["alignment"]}
        e.update({f: r3(sum(r3(x) for x in st.get(stage, []))) for stage, f in SHARER_STAGES.items()})
        e["projector_calls"] = int(g.sharer_calls.get(k, 0))
        out.append(e)
    return out


@functools.lru_cache(maxsize=1)
def _git_commit() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


@functools.lru_cache(maxsize=1)
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_settings(cfg: RunConfig, device: torch.device, dtype: torch.dtype,
                 timer_method: str) -> dict:
    """`run.settings`: what of this run changes its numbers (records.SETTINGS_KEYS), resolved
    ("auto" never appears), from the settings alone, so --resume can check a file before any
    model loads."""
    from .config import resolve_engine
    f, g = cfg.fuser, cfg.gen
    fuser = f.source or f"untrained {f.hidden_dim}/{f.intermediate_dim}/{f.num_layers}"
    return {
        "receiver": cfg.receiver.source, "sharers": [s.source for s in cfg.sharers],
        "fuser": fuser, "alignment": cfg.alignment, "fusion": cfg.fusion,
        "dtype": str(dtype).removeprefix("torch."), "device": device.type,
        "engine": resolve_engine(cfg, device), "max_new_tokens": g.max_new_tokens,
        "ignore_eos": g.ignore_eos, "do_sample": g.do_sample,
        # sampling knobs only matter when sampling
        "temperature": g.temperature if g.do_sample else None,
        "top_p": g.top_p if g.do_sample else None, "top_k": g.top_k if g.do_sample else None,
        "seed": g.seed, "t2t_note_tokens": g.t2t_note_tokens,
        "chat_template": cfg.chat_template, "timing_method": timer_method,
    }


def planned_settings(cfg: RunConfig, sweep: bool = False) -> dict:
    """run_settings before anything loads (device and dtype resolved as load_pipeline will).
    A sweep's records take their max_new_tokens from their shape (the input digest), so its
    settings hold none."""
    from .loading import resolve_device, resolve_dtype
    device = resolve_device(cfg.device)
    s = run_settings(cfg, device, resolve_dtype(cfg.dtype, device, cfg.cpu_dtype),
                     Timer(device, cfg.timing).method_name)
    return sweep_settings(s) if sweep else s


#: What to do instead when --resume meets a file made with other settings.
RESUME_FIX = ("rerun with the settings it was made with, pass --append instead of --resume to"
              " add a second run beside it (report then shows the two runs apart), or give"
              " another --output")


def check_resume_settings(path: str, cfg: RunConfig, sweep: bool = False) -> None:
    """--resume into `path`: refuse, before any model loads, a file whose records were made with
    other settings (one sentence naming them)."""
    conflict = settings_conflict(path, planned_settings(cfg, sweep), RESUME_FIX)
    if conflict:
        raise UserError(conflict)


def sweep_settings(settings: dict) -> dict:
    return {**settings, "max_new_tokens": None, "ignore_eos": True}


def with_settings(meta: dict, settings: dict) -> dict:
    """The `run` object with these settings and their digest."""
    return {**meta, "settings": settings, "settings_digest": settings_digest(settings)}


def run_metadata(pipe: Pipeline, cfg: RunConfig, timer_method: str) -> dict:
    """The flat `run` object written into every record of one invocation."""
    import transformers
    dev = pipe.device
    g = cfg.gen
    settings = run_settings(cfg, dev, pipe.dtype, timer_method)
    return {
        "run_id": uuid.uuid4().hex[:12],
        "frontend": FRONTEND.get(),
        "started_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "tool_version": __version__,
        "git_commit": _git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "cuda": torch.version.cuda if dev.type == "cuda" else None,
        "cpu": _cpu_name(),
        "threads": torch.get_num_threads(),
        "dtype": str(pipe.dtype).removeprefix("torch."),
        "attn_implementation": pipe.info["attn_implementation"],
        "timing_method": timer_method,
        "warmup": cfg.warmup,
        "preset": cfg.preset,
        "receiver": pipe.info["receiver"],
        "sharer": pipe.info["sharer"],
        "weights": pipe.info["weights"],
        "weights_mb": pipe.info.get("weights_mb"),
        "fuser": pipe.info["fuser"],
        "fuser_hash": pipe.info["fuser_hash"],
        "model_revisions": pipe.info["model_revisions"],
        "sharers": [sl.name for sl in pipe.sharers],
        "alignment": [sl.alignment for sl in pipe.sharers],
        "fusion": pipe.fusion,
        "max_new_tokens": g.max_new_tokens,
        "do_sample": g.do_sample,
        "temperature": g.temperature,
        "top_p": g.top_p,
        "top_k": g.top_k,
        "seed": g.seed,
        "ignore_eos": g.ignore_eos,
        "world_size": 1,  # torchrun runs (distributed.py) set these per rank
        "rank": 0,
        "engine": engine_of(pipe, cfg),
        "compile_s": 0.0,   # the fast engine's compile/capture in warm-up (set by run_many)
        "settings": settings,
        "settings_digest": settings_digest(settings),
    }


def make_record(pipe: Pipeline, item: Item, mode: str, repeat: int, g: Generation,
                meta: dict) -> dict:
    timing, steps = timing_fields(g)
    rec = {
        "id": item.id,
        "input_digest": item.digest,
        "mode": mode,
        "repeat": repeat,
        "prompt": item.prompt,
        "response": (pipe.sharers[g.speaker - 1].tokenizer if g.speaker else pipe.tokenizer)
        .decode(g.tokens, skip_special_tokens=True),
        "model_config": {"base_model": pipe.info["receiver"], "teacher_model": pipe.info["sharer"]},
        "timing": timing,
        "decode_step_times_ms": steps,
        # the invocation's metadata, plus when this generation ran (Unix seconds)
        "run": {**meta, "gen_start_unix": round(g.wall_start, 6),
                "gen_end_unix": round(g.wall_end, 6)},
        "batch_size": g.batch_size,
        "batch_index": g.batch_index,
    }
    # the answer hit max_new_tokens before EOS (null when EOS was ignored on purpose)
    rec["truncated"] = None if meta.get("ignore_eos") else bool(
        g.tokens and len(g.tokens) >= meta.get("max_new_tokens", len(g.tokens) + 1)
        and g.tokens[-1] not in pipe.eos_ids)
    if len(pipe.sharers) > 1:
        rec["model_config"]["teacher_models"] = [sl.name for sl in pipe.sharers]
    if g.sharer_prompt_format:  # how the sharer read the prompt when it spoke for itself
        rec["sharer_prompt_format"] = g.sharer_prompt_format
    if mode == "t2t":
        rec["sharer_note"] = pipe.sharers[0].tokenizer.decode(g.sharer_tokens, skip_special_tokens=True)
        rec["sharer_decode_step_times_ms"] = [r3(x) for x in g.stages["sharer_decode"]]
    if item.answer is not None:
        rec["answer"] = item.answer
        rec["correct"] = score(rec["response"], item.answer, item.answer_kind,
                               getattr(item, "n_choices", None))
    return rec


# --- driving -------------------------------------------------------------------------------

def modes_of(cfg: RunConfig) -> list[str]:
    return list(MODES) if cfg.mode == ALL_MODES else [cfg.mode]


def run_one(pipe: Pipeline, cfg: RunConfig, item: Item, mode: str = "c2c", repeat: int = 0,
            meta: dict | None = None, annotate: bool = False) -> dict:
    timer = Timer(pipe.device, cfg.timing, annotate=annotate)
    g = generate(pipe, cfg, item, mode, timer)
    return make_record(pipe, item, mode, repeat, g,
                       meta if meta is not None else run_metadata(pipe, cfg, timer.method_name))


def warm_up(pipe: Pipeline, cfg: RunConfig, item: Item, modes: Iterable[str]) -> None:
    """`cfg.warmup` full generations per mode with the same shapes; never recorded. The fast
    engine compiles its steps for these shapes first."""
    if engine_of(pipe, cfg) == "fast":
        from .fast import prepare_plan
        prepare_plan(pipe, cfg, [[item]], list(modes))
    for mode in modes:
        for _ in range(cfg.warmup):
            generate(pipe, cfg, item, mode, Timer(pipe.device, cfg.timing))


def to_item(x) -> Item:
    """A PromptItem, or a bare prompt string (its id is filled in by position)."""
    return x if isinstance(x, Item) else Item(id=None, prompt=x)


def run_many(pipe: Pipeline, cfg: RunConfig, items: Iterable, writer: JsonlWriter | None = None,
             on_progress: Callable[[int, int, dict | None], None] | None = None,
             should_stop: Callable[[], bool] | None = None,
             skip: set[tuple] | None = None, meta: dict | None = None,
             keep: bool = True) -> list[dict]:
    """Every item x repeat x mode (modes interleaved per prompt so drift hits them equally).

    Each record is written (and flushed) as soon as it exists. `skip` holds (id, mode, repeat)
    keys already done (--resume). `meta` is the `run` object (default: a new one). A CUDA OOM
    ends the run with the seed's advice; what was written stays. `keep=False` streams: no
    record is held after `writer` and `on_progress` have seen it, and the list returned is
    empty (long runs keep flat memory; the file holds the records)."""
    items = [to_item(x) for x in items]
    for i, it in enumerate(items):
        if it.id is None:
            it.id = i + 1
    modes = modes_of(cfg)
    if engine_of(pipe, cfg) == "fast":
        from .fast import run_many_fast
        check_items(pipe, cfg, items, modes)  # untimed, before any run
        out = run_many_fast(pipe, cfg, items, writer, on_progress, should_stop, skip, meta)
        return out if keep else []
    jobs = [(it, r, m) for it in items for r in range(cfg.repeats) for m in modes
            if not is_done(skip, it, m, r)]
    if meta is None:
        meta = run_metadata(pipe, cfg, Timer(pipe.device, cfg.timing).method_name)
    out: list[dict] = []
    done = 0
    total = len(jobs)
    if on_progress:
        on_progress(0, total, None)
    check_items(pipe, cfg, {id(it): it for it, _, _ in jobs}.values(), modes)  # untimed, before any run
    try:
        with cancel.scope(should_stop):  # a stop also ends the running generation
            if jobs and cfg.warmup:
                cancel.say("warming up")
                warm_up(pipe, cfg, jobs[0][0], modes)
            cancel.say("timed run")
            for k, (it, r, m) in enumerate(jobs):
                if should_stop and should_stop():
                    break
                rec = run_one(pipe, cfg, it, m, r, meta)
                if writer:
                    writer.write(rec)
                done += 1
                if keep:
                    out.append(rec)
                if on_progress:
                    on_progress(k + 1, total, rec)
                del rec
    except cancel.Cancelled:
        pass  # stopped mid-generation: that generation has no record; the others are kept
    except torch.OutOfMemoryError:
        sync_safe(pipe)
        raise OutOfMemory(
            f"CUDA out of memory after {done} record(s); reduce --max_new_tokens or use"
            " shorter prompts (records already written are kept).") from None
    return out


def sync_safe(pipe: Pipeline) -> None:
    if pipe.device.type == "cuda":
        torch.cuda.empty_cache()
        try:
            sync(pipe.device)
        except RuntimeError:
            pass

