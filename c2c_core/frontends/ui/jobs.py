"""Running a job from the page: the background Job that maps run_many's progress onto
gr.Progress (phases, ETA, Stop), the worker-process hand-off, the model queue, and
stream_records, which streams a run's records into a tab as they are written.
"""

from __future__ import annotations

import collections
import os
import queue
import re
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import gradio as gr

from ...measure import cancel
from ...measure.progress import Eta, Shape, fmt_seconds, shape_key
from ...spec.config import ALL_MODES, RunConfig
from ...spec.errors import UserError
from .. import worker
from . import guard
from .runcfg import MODELS, swap_note
from .sessions import clear_stop, page_gone, stop_flag
from .texts import md_text, status_md, ui_message, user_error


#: Largest upload accepted (gradio checks it before our code sees the file).
MAX_UPLOAD = "50mb"
#: Every model job shares one queue slot: one generation at a time on the device.
MODEL_QUEUE = "model"
#: From this many new tokens on, progress also moves per token (a forward hook counts them).
LONG_GENERATION = 128
#: Minimum seconds between table refreshes while a run streams records. The results file is
#: handed to the page once, at the end (each hand-over copies it into gradio's cache).
TABLE_EVERY_S = 0.5
#: The live results table shows this many of the newest records (the file holds them all).
LIVE_ROWS = 200
#: A running job says something to gradio at least this often, so that a client that went away
#: is noticed (gradio checks after each update) and its generation stopped within a step.
ALIVE_EVERY_S = 1.0
#: Seconds between checks of the session's disk quota while a run writes records.
DISK_EVERY_S = 5.0


def in_worker(job: "Job", kind: str, cfg: RunConfig, **payload) -> Any:
    """Run one job in cfg's worker process on behalf of `job` (its progress, phase, token
    count and stop flag), returning the worker's result once the worker has ended it."""
    def on_message(msg: tuple) -> None:
        if msg[0] == "progress":
            job.on_progress(*msg[2:])
        elif msg[0] == "phase":
            job.set_phase(msg[2])

    def on_start(w: worker.WorkerClient) -> None:
        job.tokens = worker.SharedCount(w.tokens)

    return worker.worker_for(cfg).call(kind, {"cfg": cfg, **payload},
                                       fixed=(MODELS.fixed_key, MODELS.fixed_label),
                                       should_stop=job.stop.is_set, on_message=on_message,
                                       on_start=on_start)


# --- background job with progress ---------------------------------------------------------

@contextmanager
def token_counter(pipe, enabled: bool) -> Iterator[list[int]]:
    """Counts top-level forwards of the receiver and sharer (= tokens produced) for per-token
    progress of long generations. Prefill sections call the decoder body, so they do not count.
    The hook costs about a microsecond per token; it is only installed for long generations."""
    counter = [0]
    handles = []
    if enabled:
        def hook(*_):
            counter[0] += 1
        for m in {id(m): m for m in (pipe.receiver, *(sl.model for sl in pipe.sharers))}.values():
            handles.append(m.register_forward_hook(hook))
    try:
        yield counter
    finally:
        for h in handles:
            h.remove()


#: One model job at a time, for real: gradio's queue slot frees when a client goes away, but
#: the next job's worker waits here until the previous generation has actually ended.
RUN_LOCK = threading.Lock()
#: (start, end) perf_counter seconds of the last model jobs, held RUN_LOCK to release (tests
#: and the abuse check read it to prove that no two jobs overlapped).
JOB_LOG: "collections.deque[tuple[float, float]]" = collections.deque(maxlen=256)


_MODEL_THREAD: list = []
_MODEL_THREAD_LOCK = threading.Lock()


def model_thread():
    """The app's one model thread (a single-thread executor, made on first use and kept for
    the process): every job's `work` runs on it, one at a time (RUN_LOCK), so state that
    torch keeps per thread (torch.compile's CUDA-graph trees) is made once, not again inside
    the first timed spans of each job. A forked child (ZeroGPU runs each call in one) makes its
    own: the parent's thread does not exist there."""
    with _MODEL_THREAD_LOCK:
        if not _MODEL_THREAD or _MODEL_THREAD[0][0] != os.getpid():
            import concurrent.futures
            _MODEL_THREAD[:] = [(os.getpid(), concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="c2c-model"))]
        return _MODEL_THREAD[0][1]


