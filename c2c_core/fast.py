"""The fast engine: static KV caches, a compiled decode step, one batched projection, batches.

Same stages, same spans, same record format as the eager engine (fusion.py + runner.py); only the
way each stage runs differs:

- Static caches (transformers' StaticCache) for receiver and sharer, one per (role, batch size,
  length bucket), allocated once and reused: a generation resets their write position only.
  Buckets are powers of two >= 64 covering prompt + new tokens, so a run compiles a few shapes.
  The c2c sharer's cache holds its prompt only (it never decodes; rounded up to 64 positions).
  Together they are held under a cap in bytes (C2C_CACHE_CAP_MB; default half the free memory):
  when a new shape needs room the least recently used caches (and the compiled steps bound to
  them) are freed. `cache_stats()` counts requests, reuses and evictions.
- Our own 4-D attention mask (left padding: row b's first `pad[b]` positions are padding; a
  padding query sees only itself, so no row is fully masked) and explicit position ids, so every
  step has fixed shapes and nothing is recomputed from Python state.
- The decode step (`step(tok, c, pad)`) is compiled with torch.compile: mode "reduce-overhead"
  (CUDA graphs) on a GPU, inductor on a CPU. Compilation and graph capture happen in `prepare()`
  during warm-up for every (model, batch, bucket) a run will use, never inside a timed span; the
  seconds go to `compile_s` (run.compile_s in the records).
- Greedy decoding is an on-device argmax; sampling uses the exponential trick with the seeded
  generator (no host sync); with --ignore_eos no step reads a value back to the host.
- The projection of all layer pairs is one batched pass (stacked.py) inside one span.
- Batches: left padding, attention mask and position ids; per-row EOS (a finished row keeps
  producing padding until every row is done).
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass

import torch

from . import cancel
from .errors import UserError
from .fusion import decoder
from .generation import (T2T_ANSWER_TEMPLATE, T2T_NOTE_INSTRUCTION, Generation, chat_ids,
                         make_record, modes_of, run_metadata, start_generation, sync_safe,
                         to_item)
from .records import is_done
from .stacked import stacked_for
from .timing import Timer

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
        from .budget import free_bytes
        free = free_bytes("cpu")
    return int(free * CACHE_SHARE) if free else 2**62


def _lru():
    from collections import OrderedDict
    return OrderedDict()


def left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [B, T] left-padded with pad_id, and pad [B] = padding positions per row."""
    T = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (T - len(r)) + list(r) for r in rows], dtype=torch.long,
                       device=device)
    pad = torch.tensor([T - len(r) for r in rows], dtype=torch.long, device=device)
    return ids, pad


def _filter_logits(x: torch.Tensor, top_p: float, top_k: int) -> torch.Tensor:
    if top_k and top_k > 0:
        kth = torch.topk(x, min(top_k, x.shape[-1])).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if 0.0 < top_p < 1.0:
        sx, idx = torch.sort(x, descending=True)
        p = torch.softmax(sx, -1)
        drop = p.cumsum(-1) - p > top_p  # keep the smallest prefix reaching top_p
        x = torch.full_like(x, float("-inf")).scatter(-1, idx, sx.masked_fill(drop, float("-inf")))
    return x


