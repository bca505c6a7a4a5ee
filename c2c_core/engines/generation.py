"""What every engine produces and how a generation starts and becomes a record: the engine
base shared by the eager engine (runner) and the fast engine (fast), so neither imports the
other's module for it.

- `Generation`: one generation's tokens and timed spans, from either engine;
- `start_generation`: the set-up before the clock (sampling generator, EOS ids, first-token
  marker, stop check), the same in both engines;
- prompts as each model reads them (`chat_ids`, `prompt_format`, the t2t templates);
- records: `timing_fields`, `make_record`, the `run` metadata and its settings (`run_settings`,
  `planned_settings`, `check_resume_settings`).
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
from dataclasses import dataclass, field

import torch

from .. import __version__
from ..measure import cancel
from ..spec.config import ALL_MODES, RunConfig
from ..spec.errors import UserError
from ..models.loading import Pipeline
from ..io.prompts import PromptItem as Item
from ..io.prompts import score
from ..io.records import MODES, SHARER_STAGES, percentile, r3, settings_digest
from ..measure.timing import STAGES, Timer, now_ns, sync
# prompts as each model reads them live in the plan layer; engines and callers read them here too
from ..models.fusion import generators
from ..plan.item import (T2T_ANSWER_TEMPLATE, T2T_NOTE_INSTRUCTION, chat_ids,  # noqa: F401
                         prompt_format, row_seed)


#: Which front end started the run, written into every record as `run.frontend`: "cli" unless
#: the web app's runner (its worker process, or its job thread on ZeroGPU) sets "app".
FRONTEND: contextvars.ContextVar[str] = contextvars.ContextVar("c2c_frontend", default="cli")


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
    sharer_prompt_format: str | None = None  # sharer/t2t: plan.item.prompt_format's value
    batch_size: int = 1                          # the fast engine generates batches
    batch_index: int = 0
    batch_tokens_per_second: float | None = None  # decode tokens/s of the whole batch
    cpu_share: float | None = None  # CPU: CPU time got / (wall x threads); None on CUDA
    batch_wait: list[float] = field(default_factory=list)  # batch steps run after this row ended
    # how close to the limit (hardware.py): set by make_record from the pipeline when None
    decode_floor_ms: float | None = None
    kv_context_tokens: float | None = None  # cached positions a decode step reads, mean (batch: all rows)
    energy_j: float | None = None           # NVML energy of the generation (batch: the whole batch)
    energy_tokens: int | None = None        # tokens that energy produced (batch: all rows)
    sections: list[dict] | None = None      # c2c: the prefill's sections (plan.sections_record)
    late_prepare_ms: float = 0.0  # preparation inside this generation's clock (fast engine)


def engine_of(pipe: Pipeline, cfg: RunConfig) -> str:
    """eager | fast: both engines run every plan (any pair, any number of sharers)."""
    from ..spec.config import resolve_engine
    return resolve_engine(cfg, pipe.device)


def start_generation(pipe: Pipeline, cfg: RunConfig, rows: list[tuple] = ()) -> tuple:
    """What every generation (both engines) sets up before its clock starts, then the clock:
    (one sampling generator per (item, repeat) row, seeded from (seed, prompt id, repeat), or
    None when greedy; EOS ids; first-token times, the marker that appends to them; wall-clock
    start; t0 in ns). A stop asked for before this point ends it here."""
    gens = None
    if cfg.gen.do_sample:
        gens = generators(pipe.device, [row_seed(cfg.gen.seed, it.id, r) for it, r in rows] or
                          [cfg.gen.seed])
    eos = pipe.eos_ids
    ttft: list[int] = []
    cancel.check()
    wall0 = time.time()
    return gens, eos, ttft, (lambda: ttft.append(now_ns())), wall0, now_ns()


def sharers_of(pipe: Pipeline, plan) -> list[dict]:
    """timing.sharers of a record: every sharer that ran, with the alignment it read."""
    return [{"model": pipe.sharers[k - 1].name, "alignment": al} for k, al in plan.ran]


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
        # shapes prepared inside this generation's clock (in other_ms; 0 when all were ready)
        "late_prepare_ms": g.late_prepare_ms,
        # from the row's own last token: a row that stopped early in a batch does not count
        # the steps it waited through for its batch mates (batch_wait_ms; 0 at batch size 1)
        "tpot_ms": (e2e - wait - ttft) / (n - 1) if n > 1 else 0.0,
        "e2e_tokens_per_second": n / ((e2e - wait) / 1000.0) if e2e - wait > 0 else 0.0,
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
    t.update(limit_fields(g, t["decode_avg_ms"]))
    t["alignment_ms"] = tot["alignment_ms"]
    t["sharers"] = sharers
    if g.sections is not None:
        t["sections"] = g.sections
    return t, steps


def limit_fields(g: Generation, decode_avg_ms: float) -> dict:
    """decode_floor_ms and its ratio to the measured step, energy_j and joules_per_token (null
    when unknown: no bandwidth for this card, no NVML, no decode step). Floor and ratio are
    rounded finer than the ms fields (a floor is a fraction of a millisecond)."""
    floor = None if g.decode_floor_ms is None else round(float(g.decode_floor_ms), 6)
    ratio = (round(decode_avg_ms / floor, 3) if floor and decode_avg_ms > 0 else None)
    e = None if g.energy_j is None else round(float(g.energy_j), 3)
    n = g.energy_tokens or len(g.tokens)
    return {"decode_floor_ms": floor, "decode_floor_ratio": ratio, "energy_j": e,
            "joules_per_token": round(e / n, 6) if e is not None and n else None}


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
    from ..spec.config import resolve_engine
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
    from ..models.loading import resolve_device, resolve_dtype
    device = resolve_device(cfg.device)
    s = run_settings(cfg, device, resolve_dtype(cfg.dtype, device, cfg.cpu_dtype),
                     Timer(device, cfg.timing).method_name)
    return sweep_settings(s) if sweep else s


#: What to do instead when --resume meets a file made with other settings.
RESUME_FIX = ("rerun with the settings it was made with, pass --append instead of --resume to"
              " add a second run beside it (report then shows the two runs apart), or give"
              " another --output")


def check_resume_settings(done, where: str, cfg: RunConfig, sweep: bool = False) -> None:
    """--resume into `where`, whose records `done` (records.Done) holds: refuse, before any
    model loads, records made with other settings (one sentence naming them)."""
    conflict = done.settings_conflict(planned_settings(cfg, sweep), where, RESUME_FIX)
    if conflict:
        raise UserError(conflict)


def sweep_settings(settings: dict) -> dict:
    return {**settings, "max_new_tokens": None, "ignore_eos": True}


def with_settings(meta: dict, settings: dict) -> dict:
    """The `run` object with these settings and their digest."""
    return {**meta, "settings": settings, "settings_digest": settings_digest(settings)}


#: Runs that took their `run` metadata in this process (pid: a forked process starts at 0).
_PROCESS_RUNS = {"pid": None, "runs": 0}


def fresh_process() -> bool:
    """True for the first run of this process (run.fresh_process), False for every later one.
    Counted per pid, so a forked process (a ZeroGPU call's worker) starts fresh, and a worker
    the `spaces` package reuses for a later call reads False: what that call found prepared is
    read, not assumed."""
    pid = os.getpid()
    if _PROCESS_RUNS["pid"] != pid:
        _PROCESS_RUNS.update(pid=pid, runs=0)
    _PROCESS_RUNS["runs"] += 1
    return _PROCESS_RUNS["runs"] == 1


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
        "fresh_process": fresh_process(),  # the first run in this process
        "prepared_shapes": 0,  # shapes prepared before the first timed generation (run_many)
        "settings": settings,
        "settings_digest": settings_digest(settings),
    }


def make_record(pipe: Pipeline, item: Item, mode: str, repeat: int, g: Generation,
                meta: dict) -> dict:
    if g.decode_floor_ms is None:
        from .floor import floor_for
        g.decode_floor_ms = floor_for(pipe, g)
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


def modes_of(cfg: RunConfig) -> list[str]:
    return list(MODES) if cfg.mode == ALL_MODES else [cfg.mode]


def to_item(x) -> Item:
    """A PromptItem, or a bare prompt string (its id is filled in by position)."""
    return x if isinstance(x, Item) else Item(id=None, prompt=x)


def sync_safe(pipe: Pipeline) -> None:
    if pipe.device.type == "cuda":
        torch.cuda.empty_cache()
        try:
            sync(pipe.device)
        except RuntimeError:
            pass


def out_of_memory(pipe: Pipeline, written: int, fix: str):
    """After a CUDA out-of-memory error: free what the allocator holds and return the
    one-sentence OutOfMemory to raise, with the run's own remedy (`fix`)."""
    from ..spec.errors import OutOfMemory
    sync_safe(pipe)
    return OutOfMemory(f"CUDA out of memory after {written} record(s); {fix} (records already"
                       " written are kept).")
