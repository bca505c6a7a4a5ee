"""Data-parallel `batch` / `dataset` / `sweep` runs under `torchrun`, each record exactly once.

`torchrun --nproc_per_node N -m c2c_core dataset ...` starts N copies of the CLI. Each one is a
rank: it loads the models on its own device (`cuda:LOCAL_RANK`, or the CPU with the cores split
between the ranks of its node), warms up, then takes work *units* one at a time from an atomic
counter in the rendezvous store (`store.add`), so a fast rank simply takes more. A unit is one
prompt with all its modes and repeats (the modes stay interleaved per prompt, as in a
one-process run), or one (input length, output length) shape of a sweep.

Every rank appends its records to its own part file, `<output>.parts/rank-<R>.jsonl` (flushed
per record, like every JSONL we write). When all ranks have finished, rank 0 merges the parts
into `--output` in source order and checks that every (id, mode, repeat) is there exactly once;
it refuses, in one sentence naming them, when records are missing or doubled, and then keeps the
parts. `--resume` reads `--output` and the parts and runs only what is missing. The parts folder
is removed once the merge has been written.

All ranks must see the same `--output` folder (one box, or a filesystem all nodes share); rank 0
checks that at the start. Only the store is used to coordinate (no collectives), so a slow rank
never runs into a collective's timeout; a rank that dies makes torchrun stop the others.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any, Iterable

from .errors import UserError
from .records import JsonlWriter, iter_jsonl, sweep_id

#: Commands that run under torchrun; the others are one-process commands.
DISTRIBUTED_COMMANDS = ("batch", "dataset", "sweep")
POLL_S = 0.2


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
    """(id, mode, repeat) as --resume reads it (records.done_keys)."""
    return (str(rec.get("id")), rec.get("mode", "c2c"), str(rec.get("repeat", 0) or 0))


@dataclass
class Unit:
    """One piece of work handed to one rank: a prompt (all modes and repeats) or a sweep shape."""

    id: str
    keys: list[tuple[str, str, str]]  # the records it makes, in source order
    text: str  # what it runs (prompt text or shape), for the check that ranks agree
    payload: Any = None


def item_units(items: Iterable, modes: list[str], repeats: int) -> list[Unit]:
    """One unit per prompt; ids filled in by position (1-based) as run_many does."""
    from .runner import to_item
    units = []
    for i, x in enumerate(items):
        it = to_item(x)
        if it.id is None:
            it = replace(it, id=i + 1)
        keys = [(str(it.id), m, str(r)) for r in range(repeats) for m in modes]
        units.append(Unit(str(it.id), keys, it.prompt, it))
    _check_unique(units)
    return units


def sweep_units(input_lens: list[int], output_lens: list[int], modes: list[str],
                repeats: int) -> list[Unit]:
    """One unit per shape, in run_sweep's order (output length outer, input length inner)."""
    units = []
    for m in output_lens:
        for n in input_lens:
            uid = sweep_id(n, m)
            units.append(Unit(uid, [(uid, md, str(r)) for r in range(repeats) for md in modes],
                              uid, (n, m)))
    _check_unique(units)
    return units


def _check_unique(units: list[Unit]) -> None:
    seen: dict[str, int] = {}
    dup = []
    for u in units:
        seen[u.id] = seen.get(u.id, 0) + 1
        if seen[u.id] == 2:
            dup.append(u.id)
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


def part_path(output: str, rank: int) -> str:
    return os.path.join(parts_dir(output), f"rank-{rank:05d}.jsonl")


def part_files(output: str) -> list[str]:
    d = parts_dir(output)
    if not os.path.isdir(d):
        return []
    return sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".jsonl"))


def _read_parts(output: str) -> list[tuple[str, dict]]:
    return [(p, r) for p in part_files(output) for r in iter_jsonl(p)]


