"""The C2C server's scheduler: requests arrive at any time, wait in a bounded queue, and join
the decode batch between steps (continuous batching over engines/fast/slots.py).

One thread owns the models. Each turn of its loop:
1. t2t requests whose note just ended, then queued requests in arrival order, are admitted while
   they fit (a free slot and columns for their prompt and tokens; the first that does not fit
   stops admission, so nobody is overtaken for ever). The admitted requests of one mode share one
   prefill (batched; c2c: the sharer's prefill and the projection, in the reference's order) and
   land in free slots.
2. Each model's slot group takes one decode step; every new token goes to its request's
   `on_token`, and a finished request frees its slot and gets `on_done` with its `Served`.

Modes: c2c, receiver and t2t answers decode in the receiver's group; sharer answers and t2t
notes in sharer 1's. A t2t request writes its note, then joins the receiver's queue with the
answer prompt built from it (plan.item.t2t_answer_ids), ahead of new arrivals.

Times are the host's perf_counter_ns: arrival (submit), admitted (its prefill starts), each
token read back (one read per step), end. queue_ms = admitted - arrival; TTFT = first token -
arrival; a t2t request's TTFT is its answer's first token (the note is its sharer phase).
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
import traceback
import warnings
from dataclasses import dataclass, field

import torch

from ..engines.fast.engine import engine_for
from ..engines.fast.slots import SlotGroup, prefill_c2c, prefill_plain, row_columns, slot_group
from ..engines.generation import run_metadata, sharers_of
from ..engines.shapes import bucket
from ..io.prompts import PromptItem
from ..io.records import MODES, percentile, r3
from ..measure import cancel
from ..measure.timing import Timer
from ..models.fusion import generators
from ..plan.item import build_plan, row_seed, t2t_answer_bound, t2t_answer_ids
from ..spec.errors import UserError

from .served import SERVED_KIND, QueueFull, Served, Ticket  # noqa: F401 (the server's API)


@dataclass
class _Request:
    sched: "Scheduler"
    served: Served
    item: PromptItem
    mode: str
    n_max: int
    plan: object
    on_token: object = None
    on_done: object = None
    phase: str = "queued"       # queued -> (note ->) answer -> done
    ids: list = field(default_factory=list)   # what the next admission prefills (t2t answer)
    cancelled: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    group: str | None = None
    slot: int | None = None
    note: list = field(default_factory=list)
    note_t0: int = 0


class Scheduler:
    """Continuous batching of requests in every mode over one loaded pipeline (module doc)."""

    def __init__(self, pipe, cfg, slots: int = 8, max_queue: int = 64, writer=None,
                 max_prompt_tokens: int = 512, modes: list[str] | None = None):
        """`modes`: serve only these (of those the pipeline can): only their slot groups are
        made, so a job that knows its modes (the app's Load tab) prepares no step it will not
        use; every mode the pipeline can serve by default (`serve`)."""
        if slots < 1 or slots > 256:
            raise UserError(f"--slots {slots} is out of range; use 1 to 256.")
        if max_queue < 0:
            raise UserError(f"--max_queue {max_queue} must be >= 0.")
        if max_prompt_tokens < 2:
            raise UserError(f"--max_prompt_tokens {max_prompt_tokens} must be >= 2.")
        self.pipe, self.cfg, self.slots, self.max_queue = pipe, cfg, slots, max_queue
        self.max_prompt_tokens = max_prompt_tokens
        self.max_new_tokens = cfg.gen.max_new_tokens
        self.writer = writer
        g = cfg.gen
        self.greedy = not g.do_sample
        has_sharer = bool(pipe.sharers)
        self.modes = [m for m in MODES if m == "receiver"
                      or (m == "c2c" and has_sharer and pipe.fuser is not None)
                      or (m in ("t2t", "sharer") and has_sharer)]
        if modes is not None:
            self.modes = [m for m in self.modes if m in modes]
        # what t2t adds to a prompt: the note instruction (sharer) and the answer template with
        # the note (receiver); measured on a one-word prompt
        self.extra = {m: 0 for m in self.modes}
        if "t2t" in self.modes:
            x = PromptItem(id=0, prompt="x", source="serve")
            one = len(build_plan(pipe, cfg, x, "receiver").ids)
            self.extra["t2t"] = max(len(build_plan(pipe, cfg, x, "t2t").ids) - one, 0)
            self._answer_extra = max(t2t_answer_bound(pipe, cfg, x) - one, 0)
        else:
            self._answer_extra = 0
        groups = {}
        if {"c2c", "receiver", "t2t"} & set(self.modes):  # t2t answers on the receiver
            groups["receiver"] = bucket(max_prompt_tokens + self._answer_extra
                                        + self.max_new_tokens)
        if has_sharer and {"sharer", "t2t"} & set(self.modes):
            groups["sharer"] = bucket(max_prompt_tokens + self.extra.get("t2t", 0)
                                      + max(self.max_new_tokens, g.t2t_note_tokens))
        eng = engine_for(pipe)
        n0, s0 = eng.prepared, eng.compile_s
        self.groups = {role: slot_group(pipe, role, slots, L, self.greedy)
                       for role, L in groups.items()}
        #: what making the groups prepared (0 when groups of this shape were kept from an
        #: earlier server in this process): the records' run.prepared_shapes and compile_s
        self._prepared = (eng.prepared - n0, round(eng.compile_s - s0, 3))
        self._queue: collections.deque = collections.deque()
        self._answers: collections.deque = collections.deque()   # t2t notes done
        self._cv = threading.Condition()
        #: a fast tokenizer used from two threads at once can fail ("Already borrowed"):
        #: callers' submits and the engine's t2t answers and records take turns
        self.tok_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._closed = False
        self._thread: threading.Thread | None = None
        self.counts = collections.Counter()
        self.error: str | None = None
        self._meta = None

    # --- the caller's side ----------------------------------------------------------------------

    def tokenizer(self, mode: str):
        """The tokenizer of the model that writes `mode`'s answer."""
        return self.pipe.sharers[0].tokenizer if mode == "sharer" else self.pipe.tokenizer

    def decode(self, mode: str, ids: list[int], skip_special_tokens: bool = True) -> str:
        """`mode`'s answer ids as text (under the tokenizer lock)."""
        with self.tok_lock:
            return self.tokenizer(mode).decode(ids, skip_special_tokens=skip_special_tokens)

    def submit(self, mode: str, item: PromptItem | str, max_new_tokens: int | None = None,
               on_token=None, on_done=None) -> Ticket:
        """Queue one request (module doc); raises QueueFull or a one-sentence UserError."""
        arrival = time.perf_counter_ns()
        if mode not in self.modes:
            raise UserError(f"Unknown model {str(mode)[:40]!r}; this server serves"
                            f" {', '.join(self.modes)}.")
        n = self.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
        if not 1 <= n <= self.max_new_tokens:
            raise UserError(f"max_tokens={n} is out of range; this server generates 1 to"
                            f" {self.max_new_tokens} tokens (its --max_new_tokens).")
        rid = f"req-{next(self._ids)}"
        if isinstance(item, str):
            item = PromptItem(id=rid, prompt=item, source="serve")
        if not self.running:
            raise UserError("The server is not running (it was closed or its engine failed);"
                            " restart it.")
        with self.tok_lock:
            plan = build_plan(self.pipe, self.cfg, item, mode)
        over = len(plan.ids) - self.extra[mode] > self.max_prompt_tokens
        if mode == "t2t":
            with self.tok_lock:
                bound = t2t_answer_bound(self.pipe, self.cfg, item)
            over |= bound - self._answer_extra > self.max_prompt_tokens
        if over:
            raise UserError(f"The prompt is {len(plan.ids) - self.extra[mode]} tokens, over this"
                            f" server's --max_prompt_tokens {self.max_prompt_tokens}; send a"
                            " shorter prompt or restart the server with a larger limit.")
        served = Served(rid, mode, len(plan.ids), arrival_ns=arrival)
        req = _Request(self, served, item, mode, n, plan, on_token, on_done, ids=list(plan.ids))
        with self._cv:
            if len(self._queue) >= self.max_queue:
                self.counts["rejected"] += 1
                raise QueueFull(f"The queue is full ({self.max_queue} requests waiting); retry"
                                " later or send requests more slowly.")
            self._queue.append(req)
            self.counts["submitted"] += 1
            self._cv.notify()
        return Ticket(req)

    def stats(self) -> dict:
        active = sum(len(g.active) for g in self.groups.values())
        return {"slots": self.slots, "active": active, "queued": len(self._queue),
                "served": self.counts["served"], "rejected": self.counts["rejected"],
                "aborted": self.counts["aborted"], "failed": self.counts["failed"],
                "steps": sum(g.steps for g in self.groups.values()),
                "modes": list(self.modes)}

    @property
    def running(self) -> bool:
        return not self._closed and self.error is None

    def start(self) -> "Scheduler":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="c2c-scheduler",
                                            daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
        for req in list(self._queue) + list(self._answers):
            self._finish(req, "abort")
        self._queue.clear()
        self._answers.clear()
        for g in self.groups.values():
            for req in g.owners():
                g.release(g.slot_of(req))
                self._finish(req, "abort")
            g.in_use = False

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify()

    # --- the engine's side -----------------------------------------------------------------------

    def _loop(self) -> None:
        from ..measure.timing import on_device
        with on_device(self.pipe.device):
            while True:
                with self._cv:
                    while (not self._closed and not self._queue and not self._answers
                           and not any(g.active for g in self.groups.values())):
                        self._cv.wait(0.5)
                    if self._closed:
                        return
                try:
                    self.turn()
                except Exception as e:  # noqa: BLE001 - every request gets a sentence
                    self.error = f"{type(e).__name__}: {str(e)[:300]}"
                    warnings.warn(f"C2C server engine failed: {self.error}\n"
                                  + traceback.format_exc(limit=8))
                    self._fail_all()
                    return

    def turn(self) -> None:
        """One turn of the loop (module doc): admissions, then one step per busy group. Tests
        call it directly to put arrivals at chosen steps."""
        with torch.inference_mode():
            self._drop_cancelled()
            self._admit()
            for role, g in self.groups.items():
                if g.active:
                    self._step(role, g)

    def _drop_cancelled(self) -> None:
        with self._cv:
            for dq in (self._queue, self._answers):
                keep = [r for r in dq if not r.cancelled]
                for r in dq:
                    if r.cancelled:
                        self._finish(r, "abort")
                dq.clear()
                dq.extend(keep)
        for g in self.groups.values():
            for req in g.owners():
                if req.cancelled:
                    g.release(g.slot_of(req))
                    self._finish(req, "abort")

    def _target(self, req: _Request) -> tuple[str, int]:
        """(group, tokens it may write there) of a request's next phase."""
        if req.mode == "sharer":
            return "sharer", req.n_max
        if req.mode == "t2t" and req.phase == "queued":
            return "sharer", self.cfg.gen.t2t_note_tokens
        return "receiver", req.n_max

    def _admit(self) -> None:
        picked: dict[str, list] = collections.defaultdict(list)
        needs: dict[str, list] = collections.defaultdict(list)
        with self._cv:
            for dq in (self._answers, self._queue):
                while dq:
                    req = dq[0]
                    role, n = self._target(req)
                    g = self.groups[role]
                    if not g.fits(needs[role] + [(len(req.ids) - 1, n)]):
                        break  # first come, first served: nobody overtakes it
                    needs[role].append((len(req.ids) - 1, n))
                    picked[role].append(dq.popleft())
                if dq:
                    break
        for role, reqs in picked.items():
            g = self.groups[role]
            g.make_room(needs[role])
            by_kind = collections.defaultdict(list)
            for req in reqs:
                by_kind[self._kind(req)].append(req)
            for kind, rs in by_kind.items():
                self._prefill(role, g, kind, rs)

    @staticmethod
    def _kind(req: _Request) -> str:
        if req.mode == "t2t":
            return "note" if req.phase == "queued" else "answer"
        return req.mode

    def _prefill(self, role: str, g: SlotGroup, kind: str, reqs: list) -> None:
        """One batched prefill of arrivals of one kind; each lands in a slot of `g`."""
        now = time.perf_counter_ns()
        for r in reqs:
            if kind != "answer":
                r.served.admitted_ns = now
            r.served.batch = len(reqs)
        timer = Timer(self.pipe.device)
        calls = {}
        if kind == "c2c":
            cache, rows, calls = prefill_c2c(self.pipe, self.cfg, [r.plan for r in reqs], True,
                                             timer)
        elif kind == "receiver":
            cache, rows, _ = prefill_c2c(self.pipe, self.cfg, [r.plan for r in reqs], False,
                                         timer)
        elif kind == "answer":
            plans = [_Ids(r.ids) for r in reqs]
            cache, rows, _ = prefill_c2c(self.pipe, self.cfg, plans, False, timer)
        else:  # sharer answers, t2t notes
            cache, rows = prefill_plain(self.pipe, "sharer", [r.ids for r in reqs], timer)
        stages = timer.finish()
        stage_ms = {_STAGE_FIELD[k]: r3(sum(v)) for k, v in stages.items()
                    if k in _STAGE_FIELD and v}
        if calls:
            stage_ms["projector_calls"] = int(sum(calls.values()))
        for i, r in enumerate(reqs):
            lo, hi, ok, last = row_columns(rows, i)
            if kind == "note":
                n, eos = self.cfg.gen.t2t_note_tokens, self.pipe.sharers[0].eos_ids
                r.note_t0 = time.perf_counter_ns()
            else:
                n, eos = r.n_max, (set() if self.cfg.gen.ignore_eos else r.plan.eos)
            gen = None
            if not self.greedy:
                gen = generators(self.pipe.device, [row_seed(self.cfg.gen.seed, r.served.rid,
                                                             1 if kind == "answer" else 0)])[0]
            for k, v in stage_ms.items():
                r.served.stages[k] = r3(r.served.stages.get(k, 0) + v)
            r.group, r.phase = role, ("note" if kind == "note" else "answer")
            r.slot = g.place(cache, i, lo, hi, ok, last, r, n, eos, gen)
        del cache

    def _step(self, role: str, g: SlotGroup) -> None:
        out = g.step(self.cfg.gen)
        t = time.perf_counter_ns()
        for req, tok, end in out:
            if req.phase == "note":
                req.note.append(tok)
                if end:
                    req.served.stages["sharer_decode_ms"] = r3((t - req.note_t0) / 1e6)
                    req.served.note_tokens = len(req.note)
                    with self.tok_lock:
                        req.ids = t2t_answer_ids(self.pipe, self.cfg, req.item, req.note)
                    req.phase, req.slot = "queued-answer", None
                    with self._cv:
                        self._answers.append(req)
                continue
            sv = req.served
            if not sv.first_ns:
                sv.first_ns = t
            sv.tokens.append(tok)
            sv.token_ns.append(t)
            if req.on_token is not None:
                try:
                    req.on_token([tok])
                except Exception:  # noqa: BLE001 - a client's callback never stops the engine
                    req.cancelled = True
            if end:
                self._finish(req, end)

    def _finish(self, req: _Request, reason: str, error: str | None = None) -> None:
        if req.done.is_set():
            return
        sv = req.served
        sv.end_ns = time.perf_counter_ns()
        sv.finish_reason = reason
        sv.error = error
        self.counts[{"abort": "aborted", "error": "failed"}.get(reason, "served")] += 1
        if reason in ("stop", "length"):
            sv.record = self._record(req)
            if self.writer is not None:
                self.writer.write(sv.record)
        req.done.set()
        if req.on_done is not None:
            try:
                req.on_done(sv)
            except Exception:  # noqa: BLE001
                pass

    def _fail_all(self) -> None:
        msg = ("The server's engine failed; restart the server (its log has the cause).")
        with self._cv:
            reqs = list(self._queue) + list(self._answers)
            self._queue.clear()
            self._answers.clear()
        for g in self.groups.values():
            for req in g.owners():
                reqs.append(req)
                g.release(g.slot_of(req))
        for r in reqs:
            self._finish(r, "error", msg)

    # --- records -----------------------------------------------------------------------------

    def _record(self, req: _Request) -> dict:
        """The served request as a record of the JSONL family (kind "served")."""
        sv = req.served
        if self._meta is None:
            self._meta = run_metadata(self.pipe, self.cfg, Timer(self.pipe.device).method)
            self._meta["prepared_shapes"], self._meta["compile_s"] = self._prepared
            self._meta["slots"] = self.slots
            self._meta["max_queue"] = self.max_queue
        itl = [r3(x) for x in sv.itl_ms]
        timing = {"queue_ms": r3(sv.queue_ms or 0.0), "ttft_ms": r3(sv.ttft_ms or 0.0),
                  "e2e_ms": r3(sv.e2e_ms or 0.0),
                  "tpot_ms": r3(sv.tpot_ms) if sv.tpot_ms is not None else None,
                  "itl_p50_ms": r3(percentile(itl, 50)) if itl else None,
                  "itl_p99_ms": r3(percentile(itl, 99)) if itl else None,
                  # decode per token as this request saw it: its TPOT (steps shared with the
                  # other requests decoding beside it, and admissions between them)
                  "decode_avg_ms": r3(sv.tpot_ms) if sv.tpot_ms is not None else None,
                  "tokens_per_second": (r3(1000.0 / sv.tpot_ms) if sv.tpot_ms else None),
                  "prompt_tokens": sv.prompt_tokens, "num_generated_tokens": len(sv.tokens),
                  "prefill_batch": sv.batch, **sv.stages}
        if req.mode == "t2t":
            timing["sharer_tokens"] = sv.note_tokens
        rec = {"kind": SERVED_KIND, "id": sv.rid, "mode": req.mode, "repeat": 0,
               "prompt": req.item.prompt,
               "response": self.decode(req.mode, sv.tokens),
               "finish_reason": sv.finish_reason, "input_digest": req.item.digest,
               "timing": timing, "itl_ms": itl, "run": self._meta}
        if req.mode == "c2c":
            rec["sharers"] = sharers_of(self.pipe, req.plan)
        return rec


@dataclass
class _Ids:
    """A receiver-alone plan of given ids (a t2t answer)."""
    ids: list
    pad: None = None


#: The timer's stages -> the served record's stage fields (records.TIMING's names).
_STAGE_FIELD = {"base_embedding": "base_embedding_ms", "base_prefill": "base_prefill_ms",
                "teacher_embedding": "teacher_embedding_ms",
                "teacher_prefill": "teacher_prefill_ms", "projection": "projector_total_ms"}


def load_scheduler(cfg, slots: int = 8, max_queue: int = 64, max_prompt_tokens: int = 512,
                   writer=None, warm: bool = True) -> Scheduler:
    """Load cfg's models, make the slot groups (their decode steps prepared: nothing compiles
    while serving), run one unrecorded request per mode, and start the loop."""
    from ..models.loading import load_announced
    if cfg.engine == "eager":
        raise UserError("The server batches requests on the fast engine; drop --engine eager"
                        " (or use --engine fast).")
    if cfg.engine != "fast":  # auto: what the scheduler runs is the fast engine, say so
        from dataclasses import replace
        cfg = replace(cfg, engine="fast")
    pipe = load_announced(cfg)
    sched = Scheduler(pipe, cfg, slots, max_queue, writer, max_prompt_tokens)
    if warm:
        w, sched.writer = sched.writer, None
        try:
            for k, mode in enumerate(sched.modes, 1):  # each path's first call (allocations)
                cancel.say(f"warm-up request {k} of {len(sched.modes)} ({mode}, not recorded)")
                t = sched.submit(mode, PromptItem(id="warm-up", prompt="Hello.",
                                                  source="serve"), 2)
                while not t._req.done.is_set():
                    sched.turn()
        finally:
            sched.writer = w
        sched.counts.clear()
        sched._ids = itertools.count(1)
    return sched.start()
