"""Token alignment, refusals and several sharers on tiny models (seconds, no download).

The tiny receiver and sharer of conftest share one tokenizer; `other_sharer` is a tiny Qwen3
with a tokenizer of its own (different vocabulary, different special tokens)."""

from __future__ import annotations

import json

import pytest
import torch

from c2c_core.models.alignment import TokenAligner, same_ids
from c2c_core.spec.config import build_run_config
from c2c_core.spec.errors import UserError
from c2c_core.models.fusion import fused_prefill, project_sharers
from c2c_core.models.loading import load_pipeline
from c2c_core.models.projector import load_fuser, save_fuser, untrained_fuser
from c2c_core.io.prompts import PromptItem as Item
from c2c_core.io.records import check_record
from c2c_core.bench.runner import run_many, run_one
from c2c_core.measure.timing import Timer

from conftest import CORPUS, build_model

@pytest.fixture(scope="module")
def toks(tiny_models, other_sharer):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_models["receiver"]), AutoTokenizer.from_pretrained(other_sharer)


def _kw(tiny_cfg_kwargs, **over):
    return {**tiny_cfg_kwargs, **over}


# --- alignment -----------------------------------------------------------------------------

def test_vocabularies_are_compared_not_names(tiny_models, toks):
    from transformers import AutoTokenizer
    r, o = toks
    assert same_ids(r, AutoTokenizer.from_pretrained(tiny_models["sharer"]))  # another copy
    assert not same_ids(r, o) and not same_ids(o, r)


@pytest.mark.parametrize("strategy", ["first", "longest"])
def test_aligned_tokens_match_the_receiver_tokens(toks, strategy):
    r, o = toks
    al = TokenAligner(r, o, strategy)
    o_special = set(o.all_special_ids)
    for text in CORPUS:
        ids = r.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                    tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        out = al.align(ids)
        assert len(out) == len(ids) and all(0 <= i < len(o) for i in out)
        for rid, sid in zip(ids, out):
            if rid in r.all_special_ids:
                assert sid in o_special  # by role, else no literal match: the sharer's UNK
                continue
            piece = o.decode([sid]).replace("##", "").strip().lower()
            rtext = r.decode([rid]).strip().lower()
            if sid == o.unk_token_id or not rtext:
                continue
            if strategy == "first":
                assert rtext.startswith(piece), (rtext, piece)
            else:
                assert piece in rtext, (rtext, piece)
    assert al.many, "this corpus has receiver tokens that the sharer splits"
    # the strategies differ where a token splits into pieces of different lengths
    if strategy == "longest":
        first = TokenAligner(r, o, "first")
        assert any(first.align([i]) != al.align([i]) for i in al.many)


def test_special_tokens_map_by_role_then_text(toks):
    r, o = toks
    al = TokenAligner(r, o, "first")
    assert al.align([r.eos_token_id]) == [o.eos_token_id]        # role: pad = eos -> eos wins
    assert al.align([r.unk_token_id]) == [o.unk_token_id]        # role: unk -> unk
    # a chat marker outside the receiver's all_special_ids is ordinary text, as in the reference:
    # the sharer's first piece of "<|user|>"
    marker = r.convert_tokens_to_ids("<|user|>")
    assert marker not in r.all_special_ids
    assert al.align([marker]) == o.encode("<|user|>", add_special_tokens=False)[:1]
    rev = TokenAligner(o, r, "first")                            # the other way round
    assert rev.align([o.eos_token_id]) == [r.eos_token_id]
    assert rev.align([o.pad_token_id]) == [r.pad_token_id]       # role: pad -> pad
    bos = o.convert_tokens_to_ids("[BOS]")  # r has no BOS and no "[BOS]": r's UNK
    assert rev.align([bos]) == [r.unk_token_id] and bos in rev.unmapped


def test_alignment_cache_is_per_token(toks):
    r, o = toks
    al = TokenAligner(r, o)
    ids = r("Hello there, friend!")["input_ids"]
    first = al.align(ids)
    assert set(al.cache) == set(ids)
    al.sharer_tok = None  # a warm aligner never touches the tokenizers again
    assert al.align(ids) == first


