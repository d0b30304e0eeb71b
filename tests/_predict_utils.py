"""Helpers for the model / preprocess / predict tests: random nets, synthetic volumes, Keras files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from cryoves.model import LoadedModel, ModelInfo, UNet3D

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
WEIGHTS_H5 = REFERENCE / "weights.h5"
PARITY_NPZ = REFERENCE / "cryovesnet-keras-reference.npz"
HIV_TIF = REFERENCE / "hiv-vlp" / "tomo.tif"


def random_net(seed: int = 0, **kwargs) -> UNet3D:
    """A UNet3D with random weights and random (non-trivial) BatchNorm statistics, eval mode."""
    torch.manual_seed(seed)
    net = UNet3D(**kwargs)
    with torch.no_grad():
        for blk in net.conv_blocks():
            if blk.bn is not None:
                c = blk.bn.num_features
                blk.bn.weight.uniform_(0.5, 1.5)
                blk.bn.bias.uniform_(-0.2, 0.2)
                blk.bn.running_mean.uniform_(-0.1, 0.1)
                blk.bn.running_var.uniform_(0.5, 2.0)
                assert blk.bn.running_var.shape == (c,)
    return net.eval()


def random_model(seed: int = 0, voxel_size_a: float = 22.0, **arch) -> LoadedModel:
    """A random network with metadata; ``arch`` overrides the UNet3D defaults (e.g. a tiny net)."""
    net = random_net(seed, **arch)
    info = ModelInfo(name=f"random-{seed}", architecture=dict(net.config), voxel_size_a=voxel_size_a,
                     prefilter_sigma=0.0)
    return LoadedModel(net=net, info=info)


def vesicle_volume(shape=(48, 56, 64), n=6, seed=0, noise=0.5, dark=True) -> np.ndarray:
    """Random thin spherical shells (dense = dark by default) plus Gaussian noise, float32."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(shape, dtype=np.float32)
    v = np.zeros(shape, np.float32)
    for _ in range(n):
        c = [rng.uniform(8, s - 8) for s in shape]
        r = rng.uniform(4, 7)
        d = np.sqrt((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2)
        v -= np.exp(-((d - r) ** 2) / 2)
    v = ndimage.gaussian_filter(v, 1.0) + rng.normal(0, noise, shape).astype(np.float32)
    return v if dark else -v


def write_keras_h5(net: UNet3D, path: Path, rename: bool = False) -> None:
    """Write ``net`` in the Keras 2 HDF5 layout (kernels (kz, ky, kx, Cin, Cout)).

    ``rename`` uses non-CSBDeep layer names, so only the by-order fallback can match them.
    """
    import h5py

    from cryoves.model.keras import _expected_conv_names

    cfg = net.config
    names = _expected_conv_names(cfg["depth"], cfg["convs_per_level"])
    if rename:
        names = [f"conv3d_{i + 10}" for i in range(len(names))]
    layers: list[tuple[str, dict[str, np.ndarray]]] = [("input_1", {})]
    for i, (blk, name) in enumerate(zip(net.conv_blocks(), names, strict=True)):
        layers.append((name, {
            "kernel": blk.conv.weight.detach().numpy().transpose(2, 3, 4, 1, 0),
            "bias": blk.conv.bias.detach().numpy(),
        }))
        if blk.bn is not None:
            layers.append((f"batch_normalization_{i + 40}", {
                "gamma": blk.bn.weight.detach().numpy(), "beta": blk.bn.bias.detach().numpy(),
                "moving_mean": blk.bn.running_mean.numpy(), "moving_variance": blk.bn.running_var.numpy(),
            }))
        layers.append((f"activation_{i}", {}))
    layers.append(("conv3d_out" if rename else "conv3d", {
        "kernel": net.head.weight.detach().numpy().transpose(2, 3, 4, 1, 0),
        "bias": net.head.bias.detach().numpy(),
    }))
    with h5py.File(path, "w") as f:
        mw = f.create_group("model_weights")
        mw.attrs["layer_names"] = np.array([n.encode() for n, _ in layers])
        for lname, ws in layers:
            g = mw.create_group(lname)
            wnames = [f"{lname}_7/{k}:0".encode() for k in ws]
            g.attrs["weight_names"] = np.array(wnames)
            for k, arr in ws.items():
                g.create_dataset(f"{lname}_7/{k}:0", data=np.asarray(arr, np.float32))
