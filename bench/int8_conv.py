"""int8 against bf16 and fp32 for the U-Net's typical layer (3×3×3 convolution + ReLU) on this CPU.

The whole network can gain at most what its convolutions gain, so one layer (the default network's
32 -> 32 channels on a 64³ block, channels-last-3d) bounds what int8 could bring. int8 is PyTorch's
static post-training quantization (FX graph mode, per-engine default qconfig, calibrated on the
input itself), quantize/dequantize at the layer's ends included, as a network would pay them once
per tile. Prints milliseconds per call and ratios in one run.

    python bench/int8_conv.py [--channels 32] [--size 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from torch import nn


def bench(module: nn.Module, x: torch.Tensor, repeats: int) -> float:
    with torch.inference_mode():
        module(x)
        t0 = time.perf_counter()
        for _ in range(repeats):
            module(x)
    return (time.perf_counter() - t0) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--channels", type=int, default=32)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    c, n = args.channels, args.size
    x = torch.randn(1, c, n, n, n).to(memory_format=torch.channels_last_3d)
    layer = nn.Sequential(nn.Conv3d(c, c, 3, padding=1), nn.ReLU()).eval().to(memory_format=torch.channels_last_3d)
    times = {"fp32": bench(layer, x, args.repeats)}
    times["bf16"] = bench(layer.to(torch.bfloat16), x.to(torch.bfloat16), args.repeats)
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    for engine in ("x86", "onednn"):
        if engine not in torch.backends.quantized.supported_engines:
            continue
        torch.backends.quantized.engine = engine
        fresh = nn.Sequential(nn.Conv3d(c, c, 3, padding=1), nn.ReLU()).eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # FX quantization is deprecated in favour of torchao
            prepared = prepare_fx(fresh, get_default_qconfig_mapping(engine), example_inputs=(x,))
            with torch.inference_mode():
                prepared(x)  # calibration
            times[f"int8 ({engine})"] = bench(convert_fx(prepared), x, args.repeats)
    print(f"3x3x3 conv + ReLU, {c} -> {c} channels, {n}^3, {torch.get_num_threads()} threads")
    for name, t in times.items():
        print(f"  {name:14s} {t * 1e3:8.1f} ms   fp32/this {times['fp32'] / t:5.2f}   bf16/this {times['bf16'] / t:5.2f}")


if __name__ == "__main__":
    main()
