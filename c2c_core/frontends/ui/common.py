"""Shared pieces of the web app: the model manager (load once, serve every tab), per-session
folders, the background job that maps `run_many`'s `on_progress` onto `gr.Progress`, display
tables with units, and error messages said in the page.
"""

from __future__ import annotations

import collections
import html
import os
import queue
import re
import secrets
import shutil
import tempfile
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import gradio as gr
import pandas as pd

from ...report import analysis
from ...measure import cancel
from .. import worker
from dataclasses import replace

from ...engines.budget import canonical_device
from ...spec.config import ALL_MODES, RunConfig, build_run_config
from ...spec.errors import UserError
from ..manager import ModelManager, _free_memory, preflight  # noqa: F401 (re-exported)
from . import guard

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
#: Keep session folders at most this long (API clients never send "tab closed").
SESSION_MAX_AGE_S = 24 * 3600

SESSION_ROOT = os.path.join(tempfile.gettempdir(), "c2c-workbench-sessions")

#: Model panel fields (keyword names of the API endpoints) → build_run_config keyword.
MODEL_FIELDS = {
    "preset": "preset", "receiver": "base_model", "sharer": "teacher_model", "fuser": "fuser",
    "device": "device", "dtype": "dtype", "fuser_hidden_dim": "hidden_dim",
    "fuser_intermediate_dim": "intermediate_dim", "fuser_layers": "num_layers",
    "alignment": "alignment", "fusion": "fusion",
}
#: Run settings fields (same names as build_run_config's overrides).
RUN_FIELDS = ["mode", "max_new_tokens", "ignore_eos", "warmup", "repeats", "timing",
              "chat_template", "do_sample", "temperature", "top_p", "top_k", "seed", "engine",
              "batch_size"]
INT_FIELDS = {"max_new_tokens", "warmup", "repeats", "top_k", "seed", "hidden_dim",
              "intermediate_dim", "num_layers", "batch_size"}

#: CLI spellings in core messages → what the page calls the same setting.
UI_WORDS = {
    "pass a local prompts file with --dataset_file": "upload a prompts file instead",
    "pass --dataset_file with a local file": "upload a prompts file",
    "pass --dataset_file with a local copy": "upload a local copy",
    "use the offline preset smollm2-demo": "pick the offline preset smollm2-demo",
    "pass --skip_bad_lines to skip such rows": "tick 'skip malformed lines' to skip such rows",
    "(or pass --skip_bad_lines to skip it)": "(or tick 'skip malformed lines')",
    "--skip_bad_lines": "'skip malformed lines'",
    "rerun on an idle machine or with fewer --threads": "close other programs (a local browser"
    " tab counts) and rerun",
    "--max_new_tokens": "'max new tokens'", "--input_lens": "prompt length", "--num_samples": "'number of samples'",
    "--dataset_config": "'config'", "--dataset_file": "an uploaded file",
    "--dataset": "'dataset'", "--split": "'split'", "--field": "'text field'",
    "--offset": "'offset'", "--warmup": "'warm-up runs'", "--repeats": "'repeats'",
    "--device": "device", "--dtype": "dtype", "--mode": "mode", "--timing": "timing",
    "--fuser": "fuser", "--base_model": "receiver", "--teacher_model": "sharer",
    "--alignment none": "token alignment 'none'", "--alignment": "token alignment",
    "--fusion": "'several sharers'",
    "--prompts": "the prompt list", "--prompt": "the prompt",
}
#: Whole phrases first (they contain flags the loop above would change piecemeal).
UI_WORDS = {"pass --encoding with the file's encoding (e.g. --encoding latin-1) or re-save it as"
            " UTF-8": "re-save it as UTF-8", **UI_WORDS}


# --- messages ------------------------------------------------------------------------------

def ui_message(err: BaseException | str) -> str:
    """A core UserError's sentence with the CLI flag names replaced by the page's labels, and
    no server paths (unless the operator allowed them)."""
    msg = str(err)
    for flag, words in UI_WORDS.items():
        msg = msg.replace(flag, words)
    return guard.scrub_paths(msg)


def status_md(text: str, kind: str = "info") -> str:
    """A status line; words rather than emoji (not every browser font has them)."""
    lead = {"info": "", "ok": "", "warn": "**Note:** ", "error": "**Error:** ", "run": ""}[kind]
    return f"{lead}{text}"


