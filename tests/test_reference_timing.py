"""scripts/reference_timing.py on a CPU: the reference (a clone of thu-nics/C2C, made from the
local mirror; skipped where there is none) timed on tiny Qwen3 configs writes reference.json
with positive TTFT, decode and projection figures that gpu_table.py shows in its reference
column; without a clone the script stops with one sentence and a non-zero status."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "reference_timing.py")
_spec = importlib.util.spec_from_file_location("gpu_table", os.path.join(ROOT, "scripts", "gpu_table.py"))
gt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gt)


def _tiny(layers: int, hidden: int, head_dim: int) -> dict:
    return {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": hidden,
            "intermediate_size": 2 * hidden, "num_hidden_layers": layers, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": head_dim, "vocab_size": 256,
            "tie_word_embeddings": True, "rope_theta": 1000000, "rms_norm_eps": 1e-06,
            "max_position_embeddings": 2048, "hidden_act": "silu", "attention_bias": False,
            "bos_token_id": 1, "eos_token_id": 2}


def _env(**kw) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **kw}
    env.pop("C2C_REF", None)
    return env


@pytest.fixture(scope="module")
def clone(reference_clone):
    return reference_clone


def test_times_the_reference_and_fills_the_table(clone, tmp_path):
    rcfg, scfg = tmp_path / "receiver.json", tmp_path / "sharer.json"
    rcfg.write_text(json.dumps(_tiny(2, 64, 16)))
    scfg.write_text(json.dumps(_tiny(3, 96, 24)))  # other depth and head size: a real projection
    out = tmp_path / "out"
    cmd = [sys.executable, SCRIPT, "--reference", clone, "--device", "cpu", "--dtype", "float32",
           "--max_new_tokens", "5", "--repeats", "2", "--tokenizer", "synthetic", "--threads", "1",
           "--receiver_config", str(rcfg), "--sharer_config", str(scfg),
           "--hidden_dim", "64", "--intermediate_dim", "64", "--out", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    printed = json.loads(r.stdout.strip().splitlines()[-1])
    saved = json.loads((out / "reference.json").read_text())
    assert printed == saved
    for k in ("ttft_ms", "decode_ms", "projection_ms", "ttft_1024_ms"):
        assert isinstance(saved[k], (int, float)) and saved[k] > 0, (k, saved[k])
    assert saved["projector_calls"] == 2  # one per receiver layer, in the prefill only
    assert saved["prompt_ids"] == "synthetic" and saved["prompt_tokens"] == 17
    assert saved["mapping"] == "last_aligned (sharer layer = receiver layer +1)"
    assert saved["timing_method"] == "perf_counter" and saved["batch_ratio"] is None
    rows = {row["key"]: row for row in gt.build(str(out), clone)["rows"]}
    for k in ("ttft_ms", "decode_ms", "projection_ms", "ttft_1024_ms"):
        assert rows[k]["reference"] == round(saved[k], 3), k
    assert rows["compile_first_s"]["reference"] is None and rows["batch_ratio"]["reference"] is None
    text = gt.render(gt.build(str(out), clone))
    by_key = dict(zip([k for k, _, _ in gt.ROWS], text.splitlines()[2:2 + len(gt.ROWS)]))
    assert by_key["decode_ms"].split("|")[5].strip() == str(rows["decode_ms"]["reference"])
    assert f"reference: {clone}" in text


def test_without_a_clone_one_sentence_and_non_zero(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, SCRIPT, "--reference", str(tmp_path / "no-C2C"),
                        "--out", str(out)], cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=60)
    assert r.returncode != 0
    msg = (r.stdout + r.stderr).strip()
    assert len(msg.splitlines()) == 1 and "no clone of thu-nics/C2C" in msg, msg
    assert not (out / "reference.json").exists()


def test_a_folder_that_is_not_the_reference_is_refused(tmp_path):
    (tmp_path / "C2C").mkdir()
    r = subprocess.run([sys.executable, SCRIPT, "--reference", str(tmp_path / "C2C"),
                        "--out", str(tmp_path / "out")], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=120)
    msg = (r.stdout + r.stderr).strip()
    assert r.returncode == 2 and len(msg.splitlines()) == 1 and "not a clone" in msg, msg
