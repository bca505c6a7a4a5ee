"""The C2C prefill (sections, projection into the receiver cache) and the decode step.

Batch 1. Shapes: ids [1, T]; embeds [1, T, H]; cache layer keys/values [1, kv_heads, T, head_dim].
Every function takes the Timer so each stage is one span; nothing here reads the clock itself.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from . import cancel
from .projector import Fuser
from .timing import Timer


def decoder(model):
    """The transformer body without the LM head (skip logits we would throw away)."""
    return getattr(model, model.base_model_prefix)


def new_cache(model) -> DynamicCache:
    return DynamicCache(config=model.config)


def embed(model, ids: torch.Tensor, timer: Timer, stage: str) -> torch.Tensor:
    with timer.span(stage):
        return model.get_input_embeddings()(ids)  # [1, T, H]


def prefill_cache(model, embeds: torch.Tensor, cache: DynamicCache) -> None:
    """Run the layers over a section only to fill the cache (no LM head)."""
    decoder(model)(inputs_embeds=embeds, past_key_values=cache, use_cache=True)


def last_logits(model, embeds: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
    out = model(inputs_embeds=embeds, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1, :]  # [1, V]


def project(fuser: Fuser, r_cache: DynamicCache, s_cache: DynamicCache, n: int,
            timer: Timer) -> int:
    """For every mapped receiver layer: k', v' = projector((k_s, v_s), (k_r, v_r)) over the
    first n positions, written over the receiver's cache in place. Returns the call count."""
    calls = 0
    for t, pairs in fuser.mapping.items():
        rl = r_cache.layers[t]
        for s, i in pairs:
            sl = s_cache.layers[s]
            with timer.span("projection"):
                k, v = fuser.projectors[i]((sl.keys[:, :, :n], sl.values[:, :, :n]),
                                           (rl.keys[:, :, :n], rl.values[:, :, :n]))
                rl.keys[:, :, :n].copy_(k)
                rl.values[:, :, :n].copy_(v)
            calls += 1
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
    """Sectioned prefill. `sharer`/`fuser` None = the receiver alone on the same path.

    Returns the receiver cache (fused), the last-token logits [1, V] and the projector calls."""
    n = ids.shape[1] - 1  # instruction section = all tokens but the last
    r_emb = embed(receiver, ids, timer, "base_embedding")
    r_cache = new_cache(receiver)
    calls = 0
    if n > 0:
        with timer.span("base_prefill"):
            prefill_cache(receiver, r_emb[:, :n], r_cache)
        if sharer is not None and fuser is not None:
            cancel.check()
            s_emb = embed(sharer, ids[:, :n], timer, "teacher_embedding")
            s_cache = new_cache(sharer)
            with timer.span("teacher_prefill"):
                prefill_cache(sharer, s_emb, s_cache)
            cancel.check()
            calls = project(fuser, r_cache, s_cache, n, timer)
            del s_cache
        cancel.check()
    with timer.span("base_prefill"):
        logits = last_logits(receiver, r_emb[:, n:], r_cache)
    return r_cache, logits, calls


def plain_prefill(model, ids: torch.Tensor, timer: Timer, emb_stage: str,
                  prefill_stage: str) -> tuple[DynamicCache, torch.Tensor]:
    """One-section prefill of a single model (sharer alone, T2T stages)."""
    emb = embed(model, ids, timer, emb_stage)
    cache = new_cache(model)
    with timer.span(prefill_stage):
        logits = last_logits(model, emb, cache)
    return cache, logits
