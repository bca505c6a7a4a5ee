#!/usr/bin/env python
"""Try to abuse the web app the way a stranger on a public Space could, and report.

Starts `python app.py` (the offline default pair, no local paths: a Space's settings) on a free
port with its own temporary folder, then runs every probe: server paths in every input that
names a thing, oversize inputs, uploads, bad files, clients killed mid-run, parallel clients,
the memory budget (50 sharers, a 7-8B pair on a CPU, a sweep of batch 1024 x 8,000 tokens),
device-spelling churn (one worker throughout), queue joins of clients that never connect (none
of their jobs runs; an honest client gets through) and Stop of a job still waiting.
After each probe it checks that the app still answers. Prints a table probe -> outcome and,
last, one JSON line with the counts:

    python scripts/abuse_check.py          # every probe (a few minutes on a CPU)
    python scripts/abuse_check.py --fast   # the subset CI runs (about a minute)

Outcomes: `refused` (one clean sentence, nothing leaked), `ok` (a control that must work did),
`LEAK` (a server path, a file's content or another session's data came back), `TRACEBACK`
(a stack trace reached the client), `NOT REFUSED`, `FAILED` (anything else wrong). Exit 0 only
with no leak, no traceback, nothing failed and the app alive.
"""

from __future__ import annotations

import argparse
import atexit
import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass, field

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SENTINEL = "C2C-ABUSE-SENTINEL-7f3a"
#: Seconds after which a call counts as hung. A hang guard only: no probe is judged by how
#: fast it answered (the machine may be loaded; under load 9-17 on 2 cores a bound of 3 s
#: failed), only by what it answered and in what order things happened.
HANG_S = 300.0
#: A refusal with no sentence of ours: gradio's or httpx's status line only.
BARE = re.compile(r"\b400 Bad Request\b|^HTTPStatusError")


@dataclass
class Result:
    probe: str
    outcome: str
    detail: str = ""
    secs: float = 0.0
    full: str = ""   # the whole answer (detail is shortened for the table)
    rss_mb: tuple[float, float, float] | None = None  # server (app + worker): before, peak, after


