"""The fast engine's pieces that matter on a GPU: `capture`, a prefill or the projection as one
CUDA graph (the engine's `_ready_callable` picks it on CUDA), and `Ended`, the late "every row
ended" check that keeps the next decode step queued on the device (engine.eos_lag)."""

from __future__ import annotations

import torch


def capture(fn, static: tuple, device, pool, reset=None, stream=None, warm_stream=None):
    """fn(*static) as one CUDA graph on `device`: two warm-up runs on `warm_stream` (lazy
    initialisations), then the capture on `stream`. Everything runs under
    torch.cuda.device(device), so nothing uses another current device (a capture whose kernels
    ran elsewhere would be an empty graph whose replays do nothing). `stream` and
    `warm_stream`: the engine's one capture stream and one warm-up stream of `device` (default:
    new ones). They differ so that nothing ever runs on the capture stream outside a capture:
    its cuBLAS workspace is then always allocated inside a capture, in `pool`, where the graphs
    that use it keep it. The returned callable copies its arguments into the
    graph's input buffers (`static`), replays it and returns the captured call's output: the
    same tensors every replay, overwritten by the next one (a decode step's token: clone it;
    fills and the projection return nothing, they write into the static caches, whose
    addresses are fixed). `pool`: a memory pool shared with graphs that never run at once (an
    output must be cloned before another of them runs)."""
    with torch.cuda.device(device):
        side = warm_stream if warm_stream is not None else torch.cuda.Stream(device)
        stream = stream if stream is not None else torch.cuda.Stream(device)
        for st in (side, stream):
            assert st.device == torch.device(device) or torch.device(device).index is None, (
                f"a stream on {st.device}, a graph for {device}")
        cur = torch.cuda.current_stream(device)
        side.wait_stream(cur)
        with torch.cuda.stream(side):
            for _ in range(2):
                if reset is not None:
                    reset()
                fn(*static)
        cur.wait_stream(side)
        torch.cuda.synchronize(device)
        if reset is not None:
            reset()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, stream=stream):
            out = fn(*static)

    def replay(*args):
        if len(args) != len(static):
            raise TypeError(f"a captured graph takes {len(static)} inputs, not {len(args)}")
        for buf, a in zip(static, args):
            if a is not buf:
                if a.shape != buf.shape:  # copy_ would broadcast a wrong shape silently
                    raise ValueError(f"captured for an input of shape {tuple(buf.shape)},"
                                     f" given {tuple(a.shape)}")
                buf.copy_(a)
        graph.replay()
        return out

    replay.graph = graph
    return replay


class Ended:
    """Whether every row of a batch has ended, read `lag` steps late: the flag of each step is
    copied to the host without waiting (pinned memory, an event); all() waits only for the step
    `lag` before the newest, so the newest can still be running. lag 0: read now (a sync). The
    pinned buffers and events are made once, here (outside any span), and used in turn."""

    def __init__(self, done: torch.Tensor | None, lag: int, cuda: bool):
        self.lag, self.cuda, self.done = lag, cuda, done
        self.count = 0  # flags written
        n = lag + 2     # the slot read (count-1-lag) is never the next one written
        if lag and cuda:
            self.slots = [(torch.empty((), dtype=torch.bool, pin_memory=True), torch.cuda.Event())
                          for _ in range(n)]
        else:
            self.slots = [None] * n
        if done is not None:
            self.update(done)

    def update(self, done: torch.Tensor) -> None:
        self.done = done
        if not self.lag:
            return
        k = self.count % len(self.slots)
        flag = done.all()
        if self.cuda:
            host, ev = self.slots[k]
            host.copy_(flag, non_blocking=True)  # on the current stream of flag's device ...
            ev.record(torch.cuda.current_stream(flag.device))  # ... so the event goes there
        else:
            self.slots[k] = flag
        self.count += 1

    def all(self) -> bool:
        if self.done is None:
            return False
        if not self.lag:
            return bool(self.done.all())
        if self.count <= self.lag:
            return False
        slot = self.slots[(self.count - 1 - self.lag) % len(self.slots)]
        if self.cuda:
            host, ev = slot
            ev.synchronize()
            return bool(host)
        return bool(slot)
