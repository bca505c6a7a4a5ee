"""decode_floor_ms of a generation: the bytes one decode step must read (the weights of the
model that writes the tokens, plus the KV cache so far) over the device's memory bandwidth
(measure/hardware.py's table). Here, above the models, because the KV size comes from the
model's config (models/projector.kv_shape)."""

from __future__ import annotations

from ..measure import hardware
from ..models.projector import kv_shape


def kv_bytes_per_token(model, dtype) -> int:
    """KV cache bytes of one position of one sequence: layers x kv heads x head_dim x 2 x bytes."""
    layers, heads, hd = kv_shape(model.config)
    return layers * heads * hd * 2 * dtype.itemsize


def floor_for(pipe, g, model=None) -> float | None:
    """A generation's decode_floor_ms: the model that wrote its tokens (`model`, else by
    g.speaker), its prompt, tokens, and for a batch every row's context (g.kv_context_tokens).
    None with no decode step or no known bandwidth."""
    n = len(g.tokens)
    if n < 2:
        return None
    gbs = hardware.bandwidth_gbs(hardware.device_name(pipe.device))
    if gbs is None:
        return None
    if model is None:
        model = pipe.receiver if not g.speaker else pipe.sharers[g.speaker - 1].model
    ctx = g.kv_context_tokens
    if ctx is None:
        ctx = (g.prompt_tokens + n / 2) * max(g.batch_size, 1)
    return hardware.decode_floor_ms(hardware.weight_bytes(model),
                                   kv_bytes_per_token(model, pipe.dtype), ctx, gbs)