@dataclass
class Ctx:
    url: str
    tmp: str
    secret_dir: str
    session_root: str
    server_log: str
    results: list[Result] = field(default_factory=list)
    server_pid: int = 0
    growth_mb: dict[str, float] = field(default_factory=dict)  # probe -> server RSS growth
    timeline: "RssTimeline | None" = None  # the server's RSS, sampled all along

    def client(self):
        from gradio_client import Client
        return Client(self.url, verbose=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- judging a response -------------------------------------------------------------------------

def leaks(ctx: Ctx, text: str) -> list[str]:
    found = []
    if SENTINEL in text:
        found.append("secret file content")
    for p in (ctx.tmp, ctx.secret_dir, ctx.session_root, ROOT, sys.prefix, "/etc/", "/usr/",
              "/root", "root:x:0:0"):
        if p and p in text:
            found.append(f"server path {p!r}")
    return found


def has_traceback(text: str) -> bool:
    return "Traceback (most recent call last)" in text or bool(re.search(r'File "/[^"]+", line', text))


def judge_refusal(ctx: Ctx, name: str, fn, must_say: str | None = None,
                  sent: str | None = None) -> Result:
    t = time.perf_counter()
    try:
        out = fn()
    except Exception as e:  # noqa: BLE001 - a refusal arrives as an exception of the client
        secs = time.perf_counter() - t
        text = f"{type(e).__name__}: {e}"
        # the client's own text said back to it is no leak; anything else from the server is
        if (bad := leaks(ctx, text.replace(sent, "<sent>") if sent else text)):
            return Result(name, "LEAK", "; ".join(bad) + f" | {short(text)}", secs)
        if has_traceback(text):
            return Result(name, "TRACEBACK", short(text), secs)
        if must_say and must_say not in text:
            return Result(name, "FAILED", f"refused without saying {must_say!r}: {short(text)}",
                          secs)
        return Result(name, "refused", short(text), secs, full=text)
    secs = time.perf_counter() - t
    text = json.dumps(out, default=str)
    if (bad := leaks(ctx, text)):
        return Result(name, "LEAK", "; ".join(bad) + f" | {short(text)}", secs)
    return Result(name, "NOT REFUSED", short(text), secs)


def first_words(r: Result, n: int = 14) -> str:
    """The answer's first words (the detail when the answer was not kept, or the probe failed:
    then the detail says why)."""
    good = r.outcome in ("ok", "refused")
    words = short(r.full if good and r.full else r.detail, 400).split()
    return " ".join(words[:n]) + (" …" if len(words) > n else "")


def short(text: str, n: int = 150) -> str:
    t = " ".join(str(text).split())
    m = re.search(r"failed validation:\s*-\s*\w+:\s*(.*)", t)
    if m:
        t = m.group(1)
    return t if len(t) <= n else t[: n - 1] + "…"


def call(client, api_name: str, timeout: float = HANG_S, **kw):
    """client.predict with a bound on the wait (a hung server must not hang the check)."""
    return client.submit(api_name=api_name, **kw).result(timeout=timeout)


def alive(ctx: Ctx) -> bool:
    try:
        return httpx.get(ctx.url, timeout=15).status_code == 200
    except httpx.HTTPError:
        return False


# --- probes -------------------------------------------------------------------------------------

def name_probes(ctx: Ctx) -> list[tuple[str, object, str]]:
    """(probe, make(value) -> call, value): every text input that names a thing, given a server
    path. Each runs twice, with the path and with a path that does not exist: the two answers
    must say the same (else the app tells a client which server paths exist)."""
    c = ctx.client()
    sd, sr = ctx.secret_dir, ctx.session_root
    rel = os.path.relpath(sd, ROOT)
    batch = lambda key: lambda v: lambda: call(c, prompts="hi", max_new_tokens=2,  # noqa: E731
                                               api_name="/batch", **{key: v})
    load = lambda key: lambda v: lambda: call(c, api_name="/load_models", **{key: v})  # noqa: E731
    data = lambda key: lambda v: lambda: call(c, **{  # noqa: E731
        "source": "hf", "dataset_name": "gsm8k", "dataset_config": "", "split": "test",
        "num_samples": 1, key: v}, api_name="/dataset")
    runs = lambda v: lambda: call(c, files=[], runs=[v], skip_bad_lines=False,  # noqa: E731
                                  api_name="/analyze")
    raw_file = lambda api, key, many: lambda v: lambda: raw_call(  # noqa: E731
        ctx, api, {"source": "file", "num_samples": 1,
                   key: ([{"path": v, "meta": {"_type": "gradio.FileData"}}] if many else
                         {"path": v, "meta": {"_type": "gradio.FileData"}})})
    return [
        ("dataset name = a server folder with prompts", data("dataset_name"), sd),
        ("dataset name = the app's session folder", data("dataset_name"), sr),
        ("dataset name = relative path", data("dataset_name"), rel),
        ("dataset name = ../ traversal", data("dataset_name"), "../../" + rel),
        ("dataset name = hub-shaped local folder", data("dataset_name"), "scripts/.."),
        ("dataset config = path", data("dataset_config"), "../../etc"),
        ("dataset split = path", data("split"), "../../etc/passwd"),
        ("receiver = /etc", batch("receiver"), "/etc"),
        ("receiver = secret folder", batch("receiver"), sd),
        ("receiver = a .gguf path", batch("receiver"), os.path.join(sd, "model.gguf")),
        ("receiver = dummy:<absolute config>", batch("receiver"), "dummy:/etc/passwd"),
        ("receiver = dummy:<../ config>", batch("receiver"), "dummy:../../" + rel + "/c"),
        ("receiver = ~ path", batch("receiver"), "~/.cache"),
        ("receiver = relative folder (hub-shaped)", batch("receiver"), "c2c_core/ui"),
        ("sharer = /usr/lib", batch("sharer"), "/usr/lib"),
        ("fuser = secret folder", load("fuser"), sd),
        ("fuser = hub:../../ traversal", load("fuser"), "hub:../../etc/x"),
        ("fuser = hub:<repo>/../", load("fuser"), "hub:nics-efc/C2C_Fuser/../.."),
        ("load_models receiver = a folder that is not a model", load("receiver"), sd),
        ("results: run name = ../ path", runs, "../../" + os.path.basename(sd) + "/prompts.jsonl"),
        ("results: run name = absolute path", runs, os.path.join(sd, "prompts.jsonl")),
        ("dataset file = a server path (not uploaded)", raw_file("dataset", "prompt_file", False),
         os.path.join(sd, "prompts.jsonl")),
        ("results file = /etc/passwd (not uploaded)", raw_file("analyze", "files", True),
         "/etc/passwd"),
    ]


def judge_path_probe(ctx: Ctx, name: str, make, value: str) -> Result:
    """Refused, nothing leaked beyond the echo of what was sent, and the same answer for a
    path that exists and one that does not."""
    missing = value.rstrip("/") + "-does-not-exist-91"
    a = judge_refusal(ctx, name, make(value), sent=value)
    if a.outcome != "refused":
        return a
    b = judge_refusal(ctx, name, make(missing), sent=missing)
    if a.full.replace(value, "<sent>") != b.full.replace(missing, "<sent>"):
        return Result(name, "LEAK", f"answers differ for an existing and a missing path:"
                                    f" {a.detail!r} vs {b.detail!r}", a.secs)
    return a


def raw_call(ctx: Ctx, api: str, overrides: dict, timeout: float = 60):
    """A hand-made API call (what gradio_client would never send, e.g. a FileData naming a
    server path): every parameter at its default except `overrides`, then read the result
    stream until it completes (bounded in time)."""
    from gradio_client import Client
    info = Client(ctx.url, verbose=False).view_api(print_info=False, return_format="dict")
    params = info["named_endpoints"][f"/{api}"]["parameters"]
    data = [overrides.get(p["parameter_name"], p.get("parameter_default")) for p in params]
    r = httpx.post(f"{ctx.url}gradio_api/call/{api}", json={"data": data}, timeout=30)
    if r.status_code != 200:
        raise RuntimeError(f"HTTP {r.status_code}: {r.text}")
    eid = r.json()["event_id"]
    text, deadline = "", time.time() + timeout
    with httpx.stream("GET", f"{ctx.url}gradio_api/call/{api}/{eid}", timeout=30) as resp:
        for line in resp.iter_lines():
            text += line + "\n"
            if line.startswith("event: error"):
                raise RuntimeError(text)
            if line.startswith("event: complete") or time.time() > deadline:
                break
    return text


def size_probes(ctx: Ctx) -> list[tuple[str, object, dict]]:
    c = ctx.client()
    return [
        ("1 MB prompt to /profile", lambda: call(c, prompt="x" * (1 << 20),
                                                       api_name="/profile"),
         {"must_say": "C2C_MAX_PROMPT_CHARS"}),
        ("1 MB prompt list to /batch", lambda: call(c, prompts="y\n" * (1 << 19),
                                                          api_name="/batch"), {}),
        ("5,000 prompts to /batch", lambda: call(c,
            prompts="\n".join(f"q{i}" for i in range(5000)), api_name="/batch"), {}),
        ("max_new_tokens = 100,000", lambda: call(c, prompts="hi", max_new_tokens=100_000,
                                                       api_name="/batch"), {}),
        ("fuser_hidden_dim = 20,000", lambda: call(c, fuser_hidden_dim=20_000,
                                                        api_name="/load_models"), {}),
        ("fuser_layers = 10,000", lambda: call(c, fuser_layers=10_000,
                                                    api_name="/load_models"), {}),
        ("repeats = 1,000,000", lambda: call(c, prompts="hi", repeats=1_000_000,
                                                  api_name="/batch"), {}),
        ("warm-up = 10,000", lambda: call(c, prompts="hi", warmup=10_000,
                                               api_name="/batch"), {}),
        ("num_samples = 10,000,000", lambda: call(c,
            source="hf", dataset_name="gsm8k", dataset_config="", split="test",
            num_samples=10_000_000, api_name="/dataset"), {}),
        ("sweep prompt length 10,000,000", lambda: call(c,
            input_lens="10000000", output_lens="8", api_name="/sweep"), {}),
        ("sweep prompt length past the context (10,000 > 8,192)", lambda: call(c,
            input_lens="10000", output_lens="8", api_name="/sweep"), {"must_say": "8,192"}),
        ("sweep with 1,000,000 lengths", lambda: call(c,
            input_lens="1," * 1_000_000, output_lens="8", api_name="/sweep"), {}),
        ("prompt longer than the context", lambda: call(c,
            prompt="word " * 12_000, api_name="/profile"), {}),
        ("mode = unknown", lambda: call(c, prompts="hi", mode="../../x", api_name="/batch"),
         {}),
        ("device = cuda:99", lambda: call(c, prompts="hi", device="cuda:99",
                                               api_name="/batch"), {}),
        # the memory budget: refused before anything loads, saying which budget
        ("50 sharers", lambda: call(c, prompts="hi", receiver="smollm2",
            sharer=",".join(["smollm2"] * 50), api_name="/batch"),
         {"must_say": "C2C_MAX_SHARERS"}),
        ("7-8B dummy pair on a CPU", lambda: call(c, prompts="hi",
            preset="qwen3-8b+qwen2.5-7b-dummy", device="cpu", api_name="/batch"),
         {"must_say": "billion parameters"}),
        ("8B dummy receiver by hand on a CPU", lambda: call(c, receiver="dummy:qwen3-8b",
            sharer="smollm2", device="cpu", dtype="float32", api_name="/load_models"),
         {"must_say": "billion parameters"}),
        ("sweep batch 1024 x 8,000 tokens", lambda: call(c, input_lens="8000",
            output_lens="16", batch_sizes="1024", engine="fast", api_name="/sweep"),
         {"must_say": "KV cache"}),
        ("device = meta", lambda: call(c, prompts="hi", device="meta", api_name="/batch"),
         {"must_say": "use auto, cpu or cuda"}),
        # the Load tab: its caps, before a server starts or a request is sent
        ("load rate 1e9 req/s", lambda: load_call(c, rates="1e9"), {"must_say": "cap of"}),
        ("load mode = ../../etc/passwd", lambda: load_call(c, modes=["../../etc/passwd"]),
         {"must_say": "'Modes", "sent": "../../etc/passwd"}),
        ("load 10^9 requests per point", lambda: load_call(c, requests=10**9),
         {"must_say": "Requests per point"}),
        ("load 10^9 tokens per request", lambda: load_call(c, max_tokens=10**9),
         {"must_say": "Max tokens"}),
        ("load -5 slots", lambda: load_call(c, slots=-5), {"must_say": "'Slots"}),
        ("load rates of 100,000 characters", lambda: load_call(c, rates="1," * 50_000),
         {"must_say": "Offered rates is"}),
        ("load SLO ttft_ms=nan", lambda: load_call(c, slo="ttft_ms=nan"),
         {"must_say": "SLO ttft_ms=nan"}),
        ("load SLO nan,inf", lambda: load_call(c, slo="nan,inf"), {"must_say": "SLO part"}),
    ]


def load_call(c, **kw):
    """The Load tab's endpoint with small, valid settings but `kw`."""
    args = dict(modes=["c2c"], rates="1", requests=2, max_tokens=4, slots=2, slo="")
    return call(c, api_name="/load", **{**args, **kw})


def upload(ctx: Ctx, files: list[tuple[str, bytes]]) -> httpx.Response:
    return httpx.post(f"{ctx.url}gradio_api/upload",
                      files=[("files", (n, b, "application/octet-stream")) for n, b in files],
                      timeout=120)


def upload_probes(ctx: Ctx) -> list[Result]:
    out = []
    big = b"x" * (20 << 20)
    t = time.perf_counter()
    r = upload(ctx, [("a.jsonl", big), ("b.jsonl", big), ("c.jsonl", big)])
    secs = time.perf_counter() - t
    text = r.text
    if leaks(ctx, text):
        out.append(Result("3 x 20 MB files in one upload request", "LEAK", short(text), secs))
    elif r.status_code == 413:
        out.append(Result("3 x 20 MB files in one upload request", "refused", short(text), secs))
    else:
        out.append(Result("3 x 20 MB files in one upload request", "NOT REFUSED",
                          f"HTTP {r.status_code}", secs))
    del big
    # bad files, uploaded properly, then run
    bad = [
        ("binary garbage .jsonl", "g.jsonl", os.urandom(4096)),
        ("not a parquet .parquet", "g.parquet", b"PAR1 nope"),
        ("empty .csv", "e.csv", b""),
        ("latin-1 .jsonl", "l.jsonl", '{"prompt": "caf\xe9 cr\xe8me"}\n'.encode("latin-1")),
        ("JSON with a list id", "i.jsonl", b'{"id": [1, 2], "prompt": "hi"}\n'),
        ("deeply nested JSON", "n.jsonl", b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000
         + b"}\n"),
    ]
    from gradio_client import handle_file
    c = ctx.client()
    for label, fname, data in bad:
        path = os.path.join(ctx.tmp, "upload-" + fname)
        with open(path, "wb") as f:
            f.write(data)
        res = judge_refusal(ctx, f"dataset file: {label}", lambda p=path: call(c,
            source="file", dataset_name="", dataset_config="", split="test",
            prompt_file=handle_file(p), num_samples=1, max_new_tokens=2, warmup=0,
            api_name="/dataset"))
        if res.outcome == "NOT REFUSED":  # a file we can read is fine too, if it ran cleanly
            res.outcome = "ok"
        out.append(res)
        res = judge_refusal(ctx, f"results file: {label}", lambda p=path: call(c,
            files=[handle_file(p)], runs=[], skip_bad_lines=False, api_name="/analyze"))
        if res.outcome == "NOT REFUSED":
            res.outcome = "ok"
        out.append(res)
    return out


KILLED_PROMPT = "Count from one to one thousand in words."
KILLED_CLIENT = textwrap.dedent(f"""
    import sys, time
    from gradio_client import Client
    c = Client(sys.argv[1], verbose=False)
    if sys.argv[2] == "batch":
        job = c.submit(prompts={KILLED_PROMPT!r}, max_new_tokens=1500, mode="c2c",
                       ignore_eos=True, repeats=3, warmup=1, api_name="/batch")
    else:
        job = c.submit(prompt={KILLED_PROMPT!r}, max_new_tokens=1500,
                       ignore_eos=True, warmup=1, api_name="/profile")
    print("submitted", flush=True)
    time.sleep(3600)
""")
#: Records the killed client's job writes when it runs to its end (None: not judged; a
#: profile's records are not counted here).
KILLED_RECORDS = {"batch": 3, "profile": None}


def session_records(ctx: Ctx) -> list[dict]:
    recs = []
    for p in glob.glob(os.path.join(ctx.session_root, "*", "*.jsonl")):
        with open(p, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    recs.append(json.loads(line))
                except ValueError:
                    pass
    return recs


def overlaps(recs: list[dict]) -> int:
    spans = sorted((r["run"]["gen_start_unix"], r["run"]["gen_end_unix"]) for r in recs
                   if "gen_start_unix" in r.get("run", {}))
    return sum(1 for (s0, e0), (s1, _) in zip(spans, spans[1:]) if e0 > s1 + 1e-6)


def disconnect_probe(ctx: Ctx, kind: str, run_for: float = 4.0) -> Result:
    """Kill -9 a client mid-run: its job must end cut short (cancelled, not run to its end), a
    short job from another client must then run, its generation starting after every
    generation of the killed job ended, and no two generations of the session may overlap.

    Judged by order, not by seconds: on a loaded machine the next generation started 5.4 s
    after the kill and a bound of 3 s failed. A job that was not cancelled shows as all of its
    records written before the next job's (it runs to its end first); a hung one as the next
    job's call running past its bound (HANG_S, a hang guard only)."""
    name = f"client killed during a long /{kind}"
    script = os.path.join(ctx.tmp, "killed_client.py")
    with open(script, "w") as f:
        f.write(KILLED_CLIENT)
    before = {json.dumps(r, sort_keys=True) for r in session_records(ctx)}
    a = subprocess.Popen([sys.executable, script, ctx.url, kind], stdout=subprocess.PIPE,
                         text=True)
    try:
        if a.stdout.readline().strip() != "submitted":
            return Result(name, "FAILED", "client did not start")
        time.sleep(run_for)
    finally:
        a.send_signal(signal.SIGKILL)
        a.wait()
    t = time.perf_counter()
    try:
        status, *_ = call(ctx.client(), prompts="What is 2+2?", max_new_tokens=4, warmup=0,
                          api_name="/batch", timeout=HANG_S)
    except Exception as e:  # noqa: BLE001
        return Result(name, "FAILED", f"the next job failed: {short(str(e))}")
    waited = time.perf_counter() - t
    recs = session_records(ctx)
    new = [r for r in recs if json.dumps(r, sort_keys=True) not in before]
    mine = [r for r in new if r.get("prompt") == "What is 2+2?"]
    killed = [r for r in new if r.get("prompt") == KILLED_PROMPT]
    if not mine:
        return Result(name, "FAILED", f"the next job wrote no record ({short(status)})")
    start = min(r["run"]["gen_start_unix"] for r in mine)
    killed_end = max((r["run"]["gen_end_unix"] for r in killed), default=None)
    ov = overlaps(recs)
    full = KILLED_RECORDS[kind]
    problems = []
    if full is not None and len(killed) >= full:
        problems.append(f"the killed job ran to its end ({len(killed)} of {full} records)")
    if killed_end is not None and start < killed_end:
        problems.append("the next generation started before the killed job's last one ended")
    if ov:
        problems.append(f"{ov} overlapping generations")
    detail = (f"killed job: {len(killed)} of {full if full is not None else '?'} records, cut"
              f" short; next generation started after it; next job took {waited:.1f} s;"
              f" overlapping generations: {ov}")
    if problems:
        return Result(name, "FAILED", "; ".join(problems) + f" | {detail}", waited)
    return Result(name, "ok", detail, waited)


def parallel_probe(ctx: Ctx, n: int) -> Result:
    name = f"{n} parallel clients, one short batch each"
    errors, done = [], []

    def one(i):
        try:
            status, *_ = call(ctx.client(), prompts=f"Say the number {i}.", max_new_tokens=3,
                                              warmup=0, api_name="/batch")
            done.append(status)
        except Exception as e:  # noqa: BLE001
            errors.append(str(e))

    t = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=600)
    secs = time.perf_counter() - t
    text = " ".join(errors)
    if leaks(ctx, text):
        return Result(name, "LEAK", short(text), secs)
    ov = overlaps(session_records(ctx))
    if errors or len(done) != n or ov:
        return Result(name, "FAILED", f"{len(done)} done, {len(errors)} failed, {ov} overlaps:"
                                      f" {short(text)}", secs)
    return Result(name, "ok", f"all {n} done in {secs:.1f} s; no overlapping generations", secs)


def worker_pids(app: subprocess.Popen) -> set[int]:
    """The app's spawned worker processes (multiprocessing's spawn children)."""
    import psutil
    try:
        kids = psutil.Process(app.pid).children(recursive=True)
    except psutil.Error:
        return set()
    out = set()
    for k in kids:
        try:
            if "spawn_main" in " ".join(k.cmdline()):
                out.add(k.pid)
        except psutil.Error:
            pass
    return out


def device_churn_probe(ctx: Ctx, app: subprocess.Popen) -> Result:
    """Honest batches alternating 'cpu:0', 'cpu:1', 'cpu': one worker, never restarted."""
    name = "device spelling churn (cpu:0, cpu:1, cpu, cpu:1)"
    before = worker_pids(app)
    t = time.perf_counter()
    c = ctx.client()
    for dev in ("cpu:0", "cpu:1", "cpu", "cpu:1"):
        try:
            status, *_ = call(c, prompts="Say hi.", max_new_tokens=2, warmup=0, device=dev,
                              api_name="/batch")
        except Exception as e:  # noqa: BLE001
            return Result(name, "FAILED", f"{dev}: {short(str(e))}")
        if "Done" not in status:
            return Result(name, "FAILED", f"{dev}: {short(status)}")
    after = worker_pids(app)
    ok = bool(before) and before == after
    return Result(name, "ok" if ok else "FAILED",
                  f"worker pids before {sorted(before)}, after {sorted(after)}",
                  time.perf_counter() - t)


_ENDPOINTS: dict = {}


def _raw_join(ctx: Ctx, api: str, session: str, overrides: dict,
              cookies: dict | None = None) -> httpx.Response:
    """A queue join as a client that never opens its message stream would send it (with
    `cookies`, as the session they name)."""
    if (ctx.url, api) not in _ENDPOINTS:
        from gradio_client import Client
        info = Client(ctx.url, verbose=False).view_api(print_info=False, return_format="dict")
        cfg = httpx.get(f"{ctx.url}config", timeout=30).json()
        _ENDPOINTS[ctx.url, api] = (
            next(d["id"] for d in cfg["dependencies"] if d.get("api_name") == api),
            info["named_endpoints"][f"/{api}"]["parameters"])
    fn, params = _ENDPOINTS[ctx.url, api]
    data = [overrides.get(p["parameter_name"], p.get("parameter_default")) for p in params]
    return httpx.post(f"{ctx.url}gradio_api/queue/join", timeout=30, cookies=cookies,
                      json={"data": data, "fn_index": fn, "session_hash": session,
                            "event_data": None, "trigger_id": None})


def absent_clients_probe(ctx: Ctx, n: int = 70, grace: float = 5.0) -> Result:
    """n direct queue joins of clients that never connect: none of their jobs may run, and an
    honest client gets through once the grace period has passed."""
    name = f"{n} direct queue joins of clients that never connect"
    marker = "ABSENT-CLIENT-PROMPT"
    t = time.perf_counter()
    codes: dict[int, int] = {}
    for i in range(n):
        r = _raw_join(ctx, "batch", f"absent{i:03d}xyz", {
            "prompts": f"{marker} {i}", "max_new_tokens": 200, "ignore_eos": True,
            "warmup": 0})
        codes[r.status_code] = codes.get(r.status_code, 0) + 1
    time.sleep(grace + 1.0)
    try:
        status, *_ = call(ctx.client(), prompts="What is 3+3?", max_new_tokens=2, warmup=0,
                          api_name="/batch", timeout=300)
    except Exception as e:  # noqa: BLE001
        return Result(name, "FAILED", f"joins {codes}; the honest client then failed:"
                                      f" {short(str(e))}", time.perf_counter() - t)
    ran = sum(marker in str(r.get("prompt", "")) for r in session_records(ctx))
    ok = "Done" in status and ran == 0
    return Result(name, "ok" if ok else "FAILED",
                  f"joins answered {codes}; records of absent clients: {ran}; honest batch:"
                  f" {short(status, 60)}", time.perf_counter() - t)


def stop_queued_probe(ctx: Ctx) -> Result:
    """A job waiting in the queue, then Stop in its session: it leaves the queue, its client
    hears one sentence, and it never runs; a second waiting job of one session is refused."""
    name = "Stop of a job still waiting in the queue"
    marker = "QUEUED-THEN-STOPPED"
    t = time.perf_counter()
    a = ctx.client().submit(prompts="Count from one to one thousand in words.",
                            max_new_tokens=400, ignore_eos=True, warmup=0, api_name="/batch")
    b = ctx.client()
    try:
        deadline = time.time() + 120
        while time.time() < deadline and a.status().code.name not in ("PROCESSING",
                                                                      "ITERATING"):
            time.sleep(0.2)
        job = b.submit(prompts=marker, max_new_tokens=4, warmup=0, api_name="/batch")
        # its join must have reached the queue before the second one (a fixed sleep was a race
        # on a loaded machine); HANG_S only guards against a hang
        deadline = time.time() + HANG_S
        while time.time() < deadline and job.status().code.name in ("STARTING",
                                                                    "JOINING_QUEUE"):
            time.sleep(0.1)
        second = _raw_join(ctx, "batch", b.session_hash, {"prompts": marker + " 2"},
                           cookies=dict(getattr(b, "cookies", None) or {}))
        cfg = httpx.get(f"{ctx.url}config", timeout=30).json()
        stop_btn = next(x["id"] for x in cfg["components"]
                        if x.get("props", {}).get("elem_id") == "batch-stop")
        stop_fn = next(d["id"] for d in cfg["dependencies"]
                       if [stop_btn, "click"] in d.get("targets", []))
        httpx.post(f"{ctx.url}gradio_api/queue/join", timeout=30,
                   cookies=dict(getattr(b, "cookies", None) or {}),
                   json={"data": [], "fn_index": stop_fn, "session_hash": b.session_hash,
                         "event_data": None, "trigger_id": None})
        try:
            job.result(timeout=60)
            said = "the job finished"
        except Exception as e:  # noqa: BLE001 - expected: removed, with a sentence
            said = str(e)
    finally:
        a.cancel()
    ran = sum(marker in str(r.get("prompt", "")) for r in session_records(ctx))
    ok = ("removed from the queue" in said and ran == 0 and second.status_code == 400
          and "already has a job waiting" in second.text)
    return Result(name, "ok" if ok else "FAILED",
                  f"client told: {short(said, 70)}; second join: {second.status_code};"
                  f" records of the stopped job: {ran}", time.perf_counter() - t)


def control_probe(ctx: Ctx) -> Result:
    """A plain run must still work (the checks must not refuse honest use)."""
    t = time.perf_counter()
    try:
        status, *_ = call(ctx.client(), prompts="What is the capital of France?",
                                          max_new_tokens=4, warmup=0, api_name="/batch")
    except Exception as e:  # noqa: BLE001
        return Result("control: an honest batch", "FAILED", short(str(e)))
    ok = "Done" in status
    return Result("control: an honest batch", "ok" if ok else "FAILED", short(status),
                  time.perf_counter() - t)


def models_kept_probe(ctx: Ctx) -> Result:
    c = ctx.client()
    try:
        call(c, receiver="Qwen/Does-Not-Exist-123", api_name="/load_models")
        return Result("a failed load keeps the loaded models", "NOT REFUSED")
    except Exception:  # noqa: BLE001 - expected: refused
        pass
    r = control_probe(ctx)
    r.probe = "a failed load keeps the loaded models"
    return r


# --- uploads, sessions, escaping (issue 16 parts 1, 4, 5) ----------------------------------------

def tree_rss(pid: int) -> int:
    """RSS of the server: the app process and its descendants (its worker) together."""
    import psutil
    if not pid:
        return 0
    try:
        procs = [psutil.Process(pid)]
        procs += procs[0].children(recursive=True)
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


class RssTimeline:
    """The server's RSS (app + worker) sampled every 0.2 s for the whole check: each probe's
    before (at the end of the one before it), peak and after (when it answered)."""

    def __init__(self, pid: int):
        self.pid = pid
        self.now = self.peak = tree_rss(pid)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._poll, daemon=True)
        self._t.start()

    def _poll(self):
        while not self._stop.wait(0.2):
            v = tree_rss(self.pid)
            with self._lock:
                self.now, self.peak = v, max(self.peak, v)

    def mark(self) -> tuple[float, float, float]:
        """(before, peak, after) in MB since the last mark; the next probe starts here."""
        v = tree_rss(self.pid)
        with self._lock:
            out = (self.before_mb if hasattr(self, "before_mb") else v / 2**20,
                   max(self.peak, v) / 2**20, v / 2**20)
            self.peak = self.now = v
            self.before_mb = v / 2**20
        return out

    def stop(self):
        self._stop.set()


