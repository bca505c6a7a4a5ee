"""`serve`: the OpenAI-compatible HTTP server (frontends.serve) over a fake scheduler that keeps
bench.serving's contract (tokens from its own thread with small sleeps, on_token/on_done on
that thread, QueueFull, UserError for an unknown mode or a max_new_tokens over the cap, a
Ticket whose cancel() stops the request). No model loads: fast.

- /v1/models lists one model per mode; /health and /c2c/stats carry the scheduler's stats;
- completions and chat, streamed (SSE parsed by hand, and through the `openai` client) and
  not: the text, usage counts, finish reasons, the `c2c` field;
- text split mid-character over byte tokens streams whole (no U+FFFD, the same text);
- every error path is an OpenAI error object with one sentence: unknown model, bad JSON,
  a prompt list of two, a body over the cap (by Content-Length and by the bytes read), the
  temperature rule, ignore_eos, unsupported fields, chat shapes, QueueFull -> 429, an engine
  error -> 500 without a traceback;
- a client that leaves mid-stream (or while waiting for a non-streamed answer) cancels its
  ticket;
- the `serve` command: a port in use is one sentence before any model loads; it serves,
  warns on 0.0.0.0 and closes cleanly.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
import types
from dataclasses import dataclass, field

import httpx
import pytest

from c2c_core.spec.errors import UserError

try:  # the real contract, once bench.serving is merged
    from c2c_core.bench.serving import QueueFull
    import c2c_core.bench.serving as serving_mod
except ImportError:  # before: a stand-in module with the contract's exception
    serving_mod = types.ModuleType("c2c_core.bench.serving")

    class QueueFull(UserError):
        """The queue already holds max_queue requests."""

    serving_mod.QueueFull = QueueFull
    sys.modules["c2c_core.bench.serving"] = serving_mod

from conftest import HANG_S, build_tokenizer  # noqa: E402

from c2c_core.frontends import serve  # noqa: E402

MODES = ["c2c", "t2t", "receiver", "sharer"]
#: Non-ASCII on purpose: the byte-level tokenizer splits each of these characters over tokens.
REPLY = "Paris is the capital of France. ¡Olé! 😀 日本語 — ok"


@dataclass
class FakeServed:
    rid: str
    mode: str
    prompt_tokens: int
    tokens: list
    finish_reason: str
    arrival_ns: int
    admitted_ns: int
    first_ns: int
    end_ns: int
    token_ns: list
    stages: dict
    error: str | None = None
    record: dict | None = None

    @property
    def queue_ms(self):
        return (self.admitted_ns - self.arrival_ns) / 1e6

    @property
    def ttft_ms(self):
        return (self.first_ns - self.arrival_ns) / 1e6 if self.tokens else None

    @property
    def e2e_ms(self):
        return (self.end_ns - self.arrival_ns) / 1e6

    @property
    def tpot_ms(self):
        n = len(self.tokens)
        return (self.end_ns - self.first_ns) / (n - 1) / 1e6 if n > 1 else None

    @property
    def itl_ms(self):
        return [(b - a) / 1e6 for a, b in zip(self.token_ns, self.token_ns[1:])]


class FakeTicket:
    def __init__(self, rid):
        self.rid = rid
        self.cancelled = threading.Event()
        self.done = threading.Event()
        self.served = None

    def cancel(self):
        self.cancelled.set()

    def wait(self, timeout=None):
        self.done.wait(timeout)
        return self.served


class FakeScheduler:
    """bench.serving.Scheduler's contract: each request decodes `reply` (then EOS) on a thread
    of its own, one token every `delay` seconds."""

    def __init__(self, tok, reply=REPLY, delay=0.002, cap=64, modes=MODES):
        self.tok, self.delay, self.cap, self.modes, self.slots = tok, delay, cap, list(modes), 8
        self.reply_ids = tok.encode(reply, add_special_tokens=False)
        self.full = False  # submit raises QueueFull
        self.fail_after = None  # tokens before an engine error
        self.items: list = []
        self.tickets: list[FakeTicket] = []
        self.served = 0
        self.lock = threading.Lock()

    def tokenizer(self, mode):
        return self.tok

    def stats(self):
        return {"slots": self.slots, "active": 0, "queued": 0, "served": self.served,
                "rejected": 0, "steps": 0}

    def submit(self, mode, item, max_new_tokens, on_token=None, on_done=None):
        if mode not in self.modes:
            raise UserError(f"mode {mode!r} is not served; serve one of {', '.join(self.modes)}.")
        if max_new_tokens > self.cap:
            raise UserError(f"max_new_tokens {max_new_tokens} is above the server's"
                            f" --max_new_tokens {self.cap}.")
        if self.full:
            raise QueueFull("the queue already holds 2 requests (--max_queue 2).")
        with self.lock:
            ticket = FakeTicket(f"r{len(self.tickets) + 1}")
            self.items.append(item)
            self.tickets.append(ticket)
        threading.Thread(target=self._run, args=(ticket, mode, item, max_new_tokens, on_token,
                                                 on_done), daemon=True).start()
        return ticket

    def _run(self, ticket, mode, item, max_new, on_token, on_done):
        arrival = time.perf_counter_ns()
        time.sleep(self.delay)
        admitted = time.perf_counter_ns()
        ids = (self.reply_ids + [self.tok.eos_token_id])[:max_new]
        out, when, finish, error = [], [], "length", None
        stop = len(self.reply_ids) + 1 <= max_new
        for i, t in enumerate(ids):
            if ticket.cancelled.is_set():
                finish = "abort"
                break
            if self.fail_after is not None and i == self.fail_after:
                finish, error = "error", ("CUDA error: device-side assert triggered\nTraceback"
                                          " (most recent call last):\n  File x.py")
                break
            time.sleep(self.delay)
            out.append(t)
            when.append(time.perf_counter_ns())
            if on_token:
                on_token([t])
        else:
            finish = "stop" if stop else "length"
        end = time.perf_counter_ns()
        served = FakeServed(ticket.rid, mode, len(self.tok.encode(item.prompt)), out, finish,
                            arrival, admitted, when[0] if when else end, end, when,
                            {"teacher_prefill_ms": 1.5, "projector_total_ms": 0.25,
                             "base_prefill_ms": 2.0}, error)
        ticket.served = served
        self.served += 1
        ticket.done.set()
        if on_done:
            on_done(served)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_tokenizer(str(tmp_path_factory.mktemp("serve_tok")))


@pytest.fixture(scope="module")
def sched(tok):
    return FakeScheduler(tok)


@pytest.fixture(scope="module")
def url(sched):
    with serve.start_server(sched, gen=serve.Decoding(max_new_tokens=64)) as h:
        yield h.url


def _events(text: str) -> list:
    """SSE `data:` payloads, parsed by hand; every event ends with a blank line."""
    assert text.endswith("\n\n")
    out = []
    for block in text.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        payload = block[len("data: "):]
        out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def _error(r: httpx.Response, status: int, type_: str = "invalid_request_error") -> str:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["type"] == type_ and set(err) == {"message", "type", "param", "code"}
    assert "Traceback" not in err["message"]
    return err["message"]


# --- the endpoints ----------------------------------------------------------------------------

def test_models_list_each_mode_and_health(url):
    r = httpx.get(f"{url}/v1/models")
    body = r.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == MODES
    assert {m["owned_by"] for m in body["data"]} == {"c2c-workbench"}
    assert {m["object"] for m in body["data"]} == {"model"}
    h = httpx.get(f"{url}/health").json()
    assert h["status"] == "ok" and h["slots"] == 8 and "served" in h
    s = httpx.get(f"{url}/c2c/stats").json()
    assert set(s) == {"slots", "active", "queued", "served", "rejected", "steps"}


def test_completion_not_streamed(url, sched, tok):
    r = httpx.post(f"{url}/v1/completions", json={"model": "c2c", "prompt": ["What is 25 * 17?"],
                                                    "max_tokens": 64, "temperature": 0,
                                                    "user": "u", "n": 1, "echo": False,
                                                    "logprobs": None})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == "c2c"
    choice = body["choices"][0]
    assert choice["text"] == REPLY and choice["finish_reason"] == "stop"
    n = len(sched.reply_ids) + 1  # the EOS counts as a generated token, never shown
    prompt_n = len(tok.encode("What is 25 * 17?"))
    assert body["usage"] == {"prompt_tokens": prompt_n, "completion_tokens": n,
                             "total_tokens": prompt_n + n}
    c2c = body["c2c"]
    assert c2c["mode"] == "c2c" and c2c["rid"].startswith("r")
    assert c2c["queue_ms"] > 0 and c2c["ttft_ms"] >= c2c["queue_ms"]
    assert c2c["e2e_ms"] >= c2c["ttft_ms"]
    assert c2c["stages"] == {"teacher_prefill_ms": 1.5, "projector_total_ms": 0.25,
                             "base_prefill_ms": 2.0}
    assert c2c["decoding"]["do_sample"] is False
    item = sched.items[-1]
    assert item.prompt == "What is 25 * 17?" and item.source == "serve"


def test_completion_default_max_tokens_is_16(url, sched):
    r = httpx.post(f"{url}/v1/completions", json={"model": "receiver", "prompt": "Hi"})
    body = r.json()
    assert body["usage"]["completion_tokens"] == 16
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["c2c"]["mode"] == "receiver"


def test_chat_not_streamed_joins_system_and_user(url, sched):
    r = httpx.post(f"{url}/v1/chat/completions", json={
        "model": "t2t", "max_completion_tokens": 20,
        "messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": [{"type": "text", "text": "Capital of"},
                                                  {"type": "text", "text": "France?"}]}]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    msg = body["choices"][0]["message"]
    assert msg["role"] == "assistant"
    assert REPLY.startswith(msg["content"]) and len(msg["content"]) > 10
    assert body["usage"]["completion_tokens"] == 20
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["c2c"]["mode"] == "t2t"
    assert sched.items[-1].prompt == "Be brief.\n\nCapital of\nFrance?"


def test_chat_default_max_tokens_is_the_server_cap(url):
    r = httpx.post(f"{url}/v1/chat/completions", json={
        "model": "sharer", "messages": [{"role": "user", "content": "Hi"}]})
    assert r.json()["choices"][0]["finish_reason"] == "stop"  # the whole reply fits in 64


def test_completion_streamed_by_hand(url, sched):
    r = httpx.post(f"{url}/v1/completions", json={
        "model": "c2c", "prompt": "Tell me", "max_tokens": 64, "stream": True,
        "stream_options": {"include_usage": True}})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    ev = _events(r.text)
    assert ev[-1] == "[DONE]"
    usage_chunk, chunks = ev[-2], ev[:-2]
    assert usage_chunk["choices"] == [] and usage_chunk["object"] == "text_completion"
    n = len(sched.reply_ids) + 1
    assert usage_chunk["usage"]["completion_tokens"] == n
    assert usage_chunk["usage"]["total_tokens"] == n + usage_chunk["usage"]["prompt_tokens"]
    assert usage_chunk["c2c"]["mode"] == "c2c" and "stages" in usage_chunk["c2c"]
    texts = [c["choices"][0]["text"] for c in chunks]
    assert "".join(texts) == REPLY
    assert not any("\ufffd" in t for t in texts)
    assert len(chunks) > 10  # streamed token by token, not in one piece
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["c2c"]["rid"] == usage_chunk["c2c"]["rid"]
    assert len({c["id"] for c in ev[:-1]}) == 1


def test_chat_streamed_by_hand_without_usage(url):
    r = httpx.post(f"{url}/v1/chat/completions", json={
        "model": "c2c", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 20,
        "stream": True})
    ev = _events(r.text)
    assert ev[-1] == "[DONE]"
    chunks = ev[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:])
    assert all("usage" not in c for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert REPLY.startswith(text) and len(text) > 5
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["c2c"]["mode"] == "c2c"


def test_openai_client_streams_and_reads_c2c(url, sched):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == MODES
    pieces, usage, finish = [], None, None
    for ch in client.completions.create(model="c2c", prompt="Say", max_tokens=64, stream=True,
                                        stream_options={"include_usage": True}):
        if ch.choices:
            pieces.append(ch.choices[0].text)
            finish = ch.choices[0].finish_reason or finish
        if ch.usage:
            usage = ch.usage
    assert "".join(pieces) == REPLY and finish == "stop"
    assert usage.completion_tokens == len(sched.reply_ids) + 1
    pieces, role, last = [], None, None
    for ch in client.chat.completions.create(
            model="sharer", messages=[{"role": "user", "content": "Hi"}], max_tokens=64,
            stream=True, temperature=0):
        role = role or ch.choices[0].delta.role
        pieces.append(ch.choices[0].delta.content or "")
        last = ch
    assert role == "assistant" and "".join(pieces) == REPLY
    assert last.choices[0].finish_reason == "stop"
    assert last.model_extra["c2c"]["mode"] == "sharer"
    resp = client.chat.completions.create(model="receiver", max_tokens=64,
                                          messages=[{"role": "user", "content": "Hi"}])
    assert resp.choices[0].message.content == REPLY
    assert resp.usage.completion_tokens == len(sched.reply_ids) + 1
    assert resp.model_extra["c2c"]["ttft_ms"] > 0
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="nope", prompt="x")
    assert "c2c, t2t, receiver, sharer" in str(e.value)


def test_concurrent_streams_each_get_their_own_text(tok):
    """12 streams at once over every mode, each scheduler thread calling back at its own pace:
    every stream gets its whole reply, its own mode and rid, and its usage."""
    sched = FakeScheduler(tok, delay=0.004)
    results: dict = {}

    def one(i):
        mode = MODES[i % len(MODES)]
        r = httpx.post(f"{h.url}/v1/chat/completions", timeout=30, json={
            "model": mode, "messages": [{"role": "developer", "content": f"s{i}"},
                                        {"role": "user", "content": f"q{i}"}],
            "stream": True, "stream_options": {"include_usage": True}})
        results[i] = (mode, _events(r.text))

    with serve.start_server(sched, gen=serve.Decoding(max_new_tokens=64)) as h:
        threads = [threading.Thread(target=one, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert len(results) == 12
    rids = set()
    for mode, ev in results.values():
        chunks, usage = ev[:-2], ev[-2]
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == REPLY
        assert usage["c2c"]["mode"] == mode
        assert usage["usage"]["completion_tokens"] == len(sched.reply_ids) + 1
        rids.add(usage["c2c"]["rid"])
    assert len(rids) == 12
    assert sorted(it.prompt for it in sched.items) == sorted(f"s{i}\n\nq{i}" for i in range(12))


def test_text_stream_holds_back_split_characters(tok):
    ids = tok.encode(REPLY, add_special_tokens=False)
    assert len(ids) > len(REPLY.encode()) // 2  # the non-ASCII text really is in byte tokens
    ts = serve.TextStream(tok)
    pieces = [ts.push([i]) for i in ids]
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) + ts.finish() == REPLY
    assert "" in pieces  # some token ended mid-character and was held back
    ts = serve.TextStream(tok)  # tokens in bigger steps, and finish() given all the ids
    pieces = [ts.push(ids[i:i + 3]) for i in range(0, len(ids), 3)]
    assert "".join(pieces) + ts.finish(ids) == REPLY


# --- errors -------------------------------------------------------------------------------------

def test_unknown_model_lists_the_served_ones(url):
    msg = _error(httpx.post(f"{url}/v1/completions", json={"model": "gpt-4", "prompt": "x"}), 400)
    assert "gpt-4" in msg and "c2c, t2t, receiver, sharer" in msg
    msg = _error(httpx.post(f"{url}/v1/completions", json={"prompt": "x"}), 400)
    assert "model" in msg


def test_bad_json_and_bad_bodies(url):
    r = httpx.post(f"{url}/v1/completions", content=b'{"model": "c2c", "prompt": ',
                   headers={"Content-Type": "application/json"})
    assert "not valid JSON" in _error(r, 400)
    r = httpx.post(f"{url}/v1/completions", content=b"[1, 2]")
    assert "JSON object" in _error(r, 400)
    r = httpx.post(f"{url}/v1/completions", content=b"\xff\xfe")
    assert "not valid JSON" in _error(r, 400)


def test_prompt_must_be_one_string(url):
    for prompt in (["a", "b"], [1, 2, 3], [], None, 5):
        r = httpx.post(f"{url}/v1/completions", json={"model": "c2c", "prompt": prompt})
        msg = _error(r, 400)
        assert "exactly one string" in msg and r.json()["error"]["param"] == "prompt"
    r = httpx.post(f"{url}/v1/completions", json={"model": "c2c", "prompt": "  "})
    assert "empty" in _error(r, 400)


def test_body_over_the_cap_is_413(url):
    big = json.dumps({"model": "c2c", "prompt": "x" * (serve.MAX_BODY_BYTES + 10)}).encode()
    msg = _error(httpx.post(f"{url}/v1/completions", content=big), 413)
    assert str(serve.MAX_BODY_BYTES) in msg

    def chunks():  # no Content-Length: the bytes read are counted
        for _ in range(40):
            yield b"x" * 32768
    r = httpx.post(f"{url}/v1/completions", content=chunks())
    assert "content-length" not in r.request.headers
    _error(r, 413)


def test_temperature_rule_on_a_greedy_server(url):
    r = httpx.post(f"{url}/v1/completions", json={"model": "c2c", "prompt": "x",
                                                  "temperature": 0.7})
    msg = _error(r, 400)
    assert "greedily" in msg and "--do_sample --temperature" in msg
    assert r.json()["error"]["param"] == "temperature"
    for ok in ({"temperature": 0}, {"temperature": 0.0, "top_p": 1.0}, {"top_p": 0.9}):
        r = httpx.post(f"{url}/v1/completions", json={"model": "c2c", "prompt": "x",
                                                      "max_tokens": 2, **ok})
        assert r.status_code == 200, (ok, r.text)


def test_sampling_server_takes_only_its_own_settings(tok):
    sched = FakeScheduler(tok)
    dec = serve.Decoding(max_new_tokens=8, do_sample=True, temperature=0.7, top_p=0.9)
    with serve.start_server(sched, gen=dec) as h:
        for ok in ({}, {"temperature": 0.7}, {"temperature": 0.7, "top_p": 0.9}):
            r = httpx.post(f"{h.url}/v1/completions", json={"model": "c2c", "prompt": "x", **ok})
            assert r.status_code == 200, r.text
            assert r.json()["c2c"]["decoding"]["temperature"] == 0.7
        r = httpx.post(f"{h.url}/v1/completions", json={"model": "c2c", "prompt": "x",
                                                        "temperature": 0})
        assert "temperature 0.7" in _error(r, 400)
        r = httpx.post(f"{h.url}/v1/completions", json={"model": "c2c", "prompt": "x",
                                                        "max_tokens": 9})
        assert "cap of 8" in _error(r, 400)


def test_ignore_eos_needs_a_server_that_ignores_eos(url, tok):
    r = httpx.post(f"{url}/v1/completions", json={"model": "c2c", "prompt": "x",
                                                  "ignore_eos": True})
    assert "--ignore_eos" in _error(r, 400)
    r = httpx.post(f"{url}/v1/completions", json={"model": "c2c", "prompt": "x",
                                                  "min_tokens": 5})
    assert "--ignore_eos" in _error(r, 400)
    r = httpx.post(f"{url}/v1/completions", json={"model": "c2c", "prompt": "x", "max_tokens": 2,
                                                  "ignore_eos": False, "min_tokens": 0})
    assert r.status_code == 200
    with serve.start_server(FakeScheduler(tok), gen=serve.Decoding(ignore_eos=True)) as h:
        r = httpx.post(f"{h.url}/v1/chat/completions", json={  # guidellm's fixed-length body
            "model": "c2c", "messages": [{"role": "user", "content": "x"}],
            "max_completion_tokens": 4, "stop": None, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
        ev = _events(r.text)
        assert ev[-2]["usage"]["completion_tokens"] == 4
        assert ev[-3]["usage"]["completion_tokens"] == 4  # continuous: on the last chunk too
        assert ev[-2]["c2c"]["decoding"]["ignore_eos"] is True


def test_unsupported_fields_are_refused(url):
    for extra, param in (({"n": 2}, "n"), ({"stop": ["\n"]}, "stop"),
                         ({"logprobs": 3}, "logprobs"), ({"best_of": 2}, "best_of"),
                         ({"frequency_penalty": 0.5}, "frequency_penalty"),
                         ({"echo": True}, "echo"), ({"guided_json": {}}, "guided_json")):
        r = httpx.post(f"{url}/v1/completions", json={"model": "c2c", "prompt": "x", **extra})
        _error(r, 400)
        assert r.json()["error"]["param"] == param, extra
    r = httpx.post(f"{url}/v1/completions", json={"model": "c2c", "prompt": "x",
                                                  "max_tokens": 0})
    assert "max_tokens" in _error(r, 400)
    r = httpx.post(f"{url}/v1/completions", json={"model": "c2c", "prompt": "x",
                                                  "max_tokens": 65})
    assert "cap of 64" in _error(r, 400)


def test_chat_shapes_other_than_system_then_user_are_refused(url):
    bad = [[],
           [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
           [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"}],
           [{"role": "system", "content": "s"}],
           [{"role": "assistant", "content": "a"}],
           [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
           [{"role": "user", "content": 5}],
           "hello"]
    for messages in bad:
        r = httpx.post(f"{url}/v1/chat/completions", json={"model": "c2c", "messages": messages})
        msg = _error(r, 400)
        assert "one user message" in msg or "string or a list" in msg, (messages, msg)


def test_bad_sampling_values_and_model_prefix(tok):
    with serve.start_server(FakeScheduler(tok), name_prefix="smol/") as h:
        assert [m["id"] for m in httpx.get(f"{h.url}/v1/models").json()["data"]] == [
            f"smol/{m}" for m in MODES]
        r = httpx.post(f"{h.url}/v1/completions", json={"model": "smol/t2t", "prompt": "x",
                                                        "max_tokens": 2})
        assert r.json()["c2c"]["mode"] == "t2t" and r.json()["model"] == "smol/t2t"
        assert "smol/c2c" in _error(httpx.post(f"{h.url}/v1/completions", json={
            "model": "c2c", "prompt": "x"}), 400)
        for bad in ({"top_p": "high"}, {"top_p": 0}, {"top_k": 1.5}, {"temperature": -1},
                    {"temperature": "hot"}, {"max_tokens": True}, {"stream": "yes"},
                    {"stream_options": {"include_usage": True, "x": 1}},
                    {"ignore_eos": "no"}):
            r = httpx.post(f"{h.url}/v1/completions", json={"model": "smol/c2c", "prompt": "x",
                                                            **bad})
            _error(r, 400)
            assert r.json()["error"]["param"] == next(iter(bad)), bad


def test_queue_full_is_429(tok):
    sched = FakeScheduler(tok)
    sched.full = True
    with serve.start_server(sched) as h:
        r = httpx.post(f"{h.url}/v1/completions", json={"model": "c2c", "prompt": "x"})
        msg = _error(r, 429, "rate_limit_error")
        assert "--max_queue" in msg and "Retry later" in msg


def test_engine_error_is_500_without_a_traceback(tok):
    sched = FakeScheduler(tok)
    sched.fail_after = 3
    with serve.start_server(sched) as h:
        r = httpx.post(f"{h.url}/v1/completions", json={"model": "c2c", "prompt": "x"})
        msg = _error(r, 500, "server_error")
        assert "device-side assert" in msg and "File x.py" not in msg
        r = httpx.post(f"{h.url}/v1/completions", json={"model": "c2c", "prompt": "x",
                                                        "stream": True})
        ev = _events(r.text)
        assert ev[-1] == "[DONE]" and ev[-2]["error"]["type"] == "server_error"
        assert "Traceback" not in ev[-2]["error"]["message"]


def test_scheduler_user_error_is_400_and_unknown_path_is_an_error_object(tok):
    sched = FakeScheduler(tok, cap=4)  # the scheduler's own cap, unknown to the app
    with serve.start_server(sched) as h:
        r = httpx.post(f"{h.url}/v1/completions", json={"model": "c2c", "prompt": "x",
                                                        "max_tokens": 5})
        assert "--max_new_tokens 4" in _error(r, 400)
        assert "POST /v1/completions" in _error(httpx.get(f"{h.url}/v1/nothing"), 404)
        _error(httpx.get(f"{h.url}/v1/completions"), 405)


# --- clients that leave ---------------------------------------------------------------------------

def _wait(cond, timeout=HANG_S):
    """Until cond() holds (True) or a hang (False): judged by what happened, not by seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return False


