"""Dataset tab: prompts from a Hugging Face dataset or an uploaded JSONL/CSV/Parquet file, a
progress bar with ETA, a Stop button that keeps every finished record, and the JSONL download."""

from __future__ import annotations

import os
from dataclasses import dataclass

import gradio as gr
import pandas as pd

from ...report import analysis, plots
from ...spec.errors import UserError
from ...io.prompts import check_file_type, resolve_prompts, skipped_note
from ...bench.runner import modes_of
from . import guard
from .jobs import stream_records
from .render import (download_button, integer_counts, plot, records_table, sized, stop_button,
    summary_button)
from .runcfg import run_config
from .sessions import clear_stop, session_id, new_run_path, request_stop, stop_flag
from .texts import status_md, ui_message, user_error, md_text

SOURCES = [("Hugging Face dataset", "hf"), ("Uploaded file", "file")]


@dataclass
class DatasetTab:
    source: gr.Radio
    dataset_name: gr.Textbox
    dataset_config: gr.Textbox
    split: gr.Textbox
    prompt_file: gr.File
    num_samples: gr.Number
    offset: gr.Number
    text_field: gr.Textbox
    skip_bad_lines: gr.Checkbox
    run: gr.Button
    stop: gr.Button
    status: gr.Markdown
    table: gr.Dataframe
    plot: gr.Plot
    file: gr.DownloadButton
    summary: gr.DownloadButton | None = None  # after the run, beside its JSONL

    def inputs(self) -> dict:
        names = ["source", "dataset_name", "dataset_config", "split", "prompt_file",
                 "num_samples", "offset", "text_field", "skip_bad_lines"]
        return {n: getattr(self, n) for n in names}

    def outputs(self) -> list:
        return [self.status, self.table, self.plot, self.file]


def build_dataset_tab() -> DatasetTab:
    # where the hub cannot be used (HF_*_OFFLINE set, or its endpoint unreachable: checked once
    # per process, in at most hub.PROBE_TIMEOUT_S), a hub dataset can only be refused: open on
    # the shipped sample prompts instead
    from ...spec.config import ASSETS
    from ...io.hub import hub_online
    offline = not hub_online(datasets=True)
    sample = os.path.join(ASSETS, "sample_prompts.jsonl") if offline else None
    source = gr.Radio(SOURCES, value="file" if offline else "hf", label="Prompts from",
                      elem_id="dataset-source")
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            with gr.Group():
                with gr.Row():
                    name = gr.Textbox("gsm8k", label="Hugging Face dataset",
                                      info="e.g. gsm8k, cais/mmlu (cached or online)",
                                      elem_id="dataset-name")
                    config = gr.Textbox("", label="config", placeholder="gsm8k: main · mmlu: all")
                    split = gr.Textbox("test", label="split")
        with gr.Column(scale=2):
            # no file_types: gradio would refuse another type with a bare "400 Bad Request";
            # check_dataset says which types are read. Offline it opens on the shipped samples.
            prompt_file = gr.File(sample, label="…or a prompts file: .jsonl, .json, .csv or"
                                  " .parquet (rows with prompt, question or text)",
                                  elem_id="dataset-file", height=120)
    with gr.Row():
        # no minimum: out-of-range values are refused by check_dataset in a sentence (gradio's
        # own check answers an API client with a bare "400 Bad Request")
        num = gr.Number(10, label="number of samples", precision=0, min_width=120)
        offset = gr.Number(0, label="offset (rows skipped)", precision=0, min_width=120)
        field = gr.Textbox("", label="text field", placeholder="prompt / question / text",
                           min_width=120)
        skip = gr.Checkbox(False, label="skip malformed lines", min_width=120)
    with gr.Row():
        run = gr.Button("Run dataset", variant="primary", elem_id="dataset-run", scale=4)
        stop = stop_button("dataset-stop")
        file = download_button("dataset-file-out", scale=1, min_width=200)
        summary = summary_button("dataset-summary", scale=1, min_width=200)
    status = gr.Markdown("Stop ends the run within one decode step; the finished records"
                         " stay downloadable.", label="status", elem_id="dataset-status",
                         elem_classes=["c2c-status"], min_height=56)
    table = gr.Dataframe(answers_table([]), label="Results (fills in as records arrive)",
                         interactive=False, elem_id="dataset-table", max_height=360)
    fig = plot(plots.decode_hist_fig(pd.DataFrame()), "dataset-plot")
    return DatasetTab(source, name, config, split, prompt_file, num, offset, field, skip, run,
                      stop, status, table, fig, file, summary)


def answers_table(recs: list[dict]) -> pd.DataFrame:
    """The records table with the gold `answer`, whether the response got it (`correct`), and
    whether the answer was cut off by max_new_tokens, beside each record's id."""
    table = records_table(recs)
    yes_no = {True: "yes", False: "no"}
    at = list(table.columns).index("repeat") + 1 if "repeat" in table.columns else 0
    for i, (col, values) in enumerate((
            ("answer", ["" if r.get("answer") is None else str(r["answer"]) for r in recs]),
            ("correct", [yes_no.get(r.get("correct"), "") for r in recs]),
            ("cut off", ["yes" if r.get("truncated") is True else "" for r in recs]))):
        table.insert(at + i, col, values)
    return table


