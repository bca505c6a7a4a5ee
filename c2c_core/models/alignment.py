"""Token alignment for a sharer whose tokenizer differs from the receiver's.

The C2C reference (thu-nics/C2C, `rosetta/model/aligner.py`) aligns per token: every receiver
token is decoded to text and re-encoded with the sharer's tokenizer, and exactly one sharer token
is kept, so the sharer's cache has the receiver's length and positions line up one to one:
- strategy "first": the first sharer piece of the token's text;
- strategy "longest": the sharer piece whose text is longest (the first such on ties);
- special tokens (BOS/EOS/PAD/UNK and the chat-template markers) map by role first (pad, eos,
  bos, unk; a later role wins, as in the reference), then by their literal text in the sharer's
  vocabulary, and otherwise to the sharer's UNK (else its EOS, else id 0);
- a token whose text the sharer encodes to nothing also becomes the sharer's UNK.

Written from that description (no code copied). Our cache is per receiver token id (the
reference caches whole sequences), so a warm aligner costs one dict lookup per token.

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


def _special_ids(tok) -> set[int]:
    ids = set(tok.all_special_ids)
    for i, t in getattr(tok, "added_tokens_decoder", {}).items():
        if getattr(t, "special", False):
            ids.add(int(i))
    return ids


@dataclass
class TokenAligner:
    """Maps receiver token ids to one sharer token id each (see the module docstring)."""

    receiver_tok: object
    sharer_tok: object
    strategy: str = "first"
    cache: dict[int, int] = field(default_factory=dict)
    many: set[int] = field(default_factory=set)       # receiver ids with several sharer pieces
    unmapped: set[int] = field(default_factory=set)   # receiver ids that fell back to UNK

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise UserError(f"Alignment strategy {self.strategy} is unknown; use first or longest.")
        self._r_special = _special_ids(self.receiver_tok)
        r, s = self.receiver_tok, self.sharer_tok
        self._role_map: dict[int, int | None] = {}
        for role in ("pad_token_id", "eos_token_id", "bos_token_id", "unk_token_id"):
            rid = getattr(r, role, None)
            if rid is not None:
                self._role_map[int(rid)] = getattr(s, role, None)
        self._s_vocab = s.get_vocab()
        fb = s.unk_token_id if s.unk_token_id is not None else s.eos_token_id
        self._fallback = int(fb) if fb is not None else 0

    def _text(self, tok, i: int) -> str:
        return tok.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def _special(self, rid: int) -> int:
        mapped = self._role_map.get(rid)
        if mapped is not None:
            return int(mapped)
        text = self._text(self.receiver_tok, rid)
        sid = self._s_vocab.get(text)
        if sid is not None:
            return int(sid)
        self.unmapped.add(rid)
        return self._fallback

    def _one(self, rid: int) -> int:
        if rid in self._r_special:
            return self._special(rid)
        text = self._text(self.receiver_tok, rid)
        pieces = self.sharer_tok.encode(text, add_special_tokens=False)
        if not pieces:
            self.unmapped.add(rid)
            return self._fallback
        if len(pieces) == 1:
            return int(pieces[0])
        self.many.add(rid)
        if self.strategy == "first":
            return int(pieces[0])
        best, best_len = pieces[0], -1
        for p in pieces:
            n = len(self._text(self.sharer_tok, p))
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
