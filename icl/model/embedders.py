"""Image embedders: pixels ``[N, S, S]`` -> tokens ``[N, d_model]``.

- ``resnet``: the small bottleneck ResNet of STUDY.md, trained end to end (the reference).
- ``linear``: one linear map of the flattened image; cheap, and learns fast on small images.
- ``frozen``: a fixed random projection (a buffer, never trained): the cheapest embedder,
  for runs that study the transformer alone. Its scale is set so a typical Omniglot image
  (about 8% ink) gives tokens of roughly unit RMS, like the positional code.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn


class Bottleneck(nn.Module):
    """ResNet v1 bottleneck: 1x1 (c/4) -> 3x3 (c/4, stride) -> 1x1 (c), projection shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        mid = max(c_out // 4, 1)
        self.conv1 = nn.Conv2d(c_in, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.bn2(self.conv2(h)))
        h = self.bn3(self.conv3(h))
        return torch.relu(h + self.shortcut(x))


class ResNetEmbedder(nn.Module):
    """Stem conv 7x7/64/stride 2, BN, ReLU, max-pool 3x3/2; groups of 2 bottleneck blocks with
    16/32/32/64 channels and strides 1/2/2/2; spatial mean (64-d); linear to ``d_model``."""

    def __init__(self, d_model: int, channels=(16, 32, 32, 64), strides=(1, 2, 2, 2), blocks: int = 2):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, 64, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        layers, c_in = [], 64
        for c, s in zip(channels, strides):
            for b in range(blocks):
                layers.append(Bottleneck(c_in, c, s if b == 0 else 1))
                c_in = c
        self.groups = nn.Sequential(*layers)
        self.out = nn.Linear(c_in, d_model)

    def forward(self, images: Tensor) -> Tensor:
        h = self.groups(self.stem(rearrange(images, "n h w -> n 1 h w")))
        return self.out(h.mean(dim=(-2, -1)))


class LinearEmbedder(nn.Module):
    def __init__(self, image_size: int, d_model: int):
        super().__init__()
        self.proj = nn.Linear(image_size * image_size, d_model)

    def forward(self, images: Tensor) -> Tensor:
        return self.proj(rearrange(images, "n h w -> n (h w)"))


class FrozenEmbedder(nn.Module):
    """A fixed random projection; seeded from the model's init seed, saved with the model.

    Its weight never changes, so a mixed-precision trainer may hand it a bf16 copy made once
    (``LOW_PRECISION_BUFFERS``) instead of autocast casting 2 x 10^5..10^6 values every step."""

    INK_FRACTION = 0.08
    LOW_PRECISION_BUFFERS = ("weight",)

    def __init__(self, image_size: int, d_model: int):
        super().__init__()
        pixels = image_size * image_size
        w = torch.randn(pixels, d_model) / (pixels * self.INK_FRACTION) ** 0.5
        self.register_buffer("weight", w)

    def forward(self, images: Tensor) -> Tensor:
        return rearrange(images, "n h w -> n (h w)").to(self.weight.dtype) @ self.weight


def make_embedder(kind: str, image_size: int, d_model: int) -> nn.Module:
    if kind == "resnet":
        return ResNetEmbedder(d_model)
    if kind == "linear":
        return LinearEmbedder(image_size, d_model)
    if kind == "frozen":
        return FrozenEmbedder(image_size, d_model)
    raise ValueError(f"unknown embedder {kind!r}")
