#!/usr/bin/env bash
# GPU check (issue 19 part 6): the CUDA paths (events, bf16, memory, CUDA profiler activity) on the
# dummy presets on both engines, the `pytest -m gpu` tests, and the runs behind issue 19's figures;
# ends with ONE table (figure, goal, ours fast, ours eager, the reference's, met) printed by
# scripts/gpu_table.py, the same numbers in $OUT/gpu_check.json. JSONL and traces go to
# ${OUT:-gpu_check_out}. Estimated times are for an H100/H200 with a cold compile cache (whole
# script <= 8 minutes); the second-process compile check is skipped past GPU_CHECK_BUDGET_S.
# Usage: bash scripts/gpu_check.sh [--dry-run] [tokenizer]
#   --dry-run (or GPU_CHECK_DRY=1): only print the table from the files already under $OUT.
#   The reference column is filled from $OUT/reference.json, written by
#   scripts/reference_timing.py when a clone of thu-nics/C2C is at $C2C_REF or ../C2C; otherwise
#   (or when that run fails) it says n/a.
set -uo pipefail
OUT=${OUT:-gpu_check_out}
PY=${PYTHON:-python3}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DRY=${GPU_CHECK_DRY:-0}
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
if [ "$DRY" = "1" ]; then OUT="$OUT" exec "$PY" "$HERE/gpu_table.py" "$OUT"; fi
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1 \
   || ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
  echo "gpu_check.sh needs an NVIDIA GPU with CUDA (nvidia-smi and torch.cuda.is_available()); none is here, so nothing was run (GPU_CHECK_DRY=1 prints the table from existing files)." >&2
  exit 2
