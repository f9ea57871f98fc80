"""S3D-G (Xie et al., ECCV 2018, "Rethinking Spatiotemporal Feature Learning").

D3D uses the same network twice: a flow teacher (``in_channels=2``) and an RGB
student (``in_channels=3``), so both are built from this one definition.

Layout (Inception-v1 / I3D with every 3x3x3 conv made separable into a 1x3x3
spatial conv followed by a 3x1x1 temporal conv, each conv + BatchNorm + ReLU)::

    conv_1a   1x7x7 s(1,2,2) + 7x1x1 s(2,1,1), 64
    pool_2a   max 1x3x3 s(1,2,2)
    conv_2b   1x1x1, 64
    conv_2c   1x3x3 + 3x1x1, 192                 (gated)
    pool_3a   max 1x3x3 s(1,2,2)
    mixed_3b, mixed_3c                           (each branch gated)
    pool_4a   max 3x3x3 s2
    mixed_4b .. mixed_4f                         (each branch gated)
    pool_5a   max 2x2x2 s2
    mixed_5b, mixed_5c                           (each branch gated)
    global average pool, dropout, 1x1x1 conv classifier with bias

Pooling pads so that every strided stage yields ceil(size / stride), like
TensorFlow's "SAME": 64x224x224 ends at 8x7x7 and 16x56x56 at 2x2x2. Every
max-pool is computed as a spatial then a temporal pass (`MaxPool3d`): the same
values, cheaper kernels on the GPU.

Where S3D-G gates (as in tensorflow/models ``research/slim/nets/s3dg.py``
with its default ``gating_startat='Conv2d_2c_3x3'``): once on the output of
conv_2c, then in every Inception block on the output of each of the four
branches (after the branch's last conv, before the concatenation). The gate is
``x * sigmoid(W @ mean_thw(x) + b)`` with ``W`` of shape C x C. The slim code
builds that 1x1x1 conv without a bias; the bias here follows the paper's
formula. The gating layers therefore add::

    sum over gated layers of (C * C + C),
    C in [c_2c] + [b0, b1_out, b2_out, b3 for each of the 9 blocks]

which at width 1.0 is 192 plus the four branch outputs of Mixed_3b..5c
(1,225,008 for the 37 layers). Without gating and with 400 RGB classes the
network has exactly 8,320,048 parameters, the count torchvision lists for S3D.

Width multiplier: every channel count c becomes ``8 * floor(c * width / 8 +
0.5)``, at least 8 (nearest multiple of 8, ties up), so that narrow models stay
vector-friendly. All Inception-v1 widths are multiples of 8, so ``width=1.0``
reproduces the standard layout exactly.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

BN_EPS = 1e-3

# Inception-v1 branch widths: (b0, b1_reduce, b1_out, b2_reduce, b2_out, b3).
INCEPTION_WIDTHS: dict[str, tuple[int, int, int, int, int, int]] = {
    "mixed_3b": (64, 96, 128, 16, 32, 32),
    "mixed_3c": (128, 128, 192, 32, 96, 64),
    "mixed_4b": (192, 96, 208, 16, 48, 64),
    "mixed_4c": (160, 112, 224, 24, 64, 64),
    "mixed_4d": (128, 128, 256, 24, 64, 64),
    "mixed_4e": (112, 144, 288, 32, 64, 64),
    "mixed_4f": (256, 160, 320, 32, 128, 128),
    "mixed_5b": (256, 160, 320, 32, 128, 128),
    "mixed_5c": (384, 192, 384, 48, 128, 128),
}


def scaled_channels(channels: int, width: float) -> int:
    """Channel count under the width multiplier (see module docstring)."""
    return max(8, 8 * math.floor(channels * width / 8 + 0.5))


class ConvBNReLU(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int, kernel, stride=1, padding=0):
        super().__init__(
            nn.Conv3d(in_ch, out_ch, kernel, stride=stride, padding=padding, bias=False),
            nn.BatchNorm3d(out_ch, eps=BN_EPS),
            nn.ReLU(inplace=True),
        )


class SepConv(nn.Sequential):
    """k x k x k conv factorised into 1 x k x k (space) then k x 1 x 1 (time)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1):
        pad = kernel // 2
        super().__init__(
            ConvBNReLU(in_ch, out_ch, (1, kernel, kernel), (1, stride, stride), (0, pad, pad)),
            ConvBNReLU(out_ch, out_ch, (kernel, 1, 1), (stride, 1, 1), (pad, 0, 0)),
        )


class MaxPool3d(nn.MaxPool3d):
    """`nn.MaxPool3d`'s values, computed as a 1 x k x k spatial pass then a k x 1 x 1 temporal one, each a 2-D pool
    on a view of the channels-last clip. The max over a box is the max over time of the max over space, with the
    same padding and ceil rules per axis. On CUDA the 3-D pool's backward scatters gradients with atomic adds, and
    3-D max-pooling took a quarter of the teacher's bf16 step on an H100 (BENCHMARKS); the channels-last 2-D kernels
    gather instead. Dilation and returned indices are not supported."""

    def __init__(self, kernel_size, stride, padding=0, ceil_mode: bool = False):
        super().__init__(kernel_size, stride, padding, ceil_mode=ceil_mode)
        self.kernel_size, self.stride, self.padding = (
            (value,) * 3 if isinstance(value, int) else tuple(value) for value in (kernel_size, stride, padding))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (kt, kh, kw), (st, sh, sw), (pt, ph, pw) = self.kernel_size, self.stride, self.padding
        n, c, t, h, w = x.shape
        frames = x.transpose(1, 2).reshape(n * t, c, h, w)  # a view when x is channels-last
        frames = F.max_pool2d(frames, (kh, kw), (sh, sw), (ph, pw), ceil_mode=self.ceil_mode)
        x = frames.unflatten(0, (n, t)).transpose(1, 2)
        if (kt, st, pt) == (1, 1, 0):
            return x
        h, w = x.shape[-2:]
        return F.max_pool2d(x.flatten(3), (kt, 1), (st, 1), (pt, 0), ceil_mode=self.ceil_mode).unflatten(3, (h, w))


