"""Results tab: uploaded JSONL files and this session's runs → summary per file and mode,
histogram of decode ms/token, per-sample stage bars, decode-step lines, the 10 slowest samples,
modes compared, and two files side by side. Reads older (seed) records too."""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import gradio as gr
import pandas as pd

from ...report import analysis, plots
from ...spec.errors import UserError
from ...io.records import check_record, read_records
from . import guard
from .render import integer_counts, labelled, plot, sized
from .sessions import session_id, session_run_path, session_runs
from .texts import html_text, md_text, status_md, ui_message

MODE_METRICS = ("ttft_ms", "e2e_ms", "decode_avg_ms", "tokens_per_second")
NO_RATIOS = ("Run with mode **all** (or c2c and t2t / receiver on the same prompts) to see C2C's"
             " speedup over text-to-text and its overhead over the receiver alone.")
RATIO_TEXT = {"c2c_over_t2t": "C2C ÷ T2T (below 1 = C2C faster)",
              "c2c_over_receiver": "C2C ÷ receiver alone (the cost of fusion)",
              "c2c_over_sharer": "C2C ÷ sharer alone (against the large model)"}


def ratios_md(ratios: dict, table: pd.DataFrame | None = None) -> str:
    """One line per ratio pair: the ratio per metric and, in words, what it is (the median of
    the per-prompt ratios over n pairs, or the ratio of medians when nothing paired); then
    accuracy per mode where the records were scored (what C2C buys beside what it costs)."""
    lines = []
    for key, r in ratios.items():
        vals = " · ".join(f"{analysis.name(m)} **{r[m]:.2f}×**" for m in analysis.RATIO_METRICS
                          if r.get(m) == r.get(m))
        # "c2c_over_t2t on <device>" / "... in <run>": the device or run comes from a file
        base, sep, where = key.partition(" ")
        label = RATIO_TEXT.get(base, md_text(base)) + (f" {md_text(where)}" if sep else "")
        lines.append(f"- {label}: {vals} ({analysis.ratio_words(r)})")
    if not ratios:
        lines.append(NO_RATIOS)
    if table is not None and "n_scored" in table.columns:
        scored = table[table["n_scored"] > 0]
        if len(scored):
            lines.append("- Accuracy: " + " · ".join(
                f"{md_text(m)} **{a:.0%}** ({n} scored)" for m, a, n in
                zip(scored["mode"], scored["accuracy"], scored["n_scored"])))
    return "\n".join(lines)


@dataclass
class ResultsTab:
    files: gr.File
    runs: gr.CheckboxGroup
    skip_bad_lines: gr.Checkbox
    analyze: gr.Button
    status: gr.Markdown
    summary: gr.Dataframe
    hist: gr.Plot
    stage_bars: gr.Plot
    steps: gr.Plot
    slowest: gr.Dataframe
    modes: gr.Dataframe
    mode_ttft: gr.Plot
    mode_decode: gr.Plot
    file_a: gr.Dropdown
    file_b: gr.Dropdown
    compare: gr.Dataframe
    a_bars: gr.Plot
    b_bars: gr.Plot
    a_steps: gr.Plot
    b_steps: gr.Plot
    ratios: gr.Markdown
    mode_e2e: gr.Plot
    mode_tps: gr.Plot
    sweep: gr.Plot

    def inputs(self) -> list:
        return [self.files, self.runs, self.skip_bad_lines]

    def compare_outputs(self) -> list:
        return [self.compare, self.a_bars, self.b_bars, self.a_steps, self.b_steps]

    def outputs(self) -> list:
        return [self.status, self.summary, self.hist, self.stage_bars, self.steps, self.slowest,
                self.modes, self.mode_ttft, self.mode_decode, self.file_a, self.file_b,
                *self.compare_outputs(), self.ratios, self.mode_e2e, self.mode_tps, self.sweep]


def _empty_df(cols: list[str]) -> pd.DataFrame:
    return pd.DataFrame(columns=cols)


