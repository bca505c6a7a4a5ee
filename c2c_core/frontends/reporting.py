"""After a CLI run: its `<output stem>.summary.json` (report.runreport), with the options it was
given as the requested settings. Shared by the single-process and the torchrun paths."""

from __future__ import annotations

import sys
from typing import Any

from ..spec.errors import UserError


def requested(args: Any) -> dict:
    """The options a command was given (argparse's namespace), as plain JSON values."""
    out = {}
    for k, v in sorted(vars(args).items()):
        if k.startswith("_") or k == "func" or callable(v):
            continue
        out[k] = v if isinstance(v, (str, int, float, bool, list, type(None))) else str(v)
    return out


def write_run_summary(args: Any, path: str | None = None) -> str | None:
    """Write the summary of the records in `path` (default --output) beside it and say so; a
    failure to write it is a warning: the records are kept whatever happens."""
    from ..report.runreport import write_summary
    path = path or getattr(args, "output", None)
    if not path:
        return None
    try:
        out = write_summary(path, requested(args))
    except (OSError, UserError, ValueError) as e:
        print(f"Warning: the run summary of {path} was not written ({e}); the records are kept.",
              file=sys.stderr)
        return None
    if out:
        print(f"Wrote {out} (settings, environment, statistics per mode)")
    return out
