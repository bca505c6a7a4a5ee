"""Golden vectors from the reference's sectioned alignment, for tests/test_plan_sections.py.

Runs the *reference* `TokenAligner.align_chat_messages` (thu-nics/C2C, rosetta/model/aligner.py,
imported at run time from a clone or a bare mirror; never copied into this tree) on the packaged
SmolLM2-135M-Instruct and Gemma-3-270M tokenizers as our loader builds them offline, in both
directions (each as receiver = the reference's "slm"), for a few varied prompts and both
strategies, the way its evaluator calls it for generation (one user message, generation prompt
on, thinking off). It writes ids and masks to tests/golden/alignment_smollm2_gemma3.json.

It also stores, under "token_rule", the reference's exact-length rule (`align_tokens`: one sharer
id per receiver id) in both directions and both strategies, for groups of receiver ids: each
PROMPT's text encoded without special tokens, one prompt in the receiver's chat template, the
receiver's all_special_ids, its pad / eos / bos / unk ids, its other added special tokens (chat
markers and the like, which the reference treats as ordinary text), ids whose text the sharer
encodes to nothing, ids the sharer splits into several pieces (and ties on the longest piece),
and every STRIDE-th id of the vocabulary. The tests check c2c_core.models.alignment.TokenAligner
against these ids.

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
STRIDE = 97       # every 97th receiver id: a sample of the whole vocabulary
PICK = 48         # at most this many ids per found group
STRATEGIES = ("first", "longest")


def bits(mask) -> str:
    return "".join("1" if m else "0" for m in mask)


def _text(tok, i: int) -> str:
    return tok.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False)


def token_groups(r, s) -> dict[str, list[int]]:
    """Named groups of receiver ids for the exact-length rule, receiver r and sharer s."""
    special = set(r.all_special_ids)
    groups = {f"prompt:{pid}": list(r(text, add_special_tokens=False)["input_ids"])
              for pid, text in PROMPTS.items() if text}
    chat = r.apply_chat_template([{"role": "user", "content": PROMPTS["arithmetic"]}],
                                 tokenize=False, add_generation_prompt=True)
    groups["chat:arithmetic"] = list(r(chat, add_special_tokens=False)["input_ids"])
    groups["all_special_ids"] = list(r.all_special_ids)
    groups["roles"] = [i for i in (r.pad_token_id, r.eos_token_id, r.bos_token_id,
                                   r.unk_token_id) if i is not None]
    added = sorted(int(i) for i, t in r.added_tokens_decoder.items()
                   if t.special and int(i) not in special)
    groups["added_special"] = added[:PICK]
    nothing, several, ties = [], [], []
    for i in range(len(r)):
        if i in special:
            continue
        pieces = s.encode(_text(r, i), add_special_tokens=False)
        if not pieces:
            nothing.append(i)
        elif len(pieces) > 1:
            lens = [len(_text(s, p)) for p in pieces]
            (ties if lens.count(max(lens)) > 1 else several).append(i)
    groups["encodes_to_nothing"] = nothing[:PICK]
    groups["several_pieces"] = several[:PICK] + several[-PICK:]
    groups["longest_ties"] = ties[:PICK]
    groups["stride"] = list(range(0, len(r), STRIDE))
    return groups


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

    token_rule = []
    for receiver, sharer in DIRECTIONS:
        groups = token_groups(toks[receiver], toks[sharer])
        for strategy in STRATEGIES:
            al = TokenAligner(slm_tokenizer=toks[receiver], llm_tokenizer=toks[sharer],
                              strategy=strategy)
            for group, ids in groups.items():
                token_rule.append({"receiver": receiver, "sharer": sharer, "strategy": strategy,
                                   "group": group, "receiver_ids": ids,
                                   "sharer_ids": [int(i) for i in al.align_tokens(ids)]})

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
        "token_rule_about": "Reference exact-length rule (TokenAligner.align_tokens): for each"
                            " group of receiver ids, the sharer id of each.",
        "token_rule": token_rule,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")
    print(f"{len(cases)} cases, {len(differs)} differences, {len(token_rule)} token groups"
          f" ({sum(len(t['receiver_ids']) for t in token_rule):,} ids) -> {args.out}"
          f" ({os.path.getsize(args.out):,} bytes)")


if __name__ == "__main__":
    main()