class MemoryWatch:
    """The server's (app + worker) RSS while a probe runs, sampled every 20 ms: before, peak,
    and after (once the answer came and 0.3 s more)."""

    def __init__(self, pid: int):
        self.pid = pid
        self.base = self.peak = self.after = self._rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._poll, daemon=True)

    def _rss(self) -> int:
        return tree_rss(self.pid)

    def _poll(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._rss())

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        time.sleep(0.3)  # growth that comes just after the answer counts too
        self._stop.set()
        self._t.join()
        self.after = self._rss()
        self.peak = max(self.peak, self.after)

    @property
    def growth_mb(self) -> float:
        return max(self.peak - self.base, 0) / 2**20

    @property
    def rss_mb(self) -> tuple[float, float, float]:
        return self.base / 2**20, self.peak / 2**20, self.after / 2**20


def _parquet_bomb(path: str, rows: int, width: int, arrow_schema: bool) -> None:
    """rows copies of one width-character prompt, dictionary encoded: a few hundred bytes that
    decode to rows x width (written without ever expanding it here)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    col = pa.DictionaryArray.from_arrays(pa.array(np.zeros(rows, dtype=np.int32)),
                                         pa.array(["a" * width]))
    pq.write_table(pa.table({"prompt": col}), path, compression="zstd", store_schema=arrow_schema)


def _dataset_file(c, path: str):
    from gradio_client import handle_file
    return lambda: call(c, source="file", dataset_name="", dataset_config="", split="test",
                        prompt_file=handle_file(path), num_samples=1, max_new_tokens=2,
                        warmup=0, api_name="/dataset")


def _analyze(c, paths: list[str]):
    from gradio_client import handle_file
    return call(c, files=[handle_file(p) for p in paths], runs=[], skip_bad_lines=False,
                api_name="/analyze")


def watched(ctx: Ctx, name: str, fn, must_say: str, limit_mb: float = 500) -> Result:
    """A refused upload: one sentence naming the cap, the server's memory growing by less than
    limit_mb while it was read."""
    with MemoryWatch(ctx.server_pid) as w:
        r = judge_refusal(ctx, name, fn, must_say=must_say)
    ctx.growth_mb[name] = round(w.growth_mb, 1)
    r.rss_mb = w.rss_mb
    r.detail = f"server +{w.growth_mb:.0f} MB | {r.detail}"
    if r.outcome == "refused" and w.growth_mb >= limit_mb:
        r.outcome, r.detail = "FAILED", f"server memory grew {w.growth_mb:.0f} MB | {r.detail}"
    return r


def upload_guard_probes(ctx: Ctx, fast: bool) -> list[Result]:
    out = []
    c = ctx.client()
    d = os.path.join(ctx.tmp, "bombs")
    os.makedirs(d, exist_ok=True)
    rows_bomb = os.path.join(d, "rows-bomb.parquet")  # 1,000,000 x 2,000 chars = 2 GB
    _parquet_bomb(rows_bomb, 1_000_000, 2_000, True)
    out.append(watched(ctx, f"parquet bomb: {os.path.getsize(rows_bomb):,} bytes -> 2 GB"
                       " (1 M rows)", _dataset_file(c, rows_bomb), "C2C_MAX_FILE_ROWS"))
    wide = os.path.join(d, "wide-bomb.parquet")  # 100,000 x 20,000 chars = 2 GB
    _parquet_bomb(wide, 100_000, 20_000, False)
    out.append(watched(ctx, f"parquet bomb: {os.path.getsize(wide):,} bytes -> 2 GB"
                       " (100 k rows of 20 k chars)", _dataset_file(c, wide), "C2C_MAX_FILE_MB"))
    big_json = os.path.join(d, "big.json")  # a 45 MB JSON array (350 k rows)
    with open(big_json, "w") as f:
        f.write("[" + ",".join(json.dumps({"prompt": f"question {i} " + "x" * 90, "id": i})
                               for i in range(350_000)) + "]")
    out.append(watched(ctx, f"JSON array of {os.path.getsize(big_json) / 2**20:.0f} MB"
                       " (350 k rows)", _dataset_file(c, big_json), "C2C_MAX_FILE_ROWS"))
    os.remove(big_json)
    # gzip and extension-less files: our sentence, never a bare "400 Bad Request"
    for label, fname, data in (("gzip .jsonl.gz", "p.jsonl.gz", b"\x1f\x8b\x08\x00junk"),
                               ("no extension", "prompts", b'{"prompt": "x"}\n')):
        path = os.path.join(d, fname)
        with open(path, "wb") as f:
            f.write(data)
        out.append(judge_refusal(ctx, f"dataset file: {label}", _dataset_file(c, path),
                                 must_say="unsupported file type"))
        t = time.perf_counter()
        status = str(_analyze(c, [path])[0])
        ok = "is not a JSONL results file" in status
        out.append(Result(f"results file: {label}", "refused" if ok else "FAILED", short(status),
                          time.perf_counter() - t, full=status))
    out += session_probes(ctx)
    out.append(html_probe(ctx))
    out.append(long_steps_probe(ctx))
    out += budget_probes(ctx, fast)
    if not fast:
        out.append(direct_upload_quota_probe(ctx))
    return out


# --- decoded budgets, request bodies, owned streams (issue 29) ----------------------------------

#: Server growth an analysis of one file under the upload cap may cause, and what it may keep
#: once it has answered (issue 29: 300 MB each, two at once 600 MB; back within 50 MB).
ANALYSIS_GROWTH_MB, ANALYSIS_KEPT_MB = 300, 50


def _list_bomb(path: str, refs: int = 1_000_000, width: int = 1024) -> None:
    """One row: a list of `refs` references to one `width`-char string, dictionary encoded."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    d = pa.DictionaryArray.from_arrays(pa.array(np.zeros(refs, dtype=np.int32)),
                                       pa.array(["a" * width]))
    lst = pa.ListArray.from_arrays(pa.array([0, refs], type=pa.int32()), d)
    pq.write_table(pa.table({"prompt": ["hi"], "options": lst}), path, compression="zstd")


