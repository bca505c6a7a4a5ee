"""What a client of the (public) web app may ask for: names, sizes, uploads and disk.

The app is meant to run as a public Hugging Face Space, where strangers call every endpoint at
once. So, in the app (the CLI keeps local paths):

- models are presets, hub ids (``owner/name``), ``smollm2``, ``gemma3`` or
  ``dummy:<shipped config>``;
  fusers are ``hub:<owner>/<repo>/<subfolder>`` or ``untrained``; datasets are hub ids or the
  short names (gsm8k, mmlu), or an uploaded file. Never a server path, unless the person who
  runs the app sets ``C2C_ALLOW_LOCAL_PATHS=1`` (ignored on a Space). Refusals never echo the
  text given, so they cannot tell whether a server path exists.
- sizes are capped (prompt characters, prompts per job, generations per job, new tokens,
  sweep points), uploads are capped per request and per session, and each session's folder has
  a disk quota. Every cap is an environment variable (see ``LIMITS``) and every refusal is one
  sentence that names the limit and the fix.
- with ``C2C_FIXED_MODELS=1`` (the default on a Space) the models loaded at start are the only
  ones: clients cannot load others or unload them.

Kept as one module (over 500 lines) on purpose: every refusal a public client can meet is in
one place, to audit at once.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from typing import Any

from ...engines import budget as _budget
from ...io import decoded as _decoded
from ...spec.errors import UserError


class FieldError(UserError):
    """A refusal that belongs to one input (its API keyword name), so the page can mark it."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field

_TRUE = {"1", "true", "yes", "on"}


def _env_int(name: str, default: int) -> int:
    try:
        v = int(os.environ.get(name, "").strip() or default)
    except ValueError:
        return default
    return max(v, 1)


def on_space() -> bool:
    return bool(os.environ.get("SPACE_ID"))


def local_paths_allowed() -> bool:
    """Server paths in the model/fuser/dataset boxes: only when the operator opts in, never on
    a Space."""
    return os.environ.get("C2C_ALLOW_LOCAL_PATHS", "").strip().lower() in _TRUE and not on_space()


def models_fixed() -> bool:
    """The loaded pair is the operator's: fixed on a Space unless C2C_FIXED_MODELS=0."""
    v = os.environ.get("C2C_FIXED_MODELS", "").strip().lower()
    if v:
        return v in _TRUE
    return on_space()


#: name → (environment variable, default, what it limits). Read once per check (tests and
#: operators may change the environment).
LIMITS = {
    "prompt_chars": ("C2C_MAX_PROMPT_CHARS", 16_000, "characters in one prompt"),
    "prompts": ("C2C_MAX_PROMPTS", 200, "prompts in one batch"),
    "generations": ("C2C_MAX_JOB_GENERATIONS", 2_000,
                    "generations in one job (prompts x repeats x modes)"),
    "new_tokens": ("C2C_MAX_NEW_TOKENS", 2_048, "new tokens per generation"),
    "sweep_points": ("C2C_MAX_SWEEP_POINTS", 64, "length pairs in one sweep"),
    "sweep_tokens": ("C2C_MAX_SWEEP_TOKENS", 32_768, "prompt + output tokens of one sweep point"),
    "request_upload_mb": ("C2C_MAX_UPLOAD_MB", 50, "MB uploaded in one request"),
    "session_upload_mb": ("C2C_SESSION_UPLOAD_MB", 200, "MB uploaded by one session"),
    "file_rows": ("C2C_MAX_FILE_ROWS", 100_000, "rows read from an uploaded prompts file"),
    "file_mb": ("C2C_MAX_FILE_MB", 64, "MB of data read from an uploaded prompts file (decoded)"),
    "results_mb": (_decoded.RESULTS_SETTING, _decoded.RESULTS_MB_APP,
                   "MB of data one Results analysis decodes from its files (8 bytes a decode"
                   " step)"),
    "analyses_mb": ("C2C_ANALYSES_MB", 2 * _decoded.RESULTS_MB_APP,
                    "MB of decoded data all Results analyses running at once may hold (more"
                    " wait their turn)"),
    "session_disk_mb": ("C2C_SESSION_DISK_MB", 200, "MB of results kept for one session"),
    "sharers": ("C2C_MAX_SHARERS", 2, "sharers in one pipeline (the published setups use 1-2)"),
    "cpu_params_m": ("C2C_MAX_CPU_PARAMS_M", _budget.CPU_PARAMS_M,
                     "million parameters of the models together on a CPU"),
}


