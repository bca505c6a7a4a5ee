"""The model panel (preset or receiver / sharer / fuser by hand, device, dtype, Load, status)
and the run settings shared by the Profile, Batch and Dataset tabs."""

from __future__ import annotations

from dataclasses import dataclass, fields

import gradio as gr

from ...spec.config import (ALIGNMENTS, DEVICES, DTYPES, ENGINES, FUSIONS, MODE_OPTIONS, PRESETS,
    TIMING_METHODS, FuserSpec, GenerationConfig, RunConfig, default_of, default_preset)
from ...spec.errors import UserError
from . import guard
from .runcfg import load_models as load_where_jobs_run, models_loading, models_status, run_config
from .texts import error_outputs, status_md, user_error

#: How the mode dropdown shows each of config.MODE_OPTIONS (a mode without one is shown as is).
MODE_LABELS = {"receiver": "receiver only", "sharer": "sharer only", "t2t": "t2t (text to text)",
               "all": "all four, interleaved"}
MODE_CHOICES = [(MODE_LABELS.get(m, m), m) for m in MODE_OPTIONS]
MODE_INFO = ("c2c: receiver with the sharer's projected cache · t2t: the sharer writes a note,"
             " the receiver answers with it")


def dflt(name: str):
    """RunConfig's default for a setting (the app starts from the CLI's defaults)."""
    return default_of(RunConfig, name)


def preset_note(name: str) -> str:
    p = PRESETS.get(name)
    if p is None:
        return ""
    fuser = p.fuser.source or "untrained"
    return (f"<small>**{name}**: {p.description}<br>receiver `{p.receiver.source}` · sharer"
            f" `{p.sharer.source}` · fuser `{fuser}`</small>")


