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
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ...measure import cancel
from ...measure.zerogpu import on_zerogpu
from ...spec.errors import UserError
from ...models.fusion import decoder, project_sharers, sample, section_mask
from ...models.stacked import stacked_for
from ...measure.timing import Timer, on_device
from .graphs import Ended, capture
from ..shapes import BUCKET_MIN, SHARER_ROUND, bucket, prompt_bucket, sharer_len  # noqa: F401

#: Let `C2C_FAST_COMPILE=0` run the fast engine's static-cache path without torch.compile.
COMPILE_ENV = "C2C_FAST_COMPILE"
#: The bytes (in MB) the fast engine's static caches may hold together; least recently used
#: caches are freed when a new shape needs room. Default: CACHE_SHARE of the memory free on the
#: device when the engine is made (after the weights loaded).
CACHE_CAP_ENV = "C2C_CACHE_CAP_MB"
CACHE_SHARE = 0.5
#: How the decode step becomes one launch on CUDA: "compile" (default), torch.compile with CUDA
#: graphs (inductor fuses the small ops; every shape compiles, ~30 s each the first time), or
#: "capture", one CUDA graph of the step as it is (no compile: ready in about one step's time;
#: more, unfused kernels per step). On a CPU "capture" runs the step uncompiled. The default is
#: "capture" on ZeroGPU (measure/zerogpu.py), where torch.compile is not supported (see
#: step_mode()).
STEP_ENV = "C2C_FAST_STEP"
#: Compile (and on CUDA graph-capture) the prefills and the projection too, per (batch, prompt
#: length bucket): "auto" (default) on CUDA only, where a prefill is bound by kernel launches;
#: "1" everywhere; "0" never (then prompts are not padded to a bucket either).
GRAPHS_ENV = "C2C_FAST_PREFILL_GRAPHS"


def step_mode() -> str:
    """The decode step mode STEP_ENV asks for: "compile" by default, "capture" on ZeroGPU.

    On ZeroGPU (SPACES_ZERO_GPU with the `spaces` package) an explicit C2C_FAST_STEP=compile is
    refused rather than overridden: torch.compile is not supported there, and every call runs in
    a fresh worker process, so a compiled step would be compiled again inside every call's GPU
    time. A silent switch would record a run under another engine name ("fast-capture") than the
    one its operator set; a refusal says which setting to change, before anything is prepared
    (the app's validators call this on ZeroGPU, so a job is refused before it queues for the
    GPU)."""
    zero = on_zerogpu()
    step = os.environ.get(STEP_ENV, "").strip().lower() or ("capture" if zero else "compile")
    if step not in ("compile", "capture"):
        raise UserError(f"{STEP_ENV}={step[:20]} is not a decode step mode; set"
                        f" {STEP_ENV}=compile (default) or {STEP_ENV}=capture.")
    if zero and step == "compile":
        raise UserError(f"{STEP_ENV}=compile cannot run on ZeroGPU, where torch.compile is not"
                        f" supported; unset {STEP_ENV} or set {STEP_ENV}=capture.")
    return step


def sharer_role(k: int) -> str:
    """The cache role of sharer k: "sharer" for sharer 1 (it also decodes in sharer/t2t
    modes), "sharerK" for the others."""
    return "sharer" if k == 1 else f"sharer{k}"


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
        """ok over L cache positions: positions past the prompt (new tokens) are real; a cache
        shorter than the rows (a c2c sharer's, which holds all but the last) takes the first L."""
        B, T = self.ok.shape
        if L <= T:
            return self.ok[:, :L]
        return torch.cat([self.ok, self.ok.new_ones(B, L - T)], 1)


def layout(rows: list[list[int]], pads: list[list[bool] | None], pad_id: int, device,
           T: int | None = None) -> Rows:
    """Left-pad `rows` to T (default: the longest row) positions."""
    T = max([len(r) for r in rows] + [T or 0])
    ids = torch.tensor([[pad_id] * (T - len(r)) + list(r) for r in rows], dtype=torch.long,
                       device=device)
    lp = torch.tensor([T - len(r) for r in rows], dtype=torch.long, device=device)
    ok = torch.tensor([[False] * (T - len(r)) + [not q for q in (p or [False] * len(r))]
                       for r, p in zip(rows, pads)], dtype=torch.bool, device=device)
    return Rows(ids, lp, ok)


@dataclass
class Decoded:
    tokens: list[list[int]]       # per row, cut after its first EOS (unless EOS is ignored)


