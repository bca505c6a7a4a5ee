"""`python -m c2c_core load`: an open-loop load sweep against an OpenAI-compatible endpoint.

Each point is one mode (the model name sent) at one offered rate (Poisson, or gamma gaps of
`--burstiness`) or one concurrency (closed loop); points run one after another, the modes
interleaved per rate so that the machine's noise hits them alike. Every finished request is one
JSON line (`kind: "load_request"`), appended and flushed at once; the points' statistics
(report.load) go to `<output>.summary.json` and, with --html, to one self-contained page.
Without --url the command starts our own server (`serve`'s scheduler and HTTP server) with the
model flags, and closes it at the end. docs/load.md says what every number means.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import json
import os
import platform
import re
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..io.records import JsonlWriter, read_records
from .load_client import arrival_gaps, send_times, stream_request  # noqa: F401 (the API)
from ..measure.progress import fmt_seconds
from ..report import load as L
from ..spec.errors import UserError

DEFAULT_OUTPUT = "load.jsonl"
DEFAULT_NUM_REQUESTS = 20
#: --find_max_goodput: bisection steps between the last sustained and first unsustained rate.
FIND_STEPS = 3
#: During a point, a progress line at most this often (seconds).
PROGRESS_EVERY_S = 5.0


@dataclass(frozen=True)
class Point:
    index: int
    mode: str
    rate: float | None = None
    concurrency: int | None = None

    def label(self) -> str:
        how = (f"{self.rate:g} req/s" if self.rate is not None
               else f"concurrency {self.concurrency}")
        return f"{self.mode} at {how}"


# --- a run ----------------------------------------------------------------------------------

def _parse_list(text: str, flag: str, cast: Callable, positive: bool = True) -> list:
    out = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            v = cast(part)
        except ValueError:
            raise UserError(f"{flag} {text!r}: {part!r} is not a number.") from None
        if positive and not v > 0:
            raise UserError(f"{flag} {text!r}: each value must be above 0.")
        out.append(v)
    if not out:
        raise UserError(f"{flag} is empty; give e.g. {flag} 1,2.")
    return out


def base_url(url: str) -> str:
    """http://host:port[/v1][/] -> http://host:port (the paths are added here)."""
    url = url.rstrip("/")
    return url[:-3] if url.endswith("/v1") else url


