"""Data-parallel `batch` / `dataset` / `sweep` runs under `torchrun`, each record exactly once.

`torchrun --nproc_per_node N -m c2c_core dataset ...` starts N copies of the CLI. Each one is a
rank: it loads the models on its own device (`cuda:LOCAL_RANK`, or the CPU with the cores split
between the ranks of its node), warms up, then takes work *units* one at a time from an atomic
counter in the rendezvous store (`store.add`), so a fast rank simply takes more. A unit is one
batch of `--batch_size` prompts with all their modes and repeats (the modes stay interleaved
per batch, as in a one-process run), or one (input length, output length, batch size) shape of
a sweep.

One writer per output: rank 0 locks `--output` (the same lock a one-process run takes) before
it plans, and holds it until the merge is written; a second launch on the same output, torchrun
or not, is refused at once. Every rank appends its records to its own part file,
`<output>.parts/rank-<R>-<run id>.jsonl` (flushed per record). When all ranks have finished,
rank 0 checks that every planned generation is there exactly once and appends the records to
`--output` in source order: the output is never replaced (a fresh run truncates it in place,
under the lock), and the merge removes only the part files it merged. It refuses, in one
sentence naming them, when records are missing or doubled, and then keeps the parts.
`--resume` counts the records in `--output` and in the parts as done, keyed like a one-process
--resume (input digest, mode, repeat), and refuses a file made with other settings.

All ranks must see the same `--output` folder (one box, or a filesystem all nodes share); rank 0
checks that at the start. Only the store is used to coordinate (no collectives). Every rank
beats a heartbeat counter in the store; every wait gives up with one sentence when a rank it
waits on has not beaten for `C2C_DIST_DEAD_S` seconds (default 120: a dead remote node).

Kept as one module (over 500 lines) on purpose: the work queue, heartbeats, part files and
the exactly-once merge are one protocol over the rendezvous store; its invariants read in one file.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any, Callable, Iterable

from ..spec.errors import UserError
from ..io.records import Done, JsonlWriter, iter_jsonl, sweep_id

#: Commands that run under torchrun; the others are one-process commands.
DISTRIBUTED_COMMANDS = ("batch", "dataset", "sweep")
POLL_S = 0.2
#: Seconds between a rank's heartbeats, and without one after which a waiting rank gives up.
BEAT_S = 2.0
DEAD_S = float(os.environ.get("C2C_DIST_DEAD_S", 120))
#: The longest rank 0 may take to plan (lock, read the output and parts) before the others
#: give up on it even while it beats.
PLAN_WAIT_S = float(os.environ.get("C2C_DIST_PLAN_S", 600))


# --- environment ---------------------------------------------------------------------------

@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int


def dist_env(environ=None) -> DistEnv | None:
    """The torchrun rank of this process, or None when not started by torchrun."""
    env = os.environ if environ is None else environ
    if not all(k in env for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        return None
    try:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = int(env["LOCAL_RANK"])
        local_world = int(env.get("LOCAL_WORLD_SIZE", world))
    except ValueError:
        raise UserError("RANK, WORLD_SIZE and LOCAL_RANK must be integers; start the run with"
                        " torchrun, which sets them.") from None
    if not 0 <= rank < world:
        raise UserError(f"RANK={rank} is outside WORLD_SIZE={world}; start the run with torchrun.")
    return DistEnv(rank, world, local, max(local_world, 1))


def active() -> bool:
    return dist_env() is not None


def check_command(command: str) -> None:
    """Refuse commands that are not data-parallel when started by torchrun."""
    if active() and command not in DISTRIBUTED_COMMANDS:
        raise UserError(f"'{command}' runs in one process; start it with python -m c2c_core,"
                        f" not torchrun (torchrun runs {', '.join(DISTRIBUTED_COMMANDS)}).")


def split_threads(local_world_size: int, cores: int | None = None) -> int:
    """CPU threads per rank: this machine's cores shared evenly by the ranks on it."""
    if cores is None:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # pragma: no cover - not Linux
            cores = os.cpu_count() or 1
    return max(1, cores // max(local_world_size, 1))


def rank_device(requested: str, local_rank: int) -> str:
    """`cuda:LOCAL_RANK` for auto/cuda when a GPU is visible; an explicit device is kept."""
    import torch
    if requested in (None, "", "auto", "cuda"):
        if torch.cuda.is_available():
            n = torch.cuda.device_count()
            if local_rank >= n:
                raise UserError(f"LOCAL_RANK {local_rank} has no GPU (this node sees {n}); start"
                                f" at most {n} processes per node (--nproc_per_node {n}).")
            return f"cuda:{local_rank}"
        if requested == "cuda":
            raise UserError("--device cuda asked for CUDA, but no CUDA GPU is visible; use"
                            " --device cpu.")
        return "cpu"
    return requested


# --- work units and record keys -------------------------------------------------------------

def record_key(rec: dict) -> tuple[str, str, str]:
    """(id, mode, repeat) of a record: how a run's planned generations are checked off."""
    return (str(rec.get("id")), rec.get("mode", "c2c"), str(rec.get("repeat", 0) or 0))


@dataclass
class Unit:
    """One piece of work handed to one rank: a batch of prompts (all modes and repeats) or a
    sweep shape."""

    id: str
    keys: list[tuple[str, str, str]]  # the records it makes (id, mode, repeat), in source order
    text: str  # what it runs (prompt texts or shape), for the check that ranks agree
    payload: Any = None  # the items (prompts) or (input length, output length, batch size)
    digests: dict[str, str | None] = field(default_factory=dict)  # id -> input digest


def item_units(items: Iterable, modes: list[str], repeats: int, batch_size: int = 1) -> list[Unit]:
    """One unit per `batch_size` prompts in source order; ids filled in by position (1-based)
    as run_many does. A unit's records: per repeat, modes interleaved, as a batch runs them."""
    from ..bench.runner import to_item
    its = []
    for i, x in enumerate(items):
        it = to_item(x)
        if it.id is None:
            it = replace(it, id=i + 1)
        its.append(it)
    _check_unique([str(it.id) for it in its])
    units = []
    for k in range(0, len(its), max(batch_size, 1)):
        chunk = its[k:k + max(batch_size, 1)]
        keys = [(str(it.id), m, str(r)) for r in range(repeats) for m in modes for it in chunk]
        units.append(Unit(str(chunk[0].id), keys, json.dumps([it.prompt for it in chunk]), chunk,
                          {str(it.id): it.digest for it in chunk}))
    return units


def sweep_units(input_lens: list[int], output_lens: list[int], modes: list[str],
                repeats: int, batch_sizes: list[int] | None = None) -> list[Unit]:
    """One unit per shape, in run_sweep's order (output length, batch size, input length),
    holding the batch's rows ('in<N>-out<M>-b<B>.<row>' for B > 1)."""
    units = []
    for m in output_lens:
        for b in batch_sizes or [1]:
            for n in input_lens:
                rows = [sweep_id(n, m, b, i) for i in range(b)]
                keys = [(rid, md, str(r)) for r in range(repeats) for md in modes for rid in rows]
                units.append(Unit(rows[0], keys, rows[0], (n, m, b), dict.fromkeys(rows)))
    _check_unique([u.id for u in units])
    return units


def _check_unique(ids: list[str]) -> None:
    seen: dict[str, int] = {}
    dup = []
    for i in ids:
        seen[i] = seen.get(i, 0) + 1
        if seen[i] == 2:
            dup.append(i)
    if dup:
        raise UserError(f"Prompt id(s) {_fmt_ids(dup)} occur more than once, so a distributed run"
                        " cannot check each record exactly once; give every row a unique id.")


def _fmt_ids(ids: list, limit: int = 10) -> str:
    shown = ", ".join(str(i) for i in ids[:limit])
    return shown + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def _fmt_keys(keys: list[tuple], limit: int = 8) -> str:
    shown = ", ".join(f"{i} {m} #{r}" for i, m, r in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def fingerprint(units: list[Unit], extra: Any = None) -> str:
    h = hashlib.sha256(json.dumps([[u.id, u.text, u.keys] for u in units] + [extra],
                                  default=str).encode())
    return h.hexdigest()[:16]


# --- files ---------------------------------------------------------------------------------

def parts_dir(output: str) -> str:
    return os.fspath(output) + ".parts"


def part_path(output: str, rank: int, run_id: str) -> str:
    """This run's part file of one rank: the run id in the name, so parts of two runs never mix
    and a merge removes only what it merged."""
    return os.path.join(parts_dir(output), f"rank-{rank:05d}-{run_id}.jsonl")


def part_files(output: str) -> list[str]:
    d = parts_dir(output)
    if not os.path.isdir(d):
        return []
    return sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".jsonl"))


