"""A fair model queue on top of gradio's: jobs of clients that are there, one waiting job per
session, and Stop that also removes a job still waiting.

gradio queues a job when a client POSTs `queue/join`; the client then reads the job's messages
from a stream (`GET queue/data?session_hash=…`). A client that joins and never opens the
stream still had its job run in full, and 70 such joins filled the queue for everyone. Here:

- `Connections` (ASGI middleware) counts each session's open message streams;
- `install(demo)` wraps the queue of the model jobs (concurrency id `MODEL_QUEUE`):
  * a job starts only while its session has a stream open; one whose session has not opened
    one within `C2C_CONNECT_GRACE_S` (5 s) of joining is dropped (gradio itself drops the jobs
    of a stream that closes, and ends a running one);
  * a session may have one job waiting: a second join is refused with a sentence;
* `stop_run` (the Stop buttons) stops the session's running job and removes its waiting one.

Only the model queue is touched; every other event queues as gradio does. Without the
middleware (an app launched without `launch_kwargs()`), no connection is known and nothing is
dropped.
"""

from __future__ import annotations

import collections
import os
import re
import threading
import time
from urllib.parse import parse_qs

import gradio as gr

from .jobs import MODEL_QUEUE
from .sessions import request_stop

#: Seconds a joined client has to open its message stream before its job is dropped.
GRACE_DEFAULT_S = 5.0

ONE_WAITING = ("This session already has a job waiting in the model queue; wait for it to"
               " start, or press Stop to remove it, before sending another.")
REMOVED = "Stopped before it started: the job was removed from the queue and nothing ran."

_OPEN: collections.Counter = collections.Counter()   # session hash -> open message streams
_LOCK = threading.Lock()
_TRACKING = [False]
#: (session hash, seconds it waited) of jobs dropped because no client was there (the tests
#: and the abuse check read it).
DROPPED: collections.deque = collections.deque(maxlen=1000)
_QUEUE: list = [None]  # the installed app's gradio queue


def grace_s() -> float:
    try:
        return max(float(os.environ.get("C2C_CONNECT_GRACE_S", "").strip() or GRACE_DEFAULT_S),
                   0.0)
    except ValueError:
        return GRACE_DEFAULT_S


def connected(session_hash: str) -> bool:
    with _LOCK:
        return _OPEN[session_hash] > 0


class Connections:
    """ASGI middleware: which sessions have their message stream open now."""

    def __init__(self, app):
        self.app = app
        _TRACKING[0] = True

    async def __call__(self, scope, receive, send):
        sid = _stream_session(scope) if scope["type"] == "http" and \
            scope.get("method") == "GET" else None
        if not sid:
            return await self.app(scope, receive, send)
        with _LOCK:
            _OPEN[sid] += 1
        try:
            return await self.app(scope, receive, send)
        finally:
            with _LOCK:
                _OPEN[sid] -= 1
                if _OPEN[sid] <= 0:
                    del _OPEN[sid]


_CALL_STREAM = re.compile(r"/call/[^/]+/([A-Za-z0-9_-]{1,64})/?$")


def _stream_session(scope) -> str | None:
    """The session whose messages a GET request streams: `queue/data?session_hash=…` (the
    browser, gradio_client) or `call/<api>/<event id>` (the REST API: its event's session)."""
    path = scope.get("path", "")
    if path.rstrip("/").endswith("/queue/data"):
        qs = parse_qs((scope.get("query_string") or b"").decode("latin-1"))
        return (qs.get("session_hash") or [""])[0] or None
    m = _CALL_STREAM.search(path)
    if m and _QUEUE[0] is not None:
        ev = _QUEUE[0].event_ids_to_events.get(m.group(1))
        return ev.session_hash if ev is not None else None
    return None


def _minted(request) -> str | None:
    """The server-minted session key of a request (guard.SessionCookie), None without one."""
    from .guard import SESSION_COOKIE, session_key
    try:
        cookies = dict(getattr(request, "cookies", None) or {})
    except Exception:  # noqa: BLE001 - a request object without cookies
        return None
    return session_key(cookies.get(SESSION_COOKIE))


def _owner(event) -> tuple:
    """Whose job: the server-minted session when there is one (a client cannot pick it), else
    gradio's session hash (an app launched without the cookie middleware)."""
    key = _minted(getattr(event, "request", None))
    return ("minted", key) if key else ("hash", event.session_hash)


def _model_queue(queue):
    return queue.event_queue_per_concurrency_id.get(MODEL_QUEUE)


