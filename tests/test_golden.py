"""Both engines' projection against golden vectors made by the reference C2CProjector
(thu-nics/C2C; scripts/make_golden.py says how), in float32 and bfloat16."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open

from c2c_core.models.projector import C2CProjector, Fuser
from c2c_core.models.stacked import StackedFuser

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "c2c_projector.safetensors")


@pytest.fixture(scope="module")
def golden():
    with safe_open(GOLDEN, "pt") as f:
        meta = json.loads(f.metadata()["meta"])
        t = {k: f.get_tensor(k) for k in f.keys()}
    return meta, t


def _projector(meta, t, i, dtype):
    p = C2CProjector(**meta["init_args"], dtype=dtype).eval()
    state = {k[len(f"p{i}."):]: v.to(dtype) for k, v in t.items() if k.startswith(f"p{i}.")}
    p.load_state_dict(state)
    return p


# bf16: our result and the reference's, both rounded once to bf16, may differ where a matmul's
# accumulation order differs; a double-rounded residual (the old bug) is off by up to 2 ulps of
# the residual's magnitude, far more often.
TOL = {torch.float32: dict(atol=2e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=1e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_projector_matches_reference(golden, dtype):
    meta, t = golden
    d = str(dtype).removeprefix("torch.")
    for i in range(len(meta["gates"])):
        p = _projector(meta, t, i, dtype)
        x = {k: t[f"{d}.p{i}.{k}"] for k in ("src_k", "src_v", "tgt_k", "tgt_v")}
        with torch.no_grad():
            ok, ov = p((x["src_k"], x["src_v"]), (x["tgt_k"], x["tgt_v"]))
        assert ok.dtype == dtype
        for got, name in ((ok, "out_k"), (ov, "out_v")):
            want = t[f"{d}.p{i}.{name}"].to(dtype)
            torch.testing.assert_close(got, want, **TOL[dtype])
            if dtype == torch.bfloat16:  # rounded once, as the reference: nearly all bit-equal
                assert (got == want).float().mean() > 0.99, (got == want).float().mean()
    # a closed gate leaves the receiver's cache exactly as it was
    assert torch.equal(t[f"{d}.p1.out_k"].to(dtype), t[f"{d}.p1.tgt_k"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stacked_projection_matches_reference(golden, dtype):
    """The fast engine's one batched projection over both projectors at once."""
    meta, t = golden
    d = str(dtype).removeprefix("torch.")
    n = len(meta["gates"])
    projs = torch.nn.ModuleList(_projector(meta, t, i, dtype) for i in range(n))
    fuser = Fuser(projs, {i: [(i, i)] for i in range(n)})
    st = StackedFuser(fuser)

    class L:  # a cache layer: .keys/.values [B, H, T, D]
        def __init__(self, k, v):
            self.keys, self.values = k.clone(), v.clone()

    r = [L(t[f"{d}.p{i}.tgt_k"], t[f"{d}.p{i}.tgt_v"]) for i in range(n)]
    s = [L(t[f"{d}.p{i}.src_k"], t[f"{d}.p{i}.src_v"]) for i in range(n)]
    with torch.no_grad():
        calls = st.project_caches(r, s, meta["tokens"])
    assert calls == n
    for i in range(n):
        for got, name in ((r[i].keys, "out_k"), (r[i].values, "out_v")):
            want = t[f"{d}.p{i}.{name}"].to(dtype)
            torch.testing.assert_close(got, want, **TOL[dtype])
    # the per-layer projectors now share the stacked storage and still give the same answer
    assert projs[0].key_in.weight.data_ptr() == st.w["in.weight"][0].data_ptr()