def error_outputs(err: BaseException, n_outputs: int) -> tuple:
    """Outputs for a failed run: the message in the status line (the first output), every
    other output left as it was. Callers yield this, then raise gr.Error with the same text
    (a toast in the page, an exception for gradio_client)."""
    return (status_md(md_text(ui_message(err)), "error"),) + tuple(gr.skip() for _ in range(n_outputs - 1))


def user_error(err: BaseException) -> gr.Error:
    # gradio renders an error's message as HTML: a file name or a column from an upload is text
    return gr.Error(html_text(ui_message(err)), print_exception=False)


def html_text(value: Any) -> str:
    """A value shown where HTML is rendered (toasts, plotly labels and hovers), as text."""
    return html.escape(str(value), quote=False)


_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+!|~])")


def md_text(value: Any) -> str:
    """A value shown inside Markdown (status and ratio lines), as text: its HTML escaped and its
    Markdown syntax (images, links, emphasis) backslash-escaped."""
    return _MD_SPECIAL.sub(r"\\\1", html_text(value))


def validator(check: Callable) -> Callable:
    """An endpoint's validator (gradio runs it before the job enters the queue, so a refusal
    comes back at once even while another job holds the model): `check` takes the endpoint's
    inputs and raises UserError."""
    def validate(*args, **kwargs):
        # gradio wants one answer per input, in input order (the positional ones, then the
        # keyword ones); the refused input says why, else the first one does
        n, at = len(args) + len(kwargs), 0
        try:
            check(*args, **kwargs)
        except UserError as e:
            msg = ui_message(e)
            field = getattr(e, "field", None)
            if field in kwargs:
                at = len(args) + list(kwargs).index(field)
        except Exception as e:  # noqa: BLE001 - a validator must never show a traceback
            msg = f"These settings could not be read ({type(e).__name__}); check them."
        else:
            return [gr.validate(True, "") for _ in range(n)]
        return [gr.validate(i != at, msg if i == at else "") for i in range(n)]
    validate.__name__ = f"validate_{getattr(check, '__name__', 'inputs')}"
    return validate


#: Said in a run's status line the moment its button is clicked (in the browser, so it shows
#: while the job waits for the model queue; the queue box beside it gives the place).
WAITING_JS = ("() => 'Sent. If a setting is refused, its box turns red and nothing runs;"
              " otherwise the job queues (one model job runs at a time; your place is shown on"
              " the right) and this line follows it.'")


# --- sessions ------------------------------------------------------------------------------

def session_id(request: gr.Request | None) -> str:
    """This session's key: the one the server minted into the request's session cookie
    (guard.SessionCookie), never the client's session hash. A request without a valid cookie
    (the app launched without launch_kwargs' middleware) gets a key of its own: it shares
    nothing, with no one."""
    try:
        cookies = dict(getattr(request, "cookies", None) or {})
    except Exception:  # noqa: BLE001 - a request object without cookies
        cookies = {}
    key = guard.session_key(cookies.get(guard.SESSION_COOKIE))
    if key is None:  # one key per request object, so its run's stop flag is found again
        key = getattr(request, "_c2c_session_key", None) or secrets.token_urlsafe(24)
        try:
            request._c2c_session_key = key
        except AttributeError:
            pass
    return key


def session_dir(request: gr.Request | None) -> str:
    """This browser session's own folder: runs are written and listed only here."""
    d = os.path.join(SESSION_ROOT, session_id(request))
    os.makedirs(d, exist_ok=True)
    return d


def new_run_path(request: gr.Request | None, kind: str) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = os.path.join(session_dir(request), f"{kind}-{stamp}")
    path, n = f"{base}.jsonl", 1
    while os.path.exists(path):
        n += 1
        path = f"{base}-{n}.jsonl"
    return path


def session_runs(request: gr.Request | None) -> list[tuple[str, str]]:
    """(label, file name) of the JSONL files this session wrote, newest first."""
    d = session_dir(request)
    files = sorted((f for f in os.listdir(d) if f.endswith(".jsonl")),
                   key=lambda f: os.path.getmtime(os.path.join(d, f)), reverse=True)
    out = []
    for f in files:
        with open(os.path.join(d, f), "rb") as fh:
            n = sum(1 for line in fh if line.strip())
        if n:  # a run stopped before its first record has nothing to analyze
            out.append((f"{f} ({n} record{'s' if n != 1 else ''})", f))
    return out