def _read(paths: list[str]) -> list[dict]:
    return [r for p in paths for r in iter_jsonl(p)]


@dataclass
class Plan:
    """What rank 0 decided before any rank takes work; every rank gets it through the store."""

    run_id: str
    n_units: int
    pending: list[int]  # unit indices still to run, in source order
    done: dict[int, list[list[str]]] = field(default_factory=dict)  # partly done units
    fingerprint: str = ""
    skipped: int = 0  # records found done (--resume)
    inherited: list[str] = field(default_factory=list)  # part files of earlier runs (--resume)
    note: str = ""  # Done.note() of the resumed file

    def to_json(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def from_json(cls, s: str | bytes) -> "Plan":
        d = json.loads(s)
        d["done"] = {int(k): v for k, v in d["done"].items()}
        return cls(**d)


def make_plan(output: str, units: list[Unit], resume: bool, fp: str = "",
              truncate: bool = False, check: Callable[[Done], None] | None = None) -> Plan:
    """Rank 0, holding the output's lock: prepare the parts folder and pick the units to run;
    `truncate` (a run without --append or --resume) empties the output in place, as a
    one-process run overwrites it. `check` sees what --resume found done (records of other
    settings are refused there) before anything is written.

    Without --resume, a parts folder holding records of an unfinished run is refused rather than
    overwritten. With --resume, records in --output and in the parts count as done, keyed by
    (input digest, mode, repeat) as a one-process --resume (records.Done)."""
    pdir = parts_dir(output)
    existing = part_files(output)
    if not resume:
        n = len(_read(existing))
        if n:
            raise UserError(f"{pdir} holds {n} record(s) of an unfinished distributed run; rerun"
                            " with --resume to finish it, or delete that folder to start over.")
        for p in existing:  # empty parts of a run that died before writing
            os.remove(p)
        existing = []
    done = Done()
    if resume:
        if os.path.exists(output):
            for r in iter_jsonl(output, skip_bad_lines=True):
                done.add(r)
        for r in _read(existing):
            done.add(r)
        if check is not None:
            check(done)
    os.makedirs(pdir, exist_ok=True)
    pending, partial, skipped = [], {}, 0
    for i, u in enumerate(units):
        have = [k for k in u.keys if done.take(u.digests.get(k[0]), k[0], k[1], k[2])]
        skipped += len(have)
        if len(have) < len(u.keys):
            pending.append(i)
            if have:
                partial[i] = [list(k) for k in have]
    if truncate and os.path.exists(output):
        with open(output, "r+", encoding="utf-8") as f:
            f.truncate(0)
    plan = Plan(uuid.uuid4().hex[:12], len(units), pending, partial, fp, skipped, existing,
                done.note())
    with open(os.path.join(pdir, "RUN"), "w", encoding="utf-8") as f:
        f.write(plan.run_id + "\n")
    return plan


def check_parts_visible(output: str, run_id: str, rank: int, wait_s: float = 10.0) -> None:
    """A rank on another node must see the folder rank 0 made (a shared filesystem)."""
    path = os.path.join(parts_dir(output), "RUN")
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with open(path, encoding="utf-8") as f:
                if f.read().strip() == run_id:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            import socket
            raise UserError(f"Rank {rank} on {socket.gethostname()} cannot see {path} that rank 0"
                            " wrote; put --output on a filesystem all nodes share.")
        time.sleep(POLL_S)


# --- merge ---------------------------------------------------------------------------------

@dataclass
class MergeResult:
    records: list[dict]  # this run's new records in source order (appended to --output)
    kept_before: int  # records of --output kept in front (--append, --resume)
    extra: int  # records of earlier runs' parts (a resumed run's) appended before them
    per_rank: dict[int, int]  # this run's records per rank


def _line(r: dict) -> str:
    return json.dumps(r, sort_keys=True, ensure_ascii=False)


def merge(output: str, units: list[Unit], plan: Plan, fresh: bool = True,
          counts: dict[int, int] | None = None) -> MergeResult:
    """Append this run's part records to `output`, each planned generation exactly once,
    together with the records of earlier runs' parts a --resume counted as done, all in source
    order.

    `output` is written in place, never replaced: the caller holds its lock (a fresh run
    truncates it first). Raises UserError (parts kept, `output` untouched) when a generation is
    missing or doubled, or when a rank reported more records than its part holds. Identical
    lines (a merge interrupted after writing) count once. Removes only the part files merged."""
    pdir = parts_dir(output)
    mine = [p for p in part_files(output) if p.endswith(f"-{plan.run_id}.jsonl")]
    inherited = [p for p in plan.inherited if os.path.exists(p)]
    new = _read(mine)
    per_rank: dict[int, int] = {}
    for r in {_line(r): r for r in new}.values():
        run = r.get("run") if isinstance(r.get("run"), dict) else {}
        if run.get("run_id") == plan.run_id:
            per_rank[run.get("rank")] = per_rank.get(run.get("rank"), 0) + 1
    for rank, n in sorted((counts or {}).items()):
        if per_rank.get(rank, 0) < n:
            raise UserError(
                f"Merge refused: rank {rank} wrote {n} record(s) but rank 0 finds"
                f" {per_rank.get(rank, 0)} in {pdir}; put --output on a filesystem all nodes"
                " share (the parts are kept).")

    done = {i: {tuple(k) for k in ks} for i, ks in plan.done.items()}
    expected = [k for i in plan.pending for k in units[i].keys if k not in done.get(i, set())]
    want = set(expected)
    by_key: dict[tuple, list[dict]] = {}
    seen: set[str] = set()
    for r in new:
        line = _line(r)
        if line in seen:
            continue
        seen.add(line)
        by_key.setdefault(record_key(r), []).append(r)
    missing = [k for k in expected if not by_key.get(k)]
    doubled = [k for k in expected if len(by_key.get(k, [])) > 1]
    stray = [k for k in by_key if k not in want]
    if missing or doubled or stray:
        what = []
        if missing:
            what.append(f"{len(missing)} of {len(expected)} record(s) missing ({_fmt_keys(missing)})")
        if doubled:
            what.append(f"{len(doubled)} record(s) doubled ({_fmt_keys(doubled)})")
        if stray:
            what.append(f"{len(stray)} record(s) this run did not plan ({_fmt_keys(stray)})")
        fix = ("rerun with --resume to run the missing ones" if not (doubled or stray) else
               "delete the extra lines from the part files, then rerun with --resume")
        raise UserError(f"Merge refused: {' and '.join(what)}; the parts in {pdir} are kept,"
                        f" {fix}.")

    prior = [] if fresh or not os.path.exists(output) else \
        [_line(r) for r in iter_jsonl(output, skip_bad_lines=True)]
    before, have = len(prior), set(prior)
    earlier = []  # an earlier (resumed) run's records not yet in the output
    for r in _read(inherited):
        line = _line(r)
        if line not in have:
            have.add(line)
            earlier.append(r)
    ordered = [by_key[k][0] for k in expected]
    # the resumed run's records and this run's, together in source order (a killed run resumed
    # into an empty output reads as one run's file); any of other prompts after them
    place = {k: i for i, k in enumerate(k for u in units for k in u.keys)}
    merged = sorted(earlier + ordered, key=lambda r: place.get(record_key(r), len(place)))
    if fresh:
        with open(output, "r+" if os.path.exists(output) else "w", encoding="utf-8") as f:
            f.truncate(0)
    with JsonlWriter(output, append=True) as w:
        for r in merged:
            w.write(r)
    for p in mine + inherited + [os.path.join(pdir, "RUN")]:
        try:
            os.remove(p)
        except OSError:
            pass
    try:
        os.rmdir(pdir)  # only when nothing else is left in it
    except OSError:
        pass
    return MergeResult(ordered, before, len(earlier), per_rank)


# --- the run -------------------------------------------------------------------------------

class _Store:
    """Keys of this run in torch.distributed's default store (the rendezvous store), with a
    heartbeat per rank and waits that give up on a rank that stopped beating."""

    def __init__(self, store, prefix: str, rank: int = 0, world_size: int = 1):
        self.s, self.p = store, prefix
        self.rank, self.world = rank, world_size
        self._seen: dict[int, tuple[int, float]] = {}  # rank -> (last beat count, when seen)
        self._stop = threading.Event()

    def _op(self, fn, *a):
        try:
            return fn(*a)
        except (RuntimeError, OSError) as e:  # DistStoreError is a RuntimeError
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(f"Rank {self.rank} lost the rendezvous store ({why}); rank 0 or its"
                            " node stopped. Records written are kept in the parts; rerun with"
                            " --resume.") from None

    def add(self, key: str, n: int) -> int:
        return int(self._op(self.s.add, self.p + key, n))

    def set(self, key: str, value: str) -> None:
        self._op(self.s.set, self.p + key, value)

    def start_beating(self) -> "_Store":
        def beat():
            while not self._stop.wait(BEAT_S):
                try:
                    self.s.add(f"{self.p}beat/{self.rank}", 1)
                except Exception:  # noqa: BLE001 - the store is gone: the waits say so
                    return
        self.s.add(f"{self.p}beat/{self.rank}", 1)
        threading.Thread(target=beat, daemon=True, name="c2c-heartbeat").start()
        return self

    def stop_beating(self) -> None:
        self._stop.set()

    def check_alive(self, ranks: Iterable[int], what: str) -> None:
        """Raise when one of `ranks` has not beaten for DEAD_S seconds."""
        now = time.monotonic()
        for r in ranks:
            n = self.add(f"beat/{r}", 0)
            last = self._seen.get(r)
            if last is None or last[0] != n:
                self._seen[r] = (n, now)
            elif now - last[1] > DEAD_S:
                raise UserError(
                    f"Rank {r} has not been heard from for {now - last[1]:.0f} s while rank"
                    f" {self.rank} waits for {what}; its process or node died or hangs. Records"
                    " already written are kept in the parts: stop the run and rerun with"
                    " --resume (C2C_DIST_DEAD_S sets this timeout).")

    def wait_get(self, key: str, ranks: Iterable[int], what: str,
                 limit_s: float | None = None) -> str:
        """The value of `key` once set; gives up when a rank in `ranks` (those that could still
        set it) stops beating, or after `limit_s`."""
        k = self.p + key
        t0 = time.monotonic()
        ranks = list(ranks)
        while not self._op(self.s.check, [k]):
            self.check_alive(ranks, what)
            if limit_s is not None and time.monotonic() - t0 > limit_s:
                raise UserError(f"Rank {self.rank} waited {limit_s:.0f} s for {what}; rank 0"
                                " is stuck. Stop the run and rerun with --resume.")
            time.sleep(POLL_S)
        return self._op(self.s.get, k).decode()


def _init(env: DistEnv, device: str):
    import torch
    import torch.distributed as dist
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    timeout = timedelta(seconds=float(os.environ.get("C2C_DIST_TIMEOUT_S", 6 * 3600)))
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timeout)
    store = dist.distributed_c10d._get_default_store()
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return _Store(store, f"c2c/{attempt}/", env.rank, env.world_size).start_beating()


