"""The sectioned cross-tokenizer alignment (c2c_core.plan.sections) against the reference.

- golden: every prompt x strategy x direction of tests/golden/alignment_smollm2_gemma3.json
  (made by scripts/golden_alignment.py with the reference's own aligner) equals our plan exactly:
  ids, pad masks, projection mask, sections. Our Gemma tokenizer is the packaged GGUF one with no
  template, so this also checks the supplied Gemma 3 template renders as the reference saw it;
- token rule: every group of receiver ids under "token_rule" in the same golden (the reference's
  exact-length `align_tokens`: prompts, chat markers, every special id, roles, ids the sharer
  encodes to nothing or splits, a stride over each vocabulary) equals models.alignment's
  TokenAligner, the one rule sweeps and the sectioned plan's message both use;
- where the reference fails or aligns the wrong text, what we do instead;
- tiny hand-made tokenizers with known ids: pad side, pad id (EOS when no pad), section
  boundaries, first / longest, a template-less tokenizer, the same-tokenizer plan.
"""

from __future__ import annotations

import json
import os

import pytest

from c2c_core.spec.config import ModelSpec
from c2c_core.spec.errors import UserError
from c2c_core.engines.generation import chat_ids
from c2c_core.models.alignment import TokenAligner
from c2c_core.models.loading import load_tokenizer
from c2c_core.plan.sections import (GEMMA3_CHAT_TEMPLATE, SectionedAlignment, plan_sections,
                                    template_of)

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "alignment_smollm2_gemma3.json")