class Job:
    """Runs `work(job)` in a thread so a callback can keep yielding (records as they
    arrive, progress ticks) while the model works. With the worker process (the default),
    `work` hands the job to it (`in_worker`) and relays what it sends; the thread then only
    waits, and the job ends when the worker has ended it. The job's thread takes RUN_LOCK
    (and notices a Stop while it waits); `work` itself runs on the app's one model thread
    (model_thread()). `work` passes `job.on_progress` and
    `job.stop.is_set` to `run_many`, and may point `job.tokens` at a token counter. The work
    runs under RUN_LOCK and a cancel scope: setting `job.stop` ends it within one decode
    step."""

    _END = object()

    def __init__(self, work: Callable[["Job"], Any], stop: threading.Event | None = None,
                 warmup: int = 0):
        self.work = work
        self.stop = stop or threading.Event()
        self.warmup = warmup
        self.q: queue.Queue = queue.Queue()
        self.done, self.total = 0, 0
        self.phase = "loading models"
        self.result: Any = None
        self.error: BaseException | None = None
        self.started = time.perf_counter()
        self.created = time.perf_counter()  # the elapsed time counts from here
        #: the run's modes in their interleaved order (the ETA adds each mode's own rate)
        self.modes: list[str] = []
        #: the run's shapes in run order (a sweep's), for an ETA by size; None: one shape
        self.plan: list[Shape] | None = None
        self.estimate: Eta | None = None
        self.tokens = [0]
        self.cancelled = False
        self.cancel_note = ""  # what a stop also did ("the model worker was restarted, …")
        self.ended: float | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="c2c-job")

    def on_progress(self, done: int, total: int, rec: dict | None) -> None:
        self.done, self.total = done, total
        self.tokens[0] = 0
        if rec is None:  # run_many starts: the models are loaded
            self.phase = "warming up" if self.warmup else "running"
            self.started = time.perf_counter()
            if self.estimate is None:  # a sweep's shapes report their start once, not per shape
                self.estimate = Eta(self.modes, self.plan, clock=lambda: time.perf_counter())
                self.estimate.start(total)
        else:
            self.phase = "running"
            if self.estimate is not None:
                b = rec.get("batch_size") if isinstance(rec, dict) else None
                self.estimate.record(rec.get("mode") if isinstance(rec, dict) else None,
                                     shape_key(rec) if self.plan else None, b or 1)
            self.q.put(rec)

    def set_phase(self, phase: str) -> None:
        """What the job does now, as the run says it (cancel.say): "timed run" is the records'
        phase ("running"), anything else ("loading the receiver …", "compiling … shape 2 of
        4", "profiled run for the trace") is shown as it is, without server paths."""
        timed = phase == "timed run" or phase.endswith(": timed run")  # a sweep shape's too
        self.phase = "running" if timed else guard.scrub_paths(phase)

    def _run(self) -> None:
        try:
            if not RUN_LOCK.acquire(blocking=False):
                self.phase = "waiting"
                while not RUN_LOCK.acquire(timeout=0.1):
                    if self.stop.is_set():
                        raise cancel.Cancelled()
            t0 = time.perf_counter()
            self.phase = "loading models"
            try:
                self.result = model_thread().submit(self._work).result()
            finally:
                JOB_LOG.append((t0, time.perf_counter()))
                RUN_LOCK.release()
        except cancel.Cancelled as e:
            self.cancelled = True
            self.cancel_note = str(e)
        except BaseException as e:  # noqa: BLE001 - handed to the callback's thread
            self.error = e
        finally:
            self.ended = time.perf_counter()
            self.q.put(self._END)

    def _work(self) -> Any:
        """`work` on the model thread, with this job's Stop and progress line (both
        thread-local, so set there)."""
        from ...bench.runner import FRONTEND
        FRONTEND.set("app")  # this thread's records (the in-process path) say so
        with cancel.scope(self.stop.is_set), cancel.reporting(self.set_phase):
            return self.work(self)

    def events(self, tick: float = 0.25) -> Iterator[list[dict]]:
        """Yields lists of new records (empty lists as ticks); re-raises the worker's error."""
        self._thread.start()
        while True:
            try:
                item = self.q.get(timeout=tick)
            except queue.Empty:
                yield []
                continue
            batch = []
            while item is not self._END:
                batch.append(item)
                try:
                    item = self.q.get_nowait()
                except queue.Empty:
                    break
            if batch:
                yield batch
            if item is self._END:
                break
        self._thread.join()
        if self.error is not None:
            raise self.error

    def fraction(self, per_item_tokens: int | None) -> float | None:
        """Share done (None while loading or warming up: gradio shows a spinner and a clock)."""
        if not self.total or self.phase != "running":
            return None
        part = min(self.tokens[0] / per_item_tokens, 0.99) if per_item_tokens else 0.0
        return min((self.done + part) / self.total, 1.0)

    def describe(self, unit: str = "generation", clock: bool = True) -> str:
        """The phase, and while records come the generation, shape and ETA; with `clock`, the
        time since the job was created (the page's status line holds the one clock; the
        progress box's words, for API clients, go without it)."""
        took = f" · {fmt_seconds(time.perf_counter() - self.created)} elapsed" if clock else ""
        if self.phase == "waiting":
            return "Waiting for the previous job to end…" + took
        if self.phase == "loading models":
            return "Loading models…" + took
        if self.phase == "warming up":
            return "Warm-up (not recorded)…" + took
        if self.phase != "running":  # a phase the run said (compiling a shape, the trace…)
            return self.phase[:1].upper() + self.phase[1:] + "…" + took
        text = f"{unit} {min(self.done + 1, self.total)} of {self.total}"
        if self.tokens[0]:
            text += f", token {self.tokens[0]}"
        at = self.estimate.shape_at() if self.estimate is not None else None
        if at is not None:
            text += f" · shape {at[0]} of {len(self.plan or [])}" + (
                f" ({at[1].label})" if at[1].label else "")
        eta = self.eta()
        if eta is not None:
            text += f" · ETA {fmt_seconds(eta)}"
        return text + took

    def eta(self, now: float | None = None) -> float | None:
        """Seconds left (measure.progress.Eta): per mode and per shape, its own seconds per
        record x its records still to come, a shape not timed yet scaled from one that was by
        its size; None until every mode has a timed record."""
        if self.estimate is None or self.done >= self.total:
            return None
        return self.estimate.left(now)


