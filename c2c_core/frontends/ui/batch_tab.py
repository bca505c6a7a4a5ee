"""Batch tab: an editable prompt list (the 5 built-in prompts by default) → a results table that
fills in as records arrive, per-sample stage bars, and the JSONL download."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr
import pandas as pd

from ...report import analysis, plots
from ...spec.errors import UserError
from ...io.prompts import BUILTIN_PROMPTS, resolve_prompts
from ...bench.runner import modes_of
from . import guard
from .jobs import stream_records
from .render import download_button, plot, stop_button, records_table, sized, summary_button
from .runcfg import check_memory, run_config
from .sessions import new_run_path
from .texts import status_md, ui_message, user_error, md_text


@dataclass
class BatchTab:
    prompts: gr.Textbox
    run: gr.Button
    status: gr.Markdown
    table: gr.Dataframe
    plot: gr.Plot
    file: gr.DownloadButton
    stop: gr.Button
    summary: gr.DownloadButton | None = None  # after the run, beside its JSONL

    def outputs(self) -> list:
        return [self.status, self.table, self.plot, self.file]


def build_batch_tab() -> BatchTab:
    prompts = gr.Textbox("\n".join(BUILTIN_PROMPTS), lines=6, max_lines=20,
                         label="Prompts, one per line", elem_id="batch-prompts")
    with gr.Row():
        run = gr.Button("Run batch", variant="primary", elem_id="batch-run", scale=4)
        stop = stop_button("batch-stop")
        file = download_button("batch-file", scale=1, min_width=200)
        summary = summary_button("batch-summary", scale=1, min_width=200)
    status = gr.Markdown("Each prompt × repeat × mode is one record (one JSONL line).",
                         label="status", elem_id="batch-status", elem_classes=["c2c-status"], min_height=56)
    table = gr.Dataframe(records_table([]), label="Results (fills in as records arrive)",
                         interactive=False, elem_id="batch-table", max_height=360)
    fig = plot(plots.stage_bars_fig(pd.DataFrame()), "batch-plot")
    return BatchTab(prompts, run, status, table, fig, file, stop, summary)


def render(recs: list[dict], status: str, file, summary=None):
    fig = sized(plots.stage_bars_fig(analysis.to_frame(recs) if recs else pd.DataFrame()))
    return status, records_table(recs), fig, file


def check_batch(prompts: str, **settings):
    """The batch's checks that need no model (also its validator: run before it queues)."""
    guard.check_prompt_text(prompts, "The prompt list")
    lines = [p.strip() for p in (prompts or "").splitlines() if p.strip()]
    guard.check_prompts(lines)
    cfg = run_config(settings)
    guard.check_job_size(len(lines), cfg.repeats, len(modes_of(cfg)))
    if lines and cfg.batch_size > 1:  # a batch of the longest prompts, a character counted as a token
        check_memory(cfg, min(cfg.batch_size, len(lines)),
                     max(map(len, lines)) + cfg.gen.max_new_tokens)
    return lines, cfg


def run_batch(prompts: str, request: gr.Request, progress=gr.Progress(), **settings):
    """Run the prompt list (one per line); yields status, table, figure, JSONL as it goes."""
    try:
        lines, cfg = check_batch(prompts, **settings)
        items = resolve_prompts(prompts=lines)
    except UserError as e:
        # clear the last run's table and chart: they would read as this failed run's output
        yield render([], status_md(md_text(ui_message(e)), "error"), None)
        raise user_error(e) from None
    path = new_run_path(request, "batch")
    yield from stream_records(cfg, items, path, progress, render, unit="generation",
                              request=request)