@pytest.fixture(scope="module")
def golden():
    with open(GOLDEN, encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def real():
    return {n: load_tokenizer(ModelSpec(n))[0] for n in ("smollm2", "gemma3")}


def bits(mask) -> str:
    return "".join("1" if m else "0" for m in mask)


def plan(real, receiver, sharer, prompt, strategy="first", **kw) -> SectionedAlignment:
    return plan_sections(real[receiver], real[sharer], prompt, strategy, receiver_name=receiver,
                         sharer_name=sharer, **kw)


def test_golden_equals_reference(real, golden):
    assert not real["gemma3"].chat_template  # the supplied template is the one under test
    assert len(golden["cases"]) == 44
    assert {(c["receiver"], c["strategy"]) for c in golden["cases"]} == {
        (r, s) for r in ("smollm2", "gemma3") for s in ("first", "longest")}
    for c in golden["cases"]:
        p = plan(real, c["receiver"], c["sharer"], c["prompt"], c["strategy"])
        where = f'{c["receiver"]}<-{c["sharer"]} {c["strategy"]} {c["prompt_id"]}'
        assert list(p.receiver_ids) == c["receiver_ids"], where
        assert list(p.sharer_ids) == c["sharer_ids"], where
        assert bits(p.receiver_pad_mask) == c["receiver_pad_mask"], where
        assert bits(p.sharer_pad_mask) == c["sharer_pad_mask"], where
        assert bits(p.projection_mask) == c["projection_mask"], where
        assert [[s.kind, s.start, s.end] for s in p.sections] == c["sections"], where
        assert (p.receiver_format, p.sharer_format) == (
            ("chat_template", "gemma3_template") if c["receiver"] == "smollm2"
            else ("gemma3_template", "chat_template")), where


def test_golden_covers_what_it_claims(golden):
    """Strategies differ somewhere, Gemma's pads are used, padding lands in template sections,
    and the empty prompt projects nothing (so the comparison above is not vacuous)."""
    cases = {(c["receiver"], c["strategy"], c["prompt_id"]): c for c in golden["cases"]}
    assert any(cases[(r, "first", p)]["sharer_ids"] != cases[(r, "longest", p)]["sharer_ids"]
               for (r, _, p) in cases)
    assert "1" not in cases[("smollm2", "first", "empty")]["projection_mask"]
    for c in golden["cases"]:
        for m in (c["receiver_pad_mask"], c["sharer_pad_mask"]):
            assert not any(a == b == "1" for a, b in zip(m, c["projection_mask"]))


def test_token_rule_equals_reference(real, golden):
    """Exact-length ids: our TokenAligner gives the reference's align_tokens ids, group by group."""
    rule = golden["token_rule"]
    assert {(t["receiver"], t["strategy"]) for t in rule} == {
        (r, s) for r in ("smollm2", "gemma3") for s in ("first", "longest")}
    aligners = {}
    bad = []
    for t in rule:
        key = (t["receiver"], t["sharer"], t["strategy"])
        if key not in aligners:
            aligners[key] = TokenAligner(real[t["receiver"]], real[t["sharer"]], t["strategy"])
        got = aligners[key].align(t["receiver_ids"])
        bad += [(*key, t["group"], rid, want, g)
                for rid, want, g in zip(t["receiver_ids"], t["sharer_ids"], got) if want != g]
    assert not bad, f"{len(bad)} ids differ from the reference, e.g. {bad[:8]}"


def test_token_rule_golden_covers_what_it_claims(real, golden):
    groups = {(t["receiver"], t["strategy"], t["group"]): t for t in golden["token_rule"]}
    for name, tok in real.items():
        t = groups[(name, "first", "all_special_ids")]
        assert t["receiver_ids"] == list(tok.all_special_ids)
        assert set(t["receiver_ids"]) >= {tok.pad_token_id, tok.eos_token_id, tok.bos_token_id,
                                          tok.unk_token_id}
        assert groups[(name, "first", "added_special")]["receiver_ids"]  # chat markers etc.
        assert groups[(name, "first", "longest_ties")]["receiver_ids"]
        pieces = (name, "first", "several_pieces")
        assert groups[pieces]["sharer_ids"] != groups[(name, "longest", "several_pieces")][
            "sharer_ids"]
    # Gemma tokens whose text SmolLM2 encodes to nothing: the sharer's UNK (SmolLM2's is 0)
    t = groups[("gemma3", "first", "encodes_to_nothing")]
    assert t["receiver_ids"] and set(t["sharer_ids"]) == {real["smollm2"].unk_token_id}


def test_where_the_reference_fails_or_misplaces(real, golden):
    differs = {(d["receiver"], d["prompt_id"]): d["reference"] for d in golden["reference_differs"]}
    assert "Section count mismatch" in differs[("smollm2", "outer_whitespace")]["error"]
    # Gemma's template trims the message; the receiver keeps its own message tokens
    p = plan(real, "smollm2", "gemma3", "  spaces around  ")
    msg = [s for s in p.sections if s.kind == "message"]
    assert len(msg) == 1 and p.projected == msg[0].end - msg[0].start
    smol = real["smollm2"]
    # SmolLM2 reads "\n " as one token across the boundary: a token that overlaps the message
    # belongs to it (the reference's rule)
    assert smol.decode(p.receiver_ids[msg[0].start:msg[0].end]) == "\n  spaces around  "
    # "Face": the reference takes "Hugging Face" in SmolLM2's system prompt; we take the message
    ref_mask = differs[("smollm2", "in_system_prompt")]["projection_mask"]
    p = plan(real, "smollm2", "gemma3", "Face")
    assert bits(p.projection_mask) != ref_mask
    on = [i for i, m in enumerate(p.projection_mask) if m]
    assert smol.decode([p.receiver_ids[i] for i in on]) == "Face"
    assert smol.decode(p.receiver_ids[:on[0]]).endswith("<|im_start|>user\n")


def test_receiver_ids_are_todays_encoding(real):
    """Without its padding, the SmolLM2 receiver reads exactly what chat_ids gives it today."""
    for text in ("What is 25 * 17?", "请用一句话解释机器学习。"):
        p = plan(real, "smollm2", "gemma3", text)
        own = [i for i, pad in zip(p.receiver_ids, p.receiver_pad_mask) if not pad]
        assert own == chat_ids(real["smollm2"], text)


def test_gemma3_template_is_the_published_layout(real):
    g = real["gemma3"]
    tmpl, fmt = template_of(g, name="gemma3")
    assert (tmpl, fmt) == (GEMMA3_CHAT_TEMPLATE, "gemma3_template")
    assert template_of(g, chat_template=False, name="gemma3") == (None, "plain")
    text = g.apply_chat_template([{"role": "user", "content": "  Hi\tthere \n"}],
                                 chat_template=tmpl, tokenize=False, add_generation_prompt=True)
    assert text == "<bos><start_of_turn>user\nHi\tthere<end_of_turn>\n<start_of_turn>model\n"


def test_real_same_tokenizer_and_plain(real):
    s = real["smollm2"]
    p = plan_sections(s, s, "What is 25 * 17?", "longest")
    ids = chat_ids(s, "What is 25 * 17?")
    assert list(p.receiver_ids) == list(p.sharer_ids) == ids and p.strategy == "none"
    assert p.projection_mask == (True,) * (len(ids) - 1) + (False,)
    # templates off: SmolLM2 adds no BOS, Gemma does: the receiver's empty section is padded
    q = plan(real, "smollm2", "gemma3", "Hi there", chat_template=False)
    assert q.receiver_format == q.sharer_format == "plain"
    assert q.receiver_ids[0] == s.pad_token_id and q.receiver_pad_mask[0]
    assert q.sharer_ids[0] == real["gemma3"].bos_token_id and not q.sharer_pad_mask[0]
    assert list(q.receiver_ids[1:]) == chat_ids(s, "Hi there", chat_template=False)
    assert bits(q.projection_mask) == "0" + "1" * (len(q.receiver_ids) - 1)


# --- tiny hand-made tokenizers ----------------------------------------------------------------

R_TEMPLATE = ("{% for m in messages %}<r_sys>ab<r_u>{{ m['content'] }}<r_end>{% endfor %}"
              "{% if add_generation_prompt %}<r_a>{% endif %}")
S_TEMPLATE = ("{% for m in messages %}<s_u>{{ m['content'] }}<s_end>\n{% endfor %}"
              "{% if add_generation_prompt %}<s_a>\n{% endif %}")
CHARS = list("abcdehlorwxyz \n")


def _receiver():
    """Whole words: 'hello' is one token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = ["[UNK]", "ab", "hello", "world", "xyz"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="<r_pad>",
                                  eos_token="<r_end>")
    tok.add_special_tokens({"additional_special_tokens": ["<r_sys>", "<r_u>", "<r_a>"]})
    tok.chat_template = R_TEMPLATE
    return tok


def _sharer(unk: str | None = None):
    """Characters, plus the merge 'll'; no pad token (its EOS pads); no UNK unless given."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast
    vocab = {c: 100 + i for i, c in enumerate(CHARS)}
    vocab["ll"] = 200
    tk = Tokenizer(models.BPE(vocab, [("l", "l")]))
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<s_end>",
                                  **({"unk_token": unk} if unk else {}))
    tok.add_special_tokens({"additional_special_tokens": ["<s_u>", "<s_a>"]})
    tok.chat_template = S_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def tiny():
    return _receiver(), _sharer()


