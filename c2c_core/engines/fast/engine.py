"""The fast engine's machinery: static caches (LRU under a byte cap), our own masks (left and
inner padding, sliding windows per layer type), the compiled decode step, the c2c prefill and
the projection. The package's docstring (engines/fast/__init__.py) says what the engine is;
batch.py drives it over a batch of items.

Kept as one module (over 500 lines) on purpose: the caches, the masks, the compiled steps and
the prefills share one FastEngine's state (cache LRU, ready shapes, compile time)."""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass

import torch

from ...measure import cancel
from ...spec.errors import UserError
from ...models.fusion import decoder, project_sharers, sample
from ...models.stacked import stacked_for
from ...measure.timing import Timer

BUCKET_MIN = 64
#: Let `C2C_FAST_COMPILE=0` run the fast engine's static-cache path without torch.compile.
COMPILE_ENV = "C2C_FAST_COMPILE"
#: The bytes (in MB) the fast engine's static caches may hold together; least recently used
#: caches are freed when a new shape needs room. Default: CACHE_SHARE of the memory free on the
#: device when the engine is made (after the weights loaded).
CACHE_CAP_ENV = "C2C_CACHE_CAP_MB"
CACHE_SHARE = 0.5
#: The sharer's prefill-only cache (c2c mode) is sized to its prompt rounded up to this many
#: positions: it never decodes, and its prefill is not compiled, so it needs no power of two.
SHARER_ROUND = 64


def bucket(n: int) -> int:
    """The static cache length for n positions: a power of two >= BUCKET_MIN."""
    L = BUCKET_MIN
    while L < n:
        L *= 2
    return L


def sharer_role(k: int) -> str:
    """The cache role of sharer k: "sharer" for sharer 1 (it also decodes in sharer/t2t
    modes), "sharerK" for the others."""
    return "sharer" if k == 1 else f"sharer{k}"


def sharer_len(n: int) -> int:
    """The c2c sharer cache length for a prompt section of n positions (a multiple of
    SHARER_ROUND): the prompt only, never prompt + max_new_tokens."""
    return max(-(-n // SHARER_ROUND), 1) * SHARER_ROUND


def cache_cap_bytes(device) -> int:
    """The static-cache cap: C2C_CACHE_CAP_MB, else CACHE_SHARE of the device's free memory now
    (unbounded when that cannot be read)."""
    v = os.environ.get(CACHE_CAP_ENV, "").strip()
    if v:
        try:
            return max(int(float(v) * 2**20), 0)
        except ValueError:
            raise UserError(f"{CACHE_CAP_ENV}={v[:20]} is not a number of MB; set e.g."
                            f" {CACHE_CAP_ENV}=4096.") from None
    free = None
    if device.type == "cuda":
        try:
            free = int(torch.cuda.mem_get_info(device)[0])
        except Exception:  # noqa: BLE001 - unknown: no cap
            free = None
    else:
        from ..budget import free_bytes
        free = free_bytes("cpu")
    return int(free * CACHE_SHARE) if free else 2**62


def _lru():
    from collections import OrderedDict
    return OrderedDict()


@dataclass
class Rows:
    """A batch of rows left-padded to one length: ids [B, T]; lp [B] left padding per row; ok
    [B, T] False at every padding position (left, and a sectioned plan's inner padding)."""
    ids: torch.Tensor
    lp: torch.Tensor
    ok: torch.Tensor

    def ok_to(self, L: int) -> torch.Tensor:
        """ok over L cache positions: positions past the prompt (new tokens) are real."""
        B, T = self.ok.shape
        return torch.cat([self.ok, self.ok.new_ones(B, L - T)], 1)


def layout(rows: list[list[int]], pads: list[list[bool] | None], pad_id: int, device) -> Rows:
    T = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (T - len(r)) + list(r) for r in rows], dtype=torch.long,
                       device=device)
    lp = torch.tensor([T - len(r) for r in rows], dtype=torch.long, device=device)
    ok = torch.tensor([[False] * (T - len(r)) + [not q for q in (p or [False] * len(r))]
                       for r, p in zip(rows, pads)], dtype=torch.bool, device=device)
    return Rows(ids, lp, ok)


