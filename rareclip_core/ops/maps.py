"""Patch-grid map utilities: neighbourhood pooling (sec. 3), upsampling and Gaussian blur (sec. 5)."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def neighbourhood_mean(tokens: torch.Tensor, grid: int, r: int, border: str = "replicate") -> torch.Tensor:
    """Average over the r x r neighbourhood on the grid; B x M x C -> B x M x C. At the border,
    `border` 'replicate' repeats the edge patches (RareCLIP), 'inside' averages only the
    neighbours inside the grid (zero padding not counted; AFR-CLIP's MPFA)."""
    if r == 1:
        return tokens
    b, m, c = tokens.shape
    x = tokens.transpose(1, 2).reshape(b, c, grid, grid)
    if border == "replicate":
        x = F.avg_pool2d(F.pad(x, [r // 2] * 4, mode="replicate"), r, stride=1)
    elif border == "inside":
        x = F.avg_pool2d(x, r, stride=1, padding=r // 2, count_include_pad=False)
    else:
        raise ValueError(f"border must be 'replicate' or 'inside', got {border!r}")
    return x.reshape(b, c, m).transpose(1, 2)


def gaussian_kernel1d(sigma: float, size: int, device=None) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


@functools.lru_cache(maxsize=16)
def _cached_kernel(sigma: float, size: int, device: torch.device) -> torch.Tensor:
    """The blur kernel, built once per (sigma, size, device) instead of once per frame."""
    return gaussian_kernel1d(sigma, size, device)


def upsample_and_blur(grid_maps: torch.Tensor, size: int, sigma: float, kernel: int) -> torch.Tensor:
    """B x g x g patch maps -> B x size x size: bilinear (align_corners=True), then a separable
    Gaussian blur (sigma, kernel x kernel, reflect padding)."""
    x = F.interpolate(grid_maps[:, None].float(), size=(size, size), mode="bilinear", align_corners=True)
    k = _cached_kernel(float(sigma), int(kernel), x.device)
    pad = kernel // 2
    x = F.conv2d(F.pad(x, [pad, pad, 0, 0], mode="reflect"), k.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, [0, 0, pad, pad], mode="reflect"), k.view(1, 1, -1, 1))
    return x[:, 0]


def normalize01(x: torch.Tensor) -> torch.Tensor:
    """(x - min) / (max - min); all zeros when x is constant. No host sync (torch.where, not `if`)."""
    low = x.min()
    span = x.max() - low
    return torch.where(span > 0, (x - low) / span, torch.zeros_like(x))
