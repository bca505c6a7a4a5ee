"""A fake OpenAI-compatible completions server for the load tests: known delays, no model.

`FakeServer(ttft_s=0.08, itl_s=0.02, tokens=4)` streams `tokens` text chunks, the first after
`ttft_s` and each next `itl_s` later, then a usage chunk (with the `c2c` object of our `serve`
when `c2c=True`) and `data: [DONE]`. `slots=1` serves one request at a time (the others wait
on a semaphore: a queue that grows when requests come faster than `ttft_s + tokens*itl_s`);
`status=429` refuses every request as a full queue. Runs uvicorn on a free port in a process of
its own (`FakeServer.process`), so that the client under test does not share its interpreter
lock: a client stalled by the server's thread would read chunks late and together.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

MODELS = ("c2c", "t2t", "receiver", "sharer")


class FakeServer:
    """In-process server (a thread); use `FakeServer.process(...)` for one in its own process."""

    def __init__(self, ttft_s: float = 0.08, itl_s: float = 0.02, tokens: int = 4,
                 slots: int | None = None, status: int = 200, c2c: bool = True,
                 chat: bool = False):
        self.ttft_s, self.itl_s, self.tokens = ttft_s, itl_s, tokens
        self.slots, self.status, self.c2c = slots, status, c2c
        self.requests = 0
        self._sem: asyncio.Semaphore | None = None
        routes = [Route("/v1/models", self.models, methods=["GET"]),
                  Route("/v1/completions", self.completions, methods=["POST"]),
                  Route("/v1/chat/completions", self.completions, methods=["POST"])]
        self.app = Starlette(routes=routes)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.app, log_level="warning", loop="asyncio", http="h11",
                                lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)

    def __enter__(self) -> "FakeServer":
        self.thread.start()
        deadline = time.time() + 10
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError("fake server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()

    async def models(self, request: Request):
        return JSONResponse({"object": "list", "data": [
            {"id": m, "object": "model", "created": 0, "owned_by": "c2c"} for m in MODELS]})

    async def completions(self, request: Request):
        body = await request.json()
        self.requests += 1
        rid = f"cmpl-{self.requests}"
        chat = request.url.path.endswith("/chat/completions")
        if self.status != 200:
            return JSONResponse({"error": {"message": "the queue is full", "type":
                                           "rate_limit_exceeded", "code": self.status}},
                                status_code=self.status)
        if self._sem is None and self.slots:
            self._sem = asyncio.Semaphore(self.slots)
        arrived = time.perf_counter()
        n = min(int(body.get("max_tokens") or self.tokens), self.tokens)
        model = body.get("model", "c2c")
        stream = body.get("stream", False)

        def chunk(text: str | None, finish: str | None = None, usage: dict | None = None,
                  extra: dict | None = None) -> str:
            if chat:
                choices = [] if text is None else [
                    {"index": 0, "delta": {"content": text}, "finish_reason": finish}]
                obj = {"id": rid, "object": "chat.completion.chunk", "created": 0,
                       "model": model, "choices": choices}
            else:
                choices = [] if text is None else [
                    {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]
                obj = {"id": rid, "object": "text_completion", "created": 0, "model": model,
                       "choices": choices}
            if usage is not None:
                obj["usage"] = usage
            if extra:
                obj.update(extra)
            return f"data: {json.dumps(obj)}\n\n"

        prompt_tokens = len(str(body.get("prompt") or body.get("messages") or "").split())

        async def gen():
            if self._sem is not None:
                await self._sem.acquire()
            try:
                queue_ms = (time.perf_counter() - arrived) * 1000
                await asyncio.sleep(self.ttft_s)
                for i in range(n):
                    if i:
                        await asyncio.sleep(self.itl_s)
                    yield chunk(f" tok{i}", "length" if i == n - 1 else None)
                usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n,
                         "total_tokens": prompt_tokens + n}
                extra = None
                if self.c2c:
                    ttft = queue_ms + self.ttft_s * 1000
                    extra = {"c2c": {"rid": rid, "mode": model, "queue_ms": round(queue_ms, 3),
                                     "ttft_ms": round(ttft, 3),
                                     "e2e_ms": round(ttft + (n - 1) * self.itl_s * 1000, 3),
                                     "stages": {"teacher_prefill_ms": self.ttft_s * 400,
                                                "projector_total_ms": self.ttft_s * 100,
                                                "base_prefill_ms": self.ttft_s * 300}}}
                yield chunk(None, usage=usage, extra=extra)
                yield "data: [DONE]\n\n"
            finally:
                if self._sem is not None:
                    self._sem.release()

        if not stream:  # guidellm may ask without streaming
            text = "".join(f" tok{i}" for i in range(n))
            await asyncio.sleep(self.ttft_s + self.itl_s * max(n - 1, 0))
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n,
                     "total_tokens": prompt_tokens + n}
            choice = ({"index": 0, "message": {"role": "assistant", "content": text},
                       "finish_reason": "length"} if chat else
                      {"index": 0, "text": text, "finish_reason": "length"})
            return JSONResponse({"id": rid, "object": "text_completion", "model": model,
                                 "choices": [choice], "usage": usage})
        return StreamingResponse(gen(), media_type="text/event-stream")


class _ServerProcess:
    """A FakeServer in a child process: `.url`, a context manager; stopped at exit."""

    def __init__(self, **kw):
        self.kw = kw
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def __enter__(self) -> "_ServerProcess":
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), json.dumps(self.kw)],
                                     stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().strip()
        if not line.startswith("http://"):
            self.proc.kill()
            raise RuntimeError(f"fake server did not start: {line!r}")
        self.url = line
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc.stdout.close()


def process(**kw) -> _ServerProcess:
    """FakeServer(**kw) in a process of its own."""
    return _ServerProcess(**kw)


FakeServer.process = staticmethod(process)


if __name__ == "__main__":  # the child of _ServerProcess: serve until terminated
    import signal
    srv = FakeServer(**json.loads(sys.argv[1]))
    signal.signal(signal.SIGTERM, lambda *a: setattr(srv.server, "should_exit", True))
    with srv:
        print(srv.url, flush=True)
        srv.thread.join()
