"""Shared fixtures: tiny real models saved as Hugging Face folders (built in seconds), so tests
use the real loading and generation code paths without any download."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the fast engine's static-cache path without torch.compile (compiling takes minutes on shared
# cores); tests/test_fast.py::test_compiled_step_equals_eager compiles explicitly
os.environ.setdefault("C2C_FAST_COMPILE", "0")

import atexit  # noqa: E402
import contextlib  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

CORPUS = [
    "Say hello in one short sentence.", "What is the capital of France?",
    "Explain machine learning in simple terms.", "Write a haiku about coding.",
    "What is 25 * 17?", "Paris is the capital of France. Hello there, friend!",
    "The quick brown fox jumps over the lazy dog 0123456789 + - * / = ? ! .",
]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def build_tokenizer(folder: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    special = ["<unk>", "<eos>", "<|user|>", "<|assistant|>", "<|end|>"]
    tk.train_from_iterator(CORPUS * 4, trainers.BpeTrainer(
        vocab_size=300, special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<eos>",
                                  pad_token="<eos>")
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(folder)
    return tok


def build_model(folder: str, kind: str, vocab: int, eos_id: int, layers: int, seed: int):
    from transformers import (LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM,
                              Qwen3Config, Qwen3ForCausalLM)
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=4096, eos_token_id=eos_id, bos_token_id=eos_id,
                  tie_word_embeddings=True)
    cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
           "qwen3": (Qwen3Config, Qwen3ForCausalLM)}[kind]
    cfg = cls[0](**common, **({"head_dim": 16} if kind == "qwen3" else {}))
    torch.manual_seed(seed)
    model = cls[1](cfg)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """{'receiver': path, 'sharer': path}: a 2-layer Llama receiver and a 3-layer Qwen2 sharer
    sharing one tokenizer (C2C needs one tokenizer family)."""
    root = tmp_path_factory.mktemp("tiny")
    rdir, sdir = str(root / "receiver"), str(root / "sharer")
    tok = build_tokenizer(rdir)
    tok.save_pretrained(sdir)
    build_model(rdir, "llama", len(tok), tok.eos_token_id, layers=2, seed=1)
    build_model(sdir, "qwen2", len(tok), tok.eos_token_id, layers=3, seed=2)
    return {"receiver": rdir, "sharer": sdir}


@pytest.fixture(scope="session")
def tiny_cfg_kwargs(tiny_models):
    """Keyword arguments for build_run_config: the tiny pair with a small untrained fuser."""
    return dict(base_model=tiny_models["receiver"], teacher_model=tiny_models["sharer"],
                hidden_dim=32, intermediate_dim=32, device="cpu", dtype="float32", warmup=0,
                max_new_tokens=8)


@pytest.fixture(scope="session")
def tiny_pipe(tiny_cfg_kwargs):
    from c2c_core.spec.config import build_run_config
    from c2c_core.models.loading import load_pipeline
    cfg = build_run_config(**tiny_cfg_kwargs)
    return load_pipeline(cfg), cfg


#: A record as the seed fork's profiler script wrote it: no id, no run, step times in seconds
#: under timing.decode_steps and in ms under timing_breakdown_ms.
SEED_RECORD = {
    "prompt": "What is 25 * 17?", "response": "425",
    "model_config": {"base_model": "Qwen/Qwen3-0.6B", "teacher_model": "Qwen/Qwen3-4B-Base"},
    "timing": {"base_embedding_ms": 0.5, "base_prefill_ms": 20.0, "teacher_embedding_ms": 0.2,
               "teacher_prefill_ms": 30.0, "projector_total_ms": 10.0, "projector_calls": 28,
               "num_generated_tokens": 3, "decode_steps": [0.05, 0.06, 0.07]},
    "timing_breakdown_ms": [50.0, 60.0, 70.0],
}


#: Seconds after which a test counts as hung. A hang guard only, never a claim about speed:
#: CI's machine may be loaded (load 9-17 on 2 cores stretched 0.3 s steps to several seconds),
#: so a test checks what happened and in what order, and bounds time only to catch a hang.
HANG_S = 60


#: Process groups (their leaders' pids) that tests started and have not yet ended: killed at
#: exit, so no server, worker or torchrun rank outlives pytest even where a test's own
#: `finally` never ran (an exit from a fixture's setup, a KeyboardInterrupt between steps).
_GROUPS: set[int] = set()


def _kill_groups() -> None:
    for pgid in list(_GROUPS):
        end_group_id(pgid)


def end_group_id(pgid: int) -> None:
    """SIGKILL a process group (a leader started with start_new_session=True); no error if it
    is gone already."""
    _GROUPS.discard(pgid)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


atexit.register(_kill_groups)


def start_group(cmd, **popen_kw) -> subprocess.Popen:
    """subprocess.Popen(cmd, ...) in a process group of its own, killed at exit if still
    there; end it with end_group (in a `finally`)."""
    p = subprocess.Popen(cmd, start_new_session=True, **popen_kw)
    _GROUPS.add(p.pid)
    return p


def end_group(p: subprocess.Popen, wait_s: float = 30) -> None:
    """SIGKILL the whole group of a start_group process, even when its leader has exited
    (whatever it started may still run), and reap the leader."""
    end_group_id(p.pid)
    try:
        p.wait(timeout=wait_s)
    except subprocess.TimeoutExpired:
        pass


def run_group(cmd, *, timeout: float, capture_output: bool = True, text: bool = True,
              **popen_kw) -> subprocess.CompletedProcess:
    """subprocess.run(cmd, capture_output=True, text=True, timeout=...) for a command that starts
    processes of its own (torchrun's ranks, a shell script's python): it runs in a process
    group of its own, and the whole group is SIGKILLed on a timeout or any exception, and
    after it ends (nothing it started may outlive it). subprocess.run kills only the child."""
    assert capture_output and text, "run_group always captures text"
    p = start_group(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen_kw)
    try:
        out, err = p.communicate(timeout=timeout)
    finally:
        end_group_id(p.pid)
        if p.returncode is None:  # timed out or interrupted: reap it (and close its pipes)
            p.communicate()
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_server(tiny_cfg_kwargs, tmp_path_factory):
    """(demo, url): the web app on the tiny pair, in this process, with its own session root."""
    pytest.importorskip("gradio")
    from c2c_core.frontends.ui import build_app, launch_kwargs, sessions
    saved, sessions.SESSION_ROOT = sessions.SESSION_ROOT, str(tmp_path_factory.mktemp("sessions"))
    # the tiny models are local folders: this server's operator allows server paths
    mp = pytest.MonkeyPatch()
    mp.setenv("C2C_ALLOW_LOCAL_PATHS", "1")
    # a gradio_client job whose stream opens more than the 5 s default after its join is
    # dropped as a client that never came; a loaded test machine can be that slow (the
    # fair-queue tests set their own grace)
    mp.setenv("C2C_CONNECT_GRACE_S", "30")
    demo = build_app(defaults=tiny_cfg_kwargs)
    port = free_port()
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True,
                **launch_kwargs())
    yield demo, f"http://127.0.0.1:{port}/"
    demo.close()
    from c2c_core.frontends import worker
    worker.shutdown()  # the next module's app starts its own worker process
    mp.undo()
    sessions.SESSION_ROOT = saved


# progress a contributor can follow: each file's time, a line a minute from a long test
from progress_plugin import (pytest_configure, pytest_runtest_logfinish,  # noqa: E402,F401
                             pytest_runtest_logstart, pytest_sessionfinish)


@pytest.fixture()
def no_model_load(monkeypatch):
    """Fail the test if any model loads: the error must come before."""
    from c2c_core.models import loading
    monkeypatch.setattr(loading, "load_pipeline", lambda cfg: pytest.fail("models loaded"))


#: The real browser of the browser tests: Debian's chromium (never `playwright install`).
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SHOTS = Path(__file__).resolve().parent.parent / "artifacts" / "screenshots"


@contextlib.contextmanager
def long_generations(page, tokens: int = 300):
    """For a test that stops a job while it runs: the page's generations ignore EOS and make
    `tokens` new tokens until the block ends, so the job outlasts any status update on a fast
    machine (a Stop ends it within one step: it costs nothing). The page's own settings are put
    back after (a module shares one page)."""
    box = "#max-new-tokens input"
    before = page.input_value(box)
    eos = page.get_by_label("ignore EOS", exact=True)
    was = eos.is_checked()
    page.fill(box, str(tokens))
    eos.set_checked(True)
    try:
        yield
    finally:
        page.fill(box, before)
        eos.set_checked(was)


def need_browser():
    """For a browser test module, at import: skip the whole module (saying how to fix it) unless
    chromium, gradio and playwright are here; returns playwright.sync_api."""
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing (install it with `apt-get install -y chromium`);"
                    " the browser test needs it", allow_module_level=True)
    pytest.importorskip("gradio")
    return pytest.importorskip("playwright.sync_api")


OTHER_CORPUS = [c.upper() + " and more words" for c in CORPUS] + ["lowercase text here too"]


def build_other_tokenizer(folder: str):
    """A WordPiece tokenizer unlike the receiver's byte-level BPE: other ids, other specials
    (and no chat template: it reads plain text)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.decoder = decoders.WordPiece()
    special = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
    tk.train_from_iterator(OTHER_CORPUS * 4, trainers.WordPieceTrainer(vocab_size=180,
                                                                       special_tokens=special))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", eos_token="[EOS]",
                                  bos_token="[BOS]", pad_token="[PAD]")
    tok.save_pretrained(folder)
    return tok


