"""Fail fast when the Hugging Face hub is needed and cannot be reached.

The hub libraries retry for 20-50 s before giving up. We decide up front: with HF_HUB_OFFLINE
(or HF_DATASETS_OFFLINE for datasets) set, a hub reference that is not already in the local cache
is an error at once; without it, one short TCP check to the endpoint decides. That check runs
once per process and endpoint (`hub_reachable`), bounded by PROBE_TIMEOUT_S even where name
resolution hangs (it waits in a helper thread); the app's defaults (the Dataset tab opens on the
shipped sample prompts) follow `hub_online`.
"""

from __future__ import annotations

import os
import socket
import threading
from urllib.parse import urlparse

from ..spec.errors import HubUnavailable

_TRUE = {"1", "true", "yes", "on"}
_reachable_cache: dict[str, bool] = {}


def hub_offline(datasets: bool = False) -> bool:
    names = ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"] + (["HF_DATASETS_OFFLINE"] if datasets else [])
    return any(os.environ.get(n, "").strip().lower() in _TRUE for n in names)


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


#: Seconds the reachability check waits for a TCP connect (DNS included) before it answers
#: "unreachable". A refused connect (no network, a firewall that rejects) answers at once.
PROBE_TIMEOUT_S = 1.5
_probe_lock = threading.Lock()


def _connect(host: str, port: int, timeout_s: float, out: list) -> None:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            out.append(True)
    except (OSError, ValueError):
        out.append(False)


def probe(endpoint: str, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """One TCP connect to `endpoint`'s host and port; False after `timeout_s` whatever the
    connect is still doing (getaddrinfo ignores socket timeouts, so it runs in a thread)."""
    u = urlparse(endpoint)
    if not u.hostname:
        return False
    try:
        port = u.port or (443 if u.scheme == "https" else 80)
    except ValueError:  # a port that is not a number
        return False
    out: list = []
    t = threading.Thread(target=_connect, args=(u.hostname, port, timeout_s, out), daemon=True,
                         name="c2c-hub-probe")
    t.start()
    t.join(timeout_s)
    return bool(out and out[0])


def hub_reachable(timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """Whether the hub endpoint answers a TCP connect (checked once per process and endpoint;
    callers at the same time wait for the one check)."""
    ep = hub_endpoint()
    with _probe_lock:
        if ep not in _reachable_cache:
            _reachable_cache[ep] = probe(ep, timeout_s)
        return _reachable_cache[ep]


def hub_online(datasets: bool = False) -> bool:
    """The hub can be used now: no HF_*_OFFLINE variable set, and its endpoint answers."""
    return not hub_offline(datasets=datasets) and hub_reachable()


def check_in_background() -> threading.Thread:
    """Start the reachability check now (app start) so that its answer is ready when wanted."""
    t = threading.Thread(target=hub_reachable, daemon=True, name="c2c-hub-check")
    t.start()
    return t


def require_hub(what: str, datasets: bool = False) -> None:
    """Raise a one-sentence HubUnavailable naming `what` unless the hub can be used now.

    Call this only after a local lookup (path, local cache) has failed."""
    fix = ("pass a local prompts file with --dataset_file" if datasets else
           "pass a local path, or use the offline preset smollm2-demo")
    if hub_offline(datasets=datasets):
        var = "HF_DATASETS_OFFLINE/HF_HUB_OFFLINE" if datasets else "HF_HUB_OFFLINE"
        raise HubUnavailable(f"{what} is not in the local cache and {var} is set; {fix}.")
    if not hub_reachable():
        raise HubUnavailable(f"{what} needs the Hugging Face hub at {hub_endpoint()}, which cannot"
                             f" be reached from this machine; {fix}.")
