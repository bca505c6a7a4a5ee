"""`python -m c2c_core <profile|batch|dataset|sweep|align|report|run|compare|load|serve|overhead|engines>`:
each subcommand is `add_args(parser)` + `main(args)`; heavy imports happen inside `main`.

Input errors are found before any model loads; every UserError is one line on stderr and a
non-zero exit, with the records already written left intact.

Kept as one module (over 500 lines) on purpose: each subcommand is a short add_args/main pair
built from the shared argument builders here.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from ..spec.config import (ALIGNMENTS, DEFAULT_PRESET, ENGINES, FUSIONS, PRESETS, TIMING_METHODS,
    FuserSpec, GenerationConfig, ModelSpec, RunConfig, default_of, help_of)
from ..spec.errors import UserError
from ..io.prompts import BUILTIN_PROMPTS
from ..report.summary import print_summary
from .reporting import write_run_summary

DEFAULT_OUTPUTS = {"batch": "batch_timing_results.jsonl", "dataset": "dataset_timing_results.jsonl"}
#: Commands that say each phase on stderr as they enter it, with the time since they started:
#: the long ones (a cold `align` assembles a GGUF, `engines` compiles shape by shape, `sweep`
#: warms up every shape), which otherwise sat silent for minutes.
PHASED_COMMANDS = {"align", "engines", "sweep", "serve", "load"}


# --- shared flags --------------------------------------------------------------------------

#: CLI option (dest) -> the config dataclass field it sets. The option's help is that field's
#: metadata help (config.help_of), and its default, where the CLI gives one, the field's default:
#: both are written once, in config.py.
CONFIG_OPTIONS = {
    "base_model": (RunConfig, "receiver"),
    "teacher_model": (RunConfig, "sharer"),
    "alignment": (RunConfig, "alignment"),
    "fusion": (RunConfig, "fusion"),
    "fuser": (FuserSpec, "source"),
    "tokenizer": (ModelSpec, "tokenizer"),
    "hidden_dim": (FuserSpec, "hidden_dim"),
    "intermediate_dim": (FuserSpec, "intermediate_dim"),
    "num_layers": (FuserSpec, "num_layers"),
    "device": (RunConfig, "device"),
    "dtype": (RunConfig, "dtype"),
    "threads": (RunConfig, "threads"),
    "attn_implementation": (RunConfig, "attn_implementation"),
    "mode": (RunConfig, "mode"),
    "max_new_tokens": (GenerationConfig, "max_new_tokens"),
    "ignore_eos": (GenerationConfig, "ignore_eos"),
    "do_sample": (GenerationConfig, "do_sample"),
    "temperature": (GenerationConfig, "temperature"),
    "top_p": (GenerationConfig, "top_p"),
    "top_k": (GenerationConfig, "top_k"),
    "seed": (GenerationConfig, "seed"),
    "t2t_note_tokens": (GenerationConfig, "t2t_note_tokens"),
    "warmup": (RunConfig, "warmup"),
    "repeats": (RunConfig, "repeats"),
    "timing": (RunConfig, "timing"),
    "engine": (RunConfig, "engine"),
    "batch_size": (RunConfig, "batch_size"),
}
#: The options that are build_run_config overrides (same name as their field).
OVERRIDES = [d for d, (cls, name) in CONFIG_OPTIONS.items() if d == name and cls is not ModelSpec]


def _config_arg(g, dest: str, default: bool = True, **kw) -> None:
    """--dest with its config field's help (and, unless default=False, its default)."""
    cls, name = CONFIG_OPTIONS[dest]
    if default and kw.get("action") not in ("store_true", "append"):
        kw["default"] = default_of(cls, name)
    g.add_argument(f"--{dest}", help=help_of(cls, name), **kw)


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("models")
    g.add_argument("--preset", default=None,
                   help=f"one of {', '.join(PRESETS)} (default {DEFAULT_PRESET})")
    _config_arg(g, "base_model", default=False)
    _config_arg(g, "teacher_model", action="append")
    _config_arg(g, "alignment", default=False, choices=ALIGNMENTS)
    _config_arg(g, "fusion", default=False, choices=FUSIONS)
    _config_arg(g, "fuser", default=False)
    _config_arg(g, "tokenizer", default=False)
    for dest in ("hidden_dim", "intermediate_dim", "num_layers"):
        _config_arg(g, dest, default=False, type=int)
    _config_arg(g, "device")
    _config_arg(g, "dtype")
    _config_arg(g, "threads", type=int)
    _config_arg(g, "attn_implementation")


def add_decoding_args(g, **max_new) -> None:
    """The generation flags (GenerationConfig's) and --no_chat_template; `max_new`: keyword
    arguments for --max_new_tokens (the run commands' default=False: a command picks it)."""
    _config_arg(g, "max_new_tokens", type=int, **max_new)
    _config_arg(g, "ignore_eos", action="store_true")
    _config_arg(g, "do_sample", action="store_true")
    _config_arg(g, "temperature", type=float)
    _config_arg(g, "top_p", type=float)
    _config_arg(g, "top_k", type=int)
    _config_arg(g, "seed", type=int)
    _config_arg(g, "t2t_note_tokens", type=int)
    g.add_argument("--no_chat_template", action="store_true", help="feed the raw prompt text")


