"""Per-session state: the server-minted session id, its results folder (quota and age
limits), its Stop flags, the pages (tabs) it has open, and what is cleared once the last of
them has gone.
"""

from __future__ import annotations

import collections
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
from typing import Callable

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


# --- pages: the tabs of one session open now ------------------------------------------------

#: Seconds a session outlives its last open page (a reload, a tab opened again): its runs stay
#: listed and its running job runs on until then (C2C_SESSION_GRACE_S).
GRACE_DEFAULT_S = 30.0


def grace_s() -> float:
    try:
        return max(float(os.environ.get("C2C_SESSION_GRACE_S", "").strip() or GRACE_DEFAULT_S),
                   0.0)
    except ValueError:
        return GRACE_DEFAULT_S


class Pages:
    """Which pages of each session are open (a page: one tab, known by gradio's session hash
    and its open heartbeat connections), and since when a session has had none. All tabs of a
    browser share one session (its cookie); the session ends only once its last page has been
    gone for `grace_s` seconds, so closing or reloading one tab never ends another's work. The
    clock is injected (tests move it by hand)."""

    def __init__(self, grace: Callable[[], float] = grace_s,
                 clock: Callable[[], float] = time.monotonic):
        self.grace, self.clock = grace, clock
        self._open: dict[str, collections.Counter] = {}   # session -> page -> connections
        self._left: dict[str, float] = {}                  # session -> when its last page left
        self._last: dict[str, str] = {}                    # session -> which page that was
        self._lock = threading.Lock()

    def arrive(self, session: str, page: str) -> None:
        with self._lock:
            self._open.setdefault(session, collections.Counter())[page] += 1
            self._left.pop(session, None)
            self._last.pop(session, None)

    def leave(self, session: str, page: str) -> None:
        with self._lock:
            pages = self._open.get(session)
            if pages is None or pages[page] <= 0:
                return
            pages[page] -= 1
            if pages[page] <= 0:
                del pages[page]
            if not pages:
                del self._open[session]
                self._left[session] = self.clock()
                self._last[session] = page

    def pages(self, session: str) -> set[str]:
        with self._lock:
            return set(self._open.get(session, ()))

    def known(self, session: str) -> bool:
        """Whether the session has a page open, or had one within the grace period (a session
        only API clients use has none: its jobs stop when their client goes)."""
        with self._lock:
            if session in self._open:
                return True
            left = self._left.get(session)
            return left is not None and self.clock() - left < self.grace()

    def others(self, session: str, page: str | None) -> bool:
        """Whether a page of the session other than `page` is open, or was the session's last
        page and left within the grace period (it may be reloading). The page that started a
        run never counts for it: its own heartbeat closes a moment before its run's stream, and
        an API client (gradio_client holds a heartbeat too) has no other page."""
        with self._lock:
            if set(self._open.get(session, ())) - {page}:
                return True
            left = self._left.get(session)
            return (left is not None and self._last.get(session) != page
                    and self.clock() - left < self.grace())

    def expired(self) -> list[str]:
        """The sessions whose last page left at least `grace` seconds ago (each said once)."""
        now, grace = self.clock(), self.grace()
        with self._lock:
            gone = [s for s, t in self._left.items() if now - t >= grace]
            for s in gone:
                del self._left[s]
                self._last.pop(s, None)
        return gone


PAGES = Pages()

_HEARTBEAT = re.compile(r"/heartbeat/([^/]+)/?$")