class FastEngine:
    """Per pipeline: the static caches and the compiled steps, built on demand and kept."""

    def __init__(self, pipe, compile: bool | None = None, graphs: bool | None = None):
        self.pipe = pipe
        self.device = pipe.device
        if compile is None:
            compile = os.environ.get(COMPILE_ENV, "1") not in ("0", "false", "no")
        self.compile = compile
        self.cuda = self.device.type == "cuda"
        if graphs is None:
            v = os.environ.get(GRAPHS_ENV, "auto").strip().lower()
            graphs = self.cuda if v in ("", "auto") else v not in ("0", "false", "no")
        #: prefills and projection as prepared callables per (batch, prompt bucket): compiled
        #: when `compile`, the prompt left-padded to prompt_bucket() either way
        self.graphs = graphs
        #: "compile" or "capture" (STEP_ENV, step_mode()): how the decode step is prepared
        self.step_mode = step_mode()
        #: whether anything goes through torch.compile (inductor): never on ZeroGPU, where the
        #: step is captured and the prefills and projection are plain CUDA graphs (on a CPU
        #: there, uncompiled)
        self.inductor = compile and not on_zerogpu()
        #: decode steps the EOS check trails by: on CUDA the host reads "every row ended" one
        #: step late (a copy that does not wait for the step just queued), so the device always
        #: has the next step; at most one step runs past the end (its time is the record's
        #: other_ms). 0 on a CPU, where nothing runs ahead of the host anyway.
        self.eos_lag = 1 if self.cuda else 0
        self.compile_s = 0.0          # seconds spent in prepare() (compile, capture, allocation)
        self.prepared = 0             # shapes prepare() made ready (steps, fills, projections)
        self.late = 0                 # prepare() calls that happened outside warm-up
        #: seconds spent preparing inside generations: late prepare()s and caches a generation
        #: had to allocate (batch.py puts the difference over a generation in its records'
        #: late_prepare_ms)
        self.late_s = 0.0
        self._caches = _lru()         # (role, B, L) -> StaticCache, least recently used first
        self._steps: dict = {}        # (role, B, L, what) -> compiled step / fill / projection
        self._binds: dict = {}        # ... -> the caches it holds (when more than its own)
        self._ready: set = set()
        self.cache_cap = cache_cap_bytes(self.device)  # bytes the static caches may hold
        self.cache_bytes = 0          # bytes they hold now
        self.cache_requests = 0       # caches a generation asked for ...
        self.cache_reuses = 0         # ... and found allocated (cache reuse ratio = these / those)
        self.cache_evictions = 0
        self._epoch = 0               # one per generation (and per prepared shape): what it
        self._used: dict = {}         # touched is never evicted under it
        self._born: dict = {}         # (role, B, L) -> the epoch that allocated it
        self._pool = None             # the captured graphs' memory pool (_graph_pool)
        #: bytes the preparations added to the device's reserved memory that are no static cache
        #: (_measured): the shared graph pool (captured fills, projections and steps, the
        #: anchor and the capture stream's cuBLAS workspace), torch.compile's CUDA-graph trees,
        #: the warm-up stream's workspace and cached blocks. Held for the engine's life: the
        #: pool is shared, and a graph evicted with its cache leaves its blocks in the pool
        #: (for later captures) or in its graph tree (_evict_for). 0 on a CPU (no graphs).
        self.graph_bytes = 0
        self._measuring = False       # a _measured() block is open (an inner one adds nothing)
        import weakref
        self._groups = weakref.WeakSet()  # live slot groups (group_bytes)
        self._streams = None          # (warm-up, capture) streams of every capture (streams())
        self.compile_cache = None     # compile_cache.setup()'s state once something compiled
        models = [pipe.receiver] + [sl.model for sl in pipe.sharers]
        for m in {id(m): m for m in models}.values():
            impl = getattr(m.config, "_attn_implementation", None) or "eager"
            if impl not in ("sdpa", "eager"):
                raise UserError(f"The fast engine supports the sdpa and eager attention"
                                f" implementations, not {impl}; use --attn_implementation sdpa"
                                " or --engine eager.")
        if self.inductor:
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
        if not self.compile:
            return "fast-nocompile"
        return "fast-capture" if self.step_mode == "capture" else "fast"

    def prompt_len(self, n: int) -> int:
        """The length a batch whose longest prompt has n positions is padded to."""
        return prompt_bucket(n) if self.graphs else n

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
        """Bytes of the (role, B, L) static cache: its keys and values (kv_nbytes) and its
        prepared callables' one shared input set (inputs())."""
        return self.kv_nbytes(role, B, L) + self.inputs_nbytes(role, B, L)

    def kv_nbytes(self, role: str, B: int, L: int) -> int:
        """Bytes of the keys and values of a (role, B, L) static cache: layers x B x kv heads
        x L x head_dim x (keys, values) x dtype bytes (a batch's cache and a slot group's)."""
        from ...models.projector import kv_shape
        layers, heads, hd = kv_shape(self.model(role).config)
        return layers * B * heads * L * hd * 2 * self.pipe.dtype.itemsize

    def inputs_nbytes(self, role: str, B: int, L: int) -> int:
        """Bytes of inputs()'s set for a (role, B, L) cache: the padding mask [B, L] (bool),
        left padding [B], the step's token [B, 1] and position (int64), and under graphs the
        fills' embeddings [B, L, H] in the run's dtype (emb_input: made by the first prepared
        fill; without graphs no fill is prepared)."""
        H = self.model(role).get_input_embeddings().weight.shape[1]
        emb = B * L * H * self.pipe.dtype.itemsize if self.graphs else 0
        return emb + B * L + (2 * B + 1) * 8

    def inputs(self, role: str, cache, B: int, L: int) -> dict:
        """The one set of input buffers every prepared callable of this cache reads (its fills,
        its captured step), made once with the cache and freed with it: on CUDA a captured
        graph reads its inputs from fixed addresses, and one set per cache (sized for its
        longest fill, L positions) replaces one per captured shape, as vLLM keeps one set per
        engine. A fill of q positions reads the first B x q x H elements of `emb`, viewed as
        [B, q, H] (contiguous). Per cache rather than per engine: a set sized for the largest
        shape a run may meet is not known before the run, and a graph cannot move to a new,
        larger buffer; a cache's own shapes are bounded by its L. Counted in cache_nbytes."""
        inp = getattr(cache, "_c2c_inputs", None)
        if inp is None:
            H = self.model(role).get_input_embeddings().weight.shape[1]
            dev = self.device
            inp = {"emb": None, "H": H, "L": L, "dtype": self.pipe.dtype,
                   "ok": torch.ones(B, L, dtype=torch.bool, device=dev),
                   "lp": torch.zeros(B, dtype=torch.long, device=dev),
                   "ids": torch.zeros(B, 1, dtype=torch.long, device=dev),
                   "c": torch.zeros((), dtype=torch.long, device=dev)}
            cache._c2c_inputs = inp
        return inp

    @staticmethod
    def emb_input(inp: dict, B: int, q: int) -> torch.Tensor:
        """A fill's embeddings input: the first B x q x H elements of the cache's shared buffer
        of B x L x H (made by the first fill that asks)."""
        if inp["emb"] is None:
            inp["emb"] = torch.zeros(B * inp["L"] * inp["H"], dtype=inp["dtype"],
                                     device=inp["ok"].device)
        return inp["emb"][:B * q * inp["H"]].view(B, q, inp["H"])

    def held_bytes(self) -> int:
        """What the cap counts as held: the static caches, the graph memory (graph_bytes) and
        the continuous-batching slot groups' caches (group_bytes)."""
        return self.cache_bytes + self.graph_bytes + self.group_bytes()

    def group_bytes(self) -> int:
        """Bytes of the live slot groups' caches (slots.SlotGroup: outside the LRU, never
        evicted; gone with their group)."""
        return sum(g.nbytes for g in self._groups)

    def graph_need(self, keys, sampling: bool = False) -> int:
        """The graph memory held once a plan's shapes (batch.shapes_of keys) are prepared:
        graph_bytes now, or budget.graph_bytes of the largest capture still to make when that
        is more (the captures share one pool: a new one reuses what earlier ones left there).
        Only graph_bytes where nothing is captured (a CPU, compile off): 0 there."""
        if not (self.cuda and self.compile):
            return self.graph_bytes
        from .. import budget
        est = 0
        for k in keys:
            if k[0] == "fill" and self.fill_key(*k[1:]) not in self._ready:
                role, B, L, q = k[1], k[2], k[3], k[4]
            elif k[0] == "step" and tuple(k[1:]) not in self._ready:
                role, B, L, q = k[1], k[2], k[3], 0  # its graph tree: the logits
            else:
                continue
            c = self.model(role).config
            est = max(est, budget.graph_bytes(
                c.to_dict(), B, q, L, self.pipe.dtype.itemsize,
                getattr(c, "_attn_implementation", None) or "eager", sampling))
        return max(self.graph_bytes, est)

    def _evict_for(self, need: int) -> None:
        """Free least recently used caches (and the compiled steps bound to them) until `need`
        more bytes fit under the cap with what is held (held_bytes: the caches and the graph
        memory); a cache the current generation took stays.

        Only the caches' bytes come back: graph_bytes is never lowered here. A captured fill,
        projection or step dropped with its cache leaves its blocks in the engine's one graph
        pool (_graph_pool), which later captures reuse but the allocator never returns while
        the pool lives. A torch.compile'd step (mode="reduce-overhead") dropped here keeps its
        CUDA-graph recordings: torch's cudagraph trees have one tree manager and one private
        pool per device and thread, whose manager keeps every function it recorded
        (torch/_inductor/cudagraph_trees.py, CUDAGraphTreeManager.ids_to_funcs, never pruned)
        until every compiled function of that device is gone or torch._dynamo.reset() (which
        would drop every compiled step) clears the trees. Freeing one step's recordings is not
        possible, so both stay counted as held."""
        for key in list(self._caches):
            if self.held_bytes() + need <= self.cache_cap:
                return
            if self._used.get(key) == self._epoch:
                continue
            self._caches.pop(key)
            self._used.pop(key, None)
            self._born.pop(key, None)
            self.cache_bytes -= self.cache_nbytes(*key)
            self.cache_evictions += 1
            for k in [k for k in self._steps if key in self._binds.get(k, (k[:3],))]:
                del self._steps[k]  # a step, fill or projection bound to the cache goes with it
                self._binds.pop(k, None)
                self._ready.discard(k)
            self._ready -= {k for k in self._ready if k[:3] == key}
        if self.held_bytes() + need > self.cache_cap:
            graphs = (f" with {self.graph_bytes / 2**20:,.0f} MB of graph memory"
                      if self.graph_bytes else "")
            warnings.warn(f"fast engine: the static caches one generation needs"
                          f" ({(self.cache_bytes + need) / 2**20:,.0f} MB){graphs} exceed the"
                          f" cache cap ({self.cache_cap / 2**20:,.0f} MB, {CACHE_CAP_ENV});"
                          " allocating anyway.")

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
            t0 = time.perf_counter()
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
            if use:  # allocated inside a generation's clock: preparation it paid for
                self.late_s += time.perf_counter() - t0
        self._caches.move_to_end(key)
        self._used[key] = self._epoch
        for layer in c.layers:
            layer.cumulative_length.zero_()
        return c

    def cache_stats(self) -> dict:
        """What the static caches hold (held_mb), the graph memory counted beside them under
        the cap (graph_mb, graph_bytes) and how often a generation found its cache allocated."""
        req = self.cache_requests
        return {"held_mb": round(self.cache_bytes / 2**20, 3),
                "graph_mb": round(self.graph_bytes / 2**20, 3),
                "slots_mb": round(self.group_bytes() / 2**20, 3),
                "cap_mb": round(self.cache_cap / 2**20, 3), "caches": len(self._caches),
                "requests": req, "reuses": self.cache_reuses, "evictions": self.cache_evictions,
                "reuse_ratio": round(self.cache_reuses / req, 4) if req else None}

    # --- prepared callables: the decode step, the prefills ("fills"), the projection ----------

    def _compiled(self, fn):
        if not self.inductor:
            return fn
        return torch.compile(fn, mode="reduce-overhead" if self.cuda else None, dynamic=False,
                             fullgraph=True)  # a graph break is an error, not a slow step

    def _run(self, fn, *args):
        """Call a prepared callable; on CUDA graphs, a new step of the graph trees first."""
        if self.cuda and self.inductor and self.step_mode == "compile":
            torch.compiler.cudagraph_mark_step_begin()
        return fn(*args)

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

        return step if self.step_mode == "capture" else self._compiled(step)

    def _make_fill(self, role: str, cache, q: int, L: int, s: int = 0, whole: bool = False):
        """Run emb [B, q, H] at cache positions [s, s + q) to fill the cache (no LM head; the
        cache's write position is s: the sections before it are filled). A query sees earlier
        real positions (and itself: a padding query is never fully masked); positions count
        from the row's first real token, inner padding included (as the reference numbers
        them). The fill attends over the cache's first s + q positions only (cache_view):
        nothing after them is visible to any of its queries, so a prefill's cost does not grow
        with the room the cache keeps for new tokens (--max_new_tokens). `whole`: attend over
        all L positions instead (the same result; scripts/bench_fill_view.py times both)."""
        m = self.model(role)
        body = decoder(m)
        mask_for = self._mask_for
        V = L if whole else s + q
        view = cache if whole else cache_view(cache, V)

        def fill(emb: torch.Tensor, ok: torch.Tensor, lp: torch.Tensor) -> None:
            i = torch.arange(s, s + q, device=emb.device)[:, None]                 # [q, 1]
            j = torch.arange(V, device=emb.device)[None]                           # [1, V]
            keep = (j <= i)[None] & (ok[:, None, :V] | (j == i)[None])            # [B, q, V]
            pos = (i.T - lp[:, None]).clamp(min=0)                                  # [B, q]
            body(inputs_embeds=emb, attention_mask=mask_for(m, keep, i - j), position_ids=pos,
                 past_key_values=view, use_cache=True)

        return fill

    def _make_proj(self, r_cache, s_cache, n: int):
        """The stacked projection of positions [0, n) of one sharer's cache into the
        receiver's, every layer pair in one pass (stacked.py), as one callable of the mask."""
        st = stacked_for(self.pipe.fuser)

        def proj(mask: torch.Tensor) -> None:
            st.project_caches(r_cache.layers, s_cache.layers, n, mask)

        return proj

    def _ready_callable(self, fn, static: tuple, what: str, reset=None):
        """A fill or the projection as it will run in every generation of its shape: on CUDA one
        CUDA graph of `fn` as it is (captured in warm-up in about the time of one run: no
        inductor compile, which is what made the first result wait), on a CPU torch.compile'd
        (inductor); `fn` itself with compile off, and on a CPU on ZeroGPU (no inductor there).
        `static`: example inputs (on CUDA, the graph's input buffers); `reset()` before each
        warm-up run (a fill writes from its cache's position 0). A capture that fails leaves `fn` op by op, with a warning."""
        if not self.compile:
            return fn
        if not self.cuda:
            return torch.compile(fn, dynamic=False, fullgraph=True) if self.inductor else fn
        return self._captured(fn, static, what, self._graph_pool(), reset)

    def streams(self) -> tuple:
        """The engine's (warm-up, capture) streams, made once on its device: every capture
        warms up on the first and is captured on the second (graphs.capture), so the engine
        holds two cuBLAS workspaces, not one per capture; the capture stream's lives in the
        graph pool (_graph_pool)."""
        if self._streams is None:
            with on_device(self.device):
                self._streams = (torch.cuda.Stream(self.device), torch.cuda.Stream(self.device))
        return self._streams

    def _captured(self, fn, static: tuple, what: str, pool, reset=None):
        """capture() with a fallback: a capture that fails warns and leaves `fn` op by op."""
        try:
            warm, cap = self.streams()
            return capture(fn, static, self.device, pool, reset, cap, warm)
        except Exception as e:  # noqa: BLE001 - the shape still runs, only slower
            torch.cuda.synchronize(self.device)
            warnings.warn(f"fast engine: could not capture the {what} in a CUDA graph"
                          f" ({type(e).__name__}: {str(e)[:200]}); it runs op by op.")
            return fn

    def _graph_pool(self):
        """One memory pool for every captured graph (fills, projections, captured steps: they
        run one at a time, and a step's output is cloned before anything else runs), kept for
        the engine's life by an anchor graph captured into it first. That first capture also
        allocates cuBLAS's workspace for the engine's capture stream inside this pool (nothing
        runs on that stream outside a capture), so evicting a cache (which destroys the graphs
        bound to it) never frees a workspace that graphs still alive point at."""
        if self._pool is None:
            # the pool and the anchor on the models' device; its bytes in graph_bytes
            with on_device(self.device), self._measured():
                pool = torch.cuda.graph_pool_handle()
                a = torch.ones(64, 64, dtype=self.pipe.dtype, device=self.device)
                cur = torch.cuda.current_stream(self.device)
                side, cap = self.streams()
                side.wait_stream(cur)
                with torch.cuda.stream(side):  # the cuBLAS handle exists before the capture
                    a @ a
                cur.wait_stream(side)
                torch.cuda.synchronize(self.device)
                anchor = torch.cuda.CUDAGraph()
                with torch.cuda.graph(anchor, pool=pool, stream=cap):
                    b = a @ a
            self._anchor = (anchor, a, b)
            self._pool = pool
        return self._pool

    @staticmethod
    def fill_key(role: str, B: int, L: int, q: int, s: int = 0) -> tuple:
        return (role, B, L, ("fill", q, s))

    @staticmethod
    def proj_key(B: int, L: int, n: int, ns: int | None = None) -> tuple:
        """The projection of positions [0, n) from sharer 1's cache of its first ns positions
        (ns: where the sharer stops, the plan's last section; n by default)."""
        return ("receiver", B, L, ("proj", n, sharer_len(n if ns is None else ns)))

    def _reserved(self) -> int:
        """The bytes the device's caching allocator reserves now (torch.cuda.memory_reserved:
        graph pools included, which max_memory_allocated misses); 0 on a CPU, where nothing is
        captured. Tests replace it to stand for a GPU's growth."""
        if not self.cuda:
            return 0
        return int(torch.cuda.memory_reserved(self.device))

    @contextmanager
    def _measured(self):
        """Add to graph_bytes what the block adds to the device's reserved memory beyond what
        it adds to the static caches (cache_bytes, which counts them): the graph pool's growth,
        compiled steps' graph trees, cuBLAS workspaces, and blocks the warm-up runs leave cached
        on the warm-up stream. The caches' net growth is subtracted: a cache evicted in the
        block leaves its blocks reserved, where the next cache is allocated (so a cache
        that does not fit them counts the difference as graph memory: more held, never
        less). Never negative; a block inside another adds nothing of its own (the outer one
        counts it once)."""
        if self._measuring:
            yield
            return
        self._measuring = True
        try:
            r0, c0 = self._reserved(), self.cache_bytes
            yield
        finally:
            self._measuring = False
        self.graph_bytes += max(self._reserved() - r0 - max(self.cache_bytes - c0, 0), 0)

    def _prepared(self, key: tuple, warm) -> None:
        """Allocate, compile and (on CUDA) capture the callable `key` by running `warm()`, then
        reset the caches it wrote; the seconds go to compile_s."""
        if key in self._ready:
            return
        t0 = time.perf_counter()
        if self.compile_cache is not None:
            from ..compile_cache import counts
            hits0, misses0 = counts()
        with torch.inference_mode(), on_device(self.device), self._measured():
            warm()
            if self.cuda:
                torch.cuda.synchronize(self.device)
        self._ready.add(key)
        self.prepared += 1
        self.compile_s += time.perf_counter() - t0
        if self.compile_cache is not None:  # from inductor's FX graph cache, or compiled now
            hits, misses = counts()
            self.compile_cache["hits"] += hits - hits0
            self.compile_cache["misses"] += misses - misses0

    def prepare(self, role: str, B: int, L: int, greedy: bool) -> None:
        """Allocate the cache and compile (and on CUDA capture) the step for this shape: a dummy
        prefill of one token, three steps, then the cache is reset. Timed into compile_s."""
        key = (role, B, L, greedy)

        def warm():
            cache = self.cache(role, B, L, use=False)
            inp = self.inputs(role, cache, B, L)
            ids, lp, ok = inp["ids"], inp["lp"], inp["ok"]
            if key not in self._steps:
                step = self._make_step(role, cache, L, greedy)
                if self.step_mode == "capture" and self.cuda and self.compile:
                    static = (ids, inp["c"], lp, ok)
                    _expect(static, [(B, 1), (), (B,), (B, L)], f"the {role} step")
                    reset = lambda: self.cache(role, B, L, use=False)  # noqa: E731
                    step = self._captured(step, static, f"{role} step", self._graph_pool(),
                                          reset)
                self._steps[key] = step
            for k in range(0, 4):
                self._run(self._steps[key], ids, torch.tensor(k, device=self.device), lp,
                          ok).clone()
            self.cache(role, B, L, use=False)

        self._prepared(key, warm)

    def prepare_fill(self, role: str, B: int, L: int, q: int, s: int = 0) -> None:
        """The prepared fill of q prompt positions from position s into the (role, B, L) cache
        (graphs only)."""
        key = self.fill_key(role, B, L, q, s)

        def warm():
            cache = self.cache(role, B, L, use=False)
            inp = self.inputs(role, cache, B, L)
            static = (self.emb_input(inp, B, q), inp["ok"], inp["lp"])
            _expect(static, [(B, q, inp["H"]), (B, L), (B,)], f"the {role} prefill")

            def reset():  # the cache as the sections before this one leave it: s written
                c = self.cache(role, B, L, use=False)
                if s:
                    for layer in c.layers:
                        layer.cumulative_length.fill_(s)

            if key not in self._steps:
                self._steps[key] = self._ready_callable(self._make_fill(role, cache, q, L, s),
                                                        static, f"{role} prefill", reset)
            for _ in range(3):  # compile (CPU) / replay the captured graph (CUDA)
                reset()
                self._run(self._steps[key], *static)
            reset()

        self._prepared(key, warm)

    def prepare_proj(self, B: int, L: int, n: int, ns: int | None = None) -> None:
        """The prepared stacked projection of n positions from sharer 1's prompt cache (of its
        first ns positions) into the (receiver, B, L) cache (graphs only, one sharer with
        stacked projectors)."""
        key = self.proj_key(B, L, n, ns)
        s_key = (sharer_role(1), B, key[3][2])

        def warm():
            r_cache = self.cache("receiver", B, L, use=False)
            s_cache = self.cache(*s_key, use=False)
            mask = torch.ones(B, n, dtype=torch.bool, device=self.device)
            if key not in self._steps:
                self._steps[key] = self._ready_callable(self._make_proj(r_cache, s_cache, n),
                                                        (mask,), "projection")
                self._binds[key] = (("receiver", B, L), s_key)
            for _ in range(3):
                self._run(self._steps[key], mask)
            self.cache("receiver", B, L, use=False)

        self._prepared(key, warm)

    def verb(self, kind: str) -> str:
        """What preparing a "step" or a "graph" (fill, projection) does here: "compiling"
        (torch.compile), "capturing" (one CUDA graph, no compile) or "preparing" (allocating
        only: compile off, or a step to capture on a CPU)."""
        if not self.compile:
            return "preparing"
        capture = kind != "step" or self.step_mode == "capture"
        if capture:
            inductor = getattr(self, "inductor", True)  # a CPU on ZeroGPU: uncompiled
            return "capturing" if self.cuda else (
                "compiling" if kind != "step" and inductor else "preparing")
        return "compiling"

    def _late(self, what: str, key: tuple, prepare) -> None:
        """A shape this generation needs. Ready: its caches count as in use by this generation
        (a shape prepared next never evicts them). Not ready (warm-up did not cover it, e.g. a
        longer t2t note than planned, or the cap freed it): prepare it now, outside any span,
        and say so; its cost lands in this generation's `other_ms`, and its seconds in
        `late_s` (the records' late_prepare_ms)."""
        if key in self._ready:
            for ck in self._binds.get(key, (key[:3],)):
                if ck in self._caches:
                    self._used[ck] = self._epoch
                    self._caches.move_to_end(ck)
            return
        self.late += 1
        how = self.verb("step" if isinstance(key[3], bool) else "graph")
        if how != "preparing":
            warnings.warn(f"fast engine: {how} the {what} for batch {key[1]}, bucket"
                          f" {key[2]} outside warm-up; this generation's e2e includes it.")
        t0 = time.perf_counter()
        prepare()
        self.late_s += time.perf_counter() - t0

    def ensure(self, role: str, B: int, L: int, greedy: bool) -> None:
        self._late(f"{role} step", (role, B, L, greedy), lambda: self.prepare(role, B, L, greedy))

    def ensure_fill(self, role: str, B: int, L: int, q: int, s: int = 0) -> None:
        if self.graphs and q > 0:
            self._late(f"{role} prefill", self.fill_key(role, B, L, q, s),
                       lambda: self.prepare_fill(role, B, L, q, s))

    def ensure_proj(self, B: int, L: int, n: int, ns: int | None = None) -> None:
        if self.graphs and n > 0 and self._stacked_one():
            self._late("projection", self.proj_key(B, L, n, ns),
                       lambda: self.prepare_proj(B, L, n, ns))

    def _stacked_one(self) -> bool:
        """One sharer whose projectors stack: the projection is one prepared pass."""
        return (self.pipe.fuser is not None and len(self.pipe.sharers) == 1
                and stacked_for(self.pipe.fuser) is not None)

    # --- generation ------------------------------------------------------------------------

    def fill(self, role: str, cache, emb: torch.Tensor, rows: Rows, s: int = 0) -> None:
        """Fill cache positions [s, s + q) with emb [B, q, H] (a section of the prompt before
        its last token; the cache holds [0, s)): the prepared fill under graphs, else the same
        function run eagerly."""
        B, q = emb.shape[:2]
        if q == 0:
            return
        L = cache.layers[0].max_cache_len
        fn = self._steps.get(self.fill_key(role, B, L, q, s)) if self.graphs else None
        if fn is None:
            fn = self._make_fill(role, cache, q, L, s)
        self._run(fn, emb, rows.ok_to(L), rows.lp)

    def first(self, role: str, cache, rows: Rows, greedy: bool):
        """The prompt's last token through the decode step (at position T-1): the first new
        token [B, 1] when greedy, else the logits [B, V] to sample it from."""
        B, T = rows.ids.shape
        L = cache.layers[0].max_cache_len
        step = self._steps[(role, B, L, greedy)]
        # a fresh [B, 1] with the strides warm-up used (a view of the last column, even
        # "contiguous" at B = 1, keeps stride T, and the compiled step would compile again,
        # inside this span); the position is made on the device: a host-to-device copy would
        # wait for the fills and the projection before this launch
        last = rows.ids.new_empty((B, 1)).copy_(rows.ids[:, -1:])
        out = self._run(step, last, self._scalar(T - 1), rows.lp, rows.ok_to(L))
        return out.clone()

    def _scalar(self, v: int) -> torch.Tensor:
        """A 0-d long tensor on the device, written by a kernel (no host-to-device copy, which
        waits for the device's queue)."""
        return torch.full((), v, dtype=torch.long, device=self.device)

    def decode(self, role: str, cache, L: int, first: torch.Tensor, rows: Rows,
               start: int, n_max: int, gen, eos: set[int], ignore_eos: bool, gens,
               timer: Timer, stage: str, on_first=None) -> Decoded:
        """The first token from first() (a token when greedy, else logits to sample), then one
        step per further token; the first new token is written at cache position `start`.
        Without --ignore_eos the host reads "every row ended" eos_lag steps late (see
        __init__); the steps past the end are timed in `stage`, not in any row's tokens."""
        B = first.shape[0]
        greedy = not gen.do_sample
        step = self._steps[(role, B, L, greedy)]
        dev = self.device
        pad_id = self.pad_id(role)
        ok, lp = rows.ok_to(L), rows.lp
        out = torch.empty(B, n_max, dtype=torch.long, device=dev)
        tok = first if greedy else sample(first, gen, gens)                      # [B, 1]
        out[:, :1] = tok
        eos_t = torch.tensor(sorted(eos) or [-1], dtype=torch.long, device=dev)
        done = torch.isin(tok[:, 0], eos_t) if not ignore_eos else None
        first_host = tok[:, 0].tolist()  # the first token is on the host: TTFT is honest
        del first_host
        if on_first is not None:
            on_first()
        c = self._scalar(start)
        n = 1
        ended = Ended(done, self.eos_lag, self.cuda)
        while n < n_max:
            if ended.all():
                break
            cancel.check()  # Stop / a client gone: end within one decode step
            with timer.span(stage):
                r = self._run(step, tok, c, lp, ok)
                tok = (r if greedy else sample(r, gen, gens)).clone()
                if done is not None:
                    tok = tok.masked_fill(done[:, None], pad_id)
                    done = done | torch.isin(tok[:, 0], eos_t)
                    ended.update(done)
                out[:, n:n + 1] = tok
                c = c + 1
            n += 1
        rows = out[:, :n].tolist()
        if not ignore_eos:
            rows = [_cut_at_eos(r, eos) for r in rows]
        return Decoded(rows)

    def pad_id(self, role: str = "receiver") -> int:
        """The padding id of the model that reads the rows: "receiver", "sharer" (sharer 1) or
        "sharerK"."""
        k = 0 if role == "receiver" else int(role[6:] or 1)
        tok = self.pipe.tokenizer if k == 0 else self.pipe.sharers[k - 1].tokenizer
        for v in (tok.pad_token_id, tok.eos_token_id):
            if isinstance(v, int):
                return v
        return 0

    def c2c_prefill(self, rows: Rows, feeds: list, L: int, with_sharer: bool, timer: Timer,
                    greedy: bool, cuts: list[int] | None = None, last: bool = True):
        """Sectioned prefill of a left-padded batch rows.ids [B, T] in the reference's order
        (fusion.fused_prefill): the receiver fills the sections before each cut in turn, and
        at each cut every sharer has filled its positions up to the last cut (its caches do not
        depend on the receiver's) and that section's projection is written before the next
        section runs; then the last token through the decode step. `cuts`: the columns where a
        projected section of some row ends (batch.cut_columns; default: T-1, the same-tokenizer
        split); without the sharer: the receiver alone, one fill (the honest baseline).
        `feeds`: per sharer (k, its Rows, per cut its projection mask [B, cut] bool, or None
        for every position before it). Returns the receiver cache, first() of the last token
        and the projector calls per sharer.

        `last` False (continuous batching, slots.py): the cache is filled up to the last token
        and nothing is prepared (no compile or capture while a server serves: a shape without a
        prepared callable runs op by op); the last token goes through the slots' shared step,
        and first() is None."""
        B, T = rows.ids.shape
        n = T - 1
        if not (with_sharer and feeds and n > 0):
            cuts = []
        elif cuts is None:
            cuts = [n]
        segs, a = [], 0
        for c in cuts:
            segs.append((a, c, True))
            a = c
        if a < n:
            segs.append((a, n, False))
        ns = cuts[-1] if cuts else 0  # the sharers read [0, ns)
        r_model = self.pipe.receiver
        for a, c, _ in (segs if last else []):  # outside every span: a late compile is `other`
            self.ensure_fill("receiver", B, L, c - a, a)
        for k, _, _ in (feeds if cuts and last else []):
            self.ensure_fill(sharer_role(k), B, sharer_len(ns), ns)
        if cuts and len(feeds) == 1 and last:
            for c in cuts:
                self.ensure_proj(B, L, c, ns)
        with timer.span("base_embedding"):
            r_emb = r_model.get_input_embeddings()(rows.ids[:, :n])
        r_cache = self.cache("receiver", B, L)
        calls: dict[int, int] = {}
        s_caches: list = []
        for a, c, projected in segs:
            cancel.check()
            with timer.span("base_prefill"):
                self.fill("receiver", r_cache, r_emb[:, a:c], rows, a)
            if not projected:
                continue
            if not s_caches:
                for k, srows, _ in feeds:
                    cancel.check()
                    model = self.pipe.sharers[k - 1].model
                    role = sharer_role(k)
                    with timer.span("teacher_embedding", who=k):
                        s_emb = model.get_input_embeddings()(srows.ids[:, :ns])
                    s_cache = self.cache(role, B, sharer_len(ns))
                    with timer.span("teacher_prefill", who=k):
                        self.fill(role, s_cache, s_emb, srows)
                    s_caches.append(s_cache)
            cancel.check()
            j = cuts.index(c)
            masks = [m[j] if m else section_mask(None, a, c, self.device) for _, _, m in feeds]
            for k, v in self.project(r_cache, s_caches, c, masks, timer, ns).items():
                calls[k] = calls.get(k, 0) + v
        del s_caches
        if not last:
            return r_cache, None, calls
        with timer.span("base_prefill"):
            first = self.first("receiver", r_cache, rows, greedy)
        return r_cache, first, calls

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

    def project(self, r_cache, s_caches: list, n: int, masks: list, timer: Timer,
                ns: int | None = None) -> dict[int, int]:
        """All sharers' projections. One sharer reading the receiver's positions with projectors
        of one size: one stacked pass over every layer pair (stacked.py; the prepared callable
        under graphs); otherwise the eager engine's projection (fusion.project_sharers: parallel
        or sequential, first pair wins, masks) over the static cache's first n positions."""
        fuser = self.pipe.fuser
        st = stacked_for(fuser) if len(s_caches) == 1 else None
        if st is not None:
            B, L = r_cache.layers[0].keys.shape[0], r_cache.layers[0].max_cache_len
            fn = self._steps.get(self.proj_key(B, L, n, ns)) if self.graphs else None
            mask = masks[0]
            if mask is not None and mask.dim() == 1:
                mask = mask.expand(B, n)
            with timer.span("projection", who=1):
                if fn is None:
                    return {1: st.project_caches(r_cache.layers, s_caches[0].layers, n, mask)}
                if mask is None:
                    mask = torch.ones(B, n, dtype=torch.bool, device=self.device)
                self._run(fn, mask)
                return {1: st.P}
        return project_sharers(fuser, r_cache, s_caches, n, timer, self.pipe.fusion, masks,
                               static=True)

    def plain_prefill(self, role: str, rows: Rows, L: int, timer: Timer, emb_stage: str,
                      prefill_stage: str, greedy: bool, who: int | None = None):
        """One model alone over the whole prompt (sharer and t2t modes): fill all but the last
        token, then the last through the decode step. Returns the cache and first()."""
        m = self.model(role)
        B, T = rows.ids.shape
        self.ensure_fill(role, B, L, T - 1)
        with timer.span(emb_stage, who=who):
            emb = m.get_input_embeddings()(rows.ids[:, :T - 1])
        cache = self.cache(role, B, L)
        with timer.span(prefill_stage, who=who):
            self.fill(role, cache, emb, rows)
            first = self.first(role, cache, rows, greedy)
        return cache, first