def add_run_args(p: argparse.ArgumentParser, output_default: str | None, outputs: bool = True) -> None:
    g = p.add_argument_group("run")
    _config_arg(g, "mode")
    # None: the dataset command picks it by answer kind (config: GenerationConfig's default)
    add_decoding_args(g, default=False)
    _config_arg(g, "warmup", type=int)
    _config_arg(g, "repeats", type=int)
    _config_arg(g, "timing", choices=TIMING_METHODS)
    _config_arg(g, "engine", choices=ENGINES)
    _config_arg(g, "batch_size", type=int)
    if not outputs:
        return
    o = p.add_argument_group("output")
    o.add_argument("--output", default=output_default, help="JSONL file (overwritten unless --append)")
    o.add_argument("--append", action="store_true", help="append to --output")
    o.add_argument("--resume", action="store_true", help="append, skipping ids already in --output")


def add_source_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("prompts")
    g.add_argument("--dataset", help="Hugging Face dataset, e.g. gsm8k or cais/mmlu")
    g.add_argument("--dataset_config", help="dataset config (gsm8k: main; mmlu: all)")
    g.add_argument("--split", default="test")
    g.add_argument("--dataset_file", help="local .jsonl/.csv/.parquet with prompt/question/text")
    g.add_argument("--field", help="text field to read")
    g.add_argument("--num_samples", type=int, help="first N rows after --offset")
    g.add_argument("--offset", type=int, default=0, help="rows to skip first")
    g.add_argument("--shard", help="i/n: contiguous block i of n of the selection")
    g.add_argument("--skip_bad_lines", action="store_true", help="skip malformed rows instead of stopping")
    g.add_argument("--encoding", help="text encoding of --dataset_file (default utf-8), e.g. latin-1")


def run_config(args):
    from ..spec.config import build_run_config
    kw = {k: getattr(args, k) for k in OVERRIDES if getattr(args, k, None) is not None}
    kw["chat_template"] = not args.no_chat_template
    return build_run_config(args.preset, args.base_model, args.teacher_model, args.fuser,
                            tokenizer=args.tokenizer, **kw)


# --- running -------------------------------------------------------------------------------

#: While `run CONFIG` runs ("on"): the last point's models (key, pipe), kept for the next point
#: when it needs the same ones (another batch size, mode or engine): no second load.
_SHARED_MODELS: dict = {}


def _load(cfg):
    from ..models.loading import load_announced
    if not _SHARED_MODELS.get("on"):
        return load_announced(cfg)
    from .manager import ModelManager
    key = ModelManager.key_of(cfg)
    if _SHARED_MODELS.get("key") == key:
        print("Models of the previous point kept (same models, device, dtype and threads).",
              file=sys.stderr)
        return _SHARED_MODELS["pipe"]
    _SHARED_MODELS.pop("pipe", None)  # the previous point's models go before the next load
    _SHARED_MODELS.pop("key", None)
    import gc
    gc.collect()
    pipe = load_announced(cfg)
    _SHARED_MODELS.update(key=key, pipe=pipe)
    return pipe


def _lock_output(args, path: str | None = None) -> None:
    """Before any model loads: the output must be a writable file, and no other run may be
    writing it (two --resume runs on one file would write every record twice). The lock is held
    until main() returns (or the process ends)."""
    from ..io.fileio import lock_output
    path = args.output if path is None else path
    if path is not None:
        args._output_lock = lock_output(path)


def _check_html(args) -> None:
    """--html is written after the run: refuse an unwritable one before anything runs."""
    from ..io.fileio import check_writable
    if getattr(args, "html", None) is not None:
        check_writable(args.html, "--html")


def resume_state(args, cfg, sweep: bool = False):
    """--resume: the records already in --output (records.Done), after refusing a file made
    with other settings. Before any model loads. None without --resume."""
    from ..io.records import done_records
    from ..bench.runner import check_resume_settings
    if not args.resume:
        return None
    done = done_records(args.output)
    check_resume_settings(done, args.output, cfg, sweep)
    if done.note():
        print(f"Note: {done.note()}", file=sys.stderr)
    if done:
        print(f"Resuming: {done.total} record(s) already in {args.output}; only prompts, modes"
              " and repeats not among them run.", file=sys.stderr)
    return done


def _writer(args):
    from ..io.records import JsonlWriter
    return JsonlWriter(args.output, append=args.append or args.resume)


def _run_with_bar(pipe, cfg, items, writer, skip):
    """Streams: the records go to the file, only a running summary stays in memory."""
    from tqdm import tqdm

    from ..bench.runner import run_many
    from ..report.summary import RunningSummary
    bar = tqdm(total=0, unit="gen", dynamic_ncols=True, file=sys.stderr, delay=0.5)
    summary = RunningSummary()

    def on_progress(done, total, rec):
        bar.total = total
        if rec is not None:
            summary.add(rec)
            bar.update(1)
            bar.set_postfix_str(f"id={rec['id']} {rec['mode']} "
                                f"{rec['timing']['decode_avg_ms']:.1f} ms/tok")
        bar.refresh()

    try:
        run_many(pipe, cfg, items, writer=writer, on_progress=on_progress, skip=skip, keep=False)
    finally:
        bar.close()
    return summary


