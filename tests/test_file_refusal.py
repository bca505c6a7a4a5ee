"""A file input naming a server path that no upload stored (another session's run file, a
system file) is refused in one sentence that every client shows, without echoing the path;
gradio alone answered a bare `{"error": null}`."""

from __future__ import annotations

import json
import os

import httpx
import pytest

pytest.importorskip("gradio")

from c2c_core.frontends.ui import gate, sessions  # noqa: E402


def call(url: str, client: httpx.Client, api: str, **values) -> tuple[str, object]:
    """POST /gradio_api/call/<api> with `values` over the defaults; (event, data) of the end."""
    info = client.get(url + "gradio_api/info", timeout=30).json()
    params = info["named_endpoints"][f"/{api}"]["parameters"]
    data = [values.get(p["parameter_name"], p.get("parameter_default")) for p in params]
    r = client.post(f"{url}gradio_api/call/{api}", json={"data": data}, timeout=30)
    if r.status_code != 200:  # refused before it queued (the endpoint's validator)
        return f"HTTP {r.status_code}", {"error": str(r.json().get("detail")).strip('"')}
    event = None
    with client.stream("GET", f"{url}gradio_api/call/{api}/{r.json()['event_id']}",
                       timeout=120) as resp:
        for line in resp.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event in ("complete", "error"):
                return event, json.loads(line[6:])
    raise AssertionError("the stream ended without a result")


def file_data(path: str) -> dict:
    return {"path": path, "meta": {"_type": "gradio.FileData"}}


def test_a_server_path_in_a_file_input_is_refused_in_a_sentence(app_server, tmp_path):
    url = app_server[1]
    # a run file of another session, on this server
    other = os.path.join(sessions.SESSION_ROOT, "someone-else")
    os.makedirs(other, exist_ok=True)
    theirs = os.path.join(other, "batch-20260101-000000.jsonl")
    with open(theirs, "w") as f:
        f.write(json.dumps({"id": 1, "mode": "c2c", "prompt": "secret", "response": "r"}) + "\n")
    with httpx.Client() as me:
        for path in (theirs, "/etc/passwd", "/etc/passwd-does-not-exist"):
            event, data = call(url, me, "analyze", files=[file_data(path)])
            assert event == "error" and data["error"] == gate.NOT_UPLOADED, data
            assert path not in json.dumps(data)
            event, data = call(url, me, "dataset", source="file", num_samples=1,
                               prompt_file=file_data(path))
            assert event in ("error", "HTTP 400") and data["error"] == gate.NOT_UPLOADED, data
            assert path not in json.dumps(data)
        # a file this client uploaded is taken as before
        up = me.post(url + "gradio_api/upload", timeout=30,
                     files={"files": ("mine.jsonl", open(theirs, "rb").read())}).json()[0]
        event, data = call(url, me, "analyze", files=[file_data(up)])
        assert event == "complete" and "1 record(s)" in data[0], data
