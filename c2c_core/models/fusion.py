"""The C2C prefill (sections, projection into the receiver cache) and the decode step.

Batch 1. Shapes: ids [1, T]; embeds [1, T, H]; cache layer keys/values [1, kv_heads, T, head_dim].
Every function takes the Timer so each stage is one span; nothing here reads the clock itself.
"""

from __future__ import annotations

import functools

import torch
from transformers import DynamicCache, LogitsProcessorList
from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)

from ..measure import cancel
from .projector import Fuser
from ..measure.timing import Timer


def decoder(model):
    """The transformer body without the LM head (skip logits we would throw away)."""
    return getattr(model, model.base_model_prefix)


def new_cache(model) -> DynamicCache:
    return DynamicCache(config=model.config)


def embed(model, ids: torch.Tensor, timer: Timer, stage: str, who: int | None = None) -> torch.Tensor:
    with timer.span(stage, who=who):
        return model.get_input_embeddings()(ids)  # [1, T, H]


def prefill_cache(model, embeds: torch.Tensor, cache: DynamicCache,
                  attention_mask: torch.Tensor | None = None) -> None:
    """Run the layers over a section only to fill the cache (no LM head)."""
    decoder(model)(inputs_embeds=embeds, past_key_values=cache, use_cache=True,
                   attention_mask=attention_mask)