#: How the phases said while models load begin (models.loading's cancel.say).
LOADING_PHASES = ("loading the", "assembling the", "converting the", "reading the tokenizer")


#: Leads a running job's status line: the page's CSS hides gradio's own timer beside a line
#: that holds it (gradio's restarts at every update; the line's clock counts from the start).
LIVE = '<span class="c2c-live"></span>'


def live_line(job: Job, unit: str = "generation") -> str:
    """'Compiling the receiver step for shape 2 of 4 (…)… · 12 s elapsed', as Markdown."""
    text = job.describe(unit)
    return LIVE + md_text(text[:1].upper() + text[1:])


def after(status: Any, head: str) -> str:
    """What a rendered status line says after its live line (kept while the clock ticks)."""
    return status[len(head):] if isinstance(status, str) and status.startswith(head) else ""


def stopped_during(phase: str) -> str:
    """' during …' for a stop that ended a run outside its timed generations."""
    if phase.startswith("sweep shape") and ": " in phase:  # "sweep shape 2 of 6 (…): warming up"
        shape, phase = phase.split(": ", 1)
        return stopped_during(phase) + f" of {shape}" if stopped_during(phase) else ""
    if phase.startswith(("compiling", "preparing")):
        m = re.search(r"shape \d+ of \d+", phase)
        return " during the fast engine's compile" + (f" (at {m.group(0)})" if m else "")
    if phase == "loading models" or phase.startswith(LOADING_PHASES):
        return " while the models loaded"
    if phase == "warming up":
        return " during the warm-up"
    return ""


def stop_note(job: "Job") -> str:
    """' The model worker was restarted, …' when stopping the job also replaced the worker."""
    note = job.cancel_note.strip()
    return f" {note[:1].upper()}{note[1:].rstrip('.')}." if note else ""


