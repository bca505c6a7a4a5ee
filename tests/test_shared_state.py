"""The models are the server's, shared by every session: a new tab shows the pair held now, a
run that needs another pair says so before it starts, and a client leaving mid-Profile ends
its job quietly (no traceback from files written into its removed folder)."""

from __future__ import annotations

import shutil
import threading

import pytest

pytest.importorskip("gradio")

from c2c_core.measure import cancel  # noqa: E402
from c2c_core.frontends import worker
from c2c_core.spec.config import build_run_config  # noqa: E402
from c2c_core.frontends.ui import model_panel, runcfg  # noqa: E402


def test_a_run_on_another_pair_says_what_it_replaces(monkeypatch):
    held = build_run_config("smollm2-demo", device="cpu")
    monkeypatch.setattr(runcfg, "held_models", lambda: held)
    other = build_run_config("smollm2+gemma3-demo", device="cpu")
    note = runcfg.swap_note(other)
    assert note == ("This run will load smollm2+gemma3-demo (smollm2 ← gemma3) in place of"
                    " smollm2-demo (smollm2 ← smollm2), which every session of this server"
                    " shares.")
    # the same pair, another spelling of the device: nothing is replaced
    assert runcfg.swap_note(build_run_config("smollm2-demo", device="cpu:1")) is None
    monkeypatch.setattr(runcfg, "held_models", lambda: None)
    assert runcfg.swap_note(other) is None  # nothing loaded yet: nothing replaced


def test_a_new_tab_shows_the_pair_the_server_holds(monkeypatch):
    held = build_run_config("smollm2+gemma3-demo", device="cpu", dtype="float32")
    monkeypatch.setattr(runcfg, "held_models", lambda: held)
    preset, receiver, sharer, fuser, device, dtype = model_panel.held_settings()
    assert preset["value"] == "smollm2+gemma3-demo" and (receiver, sharer, fuser) == ("", "", "")
    assert (device, dtype) == ("cpu", "float32")
    by_hand = build_run_config(base_model="dummy:qwen3-0.6b", teacher_model="smollm2, smollm2",
                               device="cpu")
    monkeypatch.setattr(runcfg, "held_models", lambda: by_hand)
    _, receiver, sharer, fuser, _, _ = model_panel.held_settings()
    assert (receiver, sharer, fuser) == ("dummy:qwen3-0.6b", "smollm2, smollm2", "untrained")


def test_fixed_models_never_swap_whatever_the_device_spelling(monkeypatch):
    from c2c_core.spec.errors import UserError
    from c2c_core.frontends.manager import ModelManager
    m = ModelManager()
    m.fix(build_run_config("smollm2-demo", device="cpu"))
    m.check_allowed(build_run_config("smollm2-demo", device="cpu:0"))
    with pytest.raises(UserError, match="fixed by its operator"):
        m.check_allowed(build_run_config("smollm2+gemma3-demo", device="cpu"))


def test_a_client_leaving_mid_profile_ends_the_job_without_a_traceback(tiny_cfg_kwargs,
                                                                        tmp_path, capfd):
    from c2c_core.bench.profiling import profile_paths
    from c2c_core.io.prompts import resolve_prompts
    cfg = build_run_config(**{**tiny_cfg_kwargs, "max_new_tokens": 400, "ignore_eos": True})
    folder = tmp_path / "session"
    folder.mkdir()
    paths = profile_paths(str(folder / "profile.jsonl"), gz=True)
    stop = threading.Event()
    phases = []

    def on_message(msg):
        if msg[0] == "phase":
            phases.append(msg[2])
            if msg[2] == "timed run":  # the tab closes: the folder goes, the job is stopped
                shutil.rmtree(folder)
                stop.set()

    w = worker.WorkerClient("cpu")
    try:
        with pytest.raises(cancel.Cancelled):
            w.call("profile", {"cfg": cfg, "item": resolve_prompts(prompt="Hi")[0],
                               "paths": paths, "count_tokens": False},
                   should_stop=stop.is_set, on_message=on_message)
        assert "timed run" in phases and not folder.exists()
        assert w.alive()  # the worker is ready for the next job
    finally:
        w.close()
    err = capfd.readouterr().err
    assert "Traceback" not in err and "FileNotFoundError" not in err, err