# --- refusals ------------------------------------------------------------------------------

def test_alignment_none_refuses_before_any_model_loads(tiny_cfg_kwargs, other_sharer, monkeypatch):
    import c2c_core.models.loading as L

    def boom(*a, **k):
        raise AssertionError("a model was loaded")
    monkeypatch.setattr(L, "load_model", boom)
    cfg = build_run_config(**_kw(tiny_cfg_kwargs, teacher_model=other_sharer, alignment="none"))
    with pytest.raises(UserError) as e:
        load_pipeline(cfg)
    msg = str(e.value)
    assert "300 tokens" in msg and "180 tokens" in msg and "--alignment" in msg
    assert msg.count(". ") == 0 and msg.endswith(".")  # one sentence


def test_sharer_with_too_few_embedding_rows_is_refused(tiny_cfg_kwargs, tiny_models, tmp_path):
    from transformers import AutoTokenizer
    d = str(tmp_path / "small")
    AutoTokenizer.from_pretrained(tiny_models["receiver"]).save_pretrained(d)
    build_model(d, "qwen2", 100, 1, layers=2, seed=3)  # same tokenizer, only 100 rows
    cfg = build_run_config(**_kw(tiny_cfg_kwargs, teacher_model=d))
    with pytest.raises(UserError, match="100 embedding rows.*300 tokens"):
        load_pipeline(cfg)


def test_unknown_alignment_and_fusion_are_one_sentence(tiny_cfg_kwargs):
    with pytest.raises(UserError, match="--alignment best is unknown"):
        build_run_config(**_kw(tiny_cfg_kwargs, alignment="best"))
    with pytest.raises(UserError, match="--fusion mixed is unknown"):
        build_run_config(**_kw(tiny_cfg_kwargs, fusion="mixed"))


# --- a sharer with its own tokenizer, every mode --------------------------------------------

@pytest.fixture(scope="module")
def hetero(tiny_cfg_kwargs, other_sharer):
    cfg = build_run_config(**_kw(tiny_cfg_kwargs, teacher_model=other_sharer, mode="all",
                                 max_new_tokens=4, t2t_note_tokens=4))
    return load_pipeline(cfg), cfg


def test_heterogeneous_pair_runs_every_mode(hetero):
    pipe, cfg = hetero
    assert pipe.sharers[0].aligner is not None and "first alignment" in pipe.describe()
    recs = run_many(pipe, cfg, [Item(1, "What is the capital of France?"), Item(2, "Say hello")])
    assert [r["mode"] for r in recs[:4]] == ["c2c", "receiver", "sharer", "t2t"]
    for r in recs:
        assert check_record(r) == [], (r["mode"], check_record(r))
        t = r["timing"]
        if r["mode"] == "c2c":
            assert t["alignment_ms"] > 0 and t["sharers"][0]["alignment"] == "first"
            assert t["projector_calls"] == 2 and t["prompt_tokens"] > 1
        elif r["mode"] == "receiver":
            assert t["alignment_ms"] == 0 and t["sharers"] == []
        else:  # the sharer speaks for itself: its own tokenizer (no chat template), no alignment
            assert r["sharer_prompt_format"] == "plain" and t["alignment_ms"] == 0
            assert t["sharers"][0]["alignment"] == "none"
        assert r["run"]["alignment"] == ["first"]
    sharer_rec = next(r for r in recs if r["mode"] == "sharer" and r["id"] == 1)
    o = pipe.sharers[0].tokenizer
    assert sharer_rec["timing"]["prompt_tokens"] == len(o("What is the capital of France?")["input_ids"])


def test_alignment_ms_is_host_time_inside_ttft(hetero):
    pipe, cfg = hetero
    rec = run_one(pipe, cfg, Item("a", "Paris is the capital of France. Hello there, friend!"))
    t = rec["timing"]
    before_first = t["alignment_ms"] + t["base_embedding_ms"] + t["base_prefill_ms"] + \
        t["teacher_embedding_ms"] + t["teacher_prefill_ms"] + t["projector_total_ms"]
    assert 0 < t["alignment_ms"] and before_first <= t["ttft_ms"] + 0.5


