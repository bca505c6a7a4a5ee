"""Golden vectors from the reference C2CProjector (thu-nics/C2C), for tests/test_golden.py.

Runs the *reference* class (imported from a checkout of the reference repository, never copied
into this tree) on fixed inputs with fixed state dicts, in float32 and bfloat16, and writes the
inputs, the state dicts and its outputs to tests/golden/c2c_projector.safetensors (a few KB).

Made with (reference commit 69eb70584b5cf32835ca326ba47f0f96d9805375, torch 2.13 CPU):

    git clone https://github.com/thu-nics/C2C /tmp/c2c-ref   # or: git archive of a mirror
    PYTHONPATH=/tmp/c2c-ref python scripts/make_golden.py --out tests/golden/c2c_projector.safetensors

The reference module `rosetta.model.projector` imports only torch and transformers, so the
project's own environment runs it; nothing gets installed.

Contents (names): `meta` JSON in the safetensors metadata (init_args, shapes, gate logits,
reference commit); per projector i in {0, 1}: `p{i}.<state dict key>`; per dtype d in
{float32, bfloat16}: inputs `{d}.p{i}.src_k|src_v|tgt_k|tgt_v` and the reference outputs
`{d}.p{i}.out_k|out_v` (float32 tensors: the reference returns float32 in bf16 too, since its
eval-mode gate is a float32 tensor; the receiver cache then rounds them once).
"""

from __future__ import annotations

import argparse
import json
import subprocess

import torch

INIT = dict(source_dim=16, target_dim=8, source_num_heads=2, target_num_heads=4, hidden_dim=32,
            intermediate_dim=48, num_layers=3, dropout=0.1)
B, N = 2, 5
GATES = [(0.5, 0.7), (-0.3, 0.2)]  # projector 0: both gates open; 1: key closed, value open


def fixed_state(proj: torch.nn.Module, seed: int, gates: tuple[float, float]) -> dict:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, v in proj.state_dict().items():
        if k.endswith("gate_logit"):
            state[k] = torch.tensor(gates[0] if k.startswith("key") else gates[1])
        elif k == "gate_temperature":
            state[k] = v.clone()
        elif k.endswith("norm.weight"):
            state[k] = 1.0 + 0.1 * torch.randn(v.shape, generator=g)
        elif k.endswith("bias"):
            state[k] = 0.1 * torch.randn(v.shape, generator=g)
        else:  # weights: unit-scale activations
            state[k] = torch.randn(v.shape, generator=g) / v.shape[-1] ** 0.5
    return state


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/golden/c2c_projector.safetensors")
    args = ap.parse_args()
    from safetensors.torch import save_file

    from rosetta.model.projector import C2CProjector  # the reference, from PYTHONPATH

    import rosetta
    ref_dir = list(rosetta.__path__)[0]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ref_dir, capture_output=True,
                                text=True).stdout.strip() or "69eb70584b5cf32835ca326ba47f0f96d9805375"
    except OSError:
        commit = "69eb70584b5cf32835ca326ba47f0f96d9805375"
    tensors = {}
    g = torch.Generator().manual_seed(1234)
    inputs = []
    for i in range(len(GATES)):
        hs, ds, ht, dt = INIT["source_num_heads"], INIT["source_dim"], INIT["target_num_heads"], INIT["target_dim"]
        inputs.append({"src_k": torch.randn(B, hs, N, ds, generator=g),
                       "src_v": torch.randn(B, hs, N, ds, generator=g),
                       "tgt_k": torch.randn(B, ht, N, dt, generator=g),
                       "tgt_v": torch.randn(B, ht, N, dt, generator=g)})
    for i, gates in enumerate(GATES):
        ref = C2CProjector(**INIT, dtype=torch.float32)
        state = fixed_state(ref, 100 + i, gates)
        ref.load_state_dict(state)
        for k, v in state.items():
            tensors[f"p{i}.{k}"] = v.contiguous()
        for dname, dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
            m = C2CProjector(**INIT, dtype=dt)
            m.load_state_dict({k: v.to(dt) for k, v in state.items()})
            m.eval()
            x = {k: v.to(dt) for k, v in inputs[i].items()}
            with torch.no_grad():
                ok, ov = m((x["src_k"], x["src_v"]), (x["tgt_k"], x["tgt_v"]))
            for k, v in x.items():
                tensors[f"{dname}.p{i}.{k}"] = v.contiguous()
            tensors[f"{dname}.p{i}.out_k"] = ok.float().contiguous()
            tensors[f"{dname}.p{i}.out_v"] = ov.float().contiguous()
            print(f"p{i} {dname}: out dtype {ok.dtype}, |out_k - tgt_k| max"
                  f" {(ok.float() - x['tgt_k'].float()).abs().max():.4f}")
    meta = {"init_args": INIT, "batch": B, "tokens": N, "gates": GATES,
            "reference": "thu-nics/C2C rosetta/model/projector.py C2CProjector",
            "reference_commit": commit, "torch": torch.__version__}
    save_file(tensors, args.out, metadata={"meta": json.dumps(meta)})
    print(f"wrote {args.out} ({len(tensors)} tensors)")


if __name__ == "__main__":
    main()
