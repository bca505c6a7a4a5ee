"""One outside load generator beside ours: GuideLLM (`guidellm run`, requirements-dev.txt) and
`python -m c2c_core load` drive the same server at the same point (a constant 1 request/s, 6
requests, 8 output tokens), and both tables are printed side by side. Asserts only that ours
completed every request and neither saw an error (GuideLLM may leave the last one uncounted, see
below): the numbers are for a person to read (`pytest -s`).

The server is `_target`'s: our `serve` (scheduler + HTTP server) on the offline default pair,
smollm2-demo, in this process.

GuideLLM runs offline: HF_HUB_OFFLINE=1, the SmolLM2 tokenizer saved into tmp_path as its
processor, `validate_backend=false` (it would GET /health, which an OpenAI server need not
have), `request_format=/v1/completions` (its default is chat completions).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from c2c_core.frontends.cli import main

pytestmark = pytest.mark.slow

RATE, REQUESTS, OUTPUT_TOKENS, MODEL = 1.0, 6, 8, "c2c"


@contextlib.contextmanager
def _target(tmp_path):
    """The server both generators drive: our `serve` (the continuous-batching scheduler and the
    HTTP server) on the offline default pair, EOS ignored (GuideLLM's synthetic requests ask
    for exactly their output tokens); yields its base URL (http://host:port)."""
    from c2c_core.bench.serving import load_scheduler
    from c2c_core.frontends.serve import start_server
    from c2c_core.spec.config import build_run_config
    cfg = build_run_config("smollm2-demo", None, None, None, max_new_tokens=OUTPUT_TOKENS,
                           ignore_eos=True)
    sched = load_scheduler(cfg, slots=4, max_queue=64, max_prompt_tokens=256)
    try:
        handle = start_server(sched, host="127.0.0.1", port=0)
        try:
            yield handle.url
        finally:
            handle.close()
    finally:
        sched.close()


def _guidellm() -> str:
    exe = os.path.join(os.path.dirname(sys.executable), "guidellm")
    if not os.path.exists(exe):
        exe = shutil.which("guidellm") or ""
    if not exe:
        pytest.skip("guidellm is not installed (pip install -r requirements-dev.txt)")
    return exe


def _processor(tmp_path) -> str:
    """The SmolLM2 tokenizer the project loads offline, saved as a folder GuideLLM can read."""
    from c2c_core.models.loading import load_tokenizer
    from c2c_core.spec.config import ModelSpec
    from c2c_core.spec.errors import UserError
    try:
        tok, _ = load_tokenizer(ModelSpec("smollm2"))
    except UserError as e:
        pytest.skip(f"no SmolLM2 tokenizer offline: {e}")
    out = tmp_path / "tokenizer"
    tok.save_pretrained(out)
    return str(out)


def _run_guidellm(url: str, processor: str, out: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    cmd = [_guidellm(), "run",
           "--backend", f"kind=openai_http,target={url},model={MODEL},"
                        "request_format=/v1/completions,validate_backend=false",
           "--profile", f"kind=constant,rate={RATE:g}",
           "--constraint", f"kind=max_requests,count={REQUESTS}",
           "--tokenizer", f"kind=huggingface_auto,model={processor}",
           "--data", f"kind=synthetic_text,prompt_tokens=16,output_tokens={OUTPUT_TOKENS}",
           "--output", f"kind=json,path={out}",
           "--disable-console-interactive"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=540)
    assert r.returncode == 0, f"guidellm failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    with open(out, encoding="utf-8") as f:
        return json.load(f)["benchmarks"][0]["metrics"]


def _gl(m: dict, key: str, stat: str = "median"):
    return m[key]["successful"].get(stat)


def test_guidellm_and_our_load_at_one_point(tmp_path, capsys):
    processor = _processor(tmp_path)
    ours = tmp_path / "ours.jsonl"
    with _target(tmp_path) as url:
        gl = _run_guidellm(url, processor, str(tmp_path / "guidellm.json"))
        rc = main(["load", "--url", url, "--modes", MODEL, "--rates", f"{RATE:g}",
                   "--burstiness", "1000", "--num_requests", str(REQUESTS),
                   "--max_tokens", str(OUTPUT_TOKENS), "--output", str(ours)])
    assert rc == 0
    (pt,) = json.loads((tmp_path / "ours.summary.json").read_text())["points"]
    totals = gl["request_totals"]
    # the same quantity under each tool's name: GuideLLM's ITL is vLLM's TPOT
    # ((E2E - TTFT) / (tokens - 1)); its TPOT is E2E / tokens
    rows = [
        ("requests completed", pt["completed"], totals["successful"]),
        ("errors", pt["errors"], totals["errored"]),
        ("requests/s", pt["achieved_rps"], _gl(gl, "requests_per_second", "mean")),
        ("TTFT p50 ms", pt["ttft_ms"]["p50"], _gl(gl, "time_to_first_token_ms")),
        ("TPOT p50 ms (GuideLLM: ITL)", pt["tpot_ms"]["p50"],
         _gl(gl, "inter_token_latency_ms")),
        ("E2E p50 ms", pt["e2e_ms"]["p50"], 1000 * _gl(gl, "request_latency")),
        ("output tokens/request (mean)", pt["output_tokens"] / max(pt["completed"], 1),
         _gl(gl, "output_token_count", "mean")),
    ]
    with capsys.disabled():
        print(f"\nOne point, constant {RATE:g} req/s, {REQUESTS} requests:")
        print(f"{'metric':32}{'c2c_core load':>16}{'guidellm':>16}")
        for name, a, b in rows:
            fa = "-" if a is None else f"{a:.4g}"
            fb = "-" if b is None else f"{b:.4g}"
            print(f"{name:32}{fa:>16}{fb:>16}")
    assert pt["requests"] == REQUESTS and pt["completed"] == REQUESTS and pt["errors"] == 0
    # GuideLLM's side: no request errored. Its max_requests constraint stops each of its worker
    # processes once they count enough processed requests; on a loaded machine one request in
    # flight at that moment can end cancelled ("incomplete") or uncounted (seen in CI: 5 of 6),
    # which says nothing about the server. Ours above must complete all of them.
    assert totals["errored"] == 0, totals
    assert totals["successful"] >= REQUESTS - 1, totals
