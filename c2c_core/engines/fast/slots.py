"""Continuous batching over the fast engine: a fixed set of slots that requests join and leave
between decode steps (the server, bench/serving.py, drives it).

One `SlotGroup` per decoding model (the receiver: c2c, receiver and t2t answers; sharer 1:
sharer answers and t2t notes) holds one static cache of S slots x L columns and one decode step
prepared for that shape when the group is made, so nothing compiles while serving. Every
slot writes the same column c at each step (the cache's write position); a slot's request sits
right-aligned before it, its left padding `lp` saying where its first real position is, exactly
as a left-padded batch row does in batch.py, so positions (column - lp), masks and sliding
windows are the batch path's.

A request joins in three moves: its prompt but the last token is prefilled on its own (batched
with the other arrivals of its mode: `prefill_c2c`, `prefill_plain`; the c2c one is the batch
path's sectioned prefill and projection, in the reference's order), those columns are copied
into a free slot so that they end just before c (`place`), and its last prompt token is that
slot's input at the next shared step, whose output is its first new token. A finished request
frees its slot at once. When a new prompt is longer than c, or an old request would run past
column L, the occupied columns are moved left (dropping columns no request reads) or right as a
block (`make_room`): relative positions, and so every attention score, are unchanged.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ...measure import cancel
from ...spec.errors import UserError
from ...measure.timing import Timer
from ...models.fusion import sample
from .engine import Rows, _full_attention, engine_for, layout, sharer_len, sharer_role
from ..shapes import bucket


@dataclass
class Placed:
    """One slot's request, as the group sees it."""
    owner: object            # the scheduler's request
    lp: int                  # the column of its first real position
    final: int               # the last column a step of it may write (lp + prompt + n_max - 2)
    n_max: int               # tokens it may produce
    eos: frozenset           # ids that end it (empty: --ignore_eos)
    tokens: list             # produced so far
    gen: object = None       # its sampling generator (None when greedy)