def session_run_path(request: gr.Request | None, name: str) -> str:
    """The path of one of this session's runs; never a file outside its folder."""
    base = os.path.basename(name)
    path = os.path.join(session_dir(request), base)
    if base != name or not base.endswith(".jsonl") or not os.path.isfile(path):
        raise UserError(f"'{name}' is not a run of this session; pick one from the list.")
    return path


def purge_old_sessions(max_age_s: float = SESSION_MAX_AGE_S) -> None:
    if not os.path.isdir(SESSION_ROOT):
        return
    cutoff = time.time() - max_age_s
    for name in os.listdir(SESSION_ROOT):
        p = os.path.join(SESSION_ROOT, name)
        try:
            if os.path.getmtime(p) < cutoff:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


# --- stop flags (Stop button; closing the tab) ---------------------------------------------

_STOPS: dict[str, set[threading.Event]] = {}
_STOPS_LOCK = threading.Lock()


def stop_flag(request: gr.Request | None) -> threading.Event:
    """A fresh stop flag for one of the session's runs (Stop and closing the tab set it)."""
    ev = threading.Event()
    with _STOPS_LOCK:
        _STOPS.setdefault(session_id(request), set()).add(ev)
    return ev


def clear_stop(request: gr.Request | None, ev: threading.Event) -> None:
    """The run that owned `ev` is over: a later Stop has nothing to stop."""
    sid = session_id(request)
    with _STOPS_LOCK:
        flags = _STOPS.get(sid)
        if flags is not None:
            flags.discard(ev)
            if not flags:
                del _STOPS[sid]


def request_stop(request: gr.Request | None) -> bool:
    """Stop every run of this session; False when none was running."""
    with _STOPS_LOCK:
        flags = list(_STOPS.get(session_id(request), ()))
    for ev in flags:
        ev.set()
    return bool(flags)


def end_session(request: gr.Request | None) -> None:
    """The tab was closed: stop its runs and remove its folder."""
    request_stop(request)
    with _STOPS_LOCK:
        _STOPS.pop(session_id(request), None)
    guard.forget_session(session_id(request))
    shutil.rmtree(os.path.join(SESSION_ROOT, session_id(request)), ignore_errors=True)


# --- configuration -------------------------------------------------------------------------

def _clean(key: str, v: Any) -> Any:
    if isinstance(v, str):
        v = v.strip()
        return v or None
    if isinstance(v, float) and key in INT_FIELDS:
        if v != int(v):
            raise UserError(f"{key.replace('_', ' ')} must be a whole number, not {v}.")
        return int(v)
    return v


def run_config(settings: dict, **fixed) -> RunConfig:
    """Model panel + run settings (API keyword names) → RunConfig via build_run_config, after
    the app's own checks: names a client may give (guard), the server's caps, and the
    operator's fixed models. Cheap: also used as the endpoints' validators."""
    guard.check_model_settings(settings)
    cfg = _run_config(settings, **fixed)
    guard.check_new_tokens(cfg.gen.max_new_tokens)
    guard.check_sharers(cfg)
    cfg = replace(cfg, device=canonical_device(cfg.device))  # one spelling per device
    MODELS.check_allowed(cfg)
    check_memory(cfg, cfg.batch_size)  # models and KV cache within the device's memory
    return cfg


def check_memory(cfg: RunConfig, batch: int = 1, tokens: int | None = None,
                 what: str = "This run") -> None:
    """The run's memory budget before it queues (guard.check_budget): `tokens` per sequence
    defaults to the new tokens (the prompt's are added where they are known)."""
    if tokens is None:
        tokens = cfg.gen.max_new_tokens + (cfg.gen.t2t_note_tokens if cfg.mode in
                                           ("t2t", ALL_MODES) else 0)
    guard.check_budget(cfg, held_models(), batch, tokens, what)


