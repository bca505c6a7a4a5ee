"""The web app's runner process: timed generations run here, never in the UI process.

The app sends each model job (load, records run, profile) to one worker process per device,
started with multiprocessing's "spawn" (a fresh interpreter: no gradio, no uvicorn threads, no
copied state), the way optimum-benchmark isolates its benchmark process. The worker owns the
ModelManager and the pipeline, writes the records (JSONL, flushed per record) and the profile
files itself, and sends back on a queue what the page shows: each record as it finishes, the
phase, the models' status line. A per-token count for long generations goes through a shared
integer (no lock, no message per token).

Stop: the UI process sets a multiprocessing.Event; the worker's cancel scope checks it before
every decode step and prefill, so a Stop or a client gone ends the generation within one step.
A job ends, for the UI, only when the worker says so: the next job never overlaps it. A worker
that has not ended a stopped job within `stop_wait_s()` (a model load or a fast-engine compile
checks only between its steps) is killed, and the next job starts a fresh one (WorkerReplaced).

If the worker dies (killed for memory, a segfault), the job fails with one sentence
(WorkerDied) and the next job starts a fresh worker; the records it wrote stay in the file.

This module imports no gradio: the worker process imports only the core.
"""

# Not a concurrent.futures.ProcessPoolExecutor(mp_context=spawn) (issue 17 part 6): a future gives
# one result at the end and cannot cancel a running job, while a job here streams records, phases
# and status lines as they happen and stops within one decode step; and a dead pool worker is a
# BrokenProcessPool without the exit code that names the signal (SIGKILL: out of memory).
from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import pickle
import queue
import signal
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from ..measure import cancel
from ..spec.errors import UserError

_CTX = mp.get_context("spawn")
_IDS = itertools.count(1)
#: How often the UI side passes a stop on and looks at the worker's health (seconds).
POLL_S = 0.02


class WorkerDied(UserError):
    """The worker process ended in the middle of a job (killed, out of memory, a crash)."""


#: Seconds a worker has, once told to stop, before it is killed and replaced (a model load or
#: a fast-engine compile checks for a stop only between its steps, which can take minutes).
STOP_WAIT_DEFAULT_S = 3.0

RESTARTED = "the model worker was restarted, so the next run loads its models again"


def stop_wait_s() -> float:
    try:
        v = float(os.environ.get("C2C_WORKER_STOP_S", "").strip() or STOP_WAIT_DEFAULT_S)
    except ValueError:
        return STOP_WAIT_DEFAULT_S
    return max(v, 0.0)


class WorkerReplaced(cancel.Cancelled):
    """A stopped job whose worker did not end it within `stop_wait_s()` (stuck in a model load
    or a compile): the worker was killed; a fresh one starts with the next job."""

    def __str__(self) -> str:
        return RESTARTED


