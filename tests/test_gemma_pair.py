"""Real weights: SmolLM2-135M-Instruct (receiver) and Gemma-3-270M (sharer, its own tokenizer).

Alignment on GSM8K-style questions with the real tokenizers; the offline heterogeneous preset in
every mode; a two-sharer run (SmolLM2 and Gemma as sharers). Kept short (few tokens)."""

from __future__ import annotations

import pytest

from c2c_core.models.alignment import TokenAligner, same_ids
from c2c_core.spec.config import build_run_config
from c2c_core.models.loading import load_pipeline, load_tokenizer
from c2c_core.spec.config import ModelSpec
from c2c_core.io.prompts import PromptItem as Item
from c2c_core.io.records import check_record
from c2c_core.bench.runner import chat_ids, run_many

# a shared 2-core machine can be 20x slower than an idle one: allow for it
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

GSM8K_STYLE = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in"
    " May. How many clips did Natalia sell altogether in April and May?",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting."
    " How much did she earn?",
    "Betty is saving money for a new wallet which costs $100. Betty has only half of the money"
    " she needs. Her parents decided to give her $15 for that purpose, and her grandparents"
    " twice as much as her parents. How much more money does Betty need to buy the wallet?",
    "James writes a 3-page letter to 2 different friends twice a week. How many pages does he"
    " write a year?  Ünïcödé ½ – “quotes” 🙂",
]


@pytest.fixture(scope="module")
def real_toks():
    smol, _ = load_tokenizer(ModelSpec("smollm2"))
    gemma, _ = load_tokenizer(ModelSpec("gemma3"))
    return smol, gemma


def _clean(piece: str) -> str:
    """A byte-level piece that ends inside a multi-byte character decodes with U+FFFD for the
    incomplete bytes: compare the complete characters before it."""
    return piece.split("\ufffd")[0]


def _starts(piece: str, text: str) -> bool:
    return text.startswith(_clean(piece))


@pytest.mark.parametrize("direction", ["smol->gemma", "gemma->smol"])
@pytest.mark.parametrize("strategy", ["first", "longest"])
def test_alignment_on_gsm8k_questions(real_toks, strategy, direction):
    smol, gemma = real_toks
    r, s = (smol, gemma) if direction == "smol->gemma" else (gemma, smol)
    assert not same_ids(r, s)
    al = TokenAligner(r, s, strategy)
    r_special, s_special = set(r.all_special_ids), set(s.all_special_ids)
    for q in GSM8K_STYLE:
        ids = chat_ids(r, q)
        out = al.align(ids)
        assert len(out) == len(ids)
        for rid, sid in zip(ids, out):
            if rid in r_special:  # by role (e.g. <|im_start|> -> <bos>), else by literal text
                literal = s.convert_ids_to_tokens(sid) == r.convert_ids_to_tokens(rid)
                assert sid in s_special or literal
                continue
            rtext = r.decode([rid], clean_up_tokenization_spaces=False)
            piece = s.decode([sid], clean_up_tokenization_spaces=False)
            if strategy == "first":
                assert _starts(piece, rtext), (q, rtext, piece)
            else:
                assert _clean(piece) in rtext, (q, rtext, piece)
    if direction == "smol->gemma":  # Gemma's 262k vocabulary holds nearly every SmolLM2 token
        assert al.align([smol.convert_tokens_to_ids("<|im_start|>")]) == [gemma.bos_token_id]
        assert al.align([smol.convert_tokens_to_ids("<|im_end|>")]) == [gemma.eos_token_id]
    else:
        assert al.many  # SmolLM2's 49k vocabulary splits some Gemma tokens


@pytest.fixture(scope="module")
def gemma_pair():
    cfg = build_run_config("smollm2+gemma3-demo", mode="all", max_new_tokens=3, t2t_note_tokens=3,
                           warmup=0, hidden_dim=64, intermediate_dim=64, dtype="float32")
    return load_pipeline(cfg), cfg