def run(args, cfg, units: list[Unit], kind: str, sweep_html: str | None = None) -> int:
    """The torchrun path of batch/dataset (`kind` "items") and sweep (`kind` "sweep")."""
    import torch.distributed as dist

    env = dist_env()
    assert env is not None
    device = rank_device(cfg.device, env.local_rank)
    threads = cfg.threads or split_threads(env.local_world_size)
    cfg = replace(cfg, device=device, threads=threads)
    output = os.path.abspath(args.output)
    store = _init(env, device)
    everyone = range(env.world_size)
    try:
        plan = _agree_on_plan(store, env, output, units, args, cfg, kind)
        n = _work(store, env, cfg, units, plan, output, kind)
        store.set(f"count/{env.rank}", str(n))
        store.set(f"end/{env.rank}", repr(time.time()))
        store.add("finished", 1)
        if env.rank != 0:
            result = json.loads(store.wait_get("result", [0], "rank 0's merge"))
            if not result["ok"]:
                raise UserError(f"rank 0 refused the merge: {result['message']}")
            return 0
        _wait_all(store, env, plan)
        counts = {r: int(store.wait_get(f"count/{r}", [r], f"rank {r}'s count"))
                  for r in everyone}
        # the work phase: from the first rank ready (loaded, warmed up) to the last one done
        work_s = (max(float(store.wait_get(f"end/{r}", [r], "the ranks' end")) for r in everyone)
                  - min(float(store.wait_get(f"ready/{r}", [r], "the ranks' start"))
                        for r in everyone))
        try:
            res = merge(output, units, plan, fresh=False, counts=counts)  # truncated at plan
        except UserError as e:
            store.set("result", json.dumps({"ok": False, "message": str(e)}))
            raise
        store.set("result", json.dumps({"ok": True, "message": ""}))
        _report(args, res, plan, env, counts, work_s, sweep_html)
        return 0
    finally:
        store.stop_beating()
        if dist.is_initialized():
            dist.destroy_process_group()


