"""C2CProjector and the fuser (one projector per receiver layer), checkpoint-compatible with the
published `nics-efc/C2C_Fuser` folders (module and parameter names as in C2C_REFERENCE.md).

Written from the reference description; the eval-mode gate is a hard 0/1 on the gate logit.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..spec import config as _config
from ..spec.errors import UserError


class FFNBlock(nn.Module):
    """y = x + W2(GELU(W1(RMSNorm(x)))), bias-free W1/W2."""

    def __init__(self, hidden: int, inter: int, dropout: float):
        super().__init__()
        # torch's RMSNorm normalises and scales in float32 and rounds once, as the reference's;
        # the golden vectors (tests/test_golden.py) hold it bit-equal in fp32 and bf16
        self.norm = nn.RMSNorm(hidden, eps=1e-6)
        self.w1 = nn.Linear(hidden, inter, bias=False)
        self.w2 = nn.Linear(inter, hidden, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.dropout(self.w2(F.gelu(self.w1(self.norm(x)))))


class MLP(nn.Module):
    def __init__(self, hidden: int, inter: int, n: int, dropout: float):
        super().__init__()
        self.blocks = nn.ModuleList(FFNBlock(hidden, inter, dropout) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return x


class C2CProjector(nn.Module):
    """Maps a sharer layer's (K, V) into the receiver's KV space and adds it as a gated residual."""

    def __init__(self, source_dim: int, target_dim: int, source_num_heads: int,
                 target_num_heads: int, hidden_dim: int = 1024, intermediate_dim: int = 1024,
                 num_layers: int = 3, dropout: float = 0.1, initial_temperature: float = 1.0,
                 final_temperature: float = 0.001, anneal_steps: int = 1929,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        if num_layers < 2:
            raise UserError(f"C2CProjector num_layers={num_layers}; it must be at least 2.")
        self.init_args = dict(
            source_dim=source_dim, target_dim=target_dim, source_num_heads=source_num_heads,
            target_num_heads=target_num_heads, hidden_dim=hidden_dim,
            intermediate_dim=intermediate_dim, num_layers=num_layers, dropout=dropout,
            initial_temperature=initial_temperature, final_temperature=final_temperature,
            anneal_steps=anneal_steps, dtype=dtype)
        self.target_dim = target_dim
        self.target_num_heads = target_num_heads
        in_dim = source_dim * source_num_heads + target_dim * target_num_heads
        out_dim = target_dim * target_num_heads
        for p in ("key", "value"):
            setattr(self, f"{p}_in", nn.Linear(in_dim, hidden_dim))
            setattr(self, f"{p}_mlp1", MLP(hidden_dim, intermediate_dim, 1, dropout))
            setattr(self, f"{p}_proj_mlp2", MLP(hidden_dim, intermediate_dim, num_layers - 2, dropout))
            setattr(self, f"{p}_proj_out", nn.Linear(hidden_dim, out_dim))
            setattr(self, f"{p}_scalar_mlp2", MLP(hidden_dim, hidden_dim, 1, dropout))
            setattr(self, f"{p}_scalar_head", nn.Linear(hidden_dim, target_num_heads))
            setattr(self, f"{p}_gate_logit", nn.Parameter(torch.zeros(())))
        self.register_buffer("gate_temperature", torch.tensor(float(initial_temperature)))
        self.to(dtype)

    def _path(self, p: str, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        # src: [B, Hs, N, Ds], tgt: [B, Ht, N, Dt]
        B, Ht, N, Dt = tgt.shape
        dt = getattr(self, f"{p}_in").weight.dtype
        x = torch.cat([src.transpose(1, 2).flatten(2), tgt.transpose(1, 2).flatten(2)], -1).to(dt)
        h = getattr(self, f"{p}_mlp1")(getattr(self, f"{p}_in")(x))           # [B, N, hidden]
        proj = getattr(self, f"{p}_proj_out")(getattr(self, f"{p}_proj_mlp2")(h))  # [B, N, Ht*Dt]
        scalar = getattr(self, f"{p}_scalar_head")(getattr(self, f"{p}_scalar_mlp2")(h))  # [B, N, Ht]
        gate = (getattr(self, f"{p}_gate_logit") > 0).float()
        proj = proj.view(B, N, Ht, Dt).transpose(1, 2)                      # [B, Ht, N, Dt]
        weight = torch.sigmoid(scalar).transpose(1, 2).unsqueeze(-1)         # [B, Ht, N, 1]
        # as the reference: its eval gate is a float32 tensor, so the gated residual is added in
        # float32 and rounded once (into the cache dtype)
        return (tgt.float() + gate * weight.float() * proj.float()).to(tgt.dtype)

    def forward(self, source_kv: tuple[torch.Tensor, torch.Tensor],
                target_kv: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return (self._path("key", source_kv[0], target_kv[0]),
                self._path("value", source_kv[1], target_kv[1]))


def last_aligned(n_receiver: int, n_sharer: int) -> dict[int, int]:
    """Receiver layer t reads sharer layer t + (Ls - Lr), clamped to [0, Ls-1]."""
    off = n_sharer - n_receiver
    return {t: min(max(t + off, 0), n_sharer - 1) for t in range(n_receiver)}


@dataclass
class Fuser:
    """Projectors plus the map: receiver layer -> list of (sharer layer, projector index).

    `mapping` is sharer 1's map; `sharer_maps` holds every sharer's (source model index 1, 2, ...
    as in the published `projector_config.json`) and defaults to {1: mapping}."""

    projectors: nn.ModuleList
    mapping: dict[int, list[tuple[int, int]]]
    source: str = "untrained"          # local path, "hub:<repo>/<subfolder>", or "untrained"
    content_hash: str = ""
    trained_for: dict = field(default_factory=dict)  # config.json's base/teacher model names
    sharer_maps: dict[int, dict[int, list[tuple[int, int]]]] | None = None

    def __post_init__(self) -> None:
        if self.sharer_maps is None:
            self.sharer_maps = {1: self.mapping}

    @property
    def untrained(self) -> bool:
        return self.source == "untrained"

    @property
    def num_sharers(self) -> int:
        return len(self.sharer_maps)

    def to(self, device=None, dtype=None) -> "Fuser":
        self.projectors.to(device=device, dtype=dtype)
        return self


def kv_shape(config) -> tuple[int, int, int]:
    """(layers, kv heads, head_dim) of a transformers decoder config."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return cfg.num_hidden_layers, kv, hd


