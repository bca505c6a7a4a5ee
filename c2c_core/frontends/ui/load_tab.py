"""Load tab: C2C under load. A bounded open-loop sweep (Poisson arrivals at a few rates, each
mode on its own) through our continuous-batching server on the models the app holds, the same
code as `python -m c2c_core load` (frontends/load.app_load): latency against throughput per
mode, goodput against the offered rate, and TTFT split into queue, sharer prefill, projection
and receiver prefill. Caps keep one stranger's sweep from holding a public Space for long."""

from __future__ import annotations

from contextlib import contextmanager

from dataclasses import dataclass
from functools import partial

import gradio as gr
import pandas as pd

from ...io.prompts import BUILTIN_PROMPTS, PromptItem
from ...report import load as L
from ...report import load_plots
from ...spec.errors import UserError
from ..load import _parse_list
from ..load_app import app_load, html_path
from . import guard
from .jobs import stream_records
from .render import download_button, plot, sized, stop_button, summary_button
from .runcfg import run_config
from .sessions import new_run_path
from .texts import md_text, status_md, ui_message, user_error

#: The sweep's caps (environment variables of the same names raise or lower them).
MAX_RATE = guard._env_int("C2C_LOAD_MAX_RATE", 4)            # requests/s offered, per point
MAX_REQUESTS = guard._env_int("C2C_LOAD_MAX_REQUESTS", 24)   # requests per point
MAX_POINTS = guard._env_int("C2C_LOAD_MAX_POINTS", 12)       # modes x rates
MAX_ARRIVAL_S = guard._env_int("C2C_LOAD_MAX_ARRIVAL_S", 120)  # a point's arrivals, seconds
MAX_SLOTS = guard._env_int("C2C_LOAD_MAX_SLOTS", 8)
MAX_TOKENS = 64
MODES_OFFERED = ["c2c", "t2t", "receiver", "sharer"]


@dataclass
class LoadTab:
    modes: gr.CheckboxGroup
    rates: gr.Textbox
    requests: gr.Number
    max_tokens: gr.Number
    slots: gr.Number
    slo: gr.Textbox
    run: gr.Button
    stop: gr.Button
    status: gr.Markdown
    table: gr.Dataframe
    latency: gr.Plot
    goodput: gr.Plot
    split: gr.Plot
    file: gr.DownloadButton
    summary: gr.DownloadButton
    html: gr.DownloadButton

    def inputs(self) -> list:
        return [self.modes, self.rates, self.requests, self.max_tokens, self.slots, self.slo]

    def outputs(self) -> list:
        return [self.status, self.table, self.latency, self.goodput, self.split, self.file,
                self.html]


def build_load_tab() -> LoadTab:
    with gr.Row():
        modes = gr.CheckboxGroup(MODES_OFFERED, value=["c2c", "t2t", "receiver"],
                                 label="Modes (one sweep each, interleaved per rate)",
                                 elem_id="load-modes")
        rates = gr.Textbox("0.1,0.2,0.4", label="Offered rates (requests/s)",
                           elem_id="load-rates",
                           info=f"Poisson arrivals; at most {MAX_RATE} req/s")
        slo = gr.Textbox("ttft_ms=10000,tpot_ms=1000", label="SLO for goodput",
                         elem_id="load-slo", info="ttft_ms, tpot_ms, e2e_ms bounds")
    with gr.Row():
        requests = gr.Number(6, label="Requests per point", precision=0, minimum=1,
                             maximum=MAX_REQUESTS, elem_id="load-requests")
        max_tokens = gr.Number(16, label="Max tokens per request", precision=0, minimum=1,
                               maximum=MAX_TOKENS, elem_id="load-max-tokens")
        slots = gr.Number(4, label="Slots (decode batch)", precision=0, minimum=1,
                          maximum=MAX_SLOTS, elem_id="load-slots")
    with gr.Row():
        run = gr.Button("Run load sweep", variant="primary", elem_id="load-run", scale=4)
        stop = stop_button("load-stop")
        file = download_button("load-file", scale=1, min_width=180)
        summary = summary_button("load-summary", scale=1, min_width=180)
        html = gr.DownloadButton("HTML report", visible=False, elem_id="load-html", scale=1,
                                 min_width=180)
    status = gr.Markdown(
        "Requests arrive at random (Poisson) at each rate while earlier ones still run; the"
        " server batches them continuously. The prompts are the five built-in ones; the models"
        " are the ones on the left.", elem_id="load-status", elem_classes=["c2c-status"],
        min_height=56)
    table = gr.Dataframe(pd.DataFrame(columns=[c for c, _, _ in L.TABLE_COLUMNS]),
                         label="Per point (fills in as points end)", interactive=False,
                         elem_id="load-table", max_height=300)
    with gr.Row():
        lat = plot(load_plots.latency_throughput_fig([]), "load-latency", 380)
        good = plot(load_plots.goodput_fig([]), "load-goodput", 380)
    split = plot(load_plots.ttft_split_fig([]), "load-split", 380)
    return LoadTab(modes, rates, requests, max_tokens, slots, slo, run, stop, status, table,
                   lat, good, split, file, summary, html)


@contextmanager
def _field(name: str):
    """A refusal inside the block belongs to the input `name` (the page marks that box)."""
    try:
        yield
    except guard.FieldError as e:
        if e.field == name:
            raise
        raise guard.FieldError(str(e), name) from None
    except UserError as e:
        raise guard.FieldError(str(e), name) from None


