#!/usr/bin/env bash
# GPU check: the CUDA paths (events, bf16, memory, CUDA profiler activity) on the dummy presets,
# with the reference shape (short prompt, 128 new tokens, batch 1), on both engines; then the
# `pytest -m gpu` tests (fail on error) and the eager-vs-fast benchmark (batch 64 vs 1). Prints
# figures; writes JSONL and traces under ${OUT:-gpu_check_out}.
# Usage: bash scripts/gpu_check.sh [tokenizer]
set -uo pipefail
OUT=${OUT:-gpu_check_out}; mkdir -p "$OUT"
TOK=${1:-}
tok() { [ -n "$TOK" ] && echo "--tokenizer $TOK"; }
export PYTHONUNBUFFERED=1
P="The quick brown fox jumps over the lazy dog while the cat watches quietly."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
python3 -m pytest -m gpu tests/test_gpu.py -q -x 2>&1 | tail -15 || echo "GPU TESTS FAILED"
python3 -m c2c_core engines --preset qwen3-0.6b+qwen3-4b-base-dummy $(tok) --prompt "$P" --no_chat_template \
  --max_new_tokens 128 --bench_batch 64 --bench_repeats 5 2>&1 | grep -v '%|'
for engine in eager fast; do
for preset in qwen3-0.6b+qwen3-4b-base-dummy qwen3-0.6b+qwen2.5-0.5b-dummy; do
  python3 -m c2c_core batch --preset $preset $(tok) --engine $engine --mode all --prompts "$P" --no_chat_template \
    --max_new_tokens 128 --ignore_eos --repeats 3 --warmup 2 --output "$OUT/$engine-$preset.jsonl" 2>&1 | grep -v '%|'
done
done
python3 -m c2c_core batch --preset qwen3-0.6b+qwen3-4b-base-dummy $(tok) --prompts "$P" --no_chat_template \
  --max_new_tokens 128 --ignore_eos --repeats 3 --warmup 2 --timing sync --output "$OUT/sync.jsonl" 2>&1 | grep -v '%|'
python3 -m c2c_core overhead --preset qwen3-0.6b+qwen3-4b-base-dummy $(tok) --prompt "$P" --no_chat_template \
  --max_new_tokens 64 --bench_repeats 7 2>&1 | grep -v '%|'
python3 -m c2c_core profile --preset qwen3-0.6b+qwen3-4b-base-dummy $(tok) --prompt "$P" --no_chat_template \
  --max_new_tokens 32 --ignore_eos --trace_gz --output "$OUT/profile.jsonl" 2>&1 | grep -v '%|'
python3 - "$OUT" <<'PY'
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
s = json.load(open(f"{out}/profile_stats.json"))
print("stages (profiled):", json.dumps(s["stages"]))
print("top device ops:", [(o["name"][:40], o["self_device_ms"]) for o in s["top_ops_by_device"][:5]])
PY