def _agree_on_plan(store: _Store, env: DistEnv, output: str, units: list[Unit], args,
                   cfg, kind: str) -> Plan:
    extra = [cfg.mode, cfg.repeats, cfg.gen.max_new_tokens, cfg.receiver.source,
             cfg.sharer.source, cfg.batch_size, output]
    fp = fingerprint(units, extra)
    if env.rank == 0:
        try:
            # one writer per output: held until this process ends (after the merge)
            from ..io.fileio import lock_output
            from ..bench.runner import check_resume_settings
            args._output_lock = lock_output(output)
            plan = make_plan(output, units, resume=args.resume, fp=fp,
                             truncate=not (args.resume or args.append),
                             check=lambda done: check_resume_settings(
                                 done, args.output, cfg, sweep=kind == "sweep"))
        except UserError as e:
            store.set("plan", json.dumps({"error": str(e)}))
            raise
        store.set("plan", plan.to_json())
        if plan.note:
            print(f"Note: {plan.note}", file=sys.stderr)
        if plan.skipped:
            print(f"Resuming: {plan.skipped} record(s) already done, {len(plan.pending)} of"
                  f" {plan.n_units} unit(s) to run.", file=sys.stderr)
        return plan
    raw = store.wait_get("plan", [0], "rank 0's plan", limit_s=PLAN_WAIT_S)
    if "error" in json.loads(raw):
        raise UserError(f"rank 0 stopped: {json.loads(raw)['error']}")
    plan = Plan.from_json(raw)
    if plan.fingerprint != fp:
        raise UserError(f"Rank {env.rank} was given other prompts or settings than rank 0; start"
                        " every node with the same command and input files.")
    check_parts_visible(output, plan.run_id, env.rank)
    return plan