class LoadRun:
    """One `load` run: its points in order, the records writer, the finished points' stats."""

    def __init__(self, args: Any, url: str, prompts: list[str], slo: dict, say=None):
        self.args = args
        self.url = base_url(url)
        self.prompts = prompts
        self.slo = slo
        self.say = say or (lambda line: print(line, file=sys.stderr, flush=True))
        self.points: list[dict] = []        # finished points' statistics, in run order
        self.stopped: dict[str, str] = {}   # mode -> why its rates stopped rising
        self.max_goodput: dict[str, dict] = {}
        self.run_id = uuid.uuid4().hex[:12]
        self.started_at = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        self.t0 = time.perf_counter()
        self.server_models: list[str] | None = None
        self.writer: JsonlWriter | None = None
        self.interrupted = False

    # progress
    def _line(self, text: str) -> None:
        self.say(f"[{fmt_seconds(time.perf_counter() - self.t0)}] {text}")

    def _record_base(self, p: Point) -> dict:
        a = self.args
        return {"kind": L.KIND, "run_id": self.run_id, "point": p.index, "mode": p.mode,
                "rate": p.rate, "concurrency": p.concurrency, "burstiness": a.burstiness,
                "max_tokens": a.max_tokens, "slo": self.slo, "max_error_rate": a.max_error_rate,
                "url": self.url}

    async def _point(self, client, p: Point, k: int, n: int, what: str = "Load point") -> dict:
        """Run one point; `what` {k} of {n} names it in the progress lines. The arrival times
        are seeded by --seed and the rate alone: every mode at a rate gets the same ones."""
        a = self.args
        rng = np.random.default_rng([a.seed, int(round((p.rate or 0) * 1000))])
        endpoint = f"{self.url}/v1/completions"
        base = self._record_base(p)
        recs: list[dict] = []
        start = time.perf_counter()
        last_line = [start]
        self._line(f"{what} {k} of {n}: {p.label()}…")

        async def one(i: int) -> None:
            prompt = self.prompts[i % len(self.prompts)]
            rec = await stream_request(client, endpoint, p.mode, prompt, a.max_tokens,
                                       a.timeout, self.t0)
            rec = {**base, "request": i, "prompt_index": i % len(self.prompts), **rec}
            self.writer.write(rec)
            recs.append(rec)
            now = time.perf_counter()
            if now - last_line[0] >= PROGRESS_EVERY_S:
                last_line[0] = now
                self._line(f"{what} {k} of {n}: {p.label()}: {len(recs)} request(s) done,"
                           f" {fmt_seconds(now - start)} into the point")

        if p.rate is not None:
            times = send_times(p.rate, a.burstiness, rng, a.num_requests, a.duration)
            tasks = []
            for i, at in enumerate(times):
                delay = start + at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(i)))
            await asyncio.gather(*tasks)
        else:
            counter = iter(range(10**9))
            stop_at = None if a.duration is None else start + a.duration

            async def worker() -> None:
                while True:
                    if stop_at is not None and time.perf_counter() >= stop_at:
                        return
                    i = next(counter)
                    if a.num_requests is not None and i >= a.num_requests:
                        return
                    await one(i)
            await asyncio.gather(*(worker() for _ in range(p.concurrency)))
        st = L.point_stats(recs, self.slo, a.max_error_rate)
        self.points.append(st)
        ttft = (st.get("ttft_ms") or {}).get("p50")
        self._line(f"{what} {k} of {n}: {p.label()} done: {st['requests']} request(s),"
                   f" {st['errors']} error(s), {st['achieved_rps']:.3g} req/s achieved, TTFT p50"
                   f" {'-' if ttft is None else f'{ttft:.0f} ms'}")
        return st

    async def _models(self, client) -> None:
        try:
            r = await client.get(f"{self.url}/v1/models", timeout=10)
            if r.status_code == 200:
                self.server_models = [m.get("id") for m in r.json().get("data", [])
                                      if isinstance(m, dict)]
        except Exception as e:  # an OpenAI server without /v1/models, or none: said, then on
            self._line(f"Could not list the server's models ({type(e).__name__}); sending the"
                       " modes as model names as given")
            return
        if self.server_models is not None:
            missing = [m for m in self.args.modes if m not in self.server_models]
            if missing:
                raise UserError(f"{self.url} serves the models {', '.join(self.server_models)};"
                                f" not {', '.join(missing)}. Pick --modes among them.")

    async def run(self) -> None:
        import httpx
        a = self.args
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
        async with httpx.AsyncClient(timeout=httpx.Timeout(a.timeout), limits=limits) as client:
            await self._models(client)
            if a.concurrency:
                plan = [(None, c) for c in a.concurrency]
            else:
                plan = [(r, None) for r in a.rates]
            n = len(plan) * len(a.modes)
            k = 0
            for rate, conc in plan:  # the modes interleaved per rate
                for mode in a.modes:
                    k += 1
                    if mode in self.stopped:
                        continue
                    st = await self._point(client, Point(len(self.points), mode, rate, conc), k, n)
                    if st["overloaded"]:
                        what = f"{rate:g} req/s" if rate is not None else f"concurrency {conc}"
                        self.stopped[mode] = f"overloaded at {what}: {st['overload_reason']}"
                        later = ("; its higher rates are skipped" if (rate, conc) != plan[-1]
                                 else "")
                        print(f"{mode} is overloaded at {what} ({st['overload_reason']}){later}.",
                              file=sys.stderr)
            if a.find_max_goodput and a.concurrency:
                print("--find_max_goodput searches rates; with --concurrency it is skipped.",
                      file=sys.stderr)
            elif a.find_max_goodput:
                await self._find_max(client)

    async def _find_max(self, client) -> None:
        """Per mode: bisect between the highest sustained rate (report.load.sustains) and the
        lowest unsustained one above it, FIND_STEPS points, then say the highest sustained."""
        for mode in self.args.modes:
            mine = [st for st in self.points if st["mode"] == mode and st.get("rate")]
            good = [st["rate"] for st in mine if L.sustains(st)]
            lo = max(good) if good else None
            bad = [st["rate"] for st in mine if not L.sustains(st) and (lo is None or st["rate"] > lo)]
            hi = min(bad) if bad else None
            steps = []
            if hi is not None:
                floor = lo if lo is not None else 0.0
                for step in range(FIND_STEPS):
                    mid = round((floor + hi) / 2, 4)
                    if mid <= 0:
                        break
                    st = await self._point(client, Point(len(self.points), mode, mid), step + 1,
                                           FIND_STEPS, what=f"Max-goodput search ({mode})")
                    steps.append(mid)
                    if L.sustains(st):
                        floor = lo = mid
                    else:
                        hi = mid
            self.max_goodput[mode] = {"sustained_rps": lo, "unsustained_rps": hi,
                                      "bisected": steps}
            if lo is None:
                line = (f"{mode} sustains none of the rates tried (lowest unsustained"
                        f" {hi:g} req/s).")
            elif hi is None:
                line = (f"{mode} sustains every rate tried, the highest {lo:g} req/s (its"
                        " limit is above: try higher --rates).")
            else:
                line = (f"{mode} sustains {lo:g} req/s (goodput >= {L.SUSTAIN_SHARE:.0%} of the"
                        f" offered rate, not overloaded); {hi:g} req/s it does not.")
            print(line)

    # --- outputs ----------------------------------------------------------------------------

    def summary(self) -> dict:
        from .reporting import requested
        import httpx
        import c2c_core
        return {
            "kind": "load_summary", "summary_version": 1, "run_id": self.run_id,
            "started_at": self.started_at,
            "written_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "interrupted": self.interrupted,
            "settings": {"requested": requested(self.args), "url": self.url, "slo": self.slo,
                         "prompts": len(self.prompts)},
            "environment": {"tool_version": c2c_core.__version__,
                            "python": platform.python_version(), "httpx": httpx.__version__,
                            "host": {"platform": platform.platform(),
                                     "machine": platform.machine(),
                                     "cpu_count": os.cpu_count()},
                            "server_models": self.server_models},
            "points": self.points, "stopped": self.stopped, "max_goodput": self.max_goodput,
        }