def last_logits(model, embeds: torch.Tensor, cache: DynamicCache,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    out = model(inputs_embeds=embeds, past_key_values=cache, use_cache=True, logits_to_keep=1,
                attention_mask=attention_mask)
    return out.logits[:, -1, :]  # [1, V]


def project(fuser: Fuser, r_cache: DynamicCache, s_cache: DynamicCache, n: int,
            timer: Timer) -> int:
    """One sharer: for every mapped receiver layer, k', v' = projector((k_s, v_s), (k_r, v_r))
    over the instruction positions, written over the receiver's cache in place. Returns the
    call count."""
    return project_sharers(fuser, r_cache, [s_cache], n, timer)[1]


def mask_bounds(mask: torch.Tensor | None, n: int) -> tuple[int, int]:
    """[lo, hi): the positions < n a projection mask ([n] or [B, n]) covers in any row (all of
    [0, n) for None)."""
    if mask is None:
        return 0, n
    idx = torch.nonzero(mask[..., :n].reshape(-1, min(n, mask.shape[-1])).any(0)).flatten()
    if idx.numel() == 0:
        return 0, 0
    return int(idx[0]), int(idx[-1]) + 1


def project_sharers(fuser: Fuser, r_cache: DynamicCache, s_caches: list[DynamicCache], n: int,
                    timer: Timer, fusion: str = "parallel",
                    masks: list[torch.Tensor | None] | None = None,
                    static: bool = False) -> dict[int, int]:
    """Project every sharer (1, 2, ... as in the fuser's map) into the receiver's cache, as the
    reference does:
    - a receiver layer with several (sharer layer, projector) pairs runs them all against the
      same receiver slice and keeps the first result;
    - "sequential": sharer k projects from the cache as sharers 1..k-1 left it;
    - "parallel" (two or more sharers): every sharer projects from the clean receiver cache and
      the cache becomes base + sum of the sharers' (k' - k_r) residuals. With one sharer both
      modes write k' directly. The final add is timed in the last sharer's projection span;
    - `masks[k-1]` (bool [n] or [B, n], from the plan): the receiver positions sharer k
      projects (the message of a sectioned plan); None: every position of [0, n). Positions
      outside it keep the receiver's own keys and values;
    - `static`: the receiver cache is a static one (the fast engine's), longer than n; the
      instruction positions are its first n.
    Spans are tagged with the sharer number. Returns projector calls per sharer."""
    calls = {k: 0 for k in range(1, len(s_caches) + 1)}
    parallel = fusion == "parallel" and len(s_caches) > 1
    deltas: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for k, s_cache in enumerate(s_caches, start=1):
        mask = masks[k - 1] if masks else None
        lo0, hi = mask_bounds(mask, n)
        sels: dict[int, torch.Tensor | None] = {}  # per window start: read once, not per layer
        for t, pairs in fuser.sharer_maps[k].items():
            rl = r_cache.layers[t]
            # = n, or the last window of it in a sliding-window layer of a dynamic cache
            m = n if static else rl.keys.shape[2]
            w0 = n - m
            lo = max(lo0, w0)
            if hi <= lo:
                continue
            with timer.span("projection", who=k):
                rk, rv = rl.keys[:, :, lo - w0:hi - w0], rl.values[:, :, lo - w0:hi - w0]
                outs = [fuser.projectors[i]((s_cache.layers[s].keys[:, :, lo:hi],
                                             s_cache.layers[s].values[:, :, lo:hi]), (rk, rv))
                        for s, i in pairs]
                nk, nv = outs[0]
                if mask is not None and lo not in sels:
                    part = mask[..., lo:hi]
                    sels[lo] = None if bool(part.all()) else part.reshape(-1, 1, hi - lo, 1)
                sel = sels.get(lo)
                if sel is not None:
                    nk, nv = torch.where(sel, nk, rk), torch.where(sel, nv, rv)
                if parallel:
                    dk = torch.zeros_like(rl.keys[:, :, :m])
                    dv = torch.zeros_like(rl.values[:, :, :m])
                    dk[:, :, lo - w0:hi - w0] = nk - rk
                    dv[:, :, lo - w0:hi - w0] = nv - rv
                    if t in deltas:
                        dk, dv = deltas[t][0] + dk, deltas[t][1] + dv
                    deltas[t] = (dk, dv)
                else:
                    rk.copy_(nk)
                    rv.copy_(nv)
            calls[k] += len(pairs)
    if deltas:
        with timer.span("projection", who=len(s_caches)):
            for t, (dk, dv) in deltas.items():
                rl = r_cache.layers[t]
                m = n if static else rl.keys.shape[2]
                rl.keys[:, :, :m].add_(dk)
                rl.values[:, :, :m].add_(dv)
    return calls


def decode_step(model, token: torch.Tensor, cache: DynamicCache,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """One receiver forward for one new token [1, 1] -> next-token logits [1, V].
    `attention_mask` [1, cache + 1] only when the prompt holds padding (a sectioned plan)."""
    out = model(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1,
                attention_mask=attention_mask)
    return out.logits[:, -1, :]


@functools.lru_cache(maxsize=16)
def _warpers(temperature: float, top_p: float, top_k: int) -> LogitsProcessorList:
    """transformers' own temperature, top-k and top-p warpers, in generate()'s order."""
    out = LogitsProcessorList([TemperatureLogitsWarper(max(float(temperature), 1e-5))])
    if top_k and top_k > 0:
        out.append(TopKLogitsWarper(int(top_k)))
    if 0.0 < top_p < 1.0:
        out.append(TopPLogitsWarper(float(top_p)))
    return out


def sample(logits: torch.Tensor, gen, generators: list | None) -> torch.Tensor:
    """Next tokens [B, 1] from logits [B, V], both engines alike and without reading anything
    back to the host: argmax (greedy), or the warped distribution p sampled by the exponential
    trick argmax(p / E), E ~ Exp(1) drawn from row b's own seeded generator, so a row's tokens
    depend on its seed only (never on its batch mates or the engine)."""
    if not gen.do_sample:
        return logits.argmax(-1, keepdim=True)
    x = _warpers(gen.temperature, gen.top_p, gen.top_k)(None, logits.float())
    p = torch.softmax(x, -1)
    e = torch.stack([torch.empty(p.shape[-1], dtype=p.dtype, device=p.device)
                     .exponential_(1.0, generator=g) for g in generators])
    return (p / e).argmax(-1, keepdim=True)


def generators(device, seeds: list[int | None]) -> list | None:
    """One sampling generator per row (None: greedy)."""
    if not seeds or seeds[0] is None:
        return None
    return [torch.Generator(device=device).manual_seed(s) for s in seeds]


def c2c_prefill(receiver, sharer, fuser: Fuser | None, ids: torch.Tensor,
                timer: Timer) -> tuple[DynamicCache, torch.Tensor, int]:
    """Sectioned prefill with one sharer. `sharer`/`fuser` None = the receiver alone on the
    same path. Returns the receiver cache (fused), the last-token logits [1, V] and the
    projector calls."""
    sharers = [(sharer, ids)] if sharer is not None and fuser is not None else []
    cache, logits, calls = fused_prefill(receiver, sharers, fuser, ids, timer)
    return cache, logits, sum(calls.values())


def fused_prefill(receiver, sharers: list[tuple], fuser: Fuser | None, ids: torch.Tensor,
                  timer: Timer, fusion: str = "parallel", keep: torch.Tensor | None = None,
                  segments: list[tuple[int, int, bool]] | None = None,
                  ) -> tuple[DynamicCache, torch.Tensor, dict[int, int]]:
    """Sectioned prefill with any number of sharers, each given as (model, its ids [1, T]) or
    (model, ids, its keep mask [1, T] or None, its projection mask [tail] bool or None): the
    receiver's ids, or a plan's aligned ids for a sharer with its own tokenizer (same length).
    `keep` [1, T] (1 real, 0 padding) masks the receiver's padding out of attention; positions
    count the padding, as the reference numbers them.

    In the reference's order (RosettaModel.forward): `segments` (plan.Plan.segments(); default:
    all tokens but the last, projected) are prefilled by the receiver one after another, each
    attending to the cache as fused so far; after a segment marked projected, every sharer
    prefills its positions up to that segment's end (its own cache, continued) and the
    segment's projection is written into the receiver's cache before the next segment runs;
    then the receiver reads the last token. Same-tokenizer plans have one segment.

    Returns the receiver cache, the last-token logits [1, V] and projector calls per sharer."""
    n = ids.shape[1] - 1
    segs = segments if segments is not None else ([(0, n, True)] if n > 0 else [])
    r_emb = embed(receiver, ids, timer, "base_embedding")
    r_cache = new_cache(receiver)
    calls: dict[int, int] = {k: 0 for k in range(1, len(sharers) + 1)} if fuser else {}
    # full-length layers: a sliding-window sharer keeps every position to project (its own
    # attention still uses its window: the mask comes from its config)
    s_caches = [DynamicCache() for _ in sharers]
    s_done = [0] * len(sharers)
    for s, e, projected in segs:
        cancel.check()
        if e > s:
            with timer.span("base_prefill"):
                prefill_cache(receiver, r_emb[:, s:e], r_cache,
                              None if keep is None else keep[:, :e])
        if not (projected and sharers and fuser is not None):
            continue
        masks = []
        for k, feed in enumerate(sharers, start=1):
            model, s_ids = feed[0], feed[1]
            s_keep = feed[2] if len(feed) > 2 else None
            mask = feed[3] if len(feed) > 3 else None
            masks.append(section_mask(mask, s, e, ids.device))
            if s_done[k - 1] < e:
                cancel.check()
                a = s_done[k - 1]
                s_emb = embed(model, s_ids[:, a:e], timer, "teacher_embedding", who=k)
                with timer.span("teacher_prefill", who=k):
                    prefill_cache(model, s_emb, s_caches[k - 1],
                                  None if s_keep is None else s_keep[:, :e])
                s_done[k - 1] = e
        cancel.check()
        for k, c in project_sharers(fuser, r_cache, s_caches, e, timer, fusion, masks).items():
            calls[k] = calls.get(k, 0) + c
    del s_caches
    cancel.check()
    with timer.span("base_prefill"):
        logits = last_logits(receiver, r_emb[:, n:], r_cache, keep)
    return r_cache, logits, calls


def section_mask(mask: torch.Tensor | None, s: int, e: int, device) -> torch.Tensor | None:
    """A projection mask over [0, e) that covers only the section [s, e): `mask` ([tail] or
    [B, tail] bool, None for every position) cut to it. None when that is all of [0, e)."""
    if mask is None:
        if s == 0:
            return None
        out = torch.zeros(e, dtype=torch.bool, device=device)
        out[s:] = True
        return out
    if s == 0 and mask.shape[-1] == e:
        return mask
    out = torch.zeros(mask.shape[:-1] + (e,), dtype=torch.bool, device=mask.device)
    w = min(e, mask.shape[-1])
    if w > s:
        out[..., s:w] = mask[..., s:w]
    return out


def plain_prefill(model, ids: torch.Tensor, timer: Timer, emb_stage: str,
                  prefill_stage: str, who: int | None = None) -> tuple[DynamicCache, torch.Tensor]:
    """One-section prefill of a single model (sharer alone, T2T stages); `who` tags the spans
    with a sharer number."""
    emb = embed(model, ids, timer, emb_stage, who)
    cache = new_cache(model)
    with timer.span(prefill_stage, who=who):
        logits = last_logits(model, emb, cache)
    return cache, logits
