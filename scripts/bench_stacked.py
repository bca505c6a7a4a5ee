#!/usr/bin/env python
"""The stacked projection two ways, side by side: the hand-written batched version the fast
engine uses (c2c_core/models/stacked.py: one bmm/baddbmm per linear) and `torch.func.vmap` over
the one projector path with `torch.func.stack_module_state` weights (issue 17 part 6 asked for
it; kept here for this comparison). Prints how far each is from the per-pair projectors (the
eager engine), then times both interleaved and prints the median ratio vmap / hand-written:

    python scripts/bench_stacked.py                       # SmolLM2 -> Gemma-3 sizes, 18 pairs, fp32
    python scripts/bench_stacked.py --dtype bfloat16 --device cuda --tokens 256
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
from torch.func import functional_call, stack_module_state, vmap

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from c2c_core.models.projector import C2CProjector, Fuser  # noqa: E402
from c2c_core.models.stacked import StackedFuser  # noqa: E402


class _KeyPath(nn.Module):
    """A projector's key path as a module: vmap runs it with the key or the value weights."""

    def __init__(self, proj: C2CProjector):
        super().__init__()
        self.proj = proj

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        return self.proj._path("key", src, tgt)


class VmapStacked:
    """StackedFuser's job with the projector math written once: vmap over C2CProjector._path,
    rows [key paths of the pairs..., value paths...]."""

    def __init__(self, fuser: Fuser):
        self.pairs = [(t, s, i) for t, ps in sorted(fuser.mapping.items()) for s, i in ps]
        projs = [fuser.projectors[i] for _, _, i in self.pairs]
        self.P = len(projs)
        params, _ = stack_module_state(list(projs))
        names = [n[len("key_"):] for n in params if n.startswith("key_")]
        self.w = {f"proj.key_{n}": torch.cat([params.pop(f"key_{n}"), params.pop(f"value_{n}")]).detach()
                  for n in names}
        path = _KeyPath(copy.deepcopy(projs[0]).eval().to("meta"))  # structure only
        self._batched = vmap(lambda w, s, t: functional_call(path, w, (s, t)))

    def project_caches(self, r_layers, s_layers, n: int) -> int:
        P = self.P
        s_idx = [s for _, s, _ in self.pairs]
        r_idx = [t for t, _, _ in self.pairs]

        def stack(layers, idx):  # [2P, B, H, n, D]
            return torch.stack([layers[k].keys[:, :, :n] for k in idx] +
                               [layers[k].values[:, :, :n] for k in idx])

        out = self._batched(self.w, stack(s_layers, s_idx), stack(r_layers, r_idx))
        for j, t in enumerate(r_idx):
            r_layers[t].keys[:, :, :n].copy_(out[j])
            r_layers[t].values[:, :, :n].copy_(out[P + j])
        return P


class _Layer:  # a cache layer: .keys/.values [B, H, T, D]
    def __init__(self, k, v):
        self.keys, self.values = k.clone(), v.clone()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=18, help="layer pairs (SmolLM2-135M -> Gemma-3-270M: 18)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    dev, dt = torch.device(a.device), getattr(torch, a.dtype)
    torch.manual_seed(0)
    sh, sd, th, td = 3, 64, 1, 256  # SmolLM2-135M (3 KV heads x 64) into Gemma-3-270M (1 x 256)
    projs = [C2CProjector(source_dim=sd, target_dim=td, source_num_heads=sh, target_num_heads=th,
                          hidden_dim=a.hidden, intermediate_dim=a.hidden, num_layers=3).eval()
             for _ in range(a.pairs)]
    with torch.no_grad():
        for p in projs:
            p.key_gate_logit.fill_(1.0)  # open gates: the projection reaches the cache
            p.value_gate_logit.fill_(1.0)
            for q in p.parameters():
                if q.dim() == 2:
                    q.normal_(0, q.shape[1] ** -0.5)
    projs = [p.to(dev, dt) for p in projs]
    fuser = Fuser(nn.ModuleList(projs), {i: [(i, i)] for i in range(a.pairs)})
    vm, hand = VmapStacked(fuser), StackedFuser(fuser)  # hand re-points projs at its storage
    shape = lambda h, d: (a.batch, h, a.tokens, d)  # noqa: E731
    s = [_Layer(torch.randn(shape(sh, sd), device=dev).to(dt), torch.randn(shape(sh, sd), device=dev).to(dt))
         for _ in range(a.pairs)]
    r0 = [_Layer(torch.randn(shape(th, td), device=dev).to(dt), torch.randn(shape(th, td), device=dev).to(dt))
          for _ in range(a.pairs)]

    def run(st) -> tuple[float, list[_Layer]]:
        r = [_Layer(x.keys, x.values) for x in r0]  # fresh receiver caches, copied untimed
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        st.project_caches(r, s, a.tokens)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, r

    with torch.no_grad():
        eager = [projs[j]((s[j].keys, s[j].values), (r0[j].keys, r0[j].values)) for j in range(a.pairs)]
        for name, st in (("hand-written", hand), ("vmap", vm)):
            got = run(st)[1]
            eq = [torch.equal(g, w) for j in range(a.pairs) for g, w in
                  ((got[j].keys, eager[j][0]), (got[j].values, eager[j][1]))]
            md = max((g.float() - w.float()).abs().max().item() for j in range(a.pairs) for g, w in
                     ((got[j].keys, eager[j][0]), (got[j].values, eager[j][1])))
            print(f"{name:>12}: {sum(eq)}/{len(eq)} outputs bit-equal to the per-pair projectors,"
                  f" max difference {md:.3g}")
        for _ in range(2):  # warm-up
            run(vm), run(hand)
        tv, th_, ratios = [], [], []
        for k in range(a.rounds):  # interleaved, order alternating: drift hits both alike
            if k % 2:
                x, y = run(vm)[0], run(hand)[0]
            else:
                y, x = run(hand)[0], run(vm)[0]
            tv.append(x), th_.append(y), ratios.append(x / y)
    print(f"{a.pairs} pairs, {a.batch}x{a.tokens} tokens, {a.dtype} on {dev}: vmap median"
          f" {statistics.median(tv) * 1e3:.2f} ms, hand-written {statistics.median(th_) * 1e3:.2f} ms,"
          f" median ratio vmap/hand-written {statistics.median(ratios):.3f} ({a.rounds} rounds)")


if __name__ == "__main__":
    main()
