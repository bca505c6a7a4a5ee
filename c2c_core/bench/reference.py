"""The reference implementation (thu-nics/C2C, package `rosetta`) run beside ours, from a clone
given at run time (never copied into this tree): the shims that let it run under the pinned
transformers 5, a RosettaModel over one of our pipelines (its models and our fuser's weights),
and our plan given to it the way its evaluator gives sections.

Used by `engines --reference` (its greedy tokens beside ours), scripts/reference_timing.py (its
times) and scripts/golden_forward.py (tests/golden/c2c_forward.json).

Shims, each applied at run time in this process only, each only where needed:
- `DynamicCache.key_cache` / `.value_cache`: transformers 5 removed these lists (the layers hold
  `.keys` / `.values`); the reference's clone_kv_cache and its in-place projection writes use
  them. Shim: list-like views over `cache.layers` (indexing, iteration, append).
- `Cache.__getitem__` (cache[i] -> (keys, values)): removed in transformers 5. Shim: the same
  tuple from `cache.layers[i]`.
- not transformers: the reference's newest RosettaModel.forward stores caches that exist only
  with include_response=True without checking it (thu-nics/C2C issue #7). Shim: the method is
  recompiled from its own source with those statements under `if self.include_response:`.
- (`shimmed`, while it runs) the decode mask: the reference's decode steps pass
  `attention_mask[:, :end]`, cut to the call's length (1). transformers 4.52 (the reference's)
  read such a short mask as "no padding"; transformers 5 pads it with False, so every step would
  see position 0 only. Shim: the receiver's forward gets a short mask extended on the left with
  ones (4.52's reading).
- (`shimmed`) full-length sharer caches: the reference reads a sharer's cache by absolute
  position (`source_key_cache[:, :, start:end]`); under transformers 5 a sliding-window layer of
  a fresh cache keeps only its window. Shim: a sharer called without a cache gets
  `DynamicCache()` (full-length layers; its attention still applies its window), as ours keep it.
"""

from __future__ import annotations

import ast
import contextlib
import inspect
import os
import sys
import textwrap

from ..spec.errors import UserError


class ReferenceUnavailable(UserError):
    """The reference could not be loaded or run here: one sentence, and the exit status a script
    gives it (2: no usable clone; 3: it failed)."""

    def __init__(self, sentence: str, code: int = 3):
        super().__init__(sentence)
        self.code = code


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


class _LayerList:
    """A cache's per-layer keys (or values) as the list transformers 4 kept."""

    def __init__(self, cache, attr: str):
        self._cache, self._attr = cache, attr

    def __len__(self):
        return len(self._cache.layers)

    def __getitem__(self, i):
        return getattr(self._cache.layers[i], self._attr)

    def __iter__(self):
        return (getattr(layer, self._attr) for layer in self._cache.layers)

    def append(self, t):
        from transformers.cache_utils import DynamicLayer
        layers = self._cache.layers
        if self._attr == "keys":  # a new layer; its values come with the matching append below
            layer = DynamicLayer()
            layer.lazy_initialization(t, t)
            layer.keys, layer.values = t, None
            layers.append(layer)
        else:
            next(layer for layer in layers if layer.values is None).values = t


def install_cache_shims() -> list[str]:
    """The transformers 4 cache API the reference uses, where this transformers lacks it."""
    from transformers.cache_utils import Cache, DynamicCache
    done = []
    if not hasattr(DynamicCache(), "key_cache"):
        DynamicCache.key_cache = property(lambda self: _LayerList(self, "keys"))
        DynamicCache.value_cache = property(lambda self: _LayerList(self, "values"))
        done.append("DynamicCache.key_cache/value_cache (views over cache.layers)")
    if not hasattr(Cache, "__getitem__"):
        Cache.__getitem__ = lambda self, i: (self.layers[i].keys, self.layers[i].values)
        done.append("Cache.__getitem__ (cache[i] -> (keys, values))")
    return done


_GUARD = "self.include_response"
_ONLY_WITH_RESPONSE = ("base_output_kv_cache", "source_output_kv_cache")


def _unguarded_store(node) -> bool:
    """`x = clone_kv_cache(base_output_kv_cache)` (or the source's): set only with include_response."""
    v = getattr(node, "value", None)
    return (isinstance(node, ast.Assign) and isinstance(v, ast.Call)
            and getattr(v.func, "id", None) == "clone_kv_cache" and len(v.args) == 1
            and getattr(v.args[0], "id", None) in _ONLY_WITH_RESPONSE)


