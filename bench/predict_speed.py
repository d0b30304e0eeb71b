"""Prediction speed: our tiled predictor vs a naive re-creation of the original CryoVesNet tiling.

Both use the same weights (the CryoVesNet U-Net; random weights if weights.h5 is not available)
on the same normalised volume on the model grid, in one run on this machine:

- baseline: 64³ input tiles, keep the central 24³ (20 voxels of context, zero padding), one
  tile per forward call, plain fp32 network. It is run on a sub-block and its throughput is
  extrapolated (it is a constant per-tile cost).
- ours: :func:`cryoves.predict.predict_array` (large tiles, exact 24-voxel context, cropped
  decoder, BatchNorm folded, channels-last-3d), in fp32 and bf16.

Prints throughputs (Mvoxel/s of model-grid voxels), ratios, achieved GFLOP/s (convolution FLOPs
actually executed) against this machine's measured matmul peak, peak resident memory against
the target (2.5 × float32 input + 1 GiB), and bf16 vs fp32 agreement (max |Δp|, Dice of the
thresholded masks). Usage: python bench/predict_speed.py [--size 256] [--baseline-block 72]
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from cryoves.model import UNet3D, load_model
from cryoves.predict import plan_tiles, predict_array, prepare_network, use_all_cores

REF = Path(__file__).resolve().parents[2] / "shared" / "reference" / "weights.h5"


def volume(n: int, seed: int = 0) -> np.ndarray:
    """Normalised synthetic cryo-ET-like volume with dark vesicle membranes (~19 nm at 22 Å)."""
    rng = np.random.default_rng(seed)
    v = np.zeros((n, n, n), np.float32)
    r = 8.5
    box = np.indices((23, 23, 23), dtype=np.float32) - 11
    for _ in range(int(n**3 / 4000)):
        c = rng.integers(11, n - 12, 3)
        d = np.sqrt(((box - (rng.random(3)[:, None, None, None] - 0.5)) ** 2).sum(0))
        sl = tuple(slice(ci - 11, ci + 12) for ci in c)
        v[sl] -= np.exp(-((d - r) ** 2) / 2.0)
    v = ndimage.gaussian_filter(v, 1.0) + rng.normal(0, 0.7, v.shape).astype(np.float32)
    return (v - v.mean()) / v.std()


def rss() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakRSS:
    def __enter__(self):
        self.peak, self._stop = rss(), False
        self._t = threading.Thread(target=self._watch, daemon=True)
        self._t.start()
        return self

    def _watch(self):
        while not self._stop:
            self.peak = max(self.peak, rss())
            time.sleep(0.005)

    def __exit__(self, *exc):
        self._stop = True
        self._t.join()


def matmul_peak(dtype: torch.dtype, n: int = 2048, seconds: float = 2.0) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    t, k = time.perf_counter(), 0
    while time.perf_counter() - t < seconds:
        a @ b
        k += 1
    return 2 * n**3 * k / (time.perf_counter() - t) / 1e9


class FlopCounter:
    """Counts convolution FLOPs (2·MACs) executed by a module's Conv3d layers."""

    def __init__(self, net: torch.nn.Module):
        self.flops = 0.0
        self._h = [m.register_forward_hook(self._hook) for m in net.modules() if isinstance(m, torch.nn.Conv3d)]

    def _hook(self, mod, inp, out):
        k = mod.weight[0].numel()  # Cin · kz · ky · kx
        self.flops += 2.0 * k * out.numel()

    def close(self):
        for h in self._h:
            h.remove()


