"""The fast engine: static KV caches, a compiled decode step, one batched projection, batches.

Same stages, same spans, same record format as the eager engine (fusion.py + runner.py); only the
way each stage runs differs:

- Static caches (transformers' StaticCache) for receiver and sharer, one per (role, batch size,
  length bucket), allocated once and reused: a generation resets their write position only.
  Buckets are powers of two >= 64 covering prompt + new tokens, so a run compiles a few shapes.
  The c2c sharer's cache holds its prompt only (it never decodes; rounded up to 64 positions).
  Together they are held under a cap in bytes (C2C_CACHE_CAP_MB; default half the free memory):
  when a new shape needs room the least recently used caches (and the compiled steps bound to
  them) are freed. `cache_stats()` counts requests, reuses and evictions. The graph memory
  (on CUDA: what preparations add to the reserved memory beyond the caches, `graph_bytes`) is
  held under the same cap beside them for the engine's life (docs/engines.md).
- Our own 4-D attention mask (left padding: row b's first `pad[b]` positions are padding; a
  padding query sees only itself, so no row is fully masked) and explicit position ids, so every
  step has fixed shapes and nothing is recomputed from Python state.
- The decode step (`step(tok, c, lp, ok)`) is compiled with torch.compile: mode
  "reduce-overhead" (CUDA graphs) on a GPU, inductor on a CPU; the prompt's last token runs
  through it too. Under `graphs` (C2C_FAST_PREFILL_GRAPHS; default on CUDA) each model's prefill
  of the prompt but its last token ("fill") and the stacked projection are prepared per (batch,
  prompt bucket), the prompt left-padded to prompt_bucket(): on CUDA captured as plain CUDA
  graphs (no inductor compile), on a CPU compiled by inductor. Compilation and
  graph capture happen in warm-up (`prepare*()`) for every shape a run will use, never inside a
  timed span; the seconds go to `compile_s` (run.compile_s in the records).
- Greedy decoding is an on-device argmax; sampling uses the exponential trick with the seeded
  generator (no host sync); with --ignore_eos no step reads a value back to the host, and
  without it, on CUDA, "every row ended" is read one step late (engine.eos_lag).
- The projection of all layer pairs is one batched pass (stacked.py) inside one span.
- Batches: left padding, attention mask and position ids; per-row EOS (a finished row keeps
  producing padding until every row is done).

The package: engine.py (caches, masks, the compiled step, prefill and projection) and batch.py
(a batch of items through it); the names callers use are here.
"""

from .batch import (answer_len, first_logits, generate_batch, prepare_plan,  # noqa: F401
                    shapes_of)
from .engine import (BUCKET_MIN, CACHE_CAP_ENV, COMPILE_ENV, GRAPHS_ENV,  # noqa: F401
                     SHARER_ROUND, FastEngine, Rows, bucket, cache_cap_bytes, engine_for, layout,
                     prompt_bucket, sharer_len, sharer_role)