def test_client_leaving_mid_stream_cancels_its_ticket(tok):
    sched = FakeScheduler(tok, reply=REPLY * 10, delay=0.03, cap=256)
    with serve.start_server(sched) as h:
        with httpx.Client(timeout=10) as client:
            with client.stream("POST", f"{h.url}/v1/completions", json={
                    "model": "c2c", "prompt": "x", "max_tokens": 256, "stream": True}) as r:
                lines = r.iter_lines()
                first = next(line for line in lines if line.startswith("data: "))
                assert json.loads(first[6:])["choices"][0]["finish_reason"] is None
        ticket = sched.tickets[-1]
        assert _wait(ticket.cancelled.is_set), "the ticket was not cancelled"
        assert _wait(ticket.done.is_set)
        assert ticket.served.finish_reason == "abort"
        assert len(ticket.served.tokens) < 200


def test_client_leaving_a_non_streamed_request_cancels_its_ticket(tok):
    sched = FakeScheduler(tok, reply=REPLY * 10, delay=0.03, cap=256)
    with serve.start_server(sched) as h:
        body = json.dumps({"model": "c2c", "prompt": "x", "max_tokens": 256}).encode()
        s = socket.create_connection(("127.0.0.1", h.port))
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                  b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        assert _wait(lambda: len(sched.tickets) == 1)
        time.sleep(0.1)
        s.close()
        ticket = sched.tickets[-1]
        assert _wait(ticket.cancelled.is_set), "the ticket was not cancelled"
        assert _wait(ticket.done.is_set) and ticket.served.finish_reason == "abort"


