"""The fair model queue: a job starts only for a client that is there (its message stream is
open), a session has at most one job waiting, and Stop removes a job still waiting."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

pytest.importorskip("gradio")

from c2c_core.frontends.ui import fairqueue, jobs, sessions  # noqa: E402
from conftest import HANG_S  # noqa: E402

LONG = dict(max_new_tokens=400, ignore_eos=True, warmup=0)


def _dep_of(url: str, elem_id: str) -> int:
    """The id of the click event of the button with this elem_id."""
    cfg = httpx.get(f"{url}config", timeout=30).json()
    comp = next(c["id"] for c in cfg["components"] if c.get("props", {}).get("elem_id") == elem_id)
    return next(d["id"] for d in cfg["dependencies"] if [comp, "click"] in d.get("targets", []))


def _endpoint(url: str, api: str) -> tuple[int, list, list]:
    """(fn_index, data at every parameter's default) of a named endpoint, as a raw join
    needs them."""
    from gradio_client import Client
    info = Client(url, verbose=False).view_api(print_info=False, return_format="dict")
    params = info["named_endpoints"][f"/{api}"]["parameters"]
    cfg = httpx.get(f"{url}config", timeout=30).json()
    fn = next(d["id"] for d in cfg["dependencies"] if d.get("api_name") == api)
    return fn, [p.get("parameter_default") for p in params], [p["parameter_name"] for p in params]


def _join(url: str, api: str, session: str, browser: httpx.Client | None = None,
          **overrides) -> httpx.Response:
    """A raw queue join; `browser` keeps the session cookie the server mints (a client
    without one is a new session at every request)."""
    fn, data, names = _endpoint(url, api)
    data = [overrides.get(n, d) for n, d in zip(names, data)]
    return (browser or httpx).post(f"{url}gradio_api/queue/join", timeout=30,
                      json={"data": data, "fn_index": fn, "session_hash": session,
                            "event_data": None, "trigger_id": None})


class Stream(threading.Thread):
    """A client that is there: reads its session's message stream until it closes."""

    def __init__(self, url: str, session: str, browser: httpx.Client | None = None):
        super().__init__(daemon=True)
        self.url, self.session, self.messages = url, session, []
        self.browser = browser or httpx

    def run(self):
        try:
            with self.browser.stream("GET", f"{self.url}gradio_api/queue/data",
                              params={"session_hash": self.session}, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        self.messages.append(json.loads(line[6:]))
                        if self.messages[-1].get("msg") == "close_stream":
                            return
        except httpx.HTTPError:
            pass


def _busy(url: str):
    """A long batch from another client that holds the model slot; returns its job."""
    from gradio_client import Client
    job = Client(url, verbose=False).submit(prompts="Count to a hundred.\n" * 12,
                                            api_name="/batch", **LONG)
    assert _wait(lambda: jobs.RUN_LOCK.locked())  # it runs: the slot is taken (hang guard)
    return job


def _wait(cond, timeout=HANG_S):
    t = time.time()
    while not cond():
        if time.time() - t > timeout:
            return False
        time.sleep(0.05)
    return True


def test_jobs_of_clients_that_never_connect_are_dropped_and_honest_ones_run(app_server,
                                                                           monkeypatch):
    demo, url = app_server
    monkeypatch.setenv("C2C_CONNECT_GRACE_S", "1")
    absent = [f"absent-{i}" for i in range(5)]
    for s in absent:
        r = _join(url, "batch", s, prompts=f"never read {s}", **LONG)
        assert r.status_code == 200, r.text
    assert _wait(lambda: {s for s, _ in fairqueue.DROPPED} >= set(absent))
    assert sum(fairqueue.waiting_jobs(s) for s in absent) == 0
    # an honest client opens its stream right after joining, but a loaded machine may take
    # more than 1 s to do it: the grace it gets is the default's order, not the test's 1 s
    monkeypatch.setenv("C2C_CONNECT_GRACE_S", "30")
    from gradio_client import Client
    status, *_ = Client(url, verbose=False).predict(prompts="What is 2+2?", max_new_tokens=2,
                                                    warmup=0, api_name="/batch")
    assert "Done" in status
    # none of the absent clients' prompts ever ran
    import glob
    import os
    for path in glob.glob(os.path.join(sessions.SESSION_ROOT, "*", "*.jsonl")):
        assert "never read" not in open(path).read()


def test_one_waiting_job_per_session_and_stop_removes_it(app_server, monkeypatch):
    demo, url = app_server
    monkeypatch.setenv("C2C_CONNECT_GRACE_S", "30")
    busy = _busy(url)
    me, other = httpx.Client(), httpx.Client()  # two browsers, each with its minted cookie
    me.get(url, timeout=30)
    other.get(url, timeout=30)
    try:
        stream = Stream(url, "one-waiting", me)
        first = _join(url, "batch", "one-waiting", me, prompts="first waiting job", **LONG)
        assert first.status_code == 200, first.text
        stream.start()
        assert _wait(lambda: fairqueue.connected("one-waiting"))  # HANG_S: a hang guard
        second = _join(url, "batch", "one-waiting-2", me, prompts="second job", **LONG)
        assert second.status_code == 400  # the session is the cookie, whatever hash is sent
        assert second.json()["detail"] == fairqueue.ONE_WAITING
        assert fairqueue.waiting_jobs("one-waiting") == 1
        stop = _dep_of(url, "batch-stop")

        def press_stop(browser):
            return browser.post(f"{url}gradio_api/queue/join", timeout=30,
                                json={"data": [], "fn_index": stop,
                                      "session_hash": "one-waiting", "event_data": None,
                                      "trigger_id": None})

        # another session sending this page's hash is refused (the hash is this cookie's:
        # gate.StreamOwners) and does not remove its job
        refused = press_stop(other)
        assert refused.status_code == 403 and "session" in refused.text
        time.sleep(1.0)
        assert fairqueue.waiting_jobs("one-waiting") == 1
        # Stop, pressed in this session: its waiting job leaves the queue, its client is told
        r = press_stop(me)
        assert r.status_code == 200, r.text
        assert _wait(lambda: fairqueue.waiting_jobs("one-waiting") == 0)
        assert _wait(lambda: any(m.get("msg") == "process_completed"
                                 and m.get("success") is False for m in stream.messages))
        done = [m for m in stream.messages if m.get("msg") == "process_completed"
                and m.get("success") is False][0]
        assert done["output"]["error"] == fairqueue.REMOVED
        assert _wait(lambda: any("waiting in the queue was removed" in str(m.get("log"))
                                 for m in stream.messages))
        # and the Stop's own answer rewrites the tab's status line ("Sent…" would stay)
        assert _wait(lambda: any(m.get("msg") == "process_completed" and m.get("success")
                                 and "Stopped** before it started" in json.dumps(m["output"])
                                 for m in stream.messages))
        # the session may queue again once nothing of it waits
        again = _join(url, "batch", "one-waiting", me, prompts="again", max_new_tokens=1,
                      warmup=0)
        assert again.status_code == 200
    finally:
        busy.cancel()
        me.close()
        other.close()


# slow: a REST client streaming a whole run (~35 s under load); quick: the other fair-queue tests
@pytest.mark.slow
def test_a_rest_api_client_reading_its_call_stream_counts_as_connected(app_server, monkeypatch):
    """`POST call/<api>` then `GET call/<api>/<event id>`: that stream is the client's."""
    demo, url = app_server
    # a stream that did not count as the client's would be dropped after 15 s (a hang, then a
    # failure); 15 s leaves a loaded machine room between the POST and the GET
    monkeypatch.setenv("C2C_CONNECT_GRACE_S", "15")
    from gradio_client import Client
    info = Client(url, verbose=False).view_api(print_info=False, return_format="dict")
    params = info["named_endpoints"]["/batch"]["parameters"]
    over = {"prompts": "What is 1+1?", "max_new_tokens": 2, "warmup": 0}
    data = [over.get(p["parameter_name"], p.get("parameter_default")) for p in params]
    r = httpx.post(f"{url}gradio_api/call/batch", json={"data": data}, timeout=30)
    assert r.status_code == 200, r.text
    eid = r.json()["event_id"]
    text = ""
    with httpx.stream("GET", f"{url}gradio_api/call/batch/{eid}", timeout=120) as resp:
        for line in resp.iter_lines():
            text += line + "\n"
            if line.startswith(("event: complete", "event: error")):
                break
    assert "event: complete" in text and "Done" in text, text[-2000:]
