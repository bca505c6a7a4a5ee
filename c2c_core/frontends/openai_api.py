"""The OpenAI API as `serve` speaks it, without the server: request bodies checked against
what the server does (Decoding, parse_request), OpenAI error objects (ApiError), response
pieces (usage, the `c2c` field, SSE lines) and incremental text (TextStream).

The server decodes every request with the run settings it was started with (greedy by
default): a request that asks for other decoding (temperature > 0 on a greedy server,
ignore_eos on a server that stops at EOS, stop sequences, penalties, several choices) is
refused with one sentence saying what the server does and how to start it otherwise, never
silently decoded another way. Harmless fields (user, n=1, echo=false, logprobs null) pass.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from typing import Any

#: completions' max_tokens when the request gives none (OpenAI's default).
COMPLETIONS_DEFAULT_MAX_TOKENS = 16

_COMMON_FIELDS = {"model", "max_tokens", "stream", "stream_options", "temperature", "top_p",
                  "top_k", "n", "logprobs", "user", "stop", "ignore_eos", "min_tokens", "seed",
                  "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias"}
COMPLETION_FIELDS = _COMMON_FIELDS | {"prompt", "best_of", "echo", "suffix"}
CHAT_FIELDS = _COMMON_FIELDS | {"messages", "max_completion_tokens", "top_logprobs",
                                "response_format", "tools", "tool_choice",
                                "parallel_tool_calls", "store", "metadata"}
#: Fields whose value does not change what this server does: accepted and not used.
_IGNORED = {"user", "parallel_tool_calls", "store", "metadata"}


class ApiError(Exception):
    """An OpenAI error object: status, one sentence, type, param, code."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type_, param, code)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", param, code)


# --- the server's decoding settings ----------------------------------------------------------

@dataclass
class Decoding:
    """What the server decodes every request with (the run settings it was started with)."""

    max_new_tokens: int | None = None  # the server's cap on max_tokens (None: the scheduler's)
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    ignore_eos: bool = False

    @classmethod
    def of(cls, gen) -> "Decoding":
        """From a spec.config.GenerationConfig (or anything with its fields)."""
        if gen is None:
            return cls()
        if isinstance(gen, Decoding):
            return gen
        names = cls.__dataclass_fields__
        return cls(**{k: getattr(gen, k) for k in names if getattr(gen, k, None) is not None})

    def public(self) -> dict:
        """The settings as each response's `c2c.decoding` reports them."""
        out: dict[str, Any] = {"do_sample": self.do_sample, "ignore_eos": self.ignore_eos}
        if self.do_sample:
            out.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                       seed=self.seed)
        if self.max_new_tokens is not None:
            out["max_tokens_cap"] = self.max_new_tokens
        return out

    def how(self) -> str:
        if not self.do_sample:
            return "decodes greedily"
        return (f"samples with temperature {self.temperature}, top_p {self.top_p},"
                f" top_k {self.top_k}")


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_decoding(body: dict, dec: Decoding) -> None:
    """Refuse what would decode otherwise than the server does (see the module doc)."""
    restart = ("restart it with `python -m c2c_core serve --do_sample --temperature T` to sample"
               if not dec.do_sample else "restart it with other --temperature/--top_p/--top_k")
    t = body.get("temperature")
    if t is not None:
        if not _is_num(t) or t < 0:
            raise bad_request(f"temperature={t!r} is not a number >= 0.", "temperature")
        if not dec.do_sample and t > 0:
            raise bad_request(
                f"temperature={t} asks for sampling, but this server decodes greedily"
                f" (its run settings); send temperature 0 or leave it out, or {restart}.",
                "temperature")
        if dec.do_sample and t != dec.temperature:
            raise bad_request(
                f"temperature={t}: this server {dec.how()} for every request; leave"
                f" temperature out or send {dec.temperature}, or {restart}.", "temperature")
    for name, server in (("top_p", dec.top_p), ("top_k", dec.top_k)):
        v = body.get(name)
        if v is None:
            continue
        if not _is_num(v) or not ((0 < v <= 1) if name == "top_p"
                                  else (isinstance(v, int) and v >= -1)):
            raise bad_request(f"{name}={v!r} is out of range.", name)
        if dec.do_sample and v != server and not (name == "top_k" and v in (-1, 0)
                                                  and server == 0):
            raise bad_request(f"{name}={v}: this server {dec.how()} for every request; leave {name}"
                              f" out or send {server}, or {restart}.", name)
    seed = body.get("seed")
    if seed is not None and dec.do_sample and seed != dec.seed:
        raise bad_request(
            f"seed={seed!r}: this server samples with seed {dec.seed} (its run settings);"
            " leave seed out, or restart it with --seed.", "seed")
    ie = body.get("ignore_eos")
    if ie is not None and not isinstance(ie, bool):
        raise bad_request(f"ignore_eos={ie!r} is not a boolean.", "ignore_eos")
    if ie and not dec.ignore_eos:
        raise bad_request(
            "ignore_eos=true asks for exactly max_tokens tokens, but this server stops at"
            " EOS (its run settings); leave ignore_eos out, or restart it with"
            " `python -m c2c_core serve --ignore_eos` (every request then runs to its"
            " max_tokens).", "ignore_eos")
    mt = body.get("min_tokens")
    if mt is not None:
        if not isinstance(mt, int) or isinstance(mt, bool) or mt < 0:
            raise bad_request(f"min_tokens={mt!r} is not an integer >= 0.", "min_tokens")
        if mt > 0 and not dec.ignore_eos:
            raise bad_request(
                f"min_tokens={mt}: this server stops at EOS and cannot hold it back; leave"
                " min_tokens out, or restart it with `python -m c2c_core serve"
                " --ignore_eos` (every request then runs to its max_tokens).",
                "min_tokens")