def _expect(static: tuple, shapes: list, what: str) -> None:
    """Assert once, when a callable is prepared, that its input buffers have the shapes its key
    names (a replay then checks each argument against these buffers: graphs.capture)."""
    got = [tuple(t.shape) for t in static]
    if got != [tuple(x) for x in shapes]:
        raise AssertionError(f"{what} would be prepared for inputs {got}, its shape says {shapes}")


def cache_view(cache, V: int):
    """The first V positions of a static cache as a cache of its own: every layer's keys and
    values are views of the cache's (what a fill writes through it lands in `cache`), and its
    write position is the cache's own tensor (advanced by the fill as the cache's would be).
    Attention through it reads V positions, not max_cache_len. Made once per V and kept on the
    cache (freed with it); the cache itself when V covers it."""
    if V >= cache.layers[0].max_cache_len:
        return cache
    views = cache.__dict__.setdefault("_c2c_views", {})
    v = views.get(V)
    if v is None:
        import copy
        v = copy.copy(cache)
        v.__dict__.pop("_c2c_views", None)
        v.__dict__.pop("_c2c_inputs", None)
        v.layers = []
        for layer in cache.layers:
            lv = copy.copy(layer)  # shares cumulative_length (the same tensor)
            lv.keys, lv.values = layer.keys[:, :, :V], layer.values[:, :, :V]
            lv.max_cache_len = V
            v.layers.append(lv)
        views[V] = v
    return v


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
