"""See the plan (issue 18 item 5): every sharer's `SectionedAlignment` for one prompt, side by
side over the receiver's positions, from tokenizers alone (no weights load).

`show_plan(cfg, prompt)` loads the run's tokenizers (models.loading.load_tokenizers) and calls
`plan_view`, which is pure: one plan per sharer (a sharer whose ids mean the receiver's tokens,
models.alignment.same_ids, gets the same-tokenizer plan), then one grid of rows.

The grid: every plan holds the receiver's own tokens in the same order, plus receiver pads where
a template section of that sharer is longer. With one sharer (or sharers padding alike) the grid
is that plan's positions exactly. With sharers that pad differently, a gap between two receiver
tokens gets the most pads any plan puts there, and a sharer without that pad position shows
"-" (nothing fed there, nothing projected). Receiver padding at the very end is left out,
as the engines cut it (plan/item.py), so the grid is the positions a run reads.
"""

from __future__ import annotations

import json
import threading
from dataclasses import asdict, dataclass

from ..spec.errors import UserError
from .sections import SectionedAlignment, plan_sections, tail_of

#: A grid cell where a sharer has no position (another sharer's pad).
ABSENT = "-"


@dataclass(frozen=True)
class PlanView:
    receiver: str                          # the receiver's source name
    strategy: str                          # the strategy asked for (sharers with their own tokenizer)
    sharers: tuple[str, ...]               # one label per sharer (unique)
    plans: tuple[SectionedAlignment, ...]  # one per sharer, as plan_sections returned it
    same_tokenizer: tuple[bool, ...]       # per sharer: the receiver's ids fed as they are
    # the grid, one entry per row: for each sharer its position in its plan, or None
    where: tuple[tuple[int | None, ...], ...]
    receiver_ids: tuple[int, ...]
    receiver_pad_mask: tuple[bool, ...]
    receiver_texts: tuple[str, ...]
    sharer_texts: tuple[tuple[str, ...], ...]  # per sharer, over its own plan's positions

    @property
    def any_different(self) -> bool:
        return not all(self.same_tokenizer)

    def sharer_ids(self, k: int) -> list[int | None]:
        p = self.plans[k]
        return [None if w[k] is None else p.sharer_ids[w[k]] for w in self.where]

    def projected(self, k: int, row: int) -> bool:
        """Whether sharer k's KV is projected at this row. The plan's last section never is:
        the receiver reads it alone after the projection (sections.tail_of)."""
        i = self.where[row][k]
        return i is not None and i < self._tail(k) and self.plans[k].projection_mask[i]

    def _tail(self, k: int) -> int:
        p = self.plans[k]
        return tail_of([(s.kind, s.start, s.end) for s in p.sections], p.receiver_pad_mask)

    def projection_mask(self, k: int) -> list[bool]:
        return [self.projected(k, row) for row in range(len(self.where))]

    def sharer_pad_mask(self, k: int) -> list[bool]:
        p = self.plans[k]
        return [w[k] is None or p.sharer_pad_mask[w[k]] for w in self.where]

    def section_of(self, row: int) -> str:
        kinds = []
        for k, p in enumerate(self.plans):
            i = self.where[row][k]
            kind = "pad" if i is None else next(s.kind for s in p.sections if s.start <= i < s.end)
            if kind not in kinds:
                kinds.append(kind)
        return " / ".join(kinds)


