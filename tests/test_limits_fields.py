"""Issue 19 part 4: decode_floor_ms (bytes a decode step reads over the card's bandwidth), its
ratio to the measured step, and NVML energy, in every record; null where unknown (a CPU)."""

from __future__ import annotations

import copy
import sys
import types

import pytest
import torch

from c2c_core.measure import hardware
from c2c_core.engines import floor
from c2c_core.engines.generation import Generation, limit_fields
from c2c_core.io.records import check_record


@pytest.mark.parametrize("name, gbs", [
    ("NVIDIA H200", 4800), ("NVIDIA H100 80GB HBM3", 3350), ("NVIDIA H100 PCIe", 2000),
    ("NVIDIA A100-SXM4-80GB", 2039), ("NVIDIA A100-SXM4-40GB", 1555),
    ("NVIDIA A100 80GB PCIe", 1935), ("NVIDIA L4", 300), ("NVIDIA L40S", 864),
    ("NVIDIA A10G", 600), ("Tesla T4", 320), ("NVIDIA GeForce RTX 4090", 1008),
    ("cpu", None), ("Some Future GPU", None)])
def test_bandwidth_table(name, gbs, monkeypatch):
    monkeypatch.delenv(hardware.BANDWIDTH_ENV, raising=False)
    assert hardware.bandwidth_gbs(name) == gbs


def test_floor_math_on_a_known_card():
    # 1.2 GB of weights + 1,000 positions of 114,688 bytes (Qwen3-0.6B: 28 x 8 x 128 x 2 x 2)
    kv = 28 * 8 * 128 * 2 * 2
    floor = hardware.decode_floor_ms(1_200_000_000, kv, 1000, hardware.bandwidth_gbs("NVIDIA H200"))
    assert floor == pytest.approx((1.2e9 + kv * 1000) / 4.8e12 * 1e3)
    assert floor == pytest.approx(0.27389, rel=1e-4)
    assert hardware.decode_floor_ms(10**9, kv, 10, None) is None


class _Cfg:
    num_hidden_layers, num_attention_heads, num_key_value_heads, head_dim, hidden_size = 2, 4, 2, 16, 64


class _Model(torch.nn.Module):
    def __init__(self, n):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(n, dtype=torch.bfloat16))
        self.config = _Cfg()


def _pipe(device="cuda:0"):
    return types.SimpleNamespace(receiver=_Model(500_000_000), device=torch.device(device),
                                 dtype=torch.bfloat16, sharers=[])


def test_floor_of_a_generation_uses_its_weights_prompt_and_tokens(monkeypatch):
    """A fake 1 GB bf16 receiver on a fake H100 SXM: (weights + KV of P + N/2 positions) / 3.35 TB/s."""
    monkeypatch.delenv(hardware.BANDWIDTH_ENV, raising=False)
    monkeypatch.setattr(hardware, "device_name", lambda d: "NVIDIA H100 80GB HBM3")
    pipe = _pipe()
    g = Generation(list(range(9)), {}, 0, 0, prompt_tokens=17)
    kv = 2 * 2 * 16 * 2 * 2                     # layers x kv heads x head_dim x (k, v) x bf16
    want = (1e9 + kv * (17 + 9 / 2)) / 3.35e12 * 1e3
    assert floor.floor_for(pipe, g) == pytest.approx(want)
    g.kv_context_tokens = 4 * (17 + 4.5)         # a batch of 4: every row's cache is read
    assert floor.floor_for(pipe, g) == pytest.approx((1e9 + kv * 86) / 3.35e12 * 1e3)
    assert floor.floor_for(pipe, Generation([5], {}, 0, 0, 17)) is None  # no decode step


def test_floor_is_null_on_a_cpu_unless_the_bandwidth_is_given(monkeypatch):
    monkeypatch.delenv(hardware.BANDWIDTH_ENV, raising=False)
    g = Generation(list(range(9)), {}, 0, 0, prompt_tokens=17)
    assert floor.floor_for(_pipe("cpu"), g) is None
    monkeypatch.setenv(hardware.BANDWIDTH_ENV, "100")
    assert floor.floor_for(_pipe("cpu"), g) == pytest.approx(
        (1e9 + 256 * 21.5) / 1e11 * 1e3)


def test_energy_is_null_without_nvml_and_read_from_it_on_nvidia(monkeypatch):
    assert hardware.nvml_energy_mj(torch.device("cpu")) is None
    readings = iter([1_000_000, 1_250_500])
    fake = types.SimpleNamespace(nvmlInit=lambda: None, nvmlDeviceGetHandleByIndex=lambda i: "h",
                                 nvmlDeviceGetTotalEnergyConsumption=lambda h: next(readings))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(hardware, "_NVML", {})
    monkeypatch.setattr(torch.cuda, "_get_nvml_device_index", lambda d: 0, raising=False)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d=None: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d=None: 0)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda d=None: 0)
    from c2c_core.measure.memory import DeviceMemory
    m = DeviceMemory(torch.device("cuda:0")).__enter__()
    m.__exit__(None, None, None)
    assert m.energy_j == pytest.approx(250.5)
    # no nvidia-ml-py (or no driver): null, and NVML is not tried again every generation
    monkeypatch.setitem(sys.modules, "pynvml", None)
    monkeypatch.setattr(hardware, "_NVML", {})
    assert hardware.nvml_energy_mj(torch.device("cuda:0")) is None
    assert hardware._NVML == {"ok": False}


