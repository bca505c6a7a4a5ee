"""Golden vectors from the reference's sectioned alignment, for tests/test_plan_sections.py.

Runs the *reference* `TokenAligner.align_chat_messages` (thu-nics/C2C, rosetta/model/aligner.py,
imported at run time from a clone or a bare mirror; never copied into this tree) on the packaged
SmolLM2-135M-Instruct and Gemma-3-270M tokenizers as our loader builds them offline, in both
directions (each as receiver = the reference's "slm"), for a few varied prompts and both
strategies, the way its evaluator calls it for generation (one user message, generation prompt
on, thinking off). It writes ids and masks to tests/golden/alignment_smollm2_gemma3.json.

Templates: SmolLM2 uses its own; the Gemma GGUF has none, so the reference's Gemma tokenizer is
given c2c_core.plan.sections.GEMMA3_CHAT_TEMPLATE (Gemma 3's published template), the one our
plan supplies for it.

The reference module imports only torch and transformers, which the project's environment has:
nothing is stubbed and nothing gets installed.

Made with (reference commit 69eb70584b5cf32835ca326ba47f0f96d9805375):

    python scripts/golden_alignment.py --reference /path/to/C2C          # a clone, or
    python scripts/golden_alignment.py --reference /path/to/C2C.git      # a bare mirror

Prompts the reference cannot align (it stops on an assertion) or aligns on the wrong text are
listed under "reference_differs" with what the reference did, not as golden cases.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

OUT = os.path.join(ROOT, "tests", "golden", "alignment_smollm2_gemma3.json")
ALIGNER = "rosetta/model/aligner.py"

PROMPTS = {
    "arithmetic": "What is 25 * 17?",
    "numbers": "Natalia sold 48 clips in April and half as many in May: 3.14159, 1,000,000 and"
               " -0.5e-3 in 2024.",
    "code": "def f(x):\n    return x**2  # square\n\nprint(f(12), [i for i in range(3)])",
    "chinese": "请用一句话解释机器学习。",
    "arabic": "ما هي عاصمة فرنسا؟",
    "cyrillic_japanese": "Привет, мир! こんにちは世界",
    "emoji": "Rate this 🙂🎉👍🏽 from 1–10!",
    "whitespace": "a  b\t\tc\n\n\nd     e",
    "accents_quotes": "Ünïcödé ½ – “quotes” naïve café",
    "question_mark": "?",
    "empty": "",
}
#: prompts where the reference fails or picks text inside the template (not golden cases)
DIFFERS = {
    "outer_whitespace": "  spaces around  ",   # Gemma's template trims the message
    "in_system_prompt": "Face",                # SmolLM2's system prompt ends "... Hugging Face"
}
DIRECTIONS = [("smollm2", "gemma3"), ("gemma3", "smollm2")]
STRATEGIES = ("first", "longest")


def bits(mask) -> str:
    return "".join("1" if m else "0" for m in mask)


def reference_dir(path: str) -> tuple[str, str]:
    """(a folder holding rosetta/model/aligner.py, the reference commit)."""
    path = os.path.abspath(path)
    commit = subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or None
    if os.path.isfile(os.path.join(path, ALIGNER)):
        return path, commit
    tmp = tempfile.mkdtemp(prefix="c2c-ref-")
    arch = subprocess.run(["git", "--git-dir", path, "archive", "HEAD", ALIGNER],
                          capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", tmp], input=arch, check=True)
    return tmp, commit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reference", required=True, help="C2C clone or bare git mirror")
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ref_dir, commit = reference_dir(args.reference)
    sys.path.insert(0, ref_dir)
    from rosetta.model.aligner import TokenAligner  # the reference, from the clone

    from c2c_core.spec.config import ModelSpec
    from c2c_core.models.loading import load_tokenizer
    from c2c_core.plan.sections import GEMMA3_CHAT_TEMPLATE

    toks = {}
    for name in ("smollm2", "gemma3"):
        tok, _ = load_tokenizer(ModelSpec(name))
        if not tok.chat_template:  # the Gemma GGUF: the template our plan supplies
            tok.chat_template = GEMMA3_CHAT_TEMPLATE
        toks[name] = tok

    def run(receiver, sharer, strategy, prompt):
        al = TokenAligner(slm_tokenizer=toks[receiver], llm_tokenizer=toks[sharer],
                          strategy=strategy)
        return al.align_chat_messages([{"role": "user", "content": prompt}],
                                      add_generation_prompt=True, enable_thinking=False,
                                      return_details=True)

    cases, differs = [], []
    for receiver, sharer in DIRECTIONS:
        for strategy in STRATEGIES:
            for pid, prompt in PROMPTS.items():
                d = run(receiver, sharer, strategy, prompt)
                cases.append({
                    "receiver": receiver, "sharer": sharer, "strategy": strategy,
                    "prompt_id": pid, "prompt": prompt,
                    "receiver_ids": d["slm_ids_padded"], "sharer_ids": d["llm_ids_padded"],
                    "receiver_pad_mask": bits(d["slm_padding_mask"]),
                    "sharer_pad_mask": bits(d["llm_padding_mask"]),
                    "projection_mask": bits(d["message_mask"]),
                    "sections": [[s["type"], *s["slm_range"]] for s in d["sections"]],
                })
            for pid, prompt in DIFFERS.items():
                try:
                    d = run(receiver, sharer, strategy, prompt)
                    what = {"projection_mask": bits(d["message_mask"]),
                            "receiver_ids": d["slm_ids_padded"]}
                except AssertionError as e:
                    what = {"error": f"AssertionError: {e}"}
                differs.append({"receiver": receiver, "sharer": sharer, "strategy": strategy,
                                "prompt_id": pid, "prompt": prompt, "reference": what})

    import transformers
    out = {
        "about": "Reference sectioned alignment (TokenAligner.align_chat_messages) on the"
                 " packaged tokenizers; masks are strings of 0/1 per position; sections are"
                 " [type, start, end] over the padded sequences. Made by"
                 " scripts/golden_alignment.py.",
        "reference": {"repo": "thu-nics/C2C", "commit": commit, "file": ALIGNER},
        "transformers": transformers.__version__,
        "tokenizers": {n: {"class": type(t).__name__, "vocab": len(t),
                           "pad_id": t.pad_token_id, "eos_id": t.eos_token_id}
                       for n, t in toks.items()},
        "gemma3_chat_template": GEMMA3_CHAT_TEMPLATE,
        "cases": cases,
        "reference_differs": differs,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")
    print(f"{len(cases)} cases, {len(differs)} differences -> {args.out}"
          f" ({os.path.getsize(args.out):,} bytes)")


if __name__ == "__main__":
    main()
