"""`python -m c2c_core serve`: an OpenAI-compatible HTTP server over the C2C scheduler
(bench.serving), so any OpenAI client or load generator (vLLM's `bench serve`, guidellm) can
drive C2C with continuous batching and read where each request's time went.

- `make_app(scheduler)`: the FastAPI app: `GET /v1/models` (one model per served mode),
  `POST /v1/completions`, `POST /v1/chat/completions` (streamed as server-sent events or not),
  `GET /health`, `GET /c2c/stats`. Every answer carries a `c2c` field: the request's queue,
  TTFT and E2E times and its stages (sharer prefill, projection, receiver prefill, ...).
- `start_server(scheduler)`: uvicorn in a background thread (port 0: any free port); the
  handle's `.url`, `.port`, `.close()`.
- `serve_main(args, cfg)`: the command's body (the parser block lives in cli.py).

Requests are checked, and answers built, in frontends.openai_api: the server decodes every
request with the run settings it was started with, and refuses (400, one sentence) a request
that asks for other decoding.

The scheduler calls back on its own thread; each request's callbacks are moved onto the event
loop with `loop.call_soon_threadsafe(queue.put_nowait, ...)`.
"""

from __future__ import annotations

import asyncio
import functools
import json
import socket
import sys
import threading
import time
import traceback
import uuid

from fastapi import Request  # module level: FastAPI reads the endpoints' annotations here

from ..io.prompts import PromptItem
from ..spec.errors import UserError
from .openai_api import (ApiError, Decoding, Params, TextStream, bad_request, engine_error,
                         to_jsonable, sse_line, usage_of, c2c_field, parse_request)

#: Largest request body accepted (bytes): a bigger one is a 413 before it is parsed.
MAX_BODY_BYTES = 1 << 20
OWNED_BY = "c2c-workbench"

# --- the app ---------------------------------------------------------------------------------