class _Guard(ast.NodeTransformer):
    def __init__(self):
        self.wrapped = 0

    def generic_visit(self, node):
        super().generic_visit(node)
        guarded = isinstance(node, ast.If) and ast.unparse(node.test) == _GUARD
        for name in ("body", "orelse"):
            stmts = getattr(node, name, None)
            if not isinstance(stmts, list) or (guarded and name == "body"):
                continue
            new = []
            for s in stmts:
                if _unguarded_store(s):
                    self.wrapped += 1
                    s = ast.If(test=ast.parse(_GUARD, mode="eval").body, body=[s], orelse=[])
                new.append(s)
            setattr(node, name, new)
        return node


def guard_include_response_bug(cls) -> list[str]:
    """thu-nics/C2C issue #7: recompile RosettaModel.forward with the include_response-only
    stores guarded; nothing when the clone's forward has no such unguarded store."""
    fn = cls.forward
    lines, first = inspect.getsourcelines(fn)
    tree = ast.parse(textwrap.dedent("".join(lines)))
    g = _Guard()
    tree = ast.fix_missing_locations(g.visit(tree))
    ast.increment_lineno(tree, first - 1)  # tracebacks name the clone's own lines
    if not g.wrapped:
        return []
    ns: dict = {}
    exec(compile(tree, inspect.getsourcefile(fn) or "<rosetta>", "exec"),
         sys.modules[cls.__module__].__dict__, ns)
    cls.forward = ns[fn.__name__]
    return [f"RosettaModel.forward: {g.wrapped} include_response-only cache stores guarded"
            " (thu-nics/C2C#7)"]


def load_reference(path: str):
    """rosetta from the clone at `path` (put first on sys.path), with the shims it needs."""
    if not os.path.isfile(os.path.join(path, "rosetta", "model", "wrapper.py")):
        raise ReferenceUnavailable(f"{path} is not a clone of thu-nics/C2C (no rosetta/model/wrapper.py).", 2)
    import transformers
    shims = install_cache_shims()
    sys.path.insert(0, os.path.abspath(path))
    try:
        from rosetta.model.projector import create_projector
        from rosetta.model.wrapper import RosettaModel
    except Exception as e:  # noqa: BLE001 - whatever the reference's imports raise
        raise ReferenceUnavailable(f"the reference at {path} does not import under transformers"
                      f" {transformers.__version__} ({first_line(e)}).") from None
    shims += guard_include_response_bug(RosettaModel)
    return RosettaModel, create_projector, _last_aligned(path), shims


