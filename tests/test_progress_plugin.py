"""The suite's own progress: each file's line ends with its time, and a long test says it is
still running (tests/progress_plugin.py), so a contributor never watches a silent terminal."""

from __future__ import annotations

import os
import re
import subprocess
import sys

TESTS = os.path.dirname(os.path.abspath(__file__))


def test_each_file_says_its_time_and_a_long_test_says_it_is_running(tmp_path):
    (tmp_path / "test_quick.py").write_text("def test_a():\n    pass\n")
    (tmp_path / "test_slow.py").write_text(
        "import time\n\ndef test_long():\n    time.sleep(2.5)\n")
    env = {**os.environ, "PYTHONPATH": TESTS, "C2C_TEST_HEARTBEAT_S": "1"}
    out = subprocess.run([sys.executable, "-m", "pytest", "-p", "progress_plugin", "-q",
                          "--no-header", "-o", "console_output_style=classic", "-rN",
                          "test_quick.py", "test_slow.py"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    text = out.stdout
    assert out.returncode == 0, text + out.stderr
    assert re.search(r"\[test_long: running [12] s\]", text), text
    assert re.search(r"\. \d+ s", text), text  # a file's time after its dots
