"""The reference implementation's figures for the table gpu_check.sh ends with: times thu-nics/C2C
(package `rosetta`, RosettaModel + C2CProjector) on the workload of our own `engines` run and
writes them, under the row keys scripts/gpu_table.py reads, to <out>/reference.json.

Workload (gpu_check.sh's `engines` call): the qwen3-0.6b+qwen3-4b-base-dummy preset, i.e. random
weights (seed 0, built by our own loader, so they are the weights our runs use) from
assets/configs/qwen3-0.6b.json (receiver) and qwen3-4b-base.json (sharer); bf16 on CUDA; batch 1;
the prompt P of gpu_check.sh without a chat template, tokenized by our own loading (--tokenizer,
else the preset's; when no tokenizer is usable, fixed ids of the same length and
"prompt_ids": "synthetic"); 128 new tokens, greedy, EOS ignored. Projectors: one freshly
initialised C2CProjector (seed 0; the published recipe's sizes: hidden 1024, intermediate 1024,
3 layers) per receiver layer, paired with sharer layers by the reference's own "last_aligned"
mapping (t <- t + Ls - Lr), one sharer, the reference's evaluation defaults (sequential fusion,
no include_response); the prompt is split as the reference's examples do: every token but the
last projected, the last one not.

What is timed, per generation through the reference's own `RosettaModel.generate` (a streamer
marks each token as generate hands it over; CUDA events, one synchronize at the end; on a CPU
time.perf_counter):
- ttft_ms: prompt ids on the device -> the first token id on the host;
- projection_ms: the sum of every projector call of the prefill (projector_calls of them); the
  reference's write of the result into the cache is not inside a call, so it is not counted;
- decode_ms: the mean of the per-step times after the first token (a step: one receiver forward
  and the reference's sampling and bookkeeping);
- ttft_1024_ms: TTFT at a 1,024-token prompt (fixed ids, 8 new tokens).
Each is the median over --repeats generations after one unrecorded warm-up. Rows that do not
apply to the reference (compile, batch, decode floor) are null, so the table says n/a.

Running under the pinned transformers 5.x (the reference targets 4.52), three shims are applied
at run time (c2c_core/bench/reference.py, shared with `engines --reference` and
scripts/golden_forward.py), in this process only (the clone is never edited), each only where
it is needed; the JSON lists those applied under "shims":
- `DynamicCache.key_cache` / `.value_cache`: transformers 5 removed these lists (the layers
  hold `.keys` / `.values`); the reference's clone_kv_cache and its in-place projection writes
  use them. Shim: list-like views over `cache.layers` (indexing, iteration, append).
- `Cache.__getitem__` (cache[i] -> (keys, values)): removed in transformers 5; the reference reads
  each layer of the receiver and sharer caches so. Shim: the same tuple from `cache.layers[i]`.
- not transformers: the reference's newest RosettaModel.forward (commit 21424af) stores caches
  that exist only with include_response=True without checking it, so the default mode fails with
  UnboundLocalError on base_output_kv_cache (thu-nics/C2C issue #7). Shim: the method is
  recompiled from its own source with those two statements under `if self.include_response:`
  (the earlier commits' behaviour); a clone without that bug is left as it is.
Anything else that breaks stops the script with one sentence naming it, exit status 3.

    python scripts/reference_timing.py [--reference DIR] [--tokenizer TOK] [--out DIR]
        [--device auto|cpu|cuda] [--dtype bfloat16|float16|float32] [--max_new_tokens 128]
        [--repeats 3] [--receiver_config JSON] [--sharer_config JSON] [--long_prompt_tokens 1024]
        [--hidden_dim 1024] [--intermediate_dim 1024] [--threads N]

--reference defaults to $C2C_REF, else ../C2C beside this repository (as gpu_table.py finds it);
--out to $OUT, else gpu_check_out. Without a clone: one sentence, exit status 2.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import subprocess
import sys
import time
import warnings

os.environ["HF_HUB_OFFLINE"] = "1"  # dummy weights only: never reach for a model hub

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CONFIGS = os.path.join(ROOT, "assets", "configs")
PRESET = "qwen3-0.6b+qwen3-4b-base-dummy"
PROMPT = "The quick brown fox jumps over the lazy dog while the cat watches quietly."
SHORT_PROMPT_TOKENS = 17  # the length the table's short-prompt row names when no tokenizer loads
#: The published recipe's projector (recipe/train_recipe/*.json in the reference).
PROJECTOR_ARGS = {"num_layers": 3, "dropout": 0.1, "initial_temperature": 1.0,
                  "final_temperature": 0.001, "anneal_steps": 1929}
#: Rows of gpu_table.ROWS that have no meaning for the reference (no compile, batch 1 only).
NOT_MEASURED = ("compile_first_s", "compile_second_ratio", "batch_ratio", "decode_floor_ratio")


sys.path.insert(0, ROOT)
# one sentence for the user and an exit status; the first line of an exception
from c2c_core.bench.reference import ReferenceUnavailable as Refusal  # noqa: E402
from c2c_core.bench.reference import first_line as _first_line  # noqa: E402


# ------------------------------------------------------------------------- timing ----------

class Clock:
    """CUDA events on a GPU (read after one synchronize), perf_counter on a CPU."""

    def __init__(self, device):
        import torch
        self.torch, self.device, self.cuda = torch, device, device.type == "cuda"

    def mark(self):
        if self.cuda:
            e = self.torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1000.0

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize(self.device)


class TokenMarks:
    """A streamer for RosettaModel.generate: it gets the prompt once (after the prefill), then
    each new token as generate appends it; the first token is read to the host (TTFT)."""

    def __init__(self, clock: Clock):
        self.clock, self.prefill_done, self.tokens = clock, None, []

    def put(self, value):
        if self.prefill_done is None:
            self.prefill_done = self.clock.mark()
            return
        if not self.tokens:
            int(value.reshape(-1)[0])  # the first token id on the host
        self.tokens.append(self.clock.mark())

    def end(self):
        pass


def time_projectors(projectors, clock: Clock, spans: list) -> None:
    """Every projector call adds its (start, end) marks to `spans` (the reference calls
    `.forward` directly, so hooks on __call__ would not fire)."""
    for p in projectors:
        def timed(*a, _f=p.forward, **k):
            s = clock.mark()
            out = _f(*a, **k)
            spans.append((s, clock.mark()))
            return out
        p.forward = timed


def one_generation(model, ids, max_new_tokens: int, clock: Clock, spans: list) -> dict:
    import torch
    n = ids.shape[1]
    dev = ids.device
    # the sections our plan runs for these ids (plan.item.reference_sections): one sharer on
    # the receiver's ids, so every token but the last projected from sharer 1, the last not
    from c2c_core.plan.item import Feed, Plan, reference_sections
    plan = Plan("c2c", list(ids[0].tolist()), feeds=[Feed(1, list(ids[0].tolist()), None, None)])
    index = [torch.tensor([b, 0], dtype=torch.long).repeat(e - a, 1).unsqueeze(0).to(dev)
             for a, e, b in reference_sections(plan)]
    marks = TokenMarks(clock)
    spans.clear()
    clock.sync()
    start = clock.mark()
    out = model.generate(kv_cache_index=index, input_ids=ids, max_new_tokens=max_new_tokens,
                         do_sample=False, eos_token_id=-1, pad_token_id=0, streamer=marks)
    end = clock.mark()
    clock.sync()
    if out.shape[1] != n + max_new_tokens or len(marks.tokens) != max_new_tokens:
        raise Refusal(f"the reference generated {out.shape[1] - n} tokens where"
                      f" {max_new_tokens} were asked (EOS ignored), so its times would not compare.")
    steps = [clock.ms(a, b) for a, b in zip(marks.tokens, marks.tokens[1:])]
    return {"ttft_ms": clock.ms(start, marks.tokens[0]),
            "prefill_ms": clock.ms(start, marks.prefill_done),
            "projection_ms": sum(clock.ms(a, b) for a, b in spans), "projector_calls": len(spans),
            "decode_ms": statistics.fmean(steps) if steps else None,
            "e2e_ms": clock.ms(start, end)}


def measured(model, ids, max_new_tokens: int, repeats: int, clock: Clock, spans: list) -> dict:
    """Medians over `repeats` generations after one unrecorded warm-up."""
    one_generation(model, ids, max_new_tokens, clock, spans)
    runs = [one_generation(model, ids, max_new_tokens, clock, spans) for _ in range(repeats)]
    med = {}
    for k in runs[0]:
        xs = [r[k] for r in runs if r[k] is not None]
        med[k] = statistics.median(xs) if xs else None
    return med


# ------------------------------------------------------------------------ building ---------

def _head(config) -> tuple[int, int]:
    hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return hd, getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def build(args, RosettaModel, create_projector, mapping, device, dtype):
    import torch
    from c2c_core.models.loading import load_model
    from c2c_core.spec.config import ModelSpec
    models = [load_model(ModelSpec(f"dummy:{p}"), role, device, dtype, None)[0]
              for p, role in ((args.receiver_config, "Receiver"), (args.sharer_config, "Sharer"))]
    r, s = models
    lr, ls = r.config.num_hidden_layers, s.config.num_hidden_layers
    (td, th), (sd, sh) = _head(r.config), _head(s.config)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
        torch.manual_seed(0)
        projectors = [create_projector("C2CProjector", source_dim=sd, target_dim=td,
                                       source_num_heads=sh, target_num_heads=th,
                                       hidden_dim=args.hidden_dim,
                                       intermediate_dim=args.intermediate_dim, dtype=dtype,
                                       **PROJECTOR_ARGS) for _ in range(lr)]
    kw = {"model_list": models, "base_model_idx": 0, "projector_list": projectors}
    accepted = inspect.signature(RosettaModel.__init__).parameters
    kw.update({k: v for k, v in (("include_response", False),
                                 ("multi_source_fusion_mode", "sequential")) if k in accepted})
    model = RosettaModel(**kw).to(device).eval()
    pairs = mapping(lr, ls)
    for t, sources in pairs.items():
        for src in sources:
            model.set_projector_config(source_model_idx=1, source_model_layer_idx=src,
                                       target_model_idx=0, target_model_layer_idx=t,
                                       projector_idx=t)
    offsets = sorted({src - t for t, srcs in pairs.items() for src in srcs})
    return model, projectors, min(r.config.vocab_size, s.config.vocab_size), offsets


def prompt_ids(tokenizer: str | None, vocab: int) -> tuple[list[int], str]:
    """P's ids by our own loading (as the `engines` run builds them), or fixed ids."""
    synthetic = ([(7 * i + 11) % vocab for i in range(SHORT_PROMPT_TOKENS)], "synthetic")
    if tokenizer == "synthetic":
        return synthetic
    try:
        from c2c_core.models.loading import load_tokenizer
        from c2c_core.plan.item import chat_ids
        from c2c_core.spec.config import build_run_config
        cfg = build_run_config(PRESET, tokenizer=tokenizer or None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tok, src = load_tokenizer(cfg.receiver)
        ids = list(chat_ids(tok, PROMPT, chat_template=False))
    except Exception:  # noqa: BLE001 - no usable tokenizer offline
        return synthetic
    if len(ids) < 2 or max(ids) >= vocab:
        return synthetic
    return ids, str(src)


def _commit(path: str) -> str | None:
    try:
        r = subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True,
                           text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return (r.stdout.strip() or None) if r.returncode == 0 else None


def find_clone(given: str | None) -> str:
    if given:
        if not os.path.isdir(given):
            raise Refusal(f"no clone of thu-nics/C2C at {given} (--reference), so there is"
                          " nothing to time.", 2)
        return given
    sys.path.insert(0, HERE)
    from gpu_table import find_reference
    found = find_reference(os.environ.get("C2C_REF"))
    if not found:
        raise Refusal("no clone of thu-nics/C2C at $C2C_REF or ../C2C (pass --reference DIR),"
                      " so there is nothing to time.", 2)
    return found


# ---------------------------------------------------------------------------- main ---------

def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", help="the clone of thu-nics/C2C (default $C2C_REF or ../C2C)")
    p.add_argument("--tokenizer", help="tokenizer for the prompt's ids (as gpu_check.sh's; "
                   "'synthetic' for fixed ids; default the preset's, offline)")
    p.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"),
                   help="folder for reference.json (default $OUT or gpu_check_out)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="recorded generations (median)")
    p.add_argument("--long_prompt_tokens", type=int, default=1024,
                   help="TTFT at a prompt this long, 8 new tokens (0: skip)")
    p.add_argument("--receiver_config", default=os.path.join(CONFIGS, "qwen3-0.6b.json"))
    p.add_argument("--sharer_config", default=os.path.join(CONFIGS, "qwen3-4b-base.json"))
    p.add_argument("--hidden_dim", type=int, default=1024, help="projector hidden size")
    p.add_argument("--threads", type=int, help="torch CPU threads (default torch's)")
    p.add_argument("--intermediate_dim", type=int, default=1024, help="projector FFN size")
    return p.parse_args(argv)


def run(args) -> dict:
    t0 = time.perf_counter()
    clone = find_clone(args.reference)
    if args.max_new_tokens < 2 or args.repeats < 1:
        raise Refusal("--max_new_tokens must be >= 2 and --repeats >= 1 to time decode steps.", 2)
    for p in (args.receiver_config, args.sharer_config):
        if not os.path.isfile(p):
            raise Refusal(f"no model config {p}.", 2)
    warnings.filterwarnings("ignore")
    sys.path.insert(0, ROOT)
    import torch
    import transformers
    from transformers.utils import logging as tlog
    tlog.set_verbosity_error()
    device = torch.device(args.device if args.device != "auto" else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise Refusal(f"--device {args.device} asked for CUDA, which this machine lacks.", 2)
    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    from c2c_core.bench.reference import load_reference
    RosettaModel, create_projector, mapping, shims = load_reference(clone)
    try:
        model, projectors, vocab, offsets = build(args, RosettaModel, create_projector, mapping,
                                                  device, dtype)
    except Refusal:
        raise
    except Exception as e:  # noqa: BLE001
        raise Refusal(f"the reference's RosettaModel could not be built under transformers"
                      f" {transformers.__version__} ({_first_line(e)}).") from None
    ids, source = prompt_ids(args.tokenizer, vocab)
    clock = Clock(device)
    spans: list = []
    time_projectors(projectors, clock, spans)
    long_key = f"ttft_{args.long_prompt_tokens}_ms" if args.long_prompt_tokens > 1 else "ttft_1024_ms"
    try:
        # as the reference runs: its generate is under no_grad (no inference_mode around it)
        short = measured(model, torch.tensor([ids], device=device), args.max_new_tokens,
                         args.repeats, clock, spans)
        long = None
        if args.long_prompt_tokens > 1:
            g = torch.Generator().manual_seed(0)
            long_ids = torch.randint(0, vocab, (1, args.long_prompt_tokens), generator=g)
            long = measured(model, long_ids.to(device), 8, args.repeats, clock, spans)
    except Refusal:
        raise
    except Exception as e:  # noqa: BLE001 - the reference's own failure, named
        raise Refusal(f"the reference failed while generating under transformers"
                      f" {transformers.__version__} ({_first_line(e)}).") from None
    default_cfgs = (os.path.abspath(args.receiver_config) == os.path.join(CONFIGS, "qwen3-0.6b.json")
                    and os.path.abspath(args.sharer_config) == os.path.join(CONFIGS, "qwen3-4b-base.json"))
    r3 = lambda v: None if v is None else round(v, 3)  # noqa: E731
    res = {"ttft_ms": r3(short["ttft_ms"]), "decode_ms": r3(short["decode_ms"]),
           "projection_ms": r3(short["projection_ms"]),
           long_key: r3(long["ttft_ms"]) if long else None,
           **{k: None for k in NOT_MEASURED},
           "prefill_ms": r3(short["prefill_ms"]), "e2e_ms": r3(short["e2e_ms"]),
           "projector_calls": int(short["projector_calls"]), "prompt_tokens": len(ids),
           "prompt_ids": source, "max_new_tokens": args.max_new_tokens,
           "long_prompt_tokens": args.long_prompt_tokens or None, "repeats": args.repeats,
           "warmup": 1, "ignore_eos": True, "greedy": True,
           "preset": PRESET if default_cfgs else "custom",
           "receiver_config": args.receiver_config, "sharer_config": args.sharer_config,
           "mapping": f"last_aligned (sharer layer = receiver layer {offsets[0]:+d})"
           if len(offsets) == 1 else f"last_aligned (offsets {offsets})",
           "fusion": "sequential", "include_response": False,
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "dtype": args.dtype, "timing_method": "cuda_events" if clock.cuda else "perf_counter",
           "reference": os.path.abspath(clone), "reference_commit": _commit(clone),
           "transformers": transformers.__version__, "torch": torch.__version__,
           "shims": shims, "wall_s": round(time.perf_counter() - t0, 1)}
    return res


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    try:
        res = run(args)
    except Refusal as e:
        print(f"reference_timing: {e}", file=sys.stderr)
        return e.code
    except Exception as e:  # noqa: BLE001 - one sentence, never a traceback page
        print(f"reference_timing: failed ({_first_line(e)}).", file=sys.stderr)
        return 3
    line = json.dumps(res)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "reference.json"), "w", encoding="utf-8") as f:
        f.write(line + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
