"""torchrun data parallelism (c2c_core/frontends/distributed.py): the merge is exactly once and equals a
one-process run; a killed rank is finished by --resume; two "nodes" on one host; report groups
by device. Real `torchrun` (python -m torch.distributed.run) with gloo on the CPU, 2 processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from c2c_core.report import analysis
from c2c_core.frontends import distributed as D
from c2c_core.report.analysis import column as A_col
from c2c_core.frontends.cli import main
from c2c_core.spec.errors import UserError
from c2c_core.io.records import check_record, read_records, write_all

from conftest import HANG_S, end_group, free_port, run_group, start_group

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _model_args(tiny_models, max_new_tokens=8):
    return ["--base_model", tiny_models["receiver"], "--teacher_model", tiny_models["sharer"],
            "--hidden_dim", "32", "--intermediate_dim", "32", "--device", "cpu",
            "--dtype", "float32", "--max_new_tokens", str(max_new_tokens)]


def _env():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _torchrun(launch: list[str], args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *launch, "-m", "c2c_core", *args]


def _start(cmd, **env):
    """A command (a torchrun) in the background, in its own process group, output captured."""
    return start_group(cmd, cwd=ROOT, env={**_env(), **env}, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True)


def _run(cmd, timeout=900, cwd=None):
    # its own process group, killed on a timeout: torchrun's ranks must not outlive it
    p = run_group(cmd, cwd=cwd or ROOT, env=_env(), timeout=timeout)
    return p.returncode, p.stdout + p.stderr


def _two_ranks():
    return ["--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
            str(free_port())]


def _key(r):
    return (str(r["id"]), r["mode"], r["repeat"])


def _content(r):
    """What must not depend on the rank: ids, prompts, greedy tokens (as text and count)."""
    return (*_key(r), r["prompt"], r["response"], r["timing"]["num_generated_tokens"])


def _prompts_file(path, n):
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"q{i}", "prompt": f"What is {i} * 17? Paris hello"}) + "\n")
    return str(path)


# --- pure parts: units, plan, merge ----------------------------------------------------------

def test_env_threads_and_commands(monkeypatch):
    assert D.dist_env({}) is None
    e = D.dist_env({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert (e.rank, e.world_size, e.local_rank, e.local_world_size) == (1, 4, 1, 2)
    with pytest.raises(UserError, match="outside WORLD_SIZE"):
        D.dist_env({"RANK": "4", "WORLD_SIZE": "4", "LOCAL_RANK": "0"})
    assert D.split_threads(2, cores=2) == 1 and D.split_threads(8, cores=2) == 1
    assert D.split_threads(2, cores=16) == 8
    for k, v in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    assert main(["profile", "--prompt", "x"]) == 2  # refused before any model loads
    D.check_command("dataset")


def _rec(id_, mode="c2c", repeat=0, rank=0, run_id="r1", **kw):
    return {"id": id_, "mode": mode, "repeat": repeat, "prompt": f"p{id_}",
            "run": {"run_id": run_id, "rank": rank, "world_size": 2}, **kw}


def test_merge_orders_by_source_and_refuses_missing_or_doubled(tmp_path):
    out = str(tmp_path / "o.jsonl")
    units = D.item_units([f"p{i}" for i in range(1, 5)], ["c2c", "receiver"], 1)
    assert [u.id for u in units] == ["1", "2", "3", "4"]
    plan = D.make_plan(out, units, resume=False)
    assert plan.pending == [0, 1, 2, 3] and os.path.isdir(D.parts_dir(out))
    rid = plan.run_id
    # rank 1 took prompt 2 and 4, rank 0 prompt 1 and 3 (each with both modes)
    r0 = [_rec(i, m, rank=0, run_id=rid) for i in (1, 3) for m in ("c2c", "receiver")]
    r1 = [_rec(i, m, rank=1, run_id=rid) for i in (2, 4) for m in ("c2c", "receiver")]
    write_all(D.part_path(out, 0, rid), r0[:3])  # prompt 3 receiver missing
    write_all(D.part_path(out, 1, rid), r1 + [r1[0] | {"response": "another run"}])  # 2 c2c doubled
    with pytest.raises(UserError) as e:
        D.merge(out, units, plan)
    msg = str(e.value)
    assert "1 of 8 record(s) missing (3 receiver #0)" in msg and "doubled (2 c2c #0)" in msg
    assert msg.count(".") >= 1 and "\n" not in msg
    assert not os.path.exists(out) and len(D.part_files(out)) == 2  # nothing lost

    write_all(D.part_path(out, 0, rid), r0)
    write_all(D.part_path(out, 1, rid), r1 + [r1[0]])  # an identical line counts once
    res = D.merge(out, units, plan, counts={0: 4, 1: 4})
    assert [_key(r)[:2] for r in read_records(out)] == [
        (str(i), m) for i in range(1, 5) for m in ("c2c", "receiver")]
    assert res.per_rank == {0: 4, 1: 4} and not os.path.exists(D.parts_dir(out))


def test_merge_notices_a_part_it_cannot_see(tmp_path):
    out = str(tmp_path / "o.jsonl")
    units = D.item_units(["a", "b"], ["c2c"], 1)
    plan = D.make_plan(out, units, resume=False)
    write_all(D.part_path(out, 0, plan.run_id), [_rec(1, run_id=plan.run_id),
                                                 _rec(2, run_id=plan.run_id)])
    with pytest.raises(UserError, match="rank 1 wrote 1 record.*filesystem all nodes share"):
        D.merge(out, units, plan, counts={0: 2, 1: 1})


def test_plan_refuses_to_overwrite_parts_and_resume_runs_only_the_missing(tmp_path):
    out = str(tmp_path / "o.jsonl")
    units = D.item_units(["a", "b", "c"], ["c2c", "receiver"], 2)
    D.make_plan(out, units, resume=False)
    # records of an older version (no input digest) are matched by id
    write_all(D.part_path(out, 3, "old"), [_rec(1, m, r) for m in ("c2c", "receiver")
                                           for r in (0, 1)] + [_rec(2, "c2c", 1)])
    with pytest.raises(UserError, match="holds 5 record.*--resume"):
        D.make_plan(out, units, resume=False)
    write_all(out, [_rec(3, "receiver", 0)])
    plan = D.make_plan(out, units, resume=True)
    assert plan.pending == [1, 2] and plan.skipped == 6
    assert plan.done == {1: [["2", "c2c", "1"]], 2: [["3", "receiver", "0"]]}
    assert plan.inherited == [D.part_path(out, 3, "old")] and "matched by id" in plan.note
    assert D.Plan.from_json(plan.to_json()) == plan


def _drec(prompt, id_, mode="c2c", repeat=0, run_id="r1", rank=0):
    from c2c_core.io.records import digest_input
    return _rec(id_, mode, repeat, rank, run_id) | {"prompt": prompt,
                                                      "input_digest": digest_input(prompt)}


def test_resume_plan_keys_on_what_ran_not_the_row(tmp_path):
    """Another prompt file resumed into the same output: every new prompt runs."""
    out = str(tmp_path / "o.jsonl")
    write_all(out, [_drec("alpha one", 1), _drec("alpha two", 2)])
    units = D.item_units(["BETA one", "BETA two", "BETA three"], ["c2c"], 1)
    plan = D.make_plan(out, units, resume=True)
    assert plan.pending == [0, 1, 2] and plan.skipped == 0
    units = D.item_units(["x", "alpha two", "alpha one"], ["c2c"], 1)
    assert D.make_plan(out, units, resume=True).pending == [0]


def test_merge_appends_in_place_and_removes_only_its_parts(tmp_path):
    out = str(tmp_path / "o.jsonl")
    write_all(out, [_drec("alpha one", 1)])
    inode = os.stat(out).st_ino
    units = D.item_units(["alpha one", "beta", "gamma"], ["c2c"], 1)
    # a crashed earlier run left beta in its part
    write_all(D.part_path(out, 1, "dead"), [_drec("beta", 2, run_id="dead", rank=1)])
    plan = D.make_plan(out, units, resume=True)
    assert plan.pending == [2] and plan.skipped == 2
    write_all(D.part_path(out, 0, plan.run_id), [_drec("gamma", 3, run_id=plan.run_id)])
    stranger = os.path.join(D.parts_dir(out), "rank-00000-stranger.jsonl")
    write_all(stranger, [_drec("zeta", 9, run_id="stranger")])  # not this merge's
    res = D.merge(out, units, plan, fresh=False, counts={0: 1})
    assert os.stat(out).st_ino == inode  # appended in place, never replaced
    assert [r["prompt"] for r in read_records(out)] == ["alpha one", "beta", "gamma"]
    assert res.kept_before == 1 and res.extra == 1 and len(res.records) == 1
    assert D.part_files(out) == [stranger]  # only the merged parts are removed


def test_units_are_batches_of_batch_size():
    units = D.item_units([f"p{i}" for i in range(1, 7)], ["c2c", "receiver"], 1, batch_size=4)
    assert [len(u.payload) for u in units] == [4, 2]
    assert units[0].keys[:5] == [("1", "c2c", "0"), ("2", "c2c", "0"), ("3", "c2c", "0"),
                                 ("4", "c2c", "0"), ("1", "receiver", "0")]
    sw = D.sweep_units([4], [3], ["c2c"], 1, batch_sizes=[1, 2])
    assert [u.keys for u in sw] == [[("in4-out3", "c2c", "0")],
                                    [("in4-out3-b2.0", "c2c", "0"), ("in4-out3-b2.1", "c2c", "0")]]


class _FakeStore:
    """torch's store interface (add/set/get/check) over a dict."""

    def __init__(self):
        self.d = {}

    def add(self, k, n):
        self.d[k] = int(self.d.get(k, 0)) + n
        return self.d[k]

    def set(self, k, v):
        self.d[k] = v.encode() if isinstance(v, str) else v

    def get(self, k):
        return self.d[k]

    def check(self, ks):
        return all(k in self.d for k in ks)


