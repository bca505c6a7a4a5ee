"""One table of names: stage labels, timing fields, option lists, dtypes, sweep ids and CLI help
are each defined once (records.py, config.py) and everything else reads them. These tests fail
when a copy creeps back in and drifts."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re

import pandas as pd
import pytest

from c2c_core.report import analysis
from c2c_core.spec import config
from c2c_core.io import records
from c2c_core.frontends.cli import CONFIG_OPTIONS, OVERRIDES, build_parser
from c2c_core.spec.config import (ALIGNMENTS, DEVICES, DTYPES, ENGINES, FUSIONS, MODE_OPTIONS,
    TIMING_METHODS, help_of)
from c2c_core.io.records import (MODES, STAGE_FIELDS, STAGES, TIMING, SweepShape, parse_sweep_id,
    sweep_id)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- timing fields, stages, labels ---------------------------------------------------------

def test_every_timing_field_has_a_label_and_a_unit():
    assert records.SEED_TIMING_FIELDS + records.EXT_TIMING_FIELDS == list(TIMING)
    assert len(set(TIMING)) == len(TIMING)
    for k, f in TIMING.items():
        assert f.label and f.unit, k
        assert analysis.FIELDS[k] == (f.label, f.unit), k  # the charts' table is derived
    # the seed's fields keep the seed's order (its users' recipes read them)
    assert records.SEED_TIMING_FIELDS[:5] == ["base_embedding_ms", "base_prefill_ms",
                                              "teacher_embedding_ms", "teacher_prefill_ms",
                                              "projector_total_ms"]


def test_every_stage_has_a_field_and_a_label():
    from c2c_core.measure import timing
    assert timing.STAGES is STAGES
    assert STAGE_FIELDS == list(STAGES.values())
    assert len(set(STAGE_FIELDS)) == len(STAGE_FIELDS)
    for stage, f in STAGES.items():
        assert f.endswith("_ms") and TIMING[f].stage == stage and TIMING[f].label, stage
        assert TIMING[f].run is not None, stage
    assert [TIMING[f].run for f in STAGE_FIELDS] == sorted(TIMING[f].run for f in STAGE_FIELDS)
    assert timing.HOST_STAGES <= set(STAGES)
    assert set(records.SHARER_STAGES) <= set(STAGES)
    assert set(records.SHARER_TOTALS.values()) <= set(TIMING)


def test_every_stage_the_code_times_is_in_the_table():
    """Stage names passed to the timer as literals (timer.span("x"), or as a stage argument)
    must be stages of records.STAGES: a typo would be a KeyError mid-run."""
    used = set()
    paths = [os.path.join(d, n) for d, _, names in os.walk(os.path.join(ROOT, "c2c_core"))
             for n in names if n.endswith(".py")]  # every layer's modules
    for path in paths:
        with open(path, encoding="utf-8") as f:
            src = f.read()
        used |= set(re.findall(r"\bspan\(\"(\w+)\"", src))
        used |= set(re.findall(r"\"((?:base|teacher|sharer)_(?:embedding|prefill|decode))\"", src))
    assert {"projection", "base_prefill", "teacher_prefill", "sharer_decode"} <= used
    assert used <= set(STAGES), used - set(STAGES)


def test_derived_stage_lists():
    assert analysis.TTFT_STAGES[:-1] == [f for f in STAGE_FIELDS if f != "decode_total_ms"]
    assert set(analysis.E2E_STAGES) == set(STAGE_FIELDS) | {"batch_wait_ms", "other_ms"}
    from c2c_core.report import plots
    for f in analysis.E2E_STAGES + analysis.TTFT_STAGES + plots.SWEEP_STAGES:
        assert f in plots.STAGE_COLORS and f in analysis.FIELDS, f


def test_tsv_stage_table_uses_the_table():
    from c2c_core.bench.profiling import stage_rows
    t = {f: 1.0 for f in STAGE_FIELDS}
    t.update(other_ms=2.0, e2e_ms=len(STAGE_FIELDS) + 2.0, projector_calls=2,
             num_generated_tokens=3, sharer_generated_tokens=0)
    rows = stage_rows({"timing": t, "decode_step_times_ms": [0.5, 0.5]})
    assert [r["field"] for r in rows] == STAGE_FIELDS + ["other_ms", "e2e_ms"]
    assert [r["stage"] for r in rows] == [TIMING[r["field"]].label for r in rows]
    assert sum(r["pct_of_e2e"] for r in rows[:-1]) == pytest.approx(100.0)


def test_summary_headings_are_the_analysis_columns():
    from c2c_core.report.summary import RunningSummary
    rec = {"mode": "c2c", "timing": {"decode_avg_ms": 1.0, "tokens_per_second": 1000.0,
                                     "ttft_ms": 3.0}}
    cols = list(RunningSummary([rec]).table().columns)
    assert analysis.column("decode_avg_ms", "p50") in cols
    assert analysis.column("ttft_ms", "mean") in cols
    assert set(analysis.summarize(analysis.to_frame([rec])).columns) >= {
        analysis.column("decode_avg_ms", "p50"), analysis.column("ttft_ms", "mean")}


# --- option lists --------------------------------------------------------------------------

def _run_parsers() -> dict[str, argparse.ArgumentParser]:
    """The subcommands that take a run config (they have --base_model)."""
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {name: p for name, p in sub.choices.items()
            if any(a.dest == "base_model" for a in p._actions)}


def _action(p: argparse.ArgumentParser, dest: str) -> argparse.Action:
    return next(a for a in p._actions if a.dest == dest)


def test_cli_choices_equal_the_config_tuples():
    parsers = _run_parsers()
    assert set(parsers) >= {"profile", "batch", "dataset", "sweep", "overhead", "engines"}
    for name, p in parsers.items():
        for dest, options in (("alignment", ALIGNMENTS), ("fusion", FUSIONS),
                              ("timing", TIMING_METHODS), ("engine", ENGINES)):
            if name == "align" and dest in ("timing", "engine"):
                continue  # align reads tokenizers only: the model flags, no run flags
            assert list(_action(p, dest).choices) == list(options), (name, dest)


def test_option_tuples_agree_with_their_users():
    from c2c_core.models import alignment, loading
    from c2c_core.bench import runner
    from c2c_core.measure import timing
    assert MODE_OPTIONS == (*MODES, config.ALL_MODES)
    assert timing.TIMING_METHODS is TIMING_METHODS
    assert set(alignment.STRATEGIES) | {"none"} == set(ALIGNMENTS)
    assert list(loading.DTYPES) == [d for d in DTYPES if d != "auto"]
    cfg = config.build_run_config(mode="all")
    assert runner.modes_of(cfg) == MODES
    for k, options in (("dtype", DTYPES), ("timing", TIMING_METHODS), ("engine", ENGINES),
                       ("alignment", ALIGNMENTS), ("fusion", FUSIONS), ("mode", MODE_OPTIONS)):
        assert config.default_of(config.RunConfig, k) in options, k
        for v in options:  # every listed value is accepted ...
            config.build_run_config(**{k: v})
        with pytest.raises(config.UserError, match=f"--{k}"):  # ... and nothing else
            config.build_run_config(**{k: "bogus"})


def test_app_dropdowns_equal_the_config_lists():
    gr = pytest.importorskip("gradio")
    from c2c_core.frontends.ui.model_panel import build_model_panel, build_run_settings
    with gr.Blocks():
        panel, run = build_model_panel({}), build_run_settings({})

    def values(component):
        return [c[1] if isinstance(c, (tuple, list)) else c for c in component.choices]
    assert values(panel.dtype) == list(DTYPES)
    assert values(panel.device) == list(DEVICES)
    assert values(panel.alignment) == list(ALIGNMENTS)
    assert values(panel.fusion) == list(FUSIONS)
    assert values(run.mode) == list(MODE_OPTIONS)
    assert values(run.timing) == list(TIMING_METHODS)
    assert values(run.engine) == list(ENGINES)
    for w, k in ((panel.dtype, "dtype"), (panel.device, "device"), (panel.alignment, "alignment"),
                 (panel.fusion, "fusion"), (run.mode, "mode"), (run.timing, "timing"),
                 (run.engine, "engine"), (run.batch_size, "batch_size"), (run.warmup, "warmup")):
        assert w.value == config.default_of(config.RunConfig, k), k


# --- sweep ids -----------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [SweepShape(16, 32), SweepShape(1, 1), SweepShape(1024, 7, 8, 0),
                                   SweepShape(64, 128, 4, 3)])
def test_sweep_id_round_trip(shape):
    sid = sweep_id(*shape)
    assert parse_sweep_id(sid) == shape
    assert sweep_id(*parse_sweep_id(sid)) == sid


def test_sweep_id_forms_and_non_sweep_ids():
    assert sweep_id(16, 32) == "in16-out32"
    assert sweep_id(16, 32, batch=4, row=2) == "in16-out32-b4.2"
    for other in (1, "1", "in16", "in16-out", "xin16-out32", "in16-out32-b4", "in16-out32 ", None):
        assert parse_sweep_id(other) is None, other
    ids = pd.Series(["in16-out32", 3, "in64-out8-b2.1", "q7"])
    assert analysis.sweep_input_lens(ids).tolist()[::2] == [16, 64]
    assert analysis.sweep_input_lens(ids).isna().tolist() == [False, True, False, True]


def test_sweep_and_distributed_ids_agree():
    from c2c_core.frontends.distributed import sweep_units
    units = sweep_units([4, 9], [3], ["c2c"], 1)
    assert [u.id for u in units] == [sweep_id(4, 3), sweep_id(9, 3)]


# --- CLI help from the config dataclasses --------------------------------------------------

def test_cli_help_is_the_config_metadata():
    for name, p in _run_parsers().items():
        for a in p._actions:
            if a.dest in CONFIG_OPTIONS:
                cls, field = CONFIG_OPTIONS[a.dest]
                # the metadata's words, then at most a command's own note on its default
                assert a.help == help_of(cls, field) or (
                    (name, a.dest) == ("engines", "max_new_tokens")
                    and a.help.startswith(help_of(cls, field) + "; this benchmark's own")) or (
                    (name, a.dest) == ("serve", "max_new_tokens")
                    and a.help.startswith(help_of(cls, field) + "; serve: the cap")), \
                    (name, a.dest)
                if a.default is not None and not isinstance(a.default, bool) \
                        and (name, a.dest) not in (("engines", "max_new_tokens"),
                                                   ("serve", "max_new_tokens")):  # its own
                    assert a.default == config.default_of(cls, field), (name, a.dest)


def test_every_config_field_the_cli_sets_is_in_the_table():
    """An option named like a config field must take its help from that field (but --preset,
    which picks a preset; RunConfig.preset is the label the records carry)."""
    names = {f.name for cls in (config.RunConfig, config.GenerationConfig, config.FuserSpec)
             for f in dataclasses.fields(cls)} - {"preset"}
    for name, p in _run_parsers().items():
        for a in p._actions:
            if a.dest in names:
                assert a.dest in CONFIG_OPTIONS, (name, a.dest)
    for dest, (cls, field) in CONFIG_OPTIONS.items():
        assert field in cls.__dataclass_fields__, dest
        assert help_of(cls, field), dest
    # run_config's overrides: every one is a build_run_config keyword
    gen = set(config.GenerationConfig.__dataclass_fields__)
    run = set(config.RunConfig.__dataclass_fields__)
    assert set(OVERRIDES) <= gen | run | {"hidden_dim", "intermediate_dim", "num_layers"}


def test_help_mentions_every_option():
    assert all(m in help_of(config.RunConfig, "mode") for m in MODE_OPTIONS)
    assert all(d in help_of(config.RunConfig, "dtype") for d in DTYPES)
    assert all(e in help_of(config.RunConfig, "engine") for e in ENGINES)
    assert all(t in help_of(config.RunConfig, "timing") for t in TIMING_METHODS)
    assert "1024" in help_of(config.FuserSpec, "hidden_dim")  # {default} filled in
