"""Per-session state: the server-minted session id, its results folder (quota and age
limits), its Stop flag, and what is cleared when the tab closes.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import threading
import time

import gradio as gr

from ...spec.errors import UserError
from . import guard


#: Keep session folders at most this long (API clients never send "tab closed").
SESSION_MAX_AGE_S = 24 * 3600

SESSION_ROOT = os.path.join(tempfile.gettempdir(), "c2c-workbench-sessions")


# --- sessions ------------------------------------------------------------------------------

def session_id(request: gr.Request | None) -> str:
    """This session's key: the one the server minted into the request's session cookie
    (guard.SessionCookie), never the client's session hash. A request without a valid cookie
    (the app launched without launch_kwargs' middleware) gets a key of its own: it shares
    nothing, with no one."""
    try:
        cookies = dict(getattr(request, "cookies", None) or {})
    except Exception:  # noqa: BLE001 - a request object without cookies
        cookies = {}
    key = guard.session_key(cookies.get(guard.SESSION_COOKIE))
    if key is None:  # one key per request object, so its run's stop flag is found again
        key = getattr(request, "_c2c_session_key", None) or secrets.token_urlsafe(24)
        try:
            request._c2c_session_key = key
        except AttributeError:
            pass
    return key


def session_dir(request: gr.Request | None) -> str:
    """This browser session's own folder: runs are written and listed only here."""
    d = os.path.join(SESSION_ROOT, session_id(request))
    os.makedirs(d, exist_ok=True)
    return d


def new_run_path(request: gr.Request | None, kind: str) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = os.path.join(session_dir(request), f"{kind}-{stamp}")
    path, n = f"{base}.jsonl", 1
    while os.path.exists(path):
        n += 1
        path = f"{base}-{n}.jsonl"
    return path


def session_runs(request: gr.Request | None) -> list[tuple[str, str]]:
    """(label, file name) of the JSONL files this session wrote, newest first."""
    d = session_dir(request)
    files = sorted((f for f in os.listdir(d) if f.endswith(".jsonl")),
                   key=lambda f: os.path.getmtime(os.path.join(d, f)), reverse=True)
    out = []
    for f in files:
        with open(os.path.join(d, f), "rb") as fh:
            n = sum(1 for line in fh if line.strip())
        if n:  # a run stopped before its first record has nothing to analyze
            out.append((f"{f} ({n} record{'s' if n != 1 else ''})", f))
    return out


def session_run_path(request: gr.Request | None, name: str) -> str:
    """The path of one of this session's runs; never a file outside its folder."""
    base = os.path.basename(name)
    path = os.path.join(session_dir(request), base)
    if base != name or not base.endswith(".jsonl") or not os.path.isfile(path):
        raise UserError(f"'{name}' is not a run of this session; pick one from the list.")
    return path


def purge_old_sessions(max_age_s: float = SESSION_MAX_AGE_S) -> None:
    if not os.path.isdir(SESSION_ROOT):
        return
    cutoff = time.time() - max_age_s
    for name in os.listdir(SESSION_ROOT):
        p = os.path.join(SESSION_ROOT, name)
        try:
            if os.path.getmtime(p) < cutoff:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


# --- stop flags (Stop button; closing the tab) ---------------------------------------------

_STOPS: dict[str, set[threading.Event]] = {}
_STOPS_LOCK = threading.Lock()


def stop_flag(request: gr.Request | None) -> threading.Event:
    """A fresh stop flag for one of the session's runs (Stop and closing the tab set it)."""
    ev = threading.Event()
    with _STOPS_LOCK:
        _STOPS.setdefault(session_id(request), set()).add(ev)
    return ev


def clear_stop(request: gr.Request | None, ev: threading.Event) -> None:
    """The run that owned `ev` is over: a later Stop has nothing to stop."""
    sid = session_id(request)
    with _STOPS_LOCK:
        flags = _STOPS.get(sid)
        if flags is not None:
            flags.discard(ev)
            if not flags:
                del _STOPS[sid]


def request_stop(request: gr.Request | None) -> bool:
    """Stop every run of this session; False when none was running."""
    with _STOPS_LOCK:
        flags = list(_STOPS.get(session_id(request), ()))
    for ev in flags:
        ev.set()
    return bool(flags)


def end_session(request: gr.Request | None) -> None:
    """The tab was closed: stop its runs and remove its folder."""
    request_stop(request)
    with _STOPS_LOCK:
        _STOPS.pop(session_id(request), None)
    guard.forget_session(session_id(request))
    shutil.rmtree(os.path.join(SESSION_ROOT, session_id(request)), ignore_errors=True)