def test_a_wait_gives_up_on_a_rank_that_stopped_beating(monkeypatch):
    monkeypatch.setattr(D, "DEAD_S", 0.5)
    monkeypatch.setattr(D, "BEAT_S", 0.05)
    fake = _FakeStore()
    rank0 = D._Store(fake, "c2c/0/", rank=0, world_size=2).start_beating()
    rank1 = D._Store(fake, "c2c/0/", rank=1, world_size=2)
    try:
        rank1.add("beat/1", 1)  # rank 1 beat once, then its node died
        t = time.monotonic()
        with pytest.raises(UserError, match="Rank 1 has not been heard from.*--resume"):
            rank0.wait_get("count/1", [1], "rank 1's count")
        assert time.monotonic() - t < HANG_S  # a hang guard: it did not wait forever
        # a rank that keeps beating is waited for, however long it takes
        setter = threading.Timer(1.0, lambda: fake.set("c2c/0/count/0", "7"))
        setter.start()
        assert rank1.wait_get("count/0", [0], "rank 0's count") == "7"
        with pytest.raises(UserError, match="waited 0 s for rank 0's plan"):
            rank1.wait_get("plan", [0], "rank 0's plan", limit_s=0.2)
    finally:
        rank0.stop_beating()


def test_duplicate_ids_are_refused():
    from c2c_core.io.prompts import PromptItem
    with pytest.raises(UserError, match="id.*x occur more than once"):
        D.item_units([PromptItem("x", "a"), PromptItem("x", "b")], ["c2c"], 1)