def test_tiny_pads_at_section_end_with_each_pad_id(tiny):
    r, s = tiny
    ch = {c: 100 + i for i, c in enumerate(CHARS)}
    R = {t: r.convert_tokens_to_ids(t) for t in ["<r_sys>", "ab", "<r_u>", "hello", "world",
                                                 "<r_end>", "<r_a>", "<r_pad>"]}
    S = {t: s.convert_tokens_to_ids(t) for t in ["<s_u>", "<s_end>", "<s_a>"]}
    for strategy, h in (("first", ch["h"]), ("longest", 200)):
        p = plan_sections(r, s, "hello world", strategy)
        # template (3 vs 1: sharer padded after its <s_u>), message (2), template (2 vs 4)
        assert list(p.receiver_ids) == [R["<r_sys>"], R["ab"], R["<r_u>"], R["hello"],
                                        R["world"], R["<r_end>"], R["<r_a>"], R["<r_pad>"],
                                        R["<r_pad>"]]
        assert list(p.sharer_ids) == [S["<s_u>"], S["<s_end>"], S["<s_end>"], h, ch["w"],
                                      S["<s_end>"], ch["\n"], S["<s_a>"], ch["\n"]]
        assert bits(p.receiver_pad_mask) == "000000011"
        assert bits(p.sharer_pad_mask) == "011000000"
        assert bits(p.projection_mask) == "000110000"
        assert [(x.kind, x.start, x.end, x.receiver_tokens, x.sharer_tokens)
                for x in p.sections] == [("template", 0, 3, 3, 1), ("message", 3, 5, 2, 2),
                                         ("template", 5, 9, 2, 4)]
        assert p.projected == 2 and p.strategy == strategy


