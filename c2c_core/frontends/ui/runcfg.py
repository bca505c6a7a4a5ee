"""From the page's settings to a RunConfig: the model panel's and run settings' fields,
the memory check before a run, and the one ModelManager (models load once, every tab uses them).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ...engines.budget import canonical_device
from ...spec.config import ALL_MODES, RunConfig, build_run_config
from ...spec.errors import UserError
from .. import worker
from ..manager import ModelManager
from . import guard


#: Model panel fields (keyword names of the API endpoints) → build_run_config keyword.
MODEL_FIELDS = {
    "preset": "preset", "receiver": "base_model", "sharer": "teacher_model", "fuser": "fuser",
    "device": "device", "dtype": "dtype", "fuser_hidden_dim": "hidden_dim",
    "fuser_intermediate_dim": "intermediate_dim", "fuser_layers": "num_layers",
    "alignment": "alignment", "fusion": "fusion",
}
#: Run settings fields (same names as build_run_config's overrides).
RUN_FIELDS = ["mode", "max_new_tokens", "ignore_eos", "warmup", "repeats", "timing",
              "chat_template", "do_sample", "temperature", "top_p", "top_k", "seed", "engine",
              "batch_size"]
INT_FIELDS = {"max_new_tokens", "warmup", "repeats", "top_k", "seed", "hidden_dim",
              "intermediate_dim", "num_layers", "batch_size"}


# --- configuration -------------------------------------------------------------------------

def _clean(key: str, v: Any) -> Any:
    if isinstance(v, str):
        v = v.strip()
        return v or None
    if isinstance(v, float) and key in INT_FIELDS:
        if v != int(v):
            raise UserError(f"{key.replace('_', ' ')} must be a whole number, not {v}.")
        return int(v)
    return v


def run_config(settings: dict, **fixed) -> RunConfig:
    """Model panel + run settings (API keyword names) → RunConfig via build_run_config, after
    the app's own checks: names a client may give (guard), the server's caps, and the
    operator's fixed models. Cheap: also used as the endpoints' validators."""
    guard.check_model_settings(settings)
    cfg = _run_config(settings, **fixed)
    guard.check_new_tokens(cfg.gen.max_new_tokens)
    guard.check_sharers(cfg)
    cfg = replace(cfg, device=canonical_device(cfg.device))  # one spelling per device
    MODELS.check_allowed(cfg)
    check_memory(cfg, cfg.batch_size)  # models and KV cache within the device's memory
    from ...measure.zerogpu import on_zerogpu
    if on_zerogpu() and cfg.engine != "eager":  # C2C_FAST_STEP=compile: refused before the
        from ...engines.fast.engine import step_mode  # job asks ZeroGPU for a GPU
        step_mode()
    return cfg


def check_memory(cfg: RunConfig, batch: int = 1, tokens: int | None = None,
                 what: str = "This run") -> None:
    """The run's memory budget before it queues (guard.check_budget): `tokens` per sequence
    defaults to the new tokens (the prompt's are added where they are known)."""
    if tokens is None:
        tokens = cfg.gen.max_new_tokens + (cfg.gen.t2t_note_tokens if cfg.mode in
                                           ("t2t", ALL_MODES) else 0)
    guard.check_budget(cfg, held_models(), batch, tokens, what)


def pair_label(cfg: RunConfig) -> str:
    """'receiver <- sharer[, sharer]' of a RunConfig, with its preset's name when it is one."""
    pair = f"{cfg.receiver.source} ← {', '.join(s.source for s in cfg.sharers)}"
    return f"{cfg.preset} ({pair})" if cfg.preset and cfg.preset != "custom" else pair


def swap_note(cfg: RunConfig) -> str | None:
    """A sentence when cfg's models are not the ones the server holds: the run replaces them for
    every session. None when they are (or nothing is loaded)."""
    held = held_models()
    if held is None:
        return None
    try:
        if ModelManager.key_of(held) == ModelManager.key_of(cfg):
            return None
    except UserError:
        return None
    return (f"This run will load {pair_label(cfg)} in place of {pair_label(held)}, which every"
            " session of this server shares.")


def held_models() -> RunConfig | None:
    """The RunConfig of the models the server holds now (the worker's, or this process's on
    the in-process path); None before the first load."""
    if not worker.enabled():
        return MODELS.cfg
    w = worker.last_worker()
    return w.held_cfg if w is not None and w.alive() else None


def _run_config(settings: dict, **fixed) -> RunConfig:
    kw: dict[str, Any] = {}
    for ui_key, cfg_key in MODEL_FIELDS.items():
        if ui_key in settings:
            kw[cfg_key] = _clean(cfg_key, settings[ui_key])
    for k in RUN_FIELDS:
        if k in settings:
            kw[k] = _clean(k, settings[k])
    kw.update(fixed)
    preset = kw.pop("preset", None)
    base, teacher = kw.pop("base_model", None), kw.pop("teacher_model", None)
    return build_run_config(preset, base, teacher, kw.pop("fuser", None), **kw)


# --- the loaded models ---------------------------------------------------------------------

#: The app's models when jobs run in this process (ZeroGPU, C2C_APP_WORKER=0); with the worker
#: process (the default) only its operator lock (`fix`) is used here: the pipeline is the
#: worker's.
MODELS = ModelManager()


def models_status() -> str:
    """The status line of the models: the worker's own words (it reports them as they change)
    or, on the in-process path, this process's manager."""
    if not worker.enabled():
        return guard.scrub_paths(MODELS.status())
    w = worker.last_worker()
    if w is None:
        return ("**Models:** none loaded yet; they load on the first run (or press"
                " *Load models*).")
    if w.died and not w.alive():
        return f"**Models:** none loaded. {w.died}"
    if w.status_text is None:
        return "**Models:** starting the worker process …"
    return guard.scrub_paths(w.status_text)


def models_loading() -> bool:
    if not worker.enabled():
        return MODELS.loading is not None
    w = worker.last_worker()
    # a job in flight may load another pair: the status line follows it until it ends
    return w is not None and w.alive() and (w.loading or w.status_text is None
                                            or w.kind is not None)


def load_models(cfg: RunConfig) -> None:
    """Load cfg's models where jobs run: in the worker process, or here on the in-process
    path. Raises UserError (a failed load keeps the working pair)."""
    if worker.enabled():
        worker.worker_for(cfg).call("load", {"cfg": cfg}, fixed=(MODELS.fixed_key,
                                                                 MODELS.fixed_label))
    else:
        MODELS.get(cfg)