def build_results_tab() -> ResultsTab:
    with gr.Row(equal_height=False):
        # no file_types: another type gets load_sources' sentence, not gradio's bare refusal
        files = gr.File(label="Upload JSONL result files (.jsonl)", file_count="multiple",
                        elem_id="results-files", height=150, scale=3)
        with gr.Column(scale=2):
            runs = gr.CheckboxGroup([], label="…and/or runs from this session",
                                    elem_id="results-runs")
            skip = gr.Checkbox(False, label="skip malformed lines")
            analyze = gr.Button("Analyze", variant="primary", elem_id="results-analyze")
    status = gr.Markdown("Files written by the seed scripts work too (what they lack is left out"
                         " of the charts).", label="status", elem_id="results-status",
                         elem_classes=["c2c-status"], min_height=56)
    summary = gr.Dataframe(_empty_df(["source", "mode", "count"]),
                           label="Summary per file and mode", interactive=False,
                           elem_id="results-summary")
    # full width: several files make long sample labels and legends
    hist = plot(plots.decode_hist_fig(pd.DataFrame()), "results-hist", 340)
    bars = plot(plots.stage_bars_fig(pd.DataFrame()), "results-bars", 420)
    steps = plot(plots.decode_steps_fig(pd.DataFrame()), "results-steps", 400)
    slowest = gr.Dataframe(_empty_df(["source", "id"]), label="10 slowest samples (by decode"
                           " total)", interactive=False, elem_id="results-slowest")
    with gr.Accordion("Modes compared: is C2C worth its cost?", open=True,
                      elem_id="results-modes"):
        ratios = gr.Markdown(NO_RATIOS, elem_id="results-ratios")
        modes = gr.Dataframe(_empty_df(["mode", "count"]), label="Per mode (all files): latency"
                             " and accuracy", interactive=False, elem_id="results-modes-table")
        empty = plots.mode_compare_figs(pd.DataFrame(), MODE_METRICS)
        with gr.Row(equal_height=False):
            mode_ttft = plot(empty["ttft_ms"], "results-mode-ttft", 320)
            mode_e2e = plot(empty["e2e_ms"], "results-mode-e2e", 320)
        with gr.Row(equal_height=False):
            mode_decode = plot(empty["decode_avg_ms"], "results-mode-decode", 320)
            mode_tps = plot(empty["tokens_per_second"], "results-mode-tps", 320)
    with gr.Accordion("Stage time vs prompt length (length sweeps)", open=False,
                      elem_id="results-sweep"):
        sweep = plot(plots.sweep_fig(pd.DataFrame()), "results-sweep-plot", 380)
    with gr.Accordion("Two files side by side", open=False, elem_id="results-pair"):
        with gr.Row():
            file_a = gr.Dropdown([], label="File A", elem_id="results-a")
            file_b = gr.Dropdown([], label="File B (compared with A)", elem_id="results-b")
        compare = gr.Dataframe(_empty_df(["metric"]), label="B against A, paired by (id, mode,"
                               " repeat): median of per-pair ratios with its 95% interval",
                               interactive=False, elem_id="results-compare")
        with gr.Row(equal_height=False):
            a_bars = plot(plots.stage_bars_fig(pd.DataFrame()), "results-a-bars", 320)
            b_bars = plot(plots.stage_bars_fig(pd.DataFrame()), "results-b-bars", 320)
        with gr.Row(equal_height=False):
            a_steps = plot(plots.decode_steps_fig(pd.DataFrame()), "results-a-steps", 320)
            b_steps = plot(plots.decode_steps_fig(pd.DataFrame()), "results-b-steps", 320)
    return ResultsTab(files, runs, skip, analyze, status, summary, hist, bars, steps, slowest,
                      modes, mode_ttft, mode_decode, file_a, file_b, compare, a_bars, b_bars,
                      a_steps, b_steps, ratios, mode_e2e, mode_tps, sweep)


# --- loading -------------------------------------------------------------------------------

def _paths(files) -> list[str]:
    if not files:
        return []
    files = files if isinstance(files, list) else [files]
    return [f if isinstance(f, str) else getattr(f, "name", str(f)) for f in files]