class SlotGroup:
    """S slots of one model's decode batch over one static cache of L columns (module doc)."""

    def __init__(self, pipe, role: str, slots: int, columns: int, greedy: bool):
        from transformers import StaticCache
        from ...models.projector import kv_shape
        self.eng = eng = engine_for(pipe)
        self.pipe, self.role, self.S, self.L, self.greedy = pipe, role, slots, columns, greedy
        self.dev = pipe.device
        _, heads, hd = kv_shape(eng.model(role).config)
        need = eng.kv_nbytes(role, slots, columns)
        kept = eng.graph_bytes + eng.group_bytes()  # what no eviction gives back
        if need + kept > eng.cache_cap:
            other = f" beside {kept / 2**20:,.0f} MB held already" if kept else ""
            raise UserError(f"The {role}'s {slots} slots of {columns} positions need"
                            f" {need / 2**20:,.0f} MB of cache{other}, more than the fast"
                            f" engine's cap ({eng.cache_cap / 2**20:,.0f} MB); use fewer --slots"
                            " or a lower --max_prompt_tokens or --max_new_tokens.")
        eng.begin()
        eng._evict_for(need)  # batch runs' least recently used caches make room
        #: the group's cache bytes, held under the engine's cap while the group lives
        self.nbytes = need
        m = eng.model(role)
        t0 = time.perf_counter()
        # the group's own cache, outside the engine's LRU: nothing a batch run or an arrival's
        # prefill allocates can evict it or reset its write position
        self.cache = StaticCache(config=_full_attention(m.config), max_cache_len=columns)
        self.cache.early_initialization(slots, heads, hd, pipe.dtype, self.dev)
        eng._groups.add(self)
        self.pad = eng.pad_id(role)
        self.c = 0                                   # the column the next step writes
        self.tok = [self.pad] * slots                # each slot's input at the next step
        self.lp = torch.zeros(slots, dtype=torch.long, device=self.dev)
        self.ok = torch.ones(slots, columns, dtype=torch.bool, device=self.dev)
        self.rows: list[Placed | None] = [None] * slots
        self.steps = 0
        self.shifts = 0                              # block moves (make_room)
        self.moves = 0                               # rows moved down to keep them packed
        self.in_use = False                          # a server holds it (slot_group)
        #: the step's batch sizes: powers of two up to S, and S. Occupied slots are always the
        #: first n (release() packs them), and a step runs the first k >= n rows only, so a
        #: lone request does not pay for empty slots (on a CPU a step costs about its rows)
        self.sizes = sorted({1 << i for i in range(slots.bit_length()) if 1 << i <= slots}
                            | {slots})
        self._steps: dict[int, object] = {}
        for i, k in enumerate(self.sizes, 1):
            cancel.say(f"{eng.verb('step')} the {role} step for {k} of {slots} slots x"
                       f" {columns} positions ({i} of {len(self.sizes)})")
            # the step's CUDA-graph recordings are graph memory under the engine's cap
            with torch.inference_mode(), eng._measured():
                self._steps[k] = eng._make_step(role, self._rows_view(k, m, heads, hd),
                                                columns, greedy)
                ids = torch.full((k, 1), self.pad, dtype=torch.long, device=self.dev)
                for j in range(4):  # compile (or not) now, on the step's real shapes
                    eng._run(self._steps[k], ids, eng._scalar(j), self.lp[:k],
                             self.ok[:k]).clone()
        with torch.inference_mode():
            self._set_column(0)
        eng.compile_s += time.perf_counter() - t0
        eng.prepared += len(self.sizes)

    def _rows_view(self, k: int, m, heads: int, hd: int):
        """A static cache over the first k slots of the group's cache (views: a step on it
        writes the group's own tensors, at the group's write position)."""
        if k == self.S:
            return self.cache
        from transformers import StaticCache
        c = StaticCache(config=_full_attention(m.config), max_cache_len=self.L)
        c.early_initialization(1, heads, hd, self.pipe.dtype, self.dev)
        for view, whole in zip(c.layers, self.cache.layers):
            view.keys, view.values = whole.keys[:k], whole.values[:k]
            view.cumulative_length = whole.cumulative_length
            view.batch_size = k
            torch._dynamo.mark_static_address(view.keys)
            torch._dynamo.mark_static_address(view.values)
        return c

    def reset(self) -> None:
        """Every slot free, the write position at 0 (a new server on the same models)."""
        self.rows = [None] * self.S
        for s in range(self.S):
            self._clear(s)
        with torch.inference_mode():
            self._set_column(0)

    # --- occupancy ----------------------------------------------------------------------------

    @property
    def active(self) -> list[int]:
        return [s for s, r in enumerate(self.rows) if r is not None]

    def free(self) -> int:
        return self.rows.count(None)

    def _set_column(self, c: int) -> None:
        self.c = c
        for layer in self.cache.layers:
            layer.cumulative_length.fill_(c)

    def _plan_room(self, needs: list[tuple[int, int]]) -> int | None:
        """The column shift (negative: left) that lets requests of (m filled positions, n_max
        tokens) join beside the ones here, or None when they do not fit now."""
        act = [self.rows[s] for s in self.active]
        if not needs or len(needs) > self.free():
            return None
        need_c = max(m for m, _ in needs)
        last_new = max(n for _, n in needs) - 1
        if not act:  # nothing to move: the next step writes where the arrivals end
            return need_c - self.c if need_c + last_new <= self.L - 1 else None
        lo = min(r.lp for r in act)
        final = max(r.final for r in act)
        # first without moving left (moving right only when a prompt is longer than c), then
        # with the block moved as far left as its first real column allows
        for c2 in (max(self.c, need_c), max(need_c, self.c - lo)):
            d = c2 - self.c
            if final + d <= self.L - 1 and c2 + last_new <= self.L - 1:
                return d
        return None

    def fits(self, needs: list[tuple[int, int]]) -> bool:
        return self._plan_room(needs) is not None

    def make_room(self, needs: list[tuple[int, int]]) -> None:
        """Shift the occupied columns so that `needs` fit (fits() must be True)."""
        delta = self._plan_room(needs)
        if delta is None:
            raise RuntimeError("make_room without room")  # a scheduler bug, never a user's
        if not self.active:
            self._set_column(self.c + delta)
            return
        if delta:
            self._shift(delta)

    def _shift(self, d: int) -> None:
        """Move every column by d (the requests' relative positions stay)."""
        L = self.L
        self.shifts += 1
        with torch.inference_mode():
            for layer in self.cache.layers:
                for t in (layer.keys, layer.values):
                    if d > 0:
                        t[:, :, d:] = t[:, :, :L - d].clone()
                    else:
                        t[:, :, :L + d] = t[:, :, -d:].clone()
            ok = torch.ones_like(self.ok)
            if d > 0:
                ok[:, d:] = self.ok[:, :L - d]
                ok[:, :d] = False
            else:
                ok[:, :L + d] = self.ok[:, -d:]
            self.ok.copy_(ok)
            self.lp += d
        for r in self.rows:
            if r is not None:
                r.lp += d
                r.final += d
        for s in range(self.S):
            if self.rows[s] is None:
                self._clear(s)
        self._set_column(self.c + d)

    def _clear(self, s: int) -> None:
        """An empty slot reads every column (finite, never fully masked); its output is
        dropped."""
        self.ok[s] = True
        self.lp[s] = 0
        self.tok[s] = self.pad

    def place(self, src_cache, src_row: int, src_lo: int, src_hi: int, ok_row: torch.Tensor,
              last_tok: int, owner, n_max: int, eos, gen=None) -> int:
        """Copy columns [src_lo, src_hi) of row src_row of a prefilled cache (the prompt but its
        last token) into a free slot so they end at column c; the slot's next input is the
        prompt's last token. After make_room()."""
        m = src_hi - src_lo
        s = self.rows.index(None)
        a = self.c - m
        if a < 0:
            raise RuntimeError("place before make_room")
        with torch.inference_mode():
            for dst, src in zip(self.cache.layers, src_cache.layers):
                dst.keys[s, :, a:self.c] = src.keys[src_row, :, src_lo:src_hi]
                dst.values[s, :, a:self.c] = src.values[src_row, :, src_lo:src_hi]
            self.ok[s, :a] = False
            self.ok[s, a:self.c] = ok_row
            self.ok[s, self.c:] = True
            self.lp[s] = a
        self.tok[s] = int(last_tok)
        self.rows[s] = Placed(owner, a, self.c + n_max - 1, n_max, frozenset(eos), [], gen)
        return s

    def slot_of(self, owner) -> int:
        return next(i for i, r in enumerate(self.rows) if r is not None and r.owner is owner)

    def owners(self) -> list:
        return [r.owner for r in self.rows if r is not None]

    def release(self, s: int) -> None:
        """Free slot s; the last occupied slot moves into it, so the occupied ones stay the
        first n (step() runs only those)."""
        self.rows[s] = None
        act = self.active
        h = act[-1] if act else -1
        if h > s:
            with torch.inference_mode():
                for layer in self.cache.layers:
                    layer.keys[s] = layer.keys[h]
                    layer.values[s] = layer.values[h]
                self.ok[s] = self.ok[h]
                self.lp[s] = self.lp[h]
            self.tok[s], self.rows[s], self.rows[h] = self.tok[h], self.rows[h], None
            self.moves += 1
            s = h
        self._clear(s)

    # --- the shared step ----------------------------------------------------------------------

    def step(self, gen_cfg) -> list[tuple[object, int, str | None]]:
        """One decode step of every occupied slot (the first n; the step of the smallest
        prepared size k >= n runs): per slot (its owner, its new token, why it ended: "stop"
        at an EOS id, "length" at n_max, None while it goes on). Ended slots are free when
        this returns."""
        eng = self.eng
        n = len(self.active)
        k = next(x for x in self.sizes if x >= n)
        with torch.inference_mode():
            tok = torch.tensor(self.tok[:k], dtype=torch.long, device=self.dev)[:, None]
            out = eng._run(self._steps[k], tok, eng._scalar(self.c), self.lp[:k],
                           self.ok[:k]).clone()
            if not self.greedy:
                gens = [r.gen if r is not None and r.gen is not None else self._spare()
                        for r in self.rows[:k]]
                out = sample(out, gen_cfg, gens)
            new = out[:, 0].tolist()  # one read per step: each token reaches the host now
        self.c += 1  # the cache's write position moved on in the step itself
        self.steps += 1
        res, ended = [], []
        for s, r in enumerate(self.rows[:k]):
            if r is None:
                continue
            t = int(new[s])
            r.tokens.append(t)
            end = "stop" if t in r.eos else ("length" if len(r.tokens) >= r.n_max else None)
            self.tok[s] = t
            res.append((r.owner, t, end))
            if end:
                ended.append(r)
        for r in ended:
            self.release(self.slot_of(r.owner))
        if not self.active:
            self._set_column(0)
        return res

    def _spare(self):
        if not hasattr(self, "_spare_gen"):
            self._spare_gen = torch.Generator(device=self.dev).manual_seed(0)
        return self._spare_gen