def test_report_groups_by_device_when_they_differ():
    def rec(i, mode, dev, ms):
        t = {"ttft_ms": ms, "e2e_ms": 2 * ms, "decode_avg_ms": ms / 10, "tokens_per_second": 1.0}
        return {"id": i, "mode": mode, "timing": t, "decode_step_times_ms": [ms / 10],
                "run": {"device": dev}}
    recs = [rec(i, m, d, ms * (2 if m == "c2c" else 1))
            for d, ms in (("NVIDIA H100", 10.0), ("NVIDIA A10G", 40.0))
            for i in range(3) for m in ("c2c", "receiver")]
    table, ratios = analysis.compare_modes(analysis.to_frame(recs))
    assert list(table["device"]) == ["NVIDIA H100"] * 2 + ["NVIDIA A10G"] * 2
    assert list(table["mode"]) == ["c2c", "receiver"] * 2
    assert table.loc[2, A_col("ttft_ms", "p50")] == 80.0
    assert ratios["c2c_over_receiver on NVIDIA A10G"]["ttft_ms"] == 2.0
    one, r1 = analysis.compare_modes(analysis.to_frame(recs[:6]))
    assert "device" not in one.columns and list(r1) == ["c2c_over_receiver"]


# --- real torchrun, gloo, 2 CPU processes ---------------------------------------------------