def test_gemma_pair_runs_every_mode(gemma_pair):
    pipe, cfg = gemma_pair
    assert pipe.info["receiver"] == "SmolLM2-135M-Instruct" and pipe.info["sharer"] == "gemma-3-270m"
    assert pipe.sharers[0].alignment == "first"
    assert pipe.fuser.mapping[29] == [(17, 29)] and pipe.fuser.mapping[0] == [(0, 0)]  # 30 <- 18
    recs = run_many(pipe, cfg, [Item(1, GSM8K_STYLE[1])])
    assert [r["mode"] for r in recs] == ["c2c", "receiver", "sharer", "t2t"]
    for r in recs:
        assert check_record(r) == [], (r["mode"], check_record(r))
    c2c, recv, sharer, t2t = recs
    assert c2c["timing"]["alignment_ms"] > 0 and c2c["timing"]["projector_calls"] == 30
    assert c2c["response"] == recv["response"]  # untrained fuser: gate closed
    # the sharer speaks for itself with Gemma 3's published template (its GGUF carries none)
    assert sharer["sharer_prompt_format"] == t2t["sharer_prompt_format"] == "gemma3_template"
    gem = pipe.sharers[0].tokenizer
    ids = chat_ids(gem, GSM8K_STYLE[1], True, pipe.sharers[0].name)
    assert sharer["timing"]["prompt_tokens"] == len(ids)
    assert gem.decode(ids[:4]).startswith("<bos><start_of_turn>user\n")


@pytest.mark.parametrize("pair", ["gemma", "two"])
def test_fast_engine_gives_the_eager_tokens_on_the_real_pairs(gemma_pair, pair):
    """The packaged SmolLM2 <- Gemma pair (own tokenizer: sectioned plan, padded sharer,
    sliding-window sharer) and SmolLM2 + Gemma as two sharers, every mode: the fast engine at
    batch 1 and at batch 2 writes the eager engine's tokens (fp32, greedy, a few tokens)."""
    from dataclasses import replace

    from c2c_core.engines import fast
    from c2c_core.bench.runner import generate
    from c2c_core.measure.timing import Timer
    if pair == "gemma":
        pipe, cfg = gemma_pair
    else:
        cfg = build_run_config(base_model="smollm2", teacher_model=["smollm2", "gemma3"],
                               mode="all", max_new_tokens=3, t2t_note_tokens=3, warmup=0,
                               hidden_dim=64, intermediate_dim=64, dtype="float32")
        pipe = load_pipeline(cfg)
    cfg = replace(cfg, gen=replace(cfg.gen, ignore_eos=True))
    fast.engine_for(pipe, compile=False)
    items = [Item(1, GSM8K_STYLE[1]), Item(2, "写一首关于猫的诗 🙂")]
    for mode in ("c2c", "receiver", "sharer", "t2t"):
        eager = [generate(pipe, replace(cfg, engine="eager"), it, mode, Timer(pipe.device)).tokens
                 for it in items]
        f1 = [generate(pipe, replace(cfg, engine="fast"), it, mode, Timer(pipe.device)).tokens
              for it in items]
        f2 = [g.tokens for g in fast.generate_batch(pipe, replace(cfg, engine="fast"), items,
                                                     mode, Timer(pipe.device))]
        assert f1 == eager and f2 == eager, (mode, eager, f1, f2)


def test_two_sharers_smollm2_and_gemma():
    cfg = build_run_config(base_model="smollm2", teacher_model=["smollm2", "gemma3"],
                           max_new_tokens=1, warmup=0, hidden_dim=64, intermediate_dim=64)
    pipe = load_pipeline(cfg)
    assert [sl.alignment for sl in pipe.sharers] == ["none", "first"]
    recs = run_many(pipe, cfg, [Item(1, GSM8K_STYLE[0])])
    for r in recs:
        assert check_record(r) == []
        t = r["timing"]
        assert [e["model"] for e in t["sharers"]] == ["SmolLM2-135M-Instruct", "gemma-3-270m"]
        for f, total in (("embedding_ms", "teacher_embedding_ms"),
                         ("prefill_ms", "teacher_prefill_ms"),
                         ("projection_ms", "projector_total_ms"),
                         ("alignment_ms", "alignment_ms"), ("projector_calls", "projector_calls")):
            assert sum(e[f] for e in t["sharers"]) == pytest.approx(t[total], abs=1e-6)
        # SmolLM2 (same tokenizer) projects the opening template and the message, each its own
        # section in the reference's order (30 layers each); Gemma the message only
        assert [e["projector_calls"] for e in t["sharers"]] == [60, 30]
        assert t["projector_calls"] == 90 and t["sharers"][1]["alignment_ms"] > 0
        assert [s["projected"] for s in t["sections"]] == [True, True, False, False]