@dataclass
class Decoded:
    tokens: list[list[int]]       # per row, cut after its first EOS (unless EOS is ignored)
    steps: int                    # decode steps the batch ran (= longest row - 1)


class FastEngine:
    """Per pipeline: the static caches and the compiled steps, built on demand and kept."""

    def __init__(self, pipe, compile: bool | None = None):
        self.pipe = pipe
        self.device = pipe.device
        if compile is None:
            compile = os.environ.get(COMPILE_ENV, "1") not in ("0", "false", "no")
        self.compile = compile
        self.cuda = self.device.type == "cuda"
        self.compile_s = 0.0          # seconds spent in prepare() (compile, capture, allocation)
        self.late = 0                 # prepare() calls that happened outside warm-up
        self._caches = _lru()         # (role, B, L) -> StaticCache, least recently used first
        self._steps: dict = {}
        self._ready: set = set()
        self.cache_cap = cache_cap_bytes(self.device)  # bytes the static caches may hold
        self.cache_bytes = 0          # bytes they hold now
        self.cache_requests = 0       # caches a generation asked for ...
        self.cache_reuses = 0         # ... and found allocated (cache reuse ratio = these / those)
        self.cache_evictions = 0
        self._epoch = 0               # one per generation (and per prepared shape): what it
        self._used: dict = {}         # touched is never evicted under it
        self._born: dict = {}         # (role, B, L) -> the epoch that allocated it
        self.compile_cache = None     # compile_cache.setup()'s state once something compiled
        models = [pipe.receiver] + [sl.model for sl in pipe.sharers]
        for m in {id(m): m for m in models}.values():
            impl = getattr(m.config, "_attn_implementation", None) or "eager"
            if impl not in ("sdpa", "eager"):
                raise UserError(f"The fast engine supports the sdpa and eager attention"
                                f" implementations, not {impl}; use --attn_implementation sdpa"
                                " or --engine eager.")
        if compile:
            from .. import compile_cache  # inductor's caches under C2C_CACHE, before any compile
            self.compile_cache = compile_cache.setup()
            import torch._dynamo
            cfg = torch._dynamo.config
            # one compiled step per (model, batch size, bucket, greedy): allow many
            if hasattr(cfg, "recompile_limit"):
                cfg.recompile_limit = max(cfg.recompile_limit, 256)
            cfg.cache_size_limit = max(cfg.cache_size_limit, 256)
            if hasattr(cfg, "accumulated_recompile_limit"):
                cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 4096)

    @property
    def name(self) -> str:
        return "fast" if self.compile else "fast-nocompile"

    def model(self, role: str):
        """"receiver", "sharer" (sharer 1) or "sharerK" (sharer K)."""
        if role == "receiver":
            return self.pipe.receiver
        return self.pipe.sharers[int(role[6:] or 1) - 1].model

    # --- caches and masks ------------------------------------------------------------------

    def begin(self) -> None:
        """A new generation (or a shape being prepared): the caches it takes are kept from
        eviction until the next begin()."""
        self._epoch += 1

    def cache_nbytes(self, role: str, B: int, L: int) -> int:
        """Bytes of the (role, B, L) static cache: layers x B x kv heads x L x head_dim x
        (keys, values) x dtype bytes."""
        from ...models.projector import kv_shape
        layers, heads, hd = kv_shape(self.model(role).config)
        return layers * B * heads * L * hd * 2 * self.pipe.dtype.itemsize

    def _evict_for(self, need: int) -> None:
        """Free least recently used caches (and the compiled steps bound to them) until `need`
        more bytes fit under the cap; a cache the current generation took stays."""
        for key in list(self._caches):
            if self.cache_bytes + need <= self.cache_cap:
                return
            if self._used.get(key) == self._epoch:
                continue
            self._caches.pop(key)
            self._used.pop(key, None)
            self._born.pop(key, None)
            self.cache_bytes -= self.cache_nbytes(*key)
            self.cache_evictions += 1
            for k in [k for k in self._steps if k[:3] == key]:  # they hold the cache
                del self._steps[k]
            self._ready -= {k for k in self._ready if k[:3] == key}
        if self.cache_bytes + need > self.cache_cap:
            warnings.warn(f"fast engine: the static caches one generation needs"
                          f" ({(self.cache_bytes + need) / 2**20:,.0f} MB) exceed the cache cap"
                          f" ({self.cache_cap / 2**20:,.0f} MB, {CACHE_CAP_ENV}); allocating anyway.")

    def cache(self, role: str, B: int, L: int, use: bool = True):
        """The (role, B, L) static cache with its write position reset to 0. `use`: a
        generation's request (counted in the reuse ratio); False for warm-up's own calls."""
        from transformers import StaticCache
        key = (role, B, L)
        c = self._caches.get(key)
        if use:  # a reuse: allocated before this generation began (not by its own late prepare)
            self.cache_requests += 1
            self.cache_reuses += c is not None and self._born.get(key) != self._epoch
        if c is None:
            need = self.cache_nbytes(role, B, L)
            self._evict_for(need)
            m = self.model(role)
            c = StaticCache(config=_full_attention(m.config), max_cache_len=L)
            from ...models.projector import kv_shape
            _, heads, hd = kv_shape(m.config)
            c.early_initialization(B, heads, hd, self.pipe.dtype, self.device)
            self._caches[key] = c
            self._born[key] = self._epoch
            self.cache_bytes += need
        self._caches.move_to_end(key)
        self._used[key] = self._epoch
        for layer in c.layers:
            layer.cumulative_length.zero_()
        return c

    def cache_stats(self) -> dict:
        """What the static caches hold and how often a generation found its cache allocated."""
        req = self.cache_requests
        return {"held_mb": round(self.cache_bytes / 2**20, 3),
                "cap_mb": round(self.cache_cap / 2**20, 3), "caches": len(self._caches),
                "requests": req, "reuses": self.cache_reuses, "evictions": self.cache_evictions,
                "reuse_ratio": round(self.cache_reuses / req, 4) if req else None}

    def _mask(self, role: str, keep: torch.Tensor, dist: torch.Tensor | None = None):
        """keep [B, q, L] bool -> the 4-D mask the model's attention wants. A model with
        sliding-window layers gets one per layer type: the sliding one also drops keys `dist`
        (query position - key position, [q, L]) >= its window, as its own masks would."""
        return self._mask_for(self.model(role), keep, dist)

    def _prefill_args(self, role: str, start: int, q: int, L: int, rows: Rows):
        """A query sees earlier real positions (and itself: a padding query is never fully
        masked); positions count from the row's first real token, inner padding included (as
        the reference numbers them)."""
        i = torch.arange(start, start + q, device=self.device)[:, None]        # [q, 1]
        j = torch.arange(L, device=self.device)[None]                          # [1, L]
        keep = (j <= i)[None] & (rows.ok_to(L)[:, None, :] | (j == i)[None])
        pos = (i.T - rows.lp[:, None]).clamp(min=0)                             # [B, q]
        return self._mask(role, keep, i - j), pos

    def prefill(self, role: str, cache, emb: torch.Tensor, start: int, rows: Rows,
                logits: bool) -> torch.Tensor | None:
        """Run emb [B, q, H] at cache positions [start, start+q); the last position's logits
        [B, V] when `logits`, else only fill the cache (no LM head)."""
        mask, pos = self._prefill_args(role, start, emb.shape[1], cache.layers[0].max_cache_len, rows)
        m = self.model(role)
        if not logits:
            decoder(m)(inputs_embeds=emb, attention_mask=mask, position_ids=pos,
                       past_key_values=cache, use_cache=True)
            return None
        out = m(inputs_embeds=emb, attention_mask=mask, position_ids=pos, past_key_values=cache,
                use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :]

    # --- the decode step --------------------------------------------------------------------

    def _make_step(self, role: str, cache, L: int, greedy: bool):
        m = self.model(role)
        mask_for = self._mask_for

        def step(tok: torch.Tensor, c: torch.Tensor, lp: torch.Tensor,
                 ok: torch.Tensor) -> torch.Tensor:
            ar = torch.arange(L, device=tok.device)
            keep = (ok & (ar[None] <= c))[:, None, :]                              # [B, 1, L]
            mask = mask_for(m, keep, (c - ar)[None])  # sliding layers: the last `window` only
            pos = (c - lp)[:, None]
            out = m(input_ids=tok, attention_mask=mask, position_ids=pos, past_key_values=cache,
                    use_cache=True, logits_to_keep=1)
            logits = out.logits[:, -1, :]
            return logits.argmax(-1, keepdim=True) if greedy else logits.float()

        if not self.compile:
            return step
        return torch.compile(step, mode="reduce-overhead" if self.cuda else None, dynamic=False)

    def prepare(self, role: str, B: int, L: int, greedy: bool) -> None:
        """Allocate the cache and compile (and on CUDA capture) the step for this shape: a dummy
        prefill of one token, three steps, then the cache is reset. Timed into compile_s."""
        key = (role, B, L, greedy)
        if key in self._ready:
            return
        t0 = time.perf_counter()
        if self.compile_cache is not None:
            from ..compile_cache import counts
            hits0, misses0 = counts()
        with torch.inference_mode():
            cache = self.cache(role, B, L, use=False)
            if key not in self._steps:
                self._steps[key] = self._make_step(role, cache, L, greedy)
            m = self.model(role)
            ids = torch.zeros(B, 1, dtype=torch.long, device=self.device)
            rows = Rows(ids, torch.zeros(B, dtype=torch.long, device=self.device),
                        torch.ones(B, 1, dtype=torch.bool, device=self.device))
            self.prefill(role, cache, m.get_input_embeddings()(ids), 0, rows, logits=False)
            ok = rows.ok_to(L)
            for k in range(1, 4):
                if self.cuda and self.compile:
                    torch.compiler.cudagraph_mark_step_begin()
                self._steps[key](ids, torch.tensor(k, device=self.device), rows.lp, ok).clone()
            if self.cuda:
                torch.cuda.synchronize(self.device)
            self.cache(role, B, L, use=False)
        self._ready.add(key)
        self.compile_s += time.perf_counter() - t0
        if self.compile_cache is not None:  # from inductor's FX graph cache, or compiled now
            hits, misses = counts()
            self.compile_cache["hits"] += hits - hits0
            self.compile_cache["misses"] += misses - misses0

    def ensure(self, role: str, B: int, L: int, greedy: bool) -> None:
        """A shape warm-up did not cover (a longer t2t note than planned): prepare it now, outside
        any span, and say so; its cost lands in this generation's `other_ms`."""
        if (role, B, L, greedy) not in self._ready:
            self.late += 1
            if self.compile:
                warnings.warn(f"fast engine: compiling the {role} step for batch {B}, bucket {L}"
                              " outside warm-up; this generation's e2e includes it.")
            self.prepare(role, B, L, greedy)

    # --- generation ------------------------------------------------------------------------

    def decode(self, role: str, cache, L: int, logits: torch.Tensor, rows: Rows,
               start: int, n_max: int, gen, eos: set[int], ignore_eos: bool, gens,
               timer: Timer, stage: str, on_first=None) -> Decoded:
        """First token from the prefill logits, then one step per further token; the first new
        token is written at cache position `start`."""
        B = logits.shape[0]
        greedy = not gen.do_sample
        step = self._steps[(role, B, L, greedy)]
        dev = self.device
        pad_id = self.pad_id(role)
        ok, lp = rows.ok_to(L), rows.lp
        out = torch.empty(B, n_max, dtype=torch.long, device=dev)
        tok = sample(logits, gen, gens)                                          # [B, 1]
        out[:, :1] = tok
        eos_t = torch.tensor(sorted(eos) or [-1], dtype=torch.long, device=dev)
        done = torch.isin(tok[:, 0], eos_t) if not ignore_eos else None
        first = tok[:, 0].tolist()  # the first token is on the host: TTFT is honest
        del first
        if on_first is not None:
            on_first()
        c = torch.tensor(start, dtype=torch.long, device=dev)
        n = 1
        mark = self.cuda and self.compile
        while n < n_max:
            if done is not None and bool(done.all()):
                break
            cancel.check()  # Stop / a client gone: end within one decode step
            with timer.span(stage):
                if mark:
                    torch.compiler.cudagraph_mark_step_begin()
                r = step(tok, c, lp, ok)
                tok = (r if greedy else sample(r, gen, gens)).clone()
                if done is not None:
                    tok = tok.masked_fill(done[:, None], pad_id)
                    done = done | torch.isin(tok[:, 0], eos_t)
                out[:, n:n + 1] = tok
                c = c + 1
            n += 1
        rows = out[:, :n].tolist()
        if not ignore_eos:
            rows = [_cut_at_eos(r, eos) for r in rows]
        return Decoded(rows, n - 1)

    def pad_id(self, role: str = "receiver") -> int:
        """The padding id of the model that reads the rows: "receiver", "sharer" (sharer 1) or
        "sharerK"."""
        k = 0 if role == "receiver" else int(role[6:] or 1)
        tok = self.pipe.tokenizer if k == 0 else self.pipe.sharers[k - 1].tokenizer
        for v in (tok.pad_token_id, tok.eos_token_id):
            if isinstance(v, int):
                return v
        return 0

    def c2c_prefill(self, rows: Rows, feeds: list, L: int, with_sharer: bool, timer: Timer):
        """Sectioned prefill of a left-padded batch rows.ids [B, T]: the receiver and every
        sharer over the first T-1 positions, the projection, then the last token (without the
        sharer: one plain prefill of the receiver, the honest baseline). `feeds`: per sharer
        (k, its Rows, its projection mask [B, T-1] bool or None for all). Returns the receiver
        cache, last-token logits [B, V] and the projector calls per sharer."""
        B, T = rows.ids.shape
        n = T - 1
        r_model = self.pipe.receiver
        with timer.span("base_embedding"):
            r_emb = r_model.get_input_embeddings()(rows.ids)
        r_cache = self.cache("receiver", B, L)
        if not with_sharer:  # the receiver alone: one plain prefill, as the eager engine does
            cancel.check()
            with timer.span("base_prefill"):
                logits = self.prefill("receiver", r_cache, r_emb, 0, rows, logits=True)
            return r_cache, logits, {}
        calls: dict[int, int] = {}
        if n > 0:
            cancel.check()
            with timer.span("base_prefill"):
                self.prefill("receiver", r_cache, r_emb[:, :n], 0, rows, logits=False)
            s_caches, masks = [], []
            for k, srows, mask in feeds:
                cancel.check()
                model = self.pipe.sharers[k - 1].model
                with timer.span("teacher_embedding", who=k):
                    s_emb = model.get_input_embeddings()(srows.ids[:, :n])
                with timer.span("teacher_prefill", who=k):
                    s_caches.append(self.sharer_prefill(k, s_emb, srows, n))
                masks.append(mask)
            cancel.check()
            calls = self.project(r_cache, s_caches, n, masks, timer)
            del s_caches
        with timer.span("base_prefill"):
            logits = self.prefill("receiver", r_cache, r_emb[:, n:], n, rows, logits=True)
        return r_cache, logits, calls

    def sharer_prefill(self, k: int, emb: torch.Tensor, srows: Rows, n: int):
        """A sharer in c2c only fills a cache to project (it never decodes): its static cache
        holds its prompt only (sharer_len(n) positions, every layer full-length so that all n
        can be projected), with our own masks, a sliding window applied where its layers have
        one."""
        role = sharer_role(k)
        model = self.model(role)
        B = emb.shape[0]
        cache = self.cache(role, B, sharer_len(n))
        Ls = cache.layers[0].max_cache_len
        i = torch.arange(n, device=self.device)[:, None]
        j = torch.arange(Ls, device=self.device)[None]
        ok = srows.ok_to(Ls) if srows.ok.shape[1] < Ls else srows.ok[:, :Ls]
        keep = (j <= i)[None] & (ok[:, None, :] | (j == i)[None])                # [B, n, Ls]
        pos = (i.T - srows.lp[:, None]).clamp(min=0)
        mask = self._mask_for(model, keep, i - j)
        decoder(model)(inputs_embeds=emb, attention_mask=mask, position_ids=pos,
                       past_key_values=cache, use_cache=True)
        return cache

    def _mask_for(self, model, keep: torch.Tensor, dist: torch.Tensor | None = None):
        def one(k):
            k = k[:, None]
            if model.config._attn_implementation == "sdpa":
                return k
            dt = self.pipe.dtype
            return torch.zeros(k.shape, dtype=dt, device=k.device).masked_fill(
                ~k, torch.finfo(dt).min)
        window = _window(model.config)
        if not window or dist is None:
            return one(keep)
        return {"full_attention": one(keep), "sliding_attention": one(keep & (dist < window)[None])}

    def project(self, r_cache, s_caches: list, n: int, masks: list, timer: Timer) -> dict[int, int]:
        """All sharers' projections. One sharer reading the receiver's positions with projectors
        of one size: one stacked pass over every layer pair (stacked.py); otherwise the eager
        engine's projection (fusion.project_sharers: parallel or sequential, first pair wins,
        masks) over the static cache's first n positions."""
        fuser = self.pipe.fuser
        st = stacked_for(fuser) if len(s_caches) == 1 else None
        if st is not None:
            with timer.span("projection", who=1):
                return {1: st.project_caches(r_cache.layers, s_caches[0].layers, n, masks[0])}
        return project_sharers(fuser, r_cache, s_caches, n, timer, self.pipe.fusion, masks,
                               static=True)

    def plain_prefill(self, role: str, rows: Rows, L: int, timer: Timer, emb_stage: str,
                      prefill_stage: str, who: int | None = None):
        m = self.model(role)
        with timer.span(emb_stage, who=who):
            emb = m.get_input_embeddings()(rows.ids)
        cache = self.cache(role, rows.ids.shape[0], L)
        with timer.span(prefill_stage, who=who):
            logits = self.prefill(role, cache, emb, 0, rows, logits=True)
        return cache, logits


def _window(config) -> int | None:
    """The sliding window of a model with sliding-window layers; None when every layer attends
    to all positions."""
    w = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None) or []
    return int(w) if w and any(t == "sliding_attention" for t in types) else None


def _full_attention(config):
    """The config a static cache is built from: every layer full-length, sliding ones included
    (they keep every position; our masks give each layer type what it may see, so the
    attention is exactly the model's own: the sliding mask drops keys past the window)."""
    types = getattr(config, "layer_types", None) or []
    if not any(t != "full_attention" for t in types):
        return config
    import copy
    c = copy.copy(config)
    c.layer_types = ["full_attention"] * len(types)
    c.sliding_window = None
    return c


def _cut_at_eos(row: list[int], eos: set[int]) -> list[int]:
    for k, t in enumerate(row):
        if t in eos:
            return row[:k + 1]
    return row


def engine_for(pipe, compile: bool | None = None) -> FastEngine:
    """The pipeline's fast engine (created once and kept on it)."""
    eng = getattr(pipe, "_fast_engine", None)
    if eng is None or (compile is not None and eng.compile != compile):
        eng = FastEngine(pipe, compile)
        pipe._fast_engine = eng
    return eng
