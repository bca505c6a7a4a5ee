"""Memory a run will need, estimated from the models' config files before anything loads.

- weights: the parameter count from each model's config (embeddings, attention, gated MLP,
  the output head unless tied), times the bytes of the run's dtype;
- KV cache: layers x kv_heads x head_dim x 2 (keys and values) x dtype bytes, per token and
  sequence, for the receiver and every sharer; on the fast engine per position of the longest
  static cache it may allocate (shapes.cache_len_at_most: the prompt padded to its bucket, then
  a power of two), not per token;
- graph memory (the fast engine on CUDA with its prefills captured as CUDA graphs): the one
  shared graph pool, about the largest captured prefill's activations, the decode step's
  logits, and the cuBLAS workspaces of the engine's two streams (graph_bytes below);
- the device's memory now: a CPU's available RAM (psutil, and the container's cgroup limit when
  one is set), a GPU's free memory (torch.cuda.mem_get_info).

Configs come from the shipped dummy configs, the packaged GGUFs' headers (smollm2, gemma3), a
local folder's config.json, or the hub cache; a model whose config is not on this machine yet
is estimated after its config is fetched (ModelManager.preflight), still before any weight
loads. No torch at import.
"""

from __future__ import annotations

import functools
import os
import struct
from dataclasses import dataclass

from ..spec.errors import UserError

GB = 1e9
#: Bytes per element of the dtypes a run may use.
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
#: Share of the device's free memory a run may plan to use (the rest: activations, the
#: allocator's slack, the process itself).
USABLE_SHARE = 0.85
#: Default of C2C_MAX_CPU_PARAMS_M: million parameters of the models together on a CPU in the
#: app (the 0.6B + 4B pairs fit; the 7-8B ones do not).
CPU_PARAMS_M = 6_000


def cpu_params_cap() -> int:
    """The app's cap on parameters on a CPU (C2C_MAX_CPU_PARAMS_M, in millions)."""
    try:
        v = int(os.environ.get("C2C_MAX_CPU_PARAMS_M", "").strip() or CPU_PARAMS_M)
    except ValueError:
        v = CPU_PARAMS_M
    return max(v, 1) * 1_000_000


# --- configs -----------------------------------------------------------------------------------

@functools.lru_cache(maxsize=16)
def gguf_config(path: str) -> dict | None:
    """A GGUF's architecture as the config fields the estimates use (None when unreadable)."""
    try:
        from .limits import gguf_fields
        m = gguf_fields(path)
    except (OSError, ValueError, struct.error):
        return None
    arch = m.get("general.architecture")
    g = lambda k: m.get(f"{arch}.{k}")  # noqa: E731
    if not arch or not g("block_count") or not g("embedding_length"):
        return None
    heads = g("attention.head_count") or 1
    hidden = g("embedding_length")
    return {"num_hidden_layers": g("block_count"), "hidden_size": hidden,
            "intermediate_size": g("feed_forward_length") or 4 * hidden,
            "num_attention_heads": heads,
            "num_key_value_heads": g("attention.head_count_kv") or heads,
            "head_dim": g("attention.key_length") or hidden // heads,
            "vocab_size": m.get("tokenizer.ggml.tokens") or 32000,
            "tie_word_embeddings": True, "max_position_embeddings": g("context_length")}


def spec_config(spec) -> dict | None:
    """A ModelSpec's config from files on this machine (no weights, no network); None when
    it is not here yet."""
    from .limits import _read_config
    src = spec.source
    if src.startswith("dummy:"):
        from ..spec.config import CONFIGS
        name = src[len("dummy:"):]
        return _read_config(name if name.endswith(".json") else os.path.join(CONFIGS, f"{name}.json"))
    from ..models.loading import source_kind
    if source_kind(src) == "gguf":
        from ..models.loading import cache_root, gguf_path
        if src == "gemma3":  # assembled from its packages on first load: only a ready copy
            path = os.path.join(cache_root(), "gemma3", "gemma-3-270m-q4_k_m.gguf")
            return gguf_config(path) if os.path.isfile(path + ".ok") else None
        try:
            return gguf_config(gguf_path(src))
        except UserError:
            return None
    if os.path.isdir(src):
        return _read_config(os.path.join(src, "config.json"))
    try:
        from huggingface_hub import try_to_load_from_cache
        path = try_to_load_from_cache(src, "config.json", revision=spec.revision)
    except Exception:  # noqa: BLE001 - not a repo id, no cache: estimated after the fetch
        return None
    return _read_config(path) if isinstance(path, str) else None


def _text(d: dict) -> dict:
    t = d.get("text_config")
    return t if isinstance(t, dict) and not d.get("num_hidden_layers") else d


