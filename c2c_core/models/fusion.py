"""The C2C prefill (sections, projection into the receiver cache) and the decode step.

Batch 1. Shapes: ids [1, T]; embeds [1, T, H]; cache layer keys/values [1, kv_heads, T, head_dim].
Every function takes the Timer so each stage is one span; nothing here reads the clock itself.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

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


def prefill_cache(model, embeds: torch.Tensor, cache: DynamicCache) -> None:
    """Run the layers over a section only to fill the cache (no LM head)."""
    decoder(model)(inputs_embeds=embeds, past_key_values=cache, use_cache=True)


def last_logits(model, embeds: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
    out = model(inputs_embeds=embeds, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1, :]  # [1, V]


def project(fuser: Fuser, r_cache: DynamicCache, s_cache: DynamicCache, n: int,
            timer: Timer) -> int:
    """One sharer: for every mapped receiver layer, k', v' = projector((k_s, v_s), (k_r, v_r))
    over the instruction positions, written over the receiver's cache in place. Returns the
    call count."""
    return project_sharers(fuser, r_cache, [s_cache], n, timer)[1]


def project_sharers(fuser: Fuser, r_cache: DynamicCache, s_caches: list[DynamicCache], n: int,
                    timer: Timer, fusion: str = "parallel") -> dict[int, int]:
    """Project every sharer (1, 2, ... as in the fuser's map) into the receiver's cache, as the
    reference does:
    - a receiver layer with several (sharer layer, projector) pairs runs them all against the
      same receiver slice and keeps the first result;
    - "sequential": sharer k projects from the cache as sharers 1..k-1 left it;
    - "parallel" (two or more sharers): every sharer projects from the clean receiver cache and
      the cache becomes base + sum of the sharers' (k' - k_r) residuals. With one sharer both
      modes write k' directly. The final add is timed in the last sharer's projection span.
    Spans are tagged with the sharer number. Returns projector calls per sharer."""
    calls = {k: 0 for k in range(1, len(s_caches) + 1)}
    parallel = fusion == "parallel" and len(s_caches) > 1
    deltas: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for k, s_cache in enumerate(s_caches, start=1):
        for t, pairs in fuser.sharer_maps[k].items():
            rl = r_cache.layers[t]
            m = rl.keys.shape[2]  # = n, or the last window of it in a sliding-window layer
            lo = n - m
            with timer.span("projection", who=k):
                rk, rv = rl.keys[:, :, :m], rl.values[:, :, :m]
                outs = [fuser.projectors[i]((s_cache.layers[s].keys[:, :, lo:n],
                                             s_cache.layers[s].values[:, :, lo:n]), (rk, rv))
                        for s, i in pairs]
                nk, nv = outs[0]
                if parallel:
                    dk, dv = nk - rk, nv - rv
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
                m = rl.keys.shape[2]
                rl.keys[:, :, :m].add_(dk)
                rl.values[:, :, :m].add_(dv)
    return calls


def decode_step(model, token: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
    """One receiver forward for one new token [1, 1] -> next-token logits [1, V].

    The single place a static-cache / CUDA-graph decode would replace."""
    out = model(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1, :]


def sample(logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float, top_k: int,
           generator: torch.Generator | None) -> torch.Tensor:
    """Greedy or sampled next token, [1, 1] on the logits' device."""
    if not do_sample:
        return logits.argmax(-1, keepdim=True)
    x = logits.float() / max(temperature, 1e-5)
    if top_k and top_k > 0:
        kth = torch.topk(x, min(top_k, x.shape[-1])).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if 0.0 < top_p < 1.0:
        sx, idx = torch.sort(x, descending=True)
        cum = torch.softmax(sx, -1).cumsum(-1)
        drop = cum - torch.softmax(sx, -1) > top_p  # keep the smallest prefix reaching top_p
        sx = sx.masked_fill(drop, float("-inf"))
        x = torch.full_like(x, float("-inf")).scatter(-1, idx, sx)
    return torch.multinomial(torch.softmax(x, -1), 1, generator=generator)


def c2c_prefill(receiver, sharer, fuser: Fuser | None, ids: torch.Tensor,
                timer: Timer) -> tuple[DynamicCache, torch.Tensor, int]:
    """Sectioned prefill with one sharer. `sharer`/`fuser` None = the receiver alone on the
    same path. Returns the receiver cache (fused), the last-token logits [1, V] and the
    projector calls."""
    sharers = [(sharer, ids)] if sharer is not None and fuser is not None else []
    cache, logits, calls = fused_prefill(receiver, sharers, fuser, ids, timer)
    return cache, logits, sum(calls.values())


def fused_prefill(receiver, sharers: list[tuple[torch.nn.Module, torch.Tensor]],
                  fuser: Fuser | None, ids: torch.Tensor, timer: Timer,
                  fusion: str = "parallel") -> tuple[DynamicCache, torch.Tensor, dict[int, int]]:
    """Sectioned prefill with any number of sharers, each given as (model, its ids [1, >= T-1]):
    the receiver's ids, or the aligned ids for a sharer with its own tokenizer (same length).
    The instruction section (all tokens but the last) is prefilled by the receiver and every
    sharer, projected (project_sharers), then the receiver reads the last token.

    Returns the receiver cache, the last-token logits [1, V] and projector calls per sharer."""
    n = ids.shape[1] - 1  # instruction section = all tokens but the last
    r_emb = embed(receiver, ids, timer, "base_embedding")
    r_cache = new_cache(receiver)
    calls: dict[int, int] = {}
    if n > 0:
        with timer.span("base_prefill"):
            prefill_cache(receiver, r_emb[:, :n], r_cache)
        if sharers and fuser is not None:
            s_caches = []
            for k, (model, s_ids) in enumerate(sharers, start=1):
                cancel.check()
                s_emb = embed(model, s_ids[:, :n], timer, "teacher_embedding", who=k)
                # full-length layers: a sliding-window sharer keeps every position to project
                # (its own attention still uses its window: the mask comes from its config)
                s_cache = DynamicCache()
                with timer.span("teacher_prefill", who=k):
                    prefill_cache(model, s_emb, s_cache)
                s_caches.append(s_cache)
            cancel.check()
            calls = project_sharers(fuser, r_cache, s_caches, n, timer, fusion)
            del s_caches
        cancel.check()
    with timer.span("base_prefill"):
        logits = last_logits(receiver, r_emb[:, n:], r_cache)
    return r_cache, logits, calls


def plain_prefill(model, ids: torch.Tensor, timer: Timer, emb_stage: str,
                  prefill_stage: str, who: int | None = None) -> tuple[DynamicCache, torch.Tensor]:
    """One-section prefill of a single model (sharer alone, T2T stages); `who` tags the spans
    with a sharer number."""
    emb = embed(model, ids, timer, emb_stage, who)
    cache = new_cache(model)
    with timer.span(prefill_stage, who=who):
        logits = last_logits(model, emb, cache)
    return cache, logits