def accuracy_note(recs: list[dict], summary=None) -> str:
    """Running accuracy over the scored records, and how many answers max_new_tokens cut off
    (over the whole run when `summary`, a RunningSummary, is given)."""
    from ...report.summary import RunningSummary
    summary = summary if summary is not None and summary.count else RunningSummary(recs)
    right = sum(r for r, _ in summary.scored.values())
    n = sum(k for _, k in summary.scored.values())
    parts = []
    if n:
        parts.append(f"Accuracy so far: {right} of {n} correct ({right / n:.0%}).")
    if summary.truncated:
        cap = f" ({', '.join(map(str, sorted(summary.caps)))})" if summary.caps else ""
        parts.append(f"{summary.truncated} of {summary.count} answer(s) were cut off by 'max new"
                     f" tokens'{cap}; raise it to let them finish.")
    return " ".join(parts)


def render(recs: list[dict], status: str, file, summary=None):
    """`recs`: the newest rows; `summary` (a RunningSummary) holds every record's decode time,
    so the chart covers the whole run, not only the rows shown."""
    if summary is not None and summary.count:
        df = pd.DataFrame([(m, v) for m in summary.modes()
                           for v in summary.series(m, "decode_avg_ms")],
                          columns=["mode", "decode_avg_ms"])
    else:
        df = analysis.to_frame(recs) if recs else pd.DataFrame()
    fig = sized(integer_counts(plots.decode_hist_fig(df), len(df)))
    note = accuracy_note(recs, summary)
    return (f"{status}  \n{note}" if note else status), answers_table(recs), fig, file


def check_dataset(source: str, dataset_name: str, dataset_config: str, split: str,
                  prompt_file: str | None = None, num_samples: float | None = 10,
                  offset: float | None = 0, text_field: str = "", skip_bad_lines: bool = False,
                  **settings):
    """The dataset run's checks that need no model and no data (also its validator)."""
    if source not in ("hf", "file"):
        raise UserError("'Prompts from' must be 'Hugging Face dataset' or 'Uploaded file'.")
    if source == "hf":
        guard.check_dataset_name(dataset_name, dataset_config, split)
    elif prompt_file:
        try:
            check_file_type(prompt_file)
        except UserError as e:
            raise guard.FieldError(str(e), "prompt_file") from None
    if num_samples is not None and num_samples < 1:
        raise guard.FieldError(f"'number of samples' is {num_samples:g}; give 1 or more (or leave"
                               " it empty for every row).", "num_samples")
    if offset is not None and offset < 0:
        raise guard.FieldError(f"'offset' is {offset:g}; give 0 or more (the rows skipped from"
                               " the start).", "offset")
    guard.check_short(text_field, "Text field")
    cfg = run_config(settings)
    if num_samples:
        guard.check_job_size(int(num_samples), cfg.repeats, len(modes_of(cfg)))
    return cfg


def run_dataset(source: str, dataset_name: str, dataset_config: str, split: str,
                prompt_file: str | None = None, num_samples: float | None = 10,
                offset: float | None = 0, text_field: str = "", skip_bad_lines: bool = False,
                request: gr.Request = None, progress=gr.Progress(), **settings):
    """Run a dataset selection; yields status, table, histogram, JSONL as records arrive."""
    try:
        cfg = check_dataset(source, dataset_name, dataset_config, split, prompt_file,
                            num_samples, offset, text_field, skip_bad_lines, **settings)
        if source == "file" and prompt_file:
            guard.count_upload(session_id(request), [prompt_file])
        kw = dict(field=(text_field or "").strip() or None, offset=int(offset or 0),
                  num_samples=int(num_samples) if num_samples else None,
                  skip_bad_lines=bool(skip_bad_lines))
        if source == "file":
            if not prompt_file:
                raise UserError("No prompts file uploaded; drop a .jsonl, .csv or .parquet file"
                                " in the box, or choose 'Hugging Face dataset'.")
            progress(None, desc="Reading the file…")
            items = resolve_prompts(dataset_file=prompt_file, caps=guard.file_caps(), **kw)
        else:
            if not (dataset_name or "").strip():
                raise UserError("No dataset name given; type one like gsm8k, or upload a file.")
            progress(None, desc=f"Loading dataset {dataset_name}…")
            items = resolve_prompts(dataset=dataset_name.strip(),
                                    dataset_config=(dataset_config or "").strip() or None,
                                    split=(split or "").strip() or "test", **kw)
        guard.check_job_size(len(items), cfg.repeats, len(modes_of(cfg)))
        for it in items:
            guard.check_prompt_text(it.prompt, f"Prompt {it.id}")
    except UserError as e:
        # clear the last run's table and chart: they would read as this failed run's output
        yield render([], status_md(md_text(ui_message(e)), "error"), None)
        raise user_error(e) from None
    note = skipped_note(items)
    if note:
        gr.Warning(note)
    path = new_run_path(request, "dataset")
    stop = stop_flag(request)
    try:
        yield from stream_records(cfg, items, path, progress, render, stop=stop,
                                  unit="generation", request=request)
    finally:
        clear_stop(request, stop)


def stop_run(request: gr.Request) -> None:
    """Ask this session's runs to stop (within one decode step). Said in a toast:
    the run's own last update writes the status line (writing it here could land later)."""
    if request_stop(request):
        gr.Info("Stopping: the running generation ends within one decode step…")
    else:
        gr.Info("Nothing is running.")