def baseline(net: UNet3D, x: np.ndarray) -> tuple[np.ndarray, float]:
    """The original's tiling: pad the end to a multiple of 24 (+24 if already one), 20 zeros all
    round, 64³ windows every 24 voxels, keep the central 24³, one window per forward call."""
    r, c, w = 24, 20, 64
    s = np.array(x.shape)
    padded = np.pad(x, [(c, c + r - si % r) for si in s])
    out = np.zeros(tuple(padded.shape), np.float32)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, s[0], r):
            for j in range(0, s[1], r):
                for k in range(0, s[2], r):
                    tile = torch.from_numpy(np.ascontiguousarray(padded[i : i + w, j : j + w, k : k + w]))
                    p = net(tile[None, None])[0, 0].numpy()
                    out[i : i + r, j : j + r, k : k + r] = p[c : c + r, c : c + r, c : c + r]
    return out[: s[0], : s[1], : s[2]], time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=256, help="cube side of the test volume (model voxels)")
    ap.add_argument("--baseline-block", type=int, default=72, help="sub-block side for the baseline")
    ap.add_argument("--tile", type=int, default=None, help="our tile side (default: automatic)")
    ap.add_argument("--skip-bf16", action="store_true")
    args = ap.parse_args()

    threads = use_all_cores()
    os.environ.setdefault("CRYOVES_CRYOVESNET_WEIGHTS", str(REF))
    try:
        net = load_model("cryovesnet").net
        wname = "CryoVesNet weights.h5"
    except Exception:  # noqa: BLE001 - offline without the weights: same cost with random weights
        net = UNet3D().eval()
        wname = "random weights (weights.h5 unavailable)"
    print(f"torch {torch.__version__}, {threads} threads, {wname}; timings on a shared machine may be contended")
    peak32 = matmul_peak(torch.float32)
    peak16 = matmul_peak(torch.bfloat16)
    print(f"matmul peak: fp32 {peak32:.0f} GFLOP/s, bf16 {peak16:.0f} GFLOP/s")

    n = args.size
    x = volume(n)
    mvox = n**3 / 1e6

    b = min(args.baseline_block, n)
    _, tb = baseline(net, x[:b, :b, :b])
    # The original runs (s // 24 + 1) windows per axis; extrapolate by the number of windows.
    per_tile = tb / (b // 24 + 1) ** 3
    base_secs = per_tile * (n // 24 + 1) ** 3
    base_tp = mvox / base_secs
    print(f"baseline (64³ tile, keep 24³, batch 1): {b}³ block in {tb:.1f} s ({per_tile * 1e3:.0f} ms/window) "
          f"-> extrapolated to {n}³: {base_secs:.0f} s, {base_tp:.3f} Mvoxel/s")

    results = {}
    for prec in ("fp32",) + (() if args.skip_bf16 else ("bf16",)):
        fused = prepare_network(net, torch.device("cpu"), prec)
        predict_array(fused, x[:64, :64, :64], precision=prec, progress=False, prepared=True)  # warm-up
        counter = FlopCounter(fused)
        stats: dict = {}
        before = rss()
        with PeakRSS() as pk:
            t0 = time.perf_counter()
            p = predict_array(fused, x, precision=prec, tile=args.tile, progress=False, prepared=True, stats=stats)
            dt = time.perf_counter() - t0
        counter.close()
        tp = mvox / dt
        gf = counter.flops / dt / 1e9
        peak = peak32 if prec == "fp32" else peak16
        limit = 2.5 * x.nbytes + 2**30
        results[prec] = p
        print(f"ours {prec}: tile {stats['tile']} ×{stats['tiles']}, {dt:.1f} s -> {tp:.2f} Mvoxel/s = "
              f"{tp / base_tp:.1f}× baseline; {gf:.0f} GFLOP/s executed = {100 * gf / peak:.0f}% of matmul peak; "
              f"overhead {counter.flops / (n**3 * net.flops_per_voxel()):.2f}× the FLOPs of one pass")
        print(f"    peak RSS {pk.peak / 2**30:.2f} GiB (before {before / 2**30:.2f}; target ≤ {limit / 2**30:.2f} GiB)")
    if "bf16" in results:
        a, bb = results["fp32"], results["bf16"]
        print(f"bf16 vs fp32: max |Δp| {np.abs(a - bb).max():.4f}, mean {np.abs(a - bb).mean():.2e}")
        for t in (0.5, 0.8, 0.9, 0.95):
            ma, mb = a > t, bb > t
            dice = 2 * (ma & mb).sum() / max(1, ma.sum() + mb.sum())
            print(f"    threshold {t}: Dice {dice:.5f} ({int(ma.sum())} vs {int(mb.sum())} voxels)")
    # seam check of the baseline's 20-voxel context vs our exact tiling, on the baseline block
    xb = x[:b, :b, :b]
    pb, _ = baseline(net, xb) if b <= 72 else (None, 0)
    if pb is not None:
        ours = predict_array(prepare_network(net, torch.device("cpu"), "fp32"), xb, progress=False, prepared=True)
        d = np.abs(pb - ours)
        inner = (slice(24, -24),) * 3
        d_in = d[inner].max() if b > 56 else float("nan")
        print(f"baseline vs ours on the {b}³ block: max |Δp| {d.max():.4f} overall (the original pads the "
              f"volume with zeros, we use the network's own padding at borders), {d_in:.4f} "
              f"≥ 24 voxels from the borders; ours = whole-volume pass ({len(plan_tiles(xb.shape, 152))} tile)")


if __name__ == "__main__":
    main()