def load_sources(files, runs, skip_bad_lines: bool, request: gr.Request | None,
                 budget=None) -> tuple[dict[str, list[dict]], list[str]]:
    """{source name: records} of every readable file, and one message per unreadable one.
    With `budget` (guard.results_budget) the files are read against it as they are parsed,
    their decode steps as arrays; a file past it is refused in a sentence and its records
    dropped, the files before it kept."""
    found: list[tuple[str, str]] = [(os.path.basename(p), p) for p in _paths(files)]
    errors: list[str] = []
    for name in runs or []:
        try:
            found.append((name, session_run_path(request, name)))
        except UserError as e:
            errors.append(ui_message(e))
    sources: dict[str, list[dict]] = {}
    for name, path in found:
        ext = os.path.splitext(name)[1].lower()
        if ext not in (".jsonl", ".json"):
            unpack = " (unpack it first: gzip files are not read)" if ext in (".gz", ".gzip") \
                else ""
            errors.append(f"{name} is not a JSONL results file{unpack}; upload the .jsonl file a"
                          " run wrote.")
            continue
        short = name[:-6] if name.endswith(".jsonl") else name  # shorter chart labels
        key, n = short, 1
        while key in sources:
            n += 1
            key = f"{short} ({n})"
        before = budget.used if budget is not None else 0
        try:
            recs = read_records(path, skip_bad_lines=bool(skip_bad_lines), budget=budget)
        except UserError as e:
            if budget is not None:  # what the refused file decoded is freed with it
                budget.used = before
            errors.append(ui_message(e))
            continue
        if not recs:
            errors.append(f"{name} has no records; pick a results file with one JSON object per"
                          " line.")
            continue
        sources[key] = recs
    return sources, errors


def _frames(sources: dict[str, list[dict]]) -> tuple[pd.DataFrame, list, dict]:
    """The records frame of all files, their decode steps as compact runs (analysis.step_runs:
    one float array per record, the records' own), and {file: (records, step runs)} of each
    (built once: a file may hold millions of decode steps)."""
    per = {s: (analysis.to_frame(r, s), analysis.step_runs(r, s)) for s, r in sources.items()}
    dfs = [d for d, _ in per.values()]
    df = pd.concat(dfs, ignore_index=True) if dfs else analysis.to_frame([])
    return df, [run for _, runs in per.values() for run in runs], per


#: What counts the records that paid for late preparation, from the Results tab's notes.
LATE_FIX = "the command line's report and compare --include_late count them"


def compare_table(df_a: pd.DataFrame, df_b: pd.DataFrame) -> pd.DataFrame:
    """B against A as shown, by the CLI compare's rules: paired by (input digest, mode,
    repeat); other prompts under the same ids: one row saying it cannot compare; either run
    contended for its CPU: every verdict "inconclusive: CPU contention". A metric not judged
    (too few pairs, contention) says regression "n/a", never False. Records that paid for late
    preparation are left out, as everywhere in this tab (the status line says how many)."""
    differ, shared = analysis.prompt_mismatch(df_a, df_b)
    if differ:
        return pd.DataFrame([{"metric": "all", "verdict": (
            f"cannot compare: {differ} of the {shared} prompt id(s) found in both files name"
            " different prompts in the two; run both on the same prompts")}])
    df_a, df_b = analysis.without_late(df_a)[0], analysis.without_late(df_b)[0]
    table = analysis.compare_runs(df_a, df_b, analysis.COMPARE_METRICS)
    if analysis.contended(df_a) is not None or analysis.contended(df_b) is not None:
        table = analysis.mark_contended(table)
    table["regression"] = table["regression"].map(lambda v: "n/a" if v is None else v)
    return table.drop(columns=["field", "beyond_noise"])


def _compare(sources: dict[str, list[dict]], a: str | None, b: str | None,
             per: dict | None = None) -> tuple:
    """B against A: the pair table, and each file's stage bars and decode steps. `per` holds
    frames already built ({file: (records, steps)}, see _frames)."""
    per = dict(per or {})
    for who in (a, b):
        if who in sources and who not in per:
            per[who] = (analysis.to_frame(sources[who], who),
                         analysis.step_runs(sources[who], who))
    ra, rb = sources.get(a or ""), sources.get(b or "")
    table = _empty_df(["metric"])
    if ra is not None and rb is not None:
        table = compare_table(per[a][0], per[b][0])
    side = []
    for recs, who in ((ra, a), (rb, b)):
        df = shown(per[who][0]) if recs else pd.DataFrame()
        bars = plots.stage_bars_fig(df)
        bars.update_layout(title_text=f"{html_text(who)}: stage times" if recs else "Stage times")
        side.append(sized(bars, 320))
    for recs, who in ((ra, a), (rb, b)):
        fig = plots.decode_steps_fig(shown_runs(per[who][1]) if recs else [])
        if recs:
            fig.update_layout(title_text=f"{html_text(who)}: decode step latency")
        side.append(sized(fig, 320))
    # side by side means one scale: a bar twice as tall is twice the time
    plots.shared_y(side[0], side[1])
    plots.shared_y(side[2], side[3])
    return (table, side[0], side[1], side[2], side[3])


