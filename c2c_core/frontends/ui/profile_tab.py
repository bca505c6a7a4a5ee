"""Profile tab: one prompt in detail — response, stage table, stage-breakdown chart, decode-step
latency line, and the JSONL / TSV / Chrome trace / op-stats downloads."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import gradio as gr
import pandas as pd

from ...report import analysis, plots
from ...spec.errors import UserError
from ...io.prompts import BUILTIN_PROMPTS, resolve_prompts
from ...bench.runner import modes_of
from . import guard
from .. import worker
from .jobs import (ALIVE_EVERY_S, Job, in_worker, token_counter, tokens_per_item,
    write_app_summary)
from .render import plot, sized, stop_button
from .runcfg import MODELS, swap_note, run_config
from .sessions import clear_stop, new_run_path, page_gone, session_dir, stop_flag
from .texts import error_outputs, md_text, status_md, ui_message, user_error

TRACE_NOTE = ("The trace (`…_trace.json.gz`) comes from a separate warm run under torch.profiler:"
              " open it in [ui.perfetto.dev](https://ui.perfetto.dev) or chrome://tracing (both"
              " read .gz); the stages are the `c2c/…` ranges. Its times are inflated by the"
              " profiler; the JSONL and the charts hold the clean run.")

STAGE_HEADS = {"stage": "stage", "ms": "time (ms)", "pct_of_e2e": "% of E2E", "count": "count"}


@dataclass
class ProfileTab:
    prompt: gr.Textbox
    run: gr.Button
    status: gr.Markdown
    response: gr.Textbox
    stages: gr.Dataframe
    breakdown: gr.Plot
    steps: gr.Plot
    files: gr.File
    stop: gr.Button
    align_box: gr.Accordion  # not an output of the profile endpoint: its own private event
    align_note: gr.Markdown
    align_table: gr.Dataframe

    def outputs(self) -> list:
        return [self.status, self.response, self.stages, self.breakdown, self.steps, self.files]

    def align_outputs(self) -> list:
        return [self.align_box, self.align_note, self.align_table]


def build_profile_tab() -> ProfileTab:
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            prompt = gr.Textbox(BUILTIN_PROMPTS[0], lines=3, max_lines=12, label="Prompt",
                                elem_id="profile-prompt")
        with gr.Column(scale=2, min_width=220):
            gr.Examples([[p] for p in BUILTIN_PROMPTS], inputs=prompt, label="Built-in prompts")
    with gr.Row():
        run = gr.Button("Profile", variant="primary", elem_id="profile-run", scale=4)
        stop = stop_button("profile-stop")
    status = gr.Markdown("One warm-up (if set), the timed run, then a separate run under the"
                         " profiler for the trace. Model jobs wait in one queue; the progress"
                         " box shows your place.", label="status", elem_id="profile-status",
                         elem_classes=["c2c-status"], min_height=56)
    response = gr.Textbox(label="Response", lines=2, max_lines=12, interactive=False,
                          elem_id="profile-response")
    with gr.Row(equal_height=False):
        stages = gr.Dataframe(pd.DataFrame(columns=list(STAGE_HEADS.values())),
                              label="Stages of the timed run", interactive=False, scale=6,
                              elem_id="profile-stages", min_width=380,
                              column_widths=["48%", "20%", "18%", "14%"])
        with gr.Column(scale=5):
            breakdown = plot(plots.stage_breakdown_fig({}), "profile-breakdown", 360)
    steps = plot(plots.decode_steps_fig(pd.DataFrame()), "profile-steps", 360)
    files = gr.File(label="Downloads: JSONL · TSV stage table · Chrome trace · op stats ·"
                    " run summary",
                    file_count="multiple", interactive=False, elem_id="profile-files",
                    height=270, visible=False)
    gr.Markdown(TRACE_NOTE, elem_classes=["c2c-note"])
    # shown for a pair whose sharer has its own tokenizer, when Profile is pressed
    with gr.Accordion("Token alignment", open=False, visible=False,
                      elem_id="profile-alignment") as align_box:
        align_note = gr.Markdown(ALIGN_NOTE, elem_classes=["c2c-note"])
        align_table = gr.Dataframe(pd.DataFrame(columns=ALIGN_EMPTY), interactive=False,
                                   datatype="str", elem_id="profile-alignment-table",
                                   max_height=420)
    return ProfileTab(prompt, run, status, response, stages, breakdown, steps, files, stop,
                      align_box, align_note, align_table)


ALIGN_NOTE = ("Each model reads the prompt with its own chat template; the shorter template"
              " section is padded at its end, message tokens are aligned one to one, and the"
              " sharer's cache is projected on message positions only.")
ALIGN_EMPTY = ["position", "section", "receiver", "receiver id", "sharer", "sharer id",
               "projected"]


def alignment_table(prompt: str, **settings) -> tuple[pd.DataFrame, str] | None:
    """The plan's side-by-side table for the prompt being profiled (tokenizers only, no
    weights), one row per receiver position, and its summary line; None when every sharer reads
    the receiver's tokenizer (nothing to see). Raises UserError as the profile's checks do."""
    from ...plan.show import show_plan, summary_line, table_columns, table_rows
    cfg = check_profile(prompt, **settings)
    view = show_plan(cfg, prompt)
    if not view.any_different:
        return None
    # headers say "sharer" (a name a client typed stays in the escaped note, not a header)
    frame = pd.DataFrame(table_rows(view), columns=table_columns(view, names=False))
    names = ", ".join(f"{label}: {name}" for label, name in zip(
        table_columns(view, names=False)[4::3], view.sharers))
    return frame, f"{summary_line(view)} ({names})."


def show_alignment(prompt: str, **settings):
    """The Token alignment accordion: shown with the table for a pair with different
    tokenizers, hidden otherwise, and hidden (never a traceback) when it cannot be built."""
    try:
        got = alignment_table(prompt, **settings)
    except Exception as e:  # noqa: BLE001 - the profile's own status line says what is wrong
        if not isinstance(e, UserError):
            print(f"Token alignment table failed: {type(e).__name__}: {e}")
        got = None
    if got is None:
        return gr.Accordion(visible=False), gr.skip(), pd.DataFrame(columns=ALIGN_EMPTY)
    frame, summary = got
    return (gr.Accordion(visible=True),
            f"{md_text(summary)}  \n{ALIGN_NOTE}", frame)


#: Profile's phases as the status line names them (others are said as the run says them).
PROFILE_PHASES = {"waiting": "waiting for the previous job to end",
                  "loading models": "loading the models", "profiling": "starting",
                  "warming up": "warm-up (not recorded)", "running": "the timed run"}
PROFILE_ORDER = ("loading the models · warm-up · compile (fast engine) · timed run · profiled"
                 " run for the trace · writing the trace")


def profile_phase_line(job, elapsed: float) -> str:
    """'**Profiling** · now: the timed run · 12 s' (the steps in order under it)."""
    from .jobs import LIVE, fmt_seconds
    now = md_text(PROFILE_PHASES.get(job.phase, job.phase))
    return (f"{LIVE}**Profiling** · now: {now} · {fmt_seconds(elapsed)} elapsed  \n"
            f"<small>Steps: {PROFILE_ORDER}.</small>")


def stage_table(record: dict) -> pd.DataFrame:
    from ...bench.profiling import stage_rows
    rows = pd.DataFrame(stage_rows(record))
    return rows[list(STAGE_HEADS)].rename(columns=STAGE_HEADS)


def summary_line(rec: dict, device: str, dtype: str) -> str:
    t = rec["timing"]
    line = (f"**Done** ({rec.get('mode', 'c2c')}): TTFT {t['ttft_ms']:.1f} ms · decode"
            f" {t['decode_avg_ms']:.2f} ms/token ({t['tokens_per_second']:.1f} tok/s) ·"
            f" {t['num_generated_tokens']} tokens · E2E {t['e2e_ms']:.1f} ms · on"
            f" {device} {dtype}.")
    return line + limits_line(t)


def limits_line(t: dict) -> str:
    """' Decode floor 0.2500 ms/token (measured 8.84x it) · energy 3.0 J (0.27 J/token).' when
    known; on a CPU (no bandwidth, no NVML) it says the floor is unknown."""
    floor, ratio = t.get("decode_floor_ms"), t.get("decode_floor_ratio")
    parts = []
    if floor is not None:
        parts.append(f"decode floor {floor:.4f} ms/token"
                     + (f" (measured {ratio:.2f}x it)" if ratio is not None else ""))
    elif "decode_floor_ms" in t:
        parts.append("decode floor unknown here (no memory bandwidth for this device)")
    if t.get("energy_j") is not None:
        parts.append(f"energy {t['energy_j']:.2f} J ({t.get('joules_per_token') or 0:.4f} J/token)")
    text = " · ".join(parts)
    return f" {text[:1].upper()}{text[1:]}." if parts else ""


def cleared_outputs() -> tuple:
    """Response, stage table, both charts and the files as before any run: a new or stopped run
    never shows the previous run's results as its own."""
    return ("", pd.DataFrame(columns=list(STAGE_HEADS.values())),
            sized(plots.stage_breakdown_fig({}), 360),
            sized(plots.decode_steps_fig(pd.DataFrame()), 360), None)


