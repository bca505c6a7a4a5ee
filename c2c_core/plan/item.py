"""One C2C plan per generation, built once and consumed by both engines.

A `Plan` says, for one item in one mode, everything an engine needs that is not arithmetic:
- the ids the first model reads, each model with its own chat template (a Gemma 3 tokenizer
  without one, as in the packaged GGUF, gets Gemma 3's published template: sections.py);
- c2c: one `Feed` per sharer (its ids over the receiver's positions, its padding) and which
  receiver positions it projects. Same tokenizer: the receiver's ids, every position but the last
  (the reference's instruction / last-token split). Own tokenizer, text prompt: the reference's
  sectioned alignment (sections.py): template sections padded to equal length, the message
  aligned token by token, only message positions projected. Own tokenizer, exact-length ids (a
  sweep): the receiver's ids mapped one to one (alignment.TokenAligner), every position projected;
- c2c: the order of work (`tail`, `cuts`, `segments()`): the reference's RosettaModel.forward
  prefills the receiver section by section and writes a projected section into the receiver's
  cache before the next one runs; its last section is the receiver's alone (no sharer fills it,
  nothing is projected there). The plan says where that last section starts and where each
  projected section ends; `reference_sections()` gives the same as the reference's
  kv_cache_index;
- the EOS ids of the model that writes the answer, the prompt format recorded for a sharer that
  speaks, and the sampling seed of this row, from (seed, prompt id, repeat), so a row's tokens
  never depend on its batch mates or on the engine.
The host work of building it runs inside the generation's clock; token alignment is timed in the
`alignment` span of the sharer it is for, as before.

Where several sharers have their own tokenizers, their template sections are padded to the
longest of all the models (receiver and every sharer), so every sequence has one length.
A receiver sequence that ends in padding (its closing template shorter than a sharer's) is cut
after its last real token: the first new token comes from a real position, and the positions cut
were template positions no sharer projects.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass, field

from ..spec.errors import UserError
from .sections import SectionedAlignment, encode_sections, plan_sections, tail_of, template_of

T2T_NOTE_INSTRUCTION = (
    "Write a short background note with facts that would help someone answer the question"
    " below. Do not answer the question itself.\n\nQuestion: {question}")

T2T_ANSWER_TEMPLATE = "Background note:\n{note}\n\nQuestion: {question}"


def prompt_format(tokenizer, chat_template: bool = True, name: str | None = None) -> str:
    """How a model reads a prompt: "chat_template" (its own), "gemma3_template" (Gemma 3's
    published one, for a Gemma 3 tokenizer without its own) or "plain" text with its special
    tokens (no template, or templates off). Gemma 3's is given only to a model named (`name`)."""
    fmt = template_of(tokenizer, chat_template, name)[1]
    return "plain" if fmt == "gemma3_template" and name is None else fmt


def chat_ids(tokenizer, text: str, chat_template: bool = True, name: str | None = None) -> list[int]:
    """A model's ids for one user message, with its own chat template (see prompt_format)."""
    fmt = prompt_format(tokenizer, chat_template, name)
    if fmt == "chat_template":
        out = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                            add_generation_prompt=True, tokenize=True,
                                            enable_thinking=False)
        if hasattr(out, "keys"):  # BatchEncoding
            out = out["input_ids"]
        return list(out)
    if fmt != "plain":  # Gemma 3's published template, rendered as sections.py renders it
        return list(encode_sections(tokenizer, text, chat_template, name)[0])
    return tokenizer(text, add_special_tokens=True)["input_ids"]


def row_seed(seed: int, item_id, repeat: int) -> int:
    """The sampling seed of one generation: (seed, prompt id, repeat) hashed to 63 bits."""
    h = hashlib.sha256(f"{seed}\x00{item_id}\x00{repeat}".encode()).digest()
    return int.from_bytes(h[:8], "big") >> 1


