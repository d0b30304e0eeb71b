"""Which device and which numeric precision the network runs with: prediction and training.

``choose_device("auto")`` is CUDA when a GPU is visible, else the CPU. ``choose_precision``
resolves ``"auto"`` by one table:

=============  ==========================  ==============================================
device         prediction                  training
=============  ==========================  ==============================================
CUDA           bf16 (fp16 without bf16)    bf16 where supported, else fp32
CPU            bf16 with AMX, else fp32    bf16 where native (AVX512-BF16/AMX), else fp32
=============  ==========================  ==============================================

Prediction on a CPU with AMX tiles (Sapphire Rapids and later) runs in bf16: 2.5–2.8× faster
than fp32 there; maps agree to mask Dice ≥ 0.998 and the vesicle tables up to borderline
objects (docs/benchmarks.md, "Speed"). Without AMX,
bf16 convolutions are not faster than fp32, so fp32 is kept (and maps are reproducible to the
bit). Training takes bf16 wherever the hardware has it (about 2× faster steps on a bf16 CPU)
and never fp16 (no loss scaling).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch

from cryoves.errors import ParameterError

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def choose_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` → CUDA if available, else CPU. Raises ParameterError for unavailable devices."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ParameterError("--device cuda requested but no CUDA GPU is available; use --device cpu")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise ParameterError(f"unknown device '{device}'; use auto, cpu or cuda")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise ParameterError(f"unknown device '{device}'; use auto, cpu or cuda[:N]") from exc


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 kernels (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        pass
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_has_amx() -> bool:
    """True when the CPU has AMX bf16 tiles (where bf16 inference is measured much faster)."""
    try:
        return "amx_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def choose_precision(precision: str, device: torch.device, *, training: bool = False) -> str:
    """Resolve ``"auto"`` by the module's table and check an explicit choice against the device."""
    if precision not in PRECISIONS:
        raise ParameterError(f"unknown precision '{precision}'; use auto, fp32, bf16 or fp16")
    if precision == "auto":
        if device.type == "cuda":
            if torch.cuda.is_bf16_supported():
                return "bf16"
            return "fp32" if training else "fp16"
        if training:
            return "bf16" if cpu_supports_bf16() else "fp32"
        return "bf16" if cpu_has_amx() else "fp32"
    if precision == "fp16" and (device.type == "cpu" or training):
        raise ParameterError("fp16 is for CUDA; use --precision bf16 or fp32 on the CPU" if device.type == "cpu"
                             else "fp16 is for inference only; train with --precision bf16 or fp32")
    if precision == "bf16" and device.type == "cpu" and not cpu_supports_bf16():
        log.warning("this CPU has no native bf16; bf16 will be slow (use fp32)")
    return precision


def autocast(device: torch.device, precision: str):
    """The autocast context of ``precision`` (none for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)
