"""The Gradio web app: the only package that imports gradio.

`build_app()` creates the Blocks (model panel and run settings in a sidebar; Profile, Batch,
Dataset and Results tabs) and wires every event in one place; `launch_kwargs()` holds what
`launch()` needs (theme, css, upload limit). Model work shares one queue slot
(`concurrency_limit=1`); each tab's run is also a named API endpoint (`profile`, `batch`,
`dataset`, `analyze`) for `gradio_client`.
"""

from __future__ import annotations

import threading

import gradio as gr

from ...spec.config import build_run_config, default_preset
from . import (batch_tab, dataset_tab, durations, fairqueue, gate, guard, load_tab,
    model_panel, profile_tab, results_tab, sweep_tab)
from .durations import gpu
from .jobs import MAX_UPLOAD, MODEL_QUEUE
from .render import enable_download, offer_summary, show_files
from .runcfg import MODELS, load_models, models_status
from .sessions import PageConnections, purge_old_sessions, sweep_sessions
from .texts import WAITING_JS, validator

#: Jobs waiting in gradio's queue at most (a full queue refuses new ones at once).
MAX_QUEUE = guard._env_int("C2C_MAX_QUEUE", 64)

TITLE = "C2C timing workbench"
INTRO = ("Time **Cache-to-Cache** inference stage by stage: the receiver and the sharer prefill"
         " the prompt, projectors write the sharer's KV cache into the receiver's, and the"
         " receiver decodes. Pick models on the left, then profile one prompt, run a batch or a"
         " dataset, and compare result files.")

CSS = """
.c2c-header h1 { margin-bottom: 0.1em; }
.c2c-header p { margin-top: 0; color: var(--body-text-color-subdued); }
.c2c-status { min-height: 1.6em; }
.c2c-models { padding: 0.45em 0.8em; border-radius: var(--radius-md);
              background: var(--background-fill-secondary); font-size: 0.95em; }
.c2c-models p { margin: 0; }
.c2c-note { font-size: 0.92em; color: var(--body-text-color-subdued); }
.c2c-note p { margin: 0.2em 0; }
footer { display: none !important; }
/* a run's progress box goes below its status line, in the flow, not over it (gradio places it
   absolutely over the whole component, which hid the status text while a job ran) */
.block.c2c-status { display: flex; flex-direction: column; }
.block.c2c-status > [data-testid="status-tracker"] {
  position: relative !important; inset: auto !important; order: 2; width: 100% !important;
  height: auto !important; min-height: 3.2em; padding: 0.2em 0 !important;
  background: transparent !important; }
.block.c2c-status > [data-testid="status-tracker"].hide { min-height: 0; padding: 0 !important; }
/* and the line stays readable while the job runs (gradio fades a pending markdown to 0.2) */
.block.c2c-status [data-testid="markdown-wrapper"].pending { opacity: 1 !important; }
/* a running job's line (it holds a .c2c-live mark) carries the one elapsed clock, counted from
   the start: gradio's own timer beside it, which restarts at every update, is hidden */
.block.c2c-status:has(.c2c-live) > [data-testid="status-tracker"] .progress-text {
  display: none !important; }
/* and the bar's words repeat that line: the bar alone is shown */
.block.c2c-status:has(.c2c-live) > [data-testid="status-tracker"] .progress-level-inner {
  display: none !important; }
/* a failed run says why in its status line and in a toast: no "Error" badge over the line */
:is(#model-status, #profile-status, #batch-status, #dataset-status, #load-status,
     #results-status)
  > [data-testid="status-tracker"]:has(> .error) { display: none !important; }
"""


def launch_kwargs() -> dict:
    """Keyword arguments for `demo.launch()` (host and port stay with gradio's settings)."""
    from starlette.middleware import Middleware
    gate.bound_logs()  # no log record holds more than 2 KB of a request's values
    return {"theme": gr.themes.Soft(primary_hue="teal", secondary_hue="slate"), "css": CSS,
            "max_file_size": MAX_UPLOAD,
            # outermost first: every body capped before anything reads it (gate.BodyLimit);
            # every request carries a session key the server minted (guard.SessionCookie); a
            # session hash is used only under the cookie that first named it
            # (gate.StreamOwners); the pages (tabs) each session has open, so that it ends only
            # once the last has gone (sessions.PageConnections); total bytes per upload request (max_file_size is per file),
            # charged to the session the cookie names; the fair queue notes which clients have
            # their message stream open
            "app_kwargs": {"middleware": [Middleware(gate.BodyLimit),
                                          Middleware(guard.SessionCookie),
                                          Middleware(gate.StreamOwners),
                                          Middleware(PageConnections),
                                          Middleware(guard.UploadLimit),
                                          Middleware(fairqueue.Connections)]}}


