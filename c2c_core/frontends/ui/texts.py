"""What the page says: core messages in the page's words (no CLI flags, no server paths),
status lines, errors as toasts, values escaped for HTML and Markdown, endpoint validators.
"""

from __future__ import annotations

import html
import re
from typing import Any, Callable

import gradio as gr

from ...spec.errors import UserError
from . import guard


#: CLI spellings in core messages → what the page calls the same setting.
UI_WORDS = {
    "pass a local prompts file with --dataset_file": "upload a prompts file instead",
    "pass --dataset_file with a local file": "upload a prompts file",
    "pass --dataset_file with a local copy": "upload a local copy",
    "use the offline preset smollm2-demo": "pick the offline preset smollm2-demo",
    "pass --skip_bad_lines to skip such rows": "tick 'skip malformed lines' to skip such rows",
    "(or pass --skip_bad_lines to skip it)": "(or tick 'skip malformed lines')",
    "--skip_bad_lines": "'skip malformed lines'",
    "rerun on an idle machine or with fewer --threads": "close other programs (a local browser"
    " tab counts) and rerun",
    "--max_new_tokens": "'max new tokens'", "--input_lens": "prompt length", "--num_samples": "'number of samples'",
    "--dataset_config": "'config'", "--dataset_file": "an uploaded file",
    "--dataset": "'dataset'", "--split": "'split'", "--field": "'text field'",
    "--offset": "'offset'", "--warmup": "'warm-up runs'", "--repeats": "'repeats'",
    "--device": "device", "--dtype": "dtype", "--mode": "mode", "--timing": "timing",
    "--fuser": "fuser", "--base_model": "receiver", "--teacher_model": "sharer",
    "--alignment none": "token alignment 'none'", "--alignment": "token alignment",
    "--fusion": "'several sharers'",
    "--prompts": "the prompt list", "--prompt": "the prompt",
}
#: Whole phrases first (they contain flags the loop above would change piecemeal).
UI_WORDS = {"pass --encoding with the file's encoding (e.g. --encoding latin-1) or re-save it as"
            " UTF-8": "re-save it as UTF-8", **UI_WORDS}


# --- messages ------------------------------------------------------------------------------

def ui_message(err: BaseException | str) -> str:
    """A core UserError's sentence with the CLI flag names replaced by the page's labels, and
    no server paths (unless the operator allowed them)."""
    msg = str(err)
    for flag, words in UI_WORDS.items():
        msg = msg.replace(flag, words)
    return guard.scrub_paths(msg)


def status_md(text: str, kind: str = "info") -> str:
    """A status line; words rather than emoji (not every browser font has them)."""
    lead = {"info": "", "ok": "", "warn": "**Note:** ", "error": "**Error:** ", "run": ""}[kind]
    return f"{lead}{text}"


def error_outputs(err: BaseException, n_outputs: int) -> tuple:
    """Outputs for a failed run: the message in the status line (the first output), every
    other output left as it was. Callers yield this, then raise gr.Error with the same text
    (a toast in the page, an exception for gradio_client)."""
    return (status_md(md_text(ui_message(err)), "error"),) + tuple(gr.skip() for _ in range(n_outputs - 1))


def user_error(err: BaseException) -> gr.Error:
    # gradio renders an error's message as HTML: a file name or a column from an upload is text
    return gr.Error(html_text(ui_message(err)), print_exception=False)


def html_text(value: Any) -> str:
    """A value shown where HTML is rendered (toasts, plotly labels and hovers), as text."""
    return html.escape(str(value), quote=False)


_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+!|~])")
#: A bare web address: the page turns it into a link as it is, so it is left unescaped (a
#: backslash inside it would become part of the link). No brackets, backticks, asterisks or
#: backslashes in it: nothing around it can form Markdown syntax with it.
_URL = re.compile(r"https?://[A-Za-z0-9\-._~:/?#@!$&'()+,;=%]+")


def md_text(value: Any) -> str:
    """A value shown inside Markdown (status and ratio lines), as text: its HTML escaped and its
    Markdown syntax (images, links, emphasis) backslash-escaped; web addresses stay as they are
    (the page links them)."""
    text = html_text(value)
    out, at = [], 0
    for m in _URL.finditer(text):
        out += [_MD_SPECIAL.sub(r"\\\1", text[at:m.start()]), m.group(0)]
        at = m.end()
    out.append(_MD_SPECIAL.sub(r"\\\1", text[at:]))
    return "".join(out)


def validator(check: Callable) -> Callable:
    """An endpoint's validator (gradio runs it before the job enters the queue, so a refusal
    comes back at once even while another job holds the model): `check` takes the endpoint's
    inputs and raises UserError."""
    import inspect
    try:
        positional = [p.name for p in inspect.signature(check).parameters.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        positional = []

    def validate(*args, **kwargs):
        # gradio wants one answer per input, in input order (the positional ones, then the
        # keyword ones); the refused input says why, else the first one does
        n, at = len(args) + len(kwargs), 0
        try:
            check(*args, **kwargs)
        except UserError as e:
            msg = ui_message(e)
            field = getattr(e, "field", None)
            if field in kwargs:
                at = len(args) + list(kwargs).index(field)
            elif field is not None and field in positional[:len(args)]:
                at = positional.index(field)  # an input given by position, named by check
        except Exception as e:  # noqa: BLE001 - a validator must never show a traceback
            msg = f"These settings could not be read ({type(e).__name__}); check them."
        else:
            return [gr.validate(True, "") for _ in range(n)]
        return [gr.validate(i != at, msg if i == at else "") for i in range(n)]
    validate.__name__ = f"validate_{getattr(check, '__name__', 'inputs')}"
    return validate


#: Said in a run's status line the moment its button is clicked (in the browser, so it shows
#: while the job waits for the model queue; the queue box beside it gives the place).
WAITING_JS = ("() => 'Sent. If a setting is refused, its box turns red and nothing runs;"
              " otherwise the job queues (one model job runs at a time; your place is shown on"
              " the right) and this line follows it.'")
