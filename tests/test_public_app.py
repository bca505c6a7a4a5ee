"""The app as a public Space sees it: strangers' clients naming server paths, oversize inputs,
uploads, clients that go away mid-run, and the operator's fixed models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import httpx
import pytest

from conftest import HANG_S, free_port

pytest.importorskip("gradio")

from c2c_core.spec.errors import UserError  # noqa: E402
from c2c_core.frontends.ui import guard, runcfg, sessions  # noqa: E402


# --- names (no server) --------------------------------------------------------------------------

@pytest.fixture
def public_env(monkeypatch):
    monkeypatch.delenv("C2C_ALLOW_LOCAL_PATHS", raising=False)
    monkeypatch.delenv("SPACE_ID", raising=False)


@pytest.mark.parametrize("name", [
    "/etc", "/etc/passwd", "../secret", "./tests", "~/x", "tests", "a/b/c", "dummy:../../etc/x",
    "dummy:/etc/config.json", "x.gguf", "/tmp/model.gguf", "C:\\models", "a/..", "..", "a//b",
    "tests/golden" if os.path.isdir("tests/golden") else "tests/conftest.py",
])
def test_server_paths_are_refused_without_echo(public_env, name):
    with pytest.raises(UserError) as e:
        guard.check_model_name(name, "Receiver")
    msg = str(e.value)
    assert name not in msg or name.startswith("dummy:") and name[6:] not in msg


def test_hub_ids_aliases_and_shipped_dummies_pass(public_env):
    for name in ["Qwen/Qwen3-0.6B", "meta-llama/Llama-3.2-1B", "smollm2", "dummy:qwen3-0.6b", ""]:
        guard.check_model_name(name, "Receiver")
    guard.check_fuser_name("hub:nics-efc/C2C_Fuser/qwen3_0.6b+qwen3_4b_base_Fuser")
    guard.check_fuser_name("untrained")
    for bad in ["/tmp", "hub:nics-efc/C2C_Fuser/../../x", "hub:../x/y", "hub:a/b"]:
        with pytest.raises(UserError):
            guard.check_fuser_name(bad)


def test_a_hub_shaped_name_that_is_a_local_folder_is_refused_like_any_other(public_env,
                                                                            tmp_path,
                                                                            monkeypatch):
    (tmp_path / "owner" / "model").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as present:
        guard.check_model_name("owner/model", "Receiver")
    with pytest.raises(UserError) as absent:
        guard.check_model_name("/owner/model", "Receiver")
    assert str(present.value) == str(absent.value)  # no way to tell that the folder exists


def test_datasets_are_hub_ids_or_short_names(public_env):
    guard.check_dataset_name("gsm8k", "main", "test")
    guard.check_dataset_name("cais/mmlu", "all", "test[:100]")
    for name, cfg, split in [("/tmp/c2c-workbench-sessions/x", "", "test"),
                             ("gsm8k", "../x", "test"), ("gsm8k", "", "test/../../x")]:
        with pytest.raises(UserError):
            guard.check_dataset_name(name, cfg, split)


def test_operator_opt_in_allows_paths_but_never_on_a_space(monkeypatch):
    monkeypatch.setenv("C2C_ALLOW_LOCAL_PATHS", "1")
    monkeypatch.delenv("SPACE_ID", raising=False)
    guard.check_model_name("/some/folder", "Receiver")
    monkeypatch.setenv("SPACE_ID", "someone/space")
    with pytest.raises(UserError):
        guard.check_model_name("/some/folder", "Receiver")
    assert guard.models_fixed()


def test_messages_lose_server_paths(public_env):
    from c2c_core.frontends.ui.texts import ui_message
    msg = ui_message("Fuser folder /srv/app/secret does not exist; see https://hf.co/a/b or Qwen/X.")
    assert "/srv" not in msg and "https://hf.co/a/b" in msg and "Qwen/X" in msg


# --- a public server ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def public_server(tmp_path_factory):
    """The app as a Space runs it (no local paths, default offline preset), models never
    loaded: every probe here must be refused before any model work."""
    from c2c_core.frontends.ui import build_app, jobs, launch_kwargs, runcfg, sessions
    mp = pytest.MonkeyPatch()
    mp.delenv("C2C_ALLOW_LOCAL_PATHS", raising=False)
    mp.setenv("C2C_MAX_UPLOAD_MB", "2")
    saved, sessions.SESSION_ROOT = sessions.SESSION_ROOT, str(tmp_path_factory.mktemp("sessions"))
    demo = build_app()
    port = free_port()
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True,
                **launch_kwargs())
    from c2c_core.frontends import worker
    worker.shutdown()  # no worker of an earlier module: this server starts with none
    yield f"http://127.0.0.1:{port}/"
    demo.close()
    sessions.SESSION_ROOT = saved
    mp.undo()


def _refused(url, api, **kw):
    from gradio_client import Client
    c = Client(url, verbose=False)
    t = time.perf_counter()
    with pytest.raises(Exception) as e:
        c.predict(api_name=api, **kw)
    return str(e.value), time.perf_counter() - t


def test_public_server_refuses_paths_and_oversize_input_at_once(public_server):
    url = public_server
    session_root = sessions.SESSION_ROOT
    before = runcfg.MODELS.pipe
    probes = [
        ("/dataset", dict(source="hf", dataset_name=session_root, dataset_config="",
                          split="test")),
        ("/dataset", dict(source="hf", dataset_name="/etc", dataset_config="", split="test")),
        ("/batch", dict(prompts="hi", receiver="/etc")),
        ("/batch", dict(prompts="hi", sharer="/usr/lib")),
        ("/load_models", dict(fuser="/tmp")),
        ("/load_models", dict(receiver="../../etc")),
        ("/profile", dict(prompt="x" * 1_000_000)),
        ("/batch", dict(prompts="y\n" * 1000)),
        ("/sweep", dict(input_lens="10000000", output_lens="8")),
        ("/sweep", dict(input_lens="1," * 100_000, output_lens="8")),
    ]
    for api, kw in probes:
        msg, secs = _refused(url, api, **kw)
        # a hang guard only; "before any model work" is checked below (nothing loaded)
        assert secs < HANG_S, (api, secs)
        for path in ("/etc", "/usr/lib", "/tmp", session_root, "Traceback"):
            assert path not in msg, (api, msg)
        assert "limit" in msg or "at most" in msg or "hub id" in msg or "fuser" in msg.lower(), msg
    # nothing was loaded, nothing was evicted: no job reached a worker process (nor, on the
    # in-process path, the app's own manager)
    from c2c_core.frontends import worker
    assert runcfg.MODELS.pipe is before and worker.last_worker() is None


def test_a_1mb_prompt_is_refused_before_any_model_work(public_server):
    from c2c_core.frontends import worker
    url = public_server
    before = runcfg.MODELS.pipe
    msg, secs = _refused(url, "/profile", prompt="z" * (1 << 20))
    assert "characters" in msg and "C2C_MAX_PROMPT_CHARS" in msg
    assert secs < HANG_S, secs  # a hang guard only: the machine may be loaded
    # refused by the validator: no job reached a worker, nothing loaded or evicted
    assert runcfg.MODELS.pipe is before and worker.last_worker() is None


def test_upload_bytes_per_request_are_capped(public_server):
    url = public_server
    files = [("files", (f"f{i}.jsonl", b"x" * (900 * 1024), "application/json"))
             for i in range(3)]  # 2.7 MB in one request; the cap is 2 MB here
    r = httpx.post(url + "gradio_api/upload", files=files, timeout=30)
    assert r.status_code == 413 and "C2C_MAX_UPLOAD_MB" in r.text
    r = httpx.post(url + "gradio_api/upload", files=files[:1], timeout=30)
    assert r.status_code == 200, r.text


def test_session_upload_quota(public_env, monkeypatch, tmp_path):
    monkeypatch.setenv("C2C_SESSION_UPLOAD_MB", "1")
    f, g = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    f.write_bytes(b"x" * 600_000)
    g.write_bytes(b"y" * 600_000)
    guard.count_upload("s1", [str(f)])
    guard.count_upload("s1", [str(f)])  # the same file analysed again is not charged twice
    with pytest.raises(UserError, match="C2C_SESSION_UPLOAD_MB"):
        guard.count_upload("s1", [str(g)])
    guard.count_upload("s2", [str(g)])  # another session has its own quota
    guard.forget_session("s1")
    guard.forget_session("s2")


def test_session_disk_quota(public_env, monkeypatch, tmp_path):
    monkeypatch.setenv("C2C_SESSION_DISK_MB", "1")
    guard.check_disk(str(tmp_path))
    (tmp_path / "big.jsonl").write_bytes(b"x" * (1 << 20))
    with pytest.raises(UserError, match="C2C_SESSION_DISK_MB"):
        guard.check_disk(str(tmp_path))


# --- models are the operator's -----------------------------------------------------------------

def test_fixed_models_refuse_another_pair(tiny_cfg_kwargs):
    from c2c_core.spec.config import build_run_config
    from c2c_core.frontends.manager import ModelManager
    m = ModelManager()
    cfg = build_run_config(**tiny_cfg_kwargs)
    m.fix(cfg)
    m.check_allowed(cfg)
    other = build_run_config(**{**tiny_cfg_kwargs, "hidden_dim": 16})
    with pytest.raises(UserError, match="fixed by its operator"):
        m.get(other)
    assert m.pipe is None


def test_a_failed_load_keeps_the_working_pipeline(tiny_cfg_kwargs, tmp_path):
    from c2c_core.spec.config import build_run_config
    from c2c_core.frontends.manager import ModelManager
    m = ModelManager()
    good = build_run_config(**tiny_cfg_kwargs)
    pipe = m.get(good)
    # a folder with a config and a tokenizer but no weights: passes the checks, fails the load
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in os.listdir(tiny_cfg_kwargs["base_model"]):
        if not f.endswith(".safetensors"):
            src = os.path.join(tiny_cfg_kwargs["base_model"], f)
            (broken / f).write_bytes(open(src, "rb").read())
    with pytest.raises(UserError, match="previous models are loaded again"):
        m.get(build_run_config(**{**tiny_cfg_kwargs, "base_model": str(broken)}))
    assert m.pipe is not None and m.key == m.key_of(good)
    assert m.pipe is not pipe  # loaded again, and it works
    # a name that fails the cheap checks never touches the loaded pair
    kept = m.pipe
    with pytest.raises(UserError):
        m.get(build_run_config(**{**tiny_cfg_kwargs, "base_model": str(tmp_path / "none")}))
    assert m.pipe is kept


# --- a client that goes away -----------------------------------------------------------------

CLIENT = textwrap.dedent("""
    import sys, time
    from gradio_client import Client
    c = Client(sys.argv[1], verbose=False)
    job = c.submit(prompts="Say hello.\\nWhat is 2+2?\\nName a color.", max_new_tokens=1500,
                   ignore_eos=True, repeats=3, warmup=0, mode="c2c", api_name="/batch")
    print("submitted", flush=True)
    time.sleep(600)