#: field -> (accepted, what the server does instead): values that change nothing are accepted.
_UNSUPPORTED = {
    "n": (lambda v: v in (None, 1), "n must be 1: this server returns one choice per request"),
    "best_of": (lambda v: v in (None, 1), "best_of must be 1: this server returns the one"
                " sequence it decodes"),
    "echo": (lambda v: v in (None, False), "echo is not supported: the response holds only the"
             " generated text"),
    "logprobs": (lambda v: v in (None, False, 0), "logprobs are not returned by this server;"
                 " leave logprobs out"),
    "top_logprobs": (lambda v: v in (None, 0), "top_logprobs are not returned by this server;"
                     " leave top_logprobs out"),
    "stop": (lambda v: v in (None, "", []), "stop sequences are not supported: generation ends"
             " at EOS or max_tokens; leave stop out"),
    "presence_penalty": (lambda v: v in (None, 0), "penalties are not supported; send 0 or leave"
                         " presence_penalty out"),
    "frequency_penalty": (lambda v: v in (None, 0), "penalties are not supported; send 0 or leave"
                          " frequency_penalty out"),
    "repetition_penalty": (lambda v: v in (None, 1), "penalties are not supported; send 1 or"
                           " leave repetition_penalty out"),
    "logit_bias": (lambda v: v in (None, {}), "logit_bias is not supported; leave it out"),
    "suffix": (lambda v: v in (None, ""), "suffix (insertion) is not supported; leave it out"),
    "response_format": (lambda v: v is None or v == {"type": "text"}, "response_format must be"
                        " text: structured output is not supported"),
    "tools": (lambda v: v in (None, []), "tools are not supported by this server; leave them"
              " out"),
    "tool_choice": (lambda v: v in (None, "none"), "tool_choice must be none: tools are not"
                    " supported by this server"),
}


def _check_fields(body: dict, allowed: set[str], endpoint: str) -> None:
    unknown = sorted(k for k in body if k not in allowed)
    if unknown:
        raise bad_request(f"{endpoint} does not support the field(s) {', '.join(unknown)}; the"
                          f" supported fields are {', '.join(sorted(allowed))}.", unknown[0])
    for name, (ok, why) in _UNSUPPORTED.items():
        if name in body and not ok(body[name]):
            raise bad_request(f"{name}={json.dumps(body[name])[:80]}: {why}.", name)


# --- one request's parsed parameters ---------------------------------------------------------