def preload(defaults: dict | None = None, background: bool = True) -> threading.Thread | None:
    """Load the default models now (in a thread unless `background` is False), where jobs
    run: in the worker process, or in this one on ZeroGPU / with C2C_APP_WORKER=0."""
    d = dict(defaults or {})
    fixed = {k: d.pop(k) for k in ("preset", "base_model", "teacher_model", "fuser") if k in d}
    cfg = build_run_config(fixed.get("preset") or default_preset(), fixed.get("base_model"),
                           fixed.get("teacher_model"), fixed.get("fuser"),
                           **{k: v for k, v in d.items() if k in (
                               "device", "dtype", "hidden_dim", "intermediate_dim",
                               "num_layers")})

    if guard.models_fixed():
        MODELS.fix(cfg)  # the operator's pair: clients can neither swap nor unload it

    def work():
        try:
            load_models(cfg)
        except Exception as e:  # noqa: BLE001 - the first run reports it in the page
            print(f"Preloading {cfg.preset} failed: {e}")

    if not background:
        work()
        return None
    t = threading.Thread(target=work, daemon=True, name="c2c-preload")
    t.start()
    return t


def build_app(defaults: dict | None = None) -> gr.Blocks:
    """The Blocks app. `defaults` pre-fills the model panel and run settings, using
    build_run_config's keyword names (preset, base_model, teacher_model, fuser, device, dtype,
    hidden_dim, intermediate_dim, num_layers, mode, max_new_tokens, warmup, repeats, ...)."""
    defaults = dict(defaults or {})
    from ...io.hub import check_in_background
    check_in_background()  # the Dataset tab's default follows it; it runs while the panel builds
    purge_old_sessions()
    gate.file_refusals_in_words()  # a file input naming a path no upload stored: a sentence
    with gr.Blocks(title=TITLE, fill_width=True, delete_cache=(3600, 24 * 3600)) as demo:
        gr.Markdown(f"# {TITLE}\n{INTRO}", elem_classes=["c2c-header"])
        with gr.Sidebar(width=370, label="Settings"):
            panel = model_panel.build_model_panel(defaults)
            settings = model_panel.build_run_settings(defaults)
        panel.status = gr.Markdown(models_status(), label="models", elem_id="model-status",
                                   elem_classes=["c2c-models"])
        with gr.Tabs():
            with gr.Tab("Profile", id="profile"):
                prof = profile_tab.build_profile_tab()
            with gr.Tab("Batch", id="batch"):
                batch = batch_tab.build_batch_tab()
            with gr.Tab("Dataset", id="dataset"):
                data = dataset_tab.build_dataset_tab()
            with gr.Tab("Sweep", id="sweep"):
                sweep = sweep_tab.build_sweep_tab()
            with gr.Tab("Load", id="load"):
                load = load_tab.build_load_tab()
            with gr.Tab("Results", id="results") as results_tab_item:
                res = results_tab.build_results_tab()
        _wire(demo, panel, settings, prof, batch, data, sweep, res, results_tab_item, load)
    demo.queue(default_concurrency_limit=4, max_size=MAX_QUEUE)
    fairqueue.install(demo)  # model jobs: clients that are there, one waiting per session
    return demo