def test_limit_fields_from_a_generation():
    g = Generation(list(range(11)), {}, 0, 0, 17, decode_floor_ms=0.25, energy_j=3.0)
    f = limit_fields(g, 2.21)
    assert f == {"decode_floor_ms": 0.25, "decode_floor_ratio": 8.84, "energy_j": 3.0,
                 "joules_per_token": round(3.0 / 11, 6)}
    g.energy_tokens = 44  # a batch of four: the batch's energy over all its tokens
    assert limit_fields(g, 2.21)["joules_per_token"] == round(3.0 / 44, 6)
    assert limit_fields(Generation([1, 2], {}, 0, 0, 5), 1.0) == {
        "decode_floor_ms": None, "decode_floor_ratio": None, "energy_j": None,
        "joules_per_token": None}


@pytest.fixture(scope="module")
def cpu_record(tiny_pipe):
    from c2c_core.engines.generation import run_metadata
    from c2c_core.bench.runner import Item, generate, make_record
    from c2c_core.measure.timing import Timer
    pipe, cfg = tiny_pipe
    g = generate(pipe, cfg, Item(1, "Say hello."), "c2c", Timer(pipe.device))
    return make_record(pipe, Item(1, "Say hello."), "c2c", 0, g, run_metadata(pipe, cfg, "perf_counter"))


def test_cpu_records_carry_null_limits_and_pass_the_check(cpu_record, monkeypatch):
    monkeypatch.delenv(hardware.BANDWIDTH_ENV, raising=False)
    t = cpu_record["timing"]
    for k in ("decode_floor_ms", "decode_floor_ratio", "energy_j", "joules_per_token"):
        assert k in t and t[k] is None, k
    assert check_record(cpu_record) == []


def _with(rec, **timing):
    r = copy.deepcopy(rec)
    r["timing"].update(timing)
    return r


def test_check_record_rejects_negative_or_inconsistent_limits(cpu_record):
    t = cpu_record["timing"]
    avg, n = t["decode_avg_ms"], t["num_generated_tokens"]
    assert avg > 0 and n > 1
    good = _with(cpu_record, decode_floor_ms=avg / 8, decode_floor_ratio=8.0, energy_j=2.0,
                 joules_per_token=round(2.0 / n, 6))
    assert check_record(good) == []
    bad = {
        "negative floor": _with(good, decode_floor_ms=-0.1),
        "negative energy": _with(good, energy_j=-1.0),
        "ratio off": _with(good, decode_floor_ratio=4.0),
        "ratio without floor": _with(good, decode_floor_ms=None),
        "floor without ratio": _with(good, decode_floor_ratio=None),
        "energy per token off": _with(good, joules_per_token=1.0),
        "energy per token alone": _with(good, energy_j=None),
        "not a number": _with(good, energy_j="2 J"),
    }
    for what, rec in bad.items():
        assert check_record(rec), what
    # older records without the fields stay valid
    old = copy.deepcopy(cpu_record)
    for k in ("decode_floor_ms", "decode_floor_ratio", "energy_j", "joules_per_token"):
        del old["timing"][k]
    assert check_record(old) == []


def test_a_cpu_record_with_a_given_bandwidth_has_a_consistent_floor(tiny_pipe, monkeypatch):
    from c2c_core.engines.generation import run_metadata
    from c2c_core.bench.runner import Item, generate, make_record
    from c2c_core.measure.timing import Timer
    monkeypatch.setenv(hardware.BANDWIDTH_ENV, "20")
    pipe, cfg = tiny_pipe
    g = generate(pipe, cfg, Item(1, "Say hello."), "c2c", Timer(pipe.device))
    rec = make_record(pipe, Item(1, "Say hello."), "c2c", 0, g, run_metadata(pipe, cfg, "perf_counter"))
    t = rec["timing"]
    assert t["decode_floor_ms"] > 0 and t["decode_floor_ratio"] > 1
    assert check_record(rec) == []


def test_profile_summary_and_results_summary_show_the_limits(cpu_record):
    pytest.importorskip("gradio")
    from c2c_core.report import analysis
    from c2c_core.frontends.ui.profile_tab import limits_line
    t = {"decode_floor_ms": 0.25, "decode_floor_ratio": 8.84, "energy_j": 3.0,
         "joules_per_token": 0.2727}
    assert limits_line(t) == (" Decode floor 0.2500 ms/token (measured 8.84x it) · energy 3.00 J"
                              " (0.2727 J/token).")
    assert "unknown" in limits_line({"decode_floor_ms": None, "energy_j": None})
    assert limits_line({}) == ""  # an older record: nothing said
    cols = ("decode over floor x p50", "energy per token J/token p50")
    summary = analysis.summarize(analysis.to_frame([cpu_record]))
    assert not set(cols) & set(summary.columns)  # null on a CPU: no empty columns
    known = _with(cpu_record, decode_floor_ms=cpu_record["timing"]["decode_avg_ms"] / 8,
                  decode_floor_ratio=8.0, energy_j=2.0, joules_per_token=0.25)
    summary = analysis.summarize(analysis.to_frame([known]))
    assert summary[cols[0]].tolist() == [8.0] and summary[cols[1]].tolist() == [0.25]
