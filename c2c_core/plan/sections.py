"""Sectioned cross-tokenizer alignment: one user message, a receiver and a sharer tokenizer.

Follows the C2C reference (thu-nics/C2C, `TokenAligner.align_chat_messages` in
`rosetta/model/aligner.py`, as its evaluator calls it for generation, with the `kv_cache_index`
its evaluator and training adapter build from the result). Written from that description:
- each model renders the message with its OWN chat template (generation prompt on, thinking off)
  and tokenizes the text without adding special tokens;
- each sequence is cut into sections by character offsets: template before the message, the
  message, template after it. A token that overlaps the message's characters belongs to the
  message (first token ending after its start .. first token starting at or after its end);
- each template section keeps every model's own tokens and the shorter one is padded at its END
  (right, inside the section) with that model's pad id (its EOS id when it has none) to the
  longer length; the pad masks are True there;
- the message section has the receiver's tokens, and the sharer gets one token per receiver token
  by the reference's token rule, `c2c_core.models.alignment.TokenAligner` (the same code that
  aligns exact-length ids): special tokens (the receiver's all_special_ids) by role (pad-or-EOS,
  eos, bos, unk; a later role wins), then by literal text, else the sharer's `unk_token_id or 0`;
  any other token's text re-encoded by the sharer, keeping its first piece or its longest piece
  (`unk_token_id or 0` when it encodes to nothing). The sharer's own message tokens are not
  used;
- the sharer's cache is projected on message positions only (`projection_mask`); template and
  pad positions are not (the reference's kv_cache_index -1).

Where we differ from the reference, and why (each case is one where the reference either fails
an assertion or picks the wrong text; on ordinary prompts the outputs are identical, which
tests/test_plan_sections.py checks against vectors produced by the reference itself):
- the message is located by rendering the template around a placeholder, not by searching for
  the message text (the reference takes the first match followed by '<', so a message such as
  "Face" matches "Hugging Face<|im_end|>" inside SmolLM2's default system prompt);
- a template that trims the message (Gemma 3 does) or a message made only of whitespace: the
  reference finds no message in one model and stops on "Section count mismatch"; here the
  message section is the receiver's, and a sharer whose rendered message is empty simply has
  none of its own (it never had any use for it);
- an empty section on one side only (e.g. plain text without BOS against a template) is padded
  like any other instead of failing the same assertion;
- templateless tokenizers: the reference always applies a chat template. Gemma 3 tokenizers
  without one (the packaged GGUF) get Gemma 3's published template (GEMMA3_CHAT_TEMPLATE);
  other templateless tokenizers, and every tokenizer when templates are off, read plain text
  with their own special tokens (e.g. BOS), as generation.chat_ids does today; the added special
  tokens form the template sections.
For engines: either sequence can end in padding (a receiver whose closing template is shorter,
e.g. Gemma 3 <- SmolLM2), so the first new token comes from the last non-pad receiver position,
and pads are masked out of attention (the reference numbers positions 0..L-1, pads included).
Same tokenizer (ids mean the same tokens): no padding, one id sequence for both, and the
projection stays today's: every position but the last (the reference's instruction / last-token
sections), so a caller can use `plan_sections` for any pair.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..models.alignment import STRATEGIES, TokenAligner, pad_or_eos
from ..spec.errors import UserError

#: Gemma 3's published chat template (string content; its image items are left out).
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

_SLOT = "C2CxMESSAGExSLOTx7f3a"  # stands for the message when a template is split in sections
_GEMMA3_NAME = re.compile(r"gemma[-_ ]?3", re.IGNORECASE)


@dataclass(frozen=True)
class Section:
    """A span [start, end) of the aligned sequences, and how many real tokens each model has in
    it (the rest are its padding, at the end of the span)."""
    kind: str            # "template" | "message"; same tokenizer: "instruction" | "last"
    start: int
    end: int
    receiver_tokens: int
    sharer_tokens: int


@dataclass(frozen=True)
class SectionedAlignment:
    receiver_ids: tuple[int, ...]
    sharer_ids: tuple[int, ...]            # same length as receiver_ids
    receiver_pad_mask: tuple[bool, ...]    # True where the position is padding
    sharer_pad_mask: tuple[bool, ...]
    projection_mask: tuple[bool, ...]      # True where the sharer's KV is projected
    sections: tuple[Section, ...]
    strategy: str                          # "first" | "longest" | "none" (same tokenizer)
    receiver_format: str                   # "chat_template" | "gemma3_template" | "plain"
    sharer_format: str

    @property
    def projected(self) -> int:
        return sum(self.projection_mask)


#: Section kinds whose sharer KV is projected (the reference's kv_cache_index [1, 0]).
PROJECTED_KINDS = ("message", "instruction")


def tail_of(sections, receiver_pad) -> int:
    """Where the reference's last section starts: the receiver alone reads it (its last
    position gives the first new token), no sharer fills it and nothing in it is projected
    (RosettaModel.forward's last-section branch). `sections`: (kind, start, end) in order;
    `receiver_pad`: True at receiver padding (a trailing run of it is cut by the plan).

    The last section is the last one holding a real receiver token. When that section is a
    projected one (no closing template after the message: plain text), its last token alone
    is the last section, as in the same-tokenizer split; the reference always renders a chat
    template, so it has no such case."""
    real = [i for i, p in enumerate(receiver_pad) if not p]
    if not real:
        return 0
    end = real[-1] + 1
    for kind, start, stop in reversed(list(sections)):
        if start < end and any(not p for p in receiver_pad[start:min(stop, end)]):
            return end - 1 if kind in PROJECTED_KINDS else start
    return end - 1


def is_gemma3(tok, name: str | None = None) -> bool:
    """A Gemma 3 tokenizer: by name (the caller's, or the tokenizer's path), or a Gemma
    tokenizer class whose vocabulary has Gemma 3's image marker."""
    if _GEMMA3_NAME.search(f"{name or ''} {getattr(tok, 'name_or_path', '') or ''}"):
        return True
    if "gemma" not in type(tok).__name__.lower():
        return False
    unk = getattr(tok, "unk_token_id", None)
    return tok.convert_tokens_to_ids("<start_of_image>") not in (None, unk)


def template_of(tok, chat_template: bool = True, name: str | None = None) -> tuple[str | None, str]:
    """(the chat template to render with or None for plain text, its format name)."""
    own = getattr(tok, "chat_template", None) if chat_template else None
    if own:
        return own, "chat_template"
    if chat_template and is_gemma3(tok, name):
        return GEMMA3_CHAT_TEMPLATE, "gemma3_template"
    return None, "plain"


def pad_id(tok) -> int:
    """The id that pads a template section: the tokenizer's pad, its EOS when it has none."""
    i = pad_or_eos(tok)
    if i is not None:
        return i
    raise UserError(f"Tokenizer {getattr(tok, 'name_or_path', '?')} has neither a pad nor an EOS"
                    " token; the sectioned alignment needs one to pad template sections.")


def _render(tok, template: str, message: str) -> str:
    kw = {} if template is getattr(tok, "chat_template", None) else {"chat_template": template}
    return tok.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                   add_generation_prompt=True, enable_thinking=False, **kw)


