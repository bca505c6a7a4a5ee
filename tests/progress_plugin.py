"""Progress a contributor can follow while the suite runs: each file's line ends with the
seconds it took, and a test running longer than a minute (some load models or drive a browser)
says so once a minute, so the suite never looks hung. Off under pytest-xdist (`-n`), whose
workers report on their own. Loaded by tests/conftest.py; `-p progress_plugin` elsewhere."""

from __future__ import annotations

import os

import pytest

_PROGRESS = {"file": None, "t0": 0.0, "test": None, "since": 0.0, "timer": None}
HEARTBEAT_S = float(os.environ.get("C2C_TEST_HEARTBEAT_S") or 60)


def _reporter(config):
    if getattr(config.option, "numprocesses", None):
        return None
    return config.pluginmanager.get_plugin("terminalreporter")


def _write_now(tr, text: str) -> None:
    """Write to the terminal while a test runs: its output is captured at the file-descriptor
    level then, so write to the terminal's saved descriptor (pytest's capture manager keeps
    it); else through the reporter."""
    capman = _CONFIG[0].pluginmanager.getplugin("capturemanager") if _CONFIG else None
    out = getattr(getattr(capman, "_global_capturing", None), "out", None)
    fd = getattr(out, "targetfd_save", None)
    if isinstance(fd, int):
        try:
            os.write(fd, text.encode())
            return
        except OSError:
            pass
    tr.write(text)


def _heartbeat(tr):
    import time as _time
    test, since = _PROGRESS["test"], _PROGRESS["since"]
    if test is not None:
        _write_now(tr, f" [{test.split('::', 1)[-1]}: running"
                       f" {_time.perf_counter() - since:.0f} s]")
        _arm(tr)


def _arm(tr):
    import threading as _threading
    t = _threading.Timer(HEARTBEAT_S, _heartbeat, args=(tr,))
    t.daemon = True
    _PROGRESS["timer"] = t
    t.start()


def _end_file(tr):
    import time as _time
    if _PROGRESS["file"] is not None:
        tr.write(f" {_time.perf_counter() - _PROGRESS['t0']:.0f} s")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_logstart(nodeid, location):
    import time as _time
    tr = _reporter(_CONFIG[0]) if _CONFIG else None
    if tr is None:
        return
    file = nodeid.split("::", 1)[0]
    if file != _PROGRESS["file"]:
        _end_file(tr)
        _PROGRESS["file"], _PROGRESS["t0"] = file, _time.perf_counter()
    if _PROGRESS["timer"] is not None:
        _PROGRESS["timer"].cancel()
    _PROGRESS["test"], _PROGRESS["since"] = nodeid, _time.perf_counter()
    _arm(tr)


def pytest_runtest_logfinish(nodeid, location):
    if _PROGRESS["timer"] is not None:
        _PROGRESS["timer"].cancel()
    _PROGRESS["test"] = None


_CONFIG: list = []


def pytest_configure(config):
    _CONFIG[:] = [config]


def pytest_sessionfinish(session):
    tr = _reporter(session.config)
    if tr is not None:
        _end_file(tr)
        _PROGRESS["file"] = None
