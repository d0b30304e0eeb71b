"""CARE-style 3D U-Net (the CryoVesNet architecture) in PyTorch.

Tensors are (batch, channel, z, y, x). Convention: :meth:`UNet3D.forward_logits` returns logits,
:meth:`UNet3D.forward` returns sigmoid probabilities. Spatial sizes must be divisible by
``2**depth`` (max-pooling).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


class ConvBlock(nn.Sequential):
    """Conv3d(3×3×3, 'same', bias) → BatchNorm (optional) → ReLU → Dropout (if rate > 0)."""

    def __init__(self, c_in: int, c_out: int, batch_norm: bool, dropout: float, bn_eps: float):
        layers: list[nn.Module] = [nn.Conv3d(c_in, c_out, kernel_size=3, padding=1, bias=True)]
        if batch_norm:
            # Keras defaults: eps 1e-3, momentum 0.99 (= 0.01 in PyTorch's convention).
            layers.append(nn.BatchNorm3d(c_out, eps=bn_eps, momentum=0.01))
        layers.append(nn.ReLU(inplace=True))
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        super().__init__(*layers)

    @property
    def conv(self) -> nn.Conv3d:
        return self[0]  # type: ignore[return-value]

    @property
    def bn(self) -> nn.BatchNorm3d | None:
        return self[1] if isinstance(self[1], nn.BatchNorm3d) else None  # type: ignore[return-value]


class UNet3D(nn.Module):
    """The CSBDeep/CARE ``unet_block`` in 3D, no residual, 1×1×1 sigmoid head.

    Level ``i`` of the encoder has ``convs_per_level`` convolutions with ``base_filters·2**i``
    filters; the bottleneck has ``convs_per_level − 1`` convolutions with ``base_filters·2**depth``
    filters and one with ``base_filters·2**(depth−1)``; decoder level ``i`` mirrors it
    (last conv: ``base_filters·2**max(i−1, 0)``). Up-sampling is nearest ×2, followed by
    concatenation ``[upsampled, skip]`` on the channel axis. The defaults are the original
    CryoVesNet network (depth 2, 16/32/64 filters, 2 convolutions per level, 250,641 parameters).

    ``forward`` returns probabilities in [0, 1]; ``forward_logits`` returns logits.
    """

    def __init__(
        self,
        depth: int = 2,
        base_filters: int = 16,
        convs_per_level: int = 2,
        batch_norm: bool = True,
        dropout: float = 0.0,
        bn_eps: float = 1e-3,
        in_channels: int = 1,
    ):
        super().__init__()
        if depth < 1 or base_filters < 1 or convs_per_level < 1:
            raise ValueError("depth, base_filters and convs_per_level must be >= 1")
        self.config = dict(
            depth=depth, base_filters=base_filters, convs_per_level=convs_per_level,
            batch_norm=batch_norm, dropout=dropout, bn_eps=bn_eps, in_channels=in_channels,
        )
        n, b = convs_per_level, base_filters

        def block(c_in: int, c_out: int) -> ConvBlock:
            return ConvBlock(c_in, c_out, batch_norm, dropout, bn_eps)

        self.down = nn.ModuleList()
        c = in_channels
        for i in range(depth):
            convs = []
            for _ in range(n):
                convs.append(block(c, b * 2**i))
                c = b * 2**i
            self.down.append(nn.Sequential(*convs))
        middle = []
        for _ in range(n - 1):
            middle.append(block(c, b * 2**depth))
            c = b * 2**depth
        middle.append(block(c, b * 2 ** max(depth - 1, 0)))
        c = b * 2 ** max(depth - 1, 0)
        self.middle = nn.Sequential(*middle)
        self.up = nn.ModuleList()  # up[0] is the deepest decoder level (depth − 1)
        for i in reversed(range(depth)):
            convs = []
            c = c + b * 2**i  # concatenation with the skip of level i
            for _ in range(n - 1):
                convs.append(block(c, b * 2**i))
                c = b * 2**i
            convs.append(block(c, b * 2 ** max(i - 1, 0)))
            c = b * 2 ** max(i - 1, 0)
            self.up.append(nn.Sequential(*convs))
        self.head = nn.Conv3d(c, 1, kernel_size=1, bias=True)

    @property
    def divisor(self) -> int:
        """Spatial sizes must be multiples of this (2**depth)."""
        return 2 ** self.config["depth"]

    def conv_blocks(self) -> list[ConvBlock]:
        """All 3×3×3 blocks in topological order (the Keras file's layer order)."""
        blocks: list[ConvBlock] = []
        for seq in [*self.down, self.middle, *self.up]:
            blocks.extend(seq)  # type: ignore[arg-type]
        return blocks

    def forward_logits(self, x: torch.Tensor, crop: Sequence[tuple[int, int]] | None = None) -> torch.Tensor:
        """Logits, shape (B, 1, z, y, x), for input (B, C, z, y, x).

        ``crop`` = ((lo, hi) per spatial axis): drop that many output voxels at each end. The
        decoder then only computes what the kept region needs; the result equals the uncropped
        output sliced to the kept region (up to float rounding), at a fraction of the cost.
        """
        if crop is None:
            crop = ((0, 0),) * 3
        n = self.config["convs_per_level"]
        sizes = [tuple(int(s) for s in x.shape[2:])]
        for _ in self.down:
            sizes.append(tuple(s // 2 for s in sizes[-1]))
        # needed output region per decoder level (level 0 = full resolution), and its input region;
        # input regions start and end on even voxels, so the up-sampled lower level fills them exactly
        need = [[(lo, s - hi) for (lo, hi), s in zip(crop, sizes[0], strict=True)]]
        ext = []
        for j in range(len(self.down)):
            e = [(max(0, a - n) // 2 * 2, min(s, -(-(b + n) // 2) * 2)) for (a, b), s in zip(need[j], sizes[j], strict=True)]
            ext.append(e)
            need.append([(a // 2, b // 2) for a, b in e])
        joined = []  # per level: [up-sampled lower level, skip] on the channel axis, filled in two steps
        for j, level in enumerate(self.down):
            x = level(x)
            c_up = self.up[len(self.down) - 1 - j][0].conv.in_channels - x.shape[1]
            buf = torch.empty((x.shape[0], c_up + x.shape[1], *(b - a for a, b in ext[j])), dtype=x.dtype,
                              device=x.device, memory_format=_memory_format(x))
            buf[:, c_up:].copy_(_slice(x, ext[j]))
            joined.append(buf)
            x = F.max_pool3d(x, 2)
        x = self.middle(x)
        x = _slice(x, need[-1])
        for level in self.up:
            j = len(joined) - 1
            buf = joined.pop()
            _upsample2_into(x, buf[:, : x.shape[1]])
            del x
            x = level(buf)
            del buf
            x = _slice(x, [(a - ea, b - ea) for (a, b), (ea, _) in zip(need[j], ext[j], strict=True)])
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Probabilities in [0, 1], shape (B, 1, z, y, x)."""
        return torch.sigmoid(self.forward_logits(x))

    def n_parameters(self, include_buffers: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if include_buffers:
            n += sum(b.numel() for name, b in self.named_buffers() if "num_batches" not in name)
        return n

    def flops_per_voxel(self) -> float:
        """Multiply-adds ×2 per input voxel of one forward pass (for GFLOP/s reports)."""
        total = 0.0
        depth = self.config["depth"]
        scales = {}
        for i, level in enumerate(self.down):
            scales[id(level)] = 8.0**-i
        scales[id(self.middle)] = 8.0**-depth
        for j, level in enumerate(self.up):
            scales[id(level)] = 8.0 ** -(depth - 1 - j)
        for seq in [*self.down, self.middle, *self.up]:
            for blk in seq:
                w = blk.conv.weight
                total += 2.0 * w.numel() * scales[id(seq)]
        total += 2.0 * self.head.weight.numel()
        return total


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last_3d if x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous() \
        else torch.contiguous_format


def _upsample2_into(x: torch.Tensor, out: torch.Tensor) -> None:
    """Nearest ×2 up-sampling of ``x`` (B, C, z, y, x) written into ``out`` (B, C, 2z, 2y, 2x), which
    may be a view: no temporary."""
    b, c, z, y, w = x.shape
    view = out.unflatten(4, (w, 2)).unflatten(3, (y, 2)).unflatten(2, (z, 2))
    view.copy_(x[:, :, :, None, :, None, :, None].expand(view.shape))


def _slice(x: torch.Tensor, region: Sequence[tuple[int, int]]) -> torch.Tensor:
    (z0, z1), (y0, y1), (x0, x1) = region
    if (z0, y0, x0) == (0, 0, 0) and (z1, y1, x1) == tuple(x.shape[2:]):
        return x
    return x[:, :, z0:z1, y0:y1, x0:x1]


def fused_inference_copy(net: UNet3D) -> UNet3D:
    """A copy of ``net`` in eval mode with every BatchNorm folded into its convolution.

    Numerically equal to ``net.eval()`` up to float rounding; saves one pass over each
    activation tensor at inference.
    """
    import copy

    fused = copy.deepcopy(net).eval()
    for blk in fused.conv_blocks():
        bn = blk.bn
        if bn is None:
            continue
        conv = blk.conv
        with torch.no_grad():
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            conv.weight.mul_(scale.view(-1, 1, 1, 1, 1))
            conv.bias.copy_((conv.bias - bn.running_mean) * scale + bn.bias)
        blk[1] = nn.Identity()
    return fused


class _ConvReLU(nn.Conv3d):
    """A 3×3×3 convolution with its ReLU in one oneDNN call (no pass over the output for the
    ReLU); the same numbers as ``relu(conv(x))``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._convolution_pointwise(
            x, self.weight, self.bias, list(self.padding), list(self.stride), list(self.dilation), self.groups,
            "relu", [], "",
        )


def _conv_relu_like(conv: nn.Conv3d) -> _ConvReLU:
    """A :class:`_ConvReLU` with ``conv``'s weights, device, dtype and (channels-last) memory format."""
    f = _ConvReLU(conv.in_channels, conv.out_channels, conv.kernel_size, padding=conv.padding)
    f = f.to(conv.weight.device, conv.weight.dtype).to(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        f.weight.copy_(conv.weight)
        f.bias.copy_(conv.bias)
    return f


def fuse_conv_relu(net: UNet3D) -> UNet3D:
    """``net`` (from :func:`fused_inference_copy`, on the CPU) with each convolution and its ReLU
    fused into one oneDNN call, in place; unchanged where this torch build cannot (no oneDNN, or
    the fused call fails or differs on a small input of the net's dtype and memory format)."""
    blocks = [b for b in net.conv_blocks() if isinstance(b[1], nn.Identity) and len(b) == 3]
    if not blocks or not torch.backends.mkldnn.is_available():
        return net
    conv = blocks[0].conv
    probe = torch.linspace(-1, 1, conv.in_channels * 6**3).reshape(1, conv.in_channels, 6, 6, 6)
    probe = probe.to(conv.weight.dtype).contiguous(memory_format=torch.channels_last_3d)
    try:
        with torch.inference_mode():
            ok = torch.equal(_conv_relu_like(conv)(probe), F.relu(conv(probe)))
    except (RuntimeError, AttributeError, NotImplementedError):
        ok = False
    if not ok:
        return net
    for blk in blocks:
        blk[0] = _conv_relu_like(blk.conv)
        blk[2] = nn.Identity()
    return net


def architecture_kwargs(arch: dict[str, Any]) -> dict[str, Any]:
    """Keep only the keys :class:`UNet3D` accepts (metadata may carry more)."""
    keys = ("depth", "base_filters", "convs_per_level", "batch_norm", "dropout", "bn_eps", "in_channels")
    return {k: arch[k] for k in keys if k in arch}