def test_exact_length_prompt_is_aligned_for_the_sharer(hetero):
    pipe, cfg = hetero
    ids = pipe.tokenizer("Hello there, friend! What is 25 * 17?")["input_ids"]
    for mode in ("sharer", "t2t", "c2c"):
        rec = run_one(pipe, cfg, Item("x", "exact", input_ids=ids), mode)
        assert check_record(rec) == []
        if mode == "sharer":
            assert rec["timing"]["prompt_tokens"] == len(ids)
            assert rec["timing"]["sharers"][0]["alignment"] == "first"


# --- several sharers ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_sharers(tiny_cfg_kwargs, tiny_models, other_sharer):
    cfg = build_run_config(**_kw(tiny_cfg_kwargs, mode="all", max_new_tokens=3, t2t_note_tokens=3,
                                 teacher_model=[tiny_models["sharer"], other_sharer]))
    return load_pipeline(cfg), cfg


def test_two_sharers_write_per_sharer_times_that_sum_to_the_totals(two_sharers):
    pipe, cfg = two_sharers
    assert len(pipe.sharers) == 2 and pipe.fuser.num_sharers == 2
    assert [sl.alignment for sl in pipe.sharers] == ["none", "first"]
    recs = run_many(pipe, cfg, [Item(1, "What is 25 * 17?")])
    c2c = next(r for r in recs if r["mode"] == "c2c")
    t = c2c["timing"]
    assert [e["model"] for e in t["sharers"]] == [sl.name for sl in pipe.sharers]
    # the same-tokenizer sharer projects the opening template and the message, each its own
    # section (projected before the next runs, as the reference); the other sharer the message
    assert [e["projector_calls"] for e in t["sharers"]] == [4, 2] and t["projector_calls"] == 6
    assert [s["projected"] for s in t["sections"]] == [True, True, False, False]
    for f, total in (("embedding_ms", "teacher_embedding_ms"), ("prefill_ms", "teacher_prefill_ms"),
                     ("projection_ms", "projector_total_ms"), ("alignment_ms", "alignment_ms")):
        assert sum(e[f] for e in t["sharers"]) == pytest.approx(t[total], abs=1e-6)
        assert all(e[f] >= 0 for e in t["sharers"])
    assert t["sharers"][0]["alignment_ms"] == 0 and t["sharers"][1]["alignment_ms"] > 0
    assert c2c["model_config"]["teacher_models"] == [sl.name for sl in pipe.sharers]
    assert all(check_record(r) == [] for r in recs)
    bad = json.loads(json.dumps(c2c))
    bad["timing"]["sharers"][0]["prefill_ms"] += 5
    assert "do not add up" in " ".join(check_record(bad))


@torch.no_grad()
def _open(fuser, seed):
    g = torch.Generator().manual_seed(seed)
    for p in fuser.projectors:
        p.key_gate_logit.fill_(1.0)
        p.value_gate_logit.fill_(1.0)
        for name, w in p.named_parameters():
            if "gate" not in name:
                w.add_(torch.randn(w.shape, generator=g) * 0.05)
    return fuser