def slot_group(pipe, role: str, slots: int, columns: int, greedy: bool) -> SlotGroup:
    """The pipeline's slot group of this shape: kept on its engine from one server to the next
    (the app's Load tab makes a server per sweep), so its steps are prepared once; the group of
    another shape replaces it (one group per role is held)."""
    eng = engine_for(pipe)
    held = eng.__dict__.setdefault("_slot_groups", {})
    g = held.get(role)
    if g is not None and g.in_use:  # another server still runs on it: a group of its own
        g = SlotGroup(pipe, role, slots, columns, greedy)
    elif g is None or (g.S, g.L, g.greedy) != (slots, columns, greedy):
        held.pop(role, None)  # its cache goes before the new one is allocated
        g = held[role] = SlotGroup(pipe, role, slots, columns, greedy)
    else:
        g.reset()
    g.in_use = True  # until its server closes (Scheduler.close)
    return g


# --- an arrival's prefill (everything but its last token), batched across arrivals -----------

def _scratch_len(T: int) -> int:
    return bucket(T)


def prefill_c2c(pipe, cfg, plans: list, with_sharer: bool, timer: Timer):
    """The batch path's sectioned c2c prefill (receiver sections, each sharer, each projection
    in the reference's order) of arrivals' plans, or the receiver alone (`with_sharer` False:
    receiver mode and t2t answers), without the last token. Returns (cache, rows, calls)."""
    from .batch import c2c_rows
    eng = engine_for(pipe)
    eng.begin()
    T = max(len(p.ids) for p in plans)
    L = _scratch_len(T)
    rows, cuts, feeds = c2c_rows(pipe, eng, plans, T, with_sharer)
    with torch.inference_mode():
        cache, _, calls = eng.c2c_prefill(rows, feeds, L, with_sharer, timer, True, cuts,
                                          last=False)
    return cache, rows, calls