def _prompts(args) -> list[str]:
    from ..io.prompts import cli_file_caps, resolve_prompts
    if args.prompts_file and args.dataset:
        raise UserError("Give one prompt source, not --prompts_file and --dataset.")
    items = resolve_prompts(dataset=args.dataset, dataset_config=args.dataset_config,
                            split=args.split, dataset_file=args.prompts_file, field=args.field,
                            num_samples=args.num_samples,
                            caps=cli_file_caps() if args.prompts_file else None)
    return [it.prompt for it in items]


def _check_args(args) -> None:
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.modes:
        raise UserError("--modes is empty; give e.g. --modes c2c,t2t,receiver.")
    if args.concurrency:
        args.concurrency = [int(c) for c in _parse_list(args.concurrency, "--concurrency", float)]
        args.rates = None
    else:
        args.rates = _parse_list(args.rates, "--rates", float)
    if args.duration is not None and args.num_requests is not None:
        raise UserError("Give --duration or --num_requests, not both.")
    if args.duration is None and args.num_requests is None:
        args.num_requests = DEFAULT_NUM_REQUESTS
    for flag in ("duration", "num_requests", "timeout", "burstiness", "max_tokens"):
        v = getattr(args, flag)
        if v is not None and not v > 0:
            raise UserError(f"--{flag} is {v}; it must be above 0.")
    if not 0 <= args.max_error_rate <= 1:
        raise UserError(f"--max_error_rate is {args.max_error_rate}; give a share from 0 to 1.")