class PageConnections:
    """ASGI middleware (inside guard.SessionCookie): each page holds its heartbeat stream
    (`GET …/heartbeat/<session hash>`) open while it is shown; here those streams are counted
    per session, and a session whose pages are all gone ends once the grace period has passed
    with none back (`end_session`)."""

    def __init__(self, app, pages: Pages | None = None):
        self.app, self.pages = app, pages or PAGES

    async def __call__(self, scope, receive, send):
        m = _HEARTBEAT.search(scope.get("path", "")) if scope["type"] == "http" and \
            scope.get("method") == "GET" else None
        key = guard.session_key(guard._cookies(list(scope.get("headers") or []))
                                .get(guard.SESSION_COOKIE)) if m else None
        if key is None:
            return await self.app(scope, receive, send)
        self.pages.arrive(key, m.group(1))
        try:
            return await self.app(scope, receive, send)
        finally:
            self.pages.leave(key, m.group(1))
            if not self.pages.pages(key):
                t = threading.Timer(self.pages.grace() + 0.5, end_expired, (self.pages,))
                t.daemon = True
                t.start()


def end_expired(pages: Pages | None = None) -> list[str]:
    """End every session whose last page has been gone for the grace period."""
    gone = (pages or PAGES).expired()
    for key in gone:
        _end(key)
    return gone


def sweep_sessions() -> None:
    """End the sessions whose grace has passed (the app's unload event: a page left)."""
    end_expired()


# --- stop flags (Stop button; the session's end) ---------------------------------------------

_STOPS: dict[str, set[threading.Event]] = {}
_STOPS_LOCK = threading.Lock()
#: Flags of jobs whose page went away while another page of the session stayed: they run on
#: until done (the callable says so) or the session ends. Their page's own cleanup leaves them.
_ORPHANS: dict[threading.Event, Callable[[], bool]] = {}


def stop_flag(request: gr.Request | None) -> threading.Event:
    """A fresh stop flag for one of the session's runs (Stop and the session's end set it)."""
    ev = threading.Event()
    with _STOPS_LOCK:
        _STOPS.setdefault(session_id(request), set()).add(ev)
    return ev


def _discard(sid: str, ev: threading.Event) -> None:
    flags = _STOPS.get(sid)
    if flags is not None:
        flags.discard(ev)
        if not flags:
            del _STOPS[sid]


def clear_stop(request: gr.Request | None, ev: threading.Event) -> None:
    """The run that owned `ev` is over: a later Stop has nothing to stop."""
    sid = session_id(request)
    with _STOPS_LOCK:
        if ev not in _ORPHANS:
            _discard(sid, ev)
        for o, done in list(_ORPHANS.items()):  # orphaned runs that have ended since
            if done():
                del _ORPHANS[o]
                for s in list(_STOPS):
                    _discard(s, o)


def page_gone(request: gr.Request | None, ev: threading.Event,
              done: Callable[[], bool], pages: Pages | None = None) -> bool:
    """The page that started a run went away (closed, reloaded) while it ran. When another page
    of its session is open, or was its last page within the grace period, the run goes on (its
    records land in the session's folder, listed in the other pages) until it ends or the
    session does; otherwise (its own page was the only one, an API client) it stops now, within
    one decode step. True when it goes on."""
    if (pages or PAGES).others(session_id(request), getattr(request, "session_hash", None)):
        with _STOPS_LOCK:
            _ORPHANS[ev] = done
        return True
    ev.set()
    return False


def request_stop(request: gr.Request | None) -> bool:
    """Stop every run of this session; False when none was running."""
    with _STOPS_LOCK:
        flags = [ev for ev in _STOPS.get(session_id(request), ())
                 if not (ev in _ORPHANS and _ORPHANS[ev]())]
    for ev in flags:
        ev.set()
    return bool(flags)


def _end(key: str) -> None:
    with _STOPS_LOCK:
        flags = _STOPS.pop(key, set())
        for ev in flags:
            _ORPHANS.pop(ev, None)
    for ev in flags:
        ev.set()
    guard.forget_session(key)
    shutil.rmtree(os.path.join(SESSION_ROOT, key), ignore_errors=True)


def end_session(request: gr.Request | None) -> None:
    """The session is over: stop its runs and remove its folder (PageConnections calls it once
    the last page of the session has been gone for the grace period)."""
    _end(session_id(request))