@dataclass
class Plan:
    """What rank 0 decided before any rank takes work; every rank gets it through the store."""

    run_id: str
    n_units: int
    pending: list[int]  # unit indices still to run, in source order
    done: dict[int, list[list[str]]] = field(default_factory=dict)  # partly done units
    fingerprint: str = ""
    skipped: int = 0  # records found done (--resume)

    def to_json(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def from_json(cls, s: str | bytes) -> "Plan":
        d = json.loads(s)
        d["done"] = {int(k): v for k, v in d["done"].items()}
        return cls(**d)


def make_plan(output: str, units: list[Unit], resume: bool, fp: str = "") -> Plan:
    """Rank 0: prepare the parts folder and pick the units to run.

    Without --resume, a parts folder holding records of an unfinished run is refused rather than
    overwritten. With --resume, records in --output and in the parts count as done."""
    pdir = parts_dir(output)
    if not resume:
        n = sum(1 for _ in _read_parts(output))
        if n:
            raise UserError(f"{pdir} holds {n} record(s) of an unfinished distributed run; rerun"
                            " with --resume to finish it, or delete that folder to start over.")
        shutil.rmtree(pdir, ignore_errors=True)
    done: set[tuple] = set()
    if resume:
        if os.path.exists(output):
            done |= {record_key(r) for r in iter_jsonl(output, skip_bad_lines=True)}
        done |= {record_key(r) for _, r in _read_parts(output)}
    os.makedirs(pdir, exist_ok=True)
    pending, partial, skipped = [], {}, 0
    for i, u in enumerate(units):
        have = [k for k in u.keys if k in done]
        skipped += len(have)
        if len(have) < len(u.keys):
            pending.append(i)
            if have:
                partial[i] = [list(k) for k in have]
    plan = Plan(uuid.uuid4().hex[:12], len(units), pending, partial, fp, skipped)
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
    records: list[dict]  # the run's records in source order (what --output now holds after
    #                      any earlier records kept by --append / --resume)
    kept_before: int  # records of --output kept in front (--append; --resume: other ids)
    extra: int  # records in the parts whose key the run does not have (kept at the end)
    per_rank: dict[int, int]  # this run's records per rank


def merge(output: str, units: list[Unit], resume: bool = False, append: bool = False,
          run_id: str | None = None, counts: dict[int, int] | None = None) -> MergeResult:
    """Merge `<output>.parts/*.jsonl` into `output` in source order, each key exactly once.

    Raises UserError (parts kept, `output` untouched) when a key is missing or doubled, or when
    a rank reported more records than its part holds. Identical lines (a merge interrupted
    after writing `output`) count once."""
    prior = list(iter_jsonl(output)) if (resume or append) and os.path.exists(output) else []
    parts = _read_parts(output)
    expected = [k for u in units for k in u.keys]
    want = set(expected)
    before: list[dict] = []
    candidates: list[dict] = []
    for r in prior:
        (candidates if resume and record_key(r) in want else before).append(r)
    candidates += [r for _, r in parts]

    by_key: dict[tuple, list[dict]] = {}
    seen_lines: set[str] = set()
    extra: list[dict] = []
    for r in candidates:
        line = json.dumps(r, sort_keys=True, ensure_ascii=False)
        if line in seen_lines:
            continue
        seen_lines.add(line)
        k = record_key(r)
        if k in want:
            by_key.setdefault(k, []).append(r)
        else:
            extra.append(r)

    per_rank: dict[int, int] = {}
    if run_id is not None:
        for r in {json.dumps(r, sort_keys=True): r for _, r in parts}.values():
            run = r.get("run") if isinstance(r.get("run"), dict) else {}
            if run.get("run_id") == run_id:
                per_rank[run.get("rank")] = per_rank.get(run.get("rank"), 0) + 1
    pdir = parts_dir(output)
    for rank, n in sorted((counts or {}).items()):
        if per_rank.get(rank, 0) < n:
            raise UserError(
                f"Merge refused: rank {rank} wrote {n} record(s) but rank 0 finds"
                f" {per_rank.get(rank, 0)} in {pdir}; put --output on a filesystem all nodes"
                " share (the parts are kept).")

    missing = [k for k in expected if not by_key.get(k)]
    doubled = [k for k in expected if len(by_key.get(k, [])) > 1]
    if missing or doubled:
        what = []
        if missing:
            what.append(f"{len(missing)} of {len(expected)} record(s) missing ({_fmt_keys(missing)})")
        if doubled:
            what.append(f"{len(doubled)} record(s) doubled ({_fmt_keys(doubled)})")
        fix = ("rerun with --resume to run the missing ones" if not doubled else
               "delete the extra lines from the part files, then rerun with --resume")
        raise UserError(f"Merge refused: {' and '.join(what)}; the parts in {pdir} are kept,"
                        f" {fix}.")

    ordered = [by_key[k][0] for k in expected]
    tmp = f"{output}.merging"
    with JsonlWriter(tmp) as w:
        for r in before + ordered + extra:
            w.write(r)
    os.replace(tmp, output)
    shutil.rmtree(pdir, ignore_errors=True)
    return MergeResult(ordered, len(before), len(extra), per_rank)


# --- the run -------------------------------------------------------------------------------

class _Store:
    """Keys of this run in torch.distributed's default store (the rendezvous store)."""

    def __init__(self, store, prefix: str):
        self.s, self.p = store, prefix

    def add(self, key: str, n: int) -> int:
        return int(self.s.add(self.p + key, n))

    def set(self, key: str, value: str) -> None:
        self.s.set(self.p + key, value)

    def wait_get(self, key: str) -> str:
        """Poll (no timeout: a slow rank is fine; torchrun stops us if a rank dies)."""
        k = self.p + key
        while not self.s.check([k]):
            time.sleep(POLL_S)
        return self.s.get(k).decode()


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
    return _Store(store, f"c2c/{attempt}/")


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
    try:
        plan = _agree_on_plan(store, env, output, units, args, cfg)
        n = _work(store, env, cfg, units, plan, output, kind)
        store.set(f"count/{env.rank}", str(n))
        store.set(f"end/{env.rank}", repr(time.time()))
        store.add("finished", 1)
        if env.rank != 0:
            result = json.loads(store.wait_get("result"))
            if not result["ok"]:
                raise UserError(f"rank 0 refused the merge: {result['message']}")
            return 0
        _wait_all(store, env, plan)
        counts = {r: int(store.wait_get(f"count/{r}")) for r in range(env.world_size)}
        # the work phase: from the first rank ready (loaded, warmed up) to the last one done
        work_s = (max(float(store.wait_get(f"end/{r}")) for r in range(env.world_size))
                  - min(float(store.wait_get(f"ready/{r}")) for r in range(env.world_size)))
        try:
            res = merge(output, units, resume=args.resume, append=args.append,
                        run_id=plan.run_id, counts=counts)
        except UserError as e:
            store.set("result", json.dumps({"ok": False, "message": str(e)}))
            raise
        store.set("result", json.dumps({"ok": True, "message": ""}))
        _report(args, res, plan, env, counts, work_s, sweep_html)
        return 0
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _agree_on_plan(store: _Store, env: DistEnv, output: str, units: list[Unit], args,
                   cfg) -> Plan:
    extra = [cfg.mode, cfg.repeats, cfg.gen.max_new_tokens, cfg.receiver.source,
             cfg.sharer.source, output]
    fp = fingerprint(units, extra)
    if env.rank == 0:
        try:
            plan = make_plan(output, units, resume=args.resume, fp=fp)
        except UserError as e:
            store.set("plan", json.dumps({"error": str(e)}))
            raise
        store.set("plan", plan.to_json())
        if plan.skipped:
            print(f"Resuming: {plan.skipped} record(s) already done, {len(plan.pending)} of"
                  f" {plan.n_units} unit(s) to run.", file=sys.stderr)
        return plan
    raw = store.wait_get("plan")
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
    from .cli import _load
    from .runner import modes_of, run_metadata, run_many, warm_up
    from .timing import Timer

    pipe = _load(cfg)
    modes = modes_of(cfg)
    method = Timer(pipe.device, cfg.timing).method_name
    ident = {"run_id": plan.run_id, "world_size": env.world_size, "rank": env.rank}
    if kind == "sweep":
        from .sweep import shape_config, sweep_items, sweep_meta
        base_meta = {**sweep_meta(pipe, cfg, method), **ident}
    else:
        base_meta = {**run_metadata(pipe, cfg, method), **ident}
        if cfg.warmup:  # per rank, before it takes work; the units then run without warm-up
            warm_up(pipe, cfg, units[plan.pending[0]].payload, modes)
    cfg_nowarm = replace(cfg, warmup=0)
    bar = _Bar(store, len(plan.pending)) if env.rank == 0 else None
    written = 0
    store.set(f"ready/{env.rank}", repr(time.time()))
    with JsonlWriter(part_path(output, env.rank), append=True) as writer:
        while True:
            k = store.add("next", 1) - 1
            if k >= len(plan.pending):
                break
            idx = plan.pending[k]
            u = units[idx]
            skip = {tuple(x) for x in plan.done.get(idx, [])} or None
            if kind == "sweep":
                n_in, m = u.payload
                it = replace(sweep_items(pipe.tokenizer, [n_in], cfg.gen.seed)[0], id=u.id)
                recs = run_many(pipe, shape_config(cfg, m), [it], writer=writer, skip=skip,
                                meta={**base_meta, "max_new_tokens": m})
            else:
                recs = run_many(pipe, cfg_nowarm, [u.payload], writer=writer, skip=skip,
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
        self.bar = tqdm(total=total, unit="prompt", dynamic_ncols=True, file=sys.stderr,
                        delay=0.5, desc="all ranks")

    def update(self) -> None:
        self.bar.update(self.store.add("units_done", 0) - self.bar.n)

    def close(self) -> None:
        self.bar.close()


def _wait_all(store: _Store, env: DistEnv, plan: Plan) -> None:
    t0 = time.monotonic()
    said = False
    while store.add("finished", 0) < env.world_size:
        if not said and time.monotonic() - t0 > 5:
            print(f"Rank 0 waits for the other ranks ({store.add('units_done', 0)} of"
                  f" {len(plan.pending)} unit(s) done).", file=sys.stderr)
            said = True
        time.sleep(POLL_S)


def _report(args, res: MergeResult, plan: Plan, env: DistEnv, counts: dict[int, int],
            work_s: float, sweep_html: str | None) -> None:
    from .cli import print_summary
    print_summary(res.records)
    ranks = ", ".join(f"rank {r}: {n}" for r, n in sorted(counts.items()))
    notes = []
    if res.kept_before:
        notes.append(f"{res.kept_before} earlier record(s) kept in front")
    if res.extra:
        notes.append(f"{res.extra} record(s) of other ids kept at the end")
    print(f"Merged {len(res.records)} record(s) from {env.world_size} rank(s) into {args.output},"
          f" each (id, mode, repeat) exactly once ({ranks} new"
          f"{'; ' + '; '.join(notes) if notes else ''}).")
    if sweep_html:
        from .analysis import to_frame
        from .plots import sweep_fig
        sweep_fig(to_frame(res.records)).write_html(sweep_html, include_plotlyjs=True)
        print(f"Wrote {sweep_html}")
    print(json.dumps({"distributed": {"world_size": env.world_size, "records": len(res.records),
                                      "new_per_rank": counts, "resumed": plan.skipped,
                                      "work_s": round(work_s, 3),
                                      "output": args.output}}))


def run_items(args, cfg, items) -> int:
    from .runner import modes_of
    return run(args, cfg, item_units(items, modes_of(cfg), cfg.repeats), "items")


def run_sweep(args, cfg, input_lens: list[int], output_lens: list[int]) -> int:
    from .runner import modes_of
    return run(args, cfg, sweep_units(input_lens, output_lens, modes_of(cfg), cfg.repeats),
               "sweep", sweep_html=getattr(args, "html", None))