def _write_outputs(run: LoadRun, args) -> None:
    from ..report.runreport import summary_path, write_json
    if not run.points:
        print("No point finished; no summary written.", file=sys.stderr)
        return
    path = write_json(summary_path(args.output), run.summary())
    print(f"Wrote {path} (settings, environment, statistics per point)")
    if args.html:
        from ..report.load_plots import write_load_html
        write_load_html(args.html, run.summary())
        print(f"Wrote {args.html}")


def _own_server(args, make_config):
    """Our `serve` in this process (its scheduler with the model flags' models, its HTTP server
    on a free port): (url, close)."""
    from ..bench.serving import load_scheduler
    from .serve import start_server
    cfg = make_config()
    print("No --url: starting our own server with the model flags' models…", file=sys.stderr)
    sched = load_scheduler(cfg, args.slots, args.max_queue, args.max_prompt_tokens)
    try:
        handle = start_server(sched, host="127.0.0.1", port=0)
    except BaseException:
        sched.close()
        raise

    def close() -> None:
        try:
            handle.close()
        finally:
            sched.close()
    return handle.url, close


def run_load(args, make_config: Callable[[], Any] | None = None) -> int:
    """The `load` command (its flags: cli.build_parser). `make_config`: the model flags' run
    config, for the own server (no --url)."""
    from ..io.fileio import check_writable
    _check_args(args)
    slo = L.parse_slo(args.slo)
    prompts = _prompts(args)
    check_writable(args.output)
    if args.html:
        check_writable(args.html, "--html")
    close = None
    url = args.url
    if not url:
        if make_config is None:
            raise UserError("load needs --url, or the model flags to start its own server.")
        url, close = _own_server(args, make_config)
    run = LoadRun(args, url, prompts, slo)
    try:
        with JsonlWriter(args.output, append=args.append) as writer:
            run.writer = writer
            try:
                asyncio.run(run.run())
            except KeyboardInterrupt:
                run.interrupted = True
                raise
            finally:
                _write_outputs(run, args)
    finally:
        if close is not None:
            close()
    print(L.format_table(run.points))
    print(f"Wrote {sum(p['requests'] for p in run.points)} request record(s) to {args.output}")
    return 0


def add_args(p) -> None:
    """The `load` flags beyond the model flags (cli.add_model_args)."""
    g = p.add_argument_group("load")
    g.add_argument("--url", help="an OpenAI-compatible server (http://host:port); without it our"
                   " own server starts with the model flags and closes at the end")
    g.add_argument("--modes", default="c2c,t2t,receiver",
                   help="model names to send, one sweep each, interleaved per rate")
    g.add_argument("--rates", default="0.5,1,2", help="offered requests/s, e.g. 0.5,1,2")
    g.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape of the gaps between arrivals: 1 Poisson, <1 burstier")
    g.add_argument("--concurrency", help="instead of --rates: closed loop with N requests in"
                   " flight (a list sweeps, e.g. 1,4)")
    g.add_argument("--duration", type=float, help="seconds of arrivals per point")
    g.add_argument("--num_requests", type=int,
                   help=f"requests per point (default {DEFAULT_NUM_REQUESTS} when no --duration)")
    g.add_argument("--max_tokens", type=int, default=64, help="max_tokens of every request")
    g.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    g.add_argument("--slo", help="goodput bounds, e.g. ttft_ms=500,tpot_ms=50,e2e_ms=5000")
    g.add_argument("--max_error_rate", type=float, default=L.DEFAULT_MAX_ERROR_RATE,
                   help="a point whose errors (429s, failures) exceed this share is overloaded")
    g.add_argument("--find_max_goodput", action="store_true",
                   help=f"after the rates, bisect ({FIND_STEPS} points) each mode's highest"
                        " sustained rate")
    s = p.add_argument_group("prompts")
    s.add_argument("--prompts_file", help="prompts from a .jsonl/.csv/.parquet file (default:"
                   " the built-in five)")
    s.add_argument("--dataset", help="a Hugging Face dataset, as the dataset command")
    s.add_argument("--dataset_config")
    s.add_argument("--split", default="test")
    s.add_argument("--field", help="text field of --prompts_file / --dataset")
    s.add_argument("--num_samples", type=int, help="first N prompts of the source")
    v = p.add_argument_group("own server (no --url)")
    v.add_argument("--slots", type=int, default=1, help="requests served at once")
    v.add_argument("--max_queue", type=int, default=64, help="queued requests before a 429")
    v.add_argument("--max_prompt_tokens", type=int, default=2048)
    o = p.add_argument_group("output")
    o.add_argument("--output", default=DEFAULT_OUTPUT, help="JSONL, one line per request")
    o.add_argument("--append", action="store_true", help="append to --output")
    o.add_argument("--html", help="also write the self-contained HTML report here")


