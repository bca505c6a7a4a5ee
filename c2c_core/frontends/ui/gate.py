"""What reaches the app over HTTP, before gradio sees it, and what the server writes about it.

- `BodyLimit` (ASGI middleware, outermost): every request body is capped, counted from its
  Content-Length and from the bytes that actually arrive (a chunked body has none): at most
  `C2C_MAX_BODY_MB` outside `/upload`, `C2C_MAX_UPLOAD_MB` there. Past it: a 413 and one
  sentence naming the limit. (A 200 MB JSON body to `queue/join` grew the server by 1.4 GB.)
- `StreamOwners` (ASGI middleware, inside guard.SessionCookie): a gradio session hash belongs to
  the session cookie that first named it. `queue/data`, `queue/join`, `cancel`, `heartbeat`,
  `component_server`, `run/…` and any other request naming a hash (query, path or JSON body)
  with another cookie get a 403 and a sentence, and reach nothing: a stranger who learns a hash
  can neither read its stream (it used to take the owner's messages and break its client) nor
  stop, close or join under it.
- `file_refusals_in_words()`: a file input naming a server path no upload stored is refused in
  a sentence (gradio said a bare `{"error": null}`).
- `bound_logs()` / `bound_output()`: no log record and no line the server prints is longer
  than `LOG_LINE_CHARS` (gradio prints a malformed event's whole input, and logs values in
  warnings and tracebacks: one request, one 200 MB log line).
"""

from __future__ import annotations

import collections
import io
import json
import logging
import math
import re
import sys
import threading
from urllib.parse import parse_qs

from . import guard

MB = 2**20

#: Characters of one log record or printed line kept; the rest is cut, and the cut said.
LOG_LINE_CHARS = 2048


def _cut(text: str, cap: int = LOG_LINE_CHARS) -> str:
    if len(text) <= cap:
        return text
    return f"{text[:cap]} … [{len(text) - cap:,} more characters not logged]"


# --- request bodies -----------------------------------------------------------------------------

def body_cap() -> int:
    """Bytes one request body may carry outside /upload: C2C_MAX_BODY_MB, by default room for the
    largest request the page sends (C2C_MAX_PROMPTS prompts of C2C_MAX_PROMPT_CHARS characters,
    at UTF-8's 4 bytes a character) plus 1 MB for the other inputs, in whole MB."""
    fits = guard.limit("prompts") * guard.limit("prompt_chars") * 4 + MB
    return guard._env_int("C2C_MAX_BODY_MB", math.ceil(fits / MB)) * MB


def _is_upload(scope) -> bool:
    return scope.get("path", "").rstrip("/").endswith("/upload")


class _TooLarge(Exception):
    pass


async def _answer(send, status: int, text: str) -> None:
    body = text.encode()
    try:
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
    except Exception:  # noqa: BLE001 - the client has gone; nothing more to say
        pass


def _too_large_text(upload: bool, cap: int) -> str:
    if upload:
        return (f"Upload refused: one request may carry at most {guard._mb(cap)}"
                " (C2C_MAX_UPLOAD_MB); upload fewer or smaller files.")
    return (f"Request refused: its body is over {guard._mb(cap)}, the most this server takes in"
            " one request outside /upload (C2C_MAX_BODY_MB).")


