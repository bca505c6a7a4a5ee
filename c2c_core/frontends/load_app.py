"""The app's Load tab's job (frontends/ui/load_tab.py): the `load` command's sweep (load.LoadRun)
on the models the app holds, through our scheduler and HTTP server on a free local port."""

from __future__ import annotations

import asyncio

from .load import LoadRun

def app_load(pipe, cfg, items, *, writer, on_progress, should_stop, keep=False, modes=(),
             rates=(), num_requests: int = 6, slo: dict | None = None, slots: int = 4,
             max_queue: int = 32, max_prompt_tokens: int = 512, timeout: float = 300.0,
             burstiness: float = 1.0, seed: int = 0, max_error_rate: float = 0.05):
    """The Load tab's job (frontends/ui/load_tab.py), where the models are (the app's worker
    process, or its model thread): our scheduler over the loaded pipeline behind our HTTP
    server on a free local port, and the same open-loop sweep as the `load` command, so the
    app's numbers are the CLI's. Each finished request goes to `writer` and `on_progress`;
    Stop (`should_stop`) ends the sweep between requests, keeping every finished one; the run's
    summary.json and HTML page land beside the JSONL. Returns the points' statistics."""
    import argparse

    from ..bench.serving import Scheduler
    from ..measure import cancel
    from .serve import start_server
    prompts = [getattr(it, "prompt", it) for it in items]
    total = len(modes) * len(rates) * num_requests
    cancel.say(f"preparing {slots} slots for the sweep")
    # only the slot groups of this sweep's modes (a sharer group for t2t or sharer only)
    sched = Scheduler(pipe, cfg, slots, max_queue, None, max_prompt_tokens,
                      modes=list(modes)).start()
    handle = run = None
    args = argparse.Namespace(
        modes=list(modes), rates=list(rates), concurrency=None, burstiness=burstiness,
        duration=None, num_requests=num_requests, max_tokens=cfg.gen.max_new_tokens, seed=seed,
        timeout=timeout, slo=",".join(f"{k}={v:g}" for k, v in (slo or {}).items()) or None,
        max_error_rate=max_error_rate, find_max_goodput=False, url=None, output=writer.path)
    done = [0]

    class _Tee:  # every finished request: the file, then the page
        path = writer.path

        def write(self, rec):
            writer.write(rec)
            done[0] += 1
            on_progress(done[0], total, rec)

    try:
        handle = start_server(sched, host="127.0.0.1", port=0)
        run = LoadRun(args, handle.url, prompts, slo or {}, say=lambda line: cancel.say(
            line.split("] ", 1)[-1] if line.startswith("[") else line))
        run.writer = _Tee()
        on_progress(0, total, None)

        async def watched():
            task = asyncio.ensure_future(run.run())
            while not task.done():
                await asyncio.wait({task}, timeout=0.2)
                if should_stop() and not task.done():
                    task.cancel()
                    try:
                        await task
                    except asyncio.CancelledError:
                        pass
                    run.interrupted = True
                    return
            await task

        asyncio.run(watched())
    finally:
        if handle is not None:
            handle.close()
        sched.close()
        if run is not None and run.points:
            _app_outputs(run, writer.path)
    if should_stop():
        raise cancel.Cancelled()
    return run.points


#: app_load writes the run's own summary (a load summary), not the records' generic one.
app_load.writes_summary = True


def _app_outputs(run: "LoadRun", path: str) -> None:
    from ..report.load_plots import write_load_html
    from ..report.runreport import summary_path, write_json
    summary = run.summary()
    write_json(summary_path(path), summary)
    write_load_html(html_path(path), summary)


def html_path(jsonl: str) -> str:
    """The Load tab's report page beside its JSONL: load-….jsonl -> load-….html."""
    return (jsonl[:-6] if jsonl.endswith(".jsonl") else jsonl) + ".html"