fi
mkdir -p "$OUT"
TOK=${1:-}
tok() { [ -n "$TOK" ] && echo "--tokenizer $TOK"; }
export PYTHONUNBUFFERED=1
BUDGET=${GPU_CHECK_BUDGET_S:-480}
PRE=qwen3-0.6b+qwen3-4b-base-dummy
P="The quick brown fox jumps over the lazy dog while the cat watches quietly."
step() { echo "== [${SECONDS}s] $*"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
step "pytest -m gpu (~40 s)"
"$PY" -m pytest -m gpu tests/test_gpu.py tests/test_graph_memory.py -q -x -rA 2>&1 | tail -25 || echo "GPU TESTS FAILED"
# decode, projection, TTFT (short prompt) of both engines, batch 64 / batch 1, floor ratio,
# compile_s: interleaved in one process (~100 s: ~60-90 s compile cold, 3 repeats of 128 tokens)
step "engines (~100 s)"
"$PY" -m c2c_core engines --preset $PRE $(tok) --prompt "$P" --no_chat_template \
  --max_new_tokens 128 --bench_batch 64 --bench_repeats 3 2>&1 | grep -v '%|' | tee "$OUT/engines.json"
# the same with the decode step captured as it is instead of compiled (C2C_FAST_STEP=capture):
# no inductor compile at all, so warm-up takes seconds; is its step as fast? (~45 s)
step "engines, step captured without compile (~45 s)"
C2C_FAST_STEP=capture "$PY" -m c2c_core engines --preset $PRE $(tok) --prompt "$P" --no_chat_template \
  --max_new_tokens 128 --bench_batch 64 --bench_repeats 3 2>&1 | grep -v '%|' | tee "$OUT/engines-capture.json"
# TTFT at 1,024 tokens: an exact-length prompt, 8 new tokens, c2c (~50 s: one new shape to compile)
for engine in fast eager; do
  step "sweep --input_lens 1024, $engine (~25 s)"
  "$PY" -m c2c_core sweep --preset $PRE $(tok) --engine $engine --mode c2c --input_lens 1024 \
    --output_lens 8 --repeats 3 --warmup 1 --output "$OUT/long-$engine.jsonl" 2>&1 | grep -v '%|' | tail -3
done
# second process's compile / first's on a fresh cache (~120 s: two processes, load + compile)
if [ "$SECONDS" -lt $((BUDGET - 240)) ]; then
  step "compile cache check, two processes (~120 s)"
  "$PY" "$HERE/compile_cache_check.py" --preset $PRE $(tok) 2>&1 | tee "$OUT/compile_cache.json"
else
  step "compile cache check skipped: ${SECONDS}s used of a ${BUDGET}s budget"
fi
# the CUDA paths of every mode: 32 new tokens, 1 repeat (~60 s: eager ~10 s, fast ~20 s per preset
# with the cache warm from the runs above)
for engine in eager fast; do
for preset in $PRE qwen3-0.6b+qwen2.5-0.5b-dummy; do
  step "batch --mode all, $engine, $preset"
  "$PY" -m c2c_core batch --preset $preset $(tok) --engine $engine --mode all --prompts "$P" --no_chat_template \
    --max_new_tokens 32 --ignore_eos --repeats 1 --warmup 1 --output "$OUT/$engine-$preset.jsonl" 2>&1 | grep -v '%|'
done
done
step "sync timing, overhead, profile (~40 s)"
"$PY" -m c2c_core batch --preset $PRE $(tok) --prompts "$P" --no_chat_template \
  --max_new_tokens 64 --ignore_eos --repeats 2 --warmup 1 --timing sync --output "$OUT/sync.jsonl" 2>&1 | grep -v '%|'
"$PY" -m c2c_core overhead --preset $PRE $(tok) --prompt "$P" --no_chat_template \
  --max_new_tokens 64 --bench_repeats 5 2>&1 | grep -v '%|'
"$PY" -m c2c_core profile --preset $PRE $(tok) --prompt "$P" --no_chat_template \
  --max_new_tokens 32 --ignore_eos --trace_gz --output "$OUT/profile.jsonl" 2>&1 | grep -v '%|'
"$PY" - "$OUT" <<'PY'
import json, sys, glob, statistics as st
out = sys.argv[1]
for f in sorted(glob.glob(f"{out}/*.jsonl")):
    recs = [json.loads(l) for l in open(f)]
    for mode in dict.fromkeys(r["mode"] for r in recs):
        rs = [r["timing"] for r in recs if r["mode"] == mode]
        med = lambda k: st.median(t[k] for t in rs)
        pre = med("base_prefill_ms") + med("teacher_prefill_ms") + med("projector_total_ms")
        print(f"{f.split('/')[-1]:40s} {mode:8s} n={len(rs)} prompt={rs[0]['prompt_tokens']} "
              f"ttft={med('ttft_ms'):.1f} prefill+proj={pre:.1f} proj={med('projector_total_ms'):.2f} "
              f"({rs[0]['projector_calls']} calls) decode={med('decode_avg_ms'):.2f} ms/tok "
              f"p90={med('decode_p90_ms'):.2f} e2e={med('e2e_ms'):.1f} peak={med('peak_memory_mb'):.0f} MiB "
              f"timing={recs[0]['run']['timing_method']} dtype={recs[0]['run']['dtype']} "
              f"engine={recs[0]['run'].get('engine')} compile={recs[0]['run'].get('compile_s')}s")
try:
    s = json.load(open(f"{out}/profile_stats.json"))
    print("stages (profiled):", json.dumps(s["stages"]))
    print("top device ops:", [(o["name"][:40], o["self_device_ms"]) for o in s["top_ops_by_device"][:5]])
except (OSError, KeyError, ValueError) as e:
    print("profile stats: n/a", e)
PY
# the reference's figures: thu-nics/C2C's rosetta on the same workload (scripts/reference_timing.py,
# ~60 s), only with a clone at $C2C_REF or ../C2C; a failure prints one line and the column says n/a
rm -f "$OUT/reference.json"
REF=$("$PY" -c "import os, sys; sys.path.insert(0, sys.argv[1]); import gpu_table; print(gpu_table.find_reference(os.environ.get('C2C_REF')) or '')" "$HERE" 2>/dev/null)
if [ -n "$REF" ]; then
  step "reference timing, $REF (~60 s)"
  if "$PY" "$HERE/reference_timing.py" --reference "$REF" $(tok) --out "$OUT" >"$OUT/reference.log" 2>&1; then
    tail -1 "$OUT/reference.log"
  else
    rm -f "$OUT/reference.json"
    echo "reference timing failed, the reference column says n/a: $(tail -1 "$OUT/reference.log") (log: $OUT/reference.log)"
  fi
else
  step "reference timing skipped: no clone of thu-nics/C2C at \$C2C_REF or ../C2C"
fi
step "table (issue 19's figures and goals)"
"$PY" "$HERE/gpu_table.py" "$OUT"
