"""The long commands say what they are doing as they start each step (on stderr, with the time
since the command started), so that minutes of loading, assembling a GGUF, compiling shapes or
warming up are never silent: `align`, `engines` and `sweep` on the tiny offline pair."""

from __future__ import annotations

import re

import pytest

from c2c_core.frontends.cli import main, phases_on_stderr
from c2c_core.measure import cancel

PHASE = re.compile(r"^\[(\d+\.\d s|\d+ s|\d+ min \d\d s)\] (.+)…$")


@pytest.fixture()
def model_args(tiny_models):
    return ["--base_model", tiny_models["receiver"], "--teacher_model", tiny_models["sharer"],
            "--hidden_dim", "32", "--intermediate_dim", "32", "--device", "cpu",
            "--dtype", "float32"]


def phases(err: str) -> list[str]:
    return [m.group(2) for m in map(PHASE.match, err.splitlines()) if m]


def index_of(lines: list[str], start: str) -> int:
    return next(i for i, line in enumerate(lines) if line.startswith(start))


def test_sweep_says_loading_then_each_shape_before_its_warm_up(capsys, tmp_path, model_args):
    out = tmp_path / "s.jsonl"
    assert main(["sweep", "--input_lens", "4,8", "--output_lens", "2", "--warmup", "1",
                 "--output", str(out), *model_args]) == 0
    err = capsys.readouterr().err
    said = phases(err)
    lines = err.splitlines()
    # loading is said before the model loads ("Loaded: …" is printed once it has)
    assert index_of(lines, "[") < index_of(lines, "Loaded:")
    assert said[:4] == ["Loading the tokenizers", f"Loading the receiver {model_args[1]}",
                        f"Loading the sharer {model_args[3]}", "Loading the fuser"]
    # its bar gives the ETA by shape, not tqdm's count of records ("<00:02")
    bars = [b for line in err.splitlines() for b in line.split("\r") if "gen" in b or "|" in b]
    assert bars and not any("<" in b for b in bars), bars
    shapes = [p for p in said if p.startswith("Sweep shape")]
    assert shapes == ["Sweep shape 1 of 2 (4 tokens in, 2 out): warming up",
                      "Sweep shape 1 of 2 (4 tokens in, 2 out): timed run",
                      "Sweep shape 2 of 2 (8 tokens in, 2 out): warming up",
                      "Sweep shape 2 of 2 (8 tokens in, 2 out): timed run"]


def test_engines_says_each_shape_it_compiles_then_its_timed_repeats(capsys, model_args):
    assert main(["engines", "--max_new_tokens", "3", "--warmup", "0", "--bench_repeats", "3",
                 "--bench_batch", "2", *model_args]) == 0
    captured = capsys.readouterr()
    said = phases(captured.err)
    compiles = [p for p in said if re.match(r"(Compiling|Preparing) the .* for shape \d+ of \d+",
                                            p)]
    assert compiles, said
    n = int(re.search(r"of (\d+)", compiles[0]).group(1))
    assert [int(re.search(r"shape (\d+) of", p).group(1)) for p in compiles] == \
        list(range(1, n + 1))  # shape by shape, as each starts
    warm = said.index("Warming up both engines (not recorded)")
    assert said.index(compiles[-1]) < warm < said.index(
        "Timed repeat 1 of 3 (eager and fast interleaved, batch 1 and 2)")
    assert "fast/eager" in captured.out  # the results themselves stay on stdout


def test_align_says_it_reads_the_tokenizers_first(capsys, model_args):
    from c2c_core.plan import show
    show._TOKENIZERS.clear()  # a first `align` in this process: the tokenizers are read
    assert main(["align", "--prompt", "Hi there", *model_args[:4]]) == 0
    captured = capsys.readouterr()
    assert phases(captured.err) == ["Reading the tokenizers"]
    assert "receiver positions" in captured.out and "[" not in captured.out.splitlines()[-1]


def test_a_phase_line_has_the_time_since_the_command_started(capsys, monkeypatch):
    import time
    say = phases_on_stderr(t0=0.0)
    monkeypatch.setattr(time, "perf_counter", lambda: 65.4)  # a fake clock: 65.4 s on
    with cancel.reporting(say):
        cancel.say("assembling the Gemma GGUF from its packages (once; kept in the cache)")
    assert capsys.readouterr().err == ("[1 min 05 s] Assembling the Gemma GGUF from its"
                                       " packages (once; kept in the cache)…\n")
