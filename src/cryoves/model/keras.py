"""Import Keras 2 HDF5 weights of a CARE-style 3D U-Net with h5py only (no TensorFlow).

Layout conversions: conv kernel (kz, ky, kx, C_in, C_out) → (C_out, C_in, kz, ky, kx); BatchNorm
gamma/beta/moving_mean/moving_variance → weight/bias/running_mean/running_var (ε = 1e-3).
Layers are matched by their CSBDeep names (``down_level_i_no_j``, ``middle_k``,
``up_level_i_no_k``, ``conv3d``); files with other names but the same architecture are matched by
layer order.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cryoves.errors import ModelError
from cryoves.model.unet import UNet3D

log = logging.getLogger(__name__)


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _read_layers(path: Path) -> list[tuple[str, dict[str, np.ndarray]]]:
    """(layer name, {variable: array}) for every layer with weights, in file order."""
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise ModelError(f"{path} is not a readable HDF5/Keras weight file: {exc}") from exc
    with f:
        root = f["model_weights"] if "model_weights" in f else f
        if "layer_names" not in root.attrs:
            raise ModelError(f"{path} has no Keras 'layer_names'; is it a Keras .h5 weight file?")
        layers = []
        for lname in (_s(n) for n in root.attrs["layer_names"]):
            group = root[lname]
            names = [_s(n) for n in group.attrs.get("weight_names", [])]
            if not names:
                continue
            weights = {}
            for wn in names:
                var = wn.split("/")[-1].split(":")[0]
                ds = group[wn] if wn in group else root[wn] if wn in root else None
                if ds is None:
                    raise ModelError(f"{path}: weight '{wn}' of layer '{lname}' is missing")
                weights[var] = np.asarray(ds, dtype=np.float32)
            layers.append((lname, weights))
    return layers


def infer_architecture(layers: list[tuple[str, dict[str, np.ndarray]]]) -> dict[str, Any]:
    """Depth, base filters and convs per level from the kernel shapes (names not needed)."""
    kernels = [w["kernel"] for _, w in layers if "kernel" in w]
    k3 = [k for k in kernels if k.shape[:3] == (3, 3, 3)]
    if not k3 or len(kernels) != len(k3) + 1:
        raise ModelError("Keras file does not look like a 3D U-Net (expected 3×3×3 convs and a 1×1×1 head)")
    base = int(k3[0].shape[-1])
    n = 0
    while n < len(k3) and k3[n].shape[-1] == base:
        n += 1
    if len(k3) % n or (len(k3) // n) % 2 == 0:
        raise ModelError(f"cannot infer the U-Net layout from {len(k3)} 3×3×3 convolutions")
    depth = (len(k3) // n - 1) // 2
    has_bn = any("gamma" in w or "moving_mean" in w for _, w in layers)
    return dict(depth=depth, base_filters=base, convs_per_level=n, batch_norm=has_bn, bn_eps=1e-3,
                in_channels=int(k3[0].shape[3]))


def _expected_conv_names(depth: int, n: int) -> list[str]:
    names = [f"down_level_{i}_no_{j}" for i in range(depth) for j in range(n)]
    names += [f"middle_{k}" for k in range(n - 1)] + [f"middle_{n}"]
    for i in reversed(range(depth)):
        names += [f"up_level_{i}_no_{k}" for k in range(n - 1)] + [f"up_level_{i}_no_{n}"]
    return names


def _pair_layers(layers: list[tuple[str, dict[str, np.ndarray]]], arch: dict[str, Any]):
    """[(conv weights, bn weights or None)] in topological order, plus the head's weights."""
    names = [n for n, _ in layers]
    expected = _expected_conv_names(arch["depth"], arch["convs_per_level"])
    order: list[int]
    if all(e in names for e in expected):
        order = [names.index(e) for e in expected]
        how = "name"
    else:
        order = [i for i, (_, w) in enumerate(layers) if "kernel" in w and w["kernel"].shape[:3] == (3, 3, 3)]
        how = "order"
    head_idx = [i for i, (_, w) in enumerate(layers) if "kernel" in w and w["kernel"].shape[:3] == (1, 1, 1)]
    if len(head_idx) != 1:
        raise ModelError("Keras file must hold exactly one 1×1×1 output convolution")
    pairs = []
    for i in order:
        bn = None
        if arch["batch_norm"]:
            # the BatchNorm of a conv is the next layer in file order that has BN statistics
            nxt = i + 1
            if nxt < len(layers) and "gamma" in layers[nxt][1]:
                bn = layers[nxt][1]
            else:
                raise ModelError(f"no BatchNorm layer follows '{layers[i][0]}' in the Keras file")
        pairs.append((layers[i][1], bn))
    log.debug("Keras layers matched by %s", how)
    return pairs, layers[head_idx[0]][1], how


def load_keras_h5(path: str | Path, dropout: float = 0.0) -> tuple[UNet3D, dict[str, Any]]:
    """Build a :class:`UNet3D` from a Keras 2 ``.h5`` file; returns (net in eval mode, architecture).

    The architecture is inferred from the kernel shapes; layers are matched by name, else by order.
    """
    path = Path(path)
    layers = _read_layers(path)
    arch = infer_architecture(layers)
    net = UNet3D(**arch, dropout=dropout)
    pairs, head, how = _pair_layers(layers, arch)
    blocks = net.conv_blocks()
    if len(blocks) != len(pairs):
        raise ModelError(f"{path}: {len(pairs)} convolutions in the file, {len(blocks)} in the network")
    with torch.no_grad():
        for blk, (cw, bw) in zip(blocks, pairs, strict=True):
            _copy(blk.conv.weight, torch.from_numpy(cw["kernel"]).permute(4, 3, 0, 1, 2), path)
            _copy(blk.conv.bias, torch.from_numpy(cw["bias"]), path)
            if bw is not None and blk.bn is not None:
                _copy(blk.bn.weight, torch.from_numpy(bw.get("gamma", np.ones_like(bw["moving_mean"]))), path)
                _copy(blk.bn.bias, torch.from_numpy(bw.get("beta", np.zeros_like(bw["moving_mean"]))), path)
                _copy(blk.bn.running_mean, torch.from_numpy(bw["moving_mean"]), path)
                _copy(blk.bn.running_var, torch.from_numpy(bw["moving_variance"]), path)
        _copy(net.head.weight, torch.from_numpy(head["kernel"]).permute(4, 3, 0, 1, 2), path)
        _copy(net.head.bias, torch.from_numpy(head["bias"]), path)
    arch["matched_by"] = how
    return net.eval(), arch


def _copy(dst: torch.Tensor, src: torch.Tensor, path: Path) -> None:
    if tuple(dst.shape) != tuple(src.shape):
        raise ModelError(f"{path}: weight shape {tuple(src.shape)} does not fit {tuple(dst.shape)}")
    dst.copy_(src)