def test_parallel_and_sequential_fusion_follow_the_reference(two_sharers):
    from transformers import DynamicCache
    pipe, _ = two_sharers
    rcv = pipe.receiver
    s1, s2 = (sl.model for sl in pipe.sharers)
    fuser = _open(untrained_fuser(rcv.config, [s1.config, s2.config], 32, 32, 3), 0)
    n, ids = 6, torch.arange(5, 12).unsqueeze(0)
    with torch.inference_mode():
        def caches():
            r = DynamicCache(config=rcv.config)
            rcv.model(input_ids=ids[:, :n], past_key_values=r, use_cache=True)
            out = []
            for m in (s1, s2):
                c = DynamicCache()
                m.model(input_ids=ids[:, :n], past_key_values=c, use_cache=True)
                out.append(c)
            return r, out
        base, (c1, c2) = caches()
        want_par, want_seq = {}, {}
        for t in range(rcv.config.num_hidden_layers):
            bk, bv = base.layers[t].keys.clone(), base.layers[t].values.clone()
            (s, i1), = fuser.sharer_maps[1][t]
            (s_, i2), = fuser.sharer_maps[2][t]
            k1, v1 = fuser.projectors[i1]((c1.layers[s].keys, c1.layers[s].values), (bk, bv))
            k2, v2 = fuser.projectors[i2]((c2.layers[s_].keys, c2.layers[s_].values), (bk, bv))
            want_par[t] = (bk + ((k1 - bk) + (k2 - bk)), bv + ((v1 - bv) + (v2 - bv)))
            k2s, v2s = fuser.projectors[i2]((c2.layers[s_].keys, c2.layers[s_].values), (k1, v1))
            want_seq[t] = (k2s, v2s)
        for mode, want in (("parallel", want_par), ("sequential", want_seq)):
            r, (d1, d2) = caches()
            calls = project_sharers(fuser, r, [d1, d2], n, Timer(pipe.device), mode)
            assert calls == {1: 2, 2: 2}
            for t, (k, v) in want.items():
                assert torch.equal(r.layers[t].keys, k) and torch.equal(r.layers[t].values, v), mode
        assert not torch.allclose(want_par[0][0], want_seq[0][0])


def test_several_pairs_on_one_layer_run_all_and_keep_the_first(tiny_pipe):
    from transformers import DynamicCache
    pipe, _ = tiny_pipe
    fuser = _open(untrained_fuser(pipe.receiver.config, pipe.sharer.config, 32, 32, 3), 1)
    fuser.mapping[0] = [(2, 0), (1, 1)]           # layer 0 also reads sharer layer 1
    ids = torch.arange(3, 9).unsqueeze(0)
    with torch.inference_mode():
        r, s = DynamicCache(config=pipe.receiver.config), DynamicCache()
        pipe.receiver.model(input_ids=ids, past_key_values=r, use_cache=True)
        pipe.sharer.model(input_ids=ids, past_key_values=s, use_cache=True)
        bk, bv = r.layers[0].keys.clone(), r.layers[0].values.clone()
        want = fuser.projectors[0]((s.layers[2].keys, s.layers[2].values), (bk, bv))
        calls = project_sharers(fuser, r, [s], ids.shape[1], Timer(pipe.device))
    assert calls == {1: 3}
    assert torch.equal(r.layers[0].keys, want[0]) and torch.equal(r.layers[0].values, want[1])


def test_multi_sharer_fuser_folder_round_trips_and_loads_strictly(two_sharers, tmp_path,
                                                                  tiny_cfg_kwargs, tiny_models):
    pipe, _ = two_sharers
    save_fuser(pipe.fuser, tmp_path / "f")
    cfgj = json.loads((tmp_path / "f" / "projector_config.json").read_text())
    assert sorted(cfgj["0"]) == ["1", "2"]
    back = load_fuser(str(tmp_path / "f"))
    assert back.sharer_maps == pipe.fuser.sharer_maps
    one = build_run_config(**_kw(tiny_cfg_kwargs, fuser=str(tmp_path / "f")))
    with pytest.raises(UserError, match="maps 2 sharer.*1 sharer.*exactly 2 --teacher_model"):
        load_pipeline(one)


def test_one_sharer_path_is_unchanged_by_the_multi_sharer_code(tiny_pipe):
    """fused_prefill with one sharer = the same cache as the single-sharer c2c_prefill."""
    from c2c_core.models.fusion import c2c_prefill
    pipe, _ = tiny_pipe
    fuser = _open(untrained_fuser(pipe.receiver.config, pipe.sharer.config, 32, 32, 3), 2)
    ids = torch.arange(3, 12).unsqueeze(0)
    with torch.inference_mode():
        a, la, ca = c2c_prefill(pipe.receiver, pipe.sharer, fuser, ids, Timer(pipe.device))
        for fusion in ("parallel", "sequential"):
            b, lb, cb = fused_prefill(pipe.receiver, [(pipe.sharer, ids)], fuser, ids,
                                      Timer(pipe.device), fusion)
            assert torch.equal(la, lb) and cb == {1: ca}