def untrained_fuser(receiver_config, sharer_config, hidden_dim: int = 1024,
                    intermediate_dim: int = 1024, num_layers: int = 3, seed: int = 0) -> Fuser:
    """A fresh fuser (gate logits 0 = closed): a faithful timing stand-in whose answers equal
    the receiver's. `sharer_config` may be a list (one set of Lr projectors per sharer,
    last-aligned layer mapping each)."""
    sharer_configs = sharer_config if isinstance(sharer_config, (list, tuple)) else [sharer_config]
    lr, hr, dr = kv_shape(receiver_config)
    projs, maps, key = [], {}, [lr, hr, dr]
    g = torch.random.fork_rng()
    with g:
        torch.manual_seed(seed)
        for k, sc in enumerate(sharer_configs, start=1):
            ls, hs, ds = kv_shape(sc)
            base = len(projs)
            projs += [C2CProjector(ds, dr, hs, hr, hidden_dim=hidden_dim,
                                   intermediate_dim=intermediate_dim, num_layers=num_layers).eval()
                      for _ in range(lr)]
            maps[k] = {t: [(s, base + t)] for t, s in last_aligned(lr, ls).items()}
            key += [ls, hs, ds]
    # a fresh fuser is fixed by its sizes and seed: hash those, not ~GBs of random weights
    # (one sharer keeps the hash it always had)
    key += [hidden_dim, intermediate_dim, num_layers, seed]
    return Fuser(nn.ModuleList(projs), maps[1], "untrained",
                 hashlib.sha256(json.dumps(key).encode()).hexdigest()[:12], sharer_maps=maps)


# --- the published folder format ---------------------------------------------------------

def _encode(v):
    if isinstance(v, torch.dtype):
        return {"__type__": "torch.dtype", "value": str(v).removeprefix("torch.")}
    return v