def _death_sentence(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        how = f"was killed ({name}{', e.g. out of memory' if -code == signal.SIGKILL else ''})"
    else:
        how = f"exited with code {code}"
    return (f"The worker process running the models {how} during this job; records finished"
            " before are kept in the file, and the next job starts a fresh worker.")


# --- the worker process ----------------------------------------------------------------------

def sweep_grid(pipe, cfg, _items, *, ins, outs, bss=None, **kw):
    """A length sweep as a records runner (same arguments as run_many after the items); a
    module-level function so that it travels to the worker by reference."""
    from ..bench.sweep import run_sweep
    return run_sweep(pipe, cfg, ins, outs, batch_sizes=bss, **kw)


@contextmanager
def _count_tokens(pipe, counter, enabled: bool) -> Iterator[None]:
    """Top-level forwards of the receiver and sharer (= tokens produced) into a shared int."""
    handles = []
    if enabled:
        def hook(*_):
            counter.value += 1
        models = [pipe.receiver, *(s.model for s in getattr(pipe, "sharers", ()))] or \
            [pipe.receiver, pipe.sharer]
        for m in {id(m): m for m in models}.values():
            handles.append(m.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _sendable(e: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:  # noqa: BLE001 - an exception that does not pickle: its words
        return RuntimeError(f"{type(e).__name__}: {e}")


def serve(req_q, out_q, stop, tokens) -> None:
    """The worker's loop: one job at a time, in this process's main thread."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C is the app's; it ends us as it exits
    from ..bench import runner
    from .manager import ModelManager
    runner.FRONTEND.set("app")
    models = ModelManager()
    models.before_load = _budget_check(models)
    ppid = os.getppid()  # reparented (a new parent id) once the app is gone; cheaper and
    # surer than mp.parent_process().is_alive(), whose sentinel under spawn is the pipe that
    # carried our start-up data (end-of-file once the app has sent it)

    def app_gone() -> bool:
        return os.getppid() != ppid

    def should_stop() -> bool:  # Stop / a client gone, or the app itself gone
        return stop.is_set() or app_gone()

    def status(text: str | None = None, loading: bool = False) -> None:
        # the pair held now travels with every status line: the app shows it to every session
        # and counts its memory as freed by a swap (budget)
        out_q.put(("status", text or models.status(), loading, models.cfg))

    status()
    while True:
        try:
            req = req_q.get(timeout=1.0)
        except queue.Empty:
            if app_gone():
                return  # the app is gone
            continue
        if req is None:
            return
        kind, jid, payload, fixed = req
        models.fixed_key, models.fixed_label = fixed
        result, err = None, None
        try:
            if stop.is_set():  # stopped (a client gone) before we got to it
                raise cancel.Cancelled()
            with cancel.scope(should_stop), cancel.reporting(
                    lambda phase, jid=jid: out_q.put(("phase", jid, phase))):
                result = _JOBS[kind](models, payload, jid, out_q, should_stop, tokens, status)
        except BaseException as e:  # noqa: BLE001 - every outcome goes back to the app
            if should_stop() and isinstance(e, OSError):
                # the client left: its session folder was removed under the files being
                # written (a closed tab mid-profile); that is the stop, not a failure
                e = cancel.Cancelled()
            if not isinstance(e, (UserError, cancel.Cancelled)):
                traceback.print_exc(file=sys.stderr)
            err = _sendable(e)
        status()
        out_q.put(("end", jid, result, err))


def _budget_check(models):
    """The app's memory budget once every config is known (a hub model's config is fetched by
    preflight), before the previous pair is dropped or any weight loads."""
    def check(cfg, configs):
        from ..engines.budget import check_fits, cpu_params_cap, estimate
        held = estimate(models.cfg).weights if models.cfg is not None else 0
        check_fits(cfg, cfg.batch_size, cfg.gen.max_new_tokens, held, configs=configs,
                   cpu_params_cap=cpu_params_cap())
    return check


def _pipe(models, cfg, status):
    if models.pipe is None or models.key != models.key_of(cfg):
        status(f"**Models:** loading {cfg.receiver.source} ← {cfg.sharer.source} …", True)
    return models.get(cfg)


def _job_load(models, p, jid, out_q, stop, tokens, status):
    _pipe(models, p["cfg"], status)


def _job_run(models, p, jid, out_q, stop, tokens, status):
    from ..io.records import JsonlWriter
    from ..bench.runner import run_many
    cfg = p["cfg"]
    pipe = _pipe(models, cfg, status)
    status()
    from ..engines.budget import check_batches
    check_batches(cfg, p["items"])  # the prompts are known now: the largest batch's KV cache

    def on_progress(done, total, rec):
        tokens.value = 0
        out_q.put(("progress", jid, done, total, rec))

    with JsonlWriter(p["path"]) as w, _count_tokens(pipe, tokens, p["count_tokens"]):
        (p["runner"] or run_many)(pipe, cfg, p["items"], writer=w, on_progress=on_progress,
                                  should_stop=stop, keep=False)


def _job_profile(models, p, jid, out_q, stop, tokens, status):
    from ..bench.profiling import profile_item
    cfg = p["cfg"]
    pipe = _pipe(models, cfg, status)
    status()
    out_q.put(("phase", jid, "profiling"))
    with _count_tokens(pipe, tokens, p["count_tokens"]):
        rec, _stats = profile_item(pipe, cfg, p["item"], p["paths"])
    return {"record": rec, "device": pipe.device.type,
            "dtype": str(pipe.dtype).removeprefix("torch.")}


_JOBS: dict[str, Callable] = {"load": _job_load, "run": _job_run, "profile": _job_profile}


# --- the app's side ---------------------------------------------------------------------------

def _ended(proc) -> bool:
    """Whether a worker process has ended, from its sentinel (readable once it exits). Unlike
    `is_alive()`, this stays true whichever thread reaped the process first."""
    from multiprocessing.connection import wait as _wait
    try:
        return bool(_wait([proc.sentinel], timeout=0))
    except (OSError, ValueError):  # closed: it ended and was cleaned up
        return True


class _Sender:
    """The worker's end of the message pipe, with a queue's `put` (sent at once, between
    records: no feeder thread competing with the timed generation)."""

    def __init__(self, conn):
        self.conn = conn

    def put(self, msg) -> None:
        self.conn.send(msg)


class SharedCount:
    """`job.tokens[0]` over the worker's shared token counter."""

    def __init__(self, value):
        self.value = value

    def __getitem__(self, _i: int) -> int:
        return self.value.value

    def __setitem__(self, _i: int, v: int) -> None:
        self.value.value = v


class WorkerClient:
    """One worker process (started on first use, started again after it died) and the thread
    that reads what it sends. `call` runs one job and blocks until the worker has ended it."""

    def __init__(self, device: str):
        self.device = device
        self._lock = threading.Lock()      # one job in flight per worker
        self._proc = None
        self._inbox: tuple[int, queue.Queue] | None = None
        self.status_text: str | None = None
        self.loading = False
        self.died: str | None = None       # why the last worker ended, until a new one starts
        self.kind: str | None = None       # the job in flight ("load", "run", "profile")
        self.held_cfg = None               # the RunConfig of the models the worker holds

    # process ---------------------------------------------------------------------------
    def alive(self) -> bool:
        return self._proc is not None and not _ended(self._proc)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _start(self) -> None:
        self.req_q = _CTX.Queue()
        # the worker's messages come over a pipe whose writing end only the worker holds: its
        # death reads as end-of-file, even in the middle of a message
        recv, send = _CTX.Pipe(duplex=False)
        self.stop = _CTX.Event()
        self.tokens = _CTX.RawValue("q", 0)  # written by the worker, read by the page: no lock
        self._proc = _CTX.Process(target=serve, args=(self.req_q, _Sender(send), self.stop,
                                                       self.tokens),
                                  name=f"c2c-worker-{self.device}", daemon=True)
        self._proc.start()
        send.close()
        self.died, self.loading = None, False
        self.status_text, self.held_cfg = None, None
        threading.Thread(target=self._read, args=(self._proc, recv), daemon=True,
                         name=f"c2c-worker-reader-{self.device}").start()

    def _read(self, proc, conn) -> None:
        """Hands the worker's messages to the job waiting for them; notices its death."""
        while True:
            try:
                if not conn.poll(0.1):
                    if proc.is_alive():
                        continue
                    if not conn.poll(0):  # nothing left from the worker
                        raise EOFError
                msg = conn.recv()
            except (EOFError, OSError, pickle.UnpicklingError):
                break  # the worker ended (a message cut off by its death reads the same)
            except Exception:  # noqa: BLE001 - a message we cannot read: end this worker
                traceback.print_exc(file=sys.stderr)  # (the job fails in one sentence below)
                break
            if msg[0] == "status":
                if proc is self._proc:
                    self.status_text, self.loading = msg[1], msg[2]
                    self.held_cfg = msg[3] if len(msg) > 3 else None
                continue
            box = self._inbox
            if box is not None and msg[1] == box[0]:
                box[1].put(msg)
        conn.close()
        proc.join(2.0)
        if proc.is_alive():  # we stopped reading it (an unreadable message): end it
            proc.terminate()
            proc.join(5.0)
        if proc is self._proc:
            self.died = _death_sentence(proc.exitcode)
            self.loading, self.held_cfg = False, None
        box = self._inbox
        if box is not None:  # a job was in flight: it fails with one sentence
            box[1].put(("dead", box[0], proc.exitcode))

    def _replace(self) -> None:
        """Kill the worker at once (its job was stopped and it did not end it in time); the
        next job starts a fresh one. Its status line says so, not that it was killed."""
        proc, self._proc = self._proc, None
        self.died = f"Stopped: {RESTARTED}."
        self.loading, self.held_cfg, self.status_text = False, None, None
        if proc is not None:
            proc.kill()
            proc.join(5.0)

    def close(self, timeout: float = 5.0) -> None:
        proc = self._proc
        if proc is None:
            return
        self._proc = None
        if proc.is_alive():
            try:
                self.req_q.put(None)
            except (OSError, ValueError):
                pass
            proc.join(timeout)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout)

    # jobs ------------------------------------------------------------------------------
    def call(self, kind: str, payload: dict, fixed: tuple = (None, None),
             should_stop: Callable[[], bool] | None = None,
             on_message: Callable[[tuple], None] | None = None,
             on_start: Callable[["WorkerClient"], None] | None = None) -> Any:
        """Run one job in the worker and return its result (or raise its error). Messages
        ("progress", jid, done, total, rec) and ("phase", jid, phase) go to `on_message` as
        they come. Once `should_stop()` is true, the worker is told to stop; this still waits
        for the worker to end the job (within a decode step), so jobs never overlap."""
        with self._lock:
            if should_stop and should_stop():
                raise cancel.Cancelled()
            if not self.alive():
                self.close()
                self._start()
            self.stop.clear()
            self.tokens.value = 0
            jid, inbox = next(_IDS), queue.Queue()
            self._proc_of_job = self._proc
            self._inbox, self.kind = (jid, inbox), kind
            if on_start:
                on_start(self)
            try:
                self.req_q.put((kind, jid, payload, fixed))
                told = None  # when the worker was told to stop
                while True:
                    if told is None and should_stop and should_stop():
                        self.stop.set()
                        told = time.monotonic()
                    try:
                        msg = inbox.get(timeout=POLL_S)
                    except queue.Empty:
                        if told is not None and time.monotonic() - told > stop_wait_s():
                            self._replace()  # stuck between its stop checks: kill it
                            raise WorkerReplaced() from None
                        if _ended(self._proc_of_job):  # died while we were not looking
                            try:
                                msg = inbox.get(timeout=1.0)  # a last "end" or "dead"
                            except queue.Empty:
                                raise WorkerDied(_death_sentence(
                                    self._proc_of_job.exitcode)) from None
                        else:
                            continue
                    if msg[0] == "end":
                        if msg[3] is not None:
                            raise msg[3]
                        return msg[2]
                    if msg[0] == "dead":
                        raise WorkerDied(_death_sentence(msg[2]))
                    if on_message:
                        on_message(msg)
            finally:
                self._inbox, self.kind = None, None


_WORKERS: dict[str, WorkerClient] = {}
_WORKERS_LOCK = threading.Lock()
_LAST: list[WorkerClient] = []


def device_key(cfg) -> str:
    """The device a config runs on, one name per device: 'cpu', 'cpu:0' and 'cpu:1' are one
    CPU, 'cuda' is 'cuda:0' (budget.canonical_device), so spellings never churn the worker."""
    from ..engines.budget import canonical_device
    dev = canonical_device(cfg.device)
    if dev == "auto":
        from ..models.loading import resolve_device
        return "cuda:0" if resolve_device(None).type == "cuda" else "cpu"
    return dev


def worker_for(cfg) -> WorkerClient:
    """The worker process of cfg's device. One device's worker at a time: a job on another
    device ends the previous worker first, so its models leave memory (as a single model
    manager drops a pair before loading the next; jobs never run at once anyway)."""
    key = device_key(cfg)
    with _WORKERS_LOCK:
        others = [w for k, w in _WORKERS.items() if k != key]
        for k in [k for k in _WORKERS if k != key]:
            del _WORKERS[k]
        w = _WORKERS.get(key)
        if w is None:
            w = _WORKERS[key] = WorkerClient(key)
        _LAST[:] = [w]
    for o in others:
        o.close()
    return w


def last_worker() -> WorkerClient | None:
    """The worker of the last job (its models are what the status line shows)."""
    return _LAST[0] if _LAST else None


def shutdown() -> None:
    """Stop every worker process (tests; the app's exit does it through daemon processes)."""
    with _WORKERS_LOCK:
        ws = list(_WORKERS.values())
        _WORKERS.clear()
        _LAST.clear()
    for w in ws:
        w.close()


def enabled() -> bool:
    """The app runs jobs in a worker process unless C2C_APP_WORKER=0, or on ZeroGPU hardware
    (SPACES_ZERO_GPU set, as Hugging Face sets it there), where the @spaces.GPU function already
    runs in a process of its own. A CPU or ordinary GPU Space has `spaces` installed too: it
    keeps the worker. ZeroGPU is measure/zerogpu.py's one rule (the `spaces` package's own)."""
    if os.environ.get("C2C_APP_WORKER", "").strip().lower() in ("0", "false", "no", "off"):
        return False
    from ..measure.zerogpu import on_zerogpu
    return not on_zerogpu()


def wait_status(w: WorkerClient, timeout: float = 10.0) -> None:
    """Wait (a little) until the worker has said its first status line."""
    t = time.time() + timeout
    while w.status_text is None and w.alive() and time.time() < t:
        time.sleep(0.05)
