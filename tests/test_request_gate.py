"""What reaches the public app over HTTP (issue 29, parts 2-4): every request body is capped
(Content-Length and streamed bytes, 413 and a sentence), no log line holds a request's values
in full, a session hash is used only under the cookie that first named it, and a CSV prompts
file the reader refuses reaches an API client as its sentence."""

from __future__ import annotations

import io
import json
import logging
import sys
import threading
import time

import httpx
import pytest

pytest.importorskip("gradio")

from c2c_core.frontends.ui import gate, guard  # noqa: E402


def _endpoint(url: str, api: str) -> tuple[int, list]:
    """(fn_index, data at every parameter's default) of a named endpoint, for a raw join."""
    from gradio_client import Client
    info = Client(url, verbose=False).view_api(print_info=False, return_format="dict")
    params = info["named_endpoints"][f"/{api}"]["parameters"]
    cfg = httpx.get(f"{url}config", timeout=30).json()
    fn = next(d["id"] for d in cfg["dependencies"] if d.get("api_name") == api)
    return fn, [(p["parameter_name"], p.get("parameter_default")) for p in params]


def _client(url: str) -> httpx.Client:
    """A client with a session cookie of its own (the server mints it on the first request)."""
    c = httpx.Client(timeout=60)
    c.get(url + "config")
    assert guard.session_key(c.cookies.get(guard.SESSION_COOKIE)), "no session cookie minted"
    return c


class Stream(threading.Thread):
    """A client reading its session's message stream until the job's last message."""

    def __init__(self, client: httpx.Client, url: str, session: str):
        super().__init__(daemon=True)
        self.client, self.url, self.session = client, url, session
        self.messages: list[dict] = []
        self.status: int | None = None

    def run(self):
        with self.client.stream("GET", f"{self.url}gradio_api/queue/data",
                                params={"session_hash": self.session}, timeout=300) as r:
            self.status = r.status_code
            for line in r.iter_lines():
                if line.startswith("data: "):
                    self.messages.append(json.loads(line[6:]))
                    if self.messages[-1].get("msg") in ("close_stream", "process_completed"):
                        return


# --- body cap (no server) -----------------------------------------------------------------------

def test_the_default_body_cap_fits_the_largest_prompt_list(monkeypatch):
    for var in ("C2C_MAX_BODY_MB", "C2C_MAX_PROMPTS", "C2C_MAX_PROMPT_CHARS"):
        monkeypatch.delenv(var, raising=False)
    # 200 prompts x 16,000 characters, each up to 4 bytes in UTF-8, plus the other inputs
    largest = 200 * 16_000 * 4
    assert largest < gate.body_cap() <= largest + 2 * 2**20
    monkeypatch.setenv("C2C_MAX_BODY_MB", "3")
    assert gate.body_cap() == 3 * 2**20


def test_long_lines_are_cut_whatever_writes_them():
    out = io.StringIO()
    s = gate.BoundedLines(out, cap=100)
    s.write("a" * 50)
    s.write("b" * 10_000 + "\nshort\n")
    print("c" * 5000, file=s)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("a" * 50 + "b" * 50) and "9,950 more characters" in lines[0]
    assert lines[1] == "short" and lines[2].startswith("c" * 100) and len(lines[2]) < 160


def test_log_records_are_cut_at_2kb():
    gate.bound_logs()
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    log = logging.getLogger("gradio.some.child")
    log.addHandler(handler)
    try:
        log.warning("value: %s", "v" * 1_000_000)
        try:
            raise ValueError("w" * 1_000_000)
        except ValueError:
            log.exception("failed")
    finally:
        log.removeHandler(handler)
    text = out.getvalue()
    assert len(text) < 3 * gate.LOG_LINE_CHARS + 500, len(text)
    assert "more characters not logged" in text and "v" * 1000 in text


# --- a server ----------------------------------------------------------------------------------

def test_a_body_over_the_cap_gets_413_and_a_sentence(app_server, monkeypatch):
    url = app_server[1]
    monkeypatch.setenv("C2C_MAX_BODY_MB", "1")
    big = b'{"data": ["' + b"z" * (3 * 2**20) + b'"], "fn_index": 0, "session_hash": "big1"}'
    with httpx.Client(timeout=60) as c:
        r = c.post(url + "gradio_api/queue/join", content=big,
                   headers={"content-type": "application/json"})
        assert r.status_code == 413, r.text
        assert "1.0 MB" in r.text and "C2C_MAX_BODY_MB" in r.text and r.text.count(". ") == 0

        def chunks():  # no Content-Length: the bytes that arrive are counted
            for i in range(0, len(big), 256 * 1024):
                yield big[i:i + 256 * 1024]
        r = c.post(url + "gradio_api/run/predict", content=chunks(),
                   headers={"content-type": "application/json"})
        assert r.status_code == 413 and "C2C_MAX_BODY_MB" in r.text, r.text
    with httpx.Client(timeout=60) as c:
        # under the cap, the app answers as before
        r = c.post(url + "gradio_api/queue/join", timeout=30,
                   json={"data": ["x" * 900_000], "fn_index": 0, "session_hash": "small1"})
        assert r.status_code != 413 and "C2C_MAX_BODY_MB" not in r.text, r.text[:300]
        # /upload keeps its own, larger cap
        r = c.post(url + "gradio_api/upload",
                   files=[("files", ("p.jsonl", b'{"prompt": "x"}\n' * 100_000,
                                     "application/json"))])
        assert r.status_code == 200, r.text