def _long_steps_file(path: str, records: int = 3, steps: int = 3_900_000) -> None:
    """A results file of about 45 MB: `records` records of `steps` decode steps each."""
    head = json.dumps({"mode": "c2c", "prompt": "p", "response": "r", "run": {"device": "cpu"},
                       "timing": {"ttft_ms": 5.0, "decode_avg_ms": 1.0}})[:-1]
    body = ",".join(["1.0"] * steps)
    with open(path, "w") as f:
        for i in range(records):
            f.write(f'{head}, "id": {i}, "decode_step_times_ms": [{body}]}}\n')


def analysis_memory_probe(ctx: Ctx, path: str, clients: int) -> Result:
    """`clients` sessions upload the same long-steps file and analyse it at once: every one
    gets its summary, the server grows by at most ANALYSIS_GROWTH_MB per client and is back
    within ANALYSIS_KEPT_MB of its start once they have their answers."""
    mb = os.path.getsize(path) / 2**20
    name = (f"{mb:.0f} MB of long decode-step arrays analysed "
            + ("alone" if clients == 1 else f"by {clients} sessions at once"))
    said, errors = [], []

    def one():
        try:
            said.append(str(_analyze(ctx.client(), [path])[0]))
        except Exception as e:  # noqa: BLE001
            errors.append(str(e))

    t = time.perf_counter()
    with MemoryWatch(ctx.server_pid) as w:
        threads = [threading.Thread(target=one, daemon=True) for _ in range(clients)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(HANG_S)
        time.sleep(1.0)  # memory handed back just after the answer counts as handed back
    secs = time.perf_counter() - t
    before, peak, after = w.rss_mb
    ctx.growth_mb[name] = round(w.growth_mb, 1)
    answer = said[0] if said else (errors[0] if errors else "no answer")
    problems = []
    if errors or len(said) != clients or not all("3 record(s)" in x for x in said):
        problems.append(f"{len(said)} of {clients} analyses answered with the 3 records")
    if peak - before > ANALYSIS_GROWTH_MB * clients:
        problems.append(f"the server grew {peak - before:.0f} MB (at most"
                        f" {ANALYSIS_GROWTH_MB * clients})")
    if after - before > ANALYSIS_KEPT_MB:
        problems.append(f"the server kept {after - before:.0f} MB after (at most"
                        f" {ANALYSIS_KEPT_MB})")
    r = Result(name, "FAILED" if problems else "ok",
               "; ".join(problems + [short(answer, 90)]), secs, full=answer)
    r.rss_mb = w.rss_mb
    return r


def _send_body(ctx: Ctx, path: str, size: int, chunked: bool) -> tuple[int, str]:
    """POST a `size`-byte JSON-looking body to `path` over a raw socket, a MB at a time, and
    stop sending as soon as the server answers: (HTTP status, the answer's text); (0, why)
    when none came. With `chunked` the body has no Content-Length (counted as it streams)."""
    import select
    host, port = ctx.url.split("//")[1].rstrip("/").split(":")
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            + ("Transfer-Encoding: chunked\r\n" if chunked else f"Content-Length: {size}\r\n")
            + "Connection: close\r\n\r\n").encode()
    chunk = b'{"data": ["' + b"x" * (2**20 - 11)
    sent, answer = 0, b""
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(head)
        try:
            while sent < size:
                if select.select([sock], [], [], 0)[0]:
                    break  # the server answered: it takes no more
                part = chunk[:size - sent]
                sock.sendall(b"%x\r\n%s\r\n" % (len(part), part) if chunked else part)
                sent += len(part)
            if chunked and sent >= size:
                sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # it closed the connection on us: its answer is already there
        try:
            while (got := sock.recv(65536)):
                answer += got
        except OSError:
            pass
    text = answer.decode("utf-8", "replace")
    m = re.match(r"HTTP/1\.[01] (\d+)", text)
    body = text.split("\r\n\r\n", 1)[-1]
    return (int(m.group(1)) if m else 0), (body if m else f"no answer after {sent:,} bytes")