# --- report / compare of load files -----------------------------------------------------------

#: A load record's first key, as JsonlWriter writes it (the sniff reads no JSON: a hostile first
#: line, deeply nested or huge, is left to the records' reader and its limits).
_LOAD_KIND = re.compile(rb'^\s*\{\s*"kind"\s*:\s*"' + L.KIND.encode() + rb'"')
_SNIFF_BYTES = 4096


def _starts_as_load(path: str) -> bool:
    """Does the file's first non-blank line open a load record? (its first 4 KiB only)"""
    try:
        with open(path, "rb") as f:
            head = f.read(_SNIFF_BYTES)
    except OSError:
        return False  # the reader says what is wrong with the file
    return bool(_LOAD_KIND.match(head.lstrip(b"\xef\xbb\xbf\r\n\t ")))


def load_files(paths: list[str]) -> bool:
    """True when every file is a load run (its first record `kind: "load_request"`); a mix of
    load runs and timing records is refused."""
    kinds = [_starts_as_load(p) for p in paths]
    if any(kinds) and not all(kinds):
        load = [p for p, k in zip(paths, kinds) if k]
        raise UserError(f"{', '.join(load)} hold(s) load runs and the other files timing records;"
                        " report or compare load runs only with load runs.")
    return bool(kinds) and all(kinds)


def _points_of(path: str, skip_bad_lines: bool, budget=None) -> list[dict]:
    recs = read_records(path, skip_bad_lines=skip_bad_lines, budget=budget)
    loads = [r for r in recs if L.is_load_record(r)]
    if len(loads) != len(recs):
        print(f"Note: {path}: {len(recs) - len(loads)} record(s) that are not load requests are"
              " left out.", file=sys.stderr)
    if not loads:
        raise UserError(f"{path} holds no load records.")
    return L.points_from_records(loads)


def report_load(args, budget=None) -> int:
    """`report` of load runs: the per-point table of each file, and a last line of JSON.
    `budget`: the decoded-size budget of the files read (cli.results_budget)."""
    out = {}
    for path in args.files:
        points = _points_of(path, args.skip_bad_lines, budget)
        print(f"{path}:")
        print(L.format_table(points))
        out[os.path.basename(path)] = points
    if getattr(args, "html", None):
        from ..report.load_plots import write_load_html
        name, points = next(iter(out.items()))
        write_load_html(args.html, {"source": name, "points": points, "settings": {},
                                    "environment": {}, "stopped": {}, "max_goodput": {}})
        print(f"Wrote {args.html}")
    print(json.dumps({"kind": "load", "points": out}, default=str, allow_nan=False))
    return 0


def compare_load(args, budget=None) -> int:
    """`compare` of two load runs: per matched point (mode and rate or concurrency) and metric,
    A, B, B - A and B / A; no regression verdict (points are not paired request by request)."""
    a = _points_of(args.a, args.skip_bad_lines, budget)
    b = _points_of(args.b, args.skip_bad_lines, budget)
    if args.mode:
        a = [p for p in a if p["mode"] == args.mode]
        b = [p for p in b if p["mode"] == args.mode]
    rows = L.compare_points(a, b)
    if not rows:
        raise UserError(f"{args.a} and {args.b} share no point (same mode and rate or"
                        " concurrency) to compare; run both with the same --modes and --rates.")
    import pandas as pd
    print(pd.DataFrame(rows).to_string(index=False))
    print(json.dumps({"status": "ok", "exit": 0, "kind": "load",
                      "reason": "load runs: per-point differences, no regression verdict",
                      "rows": rows}, default=str))
    return 0