# slow: torchrun ranks end to end (~1 min under load); quick: the merge/resume/plan unit tests above
@pytest.mark.slow
@pytest.mark.timeout(1200)  # a shared 2-core machine under heavy load starts torchrun slowly
def test_two_ranks_merge_equals_one_process(tiny_models, tmp_path):
    data = _prompts_file(tmp_path / "p.jsonl", 8)
    common = ["dataset", "--dataset_file", data, "--mode", "all", "--t2t_note_tokens", "4",
              *_model_args(tiny_models)]
    one = str(tmp_path / "one.jsonl")
    assert main(common + ["--output", one]) == 0
    two = str(tmp_path / "two.jsonl")
    rc, log = _run(_torchrun(_two_ranks(), common + ["--output", two]))
    assert rc == 0, log[-3000:]
    a, b = read_records(one), read_records(two)
    assert len(b) == 32 and sorted(map(_content, a)) == sorted(map(_content, b))
    assert [_key(r) for r in a] == [_key(r) for r in b]  # merged in source order
    assert all(check_record(r) == [] for r in b)
    assert {r["run"]["world_size"] for r in b} == {2} and {r["run"]["rank"] for r in b} <= {0, 1}
    assert len({r["run"]["run_id"] for r in b}) == 1 and {r["run"]["threads"] for r in b} == {1}
    assert {r["run"]["world_size"] for r in a} == {1}
    # a prompt's modes ran on one rank, interleaved as in a one-process run
    by_id = {}
    for r in b:
        by_id.setdefault(r["id"], set()).add(r["run"]["rank"])
    assert all(len(v) == 1 for v in by_id.values())
    last = json.loads([x for x in log.splitlines() if x.startswith('{"distributed"')][-1])
    assert last["distributed"]["records"] == 32
    assert sum(last["distributed"]["new_per_rank"].values()) == 32
    assert not os.path.exists(D.parts_dir(two))
    # the merged file's summary, as a one-process run writes it
    summary = json.loads((tmp_path / "two.summary.json").read_text())
    assert summary["records"] == 32 and summary["environment"]["world_size"] == 2
    assert summary["modes"]["c2c"]["count"] == 8


def _children(pid):
    import psutil
    return psutil.Process(pid).children(recursive=True)


def _rank_process(pid, rank):
    for c in _children(pid):
        try:
            if c.environ().get("RANK") == str(rank):
                return c
        except Exception:  # noqa: BLE001 - a process that went away meanwhile
            continue
    return None


