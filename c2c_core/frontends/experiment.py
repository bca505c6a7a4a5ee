"""`python -m c2c_core run CONFIG.yaml`: one experiment described by a YAML file.

The file names a `command` (batch, dataset, sweep or profile; default batch), an `output` folder
and any option of that command by its CLI name without dashes (`dtype`, `engine`, `preset`,
`batch_size`, `max_new_tokens`, `mode`, ...). An option given as a list is an axis: the
experiment runs every combination of the axes (engine x dtype x preset x batch ...), each as
one ordinary run of the command writing `<output>/<point>.jsonl` and its summary.json; then
`<output>/experiment.summary.json` holds the config, the points and each point's statistics.
Options that take several values themselves (prompts, teacher_model, input_lens, output_lens,
batch_sizes) are passed whole; a list of lists makes them an axis too.

Every point is parsed and its settings checked before the first model loads, so a typo in the
file costs no run; a point that fails stops the experiment with the earlier points' files kept.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import os
import re
import sys
import time
from typing import Any, Callable, NamedTuple

from ..spec.errors import UserError

#: Commands a config file may run.
COMMANDS = ("batch", "dataset", "sweep", "profile")
#: Keys of the file that are not options of the command.
OWN_KEYS = ("command", "output")
#: Options whose one value is a list (nargs / append) or a comma list (the sweep's lengths).
LIST_OPTIONS = {"prompts": "nargs", "teacher_model": "append", "input_lens": "comma",
                "output_lens": "comma", "batch_sizes": "comma"}
#: Options the experiment sets itself per point.
NOT_ALLOWED = {"output", "html", "help"}
DEFAULT_OUTPUT = "experiment"


class _Twice(Exception):
    def __init__(self, key: str, first: int, again: int):
        super().__init__(key)
        self.key, self.first, self.again = key, first, again


def _strict_loader():
    """yaml's SafeLoader, refusing a key given twice in one mapping (yaml would keep the last
    silently: an axis written twice would lose its first values)."""
    import yaml

    class Strict(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen: dict = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                if isinstance(key, str) and key in seen:
                    raise _Twice(key, seen[key], line)
                seen[key] = line
            return super().construct_mapping(node, deep=deep)
    return Strict


def load_config(path: str) -> dict:
    """The YAML mapping in `path`, or one sentence saying what is wrong with the file."""
    import yaml
    from ..io.fileio import read_text
    try:
        data = yaml.load(read_text(path), Loader=_strict_loader())  # noqa: S506 - a SafeLoader
    except _Twice as e:
        raise UserError(f"{path}: key {e.key!r} is given twice (lines {e.first} and {e.again});"
                        " keep one (a list of values runs each of them).") from None
    except FileNotFoundError:
        raise UserError(f"Config file not found: {path}; check the path.") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"{path} is not valid YAML{where} ({getattr(e, 'problem', None) or e});"
                        " fix the file (key: value, one per line).") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a mapping of settings (key: value lines), not"
                        f" {type(data).__name__}; see the `run` command in README.md.")
    return data


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The command's options by dest (what a config key names)."""
    return {a.dest: a for a in parser._actions
            if a.option_strings and a.dest not in NOT_ALLOWED}