def _int(d: dict, *keys, default: int = 0) -> int:
    for k in keys:
        v = d.get(k)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return default


def param_count(config: dict) -> int:
    """Parameters of a decoder-only transformer from its config (embeddings, attention
    projections, a gated MLP, norms, and the output head unless tied)."""
    d = _text(config)
    hidden = _int(d, "hidden_size", "n_embd", "d_model")
    layers = _int(d, "num_hidden_layers", "n_layer", "num_layers")
    heads = _int(d, "num_attention_heads", "n_head", default=1)
    kv = _int(d, "num_key_value_heads", default=heads)
    hd = _int(d, "head_dim", default=hidden // max(heads, 1))
    inter = _int(d, "intermediate_size", "n_inner", "ffn_dim", default=4 * hidden)
    vocab = _int(d, "vocab_size", default=32000)
    attn = hidden * heads * hd * 2 + hidden * kv * hd * 2
    per_layer = attn + 3 * hidden * inter + 2 * hidden
    head = 0 if d.get("tie_word_embeddings", True) else vocab * hidden
    return vocab * hidden + layers * per_layer + hidden + head


def kv_bytes_per_token(config: dict, dtype_bytes: int) -> int:
    """KV cache bytes of one token of one sequence: layers x kv_heads x head_dim x 2 x bytes."""
    d = _text(config)
    hidden = _int(d, "hidden_size", "n_embd", "d_model")
    heads = _int(d, "num_attention_heads", "n_head", default=1)
    kv = _int(d, "num_key_value_heads", default=heads)
    hd = _int(d, "head_dim", default=hidden // max(heads, 1))
    return _int(d, "num_hidden_layers", "n_layer", "num_layers") * kv * hd * 2 * dtype_bytes


#: Activations of one decoder layer live at once in a prefill, per position, in units of the
#: hidden size: the residual stream, the normed input, queries, keys, values (each counted at
#: the hidden size: an upper bound under grouped-query attention) and the attention output.
ACT_HIDDEN = 6
#: ... and in units of the MLP's intermediate size: the gate, the up projection, their product.
ACT_INTERMEDIATE = 3
#: cuBLAS workspace per stream: PyTorch's default when CUBLAS_WORKSPACE_CONFIG is unset
#: (aten/src/ATen/cuda/CublasHandlePool.cpp, parseChosenWorkspaceSize: 4096 KiB x 8 = 32 MiB on
#: Hopper, 4096 KiB x 2 + 16 KiB x 8 elsewhere); the larger, as the GPU is not known here.
CUBLAS_WORKSPACE_BYTES = 4096 * 8 * 1024
#: The fast engine's streams that get a cuBLAS workspace of their own for its graphs: one
#: warm-up stream and one capture stream per engine (FastEngine.streams()).
GRAPH_STREAMS = 2


def graph_bytes(config: dict, batch: int, q: int, cache_len: int, dtype_bytes: int,
                attn: str = "sdpa", sampling: bool = False) -> int:
    """The fast engine's graph memory for a model (config), estimated: its captured graphs share
    one pool, which holds about the largest capture's working memory (a prefill of `batch` x
    `q` positions into a cache of `cache_len`), plus the streams' cuBLAS workspaces.

    - activations: batch x q x (ACT_HIDDEN x hidden + ACT_INTERMEDIATE x intermediate) x dtype
      bytes (one layer's live tensors; the pool reuses them layer after layer);
    - the attention masks, as bools and in the dtype (sdpa and eager): a prefill's queries
      attend over the positions up to their own (engine.cache_view), batch x q x q; the decode
      step's one query over the whole cache, batch x cache_len;
    - eager attention only (it materialises the scores): the larger of the prefill's batch x
      heads x q x q and the step's batch x heads x cache_len, in the dtype plus the softmax's
      float32 copy (sdpa's kernels do not);
    - the decode step's logits: batch x vocab in the dtype, and in float32 when sampling (the
      step returns them for the sampler);
    - GRAPH_STREAMS x CUBLAS_WORKSPACE_BYTES."""
    d = _text(config)
    hidden = _int(d, "hidden_size", "n_embd", "d_model")
    heads = _int(d, "num_attention_heads", "n_head", default=1)
    inter = _int(d, "intermediate_size", "n_inner", "ffn_dim", default=4 * hidden)
    vocab = _int(d, "vocab_size", default=32000)
    b, q, L = max(batch, 1), max(q, 0), max(cache_len, q, 0)
    act = b * q * (ACT_HIDDEN * hidden + ACT_INTERMEDIATE * inter) * dtype_bytes
    mask = b * (q * q + L) * (1 + dtype_bytes)
    scores = b * heads * max(q * q, L) * (dtype_bytes + 4) if attn == "eager" else 0
    logits = b * vocab * (dtype_bytes + (4 if sampling else 0))
    return act + mask + scores + logits + GRAPH_STREAMS * CUBLAS_WORKSPACE_BYTES


def graphs_on(device: str) -> bool:
    """Whether the fast engine captures its prefills as CUDA graphs on `device`
    (C2C_FAST_PREFILL_GRAPHS: auto = on CUDA; and torch.compile on, C2C_FAST_COMPILE)."""
    if not device.startswith("cuda"):
        return False
    if os.environ.get("C2C_FAST_COMPILE", "1").strip().lower() in ("0", "false", "no"):
        return False
    v = os.environ.get("C2C_FAST_PREFILL_GRAPHS", "auto").strip().lower()
    return v in ("", "auto") or v not in ("0", "false", "no")


# --- devices -----------------------------------------------------------------------------------

def canonical_device(name: str | None) -> str:
    """One spelling per device: '' / auto stay auto, 'cpu:N' is 'cpu', 'cuda' is 'cuda:0' and
    'cuda:N' names a visible GPU. Anything else is refused with one sentence."""
    s = (name or "").strip().lower()
    if s in ("", "auto"):
        return "auto"
    kind, _, index = s.partition(":")
    if kind == "cpu" and (not index or index.isdigit()):
        return "cpu"
    if kind == "cuda" and (not index or index.isdigit()):
        import torch
        try:
            n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        except Exception:  # noqa: BLE001 - a runtime that hides its GPUs here (ZeroGPU)
            n = 1 if torch.cuda.is_available() else 0
        if n == 0:
            raise UserError(f"Device {name} asked for CUDA, but no CUDA GPU is visible; use cpu.")
        i = int(index or 0)
        if i >= n:
            raise UserError(f"Device {name} is not a GPU here; use cuda:0 to cuda:{n - 1}.")
        return f"cuda:{i}"
    raise UserError(f"Device {str(name)[:40]} is not a device this server runs on; use auto,"
                    " cpu or cuda[:N].")


def _cgroup_free() -> int | None:
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            cap = f.read().strip()
        if cap == "max":
            return None
        with open("/sys/fs/cgroup/memory.current") as f:
            return max(int(cap) - int(f.read().strip()), 0)
    except (OSError, ValueError):
        return None


def free_bytes(device: str) -> int | None:
    """Memory free on a device now (None when it cannot be read)."""
    if device.startswith("cuda"):
        if os.environ.get("SPACES_ZERO_GPU"):
            return None  # ZeroGPU: CUDA exists only inside the @spaces.GPU call
        index = device.partition(":")[2] or "0"
        try:  # nvidia-smi first: reading it creates no CUDA context in the web server
            import subprocess
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.free",
                                  "--format=csv,noheader,nounits", "-i", index],
                                 capture_output=True, text=True, timeout=3)
            if out.returncode == 0 and out.stdout.strip().isdigit():
                return int(out.stdout.strip()) * 2**20
        except (OSError, subprocess.SubprocessError):
            pass
        try:
            import torch
            return int(torch.cuda.mem_get_info(torch.device(device))[0])
        except Exception:  # noqa: BLE001 - unknown: nothing is refused for memory
            return None
    try:
        import psutil
        free = int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001
        return None
    cg = _cgroup_free()
    return min(free, cg) if cg is not None else free