class SelfGating(nn.Module):
    """S3D-G feature gating: channels reweighted by a function of their clip-wide mean."""

    def __init__(self, channels: int):
        super().__init__()
        self.fc = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.fc(x.mean(dim=(2, 3, 4))))
        return x * gate[:, :, None, None, None]


def _gate(channels: int, gating: bool) -> nn.Module:
    return SelfGating(channels) if gating else nn.Identity()


class Inception(nn.Module):
    def __init__(self, in_ch: int, widths: tuple[int, ...], gating: bool):
        super().__init__()
        b0, b1a, b1, b2a, b2, b3 = widths
        self.branch0 = nn.Sequential(ConvBNReLU(in_ch, b0, 1), _gate(b0, gating))
        self.branch1 = nn.Sequential(
            ConvBNReLU(in_ch, b1a, 1), SepConv(b1a, b1, 3), _gate(b1, gating)
        )
        self.branch2 = nn.Sequential(
            ConvBNReLU(in_ch, b2a, 1), SepConv(b2a, b2, 3), _gate(b2, gating)
        )
        self.branch3 = nn.Sequential(
            MaxPool3d(3, stride=1, padding=1), ConvBNReLU(in_ch, b3, 1), _gate(b3, gating)
        )
        self.out_channels = b0 + b1 + b2 + b3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [self.branch0(x), self.branch1(x), self.branch2(x), self.branch3(x)], dim=1
        )


class S3DG(nn.Module):
    """S3D-G classifier on (N, C, T, H, W) clips; see the module docstring."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        width: float = 1.0,
        gating: bool = True,
        dropout: float = 0.0,
    ):
        super().__init__()
        if num_classes < 1 or in_channels < 1:
            raise ValueError("num_classes and in_channels must be positive")
        if not width > 0:
            raise ValueError(f"width must be > 0, got {width}")

        def ch(c: int) -> int:
            return scaled_channels(c, width)

        c1, c2b, c2c = ch(64), ch(64), ch(192)
        layers: OrderedDict[str, nn.Module] = OrderedDict(
            conv_1a=SepConv(in_channels, c1, 7, stride=2),
            pool_2a=MaxPool3d((1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)),
            conv_2b=ConvBNReLU(c1, c2b, 1),
            conv_2c=nn.Sequential(SepConv(c2b, c2c, 3), _gate(c2c, gating)),
            pool_3a=MaxPool3d((1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)),
        )
        self.endpoint_channels = {"conv_1a": c1, "pool_2a": c1, "conv_2b": c2b, "conv_2c": c2c, "pool_3a": c2c}
        channels = c2c
        for name, widths in INCEPTION_WIDTHS.items():
            block = Inception(channels, tuple(ch(w) for w in widths), gating)
            layers[name] = block
            channels = self.endpoint_channels[name] = block.out_channels
            if name == "mixed_3c":
                layers["pool_4a"] = MaxPool3d(3, stride=2, padding=1)
                self.endpoint_channels["pool_4a"] = channels
            elif name == "mixed_4f":
                layers["pool_5a"] = MaxPool3d(2, stride=2, ceil_mode=True)
                self.endpoint_channels["pool_5a"] = channels
        self.base = nn.Sequential(layers)
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Conv3d(channels, num_classes, 1, bias=True)
        self.num_features = channels

    @property
    def endpoint_names(self) -> tuple[str, ...]:
        return tuple(self.base._modules)

    def endpoints(self, x: torch.Tensor, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The outputs of the named layers of `base` (``conv_2c``, ``mixed_4f``, ...), running no further than
        the deepest one asked for: what the distillation target and the motion probe read."""
        wanted = set(names)
        unknown = wanted - set(self.endpoint_names)
        if unknown:
            raise ValueError(f"unknown S3D-G endpoints {sorted(unknown)} (known: {', '.join(self.endpoint_names)})")
        found: dict[str, torch.Tensor] = {}
        x = _channels_last(x)
        for name, layer in self.base.named_children():
            if len(found) == len(wanted):
                break
            x = layer(x)
            if name in wanted:
                found[name] = x
        return found

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The Mixed_5c map, (N, num_features, T/8, H/32, W/32)."""
        return self.base(_channels_last(x))

    def head(self, feature_map: torch.Tensor) -> torch.Tensor:
        """Logits from a Mixed_5c map: global average pool, dropout, 1x1x1 classifier."""
        pooled = self.dropout(self.pool(feature_map))
        return self.classifier(pooled).flatten(1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Globally pooled Mixed_5c features, (N, num_features)."""
        return self.pool(self.feature_map(x)).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.feature_map(x))


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """Clips run channels-last (NDHWC) on every device: oneDNN's 3D convolutions ran about 1.7x faster in that
    layout on this network on CPU, and cuDNN picks its NDHWC (tensor-core) kernels from it on the GPU."""
    return x.contiguous(memory_format=torch.channels_last_3d)