def prepare_note(run: dict | None) -> str:
    """What the job paid for preparation before its first record, from that record's `run`
    (run.prepared_shapes, run.compile_s, run.fresh_process); '' on the eager engine and for
    records without the fields."""
    if not isinstance(run, dict) or run.get("engine") == "eager" \
            or run.get("prepared_shapes") is None:
        return ""
    fresh = " in a fresh process" if run.get("fresh_process") else ""
    n = run["prepared_shapes"]
    if not n:
        return f"Preparation: none{fresh}, every shape was ready (`run.prepared_shapes` 0)."
    return (f"Preparation{fresh}: {n} shape(s) in {fmt_seconds(float(run.get('compile_s') or 0))}"
            " before the first record (`run.prepared_shapes`, `run.compile_s`).")


def tokens_per_item(cfg: RunConfig) -> int | None:
    """Forwards per record for per-token progress; None for short generations (no hook)."""
    if cfg.gen.max_new_tokens < LONG_GENERATION:
        return None
    n = cfg.gen.max_new_tokens
    return n + cfg.gen.t2t_note_tokens if cfg.mode in ("t2t", ALL_MODES) else n


# --- streaming a run into the page ---------------------------------------------------------

def stream_records(cfg: RunConfig, items: list, path: str, progress, render: Callable,
                   stop: threading.Event | None = None, unit: str = "generation",
                   runner: Callable | None = None, request: gr.Request | None = None,
                   plan: list[Shape] | None = None, modes: list[str] | None = None):
    """Run `items` into `path` in the worker process (or, on the in-process path, a thread) and
    yield `render(records, status, file)` as
    records arrive (throttled), then once more at the end. A Stop, closing the tab or a client
    that goes away ends the run within one decode step (a page closed or reloaded while another
    page of its session is open lets it run on); the session's disk quota ends it too.
    A UserError is said in the status line and raised as gr.Error. Every finished record is in
    the file (written and flushed by run_many) whatever happens. `runner` replaces run_many
    (same arguments after the items), e.g. a length sweep; it must pickle (a module-level
    function, or a partial of one) to travel to the worker process. `plan`: the run's shapes in
    order (a sweep's), so that the ETA weighs what is left by size.

    Streams: only the newest LIVE_ROWS records and a running summary stay in memory; `render`
    gets those rows and, as `summary=`, the RunningSummary of every record so far."""
    from collections import deque

    from ...io.records import JsonlWriter
    from ...bench.runner import run_many
    from ...report.summary import RunningSummary
    per_item = tokens_per_item(cfg)
    folder = os.path.dirname(path)
    guard.check_disk(folder)
    own_stop = stop is None
    stop = stop if stop is not None else stop_flag(request)
    full = threading.Event()

    def work(job: Job):
        if worker.enabled():  # the generations run in the worker process, which writes path
            return in_worker(job, "run", cfg, items=items, path=path, runner=runner,
                             count_tokens=per_item is not None)
        pipe = MODELS.get(cfg)
        from ...engines.budget import check_batches
        check_batches(cfg, items)  # the largest batch's KV cache, prompts known
        with JsonlWriter(path) as w, token_counter(pipe, per_item is not None) as counter:
            job.tokens = counter
            return (runner or run_many)(pipe, cfg, items, writer=w, on_progress=job.on_progress,
                                        should_stop=job.stop.is_set, keep=False)

    job = Job(work, stop, cfg.warmup)
    from ...bench.runner import modes_of
    job.modes = list(modes or modes_of(cfg))  # `modes`: a runner's own (the Load tab's)
    job.plan = plan
    recs: deque = deque(maxlen=LIVE_ROWS)  # the newest rows; every record is in the file
    summary = RunningSummary()
    swap = swap_note(cfg)
    # the status line leads with the job's phase and its one elapsed clock (live_line), from
    # the first second; `tail` is what the last full update said under it (records, accuracy)
    head = live_line(job, unit)
    first = render([], status_md(head + (("  \n" + swap) if swap else ""), "run"), gr.skip(),
                   summary=summary)
    tail = after(first[0], head)
    rest = tuple(gr.skip() for _ in first[1:])
    yield first
    last_table = last_yield = last_disk = time.perf_counter()
    first_run = None  # the first record's `run`: what the job paid for preparation
    try:
        for batch in job.events():
            recs.extend(batch)
            for r in batch:
                summary.add(r)
                if first_run is None and isinstance(r, dict):
                    first_run = r.get("run")
            # the bar (its words are the status line's, without the clock; the page shows the
            # line, an API client the words)
            progress(job.fraction(per_item), desc=job.describe(unit, clock=False))
            now = time.perf_counter()
            if now - last_disk >= DISK_EVERY_S:
                last_disk = now
                if guard.over_disk(folder):
                    full.set()
                    job.stop.set()
            if batch and now - last_table >= TABLE_EVERY_S:
                last_table = last_yield = now
                head = live_line(job, unit)
                msg = f"Running: {summary.count} of {job.total} record(s) done… {summary.line()}"
                out = render(list(recs), status_md(f"{head}  \n{msg}", "run"), gr.skip(),
                             summary=summary)
                tail = after(out[0], head)
                yield out
                # a yield turns the page's progress bar into a "generating" border: redraw it
                progress(job.fraction(per_item), desc=job.describe(unit, clock=False))
            elif now - last_yield >= ALIVE_EVERY_S:
                last_yield = now
                # the phase and the clock move on; this also lets gradio notice a client gone
                yield (live_line(job, unit) + tail,) + rest
    except UserError as e:
        if recs and not writes_summary(runner):
            write_app_summary(cfg, path, runner)
        kept = f" {summary.count} finished record(s) are in the download." if recs else ""
        yield render(list(recs), status_md(md_text(ui_message(e)) + kept, "error"),
                     path if recs else None, summary=summary)
        raise user_error(e) from None
    except GeneratorExit:  # the page went away: its generation stops within a decode step,
        # unless another page of its session is open (then it runs on into the session's folder)
        page_gone(request, job.stop, lambda: job.ended is not None)
        raise
    finally:
        if own_stop:
            clear_stop(request, stop)
    if full.is_set():
        msg = status_md(f"**Stopped:** this session's results reached the disk limit"
                        f" ({guard.limit('session_disk_mb')} MB, C2C_SESSION_DISK_MB) after"
                        f" {summary.count} record(s); download them and reload the page for a new"
                        " session.", "warn")
    elif (job.stop.is_set() or job.cancelled) and (not job.total or summary.count < job.total):
        during = stopped_during(job.phase)
        msg = status_md(f"**Stopped**{during} after {summary.count} of {job.total or '?'}"
                        " record(s); the finished ones are in the download."
                        + stop_note(job))
    else:
        secs = time.perf_counter() - job.started
        msg = status_md(f"**Done:** {summary.count} record(s) in {fmt_seconds(secs)}, written to"
                        f" `{os.path.basename(path)}`.", "ok")
    if summary.count > LIVE_ROWS:
        msg += f" The table shows the last {LIVE_ROWS}; the file holds them all."
    if summary.count:
        msg += f"  \n{summary.line()}"
    note = prepare_note(first_run)
    if note:
        msg += f"  \n{note}"
    from ...report.summary import contention_files
    busy = contention_files({os.path.basename(path): list(summary.shares)})
    if busy:
        msg += "  \n" + status_md(busy, "warn")
    if summary.count and not writes_summary(runner):
        write_app_summary(cfg, path, runner)
    yield render(list(recs), msg, path if os.path.exists(path) else None, summary=summary)


def writes_summary(runner: Callable | None) -> bool:
    """A runner that writes its run's own summary.json (the Load tab's app_load), which the
    generic one must not overwrite."""
    return bool(getattr(getattr(runner, "func", runner), "writes_summary", False))


def write_app_summary(cfg: RunConfig, path: str, runner: Callable | None = None) -> str | None:
    """The run's `<stem>.summary.json` beside its JSONL (report.runreport), offered with the
    download; the settings are the run's config (and a sweep's lengths). A summary that cannot
    be written leaves the records as they are."""
    import dataclasses

    from ...report.runreport import write_summary
    settings: dict[str, Any] = {"frontend": "app",
                                "command": os.path.basename(path).split("-", 1)[0],
                                "config": dataclasses.asdict(cfg)}
    if runner is not None and getattr(runner, "keywords", None):
        settings["sweep"] = dict(runner.keywords)
    try:
        return write_summary(path, settings)
    except (OSError, ValueError, UserError):
        return None
