"""The cases of the reference-forward golden (tests/golden/c2c_forward.json): how each pipeline is
built, the same way in scripts/golden_forward.py (which runs thu-nics/C2C's RosettaModel on it)
and in tests/test_forward_golden.py (which runs both of our engines on it).

Every case is deterministic: the tiny models of conftest.py (seeded weights, scaled up so tokens
vary), a tiny Gemma 3 sharer with a 4-token sliding window, and the packaged SmolLM2-135M ←
Gemma-3-270M pair (real weights); each with a random open-gate fuser (conftest.open_fuser) that
changes the answer. CPU, float32, greedy, EOS ignored.
"""

from __future__ import annotations

import os

import torch

from conftest import build_model, loud_weights, open_fuser

NEW_TOKENS = 16
#: logits kept per prompt: all of them for a tiny vocabulary, else the top TOP_K
TOP_K = 32

TINY_PROMPTS = ["What is the capital of France?", "Say hello.",
                "Explain machine learning in simple terms, please, with an example.",
                "Name three colours and one number: 42."]
REAL_PROMPTS = ["What is 25 * 17?",
                "Natalia sold clips to 48 of her friends in April, and then she sold half as"
                " many clips in May. How many clips did Natalia sell altogether?",
                "Write a haiku about coding."]

#: case -> (models, run settings). "tiny": receiver = the tiny Llama; sharers by folder name.
CASES = {
    "same": ("tiny", {"teacher": ["sharer"]}),
    "own_first": ("tiny", {"teacher": ["other"], "alignment": "first"}),
    "own_longest": ("tiny", {"teacher": ["other"], "alignment": "longest"}),
    "two_parallel": ("tiny", {"teacher": ["sharer", "other"], "fusion": "parallel"}),
    "two_sequential": ("tiny", {"teacher": ["sharer", "other"], "fusion": "sequential"}),
    "sliding": ("tiny", {"teacher": ["sliding"]}),
    "smollm2_gemma3_first": ("real", {"alignment": "first"}),
    "smollm2_gemma3_longest": ("real", {"alignment": "longest"}),
}
TINY_CASES = [c for c, (k, _) in CASES.items() if k == "tiny"]
REAL_CASES = [c for c, (k, _) in CASES.items() if k == "real"]


def build_sliding(folder: str, tok) -> str:
    """A tiny Gemma 3 text model on the tiny tokenizer whose sliding layers see 4 positions
    (so the window binds on every prompt)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    cfg = Gemma3TextConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                           num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=16, query_pre_attn_scalar=16, sliding_window=4,
                           layer_types=["sliding_attention", "full_attention",
                                        "sliding_attention"],
                           max_position_embeddings=4096, eos_token_id=tok.eos_token_id,
                           bos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id,
                           tie_word_embeddings=True)
    torch.manual_seed(7)
    Gemma3ForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


#: The tiny tokenizers, as conftest's build_tokenizer / build_other_tokenizer trained them
#: once: training is not reproducible (a WordPiece vocabulary breaks frequency ties in another
#: order from one process to the next), and a golden needs the same ids every time.
TOKENIZERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden",
                          "forward_tokenizers")


def tiny_folders(root: str) -> dict[str, str]:
    """receiver, sharer (same tokenizer), other (its own tokenizer), sliding: conftest's tiny
    models (same seeds) on the shipped tokenizers."""
    from transformers import AutoTokenizer
    out = {k: os.path.join(root, k) for k in ("receiver", "sharer", "other", "sliding")}
    tok = AutoTokenizer.from_pretrained(os.path.join(TOKENIZERS, "receiver"))
    tok.save_pretrained(out["receiver"])
    tok.save_pretrained(out["sharer"])
    build_model(out["receiver"], "llama", len(tok), tok.eos_token_id, layers=2, seed=1)
    build_model(out["sharer"], "qwen2", len(tok), tok.eos_token_id, layers=3, seed=2)
    otok = AutoTokenizer.from_pretrained(os.path.join(TOKENIZERS, "other"))
    otok.save_pretrained(out["other"])
    build_model(out["other"], "qwen3", len(otok), otok.eos_token_id, layers=3, seed=5)
    build_sliding(out["sliding"], tok)
    return out


def build_case(name: str, folders: dict[str, str] | None):
    """(pipeline, run config) of a case, weights and fuser set."""
    from c2c_core.models.loading import load_pipeline
    from c2c_core.spec.config import build_run_config
    kind, over = CASES[name]
    kw = dict(device="cpu", dtype="float32", warmup=0, max_new_tokens=NEW_TOKENS,
              ignore_eos=True, hidden_dim=32, intermediate_dim=32)
    if "alignment" in over:
        kw["alignment"] = over["alignment"]
    if "fusion" in over:
        kw["fusion"] = over["fusion"]
    if kind == "tiny":
        teachers = [folders[t] for t in over["teacher"]]
        cfg = build_run_config(base_model=folders["receiver"],
                               teacher_model=teachers if len(teachers) > 1 else teachers[0], **kw)
    else:
        cfg = build_run_config(preset="smollm2+gemma3-demo", **kw)
    pipe = load_pipeline(cfg)
    if kind == "tiny":
        loud_weights(pipe)
    open_fuser(pipe, 1)
    return pipe, cfg


def prompts_of(name: str) -> list[str]:
    return TINY_PROMPTS if CASES[name][0] == "tiny" else REAL_PROMPTS


def logits_entry(logits: torch.Tensor) -> dict:
    """What the golden keeps of first-token logits [V]: all of them, or the top TOP_K."""
    x = logits.detach().float().flatten()
    if x.numel() <= 512:
        return {"all": [round(float(v), 6) for v in x]}
    v, i = torch.topk(x, TOP_K)
    return {"top_ids": [int(j) for j in i], "top_values": [round(float(u), 6) for u in v]}


def logits_diff(logits: torch.Tensor, entry: dict) -> float:
    """Max abs difference between our first-token logits [V] and a golden entry."""
    x = logits.detach().float().flatten()
    if "all" in entry:
        return float((x - torch.tensor(entry["all"])).abs().max())
    return float((x[entry["top_ids"]] - torch.tensor(entry["top_values"])).abs().max())