def _forget(queue, event) -> None:
    queue.event_ids_to_events.pop(event._id, None)
    ids = queue.pending_event_ids_session.get(event.session_hash)
    if ids is not None:
        ids.discard(event._id)
        if not ids:
            queue.pending_event_ids_session.pop(event.session_hash, None)


def _drop_absent(queue, now: float) -> list:
    """Drop the waiting model jobs whose client has not opened its stream within the grace
    period; return those still within it (not to be started yet)."""
    q = _model_queue(queue)
    if q is None or not _TRACKING[0]:
        return []
    grace, young, keep = grace_s(), [], []
    for ev in list(q.queue):
        if connected(ev.session_hash):
            keep.append(ev)
        elif now - ev.enqueue_time > grace:
            DROPPED.append((ev.session_hash, now - ev.enqueue_time))
            _forget(queue, ev)
        else:
            young.append(ev)
    q.queue[:] = keep + young
    return young


def install(demo: gr.Blocks) -> None:
    """Wrap `demo`'s gradio queue (after `demo.queue()`)."""
    queue = demo._queue
    _QUEUE[0] = queue
    push, get_events = queue.push, queue.get_events

    async def fair_push(body, request, username):
        fn = demo.fns.get(body.fn_index) if body.fn_index is not None else None
        if fn is not None and fn.concurrency_id == MODEL_QUEUE:
            async with queue.delete_lock:
                _drop_absent(queue, time.monotonic())  # frees places held by absent clients
                q = _model_queue(queue)
                key = _minted(request)
                me = ("minted", key) if key else ("hash", body.session_hash)
                if q is not None and me[1] and any(_owner(ev) == me for ev in q.queue):
                    return False, ONE_WAITING, "error"
        return await push(body, request, username)

    def fair_get_events():
        # called by gradio's loop under its delete_lock: start only jobs whose client is here
        young = _drop_absent(queue, time.monotonic())
        q = _model_queue(queue)
        if not young or q is None:
            return get_events()
        q.queue[:] = [ev for ev in q.queue if ev not in young]
        try:
            return get_events()
        finally:
            q.queue.extend(young)

    queue.push, queue.get_events = fair_push, fair_get_events


def total_waiting() -> int:
    """Model jobs waiting in the queue, all sessions."""
    queue = _QUEUE[0]
    q = _model_queue(queue) if queue is not None else None
    return len(q.queue) if q is not None else 0


def waiting_jobs(session_hash: str) -> int:
    queue = _QUEUE[0]
    q = _model_queue(queue) if queue is not None else None
    return sum(ev.session_hash == session_hash for ev in q.queue) if q is not None else 0


async def remove_waiting(session_hash: str | None, minted: str | None = None) -> int:
    """Remove this page's jobs still waiting in the model queue (gradio's session hash, and the
    server-minted session when the request has one: a hash alone, which a client picks, never
    removes another session's job); their clients are told."""
    from gradio.server_messages import ProcessCompletedMessage
    queue = _QUEUE[0]
    if queue is None or not session_hash:
        return 0

    def mine_(ev) -> bool:
        return ev.session_hash == session_hash and (
            minted is None or _minted(getattr(ev, "request", None)) == minted)

    async with queue.delete_lock:
        q = _model_queue(queue)
        mine = [ev for ev in q.queue if mine_(ev)] if q is not None else []
        for ev in mine:
            q.queue.remove(ev)
    for ev in mine:
        # the client's stream ends the job with this sentence (gradio's /cancel does the same
        # with an empty output)
        queue.send_message(ev, ProcessCompletedMessage(output={"error": REMOVED}, success=False,
                                                       title="Stopped"))
        _forget(queue, ev)
    return len(mine)


async def stop_run(request: gr.Request):
    """Stop: ends this session's running job within one decode step and removes its job
    still waiting in the queue. Said in a toast; the status line is written here only for a
    removed job that never started (a running job's own last update writes it: writing it
    here could land later)."""
    removed = await remove_waiting(getattr(request, "session_hash", None), _minted(request))
    running = request_stop(request)
    if running and removed:
        gr.Info("Stopping: the running generation ends within one decode step, and your job"
                " waiting in the queue was removed.")
    elif running:
        gr.Info("Stopping: the running generation ends within one decode step…")
    elif removed:
        gr.Info("Your job waiting in the queue was removed; it will not run.")
        return "**Stopped** before it started: the job was removed from the queue; nothing ran."
    else:
        gr.Info("Nothing is running.")
    return gr.skip()