@dataclass
class Feed:
    """What one sharer reads in a c2c prefill: ids over the receiver's positions (same length as
    Plan.ids), its padding, and the receiver positions [0, n) it projects into."""
    who: int                         # sharer number, 1-based
    ids: list[int]
    pad: list[bool] | None           # True at padding positions; None: no padding
    project: list[bool] | None       # over [0, tail): True where projected; None: all of it
    alignment: str = "none"          # "none" (the receiver's ids), "first" or "longest"


@dataclass
class Plan:
    mode: str
    ids: list[int]                   # c2c/receiver: the receiver's; sharer/t2t: sharer 1's
    pad: list[bool] | None = None    # padding in ids (sectioned plans); None: none
    feeds: list[Feed] = field(default_factory=list)   # c2c: every sharer
    eos: set[int] = field(default_factory=set)        # of the model that writes the answer
    prompt_format: str | None = None  # sharer/t2t with a text prompt: how the sharer read it
    seed: int | None = None          # sampling seed of this row; None: greedy
    sections: SectionedAlignment | None = None        # the first aligned sharer's, for display
    ran: list[tuple[int, str]] = field(default_factory=list)  # (sharer, alignment) that ran
    #: c2c: where the last section starts (the receiver alone reads [tail, len(ids)); the
    #: sharers fill [0, tail) and nothing past it is projected); None: len(ids) - 1
    tail: int | None = None
    #: c2c: the ends of the sections some sharer projects, in order: the receiver's prefill
    #: stops at each, and that section's projection is written before the next section runs
    #: (RosettaModel.forward's order); None: (tail,) when there is a sharer to project
    cuts: tuple[int, ...] | None = None

    @property
    def n_instr(self) -> int:
        """Positions prefilled before the last token."""
        return len(self.ids) - 1

    @property
    def last_start(self) -> int:
        return len(self.ids) - 1 if self.tail is None else self.tail

    @property
    def cut_at(self) -> tuple[int, ...]:
        if self.cuts is not None:
            return self.cuts
        return (self.last_start,) if self.feeds and self.last_start > 0 else ()

    def segments(self) -> list[tuple[int, int, bool]]:
        """The receiver's prefill before the last token, in order: (start, end, projected
        after it). One segment per run of sections between two projections."""
        n, out, s = len(self.ids) - 1, [], 0
        for c in self.cut_at:
            out.append((s, c, True))
            s = c
        if s < n:
            out.append((s, n, False))
        return out

    def sections_record(self) -> list[dict]:
        """timing.sections of a record: the receiver's prefill segments and the last token."""
        out = [{"start": s, "end": e, "projected": p} for s, e, p in self.segments()]
        n = len(self.ids)
        return out + [{"start": n - 1, "end": n, "projected": False}] if n else out

    @property
    def padded(self) -> bool:
        return bool(self.pad) and any(self.pad)


def reference_sections(plan: Plan) -> list[tuple[int, int, int]]:
    """A c2c plan as the reference's evaluator gives it to RosettaModel's kv_cache_index:
    (start, end, sharer bitmask or -1) per section, a new section wherever the set of sharers
    projecting a position changes (the evaluator splits at message-mask transitions) or at one
    of the plan's cuts; the last section (plan.last_start on) never projected."""
    tail, L = plan.last_start, len(plan.ids)
    bits = []
    for i in range(tail):
        b = 0
        for f in plan.feeds:
            if f.project is None or f.project[i]:
                b |= 1 << (f.who - 1)
        bits.append(b or -1)
    out, a = [], 0
    for i in range(1, tail + 1):
        if i == tail or bits[i] != bits[i - 1] or i in plan.cut_at:
            out.append((a, i, bits[a]))
            a = i
    return out + [(tail, L, -1)]


