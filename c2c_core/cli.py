"""`python -m c2c_core <profile|batch|dataset|sweep|report|compare|overhead>`: each subcommand is
`add_args(parser)` + `main(args)`; heavy imports happen inside `main`.

Input errors are found before any model loads; every UserError is one line on stderr and a
non-zero exit, with the records already written left intact.
"""

from __future__ import annotations

import argparse
import os
import sys

from .config import PRESETS
from .errors import UserError
from .prompts import BUILTIN_PROMPTS

DEFAULT_OUTPUTS = {"batch": "batch_timing_results.jsonl", "dataset": "dataset_timing_results.jsonl"}


# --- shared flags --------------------------------------------------------------------------

def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("models")
    g.add_argument("--preset", default=None, help=f"one of {', '.join(PRESETS)} (default smollm2-demo)")
    g.add_argument("--base_model", help="receiver: hub id, local folder, .gguf, smollm2, or dummy:<config>")
    g.add_argument("--teacher_model", help="sharer: same forms as --base_model")
    g.add_argument("--fuser", help="fuser folder, hub:<repo>/<subfolder>, or 'untrained'")
    g.add_argument("--tokenizer", help="tokenizer for dummy weights: hub id, local folder, or smollm2")
    g.add_argument("--hidden_dim", type=int, help="untrained fuser hidden size (default 1024)")
    g.add_argument("--intermediate_dim", type=int, help="untrained fuser FFN size (default 1024)")
    g.add_argument("--num_layers", type=int, help="untrained fuser depth (default 3)")
    g.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1")
    g.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    g.add_argument("--threads", type=int, help="torch CPU threads")
    g.add_argument("--attn_implementation", help="eager, sdpa, flash_attention_2 (default: transformers' choice)")


