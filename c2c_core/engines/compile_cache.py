"""torch.compile's caches under the workbench cache folder (issue 19 part 2).

Inductor keeps what it compiled (FX graphs, AOTAutograd graphs, the C++/Triton kernels) in
`TORCHINDUCTOR_CACHE_DIR`, by default a folder under /tmp that a Space loses on restart. The fast
engine points it at `<C2C_CACHE>/torch-compile` before its first compile (a folder the user set
in TORCHINDUCTOR_CACHE_DIR is kept), so a second process finds the kernels of the first and only
traces. Whether the cache was warm is read from inductor's own counters (FX graph cache hits and
misses during the fast engine's warm-up), not guessed from the folder.
"""

from __future__ import annotations

import os

ENV = "TORCHINDUCTOR_CACHE_DIR"
SUBDIR = "torch-compile"


def folder() -> str:
    """Where the workbench keeps torch.compile's caches: <C2C_CACHE>/torch-compile."""
    from ..models.loading import cache_root
    return os.path.join(cache_root(), SUBDIR)


def _torch_default() -> str | None:
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
        return os.path.abspath(default_cache_dir())
    except Exception:  # noqa: BLE001 - another torch: treat any value as the user's
        return None


def setup() -> dict:
    """Point inductor's caches at folder() unless the user chose a folder, before anything
    compiles. Returns {dir, existed}: the folder in use and whether it held compiled graphs."""
    cur = os.environ.get(ENV)
    if not cur or os.path.abspath(cur) == _torch_default():  # torch writes its default back
        cur = folder()
        os.environ[ENV] = cur
    existed = os.path.isdir(os.path.join(cur, "fxgraph")) and any(
        files for _, _, files in os.walk(os.path.join(cur, "fxgraph")))
    return {"dir": cur, "existed": existed, "hits": 0, "misses": 0}


def counts() -> tuple[int, int]:
    """Inductor's FX graph cache (hits, misses) in this process so far."""
    try:
        from torch._dynamo.utils import counters
    except Exception:  # noqa: BLE001
        return 0, 0
    c = counters["inductor"]
    return int(c["fxgraph_cache_hit"]), int(c["fxgraph_cache_miss"])


def state(info: dict | None) -> str:
    """warm (every graph came from the cache), cold (none did), partly warm, or unused (nothing
    compiled through inductor: compile off, or every shape compiled earlier in this process)."""
    if not info:
        return "unused"
    h, m = info.get("hits", 0), info.get("misses", 0)
    if h and not m:
        return "warm"
    if m and not h:
        return "cold"
    return "partly warm" if h else "unused"


def describe(compile_s: float, info: dict | None) -> str:
    """'compile: 12.3 s (cache warm, /root/.cache/c2c-workbench/torch-compile)'."""
    where = f", {info['dir']}" if info else ""
    return f"compile: {compile_s:.1f} s (cache {state(info)}{where})"
