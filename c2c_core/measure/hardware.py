"""How close to the limit (issue 19 part 4, MEASURE.md "How close to the limit").

- `decode_floor_ms`: the least time one decode step can take on this card: the bytes the step
  must read (the decoding model's weights in their dtype, plus the KV cache so far) over the
  card's memory bandwidth. Per generation it is the mean over its decode steps: the step that
  makes token k+1 (k = 1..N-1) reads P + k cached positions, so on average P + N/2 per row
  (a batch's step reads every row's). Null when the card is not in the table (a CPU, an unknown
  GPU) unless C2C_MEM_BANDWIDTH_GBS names the bandwidth.
- `energy_j`: the device's energy during the generation from NVML's total-energy counter
  (nvmlDeviceGetTotalEnergyConsumption, millijoules since the driver loaded; Volta and newer),
  read at its start and end; null when not an NVIDIA GPU, when nvidia-ml-py is not installed or
  the counter is not supported. A reading, never an estimate.
"""

from __future__ import annotations

import functools
import os
import re
import weakref

#: Peak memory bandwidth in GB/s (1e9 bytes/s) by CUDA device name (torch.cuda.get_device_name),
#: first match wins. Values from NVIDIA's product datasheets / spec pages:
#: H200 SXM and NVL 4.8 TB/s (H200 datasheet); H100 SXM 3.35 TB/s, H100 PCIe 2.0 TB/s, H100 NVL
#: 3.9 TB/s (H100 datasheet); A100 80GB SXM 2,039 GB/s, A100 80GB PCIe 1,935 GB/s, A100 40GB
#: 1,555 GB/s (A100 datasheet); L40S and L40 864 GB/s; L4 300 GB/s; A10 and A10G 600 GB/s (A10
#: datasheet; AWS lists A10G the same); T4 320 GB/s; V100 900 GB/s; GeForce RTX 4090 1,008 GB/s;
#: RTX 3090 936 GB/s; RTX A6000 768 GB/s. Real decode reaches 70-90 % of these at best.
BANDWIDTH_GBS: list[tuple[str, float]] = [
    (r"H200", 4800.0),
    (r"H100.*NVL", 3900.0),
    (r"H100.*PCIe", 2000.0),
    (r"H100", 3350.0),                 # "NVIDIA H100 80GB HBM3" (SXM5)
    (r"A100.*80GB.*PCIe", 1935.0),     # "NVIDIA A100 80GB PCIe"
    (r"A100.*80GB", 2039.0),           # "NVIDIA A100-SXM4-80GB"
    (r"A100", 1555.0),                 # "NVIDIA A100-SXM4-40GB", "NVIDIA A100-PCIE-40GB"
    (r"\bL40S?\b", 864.0),
    (r"\bL4\b", 300.0),
    (r"\bA10G?\b", 600.0),
    (r"\bT4\b", 320.0),
    (r"V100", 900.0),
    (r"RTX 4090", 1008.0),
    (r"RTX 3090", 936.0),
    (r"RTX A6000", 768.0),
]
#: Set to the device's memory bandwidth in GB/s for a card not in the table (or a CPU).
BANDWIDTH_ENV = "C2C_MEM_BANDWIDTH_GBS"


def bandwidth_gbs(device_name: str | None) -> float | None:
    """The memory bandwidth (GB/s) of a device by name: C2C_MEM_BANDWIDTH_GBS when set, else
    the table; None for a CPU or an unknown card."""
    v = os.environ.get(BANDWIDTH_ENV, "").strip()
    if v:
        try:
            return float(v) if float(v) > 0 else None
        except ValueError:
            return None
    if not device_name or device_name == "cpu":
        return None
    for pattern, gbs in BANDWIDTH_GBS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return gbs
    return None


def decode_floor_ms(weight_bytes: int, kv_bytes_per_token: int, context_tokens: float,
                    gbs: float | None) -> float | None:
    """(weights + KV bytes per token x cached positions read) / bandwidth, in ms."""
    if not gbs or gbs <= 0:
        return None
    return (weight_bytes + kv_bytes_per_token * context_tokens) / (gbs * 1e9) * 1e3


_WEIGHTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def weight_bytes(model) -> int:
    """Bytes of a model's parameters in their dtype (tied weights once), cached per model."""
    n = _WEIGHTS.get(model)
    if n is None:
        n = sum(p.numel() * p.element_size()
                for p in {id(p): p for p in model.parameters()}.values())
        _WEIGHTS[model] = n
    return n


@functools.lru_cache(maxsize=8)
def device_name(device) -> str:
    import torch
    if getattr(device, "type", str(device)) == "cuda":
        try:
            return torch.cuda.get_device_name(device)
        except Exception:  # noqa: BLE001
            return "cuda"
    return "cpu"


# --- NVML energy -------------------------------------------------------------------------------

_NVML: dict = {}   # "ok": bool once initialised; handles by NVML index


def _nvml_handle(device):
    """The NVML handle of a torch CUDA device, or None (not NVIDIA, no nvidia-ml-py, no driver)."""
    if _NVML.get("ok") is False:
        return None
    try:
        import pynvml  # nvidia-ml-py
        if "ok" not in _NVML:
            pynvml.nvmlInit()
            _NVML["ok"] = True
        import torch
        try:  # CUDA_VISIBLE_DEVICES reorders: torch's own mapping to the NVML index
            index = torch.cuda._get_nvml_device_index(device)
        except Exception:  # noqa: BLE001
            index = device.index or 0
        if index not in _NVML:
            _NVML[index] = pynvml.nvmlDeviceGetHandleByIndex(index)
        return _NVML[index]
    except Exception:  # noqa: BLE001 - ImportError, NVMLError: energy unknown
        _NVML["ok"] = False
        return None


def nvml_energy_mj(device) -> int | None:
    """NVML's total energy counter (mJ) of a CUDA device now; None when it cannot be read."""
    if getattr(device, "type", None) != "cuda":
        return None
    h = _nvml_handle(device)
    if h is None:
        return None
    try:
        import pynvml
        return int(pynvml.nvmlDeviceGetTotalEnergyConsumption(h))
    except Exception:  # noqa: BLE001 - e.g. NVML_ERROR_NOT_SUPPORTED (pre-Volta)
        return None
