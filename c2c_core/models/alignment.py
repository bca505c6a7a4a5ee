"""Token alignment for a sharer whose tokenizer differs from the receiver's.

One rule, the C2C reference's (thu-nics/C2C, `TokenAligner.align_tokens` in
`rosetta/model/aligner.py`), used for exact-length ids (`TokenAligner.align`) and for the message
of a sectioned chat prompt (`c2c_core.plan.sections.plan_sections`). Every receiver token id maps
to exactly one sharer token id, so the sharer's cache has the receiver's length and positions line
up one to one. For receiver id `r` with text `t` (decoded alone, special tokens kept, no
clean-up):
- `r` is a special token (in the receiver's `all_special_ids`; other added tokens, e.g. chat
  markers not listed there, are ordinary tokens):
  1. by role: receiver pad, eos, bos, unk -> the sharer's pad, eos, bos, unk, built in that order
     so that a later role wins on an id two roles share (a receiver whose pad is its EOS maps it
     to the sharer's EOS). "pad" means pad-or-EOS on both sides: the reference sets a missing
     pad token to the EOS token. A role the sharer lacks (None) maps nothing;
  2. by literal text: the sharer's `convert_tokens_to_ids(t)`, accepted unless it is the
     sharer's UNK id;
  3. else the sharer's `unk_token_id or 0`;
- an ordinary token: the sharer encodes `t` without special tokens;
  - no pieces: the sharer's `unk_token_id or 0`;
  - one piece: that piece (either strategy);
  - several pieces: strategy "first" takes the first; "longest" the piece whose decoded text is
    longest, the first such on ties (and the first piece when every piece decodes to "").

Written from that description (no code copied). Where we differ, the output never does on a token
the reference handles:
- the reference sets the missing pad on the tokenizer objects themselves; we read pad-or-EOS and
  leave the tokenizers as they are;
- a literal-text lookup that gives None (a tokenizer without UNK) falls back instead of returning
  None as the reference would;
- our cache is per receiver id (the reference caches whole sequences; the rule is per token), so
  a warm aligner costs one dict lookup per token.
`many` records the receiver ids the sharer split into several pieces, `unmapped` those that fell
back to the sharer's UNK (or 0).

Whether a sharer needs alignment is detected from the vocabularies, not from model names:
`same_ids(a, b)` is true when every token both vocabularies hold has the same id in both and the
shared part covers at least 99% of the receiver's vocabulary (Qwen2.5 and Qwen3 differ only by a
few added tokens and share ids, as the published pairs assume).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..spec.config import ALIGNMENTS, check_alignment  # noqa: F401  (re-exported)
from ..spec.errors import UserError

#: The per-token strategies (config.ALIGNMENTS without "none", which refuses such a sharer).
STRATEGIES = tuple(a for a in ALIGNMENTS if a != "none")
SHARED_FRACTION = 0.99


def vocab_size(tok) -> int:
    return len(tok)


def describe_vocab(tok, source: str) -> str:
    """'the SmolLM2-135M-Instruct vocabulary (49,152 tokens)'-style phrase."""
    return f"{source}'s vocabulary ({vocab_size(tok):,} tokens)"


def same_ids(receiver_tok, sharer_tok) -> bool:
    """True when the receiver's ids mean the same tokens to the sharer (compare vocabularies)."""
    if receiver_tok is sharer_tok:
        return True
    a, b = receiver_tok.get_vocab(), sharer_tok.get_vocab()
    if a == b:
        return True
    shared = a.keys() & b.keys()
    if any(a[k] != b[k] for k in shared):
        return False
    return len(shared) >= SHARED_FRACTION * len(a)


def pad_or_eos(tok) -> int | None:
    """The reference's pad id: the tokenizer's pad, its EOS when it has no pad token."""
    for role in ("pad_token_id", "eos_token_id"):
        i = getattr(tok, role, None)
        if i is not None:
            return int(i)
    return None


def _text(tok, i: int) -> str:
    return tok.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False)


@dataclass
class TokenAligner:
    """Maps receiver token ids to one sharer token id each (see the module docstring)."""

    receiver_tok: object
    sharer_tok: object
    strategy: str = "first"
    cache: dict[int, int] = field(default_factory=dict)
    many: set[int] = field(default_factory=set)       # receiver ids with several sharer pieces
    unmapped: set[int] = field(default_factory=set)   # receiver ids that fell back to UNK (or 0)

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise UserError(f"Alignment strategy {self.strategy} is unknown; use first or longest.")
        r, s = self.receiver_tok, self.sharer_tok
        self._r_special = {int(i) for i in r.all_special_ids}
        roles: dict[int, int | None] = {}  # built in order: a later role wins on a shared id
        for rid, sid in ((pad_or_eos(r), pad_or_eos(s)), (r.eos_token_id, s.eos_token_id),
                         (r.bos_token_id, s.bos_token_id), (r.unk_token_id, s.unk_token_id)):
            if rid is not None:
                roles[int(rid)] = sid
        self._roles = roles
        self._s_unk = s.unk_token_id
        self._fallback = int(s.unk_token_id or 0)

    def _unmapped(self, rid: int) -> int:
        self.unmapped.add(rid)
        return self._fallback

    def _special(self, rid: int, text: str) -> int:
        sid = self._roles.get(rid)
        if sid is not None:
            return int(sid)
        sid = self.sharer_tok.convert_tokens_to_ids(text)
        if sid is not None and sid != self._s_unk:
            return int(sid)
        return self._unmapped(rid)

    def _one(self, rid: int) -> int:
        text = _text(self.receiver_tok, rid)
        if rid in self._r_special:
            return self._special(rid, text)
        pieces = self.sharer_tok.encode(text, add_special_tokens=False)
        if not pieces:
            return self._unmapped(rid)
        if len(pieces) == 1:
            return int(pieces[0])
        self.many.add(rid)
        if self.strategy == "first":
            return int(pieces[0])
        best, best_len = pieces[0], 0  # longest decoded text; the first such on ties
        for p in pieces:
            n = len(_text(self.sharer_tok, p))
            if n > best_len:
                best, best_len = p, n
        return int(best)

    def align(self, ids) -> list[int]:
        """One sharer id per receiver id (same length, same order)."""
        out = []
        cache = self.cache
        for rid in ids:
            rid = int(rid)
            sid = cache.get(rid)
            if sid is None:
                sid = cache[rid] = self._one(rid)
            out.append(sid)
        return out