def sample_nosync(logits: torch.Tensor, gen, generator) -> torch.Tensor:
    """Next tokens [B, 1] on the device without reading anything back: argmax, or (sampling) the
    exponential trick argmax(p / E), E ~ Exp(1) from the seeded generator."""
    if not gen.do_sample:
        return logits.argmax(-1, keepdim=True)
    x = _filter_logits(logits.float() / max(gen.temperature, 1e-5), gen.top_p, gen.top_k)
    p = torch.softmax(x, -1)
    e = torch.empty_like(p).exponential_(1.0, generator=generator)
    return (p / e).argmax(-1, keepdim=True)


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
        for m in {id(pipe.receiver): pipe.receiver, id(pipe.sharer): pipe.sharer}.values():
            impl = getattr(m.config, "_attn_implementation", None) or "eager"
            if impl not in ("sdpa", "eager"):
                raise UserError(f"The fast engine supports the sdpa and eager attention"
                                f" implementations, not {impl}; use --attn_implementation sdpa"
                                " or --engine eager.")
            types = getattr(m.config, "layer_types", None) or []
            if any(t != "full_attention" for t in types):
                raise UserError("The fast engine supports full-attention layers only (this model"
                                " has sliding-window layers); use --engine eager.")
        if compile:
            from . import compile_cache  # inductor's caches under C2C_CACHE, before any compile
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
        return self.pipe.receiver if role == "receiver" else self.pipe.sharer

    # --- caches and masks ------------------------------------------------------------------

    def begin(self) -> None:
        """A new generation (or a shape being prepared): the caches it takes are kept from
        eviction until the next begin()."""
        self._epoch += 1

    def cache_nbytes(self, role: str, B: int, L: int) -> int:
        """Bytes of the (role, B, L) static cache: layers x B x kv heads x L x head_dim x
        (keys, values) x dtype bytes."""
        from .projector import kv_shape
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
            c = StaticCache(config=m.config, max_cache_len=L)
            from .projector import kv_shape
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

    def _mask(self, role: str, keep: torch.Tensor) -> torch.Tensor:
        """keep [B, q, L] bool -> the 4-D mask the model's attention wants."""
        m = self.model(role)
        keep = keep[:, None]
        if m.config._attn_implementation == "sdpa":
            return keep
        dt = self.pipe.dtype
        return torch.zeros(keep.shape, dtype=dt, device=keep.device).masked_fill(
            ~keep, torch.finfo(dt).min)

    def _prefill_args(self, role: str, start: int, q: int, L: int, pad: torch.Tensor):
        i = torch.arange(start, start + q, device=self.device)[:, None]        # [q, 1]
        j = torch.arange(L, device=self.device)[None]                          # [1, L]
        keep = (j <= i)[None] & ((j[None] >= pad[:, None, None]) | (j == i)[None])
        pos = (i.T - pad[:, None]).clamp(min=0)                                  # [B, q]
        return self._mask(role, keep), pos

    def prefill(self, role: str, cache, emb: torch.Tensor, start: int, pad: torch.Tensor,
                logits: bool) -> torch.Tensor | None:
        """Run emb [B, q, H] at cache positions [start, start+q); the last position's logits
        [B, V] when `logits`, else only fill the cache (no LM head)."""
        mask, pos = self._prefill_args(role, start, emb.shape[1], cache.layers[0].max_cache_len, pad)
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
        sdpa = m.config._attn_implementation == "sdpa"
        dt = self.pipe.dtype

        def step(tok: torch.Tensor, c: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
            ar = torch.arange(L, device=tok.device)
            keep = ((ar[None] >= pad[:, None]) & (ar[None] <= c))[:, None, None, :]   # [B,1,1,L]
            mask = keep if sdpa else torch.zeros(keep.shape, dtype=dt, device=tok.device) \
                .masked_fill(~keep, torch.finfo(dt).min)
            pos = (c - pad)[:, None]
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
            from .compile_cache import counts
            hits0, misses0 = counts()
        with torch.inference_mode():
            cache = self.cache(role, B, L, use=False)
            if key not in self._steps:
                self._steps[key] = self._make_step(role, cache, L, greedy)
            m = self.model(role)
            pad = torch.zeros(B, dtype=torch.long, device=self.device)
            ids = torch.zeros(B, 1, dtype=torch.long, device=self.device)
            self.prefill(role, cache, m.get_input_embeddings()(ids), 0, pad, logits=False)
            for k in range(1, 4):
                if self.cuda and self.compile:
                    torch.compiler.cudagraph_mark_step_begin()
                self._steps[key](ids, torch.tensor(k, device=self.device), pad).clone()
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

    def decode(self, role: str, cache, L: int, logits: torch.Tensor, pad: torch.Tensor,
               start: int, n_max: int, gen, eos: set[int], ignore_eos: bool, generator,
               timer: Timer, stage: str, on_first=None) -> Decoded:
        """First token from the prefill logits, then one step per further token; the first new
        token is written at cache position `start`."""
        B = logits.shape[0]
        greedy = not gen.do_sample
        step = self._steps[(role, B, L, greedy)]
        dev = self.device
        pad_id = self.pad_id
        out = torch.empty(B, n_max, dtype=torch.long, device=dev)
        tok = sample_nosync(logits, gen, generator)                              # [B, 1]
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
                r = step(tok, c, pad)
                tok = (r if greedy else sample_nosync(r, gen, generator)).clone()
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

    @property
    def pad_id(self) -> int:
        tok = self.pipe.tokenizer
        for v in (tok.pad_token_id, tok.eos_token_id):
            if isinstance(v, int):
                return v
        return 0

    def c2c_prefill(self, ids: torch.Tensor, pad: torch.Tensor, L: int, with_sharer: bool,
                    timer: Timer):
        """Sectioned prefill of a left-padded batch ids [B, T]: receiver and sharer over the
        first T-1 positions, one batched projection, then the last token (without the sharer:
        one plain prefill of the receiver, the honest baseline). Returns the receiver
        cache, last-token logits [B, V] and the projector calls (layer pairs)."""
        B, T = ids.shape
        n = T - 1
        r_model = self.pipe.receiver
        with timer.span("base_embedding"):
            r_emb = r_model.get_input_embeddings()(ids)
        r_cache = self.cache("receiver", B, L)
        if not with_sharer:  # the receiver alone: one plain prefill, as the eager engine does
            cancel.check()
            with timer.span("base_prefill"):
                logits = self.prefill("receiver", r_cache, r_emb, 0, pad, logits=True)
            return r_cache, logits, 0
        calls = 0
        if n > 0:
            cancel.check()
            with timer.span("base_prefill"):
                self.prefill("receiver", r_cache, r_emb[:, :n], 0, pad, logits=False)
            if with_sharer:
                cancel.check()
                with timer.span("teacher_embedding"):
                    s_emb = self.pipe.sharer.get_input_embeddings()(ids[:, :n])
                s_cache = self.cache("sharer", B, sharer_len(n))  # its prompt only
                with timer.span("teacher_prefill"):
                    self.prefill("sharer", s_cache, s_emb, 0, pad, logits=False)
                with timer.span("projection"):
                    calls = self.project(r_cache, s_cache, n)
        with timer.span("base_prefill"):
            logits = self.prefill("receiver", r_cache, r_emb[:, n:], n, pad, logits=True)
        return r_cache, logits, calls

    def project(self, r_cache, s_cache, n: int) -> int:
        fuser = self.pipe.fuser
        st = stacked_for(fuser)
        if st is not None:
            return st.project_caches(r_cache.layers, s_cache.layers, n)
        calls = 0  # projectors of different sizes: one call per pair, still one span
        for t, pairs in fuser.mapping.items():
            rl = r_cache.layers[t]
            for s, i in pairs:
                sl = s_cache.layers[s]
                k, v = fuser.projectors[i]((sl.keys[:, :, :n], sl.values[:, :, :n]),
                                           (rl.keys[:, :, :n], rl.values[:, :, :n]))
                rl.keys[:, :, :n].copy_(k)
                rl.values[:, :, :n].copy_(v)
                calls += 1
        return calls

    def plain_prefill(self, role: str, ids: torch.Tensor, pad: torch.Tensor, L: int,
                      timer: Timer, emb_stage: str, prefill_stage: str):
        m = self.model(role)
        with timer.span(emb_stage):
            emb = m.get_input_embeddings()(ids)
        cache = self.cache(role, ids.shape[0], L)
        with timer.span(prefill_stage):
            logits = self.prefill(role, cache, emb, 0, pad, logits=True)
        return cache, logits


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


# --- generation of a batch of items (the runner's `generate`, B >= 1) -----------------------

def encode(pipe, cfg, item, mode: str) -> list[int]:
    """The ids the first model reads, as runner.generate encodes them."""
    if item.input_ids is not None:
        ids = list(item.input_ids)
    elif mode == "t2t":
        ids = chat_ids(pipe.tokenizer, T2T_NOTE_INSTRUCTION.format(question=item.prompt),
                       cfg.chat_template)
    else:
        ids = chat_ids(pipe.tokenizer, item.prompt, cfg.chat_template)
    if not ids:
        raise UserError(f"Prompt {item.id} encodes to no tokens; give it some text.")
    return ids


T2T_SLACK = 16  # re-encoding a decoded note may add a few tokens


def _t2t_answer_bound(pipe, cfg, item) -> int:
    if item.input_ids is not None:
        base = len(item.input_ids)
    else:
        base = len(chat_ids(pipe.tokenizer, T2T_ANSWER_TEMPLATE.format(note="", question=item.prompt),
                            cfg.chat_template))
    return base + cfg.gen.t2t_note_tokens + T2T_SLACK


def plan(pipe, cfg, batches: list[list], modes: list[str]) -> set[tuple]:
    """Every (kind, role, B, L[, greedy]) a run over `batches` x `modes` will use."""
    g = cfg.gen
    greedy = not g.do_sample
    keys = set()
    for items in batches:
        B = len(items)
        for mode in modes:
            T = max(len(encode(pipe, cfg, it, mode)) for it in items)
            if mode in ("c2c", "receiver"):
                L = bucket(T + g.max_new_tokens)
                keys.add(("step", "receiver", B, L, greedy))
                if mode == "c2c" and T > 1:  # the sharer reads the first T-1 positions
                    keys.add(("cache", "sharer", B, sharer_len(T - 1)))
            elif mode == "sharer":
                keys.add(("step", "sharer", B, bucket(T + g.max_new_tokens), greedy))
            elif mode == "t2t":
                keys.add(("step", "sharer", B, bucket(T + g.t2t_note_tokens), greedy))
                T2 = max(_t2t_answer_bound(pipe, cfg, it) for it in items)
                keys.add(("step", "receiver", B, bucket(T2 + g.max_new_tokens), greedy))
    return keys


def prepare_plan(pipe, cfg, batches: list[list], modes: list[str]) -> float:
    """Compile/capture/allocate everything the run needs; returns the seconds it took now."""
    eng = engine_for(pipe)
    before = eng.compile_s
    if pipe.fuser is not None and "c2c" in modes:
        # the stacked projector weights (a one-off copy of every projector, ~1 GB for the
        # published fusers) are built here, untimed, never inside a recorded projection span
        t0 = time.perf_counter()
        stacked_for(pipe.fuser)
        eng.compile_s += time.perf_counter() - t0
    keys = sorted(plan(pipe, cfg, batches, modes), key=str)
    planned = sum(eng.cache_nbytes(*c) for c in {tuple(k[1:4]) for k in keys})
    if planned > eng.cache_cap:
        warnings.warn(f"fast engine: this run's static caches ({planned / 2**20:,.0f} MB) exceed"
                      f" the cache cap ({eng.cache_cap / 2**20:,.0f} MB, {CACHE_CAP_ENV}): the"
                      " least recently used are freed as shapes change, and a shape needed again"
                      " is prepared again between generations.")
    steps = [k for k in keys if k[0] == "step" and tuple(k[1:]) not in eng._ready]
    done = 0
    for k in keys:
        # a Stop or a client gone ends the run between two shapes: one shape's compile at most
        cancel.check()
        eng.begin()  # each shape on its own: the cap may free an earlier one for it
        if k[0] == "step":
            if tuple(k[1:]) not in eng._ready:
                done += 1
                cancel.say(f"{'compiling' if eng.compile else 'preparing'} the {k[1]} step for"
                           f" shape {done} of {len(steps)} (batch {k[2]}, {k[3]} tokens)")
            eng.prepare(*k[1:])
        else:
            t0 = time.perf_counter()
            with torch.inference_mode():
                eng.cache(*k[1:], use=False)
            eng.compile_s += time.perf_counter() - t0
    return eng.compile_s - before


def generate_batch(pipe, cfg, items: list, mode: str, timer: Timer) -> list:
    """One timed generation of a batch of items in `mode`: one Generation per item, each with
    the batch's stage times (its own decode steps: those it took part in). The clock starts
    before tokenization."""
    from .memory import DeviceMemory
    from .records import MODES
    if mode not in MODES:
        raise UserError(f"Unknown mode {mode}; use one of {', '.join(MODES)}.")
    mem = DeviceMemory(pipe.device, enabled=timer.method != "off").__enter__()
    try:
        return _generate_batch(pipe, cfg, items, mode, timer, mem)
    finally:
        mem.__exit__(None, None, None)  # stops the RSS sampler on any exit


def _generate_batch(pipe, cfg, items: list, mode: str, timer: Timer, mem) -> list:
    from .hardware import floor_for
    from .timing import now_ns
    eng = engine_for(pipe)
    eng.begin()  # the caches this generation takes are not evicted under it
    dev = pipe.device
    g = cfg.gen
    greedy = not g.do_sample
    generator, eos, ttft, mark_first, wall0, t0 = start_generation(pipe, cfg)
    rows = [encode(pipe, cfg, it, mode) for it in items]
    B = len(rows)
    calls, notes = 0, [[] for _ in rows]
    with torch.inference_mode():
        if mode in ("c2c", "receiver"):
            ids, pad = left_pad(rows, eng.pad_id, dev)
            L = bucket(ids.shape[1] + g.max_new_tokens)
            eng.ensure("receiver", B, L, greedy)
            cache, logits, calls = eng.c2c_prefill(ids, pad, L, mode == "c2c", timer)
            dec = eng.decode("receiver", cache, L, logits, pad, ids.shape[1], g.max_new_tokens, g,
                             eos, g.ignore_eos, generator, timer, "decode", mark_first)
        elif mode == "sharer":
            ids, pad = left_pad(rows, eng.pad_id, dev)
            L = bucket(ids.shape[1] + g.max_new_tokens)
            eng.ensure("sharer", B, L, greedy)
            cache, logits = eng.plain_prefill("sharer", ids, pad, L, timer, "teacher_embedding",
                                              "teacher_prefill")
            dec = eng.decode("sharer", cache, L, logits, pad, ids.shape[1], g.max_new_tokens, g,
                             eos, g.ignore_eos, generator, timer, "decode", mark_first)
        else:  # t2t: the note stops at EOS (capped by t2t_note_tokens), then the answer
            ids, pad = left_pad(rows, eng.pad_id, dev)
            L = bucket(ids.shape[1] + g.t2t_note_tokens)
            eng.ensure("sharer", B, L, greedy)
            cache, logits = eng.plain_prefill("sharer", ids, pad, L, timer, "teacher_embedding",
                                              "teacher_prefill")
            note = eng.decode("sharer", cache, L, logits, pad, ids.shape[1], g.t2t_note_tokens,
                              g, eos, False, generator, timer, "sharer_decode")
            notes = note.tokens
            rows2 = []
            for it, nt in zip(items, notes):
                if it.input_ids is not None:
                    rows2.append([t for t in nt if t not in eos] + list(it.input_ids))
                else:
                    text = pipe.tokenizer.decode(nt, skip_special_tokens=True).strip()
                    rows2.append(chat_ids(pipe.tokenizer, T2T_ANSWER_TEMPLATE.format(
                        note=text, question=it.prompt), cfg.chat_template))
            rows = rows2  # prompt_tokens = what the receiver read
            ids, pad = left_pad(rows, eng.pad_id, dev)
            L = bucket(max(ids.shape[1], max(_t2t_answer_bound(pipe, cfg, it) for it in items))
                       + g.max_new_tokens)
            eng.ensure("receiver", B, L, greedy)
            cache, logits, _ = eng.c2c_prefill(ids, pad, L, False, timer)
            dec = eng.decode("receiver", cache, L, logits, pad, ids.shape[1], g.max_new_tokens, g,
                             eos, g.ignore_eos, generator, timer, "decode", mark_first)
    t_end = now_ns()
    wall1 = time.time()
    stages = timer.finish()
    mem.__exit__(None, None, None)  # the peaks of this generation
    dec_ms = sum(stages["decode"])
    dec_tokens = sum(len(t) - 1 for t in dec.tokens)
    batch_tps = dec_tokens / (dec_ms / 1000.0) if dec_ms > 0 else 0.0
    # a batch step reads every row's cache: mean positions per step over the batch (hardware.py)
    kv_ctx = float(sum(len(r) + len(t) / 2 for r, t in zip(rows, dec.tokens)))
    all_tokens = sum(len(t) for t in dec.tokens)
    out = []
    for i, toks in enumerate(dec.tokens):
        st = dict(stages)
        st["decode"] = stages["decode"][:len(toks) - 1]
        st["sharer_decode"] = stages["sharer_decode"][:max(len(notes[i]) - 1, 0)]
        # the steps the batch still ran for longer rows: this row's wait, not its "other"
        wait = (stages["decode"][len(toks) - 1:]
                + stages["sharer_decode"][max(len(notes[i]) - 1, 0):])
        gen = Generation(toks, st, ttft[0] - t0, t_end - t0, len(rows[i]), calls, notes[i],
                         mem.allocated_mb, mem.reserved_mb, wall0, wall1)
        gen.batch_size, gen.batch_index, gen.batch_tokens_per_second = B, i, batch_tps
        gen.cpu_share = mem.cpu_share
        gen.batch_wait = list(wait)
        gen.kv_context_tokens, gen.energy_j, gen.energy_tokens = kv_ctx, mem.energy_j, all_tokens
        gen.decode_floor_ms = floor_for(pipe, gen, pipe.sharer if mode == "sharer" else None)
        out.append(gen)
    return out


def run_many_fast(pipe, cfg, items, writer=None, on_progress=None, should_stop=None, skip=None,
                  meta=None) -> list[dict]:
    """runner.run_many on the fast engine: items in batches of cfg.batch_size (per batch: each
    repeat, modes interleaved), every shape prepared before anything is timed, then
    `cfg.warmup` unrecorded generations of the first batch per mode. One record per item."""
    from .errors import OutOfMemory
    items = [to_item(x) for x in items]
    for i, it in enumerate(items):
        if it.id is None:
            it.id = i + 1
    modes = modes_of(cfg)
    B = max(int(cfg.batch_size), 1)
    chunks = [items[k:k + B] for k in range(0, len(items), B)]
    jobs = []
    for ch in chunks:  # the eager order at batch 1: item, repeat, mode
        for r in range(cfg.repeats):
            for m in modes:
                todo = [it for it in ch if not is_done(skip, it, m, r)]
                if todo:
                    jobs.append((todo, r, m))
    if meta is None:
        meta = run_metadata(pipe, cfg, Timer(pipe.device, cfg.timing).method_name)
    out: list[dict] = []
    total = sum(len(j[0]) for j in jobs)
    if on_progress:
        on_progress(0, total, None)
    try:
        with cancel.scope(should_stop):  # a stop also ends the running generation
            if jobs:
                spent = prepare_plan(pipe, cfg, [j[0] for j in jobs], modes)
                meta["compile_s"] = round(float(meta.get("compile_s") or 0.0) + spent, 3)
                cancel.check()
                cancel.say("warming up" if cfg.warmup else "timed run")
                for m in modes:
                    for _ in range(cfg.warmup):
                        generate_batch(pipe, cfg, jobs[0][0], m, Timer(pipe.device, cfg.timing))
            if cfg.warmup:
                cancel.say("timed run")
            for todo, r, m in jobs:
                if should_stop and should_stop():
                    break
                gens = generate_batch(pipe, cfg, todo, m, Timer(pipe.device, cfg.timing))
                for it, g in zip(todo, gens):
                    rec = make_record(pipe, it, m, r, g, meta)
                    if writer:
                        writer.write(rec)
                    out.append(rec)
                    if on_progress:
                        on_progress(len(out), total, rec)
    except cancel.Cancelled:
        pass  # stopped mid-generation: that batch has no records; the others are kept
    except torch.OutOfMemoryError:
        sync_safe(pipe)
        raise OutOfMemory(
            f"CUDA out of memory after {len(out)} record(s); reduce --batch_size or"
            " --max_new_tokens, or use shorter prompts (records already written are kept).") from None
    return out