# --- the estimate ------------------------------------------------------------------------------

@dataclass
class Estimate:
    weights: int          # bytes of all models' weights
    kv: int               # bytes of the KV caches of every sequence at its longest
    params: int           # parameters of all models
    unknown: list[str]    # models whose config is not on this machine (not counted)
    positions: int = 0    # cache positions per sequence counted (the fast engine's bucket)
    graphs: int = 0       # the fast engine's graph memory on CUDA (graph_bytes); 0 otherwise

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.graphs


def dtype_name(cfg, device: str) -> str:
    from ..models.loading import resolve_device, resolve_dtype
    dev = resolve_device(None if device == "auto" else device)
    return str(resolve_dtype(cfg.dtype, dev, cfg.cpu_dtype)).removeprefix("torch.")


def estimate(cfg, batch: int = 1, tokens: int = 0, configs: dict | None = None) -> Estimate:
    """Weights of cfg's models plus the KV cache of `batch` sequences of `tokens` tokens, in
    the dtype the run will use. `configs` (source -> config dict) replaces the file lookup."""
    device = canonical_device(cfg.device)
    nbytes = DTYPE_BYTES.get(dtype_name(cfg, device), 4)
    positions = tokens
    fast = tokens > 0 and _fast(cfg, device)
    if fast:  # its static caches: padded prompt, length bucket
        from .shapes import cache_len_at_most
        positions = cache_len_at_most(tokens)
    # graphs: on CUDA (auto: when a GPU is visible), the largest prefill a graph may capture:
    # every token a prompt (padded to its bucket), into the longest cache
    cuda = device.startswith("cuda") or (device == "auto" and _cuda())
    q = 0
    if fast and graphs_on("cuda" if cuda else "cpu"):
        from .shapes import prompt_bucket
        q = prompt_bucket(tokens)
    attn = getattr(cfg, "attn_implementation", None) or "sdpa"
    sampling = bool(getattr(getattr(cfg, "gen", None), "do_sample", False))
    weights = kv = params = graphs = 0
    unknown: list[str] = []
    for spec in (cfg.receiver, *cfg.sharers):
        c = (configs or {}).get(spec.source) or spec_config(spec)
        if c is None:
            unknown.append(spec.source)
            continue
        n = param_count(c)
        params += n
        weights += n * nbytes
        kv += kv_bytes_per_token(c, nbytes) * max(positions, 0) * max(batch, 1)
        if q:  # one pool for every model's graphs: the largest capture
            graphs = max(graphs, graph_bytes(c, batch, q, positions, nbytes, attn, sampling))
    return Estimate(weights, kv, params, unknown, positions, graphs)


