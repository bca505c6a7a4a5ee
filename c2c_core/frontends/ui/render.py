"""Display pieces shared by the tabs: the results table with units, plot sizing, and the
Stop/Download/plot components.
"""

from __future__ import annotations

from typing import Any

import gradio as gr
import pandas as pd

from ...report import analysis


# --- tables --------------------------------------------------------------------------------

#: Columns of the live results table: raw key → heading with unit. Peak memory reserved beside
#: peak memory (allocated): on the fast engine the CUDA-graph pools show only in the reserved
#: peak, so that is the one to compare across engines (docs/numbers.md); empty on a CPU.
RESULT_COLUMNS = ["id", "mode", "repeat", "prompt_tokens", "num_generated_tokens", "ttft_ms",
                  "decode_avg_ms", "tokens_per_second", "e2e_ms", "peak_memory_mb",
                  "peak_memory_reserved_mb"]


def _short(text: Any, n: int = 70) -> str:
    s = " ".join(str(text or "").split())
    return s if len(s) <= n else s[: n - 1] + "…"


def records_table(records: list[dict]) -> pd.DataFrame:
    """Records → display table (one row each) with units in the headings."""
    heads = ["id", "mode", "repeat"] + [analysis.label(k) for k in RESULT_COLUMNS[3:]] + \
        ["prompt", "response"]
    if not records:
        return pd.DataFrame(columns=heads)
    df = analysis.to_frame(records)
    out = pd.DataFrame({
        "id": df["id"], "mode": df["mode"], "repeat": df["repeat"],
        **{analysis.label(k): df[k].round(2) if k not in ("prompt_tokens", "num_generated_tokens")
           else df[k].astype("Int64") for k in RESULT_COLUMNS[3:]},
    })
    out["prompt"] = [_short(r.get("prompt")) for r in records]
    out["response"] = [_short(r.get("response")) for r in records]
    return out


def labelled(df: pd.DataFrame) -> pd.DataFrame:
    """Raw-key column names → display names with units (analysis.label)."""
    out = df.rename(columns={c: analysis.label(c) for c in df.columns
                             if c in analysis.FIELDS or c.endswith("_ms")})
    for c in out.columns:
        if out[c].dtype == float:
            out[c] = out[c].round(2)
    if "prompt" in out.columns:
        out["prompt"] = out["prompt"].map(_short)
    return out


def sized(fig, height: int = 380):
    """Plotly figure at a height that fits the page (a "No data" placeholder stays short)."""
    empty = not fig.data
    fig.update_layout(height=min(height, 240) if empty else height)
    return fig


def integer_counts(fig, n: int):
    """Histogram count axes in whole numbers when there are few samples (no 0.2 ticks)."""
    if 0 < n <= 10 and fig.data and fig.data[0].type == "histogram":
        fig.update_yaxes(tick0=0, dtick=1)
    return fig


def stop_button(elem_id: str) -> gr.Button:
    """Stop: ends this session's running job within one decode step; finished records stay."""
    return gr.Button("Stop", variant="stop", elem_id=elem_id, scale=1, min_width=110)


def download_button(elem_id: str, **kw) -> gr.DownloadButton:
    """A compact "Download JSONL" button, enabled once a run has written its file."""
    return gr.DownloadButton("Download JSONL", value=None, interactive=False, elem_id=elem_id,
                             **kw)


def enable_download(path: str | None):
    """After a run: the button is clickable when it holds a file. (A separate event, so the
    API endpoints return plain file paths rather than component updates.)"""
    return gr.DownloadButton(interactive=bool(path))


def summary_button(elem_id: str, **kw) -> gr.DownloadButton:
    """"Download summary": the run's summary.json (settings, environment, statistics per
    mode), enabled once the run has written it."""
    return gr.DownloadButton("Download summary", value=None, interactive=False, elem_id=elem_id,
                             **kw)


def offer_summary(file: str | None, request: gr.Request):
    """After a run: the summary button holds the summary.json beside the run's JSONL (`file`
    is gradio's copy of it: found again by name in this session's folder, never elsewhere)."""
    import os

    from ...report.runreport import summary_path
    from ...spec.errors import UserError
    from .sessions import session_run_path
    path = None
    if file:
        try:
            found = summary_path(session_run_path(request, os.path.basename(str(file))))
            path = found if os.path.isfile(found) else None
        except UserError:
            path = None
    return gr.DownloadButton(value=path, interactive=bool(path))


def show_files(files):
    """After a profile: the file list is shown once it holds files."""
    return gr.File(visible=bool(files))


def plot(fig, elem_id: str, height: int = 380, **kw) -> gr.Plot:
    """A gr.Plot for a plotly figure; the figure carries its own title, so the label (the
    output's name in the API) is not shown."""
    label = kw.pop("label", elem_id.split("-", 1)[-1].replace("-", " "))
    return gr.Plot(sized(fig, height), label=label, show_label=False, elem_id=elem_id,
                   elem_classes=["c2c-plot"], **kw)
