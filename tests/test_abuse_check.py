"""The abuse check's fast subset, as CI runs it: the app started the way a Space runs it, every
probe refused cleanly, nothing leaked, no traceback, the app alive at the end, and the app and
its worker gone when the check ends (also when this test fails or times out)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import end_group_id, start_group

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: A hang guard only: the fast subset takes about two minutes on an idle 2-core machine.
HANG_S = 900


def _end(proc: subprocess.Popen) -> None:
    """Stop the check and everything it started: SIGTERM first (the script then stops its
    app's process group and removes its folder), then SIGKILL to its own group and to any
    descendant still found (the app runs in a group of its own)."""
    import psutil
    try:
        kids = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        kids = []
    proc.terminate()
    try:
        proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        pass
    end_group_id(proc.pid)
    for k in kids:
        try:
            k.kill()
        except psutil.Error:
            pass
    proc.wait()


@pytest.mark.slow
# past HANG_S, so the check's own timeout (and _end, up to a minute more) comes before
# pytest-timeout's 600 s default, which would cut the cleanup short
@pytest.mark.timeout(HANG_S + 300)
def test_abuse_check_fast_subset():
    pytest.importorskip("gradio")
    psutil = pytest.importorskip("psutil")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("C2C_ALLOW_LOCAL_PATHS", None)
    # its own group, SIGKILLed at exit if still there (conftest): the script's watchdog then
    # stops the app's group and its worker
    proc = start_group([sys.executable, "scripts/abuse_check.py", "--fast"], cwd=ROOT, env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=HANG_S)
    finally:
        if proc.poll() is None:  # timed out (or this test was interrupted): end it all
            _end(proc)
    lines = stdout.strip().splitlines()
    assert lines, stderr[-3000:]
    counts = json.loads(lines[-1])
    report = stdout[-6000:]
    # the app and its worker were stopped by the script itself (its own finally)
    assert counts["app_pids"] and counts["left_running"] == [], report
    alive = [p for p in counts["app_pids"] if psutil.pid_exists(p)
             and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert alive == [], (alive, report)
    assert counts["app_alive"], report
    assert counts["leaks"] == 0, report
    assert counts["tracebacks"] == 0, report
    assert counts["not_refused"] == 0, report
    assert counts["failed"] == 0, report
    assert counts["refused_cleanly"] >= 30, report
    # issue 16: no refusal without a sentence, no crash, bombs refused without the server's
    # memory growing (the upload probes: Parquet and JSON bombs, gzip, sessions, tags)
    assert counts["bare_refusals"] == 0, report
    assert counts["crashes"] == 0, report
    assert counts["server_growth_mb_max"] < 500, report
    for probe in ("parquet bomb", "sessions: hashes 'x' and 'x!'", "<img> tags", "1.5 M steps",
                  # issue 29: a tiny list bomb, 200 MB bodies, another session's event stream
                  "parquet list bomb", "200 MB JSON body to /gradio_api/queue/join",
                  "200 MB chunked JSON body", "foreign queue/data",
                  # the Load tab's caps
                  "load rate 1e9 req/s", "load mode = ../../etc/passwd", "load SLO nan,inf"):
        assert probe in report or probe in stdout, (probe, report)
    # every probe's row says the server's RSS before, at its peak and after
    table = stdout[stdout.index("Server RSS"):]
    bomb = next(ln for ln in table.splitlines() if ln.startswith("parquet list bomb"))
    before, peak, after = (float(x) for x in bomb.split("refused", 1)[1].split()[1:4])
    assert 0 < before <= peak and after > 0, bomb
    assert proc.returncode == 0, report