""")


# the in-process variant is slow (~35 s under load); the worker one (the default) stays quick
@pytest.mark.parametrize("where", ["worker", pytest.param("in-process", marks=pytest.mark.slow)])
def test_a_killed_client_frees_the_model_and_jobs_never_overlap(app_server, tmp_path,
                                                                monkeypatch, where):
    """Client A starts a long batch and is killed (SIGKILL) mid-run; its job must end cut
    short (not run to its end), and client B's job must start only after A's has ended. Both
    ways the app runs jobs: its worker process (the default) and in-process (ZeroGPU).
    Judged by order and by what A wrote, not by seconds (a bound of 5 s after the kill is one
    a loaded machine can miss)."""
    from gradio_client import Client
    from c2c_core.frontends import worker
    from c2c_core.frontends.ui import jobs, runcfg, sessions
    monkeypatch.setenv("C2C_APP_WORKER", "1" if where == "worker" else "0")
    # the stop must end the job, not the worker: no restart on a machine slow to end it
    monkeypatch.setenv("C2C_WORKER_STOP_S", "600")
    _, url = app_server
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    n_before = len(jobs.JOB_LOG)
    sess = sessions.SESSION_ROOT
    files_before = {os.path.join(r, f) for r, _, fs in os.walk(sess) for f in fs}
    a = subprocess.Popen([sys.executable, str(script), url], stdout=subprocess.PIPE, text=True)
    try:
        assert a.stdout.readline().strip() == "submitted"
        # wait until A's job really generates: the run lock is held and its JSONL is open
        # (the models are loaded; with the worker, its process has started)
        deadline = time.time() + 120
        while not jobs.RUN_LOCK.locked() or not (
                {os.path.join(r, f) for r, _, fs in os.walk(sess) for f in fs} - files_before):
            assert time.time() < deadline, "client A's job never started"
            time.sleep(0.05)
        time.sleep(1.5)
        pid = worker.last_worker().pid if where == "worker" else None
    finally:
        a.kill()
        a.wait()
    killed = time.perf_counter()
    # B: a short batch; it starts only when A's generation has ended
    b = Client(url, verbose=False)
    a_prompts = {"Say hello.", "What is 2+2?", "Name a color."}
    status, *_ = b.predict(prompts="What is 25 * 17?", max_new_tokens=4, warmup=0, repeats=1,
                           api_name="/batch")
    assert "Done" in status
    jobs = list(jobs.JOB_LOG)[n_before:]
    assert len(jobs) == 2, jobs
    (a0, a1), (b0, b1) = jobs
    assert a1 <= b0, "client B's job ran while A's generation was still going"
    print(f"A ended {a1 - killed:+.3f} s after the kill; A ran {a1 - a0:.2f} s; B waited {b0 - a1:.3f} s")
    if where == "worker":  # a stop ends the job, not the worker: B ran in the same process
        assert worker.last_worker().pid == pid and worker.last_worker().alive()
    # the records say the same: B's generation started after A's last one ended
    recs = []
    for root, _, files in os.walk(sess):
        for f in files:
            if f.endswith(".jsonl"):
                recs += [json.loads(x) for x in open(os.path.join(root, f)) if x.strip()]
    spans = sorted((r["run"]["gen_start_unix"], r["run"]["gen_end_unix"]) for r in recs)
    for (s0, e0), (s1, _) in zip(spans, spans[1:]):
        assert e0 <= s1 + 1e-6, "two generations overlapped"
    assert recs and all(r["run"]["frontend"] == "app" for r in recs)
    # A's job was cut short by the kill: of its 9 generations (3 prompts x 3 repeats, c2c)
    # some never ran, so the stop reached it (else B would have waited for all nine)
    new = [os.path.join(r, f) for r, _, fs in os.walk(sess) for f in fs
           if f.endswith(".jsonl") and os.path.join(r, f) not in files_before]
    a_recs = [rec for p in new for x in open(p) if x.strip()
              for rec in [json.loads(x)] if rec.get("prompt") in a_prompts]
    assert len(a_recs) < 9, len(a_recs)
    b_start = min(r["run"]["gen_start_unix"] for r in recs if r.get("prompt") == "What is 25 * 17?")
    assert all(r["run"]["gen_end_unix"] <= b_start + 1e-6 for r in a_recs)


# --- sessions the server mints (issue 16, part 4) ----------------------------------------------

class _Req:
    """What a handler gets: the client's session hash and the request's cookies."""

    def __init__(self, session_hash, cookie=None):
        self.session_hash = session_hash
        self.cookies = {} if cookie is None else {guard.SESSION_COOKIE: cookie}


def test_session_keys_come_from_the_server_never_from_the_client_hash():
    from c2c_core.frontends.ui.sessions import request_stop, session_id, stop_flag, clear_stop
    minted = guard.mint_session()
    key = guard.session_key(minted)
    assert key and key != minted and key in minted
    assert session_id(_Req("x", minted)) == session_id(_Req("other", minted)) == key
    # the same, an empty or a look-alike hash with no (or a forged) cookie: a fresh key each
    # time, shared with no one (no 'anonymous' fallback)
    forged = [None, "", "x", key, f"{key}.0", f"{key}.{'0' * 32}", "anonymous",
              minted.replace(key, "A" * 32)]
    seen = {key}
    for h in ("x", "x!", "x..", "", None, "…", "@@"):
        for c in forged:
            sid = session_id(_Req(h, c))
            assert sid not in seen and sid != "anonymous"
            seen.add(sid)
    # stop flags follow the key: a client with the victim's hash cannot stop its run
    victim = _Req("x", minted)
    ev = stop_flag(victim)
    assert not request_stop(_Req("x", guard.mint_session()))
    assert not request_stop(_Req("x")) and not request_stop(_Req("x!")) and not ev.is_set()
    assert request_stop(victim) and ev.is_set()
    clear_stop(victim, ev)


@pytest.mark.parametrize("hashes", [("x", "x"), ("x", "x!"), ("x", "x.."), ("", "")],
                         ids=["same", "bang", "dots", "empty"])
def test_clients_with_colliding_hashes_cannot_reach_each_others_runs(public_server, hashes):
    """Two gradio clients whose session hashes collide (or look alike) each get their own
    server-minted cookie: one's runs can be neither listed, read, analysed nor deleted by the
    other."""
    from gradio_client import Client
    from c2c_core.frontends.ui.sessions import session_runs
    url = public_server
    a, b = Client(url, verbose=False), Client(url, verbose=False)
    a.session_hash, b.session_hash = hashes
    ka = guard.session_key(a.cookies.get(guard.SESSION_COOKIE))
    kb = guard.session_key(b.cookies.get(guard.SESSION_COOKIE))
    assert ka and kb and ka != kb
    folder = os.path.join(sessions.SESSION_ROOT, ka)
    os.makedirs(folder, exist_ok=True)
    run = os.path.join(folder, "batch-20260101-000000.jsonl")
    with open(run, "w") as f:
        f.write(json.dumps({"id": 1, "mode": "c2c", "prompt": "secret-of-a", "response": "r",
                            "timing": {"decode_avg_ms": 1.0}}) + "\n")
    name = os.path.basename(run)
    # (the API's /analyze takes only the run names the page listed for the session; the
    # handler behind it reads runs so)
    from c2c_core.frontends.ui.results_tab import load_sources
    req_a = _Req(hashes[0], a.cookies[guard.SESSION_COOKIE])
    req_b = _Req(hashes[1], b.cookies[guard.SESSION_COOKIE])
    sources, errors = load_sources(None, [name], False, req_a)
    assert list(sources) == [name[:-6]] and not errors
    assert [n for _, n in session_runs(req_a)] == [name]
    for bad in (name, f"../{ka}/{name}", run):
        sources, errors = load_sources(None, [bad], False, req_b)
        assert not sources and "not a run of this session" in errors[0]
    assert session_runs(_Req(hashes[1], b.cookies[guard.SESSION_COOKIE])) == []
    # B's page closing (unload) removes B's folder, never A's
    sessions.end_session(_Req(hashes[1], b.cookies[guard.SESSION_COOKIE]))
    assert os.path.exists(run)
    # a raw request forging A's hash and no cookie, or a cookie of its own making
    for cookie in ({}, {guard.SESSION_COOKIE: ka}, {guard.SESSION_COOKIE: "x"}):
        r = httpx.get(url + "gradio_api/info", cookies=cookie, timeout=30)
        fresh = guard.session_key(r.cookies.get(guard.SESSION_COOKIE))
        assert fresh and fresh not in (ka, kb)
    sessions.end_session(_Req(hashes[0], a.cookies[guard.SESSION_COOKIE]))
    assert not os.path.exists(run)


def test_direct_uploads_count_toward_the_session_quota(public_server, monkeypatch):
    """Files posted straight to /upload are charged to the session that posted them (a client
    stored 270 MB against a 200 MB cap), once: analysing them later charges nothing more."""
    url = public_server
    monkeypatch.setenv("C2C_SESSION_UPLOAD_MB", "1")
    one = [("files", ("a.jsonl", b"a" * (600 * 1024), "application/json"))]
    with httpx.Client(timeout=30) as c:
        r = c.post(url + "gradio_api/upload", files=one)
        assert r.status_code == 200, r.text
        key = guard.session_key(c.cookies.get(guard.SESSION_COOKIE))
        stored = r.json()[0]
        used = guard._UPLOADED[key][0]
        assert used >= 600 * 1024
        guard.count_upload(key, [stored])  # the handler reading it: not charged again
        assert guard._UPLOADED[key][0] == used
        r = c.post(url + "gradio_api/upload",
                   files=[("files", ("b.jsonl", b"b" * (600 * 1024), "application/json"))])
        assert r.status_code == 413 and "C2C_SESSION_UPLOAD_MB" in r.text
        assert r.text.count(". ") == 0 and "Traceback" not in r.text
    # another session (a new cookie) has its own quota
    r = httpx.post(url + "gradio_api/upload",
                   files=[("files", ("c.jsonl", b"c" * (600 * 1024), "application/json"))],
                   timeout=30)
    assert r.status_code == 200, r.text
    guard.forget_session(key)


def test_a_queue_join_without_a_session_hash_is_refused_in_a_sentence(public_server):
    url = public_server
    for h in ("", "   "):
        r = httpx.post(url + "gradio_api/queue/join", timeout=30,
                       json={"data": [], "fn_index": 0, "session_hash": h})
        assert r.status_code == 400 and "names no session" in r.text, r.text
    # a join that names one is passed on unchanged (gradio answers it)
    r = httpx.post(url + "gradio_api/queue/join", timeout=30,
                   json={"data": [], "fn_index": 999, "session_hash": "abc"})
    assert "names no session" not in r.text


@pytest.mark.parametrize("kw, says", [
    (dict(repeats=1_000_000), "'repeats' is 1000000; this input takes at most"),
    (dict(batch_size=0), "'batch size' is 0; this input takes at least 1"),
    (dict(mode="../../x"), "'Mode' is ../../x, which is not one of its choices"),
])
def test_out_of_range_api_values_get_a_sentence_not_a_bare_400(public_server, kw, says):
    """gradio refuses a value outside an input's range or choices with a 400 that
    gradio_client shows as a bare "400 Bad Request"; the app says it in a sentence."""
    url = public_server
    msg, secs = _refused(url, "/batch", prompts="hi", **kw)
    assert says in msg and "400 Bad Request" not in msg, msg


def test_a_refused_choice_in_a_list_names_its_box(public_server):
    """A multi-choice input (the Load tab's modes) holding a value it does not offer: the
    sentence names that box, not "a setting"."""
    msg, _ = _refused(public_server, "/load", modes=["../../x"], rates="1", requests=2,
                      max_tokens=4, slots=2, slo="")
    assert "'Modes (one sweep each" in msg and "which is not one of its choices" in msg, msg


def test_a_chunked_upload_past_the_quota_is_removed_unless_another_session_holds_it(
        public_server, monkeypatch):
    """Without a Content-Length the quota is checked once gradio has stored the files: over it,
    they are removed and the client told why, but a file another session was charged for (gradio
    stores equal files at one path) is kept."""
    url = public_server
    monkeypatch.setenv("C2C_SESSION_UPLOAD_MB", "1")

    def chunked(c, name, data):
        boundary = "c2cboundary"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\";"
                f" filename=\"{name}\"\r\nContent-Type: text/plain\r\n\r\n").encode() + data \
            + f"\r\n--{boundary}--\r\n".encode()
        return c.post(url + "gradio_api/upload", content=iter([body[:1000], body[1000:]]),
                      headers={"content-type": f"multipart/form-data; boundary={boundary}"})

    shared = b"s" * (700 * 1024)
    with httpx.Client(timeout=30) as other:
        r = chunked(other, "shared.jsonl", shared)
        assert r.status_code == 200, r.text
        kept = r.json()[0]
        other_key = guard.session_key(other.cookies.get(guard.SESSION_COOKIE))
    with httpx.Client(timeout=30) as c:
        r = chunked(c, "a.jsonl", b"a" * (600 * 1024))
        assert r.status_code == 200, r.text
        key = guard.session_key(c.cookies.get(guard.SESSION_COOKIE))
        r = chunked(c, "b.jsonl", b"b" * (600 * 1024))
        assert r.status_code == 413 and "C2C_SESSION_UPLOAD_MB" in r.text, r.text
        r = chunked(c, "shared.jsonl", shared)  # the other session's file: refused, kept
        assert r.status_code == 413
        assert os.path.exists(kept)
    b_files = [os.path.join(root, f) for root, _, fs in os.walk(os.path.dirname(
        os.path.dirname(kept))) for f in fs if f == "b.jsonl"]
    assert not [p for p in b_files if os.path.getsize(p) == 600 * 1024], b_files
    guard.forget_session(key)
    guard.forget_session(other_key)