def _wire(demo, panel, settings, prof, batch, data, sweep, res, results_tab_item,
          load) -> None:
    """Every event of the app, in one place."""
    model_kw = {**panel.inputs(), **settings.inputs()}
    model_job = dict(concurrency_limit=1, concurrency_id=MODEL_QUEUE)

    panel.preset.change(model_panel.on_preset, panel.preset,
                        [panel.receiver, panel.sharer, panel.fuser, panel.note],
                        api_visibility="private", queue=False)
    # on ZeroGPU each job asks for GPU seconds computed from its own size (durations.py)
    panel.load.click(gpu(durations.load_models)(model_panel.load_models),
                     inputs_kwargs=panel.inputs(),
                     outputs=panel.status, api_name="load_models", show_progress_on=panel.status,
                     validator=validator(model_panel.check_load), **model_job)
    # the status line follows a background load (app start) until the models are in
    poll = gr.Timer(2.0, active=False)
    demo.load(model_panel.model_status_poll, None, [panel.status, poll], api_visibility="private",
              queue=False, show_progress="hidden")
    # a new tab shows the pair the server holds now, not the preset default
    demo.load(model_panel.held_settings, None,
              [panel.preset, panel.receiver, panel.sharer, panel.fuser, panel.device, panel.dtype],
              api_visibility="private", queue=False, show_progress="hidden")
    poll.tick(model_panel.model_status_poll, None, [panel.status, poll], api_visibility="private",
              queue=False, show_progress="hidden")

    # each run: first a browser-side "waiting" line, then the queued model job (the endpoint)
    def waiting(button, status):
        # the models' status line follows the run (it may load another pair for everyone)
        button.click(lambda: gr.Timer(active=True), None, poll, api_visibility="private",
                     queue=False, show_progress="hidden")
        return button.click(None, None, status, js=WAITING_JS, api_visibility="private",
                            queue=False, show_progress="hidden")

    ev_prof = waiting(prof.run, prof.status).then(
        gpu(durations.profile)(profile_tab.run_profile), inputs=[prof.prompt],
        inputs_kwargs=model_kw,
        outputs=prof.outputs(), api_name="profile", show_progress_on=[prof.status],
        validator=validator(profile_tab.check_profile), **model_job)
    # the Profile tab's token alignment (tokenizers only): beside the job, not in its endpoint
    prof.run.click(profile_tab.show_alignment, inputs=[prof.prompt], inputs_kwargs=model_kw,
                   outputs=prof.align_outputs(), api_visibility="private",
                   show_progress="hidden", concurrency_limit=2, concurrency_id="alignment")
    ev_batch = waiting(batch.run, batch.status).then(
        gpu(durations.batch)(batch_tab.run_batch), inputs=[batch.prompts],
        inputs_kwargs=model_kw,
        outputs=batch.outputs(), api_name="batch", show_progress_on=[batch.status],
        validator=validator(batch_tab.check_batch), **model_job)
    ev_data = waiting(data.run, data.status).then(
        gpu(durations.dataset)(dataset_tab.run_dataset), inputs=list(data.inputs().values()),
        inputs_kwargs=model_kw, outputs=data.outputs(), api_name="dataset",
        show_progress_on=[data.status], validator=validator(dataset_tab.check_dataset),
        **model_job)
    ev_sweep = waiting(sweep.run, sweep.status).then(
        gpu(durations.sweep)(sweep_tab.run_sweep_ui),
        inputs=[sweep.input_lens, sweep.output_lens, sweep.batch_sizes],
        inputs_kwargs=model_kw, outputs=sweep.outputs(), api_name="sweep",
        show_progress_on=[sweep.status], validator=validator(sweep_tab.check_sweep),
        **model_job)
    ev_load = waiting(load.run, load.status).then(
        gpu(durations.load)(load_tab.run_load_ui), inputs=load.inputs(), inputs_kwargs=model_kw,
        outputs=load.outputs(), api_name="load", show_progress_on=[load.status],
        validator=validator(load_tab.check_load), **model_job)
    for tab in (prof, batch, data, sweep, load):  # Stop ends this session's running job, any tab's,
        # and removes its job still waiting in the queue
        tab.stop.click(fairqueue.stop_run, None, tab.status, api_visibility="private",
                       concurrency_limit=None, show_progress="hidden")
    data.prompt_file.upload(lambda: "file", None, data.source, queue=False,
                            api_visibility="private")

    # after each run: its downloads, the status line (memory), the Results tab's run list
    private = dict(api_visibility="private", queue=False, show_progress="hidden")
    ev_prof.then(show_files, prof.files, prof.files, **private)
    ev_batch.then(enable_download, batch.file, batch.file, **private)
    ev_data.then(enable_download, data.file, data.file, **private)
    ev_sweep.then(enable_download, sweep.file, sweep.file, **private)
    ev_load.then(enable_download, load.file, load.file, **private)
    for ev, tab in ((ev_batch, batch), (ev_data, data), (ev_sweep, sweep), (ev_load, load)):
        ev.then(offer_summary, tab.file, tab.summary, **private)
    for ev in (ev_prof, ev_batch, ev_data, ev_sweep, ev_load):
        ev.then(model_panel.model_status, None, panel.status, api_visibility="private",
                queue=False)
        ev.then(results_tab.refresh_runs, None, res.runs, api_visibility="private", queue=False)
    results_tab_item.select(results_tab.refresh_runs, None, res.runs, api_visibility="private",
                            queue=False)

    res.analyze.click(results_tab.analyze, res.inputs(), res.outputs(), api_name="analyze",
                      show_progress_on=[res.status])
    for dd in (res.file_a, res.file_b):
        dd.input(results_tab.compare_pair, [*res.inputs(), res.file_a, res.file_b],
                 res.compare_outputs(), api_visibility="private")
    # a page's close ends no session: sessions.PageConnections ends one once the last of its
    # pages has gone for the grace period. (An unload event is also what makes gradio's page
    # open the heartbeat stream that PageConnections counts.)
    demo.unload(sweep_sessions)


__all__ = ["build_app", "launch_kwargs", "preload"]