def cmd_profile(args) -> int:
    from ..bench.profiling import profile_item, profile_paths
    from ..io.prompts import resolve_prompts
    items = resolve_prompts(prompt=args.prompt)
    cfg = run_config(args)
    paths = profile_paths(args.output, gz=args.trace_gz)
    _lock_output(args, paths.jsonl)
    pipe = _load(cfg)
    rec, _ = profile_item(pipe, cfg, items[0], paths, append=args.append or args.resume)
    print(f"Response: {rec['response']}")
    print_summary([rec])
    print(f"Wrote {paths.jsonl}, {paths.tsv}, {paths.trace} (open in ui.perfetto.dev or"
          f" chrome://tracing), {paths.stats}")
    write_run_summary(args, paths.jsonl)
    return 0


def cmd_batch(args) -> int:
    from ..io.prompts import resolve_prompts
    items = resolve_prompts(prompts=args.prompts or None)
    return _run_items(args, items)


def cmd_dataset(args) -> int:
    from ..io.prompts import cli_file_caps, resolve_prompts, skipped_note
    if not args.dataset and not args.dataset_file:
        raise UserError("dataset needs --dataset NAME or --dataset_file PATH.")
    items = resolve_prompts(dataset=args.dataset, dataset_config=args.dataset_config,
                            split=args.split, dataset_file=args.dataset_file, field=args.field,
                            offset=args.offset, num_samples=args.num_samples, shard=args.shard,
                            skip_bad_lines=args.skip_bad_lines, encoding=args.encoding,
                            caps=cli_file_caps() if args.dataset_file else None)
    print(f"{len(items)} prompt(s) selected. {skipped_note(items)}".strip(), file=sys.stderr)
    if args.max_new_tokens is None:
        from ..io.prompts import default_max_new_tokens
        args.max_new_tokens, why = default_max_new_tokens(items)
        print(f"max_new_tokens {args.max_new_tokens} ({why}); pass --max_new_tokens to change it.",
              file=sys.stderr)
    return _run_items(args, items)


def _check_memory(cfg, batch: int, tokens: int, what: str) -> None:
    """Before any model loads: the models' weights and the KV cache of `batch` sequences of
    `tokens` tokens must fit this machine's free memory (budget.check_fits), refused in one
    sentence naming the estimate and the limit."""
    from ..engines.budget import check_fits
    check_fits(cfg, batch, tokens, what=what, host="this machine")


def _run_items(args, items) -> int:
    cfg = run_config(args)
    if items:  # a character counted as a token: an upper bound before the tokenizer loads
        longest = max(len(getattr(it, "prompt", "") or "") for it in items)
        _check_memory(cfg, min(cfg.batch_size, len(items)), longest + cfg.gen.max_new_tokens,
                      "This run's largest batch")
    from . import distributed
    if distributed.active():  # started by torchrun: data-parallel, merged exactly once
        return distributed.run_items(args, cfg, items)
    _lock_output(args)
    skip = resume_state(args, cfg)
    pipe = _load(cfg)
    writer = _writer(args)
    try:
        with writer:
            summary = _run_with_bar(pipe, cfg, items, writer, skip)
    except BaseException:  # stopped or failed: the records so far get their summary too
        write_run_summary(args)
        raise
    print_summary(summary)
    print(f"Wrote {summary.count} record(s) to {args.output}")
    write_run_summary(args)
    return 0


def cmd_overhead(args) -> int:
    from .overhead import app_vs_cli, overhead
    cfg = run_config(args)
    pipe = _load(cfg)
    if args.app_vs_cli:
        app_vs_cli(pipe, cfg, args.prompts or list(BUILTIN_PROMPTS), repeats=args.bench_repeats)
    else:
        overhead(pipe, cfg, repeats=args.bench_repeats, prompt=args.prompt)
    return 0


def cmd_align(args) -> int:
    """Each model's tokens side by side for one prompt: tokenizers only, no weights."""
    import json

    from ..plan.show import format_table, show_plan, summary_line, to_json
    if not (args.prompt or "").strip():  # before the preset or any tokenizer is read
        raise UserError("--prompt is empty; give it some text to align.")
    view = show_plan(run_config(args), args.prompt)
    if args.json:
        print(json.dumps(to_json(view), ensure_ascii=False))
        return 0
    print(format_table(view))
    if not view.any_different:
        print("Every sharer reads the receiver's tokenizer: its ids are fed as they are"
              " (no alignment, no padding).")
    print(summary_line(view))
    return 0


def _check_sweep_context(cfg, ins: list[int], outs: list[int]) -> None:
    from ..engines.limits import check_sweep_context
    check_sweep_context(cfg, ins, outs)


def cmd_engines(args) -> int:
    from ..bench.compare_engines import engines_bench
    cfg = run_config(args)
    pipe = _load(cfg)
    batch = args.bench_batch or (64 if pipe.device.type == "cuda" else 8)
    engines_bench(pipe, cfg, repeats=args.bench_repeats, batch=batch, prompt=args.prompt,
                  reference=args.reference or os.environ.get("C2C_REF") or None)
    return 0