def pair_label(cfg: RunConfig) -> str:
    """'receiver <- sharer[, sharer]' of a RunConfig, with its preset's name when it is one."""
    pair = f"{cfg.receiver.source} ← {', '.join(s.source for s in cfg.sharers)}"
    return f"{cfg.preset} ({pair})" if cfg.preset and cfg.preset != "custom" else pair


def swap_note(cfg: RunConfig) -> str | None:
    """A sentence when cfg's models are not the ones the server holds: the run replaces them for
    every session. None when they are (or nothing is loaded)."""
    held = held_models()
    if held is None:
        return None
    try:
        if ModelManager.key_of(held) == ModelManager.key_of(cfg):
            return None
    except UserError:
        return None
    return (f"This run will load {pair_label(cfg)} in place of {pair_label(held)}, which every"
            " session of this server shares.")


def held_models() -> RunConfig | None:
    """The RunConfig of the models the server holds now (the worker's, or this process's on
    the in-process path); None before the first load."""
    if not worker.enabled():
        return MODELS.cfg
    w = worker.last_worker()
    return w.held_cfg if w is not None and w.alive() else None


def _run_config(settings: dict, **fixed) -> RunConfig:
    kw: dict[str, Any] = {}
    for ui_key, cfg_key in MODEL_FIELDS.items():
        if ui_key in settings:
            kw[cfg_key] = _clean(cfg_key, settings[ui_key])
    for k in RUN_FIELDS:
        if k in settings:
            kw[k] = _clean(k, settings[k])
    kw.update(fixed)
    preset = kw.pop("preset", None)
    base, teacher = kw.pop("base_model", None), kw.pop("teacher_model", None)
    return build_run_config(preset, base, teacher, kw.pop("fuser", None), **kw)


# --- the loaded models ---------------------------------------------------------------------

#: The app's models when jobs run in this process (ZeroGPU, C2C_APP_WORKER=0); with the worker
#: process (the default) only its operator lock (`fix`) is used here: the pipeline is the
#: worker's.
MODELS = ModelManager()


def models_status() -> str:
    """The status line of the models: the worker's own words (it reports them as they change)
    or, on the in-process path, this process's manager."""
    if not worker.enabled():
        return guard.scrub_paths(MODELS.status())
    w = worker.last_worker()
    if w is None:
        return ("**Models:** none loaded yet; they load on the first run (or press"
                " *Load models*).")
    if w.died and not w.alive():
        return f"**Models:** none loaded. {w.died}"
    if w.status_text is None:
        return "**Models:** starting the worker process …"
    return guard.scrub_paths(w.status_text)


def models_loading() -> bool:
    if not worker.enabled():
        return MODELS.loading is not None
    w = worker.last_worker()
    # a job in flight may load another pair: the status line follows it until it ends
    return w is not None and w.alive() and (w.loading or w.status_text is None
                                            or w.kind is not None)


def load_models(cfg: RunConfig) -> None:
    """Load cfg's models where jobs run: in the worker process, or here on the in-process
    path. Raises UserError (a failed load keeps the working pair)."""
    if worker.enabled():
        worker.worker_for(cfg).call("load", {"cfg": cfg}, fixed=(MODELS.fixed_key,
                                                                 MODELS.fixed_label))
    else:
        MODELS.get(cfg)


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


