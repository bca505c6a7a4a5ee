"""Fail fast when the Hugging Face hub is needed and cannot be reached.

The hub libraries retry for 20-50 s before giving up. We decide up front: with HF_HUB_OFFLINE
(or HF_DATASETS_OFFLINE for datasets) set, a hub reference that is not already in the local cache
is an error at once; without it, one short TCP check to the endpoint decides.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

from ..spec.errors import HubUnavailable

_TRUE = {"1", "true", "yes", "on"}
_reachable_cache: dict[str, bool] = {}


def hub_offline(datasets: bool = False) -> bool:
    names = ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"] + (["HF_DATASETS_OFFLINE"] if datasets else [])
    return any(os.environ.get(n, "").strip().lower() in _TRUE for n in names)


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """One TCP connect to the hub endpoint (cached per process)."""
    ep = hub_endpoint()
    if ep in _reachable_cache:
        return _reachable_cache[ep]
    u = urlparse(ep)
    port = u.port or (443 if u.scheme == "https" else 80)
    try:
        with socket.create_connection((u.hostname, port), timeout=timeout_s):
            ok = True
    except OSError:
        ok = False
    _reachable_cache[ep] = ok
    return ok


def require_hub(what: str, datasets: bool = False) -> None:
    """Raise a one-sentence HubUnavailable naming `what` unless the hub can be used now.

    Call this only after a local lookup (path, local cache) has failed."""
    fix = ("pass a local prompts file with --dataset_file" if datasets else
           "pass a local path, or use the offline preset smollm2-demo")
    if hub_offline(datasets=datasets):
        var = "HF_DATASETS_OFFLINE/HF_HUB_OFFLINE" if datasets else "HF_HUB_OFFLINE"
        raise HubUnavailable(f"{what} is not in the local cache and {var} is set; {fix}.")
    if not hub_reachable():
        raise HubUnavailable(f"{what} needs the Hugging Face hub ({hub_endpoint()}), which cannot"
                             f" be reached from this machine; {fix}.")