def test_what_gradio_prints_about_a_malformed_request_is_cut(app_server, monkeypatch):
    """gradio prints a join's inputs whole when there are too few of them: one request, one
    line as long as its body. Through the server's bounded stdout, the line is cut."""
    url = app_server[1]
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", gate.BoundedLines(out))
    fn, _ = _endpoint(url, "batch")
    c = _client(url)
    try:
        r = c.post(url + "gradio_api/queue/join",
                   json={"data": ["Q" * 500_000], "fn_index": fn, "session_hash": "printed1"})
    finally:
        c.close()
    assert r.status_code in (400, 422), r.text[:200]
    printed = out.getvalue()
    assert "Q" * 1000 in printed, printed[:500]  # gradio did print it, and it was cut
    assert max(len(line) for line in printed.splitlines()) < gate.LOG_LINE_CHARS + 100
    assert "more characters not logged" in printed


# --- session hashes owned by their cookie ------------------------------------------------------

def test_a_foreign_cookie_cannot_read_a_sessions_stream_and_the_owner_finishes(app_server):
    url = app_server[1]
    fn, params = _endpoint(url, "batch")
    data = [{"prompts": "one\ntwo"}.get(name, default) for name, default in params]
    h = "ownedhash" + str(int(time.time() * 1000))
    owner, stranger = _client(url), _client(url)
    try:
        r = owner.post(url + "gradio_api/queue/join", json={
            "data": data, "fn_index": fn, "session_hash": h, "event_data": None,
            "trigger_id": None})
        assert r.status_code == 200, r.text
        stream = Stream(owner, url, h)
        stream.start()
        time.sleep(0.5)
        # the stranger, with its own cookie, names the owner's hash on every route that takes one
        # (a timeout: a stream that is not refused would hold the stranger's request open; a
        # hang guard only, so generous: a refusal's speed is not what is checked)
        quick = dict(timeout=60)
        probes = [
            stranger.get(url + "gradio_api/queue/data", params={"session_hash": h}, **quick),
            stranger.get(url + f"gradio_api/queue/data?session_hash=mine{h}&session_hash={h}",
                         **quick),
            stranger.get(url + f"gradio_api/heartbeat/{h}", **quick),
            stranger.post(url + "gradio_api/cancel", **quick,
                          json={"session_hash": h, "fn_index": fn, "event_id": r.json()[
                              "event_id"]}),
            stranger.post(url + "gradio_api/queue/join", **quick,
                          json={"data": data, "fn_index": fn, "session_hash": h}),
        ]
        for p in probes:
            assert p.status_code == 403, (p.request.url, p.status_code, p.text[:300])
            assert p.text == gate.NOT_YOURS
            assert "one" not in p.text and "process_" not in p.text
        stream.join(240)
        assert stream.status == 200
        last = stream.messages[-1] if stream.messages else {}
        done = [m for m in stream.messages if m.get("msg") == "process_completed"]
        assert done and done[-1].get("success"), last
        table = next(o for o in done[-1]["output"]["data"]
                     if isinstance(o, dict) and "data" in o and "headers" in o)
        cells = json.dumps(table["data"])
        assert '"one"' in cells and '"two"' in cells, cells[:500]  # both prompts' rows came
        assert ("/gradio_api/queue/data", h) in gate.REFUSED
    finally:
        owner.close()
        stranger.close()


def test_a_hash_is_owned_by_the_first_cookie_only():
    gate._forget_owners()
    assert gate.claim("h1", "key-a") and gate.claim("h1", "key-a")
    assert not gate.claim("h1", "key-b")
    assert gate.claim("h2", "key-b")


# --- CSV fields through the API ----------------------------------------------------------------

def test_a_csv_field_over_the_limit_reaches_an_api_client_as_its_sentence(app_server, tmp_path):
    from gradio_client import Client, handle_file
    src = tmp_path / "wide.csv"
    src.write_text("prompt\n" + "a" * 140_000 + "\n", encoding="utf-8")
    nul = tmp_path / "nul.csv"
    nul.write_text("prompt\n" + "\x00" * 100 + "\n", encoding="utf-8")
    client = Client(app_server[1], verbose=False)
    for path, says in ((src, "wide.csv line 2 has a field over 131,072 characters"),
                       (nul, "nul.csv line 2 holds a NUL character")):
        with pytest.raises(Exception) as e:
            client.predict(source="file", prompt_file=handle_file(str(path)),
                           api_name="/dataset")
        assert says in str(e.value), str(e.value)
        assert "upstream Gradio app has raised an exception" not in str(e.value)