def body_probe(ctx: Ctx, path: str, chunked: bool) -> Result:
    name = (f"200 MB {'chunked ' if chunked else ''}JSON body to {path}"
            + (" (no Content-Length)" if chunked else ""))
    t = time.perf_counter()
    with MemoryWatch(ctx.server_pid) as w:
        try:
            code, text = _send_body(ctx, path, 200 * 2**20, chunked)
        except OSError as e:
            code, text = 0, f"{type(e).__name__}: {e}"
    secs = time.perf_counter() - t
    ctx.growth_mb[name] = round(w.growth_mb, 1)
    ok = code == 413 and "C2C_MAX_BODY_MB" in text
    r = Result(name, "refused" if ok else "NOT REFUSED" if code == 200 else "FAILED",
               f"HTTP {code}: {short(text, 100)}", secs, full=text)
    r.rss_mb = w.rss_mb
    return r


def foreign_stream_probe(ctx: Ctx) -> Result:
    """A client with its own cookie asks for another session's event stream while that
    session's batch runs: it gets a 403 and a sentence and reads nothing, and the owner's
    batch ends with its result."""
    name = "foreign queue/data: another session's event stream"
    secret = f"{SENTINEL} the owner's prompt"
    t = time.perf_counter()
    owner = ctx.client()
    job = owner.submit(prompts=secret, max_new_tokens=24, ignore_eos=True, warmup=0,
                       api_name="/batch")
    deadline = time.time() + HANG_S
    while time.time() < deadline and job.status().code.name in ("STARTING", "JOINING_QUEUE"):
        time.sleep(0.1)
    with httpx.Client(timeout=30) as stranger:
        stranger.get(ctx.url)  # its own session cookie, as a browser gets one
        with stranger.stream("GET", f"{ctx.url}gradio_api/queue/data",
                             params={"session_hash": owner.session_hash}) as r:
            code, text = r.status_code, ""
            for part in r.iter_text():
                text += part
                if len(text) > 4000 or code == 200 and "process_completed" in text:
                    break
    try:
        status = str(job.result(timeout=HANG_S)[0])
    except Exception as e:  # noqa: BLE001
        status = f"the owner's batch failed: {e}"
    secs = time.perf_counter() - t
    problems = []
    if SENTINEL in text or code == 200:
        problems.append(f"the stranger read the stream (HTTP {code})")
    if "belongs to another session" not in text:
        problems.append(f"no sentence for the stranger (HTTP {code})")
    if "Done" not in status:
        problems.append(f"the owner's batch did not finish: {short(status, 80)}")
    return Result(name, "FAILED" if problems else "refused",
                  "; ".join(problems) or f"HTTP {code}: {short(text, 70)}; owner: {short(status, 40)}",
                  secs, full=text)


