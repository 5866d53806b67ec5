"""Pseudo-anomalies for test-time adaptation (paper sec. 3.3, following DRAEM's recipe): a
Perlin-noise mask pastes an altered texture onto the query, partly transparent.

DRAEM takes its textures from DTD, which cannot be downloaded here; ours come from an earlier
frame of the same line (or procedural Perlin noise before there is one), altered the same way.
Every random draw uses the generator it is given, so a restored line synthesizes the same images.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF

NOISE_SIZE = 256  # Perlin noise is drawn at this side (divisible by every scale 2^0..2^5), then resized
MAX_SCALE_EXPONENT = 5  # DRAEM: scales 2^u, u ~ int[0, 5], per axis
MASK_THRESHOLD = 0.5  # DRAEM: mask = rotated noise > 0.5
MASK_TRIES = 8  # redraws when a mask covers no patch for more than half (ours)


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _integer(generator: torch.Generator, low: int, high: int) -> int:
    """An integer in [low, high]."""
    return int(torch.randint(low, high + 1, (), generator=generator))


def perlin_noise(size: int, res_y: int, res_x: int, generator: torch.Generator) -> torch.Tensor:
    """Gradient (Perlin) noise, size x size, about in [-1, 1], with res_y x res_x lattice cells
    (size divisible by both): random unit gradients at the lattice corners, the dot products of
    each pixel's offsets with its cell's four corner gradients, blended by 6t^5 - 15t^4 + 10t^3."""
    angles = 2 * math.pi * torch.rand(res_y + 1, res_x + 1, generator=generator)
    gradients = torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)  # (ry+1) x (rx+1) x 2
    ys = torch.arange(size, dtype=torch.float32) * res_y / size
    xs = torch.arange(size, dtype=torch.float32) * res_x / size
    cy, cx = ys.long(), xs.long()
    fy, fx = (ys - cy)[:, None], (xs - cx)[None, :]  # offsets within the cell, size x 1 and 1 x size

    def corner(dy: int, dx: int) -> torch.Tensor:
        g = gradients[cy[:, None] + dy, cx[None, :] + dx]  # size x size x 2
        return g[..., 0] * (fy - dy) + g[..., 1] * (fx - dx)

    def fade(t: torch.Tensor) -> torch.Tensor:
        return t * t * t * (t * (t * 6 - 15) + 10)

    wy, wx = fade(fy), fade(fx)
    top = corner(0, 0) + wx * (corner(0, 1) - corner(0, 0))
    bottom = corner(1, 0) + wx * (corner(1, 1) - corner(1, 0))
    return math.sqrt(2) * (top + wy * (bottom - top))


def _random_noise(size: int, generator: torch.Generator) -> torch.Tensor:
    """One Perlin noise at DRAEM's random scales, resized to size x size."""
    res_y = 2 ** _integer(generator, 0, MAX_SCALE_EXPONENT)
    res_x = 2 ** _integer(generator, 0, MAX_SCALE_EXPONENT)
    noise = perlin_noise(NOISE_SIZE, res_y, res_x, generator)
    return F.interpolate(noise[None, None], size=(size, size), mode="bilinear", align_corners=False)[0]  # 1 x S x S


def perlin_mask(size: int, generator: torch.Generator) -> torch.Tensor:
    """DRAEM's mask: noise at random scales, rotated by an angle in [-90, 90] degrees (bilinear,
    zeros outside), thresholded at 0.5; 1 x size x size float of 0/1."""
    noise = _random_noise(size, generator)
    angle = _uniform(generator, -90.0, 90.0)
    rotated = TF.rotate(noise, angle, interpolation=TF.InterpolationMode.BILINEAR, fill=0.0)
    return (rotated > MASK_THRESHOLD).float()


def noise_texture(size: int, generator: torch.Generator) -> torch.Tensor:
    """A procedural texture: one Perlin noise per colour channel, 3 x size x size uint8."""
    channels = [_random_noise(size, generator)[0] for _ in range(3)]
    return ((torch.stack(channels) + 1) * 127.5).clamp(0, 255).round().to(torch.uint8)


def _brightness(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    mul, add = _uniform(generator, 0.8, 1.2), _uniform(generator, -30, 30)
    return (image.float() * mul + add).clamp(0, 255).round().to(torch.uint8)


def _hue_saturation(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    image = TF.adjust_hue(image, _uniform(generator, -0.2, 0.2))
    return TF.adjust_saturation(image, _uniform(generator, 0.5, 1.5))


# DRAEM's ten texture alterations (imgaug there; torchvision here, ranges as close as its ops allow)
TEXTURE_OPS = (
    lambda im, g: TF.adjust_gamma(im, _uniform(g, 0.5, 2.0)),
    _brightness,
    lambda im, g: TF.adjust_sharpness(im, _uniform(g, 0.0, 2.0)),
    _hue_saturation,
    lambda im, g: TF.solarize(im, _uniform(g, 32, 128)),
    lambda im, g: TF.posterize(im, _integer(g, 1, 8)),
    lambda im, g: TF.invert(im),
    lambda im, g: TF.autocontrast(im),
    lambda im, g: TF.equalize(im),
    lambda im, g: TF.rotate(im, _uniform(g, -45.0, 45.0)),
)


def alter_texture(texture: torch.Tensor, generator: torch.Generator, n_ops: int = 3) -> torch.Tensor:
    """`n_ops` distinct alterations of TEXTURE_OPS in random order (DRAEM: 3 of 10); uint8 in and out."""
    for index in torch.randperm(len(TEXTURE_OPS), generator=generator)[:n_ops].tolist():
        texture = TEXTURE_OPS[index](texture, generator)
    return texture


@dataclass
class PseudoAnomaly:
    image: torch.Tensor  # 3 x S x S float in [0, 1], the query with a pasted texture
    mask: torch.Tensor  # 1 x S x S float 0/1
    patches: torch.Tensor  # M bool: patches more than half covered by the mask (Omega)


def patch_coverage(mask: torch.Tensor, grid: int) -> torch.Tensor:
    """M bool: the grid cells of which the mask covers more than half."""
    return (F.adaptive_avg_pool2d(mask[None], grid)[0, 0] > 0.5).flatten()


def synthesize(
    image: torch.Tensor, texture_source: Optional[torch.Tensor], grid: int, blend_max: float, generator: torch.Generator
) -> PseudoAnomaly:
    """DRAEM's pseudo-anomaly on a 3 x S x S uint8 query: x' = x (1 - M) + (1 - b) T M + b x M with
    b ~ U(0, blend_max), T the altered `texture_source` (3 x S x S uint8; procedural noise when
    None). The mask is redrawn until it covers a patch (at most MASK_TRIES draws)."""
    size = image.shape[-1]
    texture = noise_texture(size, generator) if texture_source is None else texture_source
    texture = alter_texture(texture, generator).float() / 255
    for _ in range(MASK_TRIES):
        mask = perlin_mask(size, generator)
        patches = patch_coverage(mask, grid)
        if bool(patches.any()):
            break
    beta = _uniform(generator, 0.0, blend_max)
    x = image.float() / 255
    pseudo = x * (1 - mask) + (1 - beta) * texture * mask + beta * x * mask
    return PseudoAnomaly(pseudo, mask, patches)