@dataclass
class ModelPanel:
    preset: gr.Dropdown
    receiver: gr.Textbox
    sharer: gr.Textbox
    fuser: gr.Textbox
    device: gr.Dropdown
    dtype: gr.Dropdown
    fuser_hidden_dim: gr.Number
    fuser_intermediate_dim: gr.Number
    fuser_layers: gr.Number
    alignment: gr.Dropdown
    fusion: gr.Dropdown
    note: gr.Markdown
    load: gr.Button
    status: gr.Markdown | None   # the line above the tabs; set by build_app

    def inputs(self) -> dict:
        """Keyword inputs of every model endpoint (the API's parameter names)."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in ("note", "load", "status")}


@dataclass
class RunSettings:
    mode: gr.Dropdown
    max_new_tokens: gr.Number
    ignore_eos: gr.Checkbox
    warmup: gr.Number
    repeats: gr.Number
    timing: gr.Radio
    chat_template: gr.Checkbox
    do_sample: gr.Checkbox
    temperature: gr.Slider
    top_p: gr.Slider
    top_k: gr.Number
    seed: gr.Number
    engine: gr.Dropdown
    batch_size: gr.Number

    def inputs(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def build_model_panel(defaults: dict) -> ModelPanel:
    """Widgets of the model panel; `defaults` uses build_run_config's keyword names. The
    status line is created by the caller (it sits above the tabs) and filled in later."""
    preset = defaults.get("preset") or default_preset()
    p = PRESETS[preset]
    fs = FuserSpec()
    fixed = guard.models_fixed()
    can = {"interactive": not fixed}
    gr.Markdown("### Models")
    if fixed:
        gr.Markdown("The models on this server are fixed by its operator.",
                    elem_classes=["c2c-note"])
    preset_dd = gr.Dropdown(list(PRESETS), value=preset, label="Preset", elem_id="preset", **can)
    note = gr.Markdown(preset_note(preset), elem_classes=["c2c-note"])
    by_hand = bool(defaults.get("base_model") or defaults.get("teacher_model")
                   or defaults.get("fuser"))
    with gr.Accordion("Choose models by hand", open=by_hand):
        receiver = gr.Textbox(value=defaults.get("base_model") or "", label="Receiver (base)",
                              placeholder=f"preset: {p.receiver.source}", elem_id="receiver", **can,
                              info="blank = the preset's; hub id, smollm2, gemma3 or dummy:<config>"
                                   + ("; or a local folder / .gguf"
                                      if guard.local_paths_allowed() else ""))
        teacher = defaults.get("teacher_model") or ""
        sharer = gr.Textbox(value=", ".join(teacher) if isinstance(teacher, list) else teacher,
                            label="Sharer (teacher)", placeholder=f"preset: {p.sharer.source}",
                            elem_id="sharer", max_lines=4, **can,
                            info="same forms; several sharers: separate with commas or new lines")
        fuser = gr.Textbox(value=defaults.get("fuser") or "", label="Fuser",
                           placeholder=f"preset: {p.fuser.source or 'untrained'}",
                           elem_id="fuser", **can,
                           info="hub:<owner>/<repo>/<subfolder> or untrained"
                                + ("; or a folder" if guard.local_paths_allowed() else ""))
        gr.Markdown("Untrained fuser size", elem_classes=["c2c-note"])
        with gr.Row():
            hidden = gr.Number(defaults.get("hidden_dim") or fs.hidden_dim, label="hidden",
                               precision=0, minimum=1, min_width=70, **can)
            inter = gr.Number(defaults.get("intermediate_dim") or fs.intermediate_dim,
                              label="FFN", precision=0, minimum=1, min_width=70, **can)
            layers = gr.Number(defaults.get("num_layers") or fs.num_layers, label="layers",
                               precision=0, minimum=1, min_width=70, **can)
        with gr.Row():
            alignment = gr.Dropdown(list(ALIGNMENTS), value=defaults.get("alignment") or dflt("alignment"),
                                    label="Token alignment", elem_id="alignment", min_width=100,
                                    info="sharers with their own tokenizer; none refuses them", **can)
            fusion = gr.Dropdown(list(FUSIONS), value=defaults.get("fusion") or dflt("fusion"),
                                 label="Several sharers", elem_id="fusion", min_width=100, **can)
    with gr.Row():
        device = gr.Dropdown(list(DEVICES), value=defaults.get("device") or dflt("device"),
                             label="Device", allow_custom_value=True, min_width=100, **can)
        dtype = gr.Dropdown(list(DTYPES), value=defaults.get("dtype") or dflt("dtype"),
                            label="Dtype", min_width=100, **can)
    load = gr.Button("Load models", variant="secondary", elem_id="load-models", size="md",
                     visible=not fixed)
    return ModelPanel(preset_dd, receiver, sharer, fuser, device, dtype, hidden, inter, layers,
                      alignment, fusion, note, load, None)  # type: ignore[arg-type]


def build_run_settings(defaults: dict) -> RunSettings:
    g = GenerationConfig()
    d = lambda k, v: defaults.get(k, v)  # noqa: E731
    r = lambda k: defaults.get(k, dflt(k))  # noqa: E731
    gr.Markdown("### Run settings")
    mode = gr.Dropdown(MODE_CHOICES, value=r("mode"), label="Mode", elem_id="mode",
                       info=MODE_INFO)
    with gr.Row():
        max_new = gr.Number(d("max_new_tokens", g.max_new_tokens), label="max new tokens",
                            precision=0, minimum=1, min_width=120, elem_id="max-new-tokens",
                            # the box refuses what the server would (one limit, said once)
                            maximum=min(8192, guard.limit("new_tokens")),
                            info=f"per generation, at most {guard.limit('new_tokens'):,}")
        warmup = gr.Number(r("warmup"), label="warm-up runs", precision=0, minimum=0,
                           maximum=20, min_width=120, elem_id="warmup",
                           info="not recorded")
    with gr.Row():
        repeats = gr.Number(r("repeats"), label="repeats", precision=0, minimum=1,
                            maximum=100, min_width=120, info="records per prompt")
        ignore_eos = gr.Checkbox(d("ignore_eos", g.ignore_eos), label="ignore EOS",
                                 info="always generate max new tokens", min_width=120)
    timing = gr.Radio(list(TIMING_METHODS), value=r("timing"), label="Timing",
                      info="event: CUDA events / perf_counter · sync: synchronize around every"
                           " stage, as the seed's scripts did")
    chat = gr.Checkbox(r("chat_template"), label="apply the chat template")
    with gr.Row():
        engine = gr.Dropdown(list(ENGINES), value=r("engine"), label="Engine",
                             elem_id="engine", min_width=120,
                             info="fast: static caches, compiled decode (compiles first), one"
                                  " batched projection · eager: the per-layer baseline · auto:"
                                  " fast on CUDA and for batches, else eager")
        batch_size = gr.Number(r("batch_size"), label="batch size", precision=0, minimum=1,
                               maximum=1024, min_width=120, elem_id="batch-size",
                               info="prompts generated together (fast engine)")
    with gr.Accordion("Sampling", open=False):
        do_sample = gr.Checkbox(d("do_sample", g.do_sample), label="sample (off = greedy)")
        temperature = gr.Slider(0.05, 2.0, value=d("temperature", g.temperature), step=0.05,
                                label="temperature")
        top_p = gr.Slider(0.05, 1.0, value=d("top_p", g.top_p), step=0.05, label="top-p")
        with gr.Row():
            top_k = gr.Number(d("top_k", g.top_k), label="top-k (0 = off)", precision=0,
                              minimum=0, min_width=80)
            seed = gr.Number(d("seed", g.seed), label="seed", precision=0, min_width=80)
    return RunSettings(mode, max_new, ignore_eos, warmup, repeats, timing, chat, do_sample,
                       temperature, top_p, top_k, seed, engine, batch_size)


# --- callbacks -----------------------------------------------------------------------------

def on_preset(name: str):
    p = PRESETS.get(name)
    if p is None:
        return gr.update(), gr.update(), gr.update(), ""
    return (gr.update(placeholder=f"preset: {p.receiver.source}"),
            gr.update(placeholder=f"preset: {p.sharer.source}"),
            gr.update(placeholder=f"preset: {p.fuser.source or 'untrained'}"),
            preset_note(name))


def check_load(**settings) -> None:
    run_config(settings)


def load_models(progress=gr.Progress(), **settings):
    """Load (or keep) the models the panel names; yields the status line."""
    from .runcfg import swap_note
    try:
        cfg = run_config(settings)
        swap = swap_note(cfg)
        if swap:
            yield status_md(swap, "warn")
        progress(None, desc="Loading models…")
        load_where_jobs_run(cfg)
    except UserError as e:
        yield error_outputs(e, 1)[0] + "  \n" + models_status()
        raise user_error(e) from None
    yield models_status()


def model_status() -> str:
    return models_status()


def held_settings():
    """On page load: the model panel shows the pair the server holds now (a new tab would
    otherwise show the preset default, and its first run would swap the shared models)."""
    from ...spec.config import PRESETS
    from .runcfg import held_models
    cfg = held_models()
    if cfg is None:
        return tuple(gr.skip() for _ in range(6))
    if cfg.preset in PRESETS:
        names = (gr.update(value=cfg.preset), "", "", "")
    else:
        names = (gr.skip(), cfg.receiver.source, ", ".join(s.source for s in cfg.sharers),
                 cfg.fuser.source or "untrained")
    return (*names, cfg.device if cfg.device != "auto" else gr.skip(), cfg.dtype)


def model_status_poll():
    """The status line, and whether to keep polling (only while models are loading)."""
    from . import fairqueue
    from .jobs import RUN_LOCK
    # polls while models load or any model job runs or waits (a run may swap the shared pair)
    busy = models_loading() or RUN_LOCK.locked() or fairqueue.total_waiting() > 0
    return models_status(), gr.Timer(active=busy)


__all__ = ["ModelPanel", "RunSettings", "build_model_panel", "build_run_settings", "on_preset",
           "load_models", "model_status", "status_md"]