def budget_probes(ctx: Ctx, fast: bool) -> list[Result]:
    """Issue 29: a tiny Parquet list bomb, 200 MB request bodies, a foreign event stream, and
    (full run) a 45 MB upload of long decode-step arrays analysed alone and by two at once."""
    out = []
    bomb = os.path.join(ctx.tmp, "list-bomb.parquet")
    _list_bomb(bomb)
    c = ctx.client()
    out.append(watched(ctx, f"parquet list bomb: {os.path.getsize(bomb):,} bytes -> 1 GB (one"
                       " row, 1 M refs to a 1 KB string)", _dataset_file(c, bomb),
                       "text values"))
    out.append(body_probe(ctx, "/gradio_api/queue/join", chunked=False))
    out.append(body_probe(ctx, "/gradio_api/run/predict", chunked=True))
    out.append(foreign_stream_probe(ctx))
    if not fast:
        path = os.path.join(ctx.tmp, "long-45mb.jsonl")
        _long_steps_file(path)
        out.append(analysis_memory_probe(ctx, path, 1))
        out.append(analysis_memory_probe(ctx, path, 2))
        os.remove(path)
    return out


def session_probes(ctx: Ctx) -> list[Result]:
    """Clients whose session hashes collide or look alike ('x', 'x!', 'x..', empty) each get a
    session key the server minted: one's run is not another's (B, on A's very hash, is refused
    or reads nothing of A's)."""
    from gradio_client import Client
    out = []
    for i, (ha, hb) in enumerate((("x", "x"), ("x", "x!"), ("x", "x.."), ("", ""))):
        name = f"sessions: hashes {ha!r} and {hb!r} are isolated"
        a, b = Client(ctx.url, verbose=False), Client(ctx.url, verbose=False)
        # each pair on hashes of its own ("p1-x", "p1-x!"): a hash belongs to the first cookie
        # that used it (gate.StreamOwners), so a later pair's A reusing "x" would be refused
        ha, hb = (f"p{i}-{ha}" if ha else ha), (f"p{i}-{hb}" if hb else hb)
        a.session_hash, b.session_hash = ha, hb
        secret = f"{SENTINEL} prompt of session {ha!r}"
        t = time.perf_counter()
        if not ha:  # no session at all: refused before anything runs (in a sentence)
            r = httpx.post(f"{ctx.url}gradio_api/queue/join", timeout=30,
                           json={"data": [], "fn_index": 0, "session_hash": ""})
            ok = r.status_code == 400 and "names no session" in r.text
            out.append(Result(name, "refused" if ok else "FAILED", short(r.text),
                              time.perf_counter() - t, full=r.text))
            continue
        try:
            status, _, _, path = call(a, prompts=secret, max_new_tokens=2, warmup=0,
                                      api_name="/batch")[:4]
        except Exception as e:  # noqa: BLE001
            out.append(Result(name, "FAILED", f"A's batch failed: {short(str(e))}"))
            continue
        runs = glob.glob(os.path.join(ctx.session_root, "*", "*.jsonl"))
        mine = [p for p in runs if secret in open(p, errors="replace").read()]
        folders = {os.path.basename(os.path.dirname(p)) for p in mine}
        ca = a.cookies.get("c2c_session", "")
        cb = b.cookies.get("c2c_session", "")
        problems = []
        if not ca or not cb or ca == cb:
            problems.append("the two clients share a session cookie")
        if folders & {ha, hb, "anonymous", re.sub(r"[^A-Za-z0-9_-]", "", ha)}:
            problems.append(f"A's run lies in a folder named by its hash: {folders}")
        run_name = os.path.basename(mine[0]) if mine else "none.jsonl"
        for attempt in (run_name, f"../{next(iter(folders), 'x')}/{run_name}"):
            try:
                got = json.dumps(call(b, files=[], runs=[attempt], skip_bad_lines=False,
                                      api_name="/analyze"), default=str)
            except Exception as e:  # noqa: BLE001 - refused: fine unless it leaks
                got = str(e)
            if SENTINEL in got:
                problems.append(f"B read A's run via {attempt!r}")
        if problems:
            out.append(Result(name, "LEAK", "; ".join(problems), time.perf_counter() - t))
        else:
            out.append(Result(name, "ok", f"own cookies; A's run in {len(folders)} minted-key"
                              " folder; B refused", time.perf_counter() - t))
    return out