class BodyLimit:
    """ASGI middleware: a request whose body is over its cap is answered 413 with a sentence:
    from its Content-Length before a byte is read, else as soon as the bytes that arrived pass
    the cap (the app is then handed no more, and its own answer to the cut body is dropped)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        upload = _is_upload(scope)
        cap = guard.limit("request_upload_mb") * MB if upload else body_cap()
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.strip().isdigit() or int(length) > cap):
            return await _answer(send, 413, _too_large_text(upload, cap))
        seen, over, started = 0, False, False

        async def counting_receive():
            nonlocal seen, over
            if over:
                raise _TooLarge()
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > cap:
                    over = True
                    raise _TooLarge()
            return msg

        async def guarded_send(msg):
            nonlocal started
            if over:  # the app's answer to a body it never got whole
                return
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not over:
                raise
        if over and not started:
            await _answer(send, 413, _too_large_text(upload, cap))


# --- session hashes and their owners ----------------------------------------------------------

#: Session hashes remembered at most (the least recently used is forgotten first).
MAX_OWNED = 100_000

_OWNERS: collections.OrderedDict = collections.OrderedDict()  # session hash -> session key
_OWNERS_LOCK = threading.Lock()
#: (path, session hash) of refused requests, newest last (the tests and the abuse check read it).
REFUSED: collections.deque = collections.deque(maxlen=1000)

NOT_YOURS = ("Refused: this session_hash belongs to another session (another c2c_session"
             " cookie); a client reads, joins and stops only under the session hashes it"
             " started itself.")

_PATH_HASH = (re.compile(r"/heartbeat/([^/]+)/?$"),
              re.compile(r"/stream/([^/]+)/[^/]+/[^/]+/[^/]+$"))  # HLS: hash/run/component/x


def claim(session_hash: str, key: str) -> bool:
    """Whether `key`'s session may use `session_hash`: yes when it is the first to name it."""
    with _OWNERS_LOCK:
        owner = _OWNERS.get(session_hash)
        if owner is None:
            _OWNERS[session_hash] = key
            while len(_OWNERS) > MAX_OWNED:
                _OWNERS.popitem(last=False)
            return True
        _OWNERS.move_to_end(session_hash)
        return owner == key


def _hashes_in_url(scope) -> list[str]:
    qs = parse_qs((scope.get("query_string") or b"").decode("latin-1"), keep_blank_values=True)
    found = list(qs.get("session_hash", []))  # every value: the app reads the last one
    if scope.get("method") == "GET":
        for pattern in _PATH_HASH:
            m = pattern.search(scope.get("path", ""))
            if m:
                found.append(m.group(1))
    return found


def _hash_in_body(body: bytes) -> str | None:
    try:
        value = json.loads(body)  # as Starlette's request.json() reads it
    except (ValueError, RecursionError):
        return None
    h = value.get("session_hash") if isinstance(value, dict) else None
    return h if isinstance(h, str) else None


class StreamOwners:
    """ASGI middleware: a request naming a session hash another cookie first named is refused
    (403, a sentence) before the app reads anything; the first cookie to name a hash owns it.
    A JSON body is read whole to find its hash (BodyLimit bounds it) and handed on unchanged."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        hashes = _hashes_in_url(scope)
        if scope.get("method") == "POST" and not _is_upload(scope):
            chunks, more = [], True
            while more:
                msg = await receive()
                if msg["type"] != "http.request":
                    return None  # the client went away before its body arrived
                chunks.append(msg.get("body", b""))
                more = msg.get("more_body", False)
            body = b"".join(chunks)
            h = _hash_in_body(body)
            if h is not None:
                hashes.append(h)
            receive = guard.replay(body, receive)
        if hashes:
            key = guard.session_key(guard._cookies(list(scope.get("headers") or []))
                                    .get(guard.SESSION_COOKIE))
            if key is None:  # launched without guard.SessionCookie: nothing to own by
                return await self.app(scope, receive, send)
            for h in dict.fromkeys(hashes):
                if h and not claim(h, key):
                    REFUSED.append((scope.get("path", ""), h))
                    return await _answer(send, 403, NOT_YOURS)
        return await self.app(scope, receive, send)


# --- file inputs naming server paths ----------------------------------------------------------

NOT_UPLOADED = ("Refused: a file input names a server path that was not uploaded to this app;"
                " upload the file (the page's file box, or gradio_client's handle_file) and"
                " send the path the upload returned.")


def file_refusals_in_words() -> None:
    """gradio refuses a file input naming a path it did not store from an upload (another
    server file, one no upload made) with a bare `{"error": null}` (its InvalidPathError is not
    shown to clients) and logs the path. Said instead in one sentence, as a gr.Error every
    client shows; the path is not echoed. Installed once, around gradio's own check."""
    if _INSTALLED.get("files"):
        return
    _INSTALLED["files"] = True
    import gradio as gr
    from gradio import processing_utils
    from gradio.exceptions import InvalidPathError
    check = processing_utils._check_allowed

    def check_allowed(path, check_in_upload_folder):
        try:
            return check(path, check_in_upload_folder)
        except InvalidPathError:
            if not check_in_upload_folder:  # the app's own output: its error, not the client's
                raise
            raise gr.Error(NOT_UPLOADED, title="File refused") from None

    processing_utils._check_allowed = check_allowed