def cmd_sweep(args) -> int:
    from ..bench.sweep import parse_lengths, run_sweep
    ins = parse_lengths(args.input_lens, "--input_lens")
    outs = parse_lengths(args.output_lens, "--output_lens")
    bss = parse_lengths(args.batch_sizes, "--batch_sizes") if args.batch_sizes else None
    cfg = run_config(args)
    _check_sweep_context(cfg, ins, outs)
    _check_memory(cfg, max(bss or [cfg.batch_size]), max(ins) + max(outs),
                  "This sweep's largest point")
    _check_html(args)
    from . import distributed
    if distributed.active():
        return distributed.run_sweep(args, cfg, ins, outs, bss)
    _lock_output(args)
    skip = resume_state(args, cfg, sweep=True)
    pipe = _load(cfg)
    writer = _writer(args)
    from tqdm import tqdm

    from ..report.summary import RunningSummary
    from ..bench.runner import modes_of
    from ..bench.sweep import sweep_plan
    from ..measure.progress import Eta, fmt_seconds, shape_key
    summary = RunningSummary()
    # tqdm's own time left counts records as equal (it fell to 0 with the largest shape still
    # to run): the bar shows the ETA by shape and mode instead
    eta = Eta(list(modes_of(cfg)), sweep_plan(cfg, ins, outs, bss))
    shape = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"
    try:
        with writer, tqdm(unit="gen", file=sys.stderr, bar_format=shape) as bar:
            def on_progress(done, total, rec):
                bar.total = total
                if rec is None:
                    eta.start(total)
                else:
                    summary.add(rec)
                    eta.record(rec.get("mode"), shape_key(rec), rec.get("batch_size") or 1)
                left = eta.left()
                bar.set_postfix_str("" if left is None else f"ETA {fmt_seconds(left)}",
                                    refresh=False)
                bar.update(done - bar.n)
            run_sweep(pipe, cfg, ins, outs, writer=writer, on_progress=on_progress, skip=skip,
                      keep=False, batch_sizes=bss)
    except BaseException:  # stopped or failed: the records so far get their summary too
        write_run_summary(args)
        raise
    print_summary(summary)
    print(f"Wrote {summary.count} record(s) to {args.output}")
    write_run_summary(args)
    if args.html:  # from the file: this run's records (and any it resumed or appended to)
        from ..report.analysis import to_frame
        from ..report.plots import batch_curve_fig, sweep_fig
        from ..io.records import iter_jsonl
        figs = [sweep_fig(to_frame(iter_jsonl(args.output)))]
        recs = list(iter_jsonl(args.output))
        if len({r.get("batch_size", 1) for r in recs}) > 1:
            figs.append(batch_curve_fig(recs))
        with open(args.html, "w", encoding="utf-8") as f:
            for i, fig in enumerate(figs):
                f.write(fig.to_html(full_html=i == 0, include_plotlyjs=i == 0))
        print(f"Wrote {args.html}")
    return 0


def results_budget():
    """The decoded-size budget of the results files one `report` or `compare` reads:
    C2C_MAX_RESULTS_MB, by default room for any real run's files (decode steps as 8-byte
    floats), still refusing a file that would decode to gigabytes."""
    from ..io.decoded import RESULTS_MB_CLI, RESULTS_SETTING, DecodedBudget, env_mb
    return DecodedBudget(env_mb(RESULTS_SETTING, RESULTS_MB_CLI), RESULTS_SETTING)


def _frames(paths: list[str], skip_bad_lines: bool, summaries: dict | None = None):
    """One frame of the files' records, each run of other settings in a file (an --append of
    another run) as its own source, said on stderr. `summaries`, when given, gets each
    source's run summary (report.runreport.build_summary) for the HTML page."""
    import pandas as pd

    from ..report.analysis import split_runs, to_frame
    from ..io.records import read_records
    frames = []
    budget = results_budget()
    for p in paths:
        recs = read_records(p, skip_bad_lines=skip_bad_lines, budget=budget)
        if not recs:
            raise UserError(f"{p} holds no records; run a benchmark into it first.")
        runs = split_runs(os.path.basename(p), recs)
        if summaries is not None:
            from ..report.runreport import build_summary
            for name, part in runs:
                summaries[name] = build_summary(part, source=name)
        if len(runs) > 1:
            print(f"Note: {p} holds {len(runs)} runs with different settings; they are shown"
                  f" apart: {', '.join(name for name, _ in runs)}.", file=sys.stderr)
            frames += [to_frame(r, source=name).assign(run=name) for name, r in runs]
        else:
            frames.append(to_frame(recs, source=os.path.basename(p)))
    return pd.concat(frames, ignore_index=True)


def _warn_duplicates(df) -> None:
    from ..report.analysis import duplicates_note
    note = duplicates_note(df)
    if note:
        print(f"Warning: {note}", file=sys.stderr)


def _warn_contention(df) -> None:
    """Per file: a warning when its CPU generations did not get their threads' time."""
    from ..report.summary import contention_note
    if "cpu_share" not in df.columns:
        return
    for src, part in df.groupby("source", sort=False) if "source" in df.columns else [("", df)]:
        note = contention_note([float(x) for x in part["cpu_share"].dropna()])
        if note:
            print(f"Warning: {src + ': ' if src else ''}{note}", file=sys.stderr)


def _report_table(table):
    """The per-mode table as printed: without accuracy columns when no record was scored, and
    accuracy blank (not NaN) for the modes without scored records."""
    if "n_scored" not in table.columns or "accuracy" not in table.columns:
        return table
    if not (table["n_scored"] > 0).any():
        return table.drop(columns=["accuracy", "n_scored"])
    return table.assign(accuracy=table["accuracy"].map(lambda a: "" if a != a else a))