def html_probe(ctx: Ctx) -> Result:
    """A results file with tags in run.device/cpu/dtype, mode and id: every text the page gets
    as Markdown or a chart has them escaped (the browser test checks the rendering)."""
    name = "results file with <img> tags in its fields"
    tag = "<img src=http://127.0.0.1:9/x>"
    path = os.path.join(ctx.tmp, "tags.jsonl")
    with open(path, "w") as f:
        for i in range(3):
            for mode in (f"c2c{tag}", "t2t"):
                f.write(json.dumps({
                    "id": f"q{i}<b>x</b>", "mode": mode, "repeat": 0, "prompt": "p",
                    "response": "r", "correct": True,
                    "run": {"device": f"cuda{tag}", "cpu": tag, "dtype": f"bf16{tag}"},
                    "timing": {"ttft_ms": 10.0, "e2e_ms": 50.0, "decode_avg_ms": 1.0,
                               "num_generated_tokens": 3, "decode_total_ms": 2.0},
                    "decode_step_times_ms": [1.0, 1.0]}) + "\n")
    plain = os.path.join(ctx.tmp, "plain.jsonl")
    with open(plain, "w") as f:
        f.write(json.dumps({"id": 1, "mode": "c2c", "prompt": "p", "response": "r",
                            "run": {"device": "cpu"}, "timing": {"decode_avg_ms": 1.0}}) + "\n")
    t = time.perf_counter()
    try:
        out = _analyze(ctx.client(), [path, plain])
    except Exception as e:  # noqa: BLE001
        return Result(name, "FAILED", short(str(e)), time.perf_counter() - t)
    shown = []  # the Markdown lines and every string of every chart (tables draw as text)
    for o in out:
        if isinstance(o, str):
            shown.append(o)
        elif isinstance(o, dict) and o.get("type") == "plotly":
            shown += list(_strings(json.loads(o["plot"])))
    raw = [s for s in shown if "<img" in s or "<b>" in s]
    if raw:
        return Result(name, "LEAK", f"{len(raw)} output(s) carry a raw tag: {short(raw[0])}",
                      time.perf_counter() - t)
    return Result(name, "ok", "tags reach status, ratios and charts escaped",
                  time.perf_counter() - t)


def _strings(v):
    if isinstance(v, str):
        yield v
    elif isinstance(v, dict):
        for x in v.values():
            yield from _strings(x)
    elif isinstance(v, list):
        for x in v:
            yield from _strings(x)


def long_steps_probe(ctx: Ctx, max_secs: float = 120) -> Result:
    """A 15 MB results file with 1.5 M decode steps per record (170 s before; `report` 1 s).
    max_secs only catches that old path or a hang (6.5 s on an idle 2-core machine, several
    times that under load); tests/test_results_safety.py checks what the page gets."""
    path = os.path.join(ctx.tmp, "long-steps.jsonl")
    with open(path, "w") as f:
        for i in range(2):
            f.write(json.dumps({"id": i, "mode": "c2c", "prompt": "p", "response": "r",
                                "run": {"device": "cpu"},
                                "timing": {"ttft_ms": 5.0, "decode_avg_ms": 1.0},
                                "decode_step_times_ms": [1.0] * 1_500_000}) + "\n")
    name = f"results file of {os.path.getsize(path) / 2**20:.0f} MB, 1.5 M steps per record"
    t = time.perf_counter()
    try:
        status = str(_analyze(ctx.client(), [path])[0])
    except Exception as e:  # noqa: BLE001
        return Result(name, "FAILED", short(str(e)), time.perf_counter() - t)
    secs = time.perf_counter() - t
    ok = "2 record(s)" in status and secs < max_secs
    return Result(name, "ok" if ok else "FAILED", f"analysed in {secs:.1f} s", secs)


def direct_upload_quota_probe(ctx: Ctx) -> Result:
    """Files posted straight to /upload count toward the session's quota (200 MB)."""
    name = "direct uploads past the session quota (5 x 45 MB, one session)"
    t = time.perf_counter()
    with httpx.Client(timeout=120) as c:
        codes, text = [], ""
        for i in range(5):
            r = c.post(f"{ctx.url}gradio_api/upload",
                       files=[("files", (f"q{i}.jsonl", b"x" * (45 << 20), "text/plain"))])
            codes.append(r.status_code)
            text = r.text
            if r.status_code != 200:
                break
    secs = time.perf_counter() - t
    if codes[-1] == 413 and "C2C_SESSION_UPLOAD_MB" in text and codes.count(200) <= 4:
        return Result(name, "refused", f"stored {codes.count(200)} x 45 MB; then: {short(text)}",
                      secs, full=text)
    return Result(name, "NOT REFUSED", f"HTTP codes {codes}", secs)


# --- main ---------------------------------------------------------------------------------------

def start_app(tmp: str, port: int, log_path: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("C2C_ALLOW_LOCAL_PATHS", "SPACE_ID")}
    env.update(GRADIO_SERVER_PORT=str(port), GRADIO_SERVER_NAME="127.0.0.1", TMPDIR=tmp,
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False",
               PYTHONUNBUFFERED="1")
    with open(log_path, "w") as log:
        # its own process group (its worker process joins it): stop_app ends them together
        return subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)


def app_tree(app: subprocess.Popen | None) -> set[int]:
    """The app's pid and its descendants' (its worker), while they can still be found."""
    if app is None:
        return set()
    import psutil
    try:
        return {app.pid} | {k.pid for k in psutil.Process(app.pid).children(recursive=True)}
    except psutil.Error:
        return set()


def running(pids: set[int]) -> list[int]:
    """Those of pids that still run (a zombie, dead but not yet reaped, does not)."""
    import psutil
    out = []
    for pid in sorted(pids):
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.Error:
            pass
    return out


def stop_app(app: subprocess.Popen | None, grace: float = 20) -> None:
    """SIGTERM the app's process group (the app and its worker), SIGKILL what is left after
    `grace` seconds. Safe to call twice and after the app died on its own (its worker may
    not have)."""
    if app is None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(app.pid, sig)
        except (ProcessLookupError, PermissionError):
            break  # the group is gone: nothing left to stop
        try:
            app.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
        if sig == signal.SIGTERM:  # the app exited: its worker gets the same time to follow
            deadline = time.time() + grace
            while time.time() < deadline:
                try:
                    os.killpg(app.pid, 0)
                except (ProcessLookupError, PermissionError):
                    return
                time.sleep(0.1)
    try:
        app.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass


