"""One batched projection: every projector's weights stacked along a leading axis, keys and
values of all layer pairs projected in one pass (one `baddbmm`/`bmm` per linear).

The stacked tensors are built once per fuser; the per-layer projectors' parameters are then
re-pointed at slices of them, so the eager engine (one projector call per layer) and this one
share one copy of the weights. The math is the C2CProjector's (projector.py): RMSNorm normalised and
scaled in float32 and rounded once, exact GELU, hard eval gate, and the gated
residual added in float32 and rounded once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .projector import C2CProjector, Fuser

_SHAPE_ARGS = ("source_dim", "target_dim", "source_num_heads", "target_num_heads", "hidden_dim",
               "intermediate_dim", "num_layers")


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([t.detach() for t in tensors]).contiguous()


# Kept rather than torch.func.vmap over the one projector (issue 17 part 6): vmap's batching rule
# for a linear with bias is a matmul then an add (rounded twice), where nn.Linear's addmm and our
# baddbmm round once, so in bf16 vmap matched the per-pair projectors in 0/36 outputs (ours 36/36)
# and failed tests/test_golden.py's stacked bf16 check (0.039 off); its speed was no issue
# (vmap/ours median 0.99 fp32, 0.96 bf16 on CPU: scripts/bench_stacked.py).
class StackedFuser:
    """All (receiver layer, sharer layer, projector) pairs of a fuser as one batched module.

    Row j < P of every stacked tensor is pair j's key path, row P + j its value path."""

    def __init__(self, fuser: Fuser):
        self.pairs = [(t, s, i) for t, ps in sorted(fuser.mapping.items()) for s, i in ps]
        if not self.pairs:
            raise ValueError("the fuser maps no layers")
        projs: list[C2CProjector] = [fuser.projectors[i] for _, _, i in self.pairs]
        first = {k: projs[0].init_args[k] for k in _SHAPE_ARGS}
        for p in projs[1:]:
            if {k: p.init_args[k] for k in _SHAPE_ARGS} != first:
                raise ValueError("projectors of different sizes cannot be stacked")
        self.ht, self.dt = first["target_num_heads"], first["target_dim"]
        self.n_mlp2 = first["num_layers"] - 2
        P = len(projs)
        self.P = P
        self.eps = projs[0].key_mlp1.blocks[0].norm.eps
        # unique projectors (a projector may serve several pairs): stack each parameter over
        # [key paths of pairs..., value paths of pairs...]
        names = self._param_names()
        self.w: dict[str, torch.Tensor] = {}
        for n in names:
            rows = [projs[j].get_parameter(f"key_{n}") for j in range(P)] + \
                   [projs[j].get_parameter(f"value_{n}") for j in range(P)]
            self.w[n] = _stack(rows)
        self.gate_logit = _stack([projs[j].key_gate_logit for j in range(P)] +
                                 [projs[j].value_gate_logit for j in range(P)])
        self._share_storage(projs, names)
        self.dtype = self.w["in.weight"].dtype

    def _param_names(self) -> list[str]:
        names = ["in.weight", "in.bias"]
        blocks = [("mlp1", 1), ("proj_mlp2", self.n_mlp2), ("scalar_mlp2", 1)]
        for m, n in blocks:
            for b in range(n):
                names += [f"{m}.blocks.{b}.norm.weight", f"{m}.blocks.{b}.w1.weight",
                          f"{m}.blocks.{b}.w2.weight"]
        names += ["proj_out.weight", "proj_out.bias", "scalar_head.weight", "scalar_head.bias"]
        return names

    def _share_storage(self, projs: list[C2CProjector], names: list[str]) -> None:
        """Point each projector's parameters at its rows of the stacked tensors (one copy of
        the weights in memory). A projector serving several pairs keeps its first pair's rows."""
        seen = set()
        P = self.P
        for j, p in enumerate(projs):
            if id(p) in seen:
                continue
            seen.add(id(p))
            for n in names:
                p.get_parameter(f"key_{n}").data = self.w[n][j]
                p.get_parameter(f"value_{n}").data = self.w[n][P + j]

    def to(self, device=None, dtype=None) -> "StackedFuser":
        self.w = {k: v.to(device=device, dtype=dtype) for k, v in self.w.items()}
        self.gate_logit = self.gate_logit.to(device=device, dtype=dtype)
        self.dtype = self.w["in.weight"].dtype
        return self

    # --- math --------------------------------------------------------------------------------

    def _lin(self, name: str, x: torch.Tensor, bias: bool) -> torch.Tensor:
        w = self.w[f"{name}.weight"]                       # [2P, out, in]
        if bias:
            return torch.baddbmm(self.w[f"{name}.bias"].unsqueeze(1), x, w.transpose(1, 2))
        return torch.bmm(x, w.transpose(1, 2))

    def _rms(self, name: str, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.w[f"{name}.weight"].unsqueeze(1).float()).to(x.dtype)

    def _block(self, pre: str, x: torch.Tensor) -> torch.Tensor:
        h = self._lin(f"{pre}.w1", self._rms(f"{pre}.norm", x), False)
        return x + self._lin(f"{pre}.w2", F.gelu(h), False)

    def project(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        """src [2P, M, Hs*Ds], tgt [2P, M, Ht*Dt] (token-major rows) -> new tgt, same shape and
        dtype as tgt."""
        dt = self.dtype
        x = torch.cat([src.to(dt), tgt.to(dt)], -1)
        h = self._block("mlp1.blocks.0", self._lin("in", x, True))
        p = h
        for b in range(self.n_mlp2):
            p = self._block(f"proj_mlp2.blocks.{b}", p)
        proj = self._lin("proj_out", p, True)                                   # [2P, M, Ht*Dt]
        scalar = self._lin("scalar_head", self._block("scalar_mlp2.blocks.0", h), True)  # [2P, M, Ht]
        gate = (self.gate_logit > 0).float().view(-1, 1, 1, 1)
        E, M = proj.shape[:2]
        w = torch.sigmoid(scalar).float().unsqueeze(-1)                           # [2P, M, Ht, 1]
        out = tgt.float().view(E, M, self.ht, self.dt) + gate * w * proj.float().view(E, M, self.ht, self.dt)
        return out.to(tgt.dtype).view(E, M, -1)

    def project_caches(self, r_layers, s_layers, n: int, mask: torch.Tensor | None = None) -> int:
        """Project positions [0, n) of every mapped pair: receiver cache layers `r_layers[t]` get
        projector(sharer `s_layers[s]`, receiver) written in place; a receiver layer with several
        pairs keeps its first pair's result (as the reference), though every pair is computed.
        `mask` [B, n] bool: only those positions are written (a sectioned plan's message).
        Layers expose .keys/.values [B, H, T, D]. Returns the number of layer pairs."""
        P = self.P

        def rows(layers, idx, attr):  # -> [P, B*n, H*D]
            return torch.stack([getattr(layers[k], attr)[:, :, :n].transpose(1, 2).flatten(2)
                                for k in idx]).flatten(1, 2)

        s_idx = [s for _, s, _ in self.pairs]
        r_idx = [t for t, _, _ in self.pairs]
        src = torch.cat([rows(s_layers, s_idx, "keys"), rows(s_layers, s_idx, "values")])
        tgt = torch.cat([rows(r_layers, r_idx, "keys"), rows(r_layers, r_idx, "values")])
        out = self.project(src, tgt)                                             # [2P, B*n, Ht*Dt]
        B = r_layers[r_idx[0]].keys.shape[0]
        out = out.view(2 * P, B, n, self.ht, self.dt).transpose(2, 3)            # [2P, B, Ht, n, Dt]
        sel = None if mask is None else mask[:, None, :n, None]                   # [B, 1, n, 1]
        written = set()
        for j, t in enumerate(r_idx):
            if t in written:  # the first pair of a receiver layer wins
                continue
            written.add(t)
            k, v = out[j], out[P + j]
            if sel is not None:
                k = torch.where(sel, k, r_layers[t].keys[:, :, :n])
                v = torch.where(sel, v, r_layers[t].values[:, :, :n])
            r_layers[t].keys[:, :, :n].copy_(k)
            r_layers[t].values[:, :, :n].copy_(v)
        return P


def stacked_for(fuser: Fuser) -> StackedFuser | None:
    """The fuser's stacked form, built once and cached on it; None when its projectors differ in
    size (then the fast engine calls them one by one)."""
    st = getattr(fuser, "_stacked", None)
    if st is None and not getattr(fuser, "_stack_failed", False):
        try:
            st = StackedFuser(fuser)
        except ValueError:
            fuser._stack_failed = True
            return None
        fuser._stacked = st
    return st