def add_run_args(p: argparse.ArgumentParser, output_default: str | None, outputs: bool = True) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--mode", default="c2c", help="c2c, receiver, sharer, t2t, or all")
    g.add_argument("--max_new_tokens", type=int, default=64)
    g.add_argument("--ignore_eos", action="store_true", help="always generate max_new_tokens")
    g.add_argument("--do_sample", action="store_true", help="sample (default greedy)")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top_p", type=float, default=1.0)
    g.add_argument("--top_k", type=int, default=0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--t2t_note_tokens", type=int, default=64, help="t2t: cap on the sharer's note")
    g.add_argument("--no_chat_template", action="store_true", help="feed the raw prompt text")
    g.add_argument("--warmup", type=int, default=1, help="unrecorded warm-up generations")
    g.add_argument("--repeats", type=int, default=1, help="records per prompt")
    g.add_argument("--timing", default="event", choices=["event", "sync"],
                   help="event: CUDA events / perf_counter (default); sync: the seed's sync-per-stage")
    g.add_argument("--engine", default="auto", choices=["auto", "eager", "fast"],
                   help="fast: static caches, compiled decode, one batched projection; eager: the"
                        " faithful per-layer baseline; auto: fast on CUDA and for batches, else"
                        " the CPU default (README, Engines)")
    g.add_argument("--batch_size", type=int, default=1,
                   help="prompts generated together (fast engine; one record per prompt)")
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


def run_config(args):
    from .config import build_run_config
    keys = ["device", "dtype", "threads", "attn_implementation", "warmup", "repeats", "timing",
            "mode", "max_new_tokens", "ignore_eos", "do_sample", "temperature", "top_p", "top_k",
            "seed", "t2t_note_tokens", "hidden_dim", "intermediate_dim", "num_layers", "engine",
            "batch_size"]
    kw = {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}
    kw["chat_template"] = not args.no_chat_template
    return build_run_config(args.preset, args.base_model, args.teacher_model, args.fuser,
                            tokenizer=args.tokenizer, **kw)


# --- running -------------------------------------------------------------------------------

def _load(cfg):
    from .loading import load_pipeline
    print(f"Loading {cfg.preset}: {cfg.receiver.source} <- {cfg.sharer.source} ...", file=sys.stderr)
    pipe = load_pipeline(cfg)
    print(f"Loaded: {pipe.describe()}", file=sys.stderr)
    if pipe.info.get("fuser_note"):
        print(f"Note: {pipe.info['fuser_note']}.", file=sys.stderr)
    return pipe


def _writer_and_skip(args):
    from .records import JsonlWriter, done_keys
    skip = done_keys(args.output) if args.resume else None
    return JsonlWriter(args.output, append=args.append or args.resume), skip


def _run_with_bar(pipe, cfg, items, writer, skip):
    from tqdm import tqdm

    from .runner import run_many
    bar = tqdm(total=0, unit="gen", dynamic_ncols=True, file=sys.stderr, delay=0.5)

    def on_progress(done, total, rec):
        bar.total = total
        if rec is not None:
            bar.update(1)
            bar.set_postfix_str(f"id={rec['id']} {rec['mode']} "
                                f"{rec['timing']['decode_avg_ms']:.1f} ms/tok")
        bar.refresh()

    try:
        return run_many(pipe, cfg, items, writer=writer, on_progress=on_progress, skip=skip)
    finally:
        bar.close()


def print_summary(records: list[dict], out=None) -> None:
    """count, mean/p50/p90 of decode ms/token and tok/s, ttft, per mode."""
    import pandas as pd
    out = out or sys.stdout

    from .analysis import to_frame
    if not records:
        print("No records.", file=out)
        return
    df = to_frame(records)
    rows = []
    for mode, g in df.groupby("mode", sort=False):
        row = {"mode": mode, "count": len(g)}
        for col, name in (("decode_avg_ms", "decode ms/tok"), ("tokens_per_second", "tok/s"),
                          ("ttft_ms", "ttft ms")):
            s = g[col].dropna()
            row[f"{name} mean"] = s.mean()
            row[f"{name} p50"] = s.quantile(0.5)
            row[f"{name} p90"] = s.quantile(0.9)
        rows.append(row)
    print(pd.DataFrame(rows).round(2).to_string(index=False), file=out)


def cmd_profile(args) -> int:
    from .profiling import profile_item, profile_paths
    from .prompts import resolve_prompts
    items = resolve_prompts(prompt=args.prompt)
    cfg = run_config(args)
    paths = profile_paths(args.output, gz=args.trace_gz)
    pipe = _load(cfg)
    rec, _ = profile_item(pipe, cfg, items[0], paths, append=args.append or args.resume)
    print(f"Response: {rec['response']}")
    print_summary([rec])
    print(f"Wrote {paths.jsonl}, {paths.tsv}, {paths.trace} (open in ui.perfetto.dev or"
          f" chrome://tracing), {paths.stats}")
    return 0


def cmd_batch(args) -> int:
    from .prompts import resolve_prompts
    items = resolve_prompts(prompts=args.prompts or None)
    return _run_items(args, items)


def cmd_dataset(args) -> int:
    from .prompts import resolve_prompts, skipped_note
    if not args.dataset and not args.dataset_file:
        raise UserError("dataset needs --dataset NAME or --dataset_file PATH.")
    items = resolve_prompts(dataset=args.dataset, dataset_config=args.dataset_config,
                            split=args.split, dataset_file=args.dataset_file, field=args.field,
                            offset=args.offset, num_samples=args.num_samples, shard=args.shard,
                            skip_bad_lines=args.skip_bad_lines)
    print(f"{len(items)} prompt(s) selected. {skipped_note(items)}".strip(), file=sys.stderr)
    return _run_items(args, items)


def _run_items(args, items) -> int:
    cfg = run_config(args)
    pipe = _load(cfg)
    writer, skip = _writer_and_skip(args)
    with writer:
        recs = _run_with_bar(pipe, cfg, items, writer, skip)
    print_summary(recs)
    print(f"Wrote {len(recs)} record(s) to {args.output}")
    return 0


def cmd_overhead(args) -> int:
    from .bench import overhead
    cfg = run_config(args)
    pipe = _load(cfg)
    overhead(pipe, cfg, repeats=args.bench_repeats, prompt=args.prompt)
    return 0


def cmd_engines(args) -> int:
    from .engines import engines_bench
    cfg = run_config(args)
    pipe = _load(cfg)
    batch = args.bench_batch or (64 if pipe.device.type == "cuda" else 8)
    engines_bench(pipe, cfg, repeats=args.bench_repeats, batch=batch, prompt=args.prompt)
    return 0


def cmd_sweep(args) -> int:
    from .sweep import parse_lengths, run_sweep
    ins = parse_lengths(args.input_lens, "--input_lens")
    outs = parse_lengths(args.output_lens, "--output_lens")
    bss = parse_lengths(args.batch_sizes, "--batch_sizes") if args.batch_sizes else None
    cfg = run_config(args)
    pipe = _load(cfg)
    writer, skip = _writer_and_skip(args)
    from tqdm import tqdm
    with writer, tqdm(unit="gen", file=sys.stderr) as bar:
        def on_progress(done, total, rec):
            bar.total = total
            bar.update(done - bar.n)
        recs = run_sweep(pipe, cfg, ins, outs, writer=writer, on_progress=on_progress, skip=skip,
                         batch_sizes=bss)
    print_summary(recs)
    print(f"Wrote {len(recs)} record(s) to {args.output}")
    if args.html:
        from .plots import batch_curve_fig, sweep_fig
        from .analysis import to_frame
        figs = [sweep_fig(to_frame(recs))]
        if len({r.get("batch_size", 1) for r in recs}) > 1:
            figs.append(batch_curve_fig(recs))
        with open(args.html, "w", encoding="utf-8") as f:
            for i, fig in enumerate(figs):
                f.write(fig.to_html(full_html=i == 0, include_plotlyjs=i == 0))
        print(f"Wrote {args.html}")
    return 0


def _frames(paths: list[str], skip_bad_lines: bool):
    import pandas as pd

    from .analysis import to_frame
    from .records import read_records
    frames = []
    for p in paths:
        recs = read_records(p, skip_bad_lines=skip_bad_lines)
        if not recs:
            raise UserError(f"{p} holds no records; run a benchmark into it first.")
        frames.append(to_frame(recs, source=os.path.basename(p)))
    return pd.concat(frames, ignore_index=True)


def cmd_report(args) -> int:
    """Per mode: ttft, e2e, decode ms/token, tok/s, accuracy; C2C over T2T and over receiver."""
    import json

    from .analysis import compare_modes
    df = _frames(args.files, args.skip_bad_lines)
    table, ratios = compare_modes(df)
    print(table.to_string(index=False))
    for name, r in ratios.items():
        parts = ", ".join(f"{k} {v}" for k, v in r.items() if k not in ("n", "paired"))
        print(f"{name.replace('_', ' ')}: {parts} (n={r['n']}{', paired by id' if r['paired'] else ''})")
    if args.html:
        from .plots import mode_compare_figs, sweep_fig
        figs = list(mode_compare_figs(df).values())
        if df["id"].astype(str).str.match(r"in\d+-out\d+(-b\d+\.\d+)?$").any():
            figs.append(sweep_fig(df))
        with open(args.html, "w", encoding="utf-8") as f:
            for i, fig in enumerate(figs):
                f.write(fig.to_html(full_html=i == 0, include_plotlyjs=i == 0))
        print(f"Wrote {args.html}")
    print(json.dumps({"ratios": ratios}, default=str))
    return 0


def cmd_compare(args) -> int:
    """Run B against run A: exit 1 when a metric got worse beyond the runs' own spread."""
    from .analysis import compare_runs
    a = _frames([args.a], args.skip_bad_lines)
    b = _frames([args.b], args.skip_bad_lines)
    import pandas as pd
    modes = [args.mode] if args.mode else [m for m in dict.fromkeys(a["mode"]) if m in set(b["mode"])]
    if not modes or any(a[a["mode"] == m].empty or b[b["mode"] == m].empty for m in modes):
        raise UserError(f"{args.a} and {args.b} share no mode{f' {args.mode}' if args.mode else ''}"
                        " to compare; pick --mode from the modes both files hold.")
    ids_a, ids_b = set(a["id"].astype(str)), set(b["id"].astype(str))
    if ids_a != ids_b:
        print(f"Warning: the files share {len(ids_a & ids_b)} of {len(ids_a | ids_b)} prompt ids;"
              " a difference may come from the prompts, not the code.", file=sys.stderr)
    table = pd.concat([compare_runs(a[a["mode"] == m], b[b["mode"] == m], threshold=args.threshold)
                       .assign(mode=m) for m in modes], ignore_index=True)
    cols = ["mode"] + [c for c in table.columns if c not in ("mode", "field")]
    print(table[cols].to_string(index=False))
    bad = table[table["regression"]]
    if len(bad):
        worse = ", ".join(f"{m} {metric}" for m, metric in zip(bad["mode"], bad["metric"]))
        print(f"REGRESSION: {worse} worse beyond the runs' spread.")
        return 1
    print("No regression beyond the runs' spread.")
    return 0


# --- entry ---------------------------------------------------------------------------------

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

    p = sub.add_parser("report", help="compare modes in JSONL files: table, ratios, charts")
    p.add_argument("files", nargs="+", help="JSONL result files")
    p.add_argument("--html", help="write the charts as one HTML file")
    p.add_argument("--skip_bad_lines", action="store_true")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("compare", help="run B vs run A; exit 1 on a regression beyond spread")
    p.add_argument("a", help="baseline JSONL")
    p.add_argument("b", help="candidate JSONL")
    p.add_argument("--mode", help="compare only this mode")
    p.add_argument("--threshold", type=float, default=0.05, help="minimum relative change that counts")
    p.add_argument("--skip_bad_lines", action="store_true")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("overhead", help="benchmark: cost of timing, and C2C vs receiver decode")
    p.add_argument("--bench_repeats", type=int, default=5, help="interleaved repeats per variant (>= 5)")
    p.add_argument("--prompt", default=BUILTIN_PROMPTS[0])
    add_model_args(p)
    add_run_args(p, None, outputs=False)
    p.set_defaults(func=cmd_overhead)

    p = sub.add_parser("engines", help="benchmark: eager vs fast engine, and batch B vs batch 1")
    p.add_argument("--bench_repeats", type=int, default=5, help="interleaved repeats (>= 3)")
    p.add_argument("--bench_batch", type=int, default=None,
                   help="batch size compared with batch 1 (default 8 on a CPU, 64 on CUDA)")
    p.add_argument("--prompt", default=BUILTIN_PROMPTS[0])
    add_model_args(p)
    add_run_args(p, None, outputs=False)
    p.set_defaults(func=cmd_engines, max_new_tokens=32)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        out = getattr(args, "output", None)
        print(f"\nInterrupted; records already written{f' to {out}' if out else ''} are kept.",
              file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
