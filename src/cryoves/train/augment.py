"""Patch augmentations that respect the missing wedge.

The missing wedge makes z (the beam axis) special: objects are elongated along z and their caps
fade. So z is never rotated into x/y; only flips (on any axis: the wedge is symmetric), rot90 in
the (y, x) plane and *isotropic* zooms are used as geometric transforms, plus intensity scale and
shift, gamma, Gaussian noise and Gaussian blur. All work on batches of torch tensors shaped
(B, 1, z, y, x) and draw from one ``torch.Generator`` so that a seed reproduces a run.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from cryoves.train.config import AugmentConfig


def _uniform(g: torch.Generator, n: int, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def augment_batch(
    image: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor,
    cfg: AugmentConfig,
    g: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Augment a batch; returns new ``(image, target, weight)`` tensors of the same shape.

    ``image`` is the normalised tomogram patch (dense = dark), ``target`` the 0/1 vesicle mask,
    ``weight`` the 0/1 loss mask (0 = ignore). Geometric transforms move all three together;
    intensity transforms touch the image only.
    """
    image, target, weight = image.clone(), target.clone(), weight.clone()
    b = image.shape[0]
    if cfg.flip or cfg.rot90:
        image, target, weight = _flip_rot(image, target, weight, cfg, g)
    lo, hi = cfg.scale_range
    if hi > lo or lo != 1.0:
        image, target, weight = _zoom(image, target, weight, cfg, g)
    p = torch.rand(b, 4, generator=g) < cfg.p
    if cfg.intensity > 0:
        scale = torch.where(p[:, 0], _uniform(g, b, 1 - cfg.intensity, 1 + cfg.intensity), torch.ones(b))
        shift = torch.where(p[:, 0], _uniform(g, b, -cfg.intensity, cfg.intensity), torch.zeros(b))
        image = image * scale.view(b, 1, 1, 1, 1) + shift.view(b, 1, 1, 1, 1)
    glo, ghi = cfg.gamma_range
    if ghi > glo or glo != 1.0:
        gamma = torch.exp(_uniform(g, b, math.log(glo), math.log(ghi)))
        for i in torch.nonzero(p[:, 1]).flatten().tolist():
            image[i] = _gamma(image[i], float(gamma[i]))
    if cfg.blur_sigma > 0:
        sig = _uniform(g, b, 0.3, cfg.blur_sigma)
        for i in torch.nonzero(p[:, 2]).flatten().tolist():
            image[i] = gaussian_blur(image[i : i + 1], float(sig[i]))[0]
    if cfg.noise_sd > 0:
        sd = torch.where(p[:, 3], _uniform(g, b, 0.0, cfg.noise_sd), torch.zeros(b))
        image = image + sd.view(b, 1, 1, 1, 1) * torch.randn(image.shape, generator=g)
    return image, target, weight


def _flip_rot(image, target, weight, cfg: AugmentConfig, g: torch.Generator):
    b = image.shape[0]
    flips = torch.rand(b, 3, generator=g) < 0.5
    ks = torch.randint(0, 4, (b,), generator=g)
    square = image.shape[-1] == image.shape[-2]
    outs = ([], [], [])
    for i in range(b):
        axes = [a + 1 for a in range(3) if cfg.flip and bool(flips[i, a])]  # dims of a (1, z, y, x) sample
        k = int(ks[i]) if (cfg.rot90 and square) else 0
        for o, t in zip(outs, (image[i], target[i], weight[i]), strict=True):
            if axes:
                t = torch.flip(t, axes)
            if k:
                t = torch.rot90(t, k, dims=(2, 3))  # the (y, x) plane only: z stays the beam axis
            o.append(t)
    return tuple(torch.stack(o) for o in outs)


def _zoom(image, target, weight, cfg: AugmentConfig, g: torch.Generator):
    """Isotropic zoom about the patch centre (s > 1 magnifies); reflection at the borders."""
    b = image.shape[0]
    lo, hi = cfg.scale_range
    use = torch.rand(b, generator=g) < cfg.p
    s = torch.exp(_uniform(g, b, math.log(lo), math.log(hi)))
    idx = torch.nonzero(use).flatten()
    if len(idx) == 0:
        return image, target, weight
    theta = torch.zeros(len(idx), 3, 4)
    for j in range(3):
        theta[:, j, j] = 1.0 / s[idx]
    grid = F.affine_grid(theta, list(image[idx].shape), align_corners=False)
    kw = dict(padding_mode="reflection", align_corners=False)
    image[idx] = F.grid_sample(image[idx], grid, mode="bilinear", **kw)
    target[idx] = (F.grid_sample(target[idx], grid, mode="bilinear", **kw) > 0.5).to(target.dtype)
    weight[idx] = F.grid_sample(weight[idx], grid, mode="nearest", **kw)
    return image, target, weight


def _gamma(x: torch.Tensor, gamma: float) -> torch.Tensor:
    """Gamma on the patch rescaled to [0, 1], mapped back to the original range."""
    lo, hi = x.min(), x.max()
    span = torch.clamp(hi - lo, min=1e-6)
    return ((x - lo) / span) ** gamma * span + lo


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur (σ in voxels, same on z, y, x) of a (B, 1, z, y, x) tensor."""
    r = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-r, r + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    for dim in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + dim] = len(k)
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - dim)] = pad[2 * (2 - dim) + 1] = r
        x = F.conv3d(F.pad(x, pad, mode="replicate"), k.view(shape))
    return x