def check_profile(prompt: str, **settings):
    """The profile's checks that need no model (also its validator: run before it queues)."""
    guard.check_prompt_text(prompt)
    return run_config(settings, repeats=1)


def run_profile(prompt: str, request: gr.Request, progress=gr.Progress(), **settings):
    """Profile one prompt: status, response, stage table, two figures and the 4 files (a
    generator only so that a failure can say itself in the status line before raising)."""
    from ...bench.profiling import profile_item, profile_paths
    stop = None
    try:
        cfg = check_profile(prompt, **settings)
        items = resolve_prompts(prompt=prompt or "")
        guard.check_disk(session_dir(request))
        path = new_run_path(request, "profile")
        paths = profile_paths(path, gz=True)
        per_item = tokens_per_item(cfg)

        def work(job):
            if worker.enabled():  # the worker process runs it and writes the four files
                return in_worker(job, "profile", cfg, item=items[0], paths=paths,
                                 count_tokens=per_item is not None)
            pipe = MODELS.get(cfg)
            job.phase = "profiling"
            with token_counter(pipe, per_item is not None) as counter:
                job.tokens = counter
                rec, _stats = profile_item(pipe, cfg, items[0], paths)
            return {"record": rec, "device": pipe.device.type,
                    "dtype": str(pipe.dtype).removeprefix("torch.")}

        # tokens of all generations: warm-up(s) and timed run per mode, then the profiled run
        modes = len(modes_of(cfg))
        about = per_item * (modes * (cfg.warmup + 1) + 1) if per_item else None
        stop = stop_flag(request)
        swap = swap_note(cfg)
        job = Job(work, stop)
        said, last, t0 = None, time.perf_counter(), time.perf_counter()
        # the previous run's response, stages, charts and files go as this one starts
        rest: tuple = cleared_outputs()
        try:
            for _ in job.events():
                now = time.perf_counter()
                if job.phase != said or now - last >= ALIVE_EVERY_S:
                    # the phase and the time since Profile was pressed, in the status line
                    # (each update also lets gradio notice a client gone)
                    said, last = job.phase, now
                    text = profile_phase_line(job, now - t0)
                    if swap:
                        text = swap + "  \n" + text
                    yield (status_md(text, "run"),) + rest
                    rest = tuple(gr.skip() for _ in range(5))
                if about and job.phase not in ("loading models", "waiting"):
                    progress(min(job.tokens[0] / about, 0.99),
                             desc=f"token {job.tokens[0]} of about {about} (warm-up, timed run,"
                                  " profiled run)")
                else:
                    progress(None, desc=PROFILE_PHASES.get(job.phase, job.phase))
        except GeneratorExit:  # the page went away: stop within a decode step, unless
            # another page of the session is open (then the profile's files land in its folder)
            page_gone(request, stop, lambda: job.ended is not None)
            raise
        if job.cancelled or job.result is None:
            from .jobs import stop_note, stopped_during
            yield (status_md(f"**Stopped**{stopped_during(job.phase)} before the profile"
                             " finished; nothing was recorded." + stop_note(job)),) \
                + cleared_outputs()
            return
        done = job.result
    except UserError as e:
        yield error_outputs(e, 6)
        raise user_error(e) from None
    finally:
        if stop is not None:
            clear_stop(request, stop)
    from ...io.records import read_records
    recs = read_records(paths.jsonl)
    steps = analysis.steps_frame(recs)
    more = f" ({len(recs)} records: {', '.join(r['mode'] for r in recs)})" if len(recs) > 1 else ""
    rec = done["record"]
    status = summary_line(rec, done["device"], done["dtype"]) + more
    from ...report.summary import RunningSummary, contention_files
    busy = contention_files({os.path.basename(paths.jsonl): list(RunningSummary(recs).shares)})
    if busy:
        status += "  \n" + status_md(busy, "warn")
    report = write_app_summary(cfg, paths.jsonl)
    files = [p for p in (paths.jsonl, paths.tsv, paths.trace, paths.stats, report)
             if p and os.path.exists(p)]
    yield (status, rec["response"], stage_table(rec), sized(plots.stage_breakdown_fig(rec), 360),
            sized(plots.decode_steps_fig(steps), 360), files)
