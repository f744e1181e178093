"""Images on the device: turn (class id, exemplar) index tensors into float pixels.

All of Omniglot lives on the training device as uint8 (``[n_chars, 20, S, S]``: 25 MB at
28 px, 358 MB at 105 px), so a batch is one gather, with no host work per step.
Augmented classes are not stored: variant ``v`` of a character (``class % 8``) is a fixed
pixel permutation (rotation ``v % 4`` x 90 degrees, then a horizontal flip if ``v >= 4``),
applied as one more gather.
"""

from __future__ import annotations

import numpy as np
import torch
from einops import rearrange
from torch import Tensor

from icl.config import N_VARIANTS


def variant_maps(size: int) -> Tensor:
    """``[8, S*S]`` source-pixel index of every output pixel, per augmentation variant."""
    idx = torch.arange(size * size).view(size, size)
    maps = []
    for v in range(N_VARIANTS):
        m = torch.rot90(idx, v % 4, dims=(0, 1))
        if v >= 4:
            m = m.flip(1)
        maps.append(m.reshape(-1))
    return torch.stack(maps)


def transform(image: np.ndarray, variant: int) -> np.ndarray:
    """One image's variant, written plainly: the reference the fast path is tested against."""
    out = np.rot90(image, variant % 4)
    return np.ascontiguousarray(out[:, ::-1] if variant >= 4 else out)


class ImageBank:
    """Omniglot pixels on a device, addressed by global class id and exemplar (drawer)."""

    def __init__(self, images: np.ndarray | Tensor, augment: bool, device: torch.device | str = "cpu"):
        self.images = torch.as_tensor(images).to(device)  # uint8 [n_chars, 20, S, S]
        self.augment = augment
        self.size = self.images.shape[-1]
        self.maps = variant_maps(self.size).to(self.images.device) if augment else None

    @property
    def n_chars(self) -> int:
        return self.images.shape[0]

    @property
    def n_classes(self) -> int:
        return self.n_chars * (N_VARIANTS if self.augment else 1)

    def raw(self, classes: Tensor, exemplars: Tensor) -> Tensor:
        """uint8 ``[..., S, S]`` for index tensors of any (matching) shape."""
        if not self.augment:
            return self.images[classes, exemplars]
        flat = rearrange(self.images[classes // N_VARIANTS, exemplars], "... h w -> ... (h w)")
        flat = flat.gather(-1, self.maps[classes % N_VARIANTS])
        return rearrange(flat, "... (h w) -> ... h w", h=self.size)

    def render(self, classes: Tensor, exemplars: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """Float pixels in [0, 1] (1 = ink), ``[..., S, S]``."""
        return self.raw(classes, exemplars).to(dtype).div_(255)