def _last_aligned(path: str):
    """The reference's own last_aligned mapping (rosetta/train/model_utils.py, loaded alone so
    the training package's dataset imports stay out), or the same rule written out."""
    import importlib.util
    try:
        spec = importlib.util.spec_from_file_location(
            "rosetta_model_utils", os.path.join(path, "rosetta", "train", "model_utils.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return lambda lr, ls: mod.last_aligned_sources(lr, ls, 1)
    except Exception:  # noqa: BLE001 - an older or trimmed clone: C2C_REFERENCE.md's rule
        return lambda lr, ls: {t: [min(max(t + ls - lr, 0), ls - 1)] for t in range(lr)}




# ------------------------------------------------------------- our pipeline in the reference --

@contextlib.contextmanager
def shimmed(pipe):
    """The decode-mask and full-length-cache shims (module docstring) on the pipeline's models
    while the reference runs; the models' own forwards afterwards."""
    import torch
    from transformers import DynamicCache
    saved = []

    def mask_forward(orig):
        def forward(*a, attention_mask=None, past_key_values=None, input_ids=None, **k):
            if attention_mask is not None and past_key_values is not None \
                    and input_ids is not None:
                short = past_key_values.get_seq_length() + input_ids.shape[1] \
                    - attention_mask.shape[1]
                if short > 0:
                    attention_mask = torch.cat(
                        [attention_mask.new_ones(attention_mask.shape[0], short),
                         attention_mask], 1)
            return orig(*a, attention_mask=attention_mask, past_key_values=past_key_values,
                        input_ids=input_ids, **k)
        return forward

    def cache_forward(orig):
        def forward(*a, past_key_values=None, **k):
            return orig(*a, past_key_values=DynamicCache() if past_key_values is None
                        else past_key_values, **k)
        return forward

    models = [(pipe.receiver, mask_forward)] + [(sl.model, cache_forward) for sl in pipe.sharers
                                                if sl.model is not pipe.receiver]
    try:
        for m, wrap in models:
            saved.append((m, m.__dict__.get("forward")))
            m.forward = wrap(m.forward)
        yield
    finally:
        for m, own in reversed(saved):
            if own is None:
                del m.forward
            else:
                m.forward = own


SHIMS_WHILE_RUNNING = ["receiver forward: a short attention mask extended with ones (4.52's"
                       " reading)", "sharer forward: a full-length DynamicCache when called"
                       " without one"]


def reference_model(RosettaModel, create_projector, pipe):
    """A RosettaModel over the pipeline's own models, with projectors holding our fuser's weights
    (the published checkpoint format), mapped and fused (pipe.fusion) as ours."""
    projectors = []
    for p in pipe.fuser.projectors:
        args = {k: v for k, v in p.init_args.items() if k != "dtype"}
        q = create_projector("C2CProjector", **args, dtype=pipe.dtype)
        missing, unexpected = q.load_state_dict(p.state_dict(), strict=False)
        if [m for m in missing if m != "gate_temperature"] or unexpected:
            raise ReferenceUnavailable("our fuser's weights do not fit the reference's"
                                       f" C2CProjector ({missing[:3]} {unexpected[:3]}).")
        projectors.append(q.to(pipe.device).eval())
    kw = {"model_list": [pipe.receiver] + [sl.model for sl in pipe.sharers], "base_model_idx": 0,
          "projector_list": projectors}
    accepted = inspect.signature(RosettaModel.__init__).parameters
    kw.update({k: v for k, v in (("include_response", False),
                                 ("multi_source_fusion_mode", pipe.fusion)) if k in accepted})
    model = RosettaModel(**kw).eval()
    for k, m in pipe.fuser.sharer_maps.items():
        for t, pairs in m.items():
            for s, i in pairs:
                model.set_projector_config(source_model_idx=k, source_model_layer_idx=s,
                                           target_model_idx=0, target_model_layer_idx=t,
                                           projector_idx=i)
    return model


def reference_inputs(plan, device) -> dict:
    """Our c2c plan as the reference's generate/forward keywords (its evaluator's layout:
    per-model ids and masks, positions 0..L-1, one kv_cache_index entry per section)."""
    import torch
    from ..plan.item import reference_sections
    L = len(plan.ids)
    ids = [torch.tensor([plan.ids], device=device)] + \
          [torch.tensor([f.ids], device=device) for f in plan.feeds]
    masks = [torch.tensor([[0 if q else 1 for q in (p or [False] * L)]], device=device)
             for p in [plan.pad] + [f.pad for f in plan.feeds]]
    index = [torch.tensor([b, 0], dtype=torch.long).repeat(e - a, 1).unsqueeze(0).to(device)
             for a, e, b in reference_sections(plan)]
    return {"kv_cache_index": index, "input_ids": ids, "attention_mask": masks,
            "position_ids": torch.arange(L, device=device)[None]}


def reference_tokens(pipe, cfg, item, clone: str, max_new_tokens: int):
    """The reference's first-token logits [V] and greedy tokens (EOS ignored) for one item in
    c2c mode, on our pipeline and plan. A plan with receiver padding is refused: the 4.52
    decode mask the reference relies on would attend to the padding, which ours masks."""
    import torch
    from ..plan.item import build_plan
    if pipe.fuser is None:
        raise ReferenceUnavailable("the reference runs C2C only; this pipeline has no fuser.")
    RosettaModel, create_projector, _, _ = load_reference(clone)
    plan = build_plan(pipe, cfg, item, "c2c")
    if plan.padded:
        raise ReferenceUnavailable("this prompt's plan pads the receiver's sequence, which the"
                                   " reference's decode steps would attend to (transformers"
                                   " 4.52's mask reading); compare on another prompt.")
    model = reference_model(RosettaModel, create_projector, pipe)
    inputs = reference_inputs(plan, pipe.device)
    try:
        with shimmed(pipe), torch.no_grad():
            first = model.forward(use_cache=True, **inputs).logits[0, -1]
            out = model.generate(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=-1,
                                 pad_token_id=0, **inputs)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - the reference's own failure, named
        raise ReferenceUnavailable(f"the reference failed on this pipeline ({first_line(e)}).") \
            from None
    return first, [int(t) for t in out[0, len(plan.ids):]]