def ratio_line(name: str, r: dict) -> str:
    """One mode ratio as a sentence that names the statistic ("c2c over t2t: TTFT 0.976, ...
    (median of the per-prompt ratios, n=2 pair(s) matched by id and repeat; below 1 = c2c
    faster)")."""
    from ..report.analysis import RATIO_METRICS, name as metric_name, ratio_words
    vals = ", ".join(f"{metric_name(m)} {r[m]}" for m in RATIO_METRICS if m in r)
    words = name.replace("_", " ")
    first = words.split(" over ")[0]
    return f"{words}: {vals} ({ratio_words(r)}; below 1 = {first} faster)"


def cmd_report(args) -> int:
    """Per mode: ttft, e2e, decode ms/token, tok/s, accuracy; C2C over T2T and over receiver."""
    import json

    from ..report.analysis import compare_modes
    from .load import load_files, report_load
    _check_html(args)
    if load_files(args.files):  # `load` runs: their per-point table
        return report_load(args, results_budget())
    summaries: dict = {}
    df = _frames(args.files, args.skip_bad_lines, summaries if args.html else None)
    _warn_duplicates(df)
    _warn_contention(df)
    table, ratios = compare_modes(df, include_late=args.include_late)
    if table.attrs.get("late_note"):
        print(f"Note: {table.attrs['late_note']}", file=sys.stderr)
    print(_report_table(table).to_string(index=False))
    for name, r in ratios.items():
        print(ratio_line(name, r))
    if args.html:
        _write_report_html(args.html, df, summaries, ratios)
        print(f"Wrote {args.html}")
    print(json.dumps({"ratios": ratios}, default=str))
    return 0


def _write_report_html(path: str, df, summaries: dict, ratios: dict) -> None:
    """`report --html`: one self-contained page (report.runreport.html_report): the notes, run
    metadata, per-mode statistics and stage medians per file, the ratios and the charts."""
    from ..report.analysis import duplicates_note, sweep_input_lens
    from ..report.plots import mode_compare_figs, stage_bars_fig, sweep_fig
    from ..report.runreport import html_report, write_text
    figs = list(mode_compare_figs(df).values())
    if sweep_input_lens(df["id"]).notna().any():
        figs.append(sweep_fig(df))
    elif len(df) <= 200:  # per-sample bars stay readable for a few hundred records
        figs.append(stage_bars_fig(df))
    notes = [n for n in [duplicates_note(df)] if n]
    lines = [ratio_line(name, r) for name, r in ratios.items()]
    write_text(path, html_report(summaries, figs, notes, lines))


def cmd_load(args) -> int:
    """`load`: the sweep of frontends.load; the model flags' config for its own server."""
    from .load import run_load
    _lock_output(args)
    return run_load(args, make_config=lambda: run_config(args))


def cmd_run(args) -> int:
    """`run CONFIG.yaml`: every point of the experiment (frontends.experiment)."""
    from .experiment import Cli, run_experiment
    _SHARED_MODELS["on"] = True
    try:
        return run_experiment(Cli(build_parser, run_config, main), args.config, html=args.html)
    finally:
        _SHARED_MODELS.clear()


def cmd_serve(args) -> int:
    """`serve`: an OpenAI-compatible HTTP server over the scheduler (frontends.serve)."""
    from .serve import serve_main
    return serve_main(args, run_config(args))


def _json_safe(v):
    """NaN -> None and numpy scalars -> Python, so the JSON line is strict JSON."""
    if hasattr(v, "item"):
        v = v.item()
    return None if isinstance(v, float) and v != v else v


def cmd_compare(args) -> int:
    """Run B against run A on paired records (same input digest, mode and repeat): exit 1 on a
    regression beyond the noise, 2 when the files cannot be compared (no timing records, no
    shared prompts, other prompts under the same ids, too few pairs), 3 when either run competed
    for its CPU cores (inconclusive, never a regression). Every exit prints a last line of
    JSON: status "regression" / "ok" / "cannot_compare" / "inconclusive", the reason,
    the pairs per mode, and per mode and metric the ratio, interval, verdict and regression
    (null where too few pairs left it unjudged)."""
    import json
    from .load import compare_load, load_files
    if load_files([args.a, args.b]):  # `load` runs: per-point differences
        return compare_load(args, results_budget())
    state: dict = {"pairs": {}, "metrics": {}}  # what is known when a UserError ends the run
    try:
        code, summary = _compare_files(args, state)
    except (UserError, OSError) as e:
        print(json.dumps({"status": "cannot_compare", "exit": 2, "reason": str(e),
                          "min_pairs": args.min_pairs, "pairs": state["pairs"],
                          "regressions": [], "not_judged": state.get("not_judged", []),
                          "metrics": state["metrics"]}))
        raise
    print(json.dumps(summary))
    return code


#: compare's exit codes (README, "compare"): 0 no regression beyond the noise, 1 a regression,
#: 2 the files cannot be compared, 3 inconclusive (either run competed for its CPU cores).
EXIT_OK, EXIT_REGRESSION, EXIT_CANNOT, EXIT_INCONCLUSIVE = 0, 1, 2, 3