#: Columns of a frame whose values come from a file and label charts (plotly renders some HTML
#: in labels and hovers).
LABEL_COLUMNS = ("source", "mode", "id")


def shown(df: pd.DataFrame) -> pd.DataFrame:
    """A frame for the charts: every text a file gave (names, modes, ids) HTML-escaped."""
    out = df.copy()
    for col in LABEL_COLUMNS:
        if col not in out.columns:
            continue
        # a steps frame has millions of rows and a handful of distinct labels: escape those
        uniques = pd.unique(out[col])
        texts = {v: html_text(v) for v in uniques if isinstance(v, str)}
        if any(k != v for k, v in texts.items()):
            out[col] = out[col].map(lambda v: texts.get(v, v) if isinstance(v, str) else v) \
                if len(uniques) * 100 > len(out) else \
                pd.Series(pd.Categorical(out[col]).rename_categories(
                    lambda c: texts.get(c, c)).astype(object), index=out.index)
    return out


def shown_runs(runs: list) -> list:
    """Compact step runs (analysis.step_runs) for the charts: their keys' texts HTML-escaped."""
    return [(tuple(html_text(k) if isinstance(k, str) else k for k in key), ms)
            for key, ms in runs]


def check_notes(sources: dict[str, list[dict]], examples: int = 2) -> list[str]:
    """One sentence per file whose records break the record checks (records.check_record),
    naming the first problems. Files of the seed scripts (no `run` object) are read in their
    own format and are not held to the current one."""
    notes = []
    for name, recs in sources.items():
        current = [(i, r) for i, r in enumerate(recs, start=1) if isinstance(r.get("run"), dict)]
        if not current:
            continue
        bad = [(i, check_record(r)) for i, r in current]
        bad = [(i, p) for i, p in bad if p]
        if bad:
            shown = "; ".join(f"record {i}: {', '.join(p[:2])}" for i, p in bad[:examples])
            notes.append(f"{name}: {len(bad)} of {len(current)} record(s) fail the record checks"
                         f" ({shown}{'; …' if len(bad) > examples else ''}); their numbers may"
                         " not add up.")
    return notes + contention_notes(sources)


def contention_notes(sources: dict[str, list[dict]]) -> list[str]:
    """One sentence for the view naming the files whose CPU generations did not get their
    threads' time, with each one's median share (timing.cpu_share; summary.contention_files)."""
    from ...report.summary import RunningSummary, contention_files
    note = contention_files({name: list(RunningSummary(recs).shares)
                             for name, recs in sources.items()})
    return [note] if note else []  # one sentence for the view, naming its files


#: Bytes of decoded data one byte of a results file can become at most (records.line_cost:
#: a list of one-digit numbers, 2 bytes a value, 40 bytes once parsed).
COST_PER_FILE_BYTE = 20


def _reservation(files, runs, request, limit: int) -> int:
    """The memory an analysis of these files reserves from the shared pool: what they can
    decode to at most (COST_PER_FILE_BYTE a byte, 1 MB for the rest), at most its budget."""
    paths = _paths(files)
    for name in runs or []:
        try:
            paths.append(session_run_path(request, name))
        except UserError:
            pass
    size = 0
    for p in paths:
        try:
            size += os.path.getsize(p)
        except OSError:
            pass
    return min(limit, COST_PER_FILE_BYTE * size + 2**20)