def token_text(tok, i: int) -> str:
    """A token's text as a quoted, escaped string ("\\n", spaces visible between the quotes)."""
    text = tok.decode([int(i)], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return json.dumps(text, ensure_ascii=False)


def _labels(names: list[str]) -> tuple[str, ...]:
    if len(names) == 1:
        return (names[0],)
    return tuple(f"{k} {n}" for k, n in enumerate(names, start=1))


def _grid(plans: list[SectionedAlignment]) -> list[tuple[int | None, ...]]:
    """Rows of the merged grid: per plan, its position there (see the module docstring)."""
    real = [[i for i, pad in enumerate(p.receiver_pad_mask) if not pad] for p in plans]
    firsts = [[p.receiver_ids[i] for i in r] for p, r in zip(plans, real)]
    if any(f != firsts[0] for f in firsts):
        raise UserError("The sharers' plans hold different receiver tokens; the plan cannot be"
                        " shown side by side.")
    rows: list[tuple[int | None, ...]] = []
    n = len(firsts[0])
    for g in range(n + 1):  # the pads before receiver token g (g == n: after the last one)
        starts = [0 if g == 0 else r[g - 1] + 1 for r in real]
        ends = [r[g] if g < n else len(p.receiver_ids) for r, p in zip(real, plans)]
        for t in range(max(e - s for s, e in zip(starts, ends))):
            rows.append(tuple(s + t if s + t < e else None for s, e in zip(starts, ends)))
        if g < n:
            rows.append(tuple(r[g] for r in real))
    return rows


def plan_view(receiver_tok, sharer_toks: list, prompt: str, strategy: str = "first",
              chat_template: bool = True, *, receiver_name: str = "receiver",
              sharer_names: list[str] | None = None) -> PlanView:
    """Every sharer's plan for `prompt` and the side-by-side grid. `strategy` applies to the
    sharers with their own tokenizer; "none" refuses them (as --alignment none does a run)."""
    from ..models.alignment import same_ids
    if not (prompt or "").strip():
        raise UserError("The prompt is empty; give it some text to align.")
    names = list(sharer_names or [f"sharer {k}" for k in range(1, len(sharer_toks) + 1)])
    plans, same = [], []
    for stok, name in zip(sharer_toks, names):
        alike = same_ids(receiver_tok, stok)
        if not alike and strategy == "none":
            raise UserError(f"Sharer {name} has its own tokenizer and --alignment none turns"
                            " token alignment off; use --alignment first or longest.")
        plans.append(plan_sections(receiver_tok, stok, prompt, strategy, chat_template,
                                   receiver_name=receiver_name, sharer_name=name,
                                   same_tokenizer=alike))
        same.append(alike)
    where = _grid(plans)
    # the engines cut the receiver's trailing padding (plan.item: the first new token comes from
    # its last real position); show what they run
    while len(where) > 1 and all(
            i is None or plans[k].receiver_pad_mask[i] for k, i in enumerate(where[-1])):
        where.pop()
    r_ids, r_pad = [], []
    for w in where:
        k, i = next((k, i) for k, i in enumerate(w) if i is not None)
        r_ids.append(plans[k].receiver_ids[i])
        r_pad.append(plans[k].receiver_pad_mask[i])
    return PlanView(receiver_name, strategy, _labels(names), tuple(plans), tuple(same), tuple(where),
                    tuple(r_ids), tuple(r_pad),
                    tuple(token_text(receiver_tok, i) for i in r_ids),
                    tuple(tuple(token_text(t, i) for i in p.sharer_ids)
                          for t, p in zip(sharer_toks, plans)))


#: Tokenizers kept for the next call (the web app asks once per Profile run): a few pairs.
_TOKENIZERS: dict = {}
_KEEP = 4
_LOCK = threading.Lock()


def tokenizers_for(cfg) -> tuple[object, list]:
    """(receiver tokenizer, sharer tokenizers) of a RunConfig, the last few pairs kept."""
    from ..models.loading import load_tokenizers
    key = repr((cfg.receiver, list(cfg.sharers)))  # ModelSpec is not hashable
    with _LOCK:
        hit = _TOKENIZERS.pop(key, None)
        if hit is None:
            from ..measure import cancel
            cancel.say("reading the tokenizers")
            tok, _, stoks = load_tokenizers(cfg)
            hit = (tok, [t for t, _ in stoks])
        _TOKENIZERS[key] = hit  # most recent last
        while len(_TOKENIZERS) > _KEEP:
            _TOKENIZERS.pop(next(iter(_TOKENIZERS)))
        return hit


def show_plan(cfg, prompt: str, strategy: str | None = None) -> PlanView:
    """plan_view for a RunConfig's tokenizers (tokenizers only: no weights load)."""
    if not (prompt or "").strip():  # before any tokenizer loads
        raise UserError("The prompt is empty; give it some text to align.")
    tok, stoks = tokenizers_for(cfg)
    with _LOCK:  # one tokenizer, one caller at a time (the app's threads share them)
            return plan_view(tok, stoks, prompt, strategy or cfg.alignment, cfg.chat_template,
                         receiver_name=cfg.receiver.source,
                         sharer_names=[s.source for s in cfg.sharers])


# --- the table -----------------------------------------------------------------------------

def table_columns(view: PlanView, names: bool = True) -> list[str]:
    """The table's headers; names=False: "sharer" / "sharer k" instead of the models' names."""
    cols = ["position", "section", "receiver", "receiver id"]
    n = len(view.sharers)
    labels = view.sharers if names else ("sharer",) if n == 1 else tuple(
        f"sharer {k}" for k in range(1, n + 1))
    for name in labels:
        cols += [name, f"{name} id", f"projected ({name})" if len(view.sharers) > 1 else "projected"]
    return cols


def table_rows(view: PlanView) -> list[list[str]]:
    """One row per grid position, every cell a string: position, section, receiver token text
    and id ("pad" for padding), then per sharer its token text and id ("pad"; "-" where it has
    no position) and whether its KV is projected there ("yes" / "no")."""
    rows = []
    for row, w in enumerate(view.where):
        pad = view.receiver_pad_mask[row]
        cells = [str(row), view.section_of(row),
                 "pad" if pad else view.receiver_texts[row], str(view.receiver_ids[row])]
        for k, p in enumerate(view.plans):
            i = w[k]
            if i is None:
                cells += [ABSENT, "", "no"]
                continue
            text = "pad" if p.sharer_pad_mask[i] else view.sharer_texts[k][i]
            cells += [text, str(p.sharer_ids[i]), "yes" if view.projected(k, row) else "no"]
        rows.append(cells)
    return rows


def summary_line(view: PlanView) -> str:
    """'N receiver positions, M projected, pads: receiver R, <sharer> S' (per sharer when several)."""
    n = len(view.where)
    proj = [sum(view.projection_mask(k)) for k in range(len(view.plans))]
    pads = [sum(view.sharer_pad_mask(k)) for k in range(len(view.plans))]
    projected = (str(proj[0]) if len(proj) == 1
                 else ", ".join(f"{m} ({s})" for m, s in zip(proj, view.sharers)))
    pad_words = ", ".join([f"receiver {sum(view.receiver_pad_mask)}"]
                          + [f"{s} {p}" for s, p in zip(view.sharers, pads)])
    return f"{n} receiver positions, {projected} projected, pads: {pad_words}"


def format_table(view: PlanView) -> str:
    """The table as aligned plain text (cells are escaped token texts: one line each)."""
    rows = [table_columns(view)] + table_rows(view)
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip()
                     for r in rows)


def to_json(view: PlanView) -> dict:
    """One object: receiver_ids, sharer_ids and projection_mask (one list per sharer, over the
    receiver's positions), their pad masks, the sections and strategy, and each sharer's plan as
    plan_sections returned it (`plans`, each with its own strategy: "none" for the same
    tokenizer). With one sharer the plan's lists equal the top-level ones; `sections` count in
    each plan's own positions (the grid's, unless sharers pad differently)."""
    k_all = range(len(view.plans))
    return {
        "receiver": view.receiver, "sharers": list(view.sharers),
        "strategy": view.strategy,
        "same_tokenizer": list(view.same_tokenizer),
        "receiver_ids": list(view.receiver_ids),
        "receiver_pad_mask": list(view.receiver_pad_mask),
        "sharer_ids": [view.sharer_ids(k) for k in k_all],
        "sharer_pad_mask": [view.sharer_pad_mask(k) for k in k_all],
        "projection_mask": [view.projection_mask(k) for k in k_all],
        "sections": [[asdict(s) for s in p.sections] for p in view.plans],
        "summary": summary_line(view),
        "plans": [{**asdict(p), "sections": [asdict(s) for s in p.sections]} for p in view.plans],
    }