def _compare_files(args, state: dict) -> tuple[int, dict]:
    from ..report.analysis import (COMPARE_METRICS, compare_runs, contended, contention_reason,
        has_timing, mark_contended, pair_on, prompt_mismatch, regressions, source_differences,
        paid_late, split_runs, to_frame, without_late)
    from ..io.records import read_records
    recs = {}
    budget = results_budget()
    for path in (args.a, args.b):
        recs[path] = read_records(path, skip_bad_lines=args.skip_bad_lines, budget=budget)
        if not recs[path]:
            raise UserError(f"{path} holds no records; run a benchmark into it first.")
        runs = split_runs(os.path.basename(path), recs[path])
        if len(runs) > 1:
            print(f"Warning: {path} holds {len(runs)} runs with different settings"
                  f" ({', '.join(n for n, _ in runs)}); their records are compared together.",
                  file=sys.stderr)
    a = to_frame(recs[args.a], source=os.path.basename(args.a))
    b = to_frame(recs[args.b], source=os.path.basename(args.b))
    _warn_duplicates(a)
    _warn_duplicates(b)
    for note in source_differences({os.path.basename(k): v for k, v in recs.items()}):
        if "different prompts" not in note:  # said below, with the counts of shared ids
            print(f"Warning: {note}", file=sys.stderr)
    del recs
    for df, path in ((a, args.a), (b, args.b)):
        if not has_timing(df):
            raise UserError(f"{path} has no timing records (none carries {', '.join(COMPARE_METRICS)});"
                            " compare two results files written by a benchmark run.")
    modes = [args.mode] if args.mode else [m for m in dict.fromkeys(a["mode"]) if m in set(b["mode"])]
    if not modes or any(a[a["mode"] == m].empty or b[b["mode"] == m].empty for m in modes):
        raise UserError(f"{args.a} and {args.b} share no mode{f' {args.mode}' if args.mode else ''}"
                        " to compare; pick --mode from the modes both files hold.")
    a, b = a[a["mode"].isin(modes)], b[b["mode"].isin(modes)]
    late = {"a": int(paid_late(a).sum()), "b": int(paid_late(b).sum())}
    a, late_a = without_late(a, args.include_late)
    b, late_b = without_late(b, args.include_late)
    for path, note in ((args.a, late_a), (args.b, late_b)):
        if note:
            print(f"Note: {path}: {note}", file=sys.stderr)
    differ, shared = prompt_mismatch(a, b)
    if differ:
        raise UserError(f"{differ} of the {shared} prompt id(s) found in both {args.a} and"
                        f" {args.b} name different prompts in the two (other inputs numbered by"
                        " row), so a pair would set one prompt against another; run both on the"
                        " same prompts.")
    on = pair_on(a, b)
    what = "input digest" if on == "input_digest" else "id"
    if on == "id":
        print("Note: records without an input digest (files from an older version) are paired"
              " by prompt id.", file=sys.stderr)
    keys_a, keys_b = set(a[on].astype(str)), set(b[on].astype(str))
    if not keys_a & keys_b:
        raise UserError(f"{args.a} and {args.b} share no prompt {'ids' if on == 'id' else 'inputs'},"
                        " so no record has a partner to be compared with; run both on the same"
                        " prompts.")
    if keys_a != keys_b:
        print(f"Warning: the files share {len(keys_a & keys_b)} of {len(keys_a | keys_b)} prompts;"
              " only the shared ones are compared.", file=sys.stderr)
    table = compare_runs(a, b, threshold=args.threshold, min_pairs=args.min_pairs, on=on)
    contention = contention_reason({args.a: contended(a), args.b: contended(b)})
    if contention:
        table = mark_contended(table)
    pairs = table.groupby("mode", sort=False)["pairs"].max()
    state["pairs"] = {str(k): int(v) for k, v in pairs.items()}
    for row in table.to_dict("records"):  # mode -> metric -> verdict; regression None: not judged
        state["metrics"].setdefault(row["mode"], {})[row["field"]] = {
            "pairs": int(row["pairs"]), "ratio": _json_safe(row["ratio B/A"]),
            "ci": [_json_safe(row["CI low"]), _json_safe(row["CI high"])],
            "verdict": row["verdict"], "regression": _json_safe(row["regression"])}
    few = table[table["verdict"] == "too few pairs"]
    state["not_judged"] = [f"{m} {f}" for m, f in zip(few["mode"], few["field"])]
    if not (table["pairs"] > 0).any():
        raise UserError(f"{args.a} and {args.b} share prompts but no ({what}, mode, repeat)"
                        " record with timing in both; run both with the same --repeats and modes.")
    cols = [c for c in table.columns if c not in ("field", "beyond_noise")]
    shown = table[cols].assign(regression=table["regression"].map(
        lambda v: "n/a" if v is None else v))
    print(shown.to_string(index=False))
    for mode, n in pairs.items():
        judged = "" if n >= args.min_pairs else f"; not judged (--min_pairs {args.min_pairs})"
        print(f"{mode}: {n} pair(s) by ({what}, mode, repeat), of {int((a['mode'] == mode).sum())}"
              f" record(s) in A and {int((b['mode'] == mode).sum())} in B{judged}.")
    summary = {"pairs": state["pairs"], "paired_by": on, "min_pairs": args.min_pairs,
               "late_records": late, "late_included": bool(args.include_late),
               "regressions": [], "not_judged": state["not_judged"], "metrics": state["metrics"]}
    if contention:
        print(f"INCONCLUSIVE: {contention}")
        return EXIT_INCONCLUSIVE, {"status": "inconclusive", "exit": EXIT_INCONCLUSIVE,
                                   "reason": contention, **summary}
    bad = regressions(table)
    summary["regressions"] = [f"{m} {f}" for m, f in zip(bad["mode"], bad["field"])]
    if len(bad):
        worse = ", ".join(f"{m} {metric}" for m, metric in zip(bad["mode"], bad["metric"]))
        reason = (f"{worse} worse beyond the noise (median of per-pair ratios, its 95% interval"
                  " excludes 1).")
        print(f"REGRESSION: {reason}")
        return EXIT_REGRESSION, {"status": "regression", "exit": EXIT_REGRESSION,
                                 "reason": reason, **summary}
    if len(few) == len(table):
        counts = ", ".join(f"{m} {n}" for m, n in state["pairs"].items())
        raise UserError(f"too few pairs to tell a change from noise in any mode: each mode is"
                        f" judged on its own and needs at least --min_pairs {args.min_pairs} pairs"
                        f" (same {what}, mode and repeat); found per mode {counts}"
                        f" ({sum(state['pairs'].values())} in all, never pooled across modes);"
                        " run more prompts or --repeats.")
    note = f" (not judged, too few pairs: {', '.join(state['not_judged'])})" if len(few) else ""
    print(f"No regression beyond the noise{note}.")
    return EXIT_OK, {"status": "ok", "exit": EXIT_OK,
                     "reason": f"no regression beyond the noise{note}.", **summary}


