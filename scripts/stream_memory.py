"""Does a long run keep flat memory? 5,000 synthetic records through the real run_many (and its
JSONL writer), with the generation itself replaced by a synthetic one (64 decode steps), once
streaming (keep=False, what the CLI and the app do) and once keeping every record.

Prints the Python heap in use (tracemalloc) and the process RSS every 500 records.
Usage: python scripts/stream_memory.py [N] [--no-write]
"""

from __future__ import annotations

import gc
import os
import sys
import tempfile
import tracemalloc
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from c2c_core.bench import runner  # noqa: E402
from c2c_core.spec.config import build_run_config  # noqa: E402
from c2c_core.measure.memory import MB, rss_bytes  # noqa: E402
from c2c_core.io.records import JsonlWriter  # noqa: E402
from c2c_core.report.summary import RunningSummary  # noqa: E402


class _Tok:
    def decode(self, ids, skip_special_tokens=True):
        return "synthetic answer " * 4


def _fake_generate(pipe, cfg, item, mode, timer, repeat=0):
    steps = [10.0 + (i % 7) * 0.1 for i in range(64)]
    stages = {k: [] for k in runner.STAGES}
    stages.update(base_embedding=[0.1], base_prefill=[5.0], decode=steps)
    return runner.Generation(tokens=list(range(65)), stages=stages, ttft_ns=6_000_000,
                             e2e_ns=int((6 + sum(steps) + 1) * 1e6), prompt_tokens=20,
                             peak_memory_mb=100.0)


def synthetic_run(n: int, keep: bool, path: str | None, every: int = 500) -> list[tuple]:
    """[(records done, heap MB in use, RSS MB)] every `every` records (after a collection)."""
    pipe = SimpleNamespace(tokenizer=_Tok(), device=torch.device("cpu"),
                           info={"receiver": "r", "sharer": "s"}, sharers=[], fusion="parallel")
    cfg = build_run_config(preset="smollm2-demo", warmup=0, mode="receiver")
    meta = {"run_id": "synthetic"}
    summary = RunningSummary()
    samples: list[tuple] = []

    def on_progress(done, total, rec):
        if rec is not None:
            summary.add(rec)
        if done % every == 0 and rec is not None:
            gc.collect()
            samples.append((done, tracemalloc.get_traced_memory()[0] / MB, (rss_bytes() or 0) / MB))

    saved = runner.generate_many  # the one job loop's call for each (batch of) item(s)
    runner.generate_many = lambda pipe, cfg, items, mode, timer, repeats: [
        _fake_generate(pipe, cfg, it, mode, timer, r) for it, r in zip(items, repeats)]
    tracemalloc.start()
    try:
        items = [f"prompt {i}" for i in range(n)]
        writer = JsonlWriter(path) if path else None
        kept = runner.run_many(pipe, cfg, items, writer=writer, on_progress=on_progress,
                               meta=meta, keep=keep)
        if writer:
            writer.close()
        assert summary.count == n and len(kept) == (n if keep else 0)
        del kept
    finally:
        tracemalloc.stop()
        runner.generate_many = saved
    return samples


def main(argv: list[str]) -> None:
    n = int(argv[0]) if argv and argv[0].isdigit() else 5000
    write = "--no-write" not in argv
    for keep in (False, True):
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "synthetic.jsonl") if write else None
            samples = synthetic_run(n, keep, path)
        label = "keep=True (every record held)" if keep else "keep=False (streaming)"
        print(f"{label}: records, Python heap in use MB, process RSS MB")
        for done, heap, rss in samples:
            print(f"  {done:>6}  {heap:8.2f}  {rss:8.1f}")
        growth = samples[-1][1] - samples[0][1]
        print(f"  heap growth from record {samples[0][0]} to {samples[-1][0]}: {growth:.2f} MB")


if __name__ == "__main__":
    main(sys.argv[1:])