@pytest.mark.slow  # torchrun ranks end to end (tens of s); quick: the unit tests above
@pytest.mark.timeout(1800)
def test_killed_rank_resume_runs_only_the_missing_exactly_once(tiny_models, tmp_path):
    n = 60
    data = _prompts_file(tmp_path / "p.jsonl", n)
    out = str(tmp_path / "o.jsonl")
    args = ["dataset", "--dataset_file", data, "--ignore_eos", *_model_args(tiny_models, 64),
            "--output", out]
    proc = _start(_torchrun(_two_ranks(), args))
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            part1 = [p for p in D.part_files(out) if "rank-00001-" in p]
            if part1 and len(read_records(part1[0])) >= 3:
                break
            time.sleep(0.02)
        victim = _rank_process(proc.pid, 1)
        assert victim is not None, "rank 1 not found"
        victim.send_signal(signal.SIGKILL)
        log, _ = proc.communicate(timeout=300)
    finally:
        end_group(proc)  # its group: torchrun and any rank left
    assert proc.returncode != 0, log[-2000:]
    assert not os.path.exists(out) or read_records(out) == []
    kept = [r for p in D.part_files(out) for r in read_records(p)]
    assert 3 <= len(kept) < n, "the kill should land mid-run"
    first_run = {r["run"]["run_id"] for r in kept}

    rc, log = _run(_torchrun(_two_ranks(), args + ["--resume"]))
    assert rc == 0, log[-3000:]
    recs = read_records(out)
    assert [r["id"] for r in recs] == [f"q{i}" for i in range(n)]  # each exactly once, in order
    assert all(check_record(r) == [] for r in recs)
    runs = {}
    for r in recs:
        runs.setdefault(r["run"]["run_id"], []).append(r)
    assert first_run <= set(runs) and len(runs) == 2  # the first run's records were kept
    assert sum(len(v) for k, v in runs.items() if k in first_run) == len(kept)
    assert f"Resuming: {len(kept)} record(s) already done" in log
    assert not os.path.exists(D.parts_dir(out))


@pytest.mark.slow  # torchrun ranks end to end (tens of s); quick: the unit tests above
@pytest.mark.timeout(1200)
def test_one_writer_per_output_across_torchrun_and_single_runs(tiny_models, tmp_path, capsys):
    """A torchrun run holds the output: a second torchrun launch and a one-process --resume are
    refused at once; a torchrun --resume while a one-process run holds it is refused too; the
    first run ends with every record exactly once."""
    from c2c_core.io.fileio import OutputLock
    n = 48  # the first run is paused while the others try, so its length does not matter
    data = _prompts_file(tmp_path / "p.jsonl", n)
    out = str(tmp_path / "o.jsonl")
    args = ["dataset", "--dataset_file", data, "--ignore_eos", *_model_args(tiny_models, 128),
            "--output", out]
    # paused below while the others try: its peers' heartbeats must not be judged dead then
    first = _start(_torchrun(_two_ranks(), args), C2C_DIST_DEAD_S="900")
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and first.poll() is None:
            if any(read_records(p) for p in D.part_files(out)):
                break
            time.sleep(0.05)
        assert first.poll() is None, "the first run should still be running"
        # pause the first run (it keeps its lock) so that, however slowly a second torchrun
        # starts on a loaded machine, the refusals below meet a run in progress
        os.killpg(first.pid, signal.SIGSTOP)
        try:
            t = time.monotonic()
            rc, log = _run(_torchrun(_two_ranks(), args + ["--resume"]), timeout=300)
            assert rc != 0 and "is being written by another run" in log, log[-2000:]
            assert main(args + ["--resume"]) == 2
            assert "is being written by another run" in capsys.readouterr().err
            # a hang guard only: a refusal that waited for the lock would wait forever (the
            # first run is stopped, holding it); "at once" is that it came at all
            assert time.monotonic() - t < 10 * HANG_S
            assert first.poll() is None, "the refusals must have met a running first run"
        finally:
            os.killpg(first.pid, signal.SIGCONT)
        log, _ = first.communicate(timeout=600)
    finally:
        end_group(first)  # its group: torchrun and any rank left (a stopped one too)
    assert first.returncode == 0, log[-3000:]
    recs = read_records(out)
    assert [r["id"] for r in recs] == [f"q{i}" for i in range(n)]
    assert not os.path.exists(D.parts_dir(out))

    # a one-process run holds the output: a torchrun --resume is refused, nothing changes
    before = open(out, "rb").read()
    with OutputLock(out):
        rc, log = _run(_torchrun(_two_ranks(), args + ["--resume"]), timeout=300)
    assert rc != 0 and "is being written by another run" in log, log[-2000:]
    assert open(out, "rb").read() == before and not D.part_files(out)