@dataclass
class Params:
    mode: str
    model: str
    prompt: str
    max_tokens: int
    stream: bool
    include_usage: bool
    continuous_usage: bool


def _mode_of(body: dict, models: dict[str, str]) -> tuple[str, str]:
    model = body.get("model")
    served = ", ".join(models)
    if model is None:
        raise bad_request(f"model is missing; name one of the served models: {served}.", "model")
    if not isinstance(model, str) or model not in models:
        raise ApiError(400, f"model {json.dumps(model)[:80]} is not served here; the served models"
                       f" are {served} (GET /v1/models).", "invalid_request_error", "model",
                       "model_not_found")
    return models[model], model


def _max_tokens(body: dict, names: tuple[str, ...], default: int, cap: int | None) -> int:
    for name in names:
        v = body.get(name)
        if v is None:
            continue
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise bad_request(f"{name}={json.dumps(v)[:40]} is not an integer >= 1.", name)
        if cap is not None and v > cap:
            raise bad_request(
                f"{name}={v} is above this server's cap of {cap} tokens (serve"
                f" --max_new_tokens); ask for at most {cap}, or restart the server with a"
                " larger --max_new_tokens.", name)
        return v
    return default if cap is None else min(default, cap)


def _stream_flags(body: dict) -> tuple[bool, bool, bool]:
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise bad_request(f"stream={json.dumps(stream)[:40]} is not a boolean.", "stream")
    opts = body.get("stream_options")
    if opts is None:
        return bool(stream), False, False
    if not isinstance(opts, dict) or set(opts) - {"include_usage", "continuous_usage_stats"}:
        raise bad_request("stream_options supports only include_usage and continuous_usage_stats"
                          " (booleans).", "stream_options")
    return (bool(stream), bool(opts.get("include_usage")),
            bool(opts.get("continuous_usage_stats")))


