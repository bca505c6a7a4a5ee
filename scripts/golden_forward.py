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

Shims: c2c_core/bench/reference.py's (its docstring names each; the JSON lists them under
"shims"): the transformers 4 cache API, thu-nics/C2C issue #7, transformers 4.52's reading of
the decode steps' short attention mask, and full-length sharer caches.

    python scripts/golden_forward.py --reference /path/to/C2C [--cases a,b] [--out FILE]

A plan with receiver padding would decode differently under the 4.52 mask reading (its decode
steps attend to the receiver's pads; ours mask them): bench.reference refuses it.
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


def run_case(name: str, folders, clone: str, aligner_cls) -> dict:
    from c2c_core.bench.reference import reference_tokens
    from c2c_core.plan.item import build_plan, reference_sections
    from c2c_core.io.prompts import PromptItem as Item
    from forward_cases import CASES, NEW_TOKENS, build_case, logits_entry, prompts_of
    pipe, cfg = build_case(name, folders)
    out = {"settings": {"alignment": cfg.alignment, "fusion": pipe.fusion,
                        "receiver": pipe.info.get("receiver"),
                        "sharers": [sl.name for sl in pipe.sharers]}, "prompts": {}}
    for i, prompt in enumerate(prompts_of(name), start=1):
        item = Item(i, prompt)
        plan = build_plan(pipe, cfg, item, "c2c")
        if CASES[name][0] == "real":
            check_alignment(pipe, cfg, plan, prompt, aligner_cls)
        first, new = reference_tokens(pipe, cfg, item, clone, NEW_TOKENS)
        out["prompts"][prompt] = {"tokens": new, "logits": logits_entry(first),
                                  "sections": [list(s) for s in reference_sections(plan)]}
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
    from reference_timing import _commit
    from c2c_core.bench.reference import SHIMS_WHILE_RUNNING, load_reference
    from forward_cases import CASES, tiny_folders
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    shims = load_reference(args.reference)[3] + SHIMS_WHILE_RUNNING
    from rosetta.model.aligner import TokenAligner as RefAligner
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
            cases[name] = run_case(name, folders, args.reference, RefAligner)
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
