"""Issue 19 part 2 (compile cache under C2C_CACHE) and the `engines` lines of parts 2-4, on a
temporary C2C_CACHE. The cross-process figure (second process <= 0.35 x the first's compile)
is a benchmark: scripts/compile_cache_check.py."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch

from c2c_core.engines import compile_cache


@pytest.fixture()
def tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("C2C_CACHE", str(tmp_path / "c2c"))
    monkeypatch.delenv(compile_cache.ENV, raising=False)  # restored after the test
    return tmp_path / "c2c"


def test_inductor_caches_go_under_the_workbench_cache(tmp_cache, monkeypatch):
    info = compile_cache.setup()
    want = str(tmp_cache / "torch-compile")
    assert info == {"dir": want, "existed": False, "hits": 0, "misses": 0}
    assert os.environ[compile_cache.ENV] == want
    # torch writes its own default back into the variable after a compile: still ours
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    monkeypatch.setenv(compile_cache.ENV, default_cache_dir())
    assert compile_cache.setup()["dir"] == want
    # a folder the user chose is kept
    monkeypatch.setenv(compile_cache.ENV, str(tmp_cache / "mine"))
    assert compile_cache.setup()["dir"] == str(tmp_cache / "mine")


def test_a_compile_writes_its_graphs_there_and_says_cold_then_warm(tmp_cache):
    info = compile_cache.setup()
    h0, m0 = compile_cache.counts()
    torch._dynamo.reset()
    f = torch.compile(lambda x: torch.sin(x) * 3.25 + 0.125)  # a graph no other test compiles
    f(torch.ones(8))
    h1, m1 = compile_cache.counts()
    info.update(hits=h1 - h0, misses=m1 - m0)
    assert compile_cache.state(info) == "cold"
    assert compile_cache.setup()["existed"]  # the next process finds the graph
    torch._dynamo.reset()                    # as a new process would: only the disk cache left
    torch.compile(lambda x: torch.sin(x) * 3.25 + 0.125)(torch.ones(8))
    h2, m2 = compile_cache.counts()
    assert (h2 - h1, m2 - m1) == (1, 0)


def test_cache_states_and_the_line_engines_prints():
    assert compile_cache.state(None) == "unused"
    assert compile_cache.state({"hits": 2, "misses": 0}) == "warm"
    assert compile_cache.state({"hits": 0, "misses": 2}) == "cold"
    assert compile_cache.state({"hits": 1, "misses": 1}) == "partly warm"
    assert compile_cache.describe(12.34, {"dir": "/c/torch-compile", "hits": 1, "misses": 0}) \
        == "compile: 12.3 s (cache warm, /c/torch-compile)"


# slow: a whole `engines` run (~25 s under load);
# quick: test_cache_states_and_the_line_engines_prints, the cold/warm compile above
@pytest.mark.slow
def test_engines_prints_floor_ratio_compile_cache_and_reuse_ratio(tiny_pipe, tmp_cache, monkeypatch):
    from c2c_core.engines import fast
    from c2c_core.measure import hardware
    from c2c_core.bench.compare_engines import engines_bench
    monkeypatch.delenv(hardware.BANDWIDTH_ENV, raising=False)
    pipe, cfg = tiny_pipe
    fast.engine_for(pipe, compile=False)
    lines = []
    res = engines_bench(pipe, replace(cfg, gen=replace(cfg.gen, max_new_tokens=4)), repeats=3,
                        batch=2, out=lines.append)
    text = "\n".join(lines)
    assert "decode floor: null (cpu: memory bandwidth unknown" in text
    assert "decode/floor ratio: null" in text
    assert "compile: " in text and "(cache unused)" in text
    assert "cache reuse ratio 1.0" in text
    assert res["decode_floor_ms"] is None and res["fast_decode_floor_ratio"] is None
    assert res["compile_cache"] == "unused" and res["cache_reuse_ratio"] == 1.0
    # both engines' peaks side by side (compare reserved: the fast engine's graphs are there),
    # and the graph memory beside the caches
    assert "+ 0.0 MB of graph memory" in text and "peak memory (medians): eager" in text
    # with a bandwidth given, the ratio is printed
    monkeypatch.setenv(hardware.BANDWIDTH_ENV, "10")
    lines.clear()
    res = engines_bench(pipe, replace(cfg, gen=replace(cfg.gen, max_new_tokens=4)), repeats=3,
                        batch=2, out=lines.append)
    assert res["decode_floor_ms"] > 0 and res["fast_decode_floor_ratio"] > 0
    assert "decode/floor ratio: fast" in "\n".join(lines)