def _templated(tok, template: str, message: str) -> tuple[list[int], int, int]:
    """(ids, first message token, end of the message tokens) of the templated message."""
    text = _render(tok, template, message)
    parts = _render(tok, template, _SLOT).split(_SLOT)
    if len(parts) != 2 or not (text.startswith(parts[0]) and text.endswith(parts[1])) \
            or len(parts[0]) + len(parts[1]) > len(text):
        raise UserError(f"The chat template of {getattr(tok, 'name_or_path', '?')} does not"
                        " place the message as one piece of text; it cannot be sectioned.")
    lo, hi = len(parts[0]), len(text) - len(parts[1])
    try:
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError as e:  # slow tokenizers have no offsets
        raise UserError("The sectioned alignment needs a fast tokenizer (character"
                        f" offsets); {type(tok).__name__} has none.") from e
    ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    if lo == hi:  # no message text in this model's rendering
        a = next((i for i, (s, _) in enumerate(offsets) if s >= lo), len(ids))
        return ids, a, a
    a = 0
    while a < len(offsets) and offsets[a][1] <= lo:
        a += 1
    b = a
    while b < len(offsets) and offsets[b][0] < hi:
        b += 1
    return ids, a, b


def _plain(tok, message: str) -> tuple[list[int], int, int]:
    """Plain text with the tokenizer's own special tokens (as generation.chat_ids)."""
    full = list(tok(message, add_special_tokens=True)["input_ids"])
    core = list(tok(message, add_special_tokens=False)["input_ids"])
    n = len(core)
    for a in range(len(full) - n + 1):
        if full[a:a + n] == core:
            return full, a, a + n
    raise UserError(f"Tokenizer {getattr(tok, 'name_or_path', '?')} changes the message's tokens"
                    " when it adds its special tokens; the message cannot be sectioned.")