def limit(name: str) -> int:
    env, default, _ = LIMITS[name]
    return _env_int(env, default)


def limits_table() -> list[tuple[str, int, str]]:
    """(environment variable, value now, what it limits) for the README and the page."""
    return [(env, limit(k), what) for k, (env, _, what) in LIMITS.items()]


# --- names -------------------------------------------------------------------------------------

_PART = r"[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9])?"
_HUB_ID = re.compile(rf"{_PART}/{_PART}")
_SUBFOLDER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}")
_CONFIG = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_SPLIT = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,31}(\[[0-9:%+-]{0,24}\])?")
#: Model names that are not hub ids and name no path.
MODEL_ALIASES = {"smollm2", "gemma3"}


def is_hub_id(s: str) -> bool:
    return bool(_HUB_ID.fullmatch(s)) and ".." not in s and "--" not in s


def _not_served(label: str) -> UserError:
    # The same sentence whatever the reason (unknown name, a path, a folder that exists), so a
    # refusal tells a client nothing about the server's files.
    return FieldError(f"{label} must be a hub id like Qwen/Qwen3-0.6B, smollm2, gemma3, or"
                      " dummy:<config>; this server does not open server paths.", label.lower())


def shipped_dummy_configs() -> list[str]:
    from ...spec.config import CONFIGS
    try:
        return sorted(f[:-5] for f in os.listdir(CONFIGS) if f.endswith(".json"))
    except OSError:
        return []


def check_model_name(value: str | None, label: str) -> None:
    check_short(value, label)
    s = (value or "").strip()
    if not s or local_paths_allowed():
        return
    if s in MODEL_ALIASES:
        return
    if s.startswith("dummy:"):
        name = s[len("dummy:"):]
        if name in shipped_dummy_configs():
            return
        raise FieldError(f"{label} dummy:<config> must name a shipped config ("
                         f"{', '.join(shipped_dummy_configs())}).", label.lower())
    # a hub-shaped name that is also a folder below the app's working directory would be read
    # from disk by transformers: refuse it with the same sentence as any other non-hub name
    if not is_hub_id(s) or os.path.lexists(s):
        raise _not_served(label)


def check_fuser_name(value: str | None) -> None:
    check_short(value, "Fuser")
    s = (value or "").strip()
    if not s or s in ("untrained", "none") or local_paths_allowed():
        return
    if s.startswith("hub:"):
        parts = s[4:].split("/")
        if len(parts) >= 3 and is_hub_id("/".join(parts[:2])) and all(
                _SUBFOLDER.fullmatch(p) and ".." not in p for p in parts[2:]):
            return
    raise FieldError("Fuser must be hub:<owner>/<repo>/<subfolder> (e.g. hub:nics-efc/C2C_Fuser/"
                     "qwen3_0.6b+qwen3_4b_base_Fuser) or untrained; this server does not open"
                     " server paths.", "fuser")


def check_dataset_name(name: str | None, config: str | None, split: str | None) -> None:
    from ...io.prompts import DATASET_ALIASES
    for v, label in ((name, "Dataset"), (config, "Config"), (split, "Split")):
        check_short(v, label)
    n = (name or "").strip()
    if not local_paths_allowed() and n and n.lower() not in DATASET_ALIASES and (
            not is_hub_id(n) or os.path.lexists(n)):
        raise FieldError("Dataset must be a hub id like openai/gsm8k or cais/mmlu (or gsm8k,"
                         " mmlu); this server does not open server folders: upload a file"
                         " instead.", "dataset_name")
    c = (config or "").strip()
    if c and not _CONFIG.fullmatch(c):
        raise FieldError("Config must be a dataset config name like main or all (letters,"
                         " digits, '_', '-', '.').", "dataset_config")
    sp = (split or "").strip()
    if sp and not _SPLIT.fullmatch(sp):
        raise FieldError("Split must be a split name like test or train, optionally sliced like"
                         " test[:100].", "split")


def check_model_settings(settings: dict[str, Any]) -> None:
    """The model panel's names (API keyword names)."""
    check_model_name(settings.get("receiver"), "Receiver")
    sharers = settings.get("sharer")
    for s in re.split(r"[,\n]", sharers or ""):
        check_model_name(s, "Sharer")
    check_fuser_name(settings.get("fuser"))