@contextmanager
def _analysis_memory(files, runs, request):
    """A decoded-size budget for one analysis, its bytes reserved from the pool all analyses
    share (waiting while others hold it); a wait past its bound is said in a sentence."""
    budget = guard.results_budget()
    try:
        held = guard.analyses_pool().reserve(_reservation(files, runs, request, budget.limit))
        held.__enter__()
    except UserError as e:
        raise gr.Error(html_text(ui_message(e)), print_exception=False) from None
    try:
        yield budget
    finally:
        held.__exit__(None, None, None)
        release_freed_memory()


def release_freed_memory() -> None:
    """Hand the memory an analysis freed back to the system: glibc keeps freed blocks of a
    thread's heap (and raises its mmap threshold after a large free), so a server's RSS stayed
    1.7 GB up after one large analysis. malloc_trim(0) returns them; elsewhere a no-op."""
    import gc
    gc.collect()
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def analyze(files, runs, skip_bad_lines, request: gr.Request):
    """Summary table, histogram, stage bars, decode steps, 10 slowest, modes, and A vs B."""
    try:
        guard.count_upload(session_id(request), _paths(files))
    except UserError as e:
        raise gr.Error(html_text(ui_message(e)), print_exception=False) from None
    with _analysis_memory(files, runs, request) as budget:
        return _analyze(files, runs, skip_bad_lines, request, budget)


def _analyze(files, runs, skip_bad_lines, request, budget):
    sources, errors = load_sources(files, runs, skip_bad_lines, request, budget)
    if errors:
        gr.Warning(html_text(" ".join(errors)))
    df, sf, per = _frames(sources)
    pdf, psf = shown(df), shown_runs(sf)  # what the charts draw: a file's texts as text
    names = list(sources)
    if not sources:
        msg = md_text(" ".join(errors)) if errors else ("Upload a JSONL file or pick a run of"
                                                        " this session.")
        status = status_md(msg, "error" if errors else "info")
    else:
        n = sum(len(r) for r in sources.values())
        status = f"**{n} record(s)** from {len(sources)} file(s): {md_text(', '.join(names))}."
        notes = analysis.source_differences(sources) + check_notes(sources)
        late = analysis.without_late(df, fix=LATE_FIX)[1]  # left out of every median below
        notes += [late] if late else []
        if notes:
            status += "  \n" + "  \n".join(status_md(md_text(x), "warn") for x in notes)
        if errors:
            status += "  \n" + status_md(md_text(" ".join(errors)), "error")
    summary = analysis.summarize(df) if sources else _empty_df(["source", "mode", "count"])
    slow = labelled(analysis.slowest(df, 10)) if sources else _empty_df(["source", "id"])
    modes_table, ratios = analysis.compare_modes(df) if sources else (_empty_df(["mode"]), {})
    mode_figs = plots.mode_compare_figs(pdf if sources else pd.DataFrame(), MODE_METRICS)
    a = names[0] if names else None
    b = names[1] if len(names) > 1 else None
    return (status, summary,
            sized(integer_counts(plots.decode_hist_fig(pdf), len(pdf)), 340),
            sized(plots.stage_bars_fig(pdf), 420),
            sized(plots.decode_steps_fig(psf), 400), slow, modes_table,
            sized(mode_figs["ttft_ms"], 320), sized(mode_figs["decode_avg_ms"], 320),
            gr.update(choices=names, value=a), gr.update(choices=names, value=b),
            *_compare(sources, a, b, per), ratios_md(ratios, modes_table if sources else None),
            sized(mode_figs["e2e_ms"], 320), sized(mode_figs["tokens_per_second"], 320),
            sized(plots.sweep_fig(_sweep_rows(pdf) if sources else pd.DataFrame()), 380))


def _sweep_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Only records of a length sweep (ids in<N>-out<M>): other files have one length per
    prompt, and a line through them would suggest a trend that is not there."""
    return df[analysis.sweep_input_lens(df["id"]).notna()]


def compare_pair(files, runs, skip_bad_lines, a, b, request: gr.Request):
    with _analysis_memory(files, runs, request) as budget:
        sources, _ = load_sources(files, runs, skip_bad_lines, request, budget)
        return _compare(sources, a, b)


def refresh_runs(request: gr.Request):
    """This session's runs as choices (newest first), keeping nothing it no longer has."""
    return gr.update(choices=session_runs(request))