def _work(store: _Store, env: DistEnv, cfg, units: list[Unit], plan: Plan, output: str,
          kind: str) -> int:
    """Load, warm up, then take units until the counter passes the end. Returns records written."""
    if not plan.pending:
        store.set(f"ready/{env.rank}", repr(time.time()))
        return 0
    from ..models.loading import load_announced
    from ..bench.runner import modes_of, run_metadata, run_many, warm_up
    from ..measure.timing import Timer

    pipe = load_announced(cfg)
    modes = modes_of(cfg)
    method = Timer(pipe.device, cfg.timing).method_name
    ident = {"run_id": plan.run_id, "world_size": env.world_size, "rank": env.rank}
    if kind == "sweep":
        from ..bench.sweep import batch_items, shape_config, sweep_items, sweep_meta
        base_meta = {**sweep_meta(pipe, cfg, method), **ident}
    else:
        base_meta = {**run_metadata(pipe, cfg, method), **ident}
        if cfg.warmup:  # per rank, before it takes work; the units then run without warm-up
            warm_up(pipe, cfg, units[plan.pending[0]].payload[0], modes)
    cfg_nowarm = replace(cfg, warmup=0)
    bar = _Bar(store, len(plan.pending)) if env.rank == 0 else None
    written = 0
    store.set(f"ready/{env.rank}", repr(time.time()))
    with JsonlWriter(part_path(output, env.rank, plan.run_id), append=True) as writer:
        while True:
            k = store.add("next", 1) - 1
            if k >= len(plan.pending):
                break
            idx = plan.pending[k]
            u = units[idx]
            skip = {tuple(x) for x in plan.done.get(idx, [])} or None
            if kind == "sweep":
                n_in, m, b = u.payload
                it = sweep_items(pipe.tokenizer, [n_in], cfg.gen.seed)[0]
                rows = batch_items(pipe.tokenizer, it, n_in, m, b, cfg.gen.seed)
                recs = run_many(pipe, shape_config(cfg, m, b), rows, writer=writer, skip=skip,
                                meta={**base_meta, "max_new_tokens": m})
            else:
                recs = run_many(pipe, cfg_nowarm, u.payload, writer=writer, skip=skip,
                                meta=base_meta)
            written += len(recs)
            store.add("units_done", 1)
            if bar:
                bar.update()
    if bar:
        bar.close()
    return written