class _Bridge:
    """One request's scheduler callbacks, moved onto the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()

    def _put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: the server is shutting down
            pass

    def on_token(self, ids) -> None:
        self._put(("tokens", list(ids)))

    def on_done(self, served) -> None:
        self._put(("done", served))


def _error_response(e: ApiError):
    from fastapi.responses import JSONResponse
    return JSONResponse(e.body(), status_code=e.status)


async def _read_json(request, cap: int):
    length = request.headers.get("content-length")
    too_big = ApiError(413, f"the request body is over this server's cap of {cap} bytes; send"
                       " a shorter prompt.", "invalid_request_error", None, "body_too_large")
    if length is not None:
        try:
            if int(length) > cap:
                raise too_big
        except ValueError:
            raise bad_request("the Content-Length header is not a number.") from None
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > cap:
            raise too_big
    try:
        return json.loads(bytes(data))
    except (ValueError, UnicodeDecodeError) as e:
        raise bad_request(
            f"the request body is not valid JSON ({type(e).__name__}: {str(e)[:120]});"
            " send a JSON object.") from None


def make_app(scheduler, name_prefix: str = "", gen=None, max_body: int = MAX_BODY_BYTES):
    """The FastAPI app over `scheduler` (bench.serving.Scheduler's contract). Model ids are
    `name_prefix + mode`. `gen`: the server's decoding settings (a GenerationConfig, or
    `Decoding`; default: the scheduler's `cfg.gen` when it has one, else greedy, EOS
    honoured, no cap known here)."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from ..bench.serving import QueueFull

    if gen is None:
        gen = getattr(getattr(scheduler, "cfg", None), "gen", None)
    dec = Decoding.of(gen)
    models = {f"{name_prefix}{m}": m for m in scheduler.modes}
    created = int(time.time())
    app = FastAPI(title="C2C timing workbench", docs_url=None, redoc_url=None,
                  openapi_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return _error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        msg = (f"{request.method} {request.url.path} is not an endpoint of this server; it"
               " serves GET /v1/models, POST /v1/completions, POST /v1/chat/completions,"
               " GET /health and GET /c2c/stats." if e.status_code in (404, 405)
               else str(e.detail))
        return JSONResponse(ApiError(e.status_code, msg).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _crash(request, e):
        traceback.print_exc()
        return _error_response(ApiError(500, f"the server failed on this request"
                                        f" ({type(e).__name__}); its log has the details.",
                                        "server_error"))

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [
            {"id": mid, "object": "model", "created": created, "owned_by": OWNED_BY}
            for mid in models]}

    @app.get("/health")
    async def health():
        return {"status": "ok", **scheduler.stats()}

    @app.get("/c2c/stats")
    async def stats():
        return scheduler.stats()

    async def handle(request: Request, kind: str):
        body = await _read_json(request, max_body)
        p = parse_request(body, kind, models, dec)
        rid = f"{'cmpl' if kind == 'completion' else 'chatcmpl'}-{uuid.uuid4().hex[:24]}"
        item = PromptItem(id=f"{rid}", prompt=p.prompt, source="serve")
        bridge = _Bridge(asyncio.get_running_loop())
        try:
            # off the event loop: a submit tokenizes (and aligns) the prompt, and may wait for
            # the tokenizer lock while the engine uses it
            ticket = await asyncio.get_running_loop().run_in_executor(None, functools.partial(
                scheduler.submit, p.mode, item, p.max_tokens, on_token=bridge.on_token,
                on_done=bridge.on_done))
        except QueueFull as e:
            raise ApiError(429, f"{e} Retry later, or start the server with a larger"
                           " --max_queue or --slots." if str(e) else
                           "the server's queue is full; retry later, or start it with a larger"
                           " --max_queue or --slots.", "rate_limit_error", None,
                           "queue_full") from None
        except UserError as e:
            raise bad_request(str(e)) from None
        req = _Request(kind, rid, p, ticket, bridge, scheduler.tokenizer(p.mode), dec,
                       getattr(scheduler, "tok_lock", None))
        if p.stream:
            return _SSEResponse(req)
        return await req.complete(request)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, "completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, "chat")

    app.state.scheduler = scheduler
    app.state.models = list(models)
    return app


class _Request:
    """One accepted request: builds its chunks or its one answer from the bridge's events."""

    def __init__(self, kind, rid, params: Params, ticket, bridge: _Bridge, tokenizer,
                 dec: Decoding, lock=None):
        self.kind, self.rid, self.p, self.ticket, self.bridge = kind, rid, params, ticket, bridge
        self.text = TextStream(tokenizer, lock)
        self.dec = dec
        self.created = int(time.time())
        self.finished = False
        self.count = 0  # tokens so far

    def _base(self, obj: str) -> dict:
        return {"id": self.rid, "object": obj, "created": self.created, "model": self.p.model}

    def _chunk(self, text: str | None, finish: str | None = None, role: bool = False) -> dict:
        if self.kind == "completion":
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            out = self._base("text_completion")
        else:
            delta: dict = {"role": "assistant", "content": ""} if role else {}
            if text:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            out = self._base("chat.completion.chunk")
        out["choices"] = [choice]
        return out

    def cancel(self) -> None:
        if not self.finished:
            self.finished = True
            try:
                self.ticket.cancel()
            except Exception:  # noqa: BLE001 - the client is gone; nothing to tell it
                traceback.print_exc()

    async def events(self):
        """The SSE byte chunks of a streamed answer."""
        q = self.bridge.queue
        started = False
        while True:
            kind, data = await q.get()
            if kind == "tokens":
                self.count += len(data)
                new = self.text.push(data)
                if not started and self.kind == "chat":
                    started = True
                    yield sse_line(self._chunk(None, role=True))
                if new:  # (usage needs the prompt's token count: it comes with the last chunk)
                    yield sse_line(self._chunk(new))
                continue
            served = data
            self.finished = True
            if served.finish_reason in ("error", "abort"):
                e = engine_error(served)
                print(f"serve: {e.message}", file=sys.stderr)
                yield sse_line(e.body())
                yield b"data: [DONE]\n\n"
                return
            usage = usage_of(served.prompt_tokens, len(served.tokens))
            c2c = c2c_field(served, self.dec)
            if not started and self.kind == "chat":
                yield sse_line(self._chunk(None, role=True))
            last = self._chunk(self.text.finish(served.tokens), served.finish_reason)
            last["c2c"] = c2c
            if self.p.continuous_usage:
                last["usage"] = usage
            yield sse_line(last)
            if self.p.include_usage:
                u = self._base("text_completion" if self.kind == "completion"
                               else "chat.completion.chunk")
                u.update(choices=[], usage=usage, c2c=c2c)
                yield sse_line(u)
            yield b"data: [DONE]\n\n"
            return

    async def complete(self, request):
        """The one JSON answer; the ticket is cancelled if the client leaves first."""
        from fastapi.responses import JSONResponse
        q = self.bridge.queue
        watch = asyncio.ensure_future(_disconnected(request))
        try:
            while True:
                get = asyncio.ensure_future(q.get())
                await asyncio.wait({get, watch}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    self.cancel()
                    return JSONResponse(ApiError(499, "the client closed the request.").body(),
                                        status_code=499)
                kind, data = get.result()
                if kind == "done":
                    break
        finally:
            watch.cancel()
        served = data
        self.finished = True
        if served.finish_reason in ("error", "abort"):
            raise engine_error(served)
        text = self.text.finish(served.tokens)
        if self.kind == "completion":
            choice = {"index": 0, "text": text, "logprobs": None,
                      "finish_reason": served.finish_reason}
            out = self._base("text_completion")
        else:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": None, "finish_reason": served.finish_reason}
            out = self._base("chat.completion")
        out.update(choices=[choice], usage=usage_of(served.prompt_tokens, len(served.tokens)),
                   c2c=c2c_field(served, self.dec))
        return JSONResponse(json.loads(json.dumps(out, default=to_jsonable)))


async def _disconnected(request) -> None:
    """Returns once the client has gone (the body is already read)."""
    while True:
        message = await request.receive()
        if message.get("type") == "http.disconnect":
            return


def _sse_response_class():
    from starlette.responses import StreamingResponse

    class SSEResponse(StreamingResponse):
        """Server-sent events from a `_Request`; a client that leaves (noticed while waiting
        as well as on a failed write) cancels the request's ticket."""

        def __init__(self, req: _Request):
            super().__init__(req.events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            self.req = req

        async def __call__(self, scope, receive, send) -> None:
            import anyio
            gen = self.body_iterator
            try:
                async with anyio.create_task_group() as tg:
                    async def watch():
                        while True:
                            message = await receive()
                            if message.get("type") == "http.disconnect":
                                self.req.cancel()
                                tg.cancel_scope.cancel()
                                return

                    tg.start_soon(watch)
                    try:
                        await send({"type": "http.response.start", "status": 200,
                                    "headers": self.raw_headers})
                        async for chunk in gen:
                            await send({"type": "http.response.body", "body": chunk,
                                        "more_body": True})
                        await send({"type": "http.response.body", "body": b"",
                                    "more_body": False})
                    except OSError:  # the client went away between two writes
                        pass
                    tg.cancel_scope.cancel()
            finally:
                self.req.cancel()  # no-op once finished
                await gen.aclose()

    return SSEResponse


def _SSEResponse(req: _Request):
    global _SSE_CLASS
    if _SSE_CLASS is None:
        _SSE_CLASS = _sse_response_class()
    return _SSE_CLASS(req)


_SSE_CLASS = None


# --- the server in a thread --------------------------------------------------------------------

class ServerHandle:
    """A running server: `.url`, `.port`, `.host`, `.close()`."""

    def __init__(self, server, thread: threading.Thread, host: str, port: int):
        self.server, self.thread, self.host, self.port = server, thread, host, port
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else ("::1" if host == "::" else host)
        self.url = f"http://{f'[{shown}]' if ':' in shown else shown}:{port}"

    closing = False

    def close(self, timeout: float = 10.0) -> None:
        self.closing = True
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self) -> "ServerHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def bind_socket(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A listening-ready socket bound to host:port (0: any free port), or one UserError."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e}); pick another"
                        " --port (0 = any free port) or --host.") from None
    sock.set_inheritable(True)
    return sock


