"""The app's loaded models: one pipeline, reloaded only when the model settings change.

No gradio here: the app's worker process (c2c_core.frontends.worker) owns a ModelManager, and so does the
web app itself on ZeroGPU (in-process path). Messages are the core's sentences; the app turns
CLI flag names into the page's words and removes server paths when it shows them.
"""

from __future__ import annotations

import gc
import json
import os
import threading
import time
from dataclasses import asdict

from ..measure import cancel
from ..spec.config import RunConfig
from ..spec.errors import UserError


class ModelManager:
    """Holds one Pipeline for the whole app; reloads only when the model settings change.

    With `fix(cfg)` (a Space, or C2C_FIXED_MODELS=1) the operator's pair is the only one:
    any other is refused before it could evict it. Otherwise a new pair is checked first
    (names, configs, tokenizers) and swapped in after; if its load still fails, the previous
    pair is loaded back, so a bad request never leaves the app without models."""

    def __init__(self):
        self._lock = threading.RLock()
        self.pipe = None
        self.cfg: RunConfig | None = None
        self.key: str | None = None
        self.load_s: float | None = None
        self.loading: str | None = None
        self.fixed_key: str | None = None
        self.fixed_label: str | None = None
        #: Called with (cfg, {source: config dict}) after the configs are read and before any
        #: weight loads (the app's worker checks the memory budget of models whose config was
        #: not on the machine when the job was accepted).
        self.before_load = None

    @staticmethod
    def key_of(cfg: RunConfig) -> str:
        from ..engines.budget import canonical_device
        from ..models.loading import resolve_device, resolve_dtype
        name = canonical_device(cfg.device)  # 'cpu:1' and 'cpu' are one pair, not a reload
        dev = resolve_device(None if name == "auto" else name)
        dtype = resolve_dtype(cfg.dtype, dev, cfg.cpu_dtype)
        return json.dumps([asdict(cfg.receiver), [asdict(s) for s in cfg.sharers], asdict(cfg.fuser),
                           str(dev), str(dtype), cfg.threads, cfg.attn_implementation,
                           cfg.alignment, cfg.fusion], sort_keys=True)

    def fix(self, cfg: RunConfig) -> None:
        """From now on only cfg's models may be used (the operator's choice)."""
        self.fixed_key = self.key_of(cfg)
        self.fixed_label = cfg.preset or \
            f"{cfg.receiver.source} <- {' + '.join(s.source for s in cfg.sharers)}"

    def check_allowed(self, cfg: RunConfig) -> None:
        if self.fixed_key is not None and self.key_of(cfg) != self.fixed_key:
            raise UserError(f"This server's models are fixed by its operator ({self.fixed_label});"
                            " leave the model settings as they are (preset, receiver, sharer,"
                            " fuser, device, dtype).")

    def get(self, cfg: RunConfig):
        """The pipeline for cfg's models, loading it first when needed (under the lock)."""
        from ..models.loading import check_sources
        self.check_allowed(cfg)
        check_sources(cfg)  # a typo fails in milliseconds, before dropping what is loaded
        key = self.key_of(cfg)
        with self._lock:
            if self.pipe is not None and self.key == key:
                return self.pipe
            configs = preflight(cfg)  # configs, tokenizer, fuser files: nothing dropped yet
            cancel.check()  # a Stop while those downloaded keeps the pair that is loaded
            if self.before_load is not None:
                self.before_load(cfg, configs)
            old = self.cfg
            try:
                return self._load(cfg, key)
            except Exception as e:  # noqa: BLE001 - put the working pair back, then report
                if old is None or isinstance(e, cancel.Cancelled):
                    raise
                try:
                    self._load(old, self.key_of(old))
                except Exception:  # noqa: BLE001 - nothing more we can do; say the first error
                    raise e from None
                msg = str(e) if isinstance(e, UserError) else \
                    f"{type(e).__name__} while loading {cfg.receiver.source}"
                raise UserError(f"{msg.rstrip('.')}; the previous models are loaded again.") \
                    from None

    def _load(self, cfg: RunConfig, key: str):
        from ..models.loading import load_pipeline
        self.loading = f"{cfg.receiver.source} ← {' + '.join(s.source for s in cfg.sharers)}"
        try:
            self.pipe, self.key, self.cfg = None, None, None
            _free_memory()
            t0 = time.perf_counter()
            self.pipe = load_pipeline(cfg)
            self.key, self.cfg, self.load_s = key, cfg, time.perf_counter() - t0
        finally:
            self.loading = None
        return self.pipe

    def status(self) -> str:
        if self.loading:
            return f"**Models:** loading {self.loading} …"
        if self.pipe is None:
            return ("**Models:** none loaded yet; they load on the first run (or press"
                    " *Load models*).")
        note = self.pipe.info.get("fuser_note")
        took = f" · loaded in {self.load_s:.1f} s" if self.load_s is not None else ""
        fixed = " · fixed by the operator" if self.fixed_key else ""
        text = f"**Models:** held by the server for every session: {self.pipe.describe()}{took}{fixed}"
        return text + (f"  \n**Note:** {note}." if note else "")


def preflight(cfg: RunConfig) -> dict:
    """What can be checked without loading weights: each model's config and tokenizer, the
    fuser's files. Raises a UserError; loads nothing into memory that matters. Returns the
    configs it read ({source: config dict}, pretrained models only)."""
    from ..models.loading import _from_pretrained, load_tokenizer, source_kind
    from transformers import AutoConfig
    configs: dict = {}
    for spec, role in ((cfg.receiver, "Receiver"), *((s, "Sharer") for s in cfg.sharers)):
        if source_kind(spec.source) == "pretrained":
            c = _from_pretrained(AutoConfig, spec.source, f"{role} model {spec.source}",
                                 revision=spec.revision)
            if hasattr(c, "to_dict"):
                configs[spec.source] = c.to_dict()
    try:
        tok, tok_src = load_tokenizer(cfg.receiver)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - a folder without a tokenizer, a broken file
        raise UserError(f"The receiver's tokenizer could not be read ({type(e).__name__});"
                        " check the receiver.") from None
    from ..models.loading import plan_alignment, sharer_tokenizers
    try:  # a sharer with its own tokenizer and --alignment none is refused here
        plan_alignment(cfg, tok, tok_src, sharer_tokenizers(cfg, tok, tok_src))
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - a sharer folder without a tokenizer, a broken file
        raise UserError(f"A sharer's tokenizer could not be read ({type(e).__name__});"
                        " check the sharers.") from None
    src = cfg.fuser.source
    if src and src.startswith("hub:"):
        from ..models.loading import _snapshot
        parts = src[4:].split("/")
        if len(parts) >= 3:
            folder = _snapshot("/".join(parts[:2]), "/".join(parts[2:]), src)
            if not os.path.isfile(os.path.join(folder, *parts[2:], "projector_config.json")) \
                    and not os.path.isfile(os.path.join(folder, *parts[2:], "final",
                                                        "projector_config.json")):
                raise UserError(f"Fuser {src} has no projector_config.json; check the"
                                " subfolder.")
    elif src and not os.path.isfile(os.path.join(src, "projector_config.json")) and \
            not os.path.isfile(os.path.join(src, "final", "projector_config.json")):
        raise UserError(f"Fuser folder {src} has no projector_config.json; pass a fuser folder"
                        " or untrained.")
    return configs


def _free_memory() -> None:
    gc.collect()
    try:
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001 - freeing memory is best effort
        pass