class _Bar:
    """Rank 0's progress bar over all ranks' finished units."""

    def __init__(self, store: _Store, total: int):
        from tqdm import tqdm
        self.store = store
        self.bar = tqdm(total=total, unit="unit", dynamic_ncols=True, file=sys.stderr,
                        delay=0.5, desc="all ranks")

    def update(self) -> None:
        self.bar.update(self.store.add("units_done", 0) - self.bar.n)

    def close(self) -> None:
        self.bar.close()


def _wait_all(store: _Store, env: DistEnv, plan: Plan) -> None:
    t0 = time.monotonic()
    said = False
    while store.add("finished", 0) < env.world_size:
        store.check_alive(range(env.world_size), "every rank to finish")
        if not said and time.monotonic() - t0 > 5:
            print(f"Rank 0 waits for the other ranks ({store.add('units_done', 0)} of"
                  f" {len(plan.pending)} unit(s) done).", file=sys.stderr)
            said = True
        time.sleep(POLL_S)


def _report(args, res: MergeResult, plan: Plan, env: DistEnv, counts: dict[int, int],
            work_s: float, sweep_html: str | None) -> None:
    from ..report.summary import print_summary
    print_summary(res.records)
    ranks = ", ".join(f"rank {r}: {n}" for r, n in sorted(counts.items()))
    notes = []
    if res.kept_before:
        notes.append(f"{res.kept_before} earlier record(s) kept in front")
    if res.extra:
        notes.append(f"{res.extra} record(s) of the resumed run's parts added before them")
    print(f"Merged {len(res.records)} record(s) from {env.world_size} rank(s) into {args.output},"
          f" each (id, mode, repeat) exactly once ({ranks} new"
          f"{'; ' + '; '.join(notes) if notes else ''}).")
    if sweep_html:
        from ..report.analysis import to_frame
        from ..report.plots import sweep_fig
        sweep_fig(to_frame(iter_jsonl(args.output))).write_html(sweep_html, include_plotlyjs=True)
        print(f"Wrote {sweep_html}")
    from .reporting import write_run_summary
    write_run_summary(args)  # of the merged file, as a single-process run writes it
    print(json.dumps({"distributed": {"world_size": env.world_size, "records": len(res.records),
                                      "new_per_rank": counts, "resumed": plan.skipped,
                                      "output": args.output, "work_s": round(work_s, 3)}}))


def run_items(args, cfg, items) -> int:
    from ..bench.runner import modes_of
    return run(args, cfg, item_units(items, modes_of(cfg), cfg.repeats, cfg.batch_size), "items")


def run_sweep(args, cfg, input_lens: list[int], output_lens: list[int],
              batch_sizes: list[int] | None = None) -> int:
    from ..bench.runner import modes_of
    return run(args, cfg, sweep_units(input_lens, output_lens, modes_of(cfg), cfg.repeats,
                                      batch_sizes or [cfg.batch_size]),
               "sweep", sweep_html=getattr(args, "html", None))