WATCHDOG = textwrap.dedent("""
    import os, shutil, signal, sys, time
    check, group, tmp = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # the check ended it: all is done
    while os.getppid() == check:  # reparented: the check died without cleaning up (kill -9)
        time.sleep(0.5)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(group, sig)
        except (ProcessLookupError, PermissionError):
            break
        for _ in range(100):
            try:
                os.killpg(group, 0)
            except (ProcessLookupError, PermissionError):
                break
            time.sleep(0.2)
    shutil.rmtree(tmp, ignore_errors=True)
""")


def start_watchdog(app: subprocess.Popen, tmp: str) -> subprocess.Popen:
    """A process that outlives this check only to clean up after it: if the check is killed
    where no handler runs (SIGKILL), it stops the app's process group (the app and its worker)
    and removes the temporary folder. It runs in a session of its own, so killing the check's
    group does not take it too; the check's own cleanup ends it."""
    return subprocess.Popen([sys.executable, "-c", WATCHDOG, str(os.getpid()), str(app.pid), tmp],
                            start_new_session=True, stdin=subprocess.DEVNULL)


def _exit_on_signal(signum, _frame):
    """SIGTERM / SIGHUP / SIGINT: unwind main() so its finally stops the app and removes the
    temporary folder (a second signal while that runs is ignored: cleanup must finish)."""
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    raise SystemExit(128 + signum)


def make_secrets(tmp: str) -> str:
    d = os.path.join(tmp, "secret-data")
    os.makedirs(d)
    with open(os.path.join(d, "prompts.jsonl"), "w") as f:
        f.write(json.dumps({"prompt": f"{SENTINEL} other user's prompt"}) + "\n")
    with open(os.path.join(d, "notes.txt"), "w") as f:
        f.write(f"{SENTINEL} private notes\n")
    with open(os.path.join(d, "model.gguf"), "wb") as f:
        f.write(b"GGUF" + SENTINEL.encode())
    return d


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fast", action="store_true", help="the CI subset")
    ap.add_argument("--only", choices=["uploads"], help="only the control run and this group"
                    " (uploads: bombs, gzip, sessions, tags, long files, upload quota)")
    ap.add_argument("--startup_timeout", type=float, default=180)
    args = ap.parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, _exit_on_signal)
    tmp = tempfile.mkdtemp(prefix="c2c-abuse-")
    app: subprocess.Popen | None = None
    watchdog: subprocess.Popen | None = None
    tree: set[int] = set()

    def cleanup():
        tree.update(app_tree(app))
        stop_app(app)
        shutil.rmtree(tmp, ignore_errors=True)
        if watchdog is not None and watchdog.poll() is None:
            watchdog.terminate()
            watchdog.wait(timeout=30)

    atexit.register(cleanup)  # also on an exception that escapes main
    try:
        app = start_app(tmp, (port := free_port()), os.path.join(tmp, "server.log"))
        watchdog = start_watchdog(app, tmp)
        return _run(args, tmp, port, app, tree)
    finally:
        cleanup()
        atexit.unregister(cleanup)


def _run(args, tmp: str, port: int, app: subprocess.Popen, tree: set[int]) -> int:
    log_path = os.path.join(tmp, "server.log")
    ctx = Ctx(f"http://127.0.0.1:{port}/", tmp, make_secrets(tmp),
              os.path.join(tmp, "c2c-workbench-sessions"), log_path)
    ctx.server_pid = app.pid
    results = ctx.results
    try:
        t0 = time.time()
        while not alive(ctx):
            if app.poll() is not None or time.time() - t0 > args.startup_timeout:
                print(open(log_path).read()[-3000:])
                print(json.dumps({"probes": 0, "app_alive": False, "error": "app did not start"}))
                return 1
            time.sleep(0.5)
        ctx.timeline = RssTimeline(app.pid)
        ctx.timeline.mark()

        def record(r: Result):
            time.sleep(0.3)  # what the answer freed counts as freed
            mark = ctx.timeline.mark()
            if r.rss_mb is None:  # since the probe before it ended (probes that watch
                r.rss_mb = mark  # their own memory say it more closely)
            results.append(r)
            tree.update(app_tree(app))  # the worker's pid too, while it is the app's child
            if not alive(ctx):
                results.append(Result(f"app alive after: {r.probe}", "FAILED", "app is down"))
            print(f"  {r.outcome:<12} {r.secs:6.2f}s  {r.probe}", flush=True)

        record(control_probe(ctx))  # loads the models (first job) and proves honest use works
        if args.only == "uploads":
            for r in upload_guard_probes(ctx, args.fast):
                record(r)
        for name, make, value in (name_probes(ctx) if not args.only else []):
            record(judge_path_probe(ctx, name, make, value))
        for name, fn, kw in (size_probes(ctx) if not args.only else []):
            record(judge_refusal(ctx, name, fn, **kw))
        for r in (upload_probes(ctx) if not args.only else []):
            record(r)
        for r in (upload_guard_probes(ctx, args.fast) if not args.only else []):
            record(r)
        if not args.only:
            record(models_kept_probe(ctx))
            record(disconnect_probe(ctx, "batch"))
            if not args.fast:
                record(disconnect_probe(ctx, "profile", run_for=6.0))
                record(disconnect_probe(ctx, "batch", run_for=1.0))
            record(parallel_probe(ctx, 3 if args.fast else 8))
            # the fair queue and the worker under device-name churn
            record(device_churn_probe(ctx, app))
            record(stop_queued_probe(ctx))
            record(absent_clients_probe(ctx, 10 if args.fast else 70))
        record(control_probe(ctx))
        is_alive = alive(ctx) and app.poll() is None
    finally:
        tree.update(app_tree(app))
        stop_app(app)
    left = running(tree)  # the app and its worker must be gone now
    server_log = open(log_path, errors="replace").read()
    server_tb = server_log.count("Traceback (most recent call last)")
    ends: dict[str, int] = {}  # each server traceback's exception line (the last unindented one)
    for block in server_log.split("Traceback (most recent call last)")[1:]:
        lines = [ln for ln in block.splitlines()[1:] if ln.strip()]
        last = next((ln for ln in lines if not ln.startswith((" ", "\t"))), "?")
        ends[last[:160]] = ends.get(last[:160], 0) + 1
    width = max(len(r.probe) for r in results)
    print()
    print("Server RSS (the app process and its worker together), MB: before the probe, its peak,"
          " and after its answer; then the answer's first words.")
    print(f"{'probe':<{width}}  {'outcome':<11}  {'secs':>6}  {'before':>6}  {'peak':>6}"
          f"  {'after':>6}  answer / detail")
    for r in results:
        b, p, a = r.rss_mb or (0.0, 0.0, 0.0)
        print(f"{r.probe:<{width}}  {r.outcome:<11}  {r.secs:6.2f}  {b:6.0f}  {p:6.0f}  {a:6.0f}"
              f"  {first_words(r)}")
    counts = {
        "probes": len(results),
        "refused_cleanly": sum(r.outcome == "refused" for r in results),
        "ok": sum(r.outcome == "ok" for r in results),
        "leaks": sum(r.outcome == "LEAK" for r in results),
        "tracebacks": sum(r.outcome == "TRACEBACK" for r in results),
        "not_refused": sum(r.outcome == "NOT REFUSED" for r in results),
        "failed": sum(r.outcome == "FAILED" for r in results),
        "app_alive": is_alive,
        "crashes": sum(r.probe.startswith("app alive after") for r in results) + (not is_alive),
        "bare_refusals": sum(r.outcome == "refused" and bool(BARE.search(r.full or r.detail))
                             for r in results),
        "server_growth_mb_max": max(ctx.growth_mb.values(), default=0.0),
        "server_log_tracebacks": server_tb,
        "app_pids": sorted(tree),
        "left_running": left,
        "fast": args.fast,
    }
    for line, n in ends.items():
        print(f"server log traceback x{n}: {line}")
    print(json.dumps(counts))
    bad = counts["leaks"] or counts["tracebacks"] or counts["not_refused"] or counts["failed"] \
        or counts["bare_refusals"] or counts["server_growth_mb_max"] >= 500 or left
    return 0 if is_alive and not bad else 1


if __name__ == "__main__":
    sys.exit(main())