def prefill_plain(pipe, role: str, ids: list[list[int]], timer: Timer, who: int | None = 1):
    """One model alone over arrivals' prompts but their last token (sharer answers, t2t notes):
    the teacher spans for a sharer. Returns (cache, rows)."""
    eng = engine_for(pipe)
    eng.begin()
    T = max(len(r) for r in ids)
    rows = layout(ids, [None] * len(ids), eng.pad_id(role), pipe.device, T)
    cache = eng.cache(role, len(ids), _scratch_len(T))
    m = eng.model(role)
    emb_stage, fill_stage = (("teacher_embedding", "teacher_prefill") if role != "receiver"
                             else ("base_embedding", "base_prefill"))
    with torch.inference_mode():
        with timer.span(emb_stage, who=who if role != "receiver" else None):
            emb = m.get_input_embeddings()(rows.ids[:, :T - 1])
        with timer.span(fill_stage, who=who if role != "receiver" else None):
            eng.fill(role, cache, emb, rows)
    return cache, rows


def row_columns(rows: Rows, r: int) -> tuple[int, int, torch.Tensor, int]:
    """Row r of a left-padded prefill: its filled columns [lo, hi), their ok mask, and its last
    token (the slot's first input)."""
    T = rows.ids.shape[1]
    lo = int(rows.lp[r])
    return lo, T - 1, rows.ok[r, lo:T - 1], int(rows.ids[r, T - 1])


__all__ = ["SlotGroup", "prefill_c2c", "prefill_plain", "row_columns", "sharer_len",
           "sharer_role"]