# --- sizes -------------------------------------------------------------------------------------

def check_prompt_text(text: str | None, what: str = "The prompt") -> None:
    n, cap = len(text or ""), limit("prompt_chars")
    if n > cap:
        raise UserError(f"{what} has {n:,} characters; this server takes at most {cap:,}"
                        " (C2C_MAX_PROMPT_CHARS): shorten it.")


def check_prompts(prompts: list[str]) -> None:
    cap = limit("prompts")
    if len(prompts) > cap:
        raise UserError(f"{len(prompts):,} prompts given; this server runs at most {cap:,} in one"
                        " batch (C2C_MAX_PROMPTS): split the list or use the Dataset tab.")
    for i, p in enumerate(prompts):
        check_prompt_text(p, f"Prompt {i + 1}")


def check_job_size(n_prompts: int, repeats: int, n_modes: int) -> None:
    total, cap = n_prompts * max(repeats, 1) * max(n_modes, 1), limit("generations")
    if total > cap:
        raise UserError(f"This job has {total:,} generations (prompts x repeats x modes); this"
                        f" server runs at most {cap:,} per job (C2C_MAX_JOB_GENERATIONS): pick"
                        " fewer samples or repeats.")


def check_new_tokens(n: int | None) -> None:
    cap = limit("new_tokens")
    if n is not None and n > cap:
        raise FieldError(f"At most {cap:,} new tokens here (you asked {n:,};"
                         " C2C_MAX_NEW_TOKENS).", "max_new_tokens")


def check_sweep(ins: list[int], outs: list[int]) -> None:
    n, cap = len(ins) * len(outs), limit("sweep_points")
    if n > cap:
        raise UserError(f"The sweep has {n:,} length pairs; this server runs at most {cap:,}"
                        " (C2C_MAX_SWEEP_POINTS): give fewer lengths.")
    most, cap = max(ins) + max(outs), limit("sweep_tokens")
    if most > cap:
        raise UserError(f"The longest sweep point has {most:,} prompt + output tokens; this"
                        f" server runs at most {cap:,} (C2C_MAX_SWEEP_TOKENS): use shorter"
                        " lengths.")


def check_sharers(cfg) -> None:
    n, cap = len(cfg.sharers), limit("sharers")
    if n > cap:
        raise FieldError(f"{n} sharers given; this server runs at most {cap} (C2C_MAX_SHARERS):"
                         " name fewer sharers.", "sharer")


def check_budget(cfg, held=None, batch: int = 1, tokens: int = 0,
                 what: str = "This run") -> None:
    """Before a job queues: sharers under the cap, the models' parameters under the CPU cap,
    and their weights plus the KV cache of `batch` sequences of `tokens` tokens within the
    device's free memory (plus what the models held now, `held`, would free by a swap)."""
    from ...engines import budget
    check_sharers(cfg)
    held_bytes = 0
    if held is not None:
        try:
            if budget.canonical_device(held.device) == budget.canonical_device(cfg.device):
                held_bytes = budget.estimate(held).weights
        except UserError:
            pass
    budget.check_fits(cfg, batch, tokens, held_bytes, what, cpu_params_cap=budget.cpu_params_cap())


def check_short(text: str | None, label: str, cap: int = 256) -> None:
    """A one-line setting (lengths, names): long text is refused before it is parsed."""
    if len(text or "") > cap:
        raise UserError(f"{label} is {len(text or ''):,} characters long; give at most {cap}.")


# --- uploads and disk ---------------------------------------------------------------------------

def _mb(n: int) -> str:
    return f"{n / 2**20:,.1f} MB"