def encode_sections(tok, message: str, chat_template: bool = True,
                    name: str | None = None) -> tuple[list[int], int, int, str]:
    """One model's own ids for the message, the message token range [a, b), and its format."""
    template, fmt = template_of(tok, chat_template, name)
    ids, a, b = _templated(tok, template, message) if template else _plain(tok, message)
    return ids, a, b, fmt


def _same_vocab(r, s) -> bool:
    return r is s or (len(r) == len(s) and r.get_vocab() == s.get_vocab())


def plan_sections(receiver_tok, sharer_tok, message: str, strategy: str = "first",
                  chat_template: bool = True, *, receiver_name: str | None = None,
                  sharer_name: str | None = None,
                  same_tokenizer: bool | None = None) -> SectionedAlignment:
    """The aligned ids, masks and sections for one user message (see the module docstring).

    `same_tokenizer`: whether the receiver's ids mean the same tokens to the sharer (callers pass
    alignment.same_ids); None compares the two vocabularies for equality."""
    if same_tokenizer is None:
        same_tokenizer = _same_vocab(receiver_tok, sharer_tok)
    if same_tokenizer:  # today's plan: the receiver's ids for both, all but the last projected
        template, r_fmt = template_of(receiver_tok, chat_template, receiver_name)
        r_ids = (receiver_tok(_render(receiver_tok, template, message), add_special_tokens=False)
                 if template else receiver_tok(message, add_special_tokens=True))["input_ids"]
        n = len(r_ids)
        if not n:
            raise UserError("The prompt encodes to no tokens; give it some text.")
        ids, no = tuple(r_ids), (False,) * n
        return SectionedAlignment(ids, ids, no, no, (True,) * (n - 1) + (False,),
                                  (Section("instruction", 0, n - 1, n - 1, n - 1),
                                   Section("last", n - 1, n, 1, 1)),
                                  "none", r_fmt, r_fmt)
    if strategy not in STRATEGIES:
        raise UserError(f"Alignment strategy {strategy} is unknown; use first or longest.")
    r_ids, ra, rb, r_fmt = encode_sections(receiver_tok, message, chat_template, receiver_name)
    s_ids, sa, sb, s_fmt = encode_sections(sharer_tok, message, chat_template, sharer_name)
    r_pad, s_pad = pad_id(receiver_tok), pad_id(sharer_tok)
    if rb > ra:  # template, message, template
        parts = [("template", r_ids[:ra], s_ids[:sa]),
                 ("message", r_ids[ra:rb], None),
                 ("template", r_ids[rb:], s_ids[sb:])]
    else:  # no message tokens: one template section, nothing projected
        parts = [("template", r_ids, s_ids[:sa] + s_ids[sb:])]
    align = TokenAligner(receiver_tok, sharer_tok, strategy).align
    rx, sx, rm, sm, proj, sections = [], [], [], [], [], []
    for kind, r, s in parts:
        start = len(rx)
        if kind == "message":
            s = align(r)
            n = len(r)
        else:
            n = max(len(r), len(s))
        if n == 0:  # an empty section on both sides is left out, as in the reference
            continue
        rx += list(r) + [r_pad] * (n - len(r))
        sx += list(s) + [s_pad] * (n - len(s))
        rm += [False] * len(r) + [True] * (n - len(r))
        sm += [False] * len(s) + [True] * (n - len(s))
        proj += [kind == "message"] * n
        sections.append(Section(kind, start, start + n, len(r), len(s)))
    return SectionedAlignment(tuple(int(i) for i in rx), tuple(int(i) for i in sx), tuple(rm),
                              tuple(sm), tuple(proj), tuple(sections), strategy, r_fmt, s_fmt)
