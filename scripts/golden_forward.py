"""Golden vectors from the reference's C2C forward, for tests/test_forward_golden.py.

Runs thu-nics/C2C's `RosettaModel` (package `rosetta`, imported at run time from a clone; never
copied into this tree) on the cases of tests/forward_cases.py: the same models, weights and fuser
our engines load, and the same ids, padding and sections our plan builds (plan.item.build_plan),
given to the reference as its evaluator gives them (`input_ids` and `attention_mask` per model,
`position_ids` 0..L-1, one `kv_cache_index` entry per section with the sharer bitmask; the last
section never projected). Per case and prompt it stores the first-token logits (all of them for
the tiny vocabularies, else the top 32) and 16 greedy tokens (EOS ignored) to
tests/golden/c2c_forward.json. For the SmolLM2 <- Gemma pair it first checks that our plan's ids
and masks are the reference's own `TokenAligner.align_chat_messages` output, so that golden is the
reference end to end.

Shims, each applied at run time in this process only (the clone is never edited), listed in the
JSON under "shims":
- scripts/reference_timing.py's: `DynamicCache.key_cache` / `.value_cache` and
  `Cache.__getitem__` (removed in transformers 5, used by the reference), and the guard for
  thu-nics/C2C issue #7 (an unguarded include_response-only store);
- the decode mask: the reference's decode steps pass `attention_mask[:, :end]`, cut to the call's
  length (1). transformers 4.52 (the reference's) read such a short mask as "no padding";
  transformers 5 pads it with False, so every step would see position 0 only. Shim: the
  receiver's forward gets a short mask extended on the left with ones (4.52's reading);
- full-length sharer caches: the reference reads a sharer's cache by absolute position
  (`source_key_cache[:, :, start:end]`); under transformers 5 a sliding-window layer of a fresh
  cache keeps only its window, so a sliding sharer's positions would be misread. Shim: a sharer
  called without a cache gets `DynamicCache()` (full-length layers; its attention still applies
  its window from its config), as our engines keep it.

    python scripts/golden_forward.py --reference /path/to/C2C [--cases a,b] [--out FILE]

A plan with receiver padding would decode differently under the 4.52 mask reading (its decode
steps attend to the receiver's pads; ours mask them): such a case is refused, not stored.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, HERE)

OUT = os.path.join(ROOT, "tests", "golden", "c2c_forward.json")


def mask_shim(model) -> None:
    """The receiver reads a short attention mask as 4.52 did (see the module docstring)."""
    orig = model.forward

    def forward(*a, attention_mask=None, past_key_values=None, input_ids=None, **k):
        if attention_mask is not None and past_key_values is not None and input_ids is not None:
            want = past_key_values.get_seq_length() + input_ids.shape[1]
            short = want - attention_mask.shape[1]
            if short > 0:
                attention_mask = __import__("torch").cat(
                    [attention_mask.new_ones(attention_mask.shape[0], short), attention_mask], 1)
        return orig(*a, attention_mask=attention_mask, past_key_values=past_key_values,
                    input_ids=input_ids, **k)

    model.forward = forward


def full_cache_shim(model) -> None:
    """A sharer called without a cache gets a full-length DynamicCache (module docstring)."""
    from transformers import DynamicCache
    orig = model.forward

    def forward(*a, past_key_values=None, **k):
        if past_key_values is None:
            past_key_values = DynamicCache()
        return orig(*a, past_key_values=past_key_values, **k)

    model.forward = forward


def reference_model(RosettaModel, create_projector, pipe):
    """A RosettaModel over our pipeline's own models, with projectors holding our fuser's weights
    (the published checkpoint format), mapped as our fuser maps them."""
    import torch
    fuser = pipe.fuser
    projectors = []
    for p in fuser.projectors:
        args = {k: v for k, v in p.init_args.items() if k != "dtype"}
        q = create_projector("C2CProjector", **args, dtype=torch.float32)
        missing, unexpected = q.load_state_dict(p.state_dict(), strict=False)
        if [m for m in missing if m != "gate_temperature"] or unexpected:
            raise SystemExit(f"projector weights do not fit the reference: {missing} {unexpected}")
        projectors.append(q.eval())
    model = RosettaModel(model_list=[pipe.receiver] + [sl.model for sl in pipe.sharers],
                         base_model_idx=0, projector_list=projectors, include_response=False,
                         multi_source_fusion_mode=pipe.fusion).eval()
    for k, m in fuser.sharer_maps.items():
        for t, pairs in m.items():
            for s, i in pairs:
                model.set_projector_config(source_model_idx=k, source_model_layer_idx=s,
                                           target_model_idx=0, target_model_layer_idx=t,
                                           projector_idx=i)
    return model


def reference_inputs(plan, device):
    import torch
    from forward_cases import reference_sections
    L = len(plan.ids)
    ids = [torch.tensor([plan.ids], device=device)] + \
          [torch.tensor([f.ids], device=device) for f in plan.feeds]
    pads = [plan.pad] + [f.pad for f in plan.feeds]
    masks = [torch.tensor([[0 if q else 1 for q in (p or [False] * L)]], device=device)
             for p in pads]
    index = [torch.tensor([b, 0], dtype=torch.long).repeat(e - a, 1).unsqueeze(0).to(device)
             for a, e, b in reference_sections(plan)]
    return ids, masks, torch.arange(L, device=device)[None], index


def check_alignment(pipe, cfg, plan, prompt, aligner_cls) -> None:
    """Our plan of the real pair is the reference's align_chat_messages output."""
    from c2c_core.plan.sections import GEMMA3_CHAT_TEMPLATE
    sl = pipe.sharers[0]
    stok = sl.tokenizer
    saved = getattr(stok, "chat_template", None)
    stok.chat_template = saved or GEMMA3_CHAT_TEMPLATE
    try:
        al = aligner_cls(slm_tokenizer=pipe.tokenizer, llm_tokenizer=stok,
                         strategy=_strategy(aligner_cls, cfg.alignment))
        d = al.align_chat_messages([{"role": "user", "content": prompt}],
                                   add_generation_prompt=True, return_details=True,
                                   enable_thinking=False, remove_last_surfix=False)
    finally:
        stok.chat_template = saved
    L = len(plan.ids)
    f = plan.feeds[0]
    got = (list(d["slm_ids_padded"][:L]), list(d["llm_ids_padded"][:L]))
    # our plan cuts trailing receiver padding (the reference would read its first token there)
    if got != (plan.ids, f.ids) or not all(d["slm_padding_mask"][L:]):
        raise SystemExit(f"our plan of {prompt!r} is not the reference's alignment")