def build_plan(pipe, cfg, item, mode: str, timer=None, repeat: int = 0) -> Plan:
    """The plan of one generation (see the module docstring). `timer` gets the alignment spans."""
    sh1 = pipe.sharers[0]
    speaks = mode in ("sharer", "t2t")
    seed = row_seed(cfg.gen.seed, item.id, repeat) if cfg.gen.do_sample else None
    eos = sh1.eos_ids if mode == "sharer" else pipe.eos_ids
    if speaks:
        fmt = None
        if item.input_ids is not None:  # exact-length receiver ids: aligned for its own tokenizer
            ids = list(item.input_ids)
            if sh1.aligner is not None:
                with _span(timer, 1):
                    ids = sh1.aligner.align(ids)
        else:
            text = T2T_NOTE_INSTRUCTION.format(question=item.prompt) if mode == "t2t" else item.prompt
            ids = chat_ids(sh1.tokenizer, text, cfg.chat_template, sh1.name)
            fmt = prompt_format(sh1.tokenizer, cfg.chat_template, sh1.name)
        _nonempty(ids, item)
        aligned = item.input_ids is not None and sh1.aligner is not None
        return Plan(mode, ids, eos=eos, prompt_format=fmt, seed=seed,
                    ran=[(1, sh1.alignment if aligned else "none")])
    own = [k for k, sl in enumerate(pipe.sharers, start=1) if sl.aligner is not None]
    if mode != "c2c" or not own or item.input_ids is not None:
        ids = list(item.input_ids) if item.input_ids is not None else \
            chat_ids(pipe.tokenizer, item.prompt, cfg.chat_template)
        _nonempty(ids, item)
        feeds = []
        if mode == "c2c":
            n = len(ids) - 1
            for k, sl in enumerate(pipe.sharers, start=1):
                if sl.aligner is None:
                    feeds.append(Feed(k, ids, None, None))
                else:  # exact-length ids: one sharer token per receiver token, all projected
                    with _span(timer, k):
                        s_ids = sl.aligner.align(ids[:n])
                    feeds.append(Feed(k, s_ids + ids[n:], None, None, sl.alignment))
        return Plan(mode, ids, feeds=feeds, eos=eos, seed=seed,
                    ran=[(f.who, f.alignment) for f in feeds])
    return _sectioned(pipe, cfg, item, timer, eos, seed)


def _sectioned(pipe, cfg, item, timer, eos, seed) -> Plan:
    """c2c with at least one sharer on its own tokenizer and a text prompt."""
    aligned: dict[int, SectionedAlignment] = {}
    for k, sl in enumerate(pipe.sharers, start=1):
        if sl.aligner is not None:
            with _span(timer, k):
                aligned[k] = plan_sections(pipe.tokenizer, sl.tokenizer, item.prompt,
                                           sl.aligner.strategy, cfg.chat_template,
                                           receiver_name=pipe.info.get("receiver"),
                                           sharer_name=sl.name, same_tokenizer=False)
    first = aligned[min(aligned)]
    if all(a.receiver_ids == first.receiver_ids and a.receiver_pad_mask == first.receiver_pad_mask
           for a in aligned.values()):
        r_ids, r_pad = list(first.receiver_ids), list(first.receiver_pad_mask)
        s = {k: (list(a.sharer_ids), list(a.sharer_pad_mask), list(a.projection_mask))
             for k, a in aligned.items()}
        secs = [(x.kind, x.start, x.end) for x in first.sections]
    else:
        r_ids, r_pad, s, secs = _common_layout(aligned)
    # cut trailing receiver padding: the last position is a real receiver token
    last = max(i for i, p in enumerate(r_pad) if not p)
    L = last + 1
    r_ids, r_pad = r_ids[:L], r_pad[:L]
    tail = tail_of(secs, r_pad)  # the last section: the receiver's alone
    proj_same = [not p for p in r_pad[:tail]]  # a same-tokenizer sharer beside them: every real one
    feeds = []
    for k, sl in enumerate(pipe.sharers, start=1):
        if k in s:
            ids, pad, proj = s[k]
            feeds.append(Feed(k, ids[:L], _or_none(pad[:L]), proj[:tail], sl.alignment))
        else:
            feeds.append(Feed(k, r_ids, _or_none(r_pad), proj_same))
    if not any(any(f.project) for f in feeds):
        raise UserError(f"Prompt {item.id} has no message tokens to project (only template);"
                        " give it some text.")
    # a cut after every section (clipped to the tail) that some sharer projects into
    cuts = sorted({min(e, tail) for _, st, e in secs if st < min(e, tail)
                   and any(any(f.project[st:min(e, tail)]) for f in feeds)})
    return Plan("c2c", r_ids, _or_none(r_pad), feeds, eos, None, seed, first,
                [(f.who, f.alignment) for f in feeds], tail, tuple(cuts))