def test_tiny_other_direction_and_edge_cases(tiny):
    r, s = tiny
    # sharer as receiver: each character token maps to the word that re-encodes it
    p = plan_sections(s, r, "xyz", "first")
    assert bits(p.projection_mask) == "0" * 3 + "111" + "0" * 4  # 3-token prefix of r
    assert bits(p.sharer_pad_mask) == "0000000011" and bits(p.receiver_pad_mask) == "0110000000"
    # no message text: one template section, padded at its end, nothing projected
    e = plan_sections(r, s, "", "first")
    assert [x.kind for x in e.sections] == ["template"] and e.projected == 0
    assert len(e.receiver_ids) == 5 and not any(e.receiver_pad_mask + e.sharer_pad_mask)
    with pytest.raises(UserError, match="unknown"):
        plan_sections(r, s, "hello", "middle")
    # a template-less tokenizer that is not Gemma 3 reads plain text
    s2 = _sharer()
    s2.chat_template = None
    assert template_of(s2) == (None, "plain")
    q = plan_sections(r, s2, "hello", "longest")
    assert q.sharer_format == "plain" and q.projected == 1
    assert list(q.sharer_ids[:3]) == [s2.eos_token_id] * 3  # all padding before the message
    # same tokenizer: today's plan, strategy ignored
    same = plan_sections(r, r, "hello world", "middle")
    assert same.receiver_ids == same.sharer_ids and same.projected == len(same.receiver_ids) - 1


def test_tiny_token_rule_pad_is_eos_and_fallback_is_unk_or_0(tiny):
    """The reference's special-token rule where the real pair cannot show it (both have a pad and
    an UNK); checked by hand against the reference's align_tokens on these tokenizers."""
    r, s = tiny
    R = {t: r.convert_tokens_to_ids(t) for t in ["[UNK]", "<r_end>", "<r_pad>", "<r_sys>"]}
    s_end = s.eos_token_id
    al = TokenAligner(r, s, "first")
    # a sharer without UNK: a special token with no match (here the receiver's UNK, whose role
    # the sharer lacks, and a marker) becomes 0, not the sharer's EOS
    assert al.align([R["[UNK]"], R["<r_sys>"]]) == [0, 0]
    assert al.unmapped == {R["[UNK]"], R["<r_sys>"]}
    # a sharer without a pad token: its EOS is its pad, so the receiver's pad maps to it
    assert al.align([R["<r_pad>"], R["<r_end>"]]) == [s_end, s_end]
    su = _sharer(unk="<s_unk>")
    al = TokenAligner(r, su, "first")
    assert al.align([R["<r_pad>"], R["[UNK]"], R["<r_sys>"]]) == [
        su.eos_token_id, su.unk_token_id, su.unk_token_id]  # pad by role, not the UNK fallback
    # the other way: the sharer-as-receiver's pad is its EOS; pad then eos, the later role wins
    rev = TokenAligner(s, r, "first")
    assert rev.align([s_end, s.convert_tokens_to_ids("<s_u>")]) == [R["<r_end>"], R["[UNK]"]]