@pytest.mark.slow  # torchrun ranks end to end (tens of s); quick: the unit tests above
@pytest.mark.timeout(1200)
def test_batch_size_under_torchrun_runs_batches(tiny_models, tmp_path):
    data = _prompts_file(tmp_path / "p.jsonl", 10)
    out = str(tmp_path / "o.jsonl")
    args = ["dataset", "--dataset_file", data, "--batch_size", "4", "--engine", "fast",
            *_model_args(tiny_models), "--output", out]
    rc, log = _run(_torchrun(_two_ranks(), args))
    assert rc == 0, log[-3000:]
    recs = read_records(out)
    assert [r["id"] for r in recs] == [f"q{i}" for i in range(10)]
    assert [r["batch_size"] for r in recs] == [4] * 8 + [2] * 2
    assert all(check_record(r) == [] for r in recs)
    # the same batches in one process give the same greedy tokens
    one = str(tmp_path / "one.jsonl")
    assert main(args[:-1] + [one]) == 0
    assert sorted(map(_content, read_records(one))) == sorted(map(_content, recs))


@pytest.mark.slow  # torchrun ranks end to end (tens of s); quick: the unit tests above
@pytest.mark.timeout(1200)
def test_two_nodes_on_one_host_sweep(tiny_models, tmp_path):
    out = str(tmp_path / "sweep.jsonl")
    args = ["sweep", "--input_lens", "4,9", "--output_lens", "3,5", "--mode", "all",
            "--t2t_note_tokens", "4", *_model_args(tiny_models), "--output", out]
    port = free_port()
    cmds = [_torchrun(["--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(i),
                       "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}",
                       "--rdzv_id", "c2c-test"], args) for i in (0, 1)]
    procs = [_start(c) for c in cmds]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=900)[0])
    finally:
        for p in procs:
            end_group(p)  # its group: torchrun and any rank left
    assert [p.returncode for p in procs] == [0, 0], "\n".join(x[-2000:] for x in logs)
    recs = read_records(out)
    want = [(f"in{n}-out{m}", mode) for m in (3, 5) for n in (4, 9)
            for mode in ("c2c", "receiver", "sharer", "t2t")]
    assert [(r["id"], r["mode"]) for r in recs] == want
    assert {r["run"]["world_size"] for r in recs} == {2}
    assert all(r["timing"]["num_generated_tokens"] == int(r["id"].split("out")[1])
               for r in recs)
    # the same sweep in one process: same prompts and greedy tokens
    one = str(tmp_path / "one.jsonl")
    assert main(args[:-1] + [one]) == 0
    assert sorted(map(_content, read_records(one))) == sorted(map(_content, recs))


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_default_pair_two_ranks_equal_one_process(tmp_path):
    """The default pair (smollm2-demo, real weights, fp32 on the CPU): 2 ranks vs 1 process."""
    common = ["batch", "--prompts", "What is 25 * 17?", "Say hello.", "Name a colour.",
              "--mode", "all", "--max_new_tokens", "5", "--t2t_note_tokens", "4",
              "--dtype", "float32", "--device", "cpu"]
    one, two = str(tmp_path / "one.jsonl"), str(tmp_path / "two.jsonl")
    assert main(common + ["--output", one]) == 0
    rc, log = _run(_torchrun(_two_ranks(), common + ["--output", two]), timeout=900)
    assert rc == 0, log[-3000:]
    a, b = read_records(one), read_records(two)
    assert len(b) == 12 and sorted(map(_content, a)) == sorted(map(_content, b))
    assert {r["run"]["world_size"] for r in b} == {2}