# --- bounded logs -----------------------------------------------------------------------------

_INSTALLED = {"logs": False, "output": False}


def bound_logs(cap: int = LOG_LINE_CHARS) -> None:
    """Every log record made in this process (gradio's, uvicorn's, the root logger's, any
    library's) keeps at most `cap` characters of its message and of its traceback; warnings
    (gradio warns with a client's values) go through logging, so they are cut too. Installed
    once, as the record factory: a filter on a logger would miss its children's records."""
    if _INSTALLED["logs"]:
        return
    _INSTALLED["logs"] = True
    make = logging.getLogRecordFactory()

    def bounded_record(*args, **kwargs):
        record = make(*args, **kwargs)
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - logging reports a bad format itself
            return record
        if len(text) > cap:
            record.msg, record.args = _cut(text, cap), ()
        if record.exc_info and not record.exc_text:  # a traceback's head and its last lines
            tb = logging.Formatter().formatException(record.exc_info)
            if len(tb) > cap:
                tb = (f"{tb[:cap // 2]} … [{len(tb) - cap:,} characters not logged] …"
                      f" {tb[-(cap // 2):]}")
            record.exc_text = tb
        if record.stack_info:
            record.stack_info = _cut(record.stack_info, cap)
        return record

    logging.setLogRecordFactory(bounded_record)
    logging.captureWarnings(True)


class BoundedLines(io.TextIOBase):
    """A text stream that writes at most `cap` characters of any one line to `stream` and says
    how much of a longer line it left out (gradio prints a malformed request's values whole, and
    tracebacks print exception messages that hold them)."""

    _BREAK = re.compile(r"(\r\n|\r|\n)")

    def __init__(self, stream, cap: int = LOG_LINE_CHARS):
        self._stream, self._cap = stream, cap
        self._col, self._cut = 0, 0
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        out = []
        with self._lock:
            for part in self._BREAK.split(text):
                if part in ("\r\n", "\r", "\n"):
                    if self._cut:
                        out.append(f" … [{self._cut:,} more characters not logged]")
                    out.append(part)
                    self._col, self._cut = 0, 0
                    continue
                room = max(self._cap - self._col, 0)
                out.append(part[:room])
                self._cut += max(len(part) - room, 0)
                self._col += len(part)
            self._stream.write("".join(out))
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return self._stream.isatty()

    def fileno(self) -> int:
        return self._stream.fileno()

    @property
    def encoding(self):
        return getattr(self._stream, "encoding", "utf-8")

    def __getattr__(self, name):
        return getattr(self._stream, name)


def bound_output(cap: int = LOG_LINE_CHARS) -> None:
    """The server's stdout and stderr keep at most `cap` characters a line (app.py calls it
    for the server it runs; tests leave pytest's streams alone). Logs are bounded too."""
    bound_logs(cap)
    if _INSTALLED["output"]:
        return
    _INSTALLED["output"] = True
    sys.stdout = BoundedLines(sys.stdout, cap)
    sys.stderr = BoundedLines(sys.stderr, cap)
    # logging's handlers made before this still hold the old streams; their records are cut


def _forget_owners() -> None:
    """For tests: forget every session hash's owner."""
    with _OWNERS_LOCK:
        _OWNERS.clear()


__all__ = ["BodyLimit", "StreamOwners", "body_cap", "bound_logs", "bound_output", "claim",
           "BoundedLines", "LOG_LINE_CHARS", "NOT_UPLOADED", "NOT_YOURS",
           "file_refusals_in_words"]