def start_server(scheduler, host: str = "127.0.0.1", port: int = 0, sock=None,
                 **app_kwargs) -> ServerHandle:
    """Serve `make_app(scheduler, **app_kwargs)` with uvicorn in a background thread; returns
    once it accepts connections. `sock`: an already bound socket (bind_socket) instead of
    host/port."""
    import uvicorn
    if sock is None:
        sock = bind_socket(host, port)
    bound_host, bound_port = sock.getsockname()[:2]
    app = make_app(scheduler, **app_kwargs)
    config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False,
                            timeout_graceful_shutdown=3)
    server = uvicorn.Server(config)
    failed: list[BaseException] = []

    def run():
        try:
            server.run(sockets=[sock])
        except BaseException as e:  # noqa: BLE001 - said to the caller below
            failed.append(e)
        finally:
            sock.close()

    thread = threading.Thread(target=run, name="c2c-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if failed or not thread.is_alive():
            raise UserError(f"the HTTP server on {bound_host}:{bound_port} did not start"
                            f" ({failed[0] if failed else 'it stopped'}).")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise UserError(f"the HTTP server on {bound_host}:{bound_port} did not start in"
                            " 30 s.")
        time.sleep(0.02)
    return ServerHandle(server, thread, host if host else bound_host, bound_port)


# --- the command -------------------------------------------------------------------------------

def check_serve_args(args) -> None:
    for name, low in (("slots", 1), ("max_queue", 1), ("max_prompt_tokens", 1)):
        v = getattr(args, name)
        if v < low:
            raise UserError(f"--{name} {v} is too small; give at least {low}.")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port {args.port} is not a port; give 0 to 65535 (0 = any free).")


def serve_main(args, cfg, on_ready=None) -> int:
    """Bind, load the models and every decode shape, serve until Ctrl-C (or, for tests, until
    the handle given to `on_ready` is closed)."""
    check_serve_args(args)
    sock = bind_socket(args.host, args.port)  # a port in use is said before any model loads
    writer = None
    scheduler = None
    handle = None
    try:
        if args.records:
            from ..io.fileio import lock_output
            from ..io.records import JsonlWriter
            args._output_lock = lock_output(args.records)
            writer = JsonlWriter(args.records)
        from ..bench.serving import load_scheduler
        scheduler = load_scheduler(cfg, slots=args.slots, max_queue=args.max_queue,
                                   max_prompt_tokens=args.max_prompt_tokens, writer=writer)
        handle = start_server(scheduler, sock=sock, host=args.host, gen=cfg.gen)
        sock = None
        models = list(scheduler.modes)
        if args.host in ("0.0.0.0", "::", ""):
            print(f"Warning: --host {args.host} makes this server reachable from the network,"
                  " and it has no authentication: anyone who can reach the port can use the"
                  " models.", file=sys.stderr)
        print(f"Serving {', '.join(models)} on {handle.url} (OpenAI API: {handle.url}/v1;"
              f" {args.slots} slots, queue {args.max_queue}, prompts up to"
              f" {args.max_prompt_tokens} tokens, max_tokens up to {cfg.gen.max_new_tokens}"
              f"{f'; records in {args.records}' if args.records else ''}). Ctrl-C stops it.")
        print(f"  curl {handle.url}/v1/completions -H 'Content-Type: application/json' -d"
              f" '{{\"model\": \"{models[0]}\", \"prompt\": \"What is 25 * 17?\","
              f" \"max_tokens\": 16}}'", flush=True)
        if on_ready is not None:
            on_ready(handle)
        while handle.thread.is_alive():
            handle.thread.join(0.5)
        if handle.closing:
            return 0
        print("The HTTP server stopped on its own; see the lines above.", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nStopping the server.", file=sys.stderr)
        return 0
    finally:
        if handle is not None:
            handle.close()
        if sock is not None:
            sock.close()
        if scheduler is not None:
            scheduler.close()
        if writer is not None:
            writer.close()