# --- the server and the command -------------------------------------------------------------------

def test_start_server_picks_a_free_port_and_closes(tok):
    h = serve.start_server(FakeScheduler(tok), port=0)
    assert h.port > 0 and h.url == f"http://127.0.0.1:{h.port}"
    assert httpx.get(f"{h.url}/health").status_code == 200
    h.close()
    assert not h.thread.is_alive()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{h.url}/health", timeout=2)


def test_serve_command_refuses_a_port_in_use_before_loading(monkeypatch, capsys):
    from c2c_core.frontends import cli

    def no_load(*a, **k):
        raise AssertionError("models loaded")
    monkeypatch.setattr(serving_mod, "load_scheduler", no_load, raising=False)
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        rc = cli.main(["serve", "--port", str(busy.getsockname()[1])])
    finally:
        busy.close()
    err = capsys.readouterr().err
    assert rc == 2 and "cannot listen on 127.0.0.1" in err and "--port" in err
    assert cli.main(["serve", "--slots", "0"]) == 2
    assert "--slots 0" in capsys.readouterr().err


def test_serve_command_serves_warns_on_all_interfaces_and_closes(monkeypatch, tok, tmp_path,
                                                                 capsys):
    from c2c_core.frontends import cli
    seen = {}

    def fake_load(cfg, slots, max_queue, max_prompt_tokens, writer=None):
        seen.update(cfg=cfg, slots=slots, max_queue=max_queue, max_prompt=max_prompt_tokens,
                    writer=writer)
        seen["sched"] = s = FakeScheduler(tok, cap=cfg.gen.max_new_tokens)
        s.close = lambda: seen.setdefault("closed", True)
        return s
    monkeypatch.setattr(serving_mod, "load_scheduler", fake_load, raising=False)
    args = cli.build_parser().parse_args([
        "serve", "--host", "0.0.0.0", "--port", "0", "--slots", "3", "--max_queue", "5",
        "--max_prompt_tokens", "99", "--max_new_tokens", "12", "--records",
        str(tmp_path / "served.jsonl")])
    handles, rc = [], []
    t = threading.Thread(target=lambda: rc.append(serve.serve_main(args, cli.run_config(args),
                                                                   on_ready=handles.append)))
    t.start()
    assert _wait(lambda: handles, 10)
    h = handles[0]
    r = httpx.post(f"{h.url}/v1/completions", json={"model": "c2c", "prompt": "x",
                                                    "max_tokens": 13})
    assert "cap of 12" in _error(r, 400)
    r = httpx.post(f"{h.url}/v1/chat/completions", json={
        "model": "c2c", "messages": [{"role": "user", "content": "x"}]})
    assert r.json()["usage"]["completion_tokens"] == 12  # chat's default: the server's cap
    h.close()
    t.join(10)
    assert rc == [0] and seen["closed"]
    assert (seen["slots"], seen["max_queue"], seen["max_prompt"]) == (3, 5, 99)
    assert seen["cfg"].engine in ("auto", "fast") and seen["writer"].path.endswith("served.jsonl")
    out = capsys.readouterr()
    assert f"http://127.0.0.1:{h.port}" in out.out and "curl" in out.out
    assert "c2c, t2t, receiver, sharer" in out.out
    assert "reachable from the network" in out.err and "no authentication" in out.err