def _subparser(build_parser: Callable, command: str) -> argparse.ArgumentParser:
    root = build_parser()
    sub = next(a for a in root._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def _is_axis(key: str, value: Any) -> bool:
    if not isinstance(value, list):
        return False
    if key in LIST_OPTIONS:  # a list is its one value; a list of lists is an axis
        return bool(value) and all(isinstance(v, list) for v in value)
    return True


def _argv_value(key: str, action: argparse.Action, value: Any) -> list[str]:
    """One option's command-line words."""
    flag = f"--{key}"
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise UserError(f"{key} is a switch: give it true or false, not {value!r}.")
        return [flag] if value else []
    if value is None:
        return []
    if key in LIST_OPTIONS:
        vals = value if isinstance(value, list) else [value]
        kind = LIST_OPTIONS[key]
        if kind == "comma":
            return [flag, ",".join(str(v) for v in vals)]
        if kind == "append":
            return [w for v in vals for w in (flag, str(v))]
        return [flag, *map(str, vals)]
    if isinstance(value, (dict, list)):
        raise UserError(f"{key} takes one value per run, not {value!r}; give a value or a list"
                        " of values (one run each).")
    return [flag, str(value).lower() if isinstance(value, bool) else str(value)]


def _point_name(i: int, combo: dict) -> str:
    bits = [f"{k}-{v if not isinstance(v, list) else '+'.join(map(str, v))}"
            for k, v in combo.items()]
    name = re.sub(r"[^A-Za-z0-9._+=-]+", "_", "_".join(bits))[:120]
    return f"p{i:02d}" + (f"_{name}" if name else "")


class Point:
    def __init__(self, name: str, combo: dict, argv: list[str], output: str):
        self.name, self.combo, self.argv, self.output = name, combo, argv, output


def plan(config: dict, where: str, build_parser: Callable) -> tuple[str, str, list[Point]]:
    """(command, output folder, points) of a config file (`build_parser`: the CLI's)."""
    command = config.get("command", "batch")
    if command not in COMMANDS:
        raise UserError(f"{where}: command {command!r} cannot run from a config file; use"
                        f" one of {', '.join(COMMANDS)}.")
    parser = _subparser(build_parser, command)
    options = _options(parser)
    bad = [k for k in config if k not in OWN_KEYS and k not in options]
    if bad:
        allowed = ", ".join([*OWN_KEYS, *sorted(options)])
        raise UserError(f"{where}: unknown key {bad[0]!r} for command {command}; allowed keys:"
                        f" {allowed}.")
    out_dir = str(config.get("output") or DEFAULT_OUTPUT)
    if out_dir.endswith(".jsonl"):
        raise UserError(f"{where}: output is a folder for the experiment's files (one JSONL per"
                        f" point), not {out_dir!r}; give a folder name.")
    fixed = {k: v for k, v in config.items() if k in options and not _is_axis(k, v)}
    axes = {k: v for k, v in config.items() if k in options and _is_axis(k, v)}
    for k, v in axes.items():
        if not v:
            raise UserError(f"{where}: {k} is an empty list; give at least one value.")
    points = []
    combos = [dict(zip(axes, vals)) for vals in itertools.product(*axes.values())] or [{}]
    for i, combo in enumerate(combos, 1):
        name = _point_name(i, combo)
        output = os.path.join(out_dir, f"{name}.jsonl")
        argv = [command, "--output", output]
        for k, v in {**fixed, **combo}.items():
            try:
                argv += _argv_value(k, options[k], v)
            except UserError as e:
                raise UserError(f"{where}: {e}") from None
        points.append(Point(name, combo, argv, output))
    return command, out_dir, points


def _parse(build_parser: Callable, argv: list[str], where: str,
           point: Point) -> argparse.Namespace:
    """argparse's verdict on a point, its complaint as one sentence (no usage, no exit)."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return build_parser().parse_args(argv)
    except SystemExit:
        said = err.getvalue().strip().splitlines()
        msg = said[-1].split("error: ", 1)[-1] if said else "it does not parse"
        raise UserError(f"{where}: point {point.name}: {msg}; fix that value in the file.") \
            from None


def check_points(cli: "Cli", command: str, points: list[Point],
                 where: str) -> list[argparse.Namespace]:
    """Each point's parsed options, its run settings built (preset, dtype, engine ... checked)
    before anything runs."""
    from ..bench.sweep import parse_lengths
    parsed = []
    for p in points:
        args = _parse(cli.build_parser, p.argv, where, p)
        try:
            cli.run_config(args)
            if command == "sweep":
                for flag in ("input_lens", "output_lens", "batch_sizes"):
                    if getattr(args, flag, None):
                        parse_lengths(getattr(args, flag), f"--{flag}")
        except UserError as e:
            raise UserError(f"{where}: point {p.name} ({_combo_words(p.combo)}): {e}") from None
        parsed.append(args)
    return parsed


def _combo_words(combo: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in combo.items()) or "the only point"


class Cli(NamedTuple):
    """What the experiment uses of the CLI (handed over by it: this module sits beside it)."""

    build_parser: Callable[[], argparse.ArgumentParser]
    run_config: Callable[[argparse.Namespace], Any]
    main: Callable[[list[str]], int]


def run_experiment(cli: Cli, path: str, html: str | None = None) -> int:
    """Run every point of the config file at `path`; write the experiment's summary (and
    with `html` the report of all points)."""
    from ..io.fileio import check_writable
    from ..report.runreport import SUMMARY_VERSION, write_json
    config = load_config(path)
    command, out_dir, points = plan(config, path, cli.build_parser)
    parsed = check_points(cli, command, points, path)
    if html is not None:
        check_writable(html, "--html")
    os.makedirs(out_dir, exist_ok=True)
    whole = os.path.join(out_dir, "experiment.summary.json")
    axes = sorted({k for p in points for k in p.combo})
    print(f"Experiment {path}: {len(points)} point(s) of {command}"
          f"{' over ' + ' x '.join(axes) if axes else ''}, into {out_dir}/.", file=sys.stderr)
    done: list[dict] = []
    status = "complete"
    try:
        for i, (p, args) in enumerate(zip(points, parsed), 1):
            print(f"[{i}/{len(points)}] {p.name}: {_combo_words(p.combo)}", file=sys.stderr)
            t0, ok = time.time(), False
            try:
                args.func(args)
                ok = True
            finally:
                lock = getattr(args, "_output_lock", None)
                if lock is not None:
                    lock.release()
                done.append(_point_entry(p, t0, ok))
    except BaseException:
        status = "stopped"
        raise
    finally:
        write_json(whole, {"summary_version": SUMMARY_VERSION, "config_file": path,
                           "config": config, "command": command, "axes": axes,
                           "status": status, "points_planned": len(points),
                           "points": done})
        print(f"Wrote {whole} ({len(done)} of {len(points)} point(s))")
    print(points_table(done))
    if html is not None:
        files = [p.output for p in points if os.path.exists(p.output)]
        if files and cli.main(["report", *files, "--html", html]) != 0:
            return 2
    return 0


def _point_entry(p: Point, started: float, ok: bool) -> dict:
    """A point in the experiment summary: its settings, files, status and (its summary.json's,
    when this run wrote it: not one left by an earlier run) statistics per mode."""
    import json

    from ..report.runreport import summary_path
    entry: dict[str, Any] = {"name": p.name, "settings": p.combo, "output": p.output,
                             "argv": p.argv, "status": "done" if ok else "failed"}
    sp = summary_path(p.output)
    if os.path.exists(sp) and os.path.getmtime(sp) >= started - 1:
        with open(sp, encoding="utf-8") as f:
            s = json.load(f)
        entry.update(summary=sp, records=s.get("records"), modes=s.get("modes"),
                     environment=s.get("environment"))
    else:
        entry.update(summary=None, records=0)
    return entry


#: The experiment's closing table: per point and mode, these medians.
TABLE_METRICS = ("ttft_ms", "tpot_ms", "decode_avg_ms", "tokens_per_second")


def points_table(points: list[dict]) -> str:
    """Each point's axes and, per mode, its count and medians, as printed text."""
    import pandas as pd

    from ..report.analysis import column
    rows = []
    for p in points:
        for mode, per in (p.get("modes") or {"": {"count": 0}}).items():
            row: dict[str, Any] = {"point": p["name"][:3], **p["settings"], "mode": mode,
                                   "count": per.get("count", 0)}
            for m in TABLE_METRICS:
                v = (per.get(m) or {}).get("p50")
                row[column(m, "p50")] = round(v, 2) if isinstance(v, float) else v
            # a point that competed for its cores has inflated CPU times: say so in its row
            share = ((p.get("environment") or {}).get("cpu_share") or {}).get("median")
            row["cpu_share"] = share
            rows.append(row)
    if not rows:
        return "No points ran."
    table = pd.DataFrame(rows)
    if table["cpu_share"].isna().all():
        table = table.drop(columns=["cpu_share"])
    return table.to_string(index=False, na_rep="")
