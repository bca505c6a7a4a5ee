"""Memory, measured: the peak resident set size sampled during a generation (CPU), the CUDA
allocator's peaks (GPU), and the weights of each part of the pipeline.

CPU: a poller thread reads the process's RSS every `interval_s` (5 ms) from the moment the
generation starts until it ends, plus once at each end, and keeps the largest value (the way
optimum-benchmark measures CPU memory). A read is `psutil.Process().memory_info().rss` (about
10 us on Linux, where psutil reads /proc/self/statm). Unknown memory is None (null in the
record), never 0.
"""

from __future__ import annotations

import threading
import time

import psutil
import torch

MB = 2**20  # the `_mb` fields are mebibytes

#: Poll period of the RSS sampler (optimum-benchmark polls every 1-5 ms; at 5 ms the poller costs
#: about 1.5% of a core on this 2-core CPU; spikes shorter than that between two reads
#: can be missed, which the README says).
POLL_INTERVAL_S = 0.005


def _psutil_reader():
    """A function returning this process's RSS in bytes, or None when it cannot be read.

    Against the hand-written pread of /proc/self/statm it replaced: 10 us a read instead of 1,
    the poller 1.5% of a core instead of 0.9%, and no measurable change in the timings of a
    small-op CPU loop (median ratio 0.99 over 40 interleaved runs)."""
    try:
        proc = psutil.Process()

        def read_rss() -> int | None:
            try:
                return proc.memory_info().rss
            except (psutil.Error, OSError, NotImplementedError):  # optional information
                return None

        return read_rss if read_rss() is not None else None
    except (psutil.Error, OSError, NotImplementedError):
        return None


_READ_RSS = None
_READ_LOCK = threading.Lock()


def rss_bytes() -> int | None:
    """This process's resident set size now, in bytes (None when the platform hides it)."""
    global _READ_RSS
    if _READ_RSS is None:
        with _READ_LOCK:
            if _READ_RSS is None:
                _READ_RSS = _psutil_reader() or (lambda: None)
    return _READ_RSS()


class PeakRSS:
    """Context manager: the peak RSS of the process while the block runs.

    `peak_mb` is None when RSS cannot be read. `samples` counts the reads (tests check the
    poller really ran)."""

    def __init__(self, interval_s: float = POLL_INTERVAL_S):
        self.interval_s = interval_s
        self.peak: int | None = None
        self.samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        v = rss_bytes()
        if v is not None:
            self.samples += 1
            if self.peak is None or v > self.peak:
                self.peak = v

    def _poll(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> "PeakRSS":
        self._sample()
        if self.peak is not None:  # nothing to poll on a platform without RSS
            self._thread = threading.Thread(target=self._poll, name="c2c-rss-poller", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()

    @property
    def peak_mb(self) -> float | None:
        return None if self.peak is None else self.peak / MB


class DeviceMemory:
    """The memory of one generation: CUDA allocator peaks on a GPU, the sampled peak RSS on a
    CPU. `enabled=False` measures nothing (both None): the timing-off variant of the overhead
    benchmark, so the sampler's cost is part of what that benchmark measures.

    On a CPU it also measures `cpu_share`: the CPU time this process got during the generation
    over wall time x torch's threads. About 1.0 when the torch threads had their cores (idle
    OpenMP threads spin, so they count as busy); clearly lower when another program took cores
    from them (a browser or a second job on the same machine), where CPU timings inflate far
    more than the share drops (one busy core on a 2-core machine: share 0.65, decode 3.8x
    slower). None on CUDA, where the host mostly waits on the GPU."""

    def __init__(self, device: torch.device, enabled: bool = True):
        self.device = device
        self.enabled = enabled
        self.cuda = device.type == "cuda"
        self._rss: PeakRSS | None = None
        self.allocated_mb: float | None = None
        self.reserved_mb: float | None = None
        self.cpu_share: float | None = None
        self.energy_j: float | None = None   # NVML's energy counter over the generation (CUDA)
        self._energy0: int | None = None
        self._open = False
        self._t0 = (0.0, 0.0)

    def __enter__(self) -> "DeviceMemory":
        if not self.enabled:
            return self
        self._open = True
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)  # this generation's peak only
            from .hardware import nvml_energy_mj
            self._energy0 = nvml_energy_mj(self.device)
        else:
            self._rss = PeakRSS().__enter__()
            self._t0 = (time.process_time(), time.perf_counter())
        return self

    def __exit__(self, *exc) -> None:
        """Read the peaks; a second call (an error path) changes nothing."""
        if not self._open:
            return
        self._open = False
        if self.cuda:
            try:
                self.allocated_mb = torch.cuda.max_memory_allocated(self.device) / MB
                self.reserved_mb = torch.cuda.max_memory_reserved(self.device) / MB
            except RuntimeError:  # e.g. after a device error: unknown, not zero
                pass
            if self._energy0 is not None:
                from .hardware import nvml_energy_mj
                e1 = nvml_energy_mj(self.device)
                if e1 is not None and e1 >= self._energy0:
                    self.energy_j = (e1 - self._energy0) / 1000.0
        elif self._rss is not None:
            cpu, wall = time.process_time() - self._t0[0], time.perf_counter() - self._t0[1]
            self._rss.__exit__(*exc)
            self.allocated_mb = self._rss.peak_mb
            if wall > 0:
                self.cpu_share = cpu / (wall * max(torch.get_num_threads(), 1))


def param_mb(module) -> float:
    """Bytes of a module's parameters, in MB (2**20 bytes)."""
    return sum(p.numel() * p.element_size() for p in module.parameters()) / MB


def weights_mb(receiver, sharer, fuser) -> dict:
    """Parameter memory per part (`sharer`: a model or a list of them, summed); `total` counts a
    sharer that is the receiver once."""
    fuser = getattr(fuser, "projectors", fuser)  # a projector.Fuser holds its modules there
    sharers = list(sharer) if isinstance(sharer, (list, tuple)) else [sharer]
    same = all(m is receiver for m in sharers)
    others = [m for m in sharers if m is not receiver]
    parts = {"receiver": param_mb(receiver),
             "sharer": param_mb(receiver) if same else sum(param_mb(m) for m in others),
             "fuser": param_mb(fuser)}
    unique = {id(p): p for m in [receiver, fuser] + others for p in m.parameters()}
    out = {k: round(v, 1) for k, v in parts.items()}
    out["total"] = round(sum(p.numel() * p.element_size() for p in unique.values()) / MB, 1)
    out["sharer_is_receiver"] = same
    return out


def describe_weights(w: dict) -> str:
    """"weights: receiver 257 MB, sharer = receiver, fuser 40 MB (297 MB)"."""
    sharer = "sharer = receiver" if w.get("sharer_is_receiver") else f"sharer {w['sharer']:,.0f} MB"
    return (f"weights: receiver {w['receiver']:,.0f} MB, {sharer}, fuser {w['fuser']:,.0f} MB"
            f" ({w['total']:,.0f} MB)")