@pytest.fixture(scope="session")
def other_sharer(tmp_path_factory):
    """A tiny Qwen3 sharer with its own tokenizer (build_other_tokenizer)."""
    d = str(tmp_path_factory.mktemp("other") / "sharer")
    tok = build_other_tokenizer(d)
    build_model(d, "qwen3", len(tok), tok.eos_token_id, layers=3, seed=5)
    return d


def open_fuser(pipe, seed: int = 1) -> None:
    """The fuser's projectors random (every parameter from one seeded generator, so the same
    weights in any process; a fresh projector is near a copy of its input) with their gates
    open, so the projection changes what the receiver says."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # every parameter from `g`: nothing left to the global RNG's state
        for proj in pipe.fuser.projectors:
            for name, p in proj.named_parameters():
                r = torch.randn(p.shape, generator=g)
                if p.dim() == 2:
                    p.copy_(r * (1.0 / p.shape[1] ** 0.5))
                elif p.dim() == 1:
                    p.copy_(1.0 + 0.1 * r if "norm" in name else 0.1 * r)
            proj.key_gate_logit.fill_(1.0)
            proj.value_gate_logit.fill_(1.0)


def loud_weights(pipe, scale: float = 2.4) -> None:
    """Random weights scaled up (varied greedy tokens instead of one repeated id) in every model
    of a pipeline, and the fuser's gates open with random projectors, so the projection changes
    what the receiver says; tests that compare tokens would prove little otherwise."""
    import torch
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        models = [pipe.receiver] + [sl.model for sl in pipe.sharers]
        for m in {id(m): m for m in models}.values():
            for _, p in m.named_parameters():
                if p.dim() == 2:
                    p.copy_(torch.randn(p.shape, generator=g) * (scale / p.shape[1] ** 0.5))
        for proj in pipe.fuser.projectors:
            proj.key_gate_logit.fill_(1.0)
            proj.value_gate_logit.fill_(1.0)


#: A bare mirror of thu-nics/C2C (the reference) that tests clone when present.
C2C_MIRROR = os.environ.get("C2C_MIRROR", "/work/.mirror/thu-nics+C2C/repo")


@pytest.fixture(scope="session")
def reference_clone(tmp_path_factory):
    """A clone of the reference made from the local mirror; the test is skipped, with the
    reason, where there is none."""
    import shutil
    import subprocess
    if not os.path.isdir(C2C_MIRROR):
        pytest.skip(f"no mirror of thu-nics/C2C at {C2C_MIRROR} (set C2C_MIRROR), so there is no"
                    " reference to run")
    if shutil.which("git") is None:
        pytest.skip("no git to clone the reference mirror")
    dest = str(tmp_path_factory.mktemp("ref") / "C2C")
    r = subprocess.run(["git", "clone", "-q", C2C_MIRROR, dest], capture_output=True, text=True,
                       timeout=120)
    if r.returncode != 0:
        pytest.skip(f"the mirror {C2C_MIRROR} could not be cloned: {r.stderr.strip()[:200]}")
    return dest


@pytest.fixture()
def pipe_cfg(tiny_cfg_kwargs):
    """A fresh tiny pipeline per test (fast engine, compile off, 6 new tokens, EOS ignored):
    each test gets its own engine, counters and cap."""
    from c2c_core.engines import fast
    from c2c_core.models.loading import load_pipeline
    from c2c_core.spec.config import build_run_config
    cfg = build_run_config(**{**tiny_cfg_kwargs, "max_new_tokens": 6}, engine="fast",
                           ignore_eos=True)
    pipe = load_pipeline(cfg)
    return pipe, cfg, fast.engine_for(pipe, compile=False)
