"""The abuse check's fast subset, as CI runs it: the app started the way a Space runs it, every
probe refused cleanly, nothing leaked, no traceback, the app alive at the end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_abuse_check_fast_subset():
    pytest.importorskip("gradio")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("C2C_ALLOW_LOCAL_PATHS", None)
    out = subprocess.run([sys.executable, "scripts/abuse_check.py", "--fast"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=900)
    lines = out.stdout.strip().splitlines()
    assert lines, out.stderr[-3000:]
    counts = json.loads(lines[-1])
    report = out.stdout[-6000:]
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
    for probe in ("parquet bomb", "sessions: hashes 'x' and 'x!'", "<img> tags", "1.5 M steps"):
        assert probe in report or probe in out.stdout, (probe, report)
    assert out.returncode == 0, report