def test_cli_takes_several_sharers(tiny_cfg_kwargs, tiny_models, other_sharer, tmp_path):
    from c2c_core.frontends.cli import build_parser, run_config
    out = tmp_path / "o.jsonl"
    args = build_parser().parse_args([
        "batch", "--base_model", tiny_models["receiver"], "--teacher_model", tiny_models["sharer"],
        "--teacher_model", other_sharer, "--alignment", "longest", "--fusion", "sequential",
        "--output", str(out)])
    cfg = run_config(args)
    assert [s.source for s in cfg.sharers] == [tiny_models["sharer"], other_sharer]
    assert (cfg.alignment, cfg.fusion) == ("longest", "sequential")
    comma = build_run_config(teacher_model=f"{tiny_models['sharer']}, {other_sharer}")
    assert [s.source for s in comma.sharers] == [tiny_models["sharer"], other_sharer]


# --- the app --------------------------------------------------------------------------------

def test_app_runs_two_sharers_and_refuses_without_alignment(app_server, tiny_models, other_sharer):
    from gradio_client import Client
    client = Client(app_server[1], verbose=False)
    status, table, plot, file = client.predict(
        prompts="What is 25 * 17?", sharer=f"{tiny_models['sharer']}\n{other_sharer}",
        fusion="sequential", api_name="/batch")
    from c2c_core.io.records import read_records
    recs = read_records(file)
    assert len(recs) == 1 and check_record(recs[0]) == []
    assert len(recs[0]["timing"]["sharers"]) == 2 and recs[0]["run"]["fusion"] == "sequential"
    assert recs[0]["run"]["alignment"] == ["none", "first"]
    with pytest.raises(Exception) as e:
        client.predict(prompts="Hi", sharer=other_sharer, alignment="none", api_name="/batch")
    assert "300 tokens" in str(e.value) and "180 tokens" in str(e.value)
    assert "token alignment" in str(e.value)


def test_every_published_fuser_folder_has_a_preset_and_a_dummy_variant():
    import os

    from transformers import AutoConfig

    from c2c_core.spec.config import CONFIGS, PRESETS
    from c2c_core.models.projector import kv_shape
    folders = ["qwen3_0.6b+qwen3_4b_base_Fuser", "qwen3_0.6b+qwen2.5_0.5b_Fuser",
               "qwen3_0.6b+llam3.2_1b_Fuser", "qwen3_0.6b+qwen2.5_1.5b_math_Fuser",
               "qwen3_0.6b+qwen3_4b_Fuser", "qwen3_1.7b+qwen2.5_1.5b_Fuser",
               "qwen3_8b+qwen2.5_7b_Fuser"]
    by_folder = {p.fuser.source.rsplit("/", 1)[1]: p for p in PRESETS.values()
                 if p.fuser.source and p.fuser.source.startswith("hub:")}
    assert sorted(by_folder) == sorted(folders)
    # (layers, kv heads, head_dim, vocab) of the real models (their config.json on the hub)
    want = {"qwen3-1.7b": (28, 8, 128, 151936), "qwen3-4b": (36, 8, 128, 151936),
            "qwen3-8b": (36, 8, 128, 151936), "qwen2.5-1.5b-instruct": (28, 2, 128, 151936),
            "qwen2.5-math-1.5b": (28, 2, 128, 151936), "qwen2.5-7b-instruct": (28, 4, 128, 152064),
            "llama3.2-1b-instruct": (16, 8, 64, 128256)}
    for name, shape in want.items():
        c = AutoConfig.from_pretrained(os.path.join(CONFIGS, f"{name}.json"))
        assert (*kv_shape(c), c.vocab_size) == shape, name
    for p in by_folder.values():
        dummy = PRESETS[f"{p.name}-dummy"]
        assert not dummy.online and dummy.fuser.source is None
        for spec, real in ((dummy.receiver, p.receiver), (dummy.sharer, p.sharer)):
            assert os.path.isfile(os.path.join(CONFIGS, spec.source[len("dummy:"):] + ".json"))
            assert spec.tokenizer in (real.source, "Qwen/Qwen3-0.6B")
    assert PRESETS["qwen3-0.6b+llama3.2-1b-dummy"].sharer.tokenizer == "meta-llama/Llama-3.2-1B-Instruct"