def _decode(v, where: str):
    if isinstance(v, dict) and v.get("__type__") == "torch.dtype":
        dt = getattr(torch, str(v.get("value")), None)
        if not isinstance(dt, torch.dtype):
            raise UserError(f"{where} names an unknown dtype {v.get('value')!r}; use e.g. bfloat16.")
        return dt
    return v


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); the fuser folder is damaged.") from None


def save_fuser(fuser: Fuser, folder: str | os.PathLike) -> None:
    """Write `projector_<i>.json/.pt` and `projector_config.json` (receiver idx 0, sharers 1..)."""
    os.makedirs(folder, exist_ok=True)
    for i, p in enumerate(fuser.projectors):
        with open(os.path.join(folder, f"projector_{i}.json"), "w") as f:
            json.dump({"class": "C2CProjector",
                       "init_args": {k: _encode(v) for k, v in p.init_args.items()}}, f, indent=2)
        torch.save(p.state_dict(), os.path.join(folder, f"projector_{i}.pt"))
    cfg = {"0": {str(k): {str(t): [[s, i] for s, i in v] for t, v in m.items()}
                 for k, m in fuser.sharer_maps.items()}}
    with open(os.path.join(folder, "projector_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)


def _folder_hash(files: list[str]) -> str:
    h = hashlib.sha256()
    for path in sorted(files):
        h.update(os.path.basename(path).encode())
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:12]


def find_fuser_dir(folder: str) -> str:
    """Accept the pair folder or its `final/` subfolder."""
    for cand in (folder, os.path.join(folder, "final")):
        if os.path.isfile(os.path.join(cand, "projector_config.json")):
            return cand
    raise UserError(
        f"Fuser folder {folder} has no projector_config.json (nor final/projector_config.json);"
        " pass the folder that holds projector_<i>.json/.pt files.")


def load_fuser(folder: str, source: str | None = None) -> Fuser:
    """Load a published-format fuser folder strictly: every parameter present with its shape;
    the training-only `gate_temperature` buffer may be absent; extra keys are reported."""
    d = find_fuser_dir(folder)
    cfg_path = os.path.join(d, "projector_config.json")
    raw = _read_json(cfg_path)
    try:
        tables = raw["0"]
        maps = {int(k): {int(t): [(int(s), int(i)) for s, i in pairs] for t, pairs in tab.items()}
                for k, tab in tables.items()}
        n = max(i for m in maps.values() for v in m.values() for _, i in v) + 1
    except (KeyError, TypeError, ValueError, AttributeError):
        raise UserError(f"{cfg_path} has no usable receiver 0 <- sharer map of"
                        " {layer: [[sharer_layer, projector_index], ...]}; this tool supports"
                        " receiver 0 with sharers 1, 2, ...") from None
    if sorted(maps) != list(range(1, len(maps) + 1)):
        raise UserError(f"{cfg_path} maps sharers {sorted(maps)}; expected sharers numbered"
                        f" 1..{len(maps)} (receiver 0).")
    projs, files, extras = [], [], []
    for i in range(n):
        jpath, ppath = os.path.join(d, f"projector_{i}.json"), os.path.join(d, f"projector_{i}.pt")
        for p in (jpath, ppath):
            if not os.path.isfile(p):
                raise UserError(f"Fuser file {p} is missing; the folder is incomplete.")
        spec = _read_json(jpath)
        if not isinstance(spec, dict) or spec.get("class", "C2CProjector") != "C2CProjector":
            raise UserError(f"{jpath} does not describe a C2CProjector; only C2CProjector is supported.")
        args = {k: _decode(v, jpath) for k, v in spec.get("init_args", {}).items()}
        try:
            proj = C2CProjector(**args)
        except TypeError as e:
            raise UserError(f"{jpath} has init_args this C2CProjector does not take ({e}).") from None
        try:
            state = torch.load(ppath, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file gets the same sentence
            raise UserError(f"{ppath} cannot be read as a state dict ({type(e).__name__});"
                            " the fuser folder is damaged.") from None
        if not isinstance(state, dict):
            raise UserError(f"{ppath} holds no state dict; the fuser folder is damaged.")
        want = proj.state_dict()
        for k, v in want.items():
            if k == "gate_temperature":
                continue
            if k not in state:
                raise UserError(f"{ppath} is missing tensor '{k}' {tuple(v.shape)}; the checkpoint"
                                " does not match C2CProjector.")
            if tuple(state[k].shape) != tuple(v.shape):
                raise UserError(f"{ppath} tensor '{k}' has shape {tuple(state[k].shape)}, expected"
                                f" {tuple(v.shape)} from {os.path.basename(jpath)}.")
        extras += [f"projector_{i}.pt:{k}" for k in state if k not in want]
        proj.load_state_dict({k: v for k, v in state.items() if k in want}, strict=False)
        projs.append(proj.eval())
        files += [jpath, ppath]
    if extras:
        import warnings
        warnings.warn(f"Fuser {d}: ignoring unexpected tensors {extras[:5]}"
                      f"{' ...' if len(extras) > 5 else ''}")
    trained_for = {}
    for cfg_path in (os.path.join(folder, "config.json"), os.path.join(os.path.dirname(d), "config.json")):
        if os.path.isfile(cfg_path):
            try:
                with open(cfg_path) as f:
                    m = json.load(f).get("model", {})
                trained_for = {k: m[k] for k in ("base_model", "teacher_model") if k in m}
            except (json.JSONDecodeError, AttributeError):
                pass
            break
    return Fuser(nn.ModuleList(projs), maps[1], source or os.path.abspath(folder),
                 _folder_hash(files), trained_for, sharer_maps=maps)


def check_fuser_fits(fuser: Fuser, receiver_config, sharer_config) -> None:
    """A fuser must map existing layers with matching KV shapes, for as many sharers as loaded
    (`sharer_config` may be a list, sharer 1 first)."""
    sharer_configs = sharer_config if isinstance(sharer_config, (list, tuple)) else [sharer_config]
    if fuser.num_sharers != len(sharer_configs):
        raise UserError(f"The fuser maps {fuser.num_sharers} sharer(s), but {len(sharer_configs)}"
                        f" sharer(s) were given; pass exactly {fuser.num_sharers} --teacher_model.")
    lr, hr, dr = kv_shape(receiver_config)
    for k, sc in enumerate(sharer_configs, start=1):
        ls, hs, ds = kv_shape(sc)
        who = "the sharer" if len(sharer_configs) == 1 else f"sharer {k}"
        for t, pairs in fuser.sharer_maps[k].items():
            if not 0 <= t < lr:
                raise UserError(f"The fuser maps receiver layer {t}, but the receiver has {lr} layers;"
                                " the fuser was trained for another pair.")
            for s, i in pairs:
                if not 0 <= s < ls:
                    raise UserError(f"The fuser reads {who}'s layer {s}, but {who} has {ls} layers;"
                                    " the fuser was trained for another pair.")
                a = fuser.projectors[i].init_args
                if (a["source_dim"], a["source_num_heads"], a["target_dim"], a["target_num_heads"]) != (ds, hs, dr, hr):
                    raise UserError(
                        f"Projector {i} expects sharer {a['source_num_heads']}x{a['source_dim']} and receiver"
                        f" {a['target_num_heads']}x{a['target_dim']} KV heads, but the loaded pair has"
                        f" {hs}x{ds} ({who}) and {hr}x{dr}; the fuser was trained for another pair.")


def check_fuser_params(receiver_config, sharer_config, hidden_dim: int, intermediate_dim: int,
                       num_layers: int) -> int:
    """The parameter count of an untrained fuser for this pair (built on the meta device: no
    memory), refused over MAX_FUSER_PARAMS."""
    lr, hr, dr = kv_shape(receiver_config)
    _, hs, ds = kv_shape(sharer_config)
    with torch.device("meta"):
        proj = C2CProjector(ds, dr, hs, hr, hidden_dim=hidden_dim,
                            intermediate_dim=intermediate_dim, num_layers=num_layers)
    n = lr * sum(p.numel() for p in proj.parameters())
    cap = _config.MAX_FUSER_PARAMS  # read at call time (a test or an operator may lower it)
    if n > cap:
        raise UserError(f"An untrained fuser of hidden_dim {hidden_dim}, intermediate_dim"
                        f" {intermediate_dim} and {num_layers} layers has {n / 1e9:.1f} billion"
                        f" parameters for this pair, over the limit of"
                        f" {cap / 1e9:.0f} billion; use smaller sizes.")
    return n