def _fast(cfg, device: str) -> bool:
    """Whether the run will use the fast engine (static caches sized in buckets)."""
    from ..spec.config import resolve_engine
    on_cuda = device.startswith("cuda") or (device == "auto" and _cuda())
    return resolve_engine(cfg, "cuda" if on_cuda else "cpu") == "fast"


def _gb(n: float) -> str:
    return f"{n / GB:,.1f} GB"


def check_fits(cfg, batch: int = 1, tokens: int = 0, held_bytes: int = 0,
               what: str = "This run", configs: dict | None = None,
               free: int | None = None, cpu_params_cap: int | None = None,
               host: str = "this server") -> Estimate:
    """Refuse, in one sentence, a run whose models and KV cache would not fit the device's free
    memory (plus `held_bytes`, what the models loaded now hold and a swap would free), or whose
    models are over `cpu_params_cap` parameters on a CPU."""
    est = estimate(cfg, batch, tokens, configs)
    device = canonical_device(cfg.device)
    on_cpu = device == "cpu" or (device == "auto" and not _cuda())
    if cpu_params_cap and on_cpu and est.params > cpu_params_cap:
        raise UserError(f"These models have {est.params / 1e9:.1f} billion parameters together;"
                        f" this server runs at most {cpu_params_cap / 1e9:.1f} billion on a CPU"
                        " (C2C_MAX_CPU_PARAMS_M): pick smaller models.")
    if free is None:
        free = free_bytes("cpu" if on_cpu else ("cuda:0" if device == "auto" else device))
    if free is None:
        return est
    have = int(free * USABLE_SHARE) + held_bytes
    if est.total > have:
        where = "RAM" if on_cpu else "GPU memory"
        kv = (f" + a KV cache of {_gb(est.kv)} for {batch:,} x {tokens:,} tokens"
              + (f" (the fast engine's static caches hold up to {est.positions:,} positions)"
                 if est.positions > tokens else "") if est.kv else "")
        graphs = (f" + {_gb(est.graphs)} of CUDA-graph memory (the fast engine's captured"
                  " prefills; C2C_FAST_PREFILL_GRAPHS=0 runs without)" if est.graphs else "")
        fix = ("pick smaller models (or dtype bfloat16)" if est.weights > have
               else "use a smaller batch or shorter lengths")
        raise UserError(f"{what} needs about {_gb(est.total)} (weights {_gb(est.weights)}{kv}"
                        f"{graphs}),"
                        f" more than the {_gb(have)} of {where} {host} can give it now:"
                        f" {fix}.")
    return est


def check_batches(cfg, items, what: str = "This run's largest batch") -> None:
    """Once the prompts are known (a dataset, a file) and cfg's models are loaded: the KV cache
    of the largest batch (cfg.batch_size of the longest prompts, a character counted as a token
    when the prompt is text) within the free memory. The weights are in memory already."""
    items = list(items or ())
    if not items or cfg.batch_size <= 1:
        return
    longest = max((len(ids) if (ids := getattr(it, "input_ids", None)) is not None
                   else len(getattr(it, "prompt", "") or "")) for it in items)
    est = estimate(cfg)
    check_fits(cfg, min(cfg.batch_size, len(items)), longest + cfg.gen.max_new_tokens,
               held_bytes=est.weights, what=what)


def _cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False
