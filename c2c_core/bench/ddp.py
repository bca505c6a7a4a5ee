"""Benchmark: the same prompts with 1 rank and with N ranks under torchrun, one thread each.

    python -m c2c_core.bench.ddp [--nproc 2] [--num_prompts 16] [--max_new_tokens 32]
                                 [--rounds 1] [-- extra flags for `dataset`, e.g. --preset ...]

Each round runs `torchrun --nproc_per_node 1` then `--nproc_per_node N` on one JSONL of prompts
(the built-in five, cycled, each with its own id; EOS ignored so every prompt costs the same),
with `--threads 1` per rank. It prints, per run, the wall time of the whole command (start-up,
model load and warm-up included) and of the work phase (first rank ready to last record
written, from the run's last JSON line), then the speedups (medians over rounds) and one JSON
line. It also checks that both runs made the same records (ids, prompts, greedy responses).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from ..io.prompts import BUILTIN_PROMPTS
from ..io.records import read_records


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_run(nproc: int, prompts: str, out: str, args, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "-m", "c2c_core", "dataset", "--dataset_file", prompts, "--threads", "1",
           "--ignore_eos", "--max_new_tokens", str(args.max_new_tokens), "--output", out, *extra]
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.stderr.write(p.stdout[-2000:] + p.stderr[-4000:])
        raise SystemExit(f"the {nproc}-rank run failed (exit {p.returncode}); see above.")
    info = [json.loads(x) for x in p.stdout.splitlines() if x.startswith('{"distributed"')][-1]
    recs = read_records(out)
    os.remove(out)
    return {"wall_s": wall, "work_s": info["distributed"]["work_s"],
            "per_rank": info["distributed"]["new_per_rank"],
            "content": sorted((str(r["id"]), r["mode"], r["prompt"], r["response"]) for r in recs)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m c2c_core.bench.ddp", description=__doc__.split("\n")[0])
    ap.add_argument("--nproc", type=int, default=2, help="ranks of the parallel run (default 2)")
    ap.add_argument("--num_prompts", type=int, default=16)
    ap.add_argument("--max_new_tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=1, help="1-rank/N-rank pairs, run alternately")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per run")
    args, extra = ap.parse_known_args(argv)
    extra = [x for x in extra if x != "--"]
    runs: dict[int, list[dict]] = {1: [], args.nproc: []}
    with tempfile.TemporaryDirectory() as d:
        prompts = os.path.join(d, "prompts.jsonl")
        with open(prompts, "w", encoding="utf-8") as f:
            for i in range(args.num_prompts):
                f.write(json.dumps({"id": i, "prompt": BUILTIN_PROMPTS[i % len(BUILTIN_PROMPTS)]})
                        + "\n")
        for rnd in range(args.rounds):
            for n in (1, args.nproc):
                r = _one_run(n, prompts, os.path.join(d, f"out{n}.jsonl"), args, extra)
                runs[n].append(r)
                print(f"round {rnd + 1}, {n} rank(s) x 1 thread: wall {r['wall_s']:.1f} s,"
                      f" work phase {r['work_s']:.1f} s, records per rank {r['per_rank']}",
                      flush=True)
    same = all(r["content"] == runs[1][0]["content"] for n in runs for r in runs[n])
    med = {n: {k: statistics.median(r[k] for r in rs) for k in ("wall_s", "work_s")}
           for n, rs in runs.items()}
    s_wall = med[1]["wall_s"] / med[args.nproc]["wall_s"]
    s_work = med[1]["work_s"] / med[args.nproc]["work_s"]
    try:
        load = os.getloadavg()
    except OSError:  # pragma: no cover
        load = None
    print(f"{args.num_prompts} prompts x {args.max_new_tokens} tokens, {os.cpu_count()} CPU(s),"
          f" load average {load}:")
    print(f"  1 rank : wall {med[1]['wall_s']:.1f} s, work phase {med[1]['work_s']:.1f} s")
    print(f"  {args.nproc} ranks: wall {med[args.nproc]['wall_s']:.1f} s, work phase"
          f" {med[args.nproc]['work_s']:.1f} s")
    print(f"  speedup: work phase {s_work:.2f}x, whole command {s_wall:.2f}x"
          f" (goal >= {0.85 * args.nproc:.2f}x on the work phase);"
          f" same records: {'yes' if same else 'NO'}")
    print(json.dumps({"ddp_bench": {"nproc": args.nproc, "num_prompts": args.num_prompts,
                                    "max_new_tokens": args.max_new_tokens, "rounds": args.rounds,
                                    "median_s": med, "speedup_work": round(s_work, 3),
                                    "speedup_wall": round(s_wall, 3), "same_records": same,
                                    "loadavg": load}}))
    return 0 if same else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