# --- entry ---------------------------------------------------------------------------------

#: --include_late of report and compare.
LATE_HELP = ("count the records that paid for late preparation (timing.late_prepare_ms > 0: a"
             " shape compiled or captured inside their own clock); left out of medians by default")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m c2c_core",
                                 description="Time C2C (Cache-to-Cache) inference stage by stage.")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("profile", help="one prompt in detail: JSONL, TSV, Chrome trace, op stats")
    p.add_argument("--prompt", default=BUILTIN_PROMPTS[0])
    p.add_argument("--trace_gz", action="store_true", help="write the trace as .json.gz")
    add_model_args(p)
    add_run_args(p, None)
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("batch", help="the 5 built-in prompts (or --prompts) -> JSONL")
    p.add_argument("--prompts", nargs="+", help="prompts to run instead of the built-in five")
    add_model_args(p)
    add_run_args(p, DEFAULT_OUTPUTS["batch"])
    p.set_defaults(func=cmd_batch)

    p = sub.add_parser("dataset", help="prompts from a HF dataset or a local file -> JSONL")
    add_source_args(p)
    add_model_args(p)
    add_run_args(p, DEFAULT_OUTPUTS["dataset"])
    p.set_defaults(func=cmd_dataset)

    p = sub.add_parser("sweep", help="exact-length synthetic prompts x fixed output lengths")
    p.add_argument("--input_lens", default="16,64,256", help="prompt lengths in tokens, e.g. 16,64,256,1024")
    p.add_argument("--output_lens", default="32", help="output lengths in tokens (EOS ignored)")
    p.add_argument("--html", help="also write the stage-vs-length plot (and, with several"
                   " --batch_sizes, the latency vs throughput plot) as HTML")
    p.add_argument("--batch_sizes", help="batch sizes to sweep, e.g. 1,4,8 (fast engine)")
    add_model_args(p)
    add_run_args(p, "sweep_timing_results.jsonl")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("align", help="each model's tokens for one prompt, side by side: sections,"
                       " padding, what is projected (tokenizers only, no weights load)")
    p.add_argument("--prompt", required=True, help="the user message to align")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (receiver_ids, sharer_ids and projection_mask per"
                        " sharer, pad masks, sections, strategy) instead of the table")
    p.add_argument("--no_chat_template", action="store_true", help="align the raw prompt text")
    add_model_args(p)
    p.set_defaults(func=cmd_align)

    p = sub.add_parser("report", help="compare modes in JSONL files: table, ratios, charts")
    p.add_argument("files", nargs="+", help="JSONL result files")
    p.add_argument("--html", help="write the charts as one HTML file")
    p.add_argument("--skip_bad_lines", action="store_true")
    p.add_argument("--include_late", action="store_true", help=LATE_HELP)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("run", help="an experiment from a YAML file: a command's options, any"
                       " given as a list swept (engine x dtype x preset x batch ...), one JSONL"
                       " and summary.json per point, experiment.summary.json for all")
    p.add_argument("config", help="YAML file: command (batch, dataset, sweep or profile), output"
                   " (a folder) and the command's options by name, e.g. dtype: [float32, bfloat16]")
    p.add_argument("--html", help="also write the report of all points (report --html) here")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("compare", help="run B vs run A, paired by (input digest, mode, repeat);"
                       " exit 1 on a regression beyond the noise, 2 when they cannot be compared,"
                       " 3 when inconclusive (either run competed for its CPU cores)")
    p.add_argument("a", help="baseline JSONL")
    p.add_argument("b", help="candidate JSONL")
    p.add_argument("--mode", help="compare only this mode")
    p.add_argument("--threshold", type=float, default=0.05, help="minimum relative change that counts")
    p.add_argument("--min_pairs", type=int, default=5,
                   help="fewest paired records (same input digest, mode, repeat) to judge a metric")
    p.add_argument("--skip_bad_lines", action="store_true")
    p.add_argument("--include_late", action="store_true", help=LATE_HELP)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("load", help="an open-loop load sweep (rates x modes) against an"
                       " OpenAI-compatible server (--url, or our own with the model flags):"
                       " per-request JSONL, per-point statistics, goodput, overload")
    from .load import add_args as add_load_args
    add_load_args(p)
    add_model_args(p)
    g = p.add_argument_group("run (--engine, --timing: the own server's; --seed: also the arrivals)")
    _config_arg(g, "engine", choices=ENGINES)
    _config_arg(g, "timing", choices=TIMING_METHODS)
    _config_arg(g, "seed", type=int)  # also seeds the arrival times
    p.set_defaults(func=cmd_load, no_chat_template=False)

    p = sub.add_parser("overhead", help="benchmark: cost of timing, and C2C vs receiver decode")
    p.add_argument("--bench_repeats", type=int, default=5, help="interleaved repeats per variant (>= 5)")
    p.add_argument("--prompt", default=BUILTIN_PROMPTS[0])
    p.add_argument("--app_vs_cli", action="store_true",
                   help="instead: the same prompts through the web app's worker process and the"
                        " CLI path, interleaved; prints decode ms/token app/CLI")
    p.add_argument("--prompts", nargs="+", help="--app_vs_cli: prompts (default the built-in five)")
    add_model_args(p)
    add_run_args(p, None, outputs=False)
    p.set_defaults(func=cmd_overhead)

    p = sub.add_parser("engines", help="benchmark: eager vs fast engine, and batch B vs batch 1")
    p.add_argument("--bench_repeats", type=int, default=5, help="interleaved repeats (>= 3)")
    p.add_argument("--bench_batch", type=int, default=None,
                   help="batch size compared with batch 1 (default 8 on a CPU, 64 on CUDA)")
    p.add_argument("--prompt", default=BUILTIN_PROMPTS[0])
    p.add_argument("--reference", default=None,
                   help="a clone of thu-nics/C2C (default $C2C_REF): its greedy tokens for the"
                        " same pipeline and plan beside ours")
    add_model_args(p)
    add_run_args(p, None, outputs=False)
    p.set_defaults(func=cmd_engines, max_new_tokens=32)
    for act in p._actions:  # its own default, said where --help says the shared one
        if act.dest == "max_new_tokens":
            act.help += "; this benchmark's own default: 32, EOS ignored"

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (/v1/completions,"
                       " /v1/chat/completions, one model per mode) over the continuous-batching"
                       " scheduler; every answer says its queue, TTFT and stage times")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: the"
                   " network; the server has no authentication)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free port)")
    p.add_argument("--slots", type=int, default=8, help="requests decoded together")
    p.add_argument("--max_queue", type=int, default=64,
                   help="requests waiting for a slot before a 429")
    p.add_argument("--max_prompt_tokens", type=int, default=1024,
                   help="longest prompt accepted, in receiver tokens")
    p.add_argument("--records", help="also write every served request's JSONL record here")
    add_model_args(p)
    add_decoding_args(p.add_argument_group("decoding (every request)"))
    g = p.add_argument_group("run (the scheduler batches on the fast engine: eager is refused)")
    _config_arg(g, "engine", choices=ENGINES)
    _config_arg(g, "timing", choices=TIMING_METHODS)
    p.set_defaults(func=cmd_serve, max_new_tokens=256)
    for act in p._actions:
        if act.dest == "max_new_tokens":
            act.help += "; serve: the cap on a request's max_tokens, default 256"
    return ap


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the run is, so it ends like Ctrl-C (records kept, one line)."""


def phases_on_stderr(t0: float | None = None):
    """A cancel.reporting function that writes "[12 s] Compiling … shape 2 of 4…" on stderr
    (above a progress bar, when one is drawn), the time counted from `t0` (default: now)."""
    import time

    from ..measure.progress import fmt_seconds
    t0 = time.perf_counter() if t0 is None else t0

    def say(phase: str) -> None:
        line = f"[{fmt_seconds(time.perf_counter() - t0)}] {phase[:1].upper()}{phase[1:]}…"
        try:
            from tqdm import tqdm
            tqdm.write(line, file=sys.stderr)
        except ImportError:  # pragma: no cover - tqdm comes with transformers
            print(line, file=sys.stderr, flush=True)
    return say


def _raise_terminated(signum, frame):
    raise Terminated()


#: errno values of OSErrors that are the machine's state, not a bug: said in one sentence.
_ENV_ERRNOS = {"ENOSPC", "EDQUOT", "EACCES", "EPERM", "EROFS", "EISDIR", "ENOTDIR", "ENAMETOOLONG"}


def main(argv: list[str] | None = None) -> int:
    import errno
    args = build_parser().parse_args(argv)
    in_main = threading.current_thread() is threading.main_thread()
    saved = signal.signal(signal.SIGTERM, _raise_terminated) if in_main else None
    try:
        from .distributed import check_command
        from ..measure import cancel
        check_command(args.command)
        with cancel.reporting(phases_on_stderr() if args.command in PHASED_COMMANDS else None):
            return args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`align ... | head`): no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as e:
        if errno.errorcode.get(e.errno) not in _ENV_ERRNOS:
            raise
        from ..io.fileio import os_error_sentence
        print(f"error: {os_error_sentence(e, e.filename or 'a file')}; records already written"
              " are kept.", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        out = getattr(args, "output", None)
        how = "Terminated" if isinstance(e, Terminated) else "Interrupted"
        print(f"\n{how}; records already written{f' to {out}' if out else ''} are kept.",
              file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, saved)
        lock = getattr(args, "_output_lock", None)
        if lock is not None:
            lock.release()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
