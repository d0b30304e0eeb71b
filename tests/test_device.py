"""cryoves.device: one place for device and precision choice (prediction and training)."""

from __future__ import annotations

import pytest
import torch

from cryoves import device as dev
from cryoves.errors import ParameterError


def test_auto_precision_table(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(dev, "cpu_supports_bf16", lambda: True)
    monkeypatch.setattr(dev, "cpu_has_amx", lambda: False)
    assert dev.choose_precision("auto", cpu) == "fp32"  # bf16 inference is not faster without AMX
    assert dev.choose_precision("auto", cpu, training=True) == "bf16"
    monkeypatch.setattr(dev, "cpu_has_amx", lambda: True)
    assert dev.choose_precision("auto", cpu) == "bf16"  # 2.5-2.8x faster with AMX tiles
    monkeypatch.setattr(dev, "cpu_supports_bf16", lambda: False)
    assert dev.choose_precision("auto", cpu, training=True) == "fp32"
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert dev.choose_precision("auto", cuda) == "fp16"
    assert dev.choose_precision("auto", cuda, training=True) == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert dev.choose_precision("auto", cuda) == dev.choose_precision("auto", cuda, training=True) == "bf16"


def test_explicit_choices_are_checked():
    cpu = torch.device("cpu")
    assert dev.choose_precision("fp32", cpu) == "fp32"
    with pytest.raises(ParameterError, match="fp16"):
        dev.choose_precision("fp16", cpu)
    with pytest.raises(ParameterError, match="precision"):
        dev.choose_precision("fp8", cpu)
    with pytest.raises(ParameterError, match="device"):
        dev.choose_device("tpu")
    assert dev.choose_device("cpu") == cpu