def _common_layout(aligned: dict[int, SectionedAlignment]):
    """Sharers whose template sections differ in length: pad every section to the longest."""
    secs = [a.sections for a in aligned.values()]
    if len({tuple(s.kind for s in x) for x in secs}) != 1:
        raise UserError("The sharers' chat templates split this prompt into different sections;"
                        " run them one at a time (or turn chat templates off).")
    lens = [max(x[j].end - x[j].start for x in secs) for j in range(len(secs[0]))]
    any_a = next(iter(aligned.values()))
    starts = [sum(lens[:j]) for j in range(len(lens))]
    layout = [(sec.kind, a, a + n) for sec, a, n in zip(any_a.sections, starts, lens)]
    r_ids, r_pad = [], []
    for j, sec in enumerate(any_a.sections):
        real = list(any_a.receiver_ids[sec.start:sec.start + sec.receiver_tokens])
        pad_tok = _pad_token(any_a.receiver_ids, any_a.receiver_pad_mask)
        r_ids += real + [pad_tok] * (lens[j] - len(real))
        r_pad += [False] * len(real) + [True] * (lens[j] - len(real))
    out = {}
    for k, a in aligned.items():
        ids, pad, proj = [], [], []
        pad_tok = _pad_token(a.sharer_ids, a.sharer_pad_mask)
        for j, sec in enumerate(a.sections):
            real = list(a.sharer_ids[sec.start:sec.start + sec.sharer_tokens])
            ids += real + [pad_tok] * (lens[j] - len(real))
            pad += [False] * len(real) + [True] * (lens[j] - len(real))
            proj += [sec.kind == "message"] * lens[j]
        out[k] = (ids, pad, proj)
    return r_ids, r_pad, out, layout


def _pad_token(ids, mask) -> int:
    for i, m in zip(ids, mask):
        if m:
            return int(i)
    return 0


def t2t_answer_ids(pipe, cfg, item, note_tokens: list[int]) -> list[int]:
    """What the receiver reads in t2t: the sharer's note (decoded by the sharer's tokenizer) and
    the question, in the receiver's template; for exact-length ids, the note's ids then the
    prompt's (re-encoded by the receiver when the sharer has its own tokenizer)."""
    sh1 = pipe.sharers[0]
    if item.input_ids is not None and sh1.aligner is None:
        return [t for t in note_tokens if t not in sh1.eos_ids] + list(item.input_ids)
    note = sh1.tokenizer.decode(note_tokens, skip_special_tokens=True)
    if item.input_ids is not None:
        return pipe.tokenizer(note, add_special_tokens=False)["input_ids"] + list(item.input_ids)
    return chat_ids(pipe.tokenizer, T2T_ANSWER_TEMPLATE.format(note=note.strip(),
                                                               question=item.prompt),
                    cfg.chat_template)


def t2t_answer_bound(pipe, cfg, item) -> int:
    """At most how many ids t2t_answer_ids gives (the fast engine sizes its cache by it)."""
    if item.input_ids is not None:
        base = len(item.input_ids)
    else:
        base = len(chat_ids(pipe.tokenizer, T2T_ANSWER_TEMPLATE.format(note="", question=item.prompt),
                            cfg.chat_template))
    return base + 2 * cfg.gen.t2t_note_tokens + 16  # a re-encoded note may take more ids


def _or_none(mask: list[bool]) -> list[bool] | None:
    return mask if any(mask) else None


def _nonempty(ids, item) -> None:
    if not ids:
        raise UserError(f"Prompt {item.id} encodes to no tokens; give it some text.")


def _span(timer, who: int):
    return timer.span("alignment", who=who) if timer is not None else contextlib.nullcontext()