def folder_bytes(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def check_disk(folder: str) -> None:
    """Before a run: the session's results folder is within its quota."""
    used, cap = folder_bytes(folder), limit("session_disk_mb") * 2**20
    if used >= cap:
        raise UserError(f"This session's results use {_mb(used)}; the limit is {_mb(cap)}"
                        " (C2C_SESSION_DISK_MB): download what you need and reload the page to"
                        " start a new session.")


def over_disk(folder: str) -> bool:
    return folder_bytes(folder) >= limit("session_disk_mb") * 2**20


_UPLOADED: dict[str, tuple[int, set[str]]] = {}


def count_upload(session: str, paths: list[str]) -> None:
    """Files a handler received: charge them to the session's upload quota (each file once,
    however often it is analysed again)."""
    used, seen = _UPLOADED.get(session, (0, set()))
    new = [p for p in dict.fromkeys(paths) if p not in seen]
    size = 0
    for p in new:
        try:
            size += os.path.getsize(p)
        except OSError:
            pass
    cap = limit("session_upload_mb") * 2**20
    if used + size > cap:
        raise UserError(f"This session has uploaded {_mb(used + size)}; the limit is {_mb(cap)}"
                        " (C2C_SESSION_UPLOAD_MB): reload the page to start a new session.")
    _UPLOADED[session] = (used + size, seen | set(new))


def file_caps():
    """The caps on an uploaded prompts file, read before its rows are decoded."""
    from ...io.prompts import FileCaps
    return FileCaps(limit("file_rows"), limit("file_mb") * 2**20, "C2C_MAX_FILE_ROWS",
                    "C2C_MAX_FILE_MB")


def results_budget():
    """The decoded-size budget of one Results analysis (C2C_MAX_RESULTS_MB)."""
    return _decoded.DecodedBudget(limit("results_mb") * 2**20, _decoded.RESULTS_SETTING)


_POOLS: dict[int, Any] = {}


def analyses_pool():
    """The memory all Results analyses running at once share (C2C_ANALYSES_MB): a byte-count
    semaphore each analysis reserves its budget from (one pool per configured size)."""
    total = limit("analyses_mb") * 2**20
    return _POOLS.setdefault(total, _decoded.MemoryPool(total))


def forget_session(session: str) -> None:
    _UPLOADED.pop(session, None)


class UploadLimit:
    """ASGI middleware: refuse an upload request whose body is over the per-request cap
    (gradio's own max_file_size is per file, so three 40 MB files in one request passed), and
    charge what a session uploads to its quota as it arrives: every file gradio stores from
    /upload is counted here (a client posting there directly stored 270 MB against a 200 MB
    cap), each once, so the handlers that later read it do not charge it again."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope.get("path", "").rstrip("/").endswith("/upload"):
            return await self.app(scope, receive, send)
        cap = limit("request_upload_mb") * 2**20
        headers = list(scope.get("headers") or [])
        session = session_key(_cookies(headers).get(SESSION_COOKIE))
        length = dict(headers).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > cap:
            return await _refuse(send, cap)
        if session is not None and length is not None and length.isdigit():
            used, quota = _UPLOADED.get(session, (0, set()))[0], limit("session_upload_mb") * 2**20
            if used + int(length) > quota:
                return await _refuse_quota(send, used + int(length), quota)
        seen = 0

        async def counting_receive():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > cap:
                    raise _TooLarge()
            return msg

        if session is None:  # no session to charge (the app runs without SessionCookie)
            try:
                return await self.app(scope, counting_receive, send)
            except _TooLarge:
                return await _refuse(send, cap)
        # hold the (small) response until the stored files are charged: over the quota, they
        # are removed and the client told why
        held: list[dict] = []

        async def holding_send(msg):
            held.append(msg)

        try:
            await self.app(scope, counting_receive, holding_send)
        except _TooLarge:
            return await _refuse(send, cap)
        start = next((m for m in held if m["type"] == "http.response.start"), None)
        body = b"".join(m.get("body", b"") for m in held if m["type"] == "http.response.body")
        if start is not None and start.get("status") == 200:
            try:
                import json
                paths = [p for p in json.loads(body) if isinstance(p, str)]
            except ValueError:
                paths = []
            try:
                count_upload(session, paths)
            except UserError:
                used = _UPLOADED.get(session, (0, set()))[0] + sum(
                    os.path.getsize(p) for p in paths if os.path.isfile(p))
                # gradio stores equal files at one path: keep any another session was charged
                others = set().union(*(seen for _, seen in _UPLOADED.values()))
                for p in paths:
                    if p in others:
                        continue
                    try:
                        os.remove(p)
                    except OSError:
                        pass
                return await _refuse_quota(send, used, limit("session_upload_mb") * 2**20)
        for m in held:
            await send(m)


class _TooLarge(Exception):
    pass


async def _refuse_quota(send, used: int, cap: int) -> None:
    await _refuse(send, cap, f"Upload refused: this session would have uploaded {_mb(used)}; the"
                  f" limit is {_mb(cap)} (C2C_SESSION_UPLOAD_MB): reload the page to start a"
                  " new session.")


async def _refuse(send, cap: int, text: str | None = None) -> None:
    body = (text or f"Upload refused: one request may carry at most {_mb(cap)}"
            " (C2C_MAX_UPLOAD_MB); upload fewer or smaller files.").encode()
    try:
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
    except Exception:  # noqa: BLE001 - the response had already started; nothing more to say
        pass


# --- sessions -----------------------------------------------------------------------------------

#: The cookie that carries a session's key: minted by the server, signed with a key that never
#: leaves this process, so a client can neither choose a session nor guess another's (gradio's
#: session hash is the client's own choice and travels in URLs).
SESSION_COOKIE = "c2c_session"
_SESSION_SECRET = secrets.token_bytes(32)
_KEY = re.compile(r"[A-Za-z0-9_-]{32}")


def _sign(key: str) -> str:
    return hmac.new(_SESSION_SECRET, key.encode(), hashlib.sha256).hexdigest()[:32]


def mint_session() -> str:
    """A new session's cookie value: a random key and its signature."""
    key = secrets.token_urlsafe(24)  # 32 characters of [A-Za-z0-9_-]
    return f"{key}.{_sign(key)}"


def session_key(cookie: str | None) -> str | None:
    """The session key a cookie value carries, or None when this server did not mint it."""
    key, _, sig = (cookie or "").partition(".")
    if _KEY.fullmatch(key) and hmac.compare_digest(sig, _sign(key)):
        return key
    return None


def _cookies(headers: list[tuple[bytes, bytes]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in headers:
        if k.lower() == b"cookie":
            for part in v.decode("latin-1").split(";"):
                name, _, value = part.strip().partition("=")
                out.setdefault(name, value)
    return out


class SessionCookie:
    """ASGI middleware: every request carries a session cookie this server minted. A request
    without a valid one (a new page, an API client's first call, a forged or stale value) gets a
    fresh key, added to the request (so the handler of this very request sees it) and set on
    the response (so the browser and gradio_client send it from then on)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope.get("method") == "POST" and scope.get("path", "").endswith("/queue/join"):
            receive, body = await _join_with_a_hash(scope, receive, send)
            if receive is None:
                return None
            send = _sentence_for_bare_400(scope, body, send)
        headers = list(scope.get("headers") or [])
        if session_key(_cookies(headers).get(SESSION_COOKIE)) is not None:
            return await self.app(scope, receive, send)
        value = mint_session()
        kept = [(k, v) for k, v in headers if k.lower() != b"cookie"]
        others = "; ".join(f"{k}={v}" for k, v in _cookies(headers).items()
                           if k != SESSION_COOKIE)
        cookie = f"{SESSION_COOKIE}={value}" + (f"; {others}" if others else "")
        scope = {**scope, "headers": kept + [(b"cookie", cookie.encode("latin-1"))]}
        https = scope.get("scheme") == "https" or dict(headers).get(
            b"x-forwarded-proto", b"").split(b",")[0].strip() == b"https"
        # on a Space the page is an iframe of huggingface.co: a partitioned third-party cookie
        attrs = "; SameSite=None; Secure; Partitioned" if https else "; SameSite=Lax"
        set_cookie = f"{SESSION_COOKIE}={value}; Path=/; HttpOnly{attrs}".encode("latin-1")

        async def send_with_cookie(msg):
            if msg["type"] == "http.response.start":
                msg = {**msg, "headers": list(msg.get("headers") or [])
                       + [(b"set-cookie", set_cookie)]}
            await send(msg)

        return await self.app(scope, receive, send_with_cookie)


_OUT_OF_RANGE = re.compile(r"^Value:? (.+?) is (less|greater) than (?:minimum|maximum) value"
                           r" (\S+?)\.?$|^Value:? (.+?) is not in the list of choices", re.S)


def _sentence_for_bare_400(scope, body: bytes, send):
    """gradio refuses a value outside an input's minimum, maximum or choices with a 400 that
    gradio_client shows as a bare "400 Bad Request". Said instead as a validation answer (422,
    which every client shows): one sentence naming the input by its label."""
    import json
    held: list[dict] = []

    async def rewriting_send(msg):
        if msg["type"] == "http.response.start" and msg.get("status") == 400:
            held.append(msg)
            return
        if held and msg["type"] == "http.response.body":
            held.append(msg)
            if msg.get("more_body"):
                return
            raw = b"".join(m.get("body", b"") for m in held[1:])
            text = _range_sentence(scope, body, raw)
            if text is None:
                for m in held:
                    await send(m)
                return
            out = json.dumps({"detail": [{"__type__": "validate", "is_valid": False,
                                          "parameter_name": text[0].strip("'"),
                                          "message": text[1]}]}
                             ).encode()
            await send({"type": "http.response.start", "status": 422,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(out)).encode())]})
            await send({"type": "http.response.body", "body": out})
            return
        await send(msg)

    return rewriting_send


def _range_sentence(scope, body: bytes, raw: bytes) -> tuple[str, str] | None:
    """(parameter, sentence) for gradio's out-of-range refusal, or None for any other 400."""
    import json
    try:
        detail = str(json.loads(raw).get("detail"))
        if len(detail) > 1 and detail[0] == detail[-1] and detail[0] in "'\"":
            detail = detail[1:-1]  # gradio's Error says its message as a repr
        m = _OUT_OF_RANGE.match(detail)
    except (ValueError, AttributeError):
        return None
    if not m:
        return None
    # gradio says a refused choice as "'x' (type: <class 'str'>)": the value is 'x'
    choice = re.sub(r" \(type: <class '[^']*'>\)$", "", m.group(4) or "")
    label = "a setting"
    try:  # the input whose value was refused, by its label
        req = json.loads(body)
        fn = scope["app"].get_blocks().fns[req["fn_index"]]
        value = m.group(1) or choice
        edge = "minimum" if m.group(2) == "less" else "maximum"
        found = []  # inputs holding that value; the one whose bound it breaks first
        for comp, v in zip(fn.inputs, req.get("data") or []):
            # a multi-choice input (CheckboxGroup) holds a list: the refused one is in it
            held = v if isinstance(v, list) else [v]
            if any(str(x) == value or repr(x) == value for x in held):
                bound = getattr(comp, edge, None) if m.group(2) else None
                breaks = bound is not None and str(float(bound)) == str(float(m.group(3)))
                found.insert(0 if breaks or not m.group(2) else len(found), comp)
        if found:
            label = f"'{getattr(found[0], 'label', None) or 'a setting'}'"
    except Exception:  # noqa: BLE001 - the sentence without the label
        pass
    if m.group(2):
        bound = "at least" if m.group(2) == "less" else "at most"
        return label, (f"{label[0].upper()}{label[1:]} is {m.group(1)}; this input takes"
                       f" {bound} {m.group(3)}: give a value in its range.")
    return label, (f"{label[0].upper()}{label[1:]} is {choice}, which is not one of its"
                   " choices; pick one the page lists (see /gradio_api/info).")


async def _join_with_a_hash(scope, receive, send):
    """A queue join must name its client's session hash (gradio keys its event streams by
    it; an empty one made it fail with a bare 500 and a traceback): refused in a sentence,
    else the request's body is handed on unchanged."""
    import json
    chunks, more = [], True
    while more:
        msg = await receive()
        if msg["type"] != "http.request":
            return receive, b""
        chunks.append(msg.get("body", b""))
        more = msg.get("more_body", False)
    body = b"".join(chunks)
    try:
        h = json.loads(body).get("session_hash")
    except (ValueError, AttributeError):
        h = "?"  # not ours to judge: gradio answers malformed bodies itself
    if h is not None and not str(h).strip():
        text = (b"Refused: this request names no session (an empty session_hash); send the"
                b" one your client made for its connection.")
        await send({"type": "http.response.start", "status": 400,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                (b"content-length", str(len(text)).encode())]})
        await send({"type": "http.response.body", "body": text})
        return None, body
    return replay(body, receive), body


def replay(body: bytes, receive):
    """An ASGI `receive` that gives the body already read once, then the connection's own."""
    sent = False

    async def again():
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}
    return again


# --- messages ---------------------------------------------------------------------------------

_ABS_PATH = re.compile(r"(?<![\w:/.])(?:~|\.{1,2})?/(?:[\w.@+-]+/)*[\w.@+-]+")


def scrub_paths(text: str) -> str:
    """Remove server paths from a message shown to a client (hub ids like a/b stay)."""
    if local_paths_allowed():
        return text
    return _ABS_PATH.sub("<server path>", text)