def _text_of(content, where: str) -> str:
    """A message's content: a string, or a list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
            for p in content):
        return "\n".join(p["text"] for p in content)
    raise bad_request(
        f"{where} content must be a string or a list of {{\"type\": \"text\", \"text\":"
        " ...}} parts; images and other parts are not supported.", "messages")


_CHAT_SHAPE = ("this server supports an optional system message followed by exactly one user"
               " message (no conversation history)")


def parse_chat_prompt(messages) -> str:
    """The prompt of a chat request: the user text, the system text before it after a blank
    line."""
    if not isinstance(messages, list) or not messages:
        raise bad_request(f"messages must be a non-empty list; {_CHAT_SHAPE}.", "messages")
    if not all(isinstance(m, dict) for m in messages):
        raise bad_request(f"each message must be an object with role and content; {_CHAT_SHAPE}.",
                          "messages")
    roles = [m.get("role") for m in messages]
    system = None
    if roles[0] in ("system", "developer") and len(messages) >= 2:
        system = _text_of(messages[0].get("content"), f"the {roles[0]} message's")
        messages, roles = messages[1:], roles[1:]
    if roles != ["user"]:
        raise bad_request(
            f"messages has roles {', '.join(map(str, [m.get('role') for m in messages]))}"
            f" after the system message; {_CHAT_SHAPE}." if system is not None else
            f"messages has roles {', '.join(map(str, roles))}; {_CHAT_SHAPE}.",
            "messages")
    user = _text_of(messages[0].get("content"), "the user message's")
    return f"{system}\n\n{user}" if system else user


def parse_request(body, kind: str, models: dict[str, str], dec: Decoding) -> Params:
    """Validate one request body (already JSON) of `kind` "completion" or "chat"."""
    endpoint = "/v1/completions" if kind == "completion" else "/v1/chat/completions"
    if not isinstance(body, dict):
        raise bad_request(f"the body of {endpoint} must be a JSON object.")
    mode, model = _mode_of(body, models)
    _check_fields(body, COMPLETION_FIELDS if kind == "completion" else CHAT_FIELDS, endpoint)
    _check_decoding(body, dec)
    stream, include_usage, continuous = _stream_flags(body)
    if kind == "completion":
        p = body.get("prompt")
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
            p = p[0]
        if not isinstance(p, str):
            raise bad_request("prompt must be a string or a list of exactly one string (token-id"
                              " prompts and batches of prompts are not supported: send one request"
                              " per prompt).", "prompt")
        prompt = p
        max_tokens = _max_tokens(body, ("max_tokens",), COMPLETIONS_DEFAULT_MAX_TOKENS,
                                 dec.max_new_tokens)
    else:
        prompt = parse_chat_prompt(body.get("messages"))
        max_tokens = _max_tokens(body, ("max_completion_tokens", "max_tokens"),
                                 dec.max_new_tokens or COMPLETIONS_DEFAULT_MAX_TOKENS,
                                 dec.max_new_tokens)
    if not prompt.strip():
        raise bad_request("the prompt is empty; send some text.",
                          "prompt" if kind == "completion" else "messages")
    return Params(mode, model, prompt, max_tokens, stream, include_usage, continuous)


# --- text, streamed ---------------------------------------------------------------------------

class TextStream:
    """Token ids -> text, incrementally: the whole id list so far is decoded and its new suffix
    emitted, a trailing U+FFFD (a character whose bytes have not all arrived) held back, so a
    character split over tokens, or tokens merged into one character, comes out whole."""

    def __init__(self, tokenizer, lock=None):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.sent = ""
        #: the scheduler's tokenizer lock (a fast tokenizer used from two threads at once can
        #: fail); none: this thread is its only user
        self.lock = lock

    def _decode(self, ids) -> str:
        if self.lock is None:
            return self.tok.decode(ids, skip_special_tokens=True,
                                   clean_up_tokenization_spaces=False)
        with self.lock:
            return self.tok.decode(ids, skip_special_tokens=True,
                                   clean_up_tokenization_spaces=False)

    def push(self, ids) -> str:
        self.ids.extend(int(i) for i in ids)
        text = self._decode(self.ids).rstrip("\ufffd")
        if not text.startswith(self.sent):  # the decoding revised sent text: wait for more
            return ""
        new, self.sent = text[len(self.sent):], text
        return new

    def finish(self, ids=None) -> str:
        """What is left to send once the request is done (`ids`: all its tokens). A character
        whose bytes were cut off by max_tokens (a trailing U+FFFD) is dropped."""
        if ids is not None:
            self.ids = [int(i) for i in ids]
        text = self._decode(self.ids).rstrip("\ufffd")
        if not text.startswith(self.sent):
            print(f"serve: the streamed text is not a prefix of the final text ({len(self.sent)}"
                  f" of {len(text)} characters sent)", file=sys.stderr)
            new = text[len(self.sent):] if len(text) > len(self.sent) else ""
        else:
            new = text[len(self.sent):]
        self.sent += new
        return new


def to_jsonable(v):
    if hasattr(v, "item"):
        return v.item()
    if hasattr(v, "tolist"):
        return v.tolist()
    return str(v)


def sse_line(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, default=to_jsonable).encode() + b"\n\n"


def _ms(v):
    return None if v is None else round(float(v), 3)


def c2c_field(served, dec: Decoding) -> dict:
    """Where this request's time went: queue, TTFT, E2E and the stages (sharer prefill,
    projection, receiver prefill, ...), and the settings it was decoded with."""
    return {"rid": served.rid, "mode": served.mode, "queue_ms": _ms(served.queue_ms),
            "ttft_ms": _ms(served.ttft_ms), "e2e_ms": _ms(served.e2e_ms),
            "tpot_ms": _ms(served.tpot_ms), "stages": dict(served.stages or {}),
            "decoding": dec.public()}


def usage_of(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": int(prompt_tokens), "completion_tokens": int(completion_tokens),
            "total_tokens": int(prompt_tokens) + int(completion_tokens)}


def engine_error(served) -> ApiError:
    first = (served.error or "").strip().splitlines()
    what = first[0][:300] if first else "no message"
    if served.finish_reason == "abort":
        return ApiError(503, f"request {served.rid} was aborted before it finished ({what});"
                        " the server may be shutting down: send it again.", "server_error")
    return ApiError(500, f"the engine failed on request {served.rid} ({what}); the server's log"
                    " has the details.", "server_error")