def _strategy(aligner_cls, name: str):
    import importlib
    mod = importlib.import_module(aligner_cls.__module__)
    enum = mod.AlignmentStrategy
    for m in enum:
        if m.value == name or m.name.lower() == name:
            return m
    raise SystemExit(f"the reference has no alignment strategy {name}")


def run_case(name: str, folders, ref) -> dict:
    import torch
    from c2c_core.plan.item import build_plan
    from c2c_core.io.prompts import PromptItem as Item
    from forward_cases import CASES, NEW_TOKENS, build_case, logits_entry, prompts_of
    RosettaModel, create_projector, aligner_cls = ref
    pipe, cfg = build_case(name, folders)
    model = reference_model(RosettaModel, create_projector, pipe)
    mask_shim(pipe.receiver)
    for sl in pipe.sharers:
        full_cache_shim(sl.model)
    out = {"settings": {"alignment": cfg.alignment, "fusion": pipe.fusion,
                        "receiver": pipe.info.get("receiver"),
                        "sharers": [sl.name for sl in pipe.sharers]}, "prompts": {}}
    for i, prompt in enumerate(prompts_of(name), start=1):
        plan = build_plan(pipe, cfg, Item(i, prompt), "c2c")
        if plan.padded:
            raise SystemExit(f"{name}: the receiver's sequence holds padding for {prompt!r};"
                             " the 4.52 decode mask would attend to it (see the docstring)")
        if CASES[name][0] == "real":
            check_alignment(pipe, cfg, plan, prompt, aligner_cls)
        ids, masks, pos, index = reference_inputs(plan, pipe.device)
        with torch.no_grad():
            first = model.forward(kv_cache_index=index, input_ids=ids, attention_mask=masks,
                                  position_ids=pos, use_cache=True).logits[0, -1]
            toks = model.generate(kv_cache_index=index, input_ids=ids, attention_mask=masks,
                                  position_ids=pos, max_new_tokens=NEW_TOKENS, do_sample=False,
                                  eos_token_id=-1, pad_token_id=0)
        new = [int(t) for t in toks[0, len(plan.ids):]]
        out["prompts"][prompt] = {"tokens": new, "logits": logits_entry(first),
                                  "sections": [list(s) for s in
                                               __import__("forward_cases").reference_sections(plan)]}
        print(f"{name}: {prompt[:40]!r} -> {new}", flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reference", required=True, help="a clone of thu-nics/C2C")
    ap.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("C2C_FAST_COMPILE", "0")
    warnings.filterwarnings("ignore")
    import torch
    import transformers
    from reference_timing import _commit, load_reference
    from forward_cases import CASES, tiny_folders
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    RosettaModel, create_projector, _, shims = load_reference(args.reference)
    from rosetta.model.aligner import TokenAligner as RefAligner
    shims += ["receiver forward: a short attention mask extended with ones (4.52's reading)",
              "sharer forward: a full-length DynamicCache when called without one"]
    names = [c for c in args.cases.split(",") if c] or list(CASES)
    old = {}
    if os.path.exists(args.out):
        with open(args.out, encoding="utf-8") as f:
            old = json.load(f).get("cases", {})
    with tempfile.TemporaryDirectory(prefix="c2c-golden-") as root:
        folders = tiny_folders(root)
        cases = dict(old)
        for name in names:
            torch.manual_seed(0)
            cases[name] = run_case(name, folders, (RosettaModel, create_projector, RefAligner))
    doc = {"reference_commit": _commit(args.reference), "transformers": transformers.__version__,
           "torch": torch.__version__, "dtype": "float32", "device": "cpu", "shims": shims,
           "cases": {k: cases[k] for k in CASES if k in cases}}
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(doc, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
