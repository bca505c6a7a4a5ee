"""Sweep tab: synthetic prompts of exact token lengths x fixed output lengths (EOS ignored), in
any mode; the stage-vs-prompt-length plot shows where C2C's extra cost goes as prompts grow."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import gradio as gr
import pandas as pd

from ...report import analysis, plots
from ...spec.errors import UserError
from ...bench.sweep import parse_lengths
from ..worker import sweep_grid
from ...bench.runner import modes_of
from . import guard
from .jobs import stream_records
from .render import download_button, plot, records_table, stop_button, sized, summary_button
from .runcfg import check_memory, run_config
from .sessions import new_run_path
from .texts import status_md, ui_message, user_error, md_text


@dataclass
class SweepTab:
    input_lens: gr.Textbox
    output_lens: gr.Textbox
    batch_sizes: gr.Textbox
    run: gr.Button
    status: gr.Markdown
    plot: gr.Plot
    table: gr.Dataframe
    file: gr.DownloadButton
    batch_plot: gr.Plot
    stop: gr.Button
    summary: gr.DownloadButton | None = None  # after the run, beside its JSONL

    def outputs(self) -> list:
        return [self.status, self.table, self.plot, self.file, self.batch_plot]


def build_sweep_tab() -> SweepTab:
    with gr.Row():
        ins = gr.Textbox("16,64,256", label="Prompt lengths (tokens)", elem_id="sweep-in",
                         info="exact ids fed to the model, no chat template")
        outs = gr.Textbox("32", label="Output lengths (tokens)", elem_id="sweep-out",
                          info="EOS ignored: every run makes exactly this many")
        bss = gr.Textbox("1", label="Batch sizes", elem_id="sweep-batch",
                         info="e.g. 1,4,8: latency vs throughput (fast engine)")
    with gr.Row():
        run = gr.Button("Run sweep", variant="primary", elem_id="sweep-run", scale=4)
        stop = stop_button("sweep-stop")
        file = download_button("sweep-file", scale=1, min_width=200)
        summary = summary_button("sweep-summary", scale=1, min_width=200)
    status = gr.Markdown("Each length pair × mode × repeat is one record; the mode and repeats"
                         " come from the run settings on the left.", elem_id="sweep-status",
                         elem_classes=["c2c-status"], min_height=56)
    fig = plot(plots.sweep_fig(pd.DataFrame()), "sweep-plot", 420)
    bfig = plot(plots.batch_curve_fig([]), "sweep-batch-plot", 380)
    table = gr.Dataframe(records_table([]), label="Results (fills in as records arrive)",
                         interactive=False, elem_id="sweep-table", max_height=300)
    return SweepTab(ins, outs, bss, run, status, fig, table, file, bfig, stop, summary)


def render(recs: list[dict], status: str, file, summary=None):
    if isinstance(file, str) and summary is not None and summary.count > len(recs):
        # the run's end, more records than the live rows: draw every shape, from the file
        from ...io.records import iter_jsonl
        recs_all = list(iter_jsonl(file))
    else:
        recs_all = list(recs)
    df = analysis.to_frame(recs_all) if recs_all else pd.DataFrame()
    fig = sized(plots.sweep_fig(df), 420)
    bfig = sized(plots.batch_curve_fig(recs_all), 380)
    return status, records_table(recs), fig, file, bfig


def check_sweep(input_lens: str, output_lens: str, batch_sizes: str = "1", **settings):
    """The sweep's checks that need no model (also its validator: run before it queues)."""
    guard.check_short(input_lens, "Prompt lengths")
    guard.check_short(output_lens, "Output lengths")
    guard.check_short(batch_sizes or "1", "Batch sizes")
    ins = parse_lengths(input_lens, "Prompt lengths")
    outs = parse_lengths(output_lens, "Output lengths")
    bss = parse_lengths(batch_sizes or "1", "Batch sizes")
    cfg = run_config(settings)
    for n in outs:
        if n > 8192:
            raise UserError(f"Output length {n} is out of range; use 1 to 8192.")
        guard.check_new_tokens(n)
    if any(b > 1 for b in bss) and cfg.engine == "eager":
        raise UserError("Batch sizes above 1 need the fast engine; pick engine fast or auto.")
    if any(b > 1024 for b in bss):
        raise UserError(f"Batch sizes {batch_sizes} must be between 1 and 1024.")
    guard.check_sweep(ins, outs)
    from ...engines.limits import check_sweep_context
    check_sweep_context(cfg, ins, outs)  # the models' contexts, from their config files
    guard.check_job_size(len(ins) * len(outs) * sum(bss), cfg.repeats, len(modes_of(cfg)))
    # the largest point's KV cache: the biggest batch at the longest prompt + output
    check_memory(cfg, max(bss), max(ins) + max(outs),
                 f"The sweep's largest point (batch {max(bss)}, {max(ins) + max(outs):,} tokens)")
    return ins, outs, bss, cfg


def run_sweep_ui(input_lens: str, output_lens: str, batch_sizes: str = "1",
                 request: gr.Request = None, progress=gr.Progress(), **settings):
    """Run the length grid; yields status, table, plot and the JSONL as records arrive."""
    try:
        ins, outs, bss, cfg = check_sweep(input_lens, output_lens, batch_sizes, **settings)
    except UserError as e:
        # clear the last run's table and chart: they would read as this failed run's output
        yield render([], status_md(md_text(ui_message(e)), "error"), None)
        raise user_error(e) from None
    path = new_run_path(request, "sweep")
    runner = partial(sweep_grid, ins=ins, outs=outs, bss=bss)  # pickles: it travels to the worker
    from ...bench.sweep import sweep_plan
    yield from stream_records(cfg, [], path, progress, render, unit="generation", runner=runner,
                              request=request, plan=sweep_plan(cfg, ins, outs, bss))