def check_load(modes, rates: str, requests, max_tokens, slots, slo: str, **settings):
    """The sweep's checks that need no model (also its validator): modes, caps, the SLO."""
    if not modes:
        raise UserError("Pick at least one mode to load.")
    bad = [m for m in modes if m not in MODES_OFFERED]
    if bad:
        raise UserError(f"Unknown mode {str(bad[0])[:20]!r}; pick among"
                        f" {', '.join(MODES_OFFERED)}.")
    with _field("rates"):
        guard.check_short(rates, "Offered rates")
        rs = _parse_list(rates or "", "Offered rates", float)
        if max(rs) > MAX_RATE:
            raise UserError(f"Offered rate {max(rs):g} req/s is above this app's cap of"
                            f" {MAX_RATE}; use lower rates (the CLI's `load` has no cap).")
    n = int(requests or 0)
    if not 1 <= n <= MAX_REQUESTS:
        raise guard.FieldError(f"Requests per point must be 1 to {MAX_REQUESTS}, not {n}.",
                               "requests")
    if len(modes) * len(rs) > MAX_POINTS:
        raise guard.FieldError(f"{len(modes)} mode(s) x {len(rs)} rate(s) is"
                               f" {len(modes) * len(rs)} points; this app runs at most"
                               f" {MAX_POINTS}. Drop a rate or a mode.", "rates")
    if n / min(rs) > MAX_ARRIVAL_S:
        raise guard.FieldError(f"{n} requests at {min(rs):g} req/s take {n / min(rs):.0f} s to"
                               f" arrive; the cap is {MAX_ARRIVAL_S} s a point. Raise the lowest"
                               " rate or send fewer requests.", "rates")
    t = int(max_tokens or 0)
    with _field("max_tokens"):
        if not 1 <= t <= MAX_TOKENS:
            raise UserError(f"Max tokens must be 1 to {MAX_TOKENS}, not {t}.")
        guard.check_new_tokens(t)
    s = int(slots or 0)
    if not 1 <= s <= MAX_SLOTS:
        raise guard.FieldError(f"Slots must be 1 to {MAX_SLOTS}, not {s}.", "slots")
    with _field("slo"):
        guard.check_short(slo, "SLO")
        try:
            slo_d = L.parse_slo(slo)
        except UserError as e:  # the CLI's sentence names its flag; here the box is "SLO"
            raise UserError(str(e).replace("--slo ", "SLO ")) from None
    cfg = run_config(settings)
    if cfg.engine == "eager":
        raise UserError("The load sweep batches requests on the fast engine; pick engine fast"
                        " or auto on the left.")
    from dataclasses import replace
    cfg = replace(cfg, gen=replace(cfg.gen, max_new_tokens=t), mode="c2c")
    return list(modes), rs, n, t, s, slo_d, cfg


def render(recs: list[dict], status: str, file, summary=None, path: str | None = None):
    """Status, the per-point table, the three plots, the JSONL and the HTML page. Live: from the
    requests so far; at the end: from every request in the file."""
    if isinstance(file, str):
        from ...io.records import iter_jsonl
        recs = [r for r in iter_jsonl(file, skip_bad_lines=True) if L.is_load_record(r)]
    points = L.points_from_records(recs) if recs else []
    rows = pd.DataFrame(L.table_rows(points), columns=[c for c, _, _ in L.TABLE_COLUMNS])
    for c in rows.columns:
        if rows[c].dtype == float:
            rows[c] = rows[c].round(2)
    failed = sum(p.get("errors") or 0 for p in points)
    if isinstance(file, str) and failed:  # the run's end: say what failed, not only "Done"
        first = next((r.get("error") for r in recs if r.get("error")), None)
        status += "  \n" + status_md(
            f"{failed} of {sum(p.get('requests') or 0 for p in points)} request(s) failed"
            + (f" (the first: {md_text(str(first)[:160])})" if first else "") + "; they count"
            " as errors in the table and against goodput.", "warn")
    page = html_path(file) if isinstance(file, str) else None
    import os
    html = (gr.DownloadButton(value=page, visible=True) if page and os.path.exists(page)
            else gr.DownloadButton(visible=False) if isinstance(file, str) or file is None
            else gr.skip())
    return (status, rows, sized(load_plots.latency_throughput_fig(points), 380),
            sized(load_plots.goodput_fig(points), 380), sized(load_plots.ttft_split_fig(points),
                                                              380), file, html)


def run_load_ui(modes, rates: str, requests, max_tokens, slots, slo: str,
                request: gr.Request = None, progress=gr.Progress(), **settings):
    """Run the bounded sweep; yields status, table, plots and downloads as requests finish."""
    try:
        modes, rs, n, t, s, slo_d, cfg = check_load(modes, rates, requests, max_tokens, slots,
                                                     slo, **settings)
    except UserError as e:
        yield render([], status_md(md_text(ui_message(e)), "error"), None)
        raise user_error(e) from None
    path = new_run_path(request, "load")
    items = [PromptItem(i + 1, p, source="builtin") for i, p in enumerate(BUILTIN_PROMPTS)]
    runner = partial(app_load, modes=modes, rates=rs, num_requests=n, slo=slo_d, slots=s)
    yield from stream_records(cfg, items, path, progress, render, unit="request", runner=runner,
                              request=request, modes=modes)