class Job:
    """Runs `work(job)` in a thread so a callback can keep yielding (records as they
    arrive, progress ticks) while the model works. With the worker process (the default),
    `work` hands the job to it (`in_worker`) and relays what it sends; the thread then only
    waits, and the job ends when the worker has ended it. `work` passes `job.on_progress` and
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
        self.record_at: list[float] = []   # when each record arrived (for the ETA)
        self.first_batch = 1                # rows in the first generation (its batch size)
        #: the run's modes in their interleaved order (the ETA adds each mode's own rate)
        self.modes: list[str] = []
        self.mode_done: collections.Counter = collections.Counter()
        self.mode_secs: collections.Counter = collections.Counter()  # timed seconds per mode
        self.mode_timed: collections.Counter = collections.Counter()  # records in mode_secs
        self.last_mode: str | None = None
        self.tokens = [0]
        self.cancelled = False
        self.ended: float | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="c2c-job")

    def on_progress(self, done: int, total: int, rec: dict | None) -> None:
        self.done, self.total = done, total
        self.tokens[0] = 0
        if rec is None:  # run_many starts: the models are loaded
            self.phase = "warming up" if self.warmup else "running"
            self.started = time.perf_counter()
        else:
            self.phase = "running"
            if not self.record_at:
                b = rec.get("batch_size") if isinstance(rec, dict) else None
                self.first_batch = b if isinstance(b, int) and b > 0 else 1
            now = time.perf_counter()
            mode = rec.get("mode") if isinstance(rec, dict) else None
            if len(self.record_at) >= self.first_batch:
                # the time since the previous record went to this one (a batch's rows arrive
                # together: its time spreads over them); the first generation is left out, it
                # also paid the warm-up and the fast engine's compile
                self.mode_secs[mode] += now - self.record_at[-1]
                self.mode_timed[mode] += 1
            self.mode_done[mode] += 1
            self.last_mode = mode
            self.record_at.append(now)
            self.q.put(rec)

    def set_phase(self, phase: str) -> None:
        """What the job does now, as the run says it (cancel.say): "timed run" is the records'
        phase ("running"), anything else ("compiling … shape 2 of 4", "profiled run for the
        trace") is shown as it is."""
        self.phase = "running" if phase == "timed run" else phase

    def _run(self) -> None:
        from ...bench.runner import FRONTEND
        FRONTEND.set("app")  # this thread's records (the in-process path) say so
        try:
            if not RUN_LOCK.acquire(blocking=False):
                self.phase = "waiting"
                while not RUN_LOCK.acquire(timeout=0.1):
                    if self.stop.is_set():
                        raise cancel.Cancelled()
            t0 = time.perf_counter()
            self.phase = "loading models"
            try:
                with cancel.scope(self.stop.is_set), cancel.reporting(self.set_phase):
                    self.result = self.work(self)
            finally:
                JOB_LOG.append((t0, time.perf_counter()))
                RUN_LOCK.release()
        except cancel.Cancelled:
            self.cancelled = True
        except BaseException as e:  # noqa: BLE001 - handed to the callback's thread
            self.error = e
        finally:
            self.ended = time.perf_counter()
            self.q.put(self._END)

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

    def describe(self, unit: str = "generation") -> str:
        took = f" · {fmt_seconds(time.perf_counter() - self.created)} elapsed"
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
        eta = self.eta()
        if eta is not None:
            text += f" · ETA {fmt_seconds(eta)}"
        return text + f" · {fmt_seconds(time.perf_counter() - self.created)} elapsed"

    def eta(self, now: float | None = None) -> float | None:
        """Seconds left: per mode, its own seconds per record x its records still to come (mode
        `all` interleaves modes of very different speeds); less the time the record in flight
        has run, at most its mode's expected time (so the ETA does not fall to 0 between
        records and jump back). None until every mode has a timed record."""
        now = time.perf_counter() if now is None else now
        modes = self.modes or [m for m in self.mode_done]
        if not modes or not self.total or self.done >= self.total or not self.record_at:
            return None
        if any(not self.mode_timed[m] for m in modes):
            return None
        rate = {m: self.mode_secs[m] / self.mode_timed[m] for m in modes}
        each = self.total / len(modes)
        left = {m: max(each - self.mode_done[m], 0.0) for m in modes}
        todo = sum(rate[m] * left[m] for m in modes)
        i = modes.index(self.last_mode) if self.last_mode in modes else -1
        nxt = next((modes[(i + k) % len(modes)] for k in range(1, len(modes) + 1)
                    if left[modes[(i + k) % len(modes)]] > 0), modes[0])
        return max(todo - min(now - self.record_at[-1], rate[nxt]), 0.0)


def stopped_during(phase: str) -> str:
    """' during …' for a stop that ended a run outside its timed generations."""
    if phase.startswith(("compiling", "preparing")):
        m = re.search(r"shape \d+ of \d+", phase)
        return " during the fast engine's compile" + (f" (at {m.group(0)})" if m else "")
    if phase == "loading models":
        return " while the models loaded"
    if phase == "warming up":
        return " during the warm-up"
    return ""


def fmt_seconds(s: float) -> str:
    if s < 10:
        return f"{max(s, 0):.1f} s"
    s = int(round(s))
    return f"{s // 60} min {s % 60:02d} s" if s >= 60 else f"{s} s"


def tokens_per_item(cfg: RunConfig) -> int | None:
    """Forwards per record for per-token progress; None for short generations (no hook)."""
    if cfg.gen.max_new_tokens < LONG_GENERATION:
        return None
    n = cfg.gen.max_new_tokens
    return n + cfg.gen.t2t_note_tokens if cfg.mode in ("t2t", ALL_MODES) else n


# --- tables --------------------------------------------------------------------------------

#: Columns of the live results table: raw key → heading with unit.
RESULT_COLUMNS = ["id", "mode", "repeat", "prompt_tokens", "num_generated_tokens", "ttft_ms",
                  "decode_avg_ms", "tokens_per_second", "e2e_ms", "peak_memory_mb"]


def _short(text: Any, n: int = 70) -> str:
    s = " ".join(str(text or "").split())
    return s if len(s) <= n else s[: n - 1] + "…"


def records_table(records: list[dict]) -> pd.DataFrame:
    """Records → display table (one row each) with units in the headings."""
    heads = ["id", "mode", "repeat"] + [analysis.label(k) for k in RESULT_COLUMNS[3:]] + \
        ["prompt", "response"]
    if not records:
        return pd.DataFrame(columns=heads)
    df = analysis.to_frame(records)
    out = pd.DataFrame({
        "id": df["id"], "mode": df["mode"], "repeat": df["repeat"],
        **{analysis.label(k): df[k].round(2) if k not in ("prompt_tokens", "num_generated_tokens")
           else df[k].astype("Int64") for k in RESULT_COLUMNS[3:]},
    })
    out["prompt"] = [_short(r.get("prompt")) for r in records]
    out["response"] = [_short(r.get("response")) for r in records]
    return out


def labelled(df: pd.DataFrame) -> pd.DataFrame:
    """Raw-key column names → display names with units (analysis.label)."""
    out = df.rename(columns={c: analysis.label(c) for c in df.columns
                             if c in analysis.FIELDS or c.endswith("_ms")})
    for c in out.columns:
        if out[c].dtype == float:
            out[c] = out[c].round(2)
    if "prompt" in out.columns:
        out["prompt"] = out["prompt"].map(_short)
    return out


def sized(fig, height: int = 380):
    """Plotly figure at a height that fits the page (a "No data" placeholder stays short)."""
    empty = not fig.data
    fig.update_layout(height=min(height, 240) if empty else height)
    return fig


def integer_counts(fig, n: int):
    """Histogram count axes in whole numbers when there are few samples (no 0.2 ticks)."""
    if 0 < n <= 10 and fig.data and fig.data[0].type == "histogram":
        fig.update_yaxes(tick0=0, dtick=1)
    return fig


def stop_button(elem_id: str) -> gr.Button:
    """Stop: ends this session's running job within one decode step; finished records stay."""
    return gr.Button("Stop", variant="stop", elem_id=elem_id, scale=1, min_width=110)


def download_button(elem_id: str, **kw) -> gr.DownloadButton:
    """A compact "Download JSONL" button, enabled once a run has written its file."""
    return gr.DownloadButton("Download JSONL", value=None, interactive=False, elem_id=elem_id,
                             **kw)


def enable_download(path: str | None):
    """After a run: the button is clickable when it holds a file. (A separate event, so the
    API endpoints return plain file paths rather than component updates.)"""
    return gr.DownloadButton(interactive=bool(path))


def show_files(files):
    """After a profile: the file list is shown once it holds files."""
    return gr.File(visible=bool(files))


def plot(fig, elem_id: str, height: int = 380, **kw) -> gr.Plot:
    """A gr.Plot for a plotly figure; the figure carries its own title, so the label (the
    output's name in the API) is not shown."""
    label = kw.pop("label", elem_id.split("-", 1)[-1].replace("-", " "))
    return gr.Plot(sized(fig, height), label=label, show_label=False, elem_id=elem_id,
                   elem_classes=["c2c-plot"], **kw)


# --- ZeroGPU -------------------------------------------------------------------------------

def gpu(duration: int = 120) -> Callable:
    """`spaces.GPU(duration=...)` on a Hugging Face ZeroGPU Space; a no-op elsewhere."""
    try:
        import spaces  # type: ignore
    except ImportError:
        return lambda fn: fn
    return spaces.GPU(duration=duration)


def space_runtime() -> bool:
    """True when the `spaces` package is importable (ZeroGPU hardware)."""
    try:
        import spaces  # type: ignore  # noqa: F401
        return True
    except ImportError:
        return False


# --- streaming a run into the page ---------------------------------------------------------

def stream_records(cfg: RunConfig, items: list, path: str, progress, render: Callable,
                   stop: threading.Event | None = None, unit: str = "generation",
                   runner: Callable | None = None, request: gr.Request | None = None):
    """Run `items` into `path` in the worker process (or, on the in-process path, a thread) and
    yield `render(records, status, file)` as
    records arrive (throttled), then once more at the end. A Stop, closing the tab or a client
    that goes away ends the run within one decode step; the session's disk quota ends it too.
    A UserError is said in the status line and raised as gr.Error. Every finished record is in
    the file (written and flushed by run_many) whatever happens. `runner` replaces run_many
    (same arguments after the items), e.g. a length sweep; it must pickle (a module-level
    function, or a partial of one) to travel to the worker process.

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
    job.modes = list(modes_of(cfg))
    recs: deque = deque(maxlen=LIVE_ROWS)  # the newest rows; every record is in the file
    summary = RunningSummary()
    swap = swap_note(cfg)
    first = render([], status_md((swap + "  \n" if swap else "")
                                 + "Started: loading models and warming up if needed…", "run"),
                   gr.skip(), summary=summary)
    alive = tuple(gr.skip() for _ in first)
    yield first
    last_table = last_yield = last_disk = time.perf_counter()
    try:
        for batch in job.events():
            recs.extend(batch)
            for r in batch:
                summary.add(r)
            progress(job.fraction(per_item), desc=job.describe(unit))
            now = time.perf_counter()
            if now - last_disk >= DISK_EVERY_S:
                last_disk = now
                if guard.over_disk(folder):
                    full.set()
                    job.stop.set()
            if batch and now - last_table >= TABLE_EVERY_S:
                last_table = last_yield = now
                msg = f"Running: {summary.count} of {job.total} record(s) done… {summary.line()}"
                yield render(list(recs), status_md(msg, "run"), gr.skip(), summary=summary)
                # a yield turns the page's progress bar into a "generating" border: redraw it
                progress(job.fraction(per_item), desc=job.describe(unit))
            elif now - last_yield >= ALIVE_EVERY_S:
                last_yield = now
                yield alive  # lets gradio notice a client that went away
    except UserError as e:
        kept = f" {summary.count} finished record(s) are in the download." if recs else ""
        yield render(list(recs), status_md(md_text(ui_message(e)) + kept, "error"),
                     path if recs else None, summary=summary)
        raise user_error(e) from None
    except GeneratorExit:  # the client went away: its generation stops within a decode step
        job.stop.set()
        raise
    finally:
        if own_stop:
            clear_stop(request, stop)
    if full.is_set():
        msg = status_md(f"**Stopped:** this session's results reached the disk limit"
                        f" ({guard.limit('session_disk_mb')} MB, C2C_SESSION_DISK_MB) after"
                        f" {summary.count} record(s); download them and reload the page for a new"
                        " session.", "warn")
    elif (job.stop.is_set() or job.cancelled) and summary.count < job.total:
        during = stopped_during(job.phase)
        msg = status_md(f"**Stopped**{during} after {summary.count} of {job.total or '?'}"
                        " record(s); the finished ones are in the download.")
    else:
        secs = time.perf_counter() - job.started
        msg = status_md(f"**Done:** {summary.count} record(s) in {fmt_seconds(secs)}, written to"
                        f" `{os.path.basename(path)}`.", "ok")
    if summary.count > LIVE_ROWS:
        msg += f" The table shows the last {LIVE_ROWS}; the file holds them all."
    if summary.count:
        msg += f"  \n{summary.line()}"
    from ...report.summary import contention_files
    busy = contention_files({os.path.basename(path): list(summary.shares)})
    if busy:
        msg += "  \n" + status_md(busy, "warn")
    yield render(list(recs), msg, path if os.path.exists(path) else None, summary=summary)
