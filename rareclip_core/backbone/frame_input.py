"""Frames -> a CLIP backbone's input: the part of the frame the model sees (`input_view`), resized
to S x S, as pixels or normalized with OpenAI's mean and std.

Two ways to do the same steps (`resize_on_device`):
- False (the authors' way): PIL on the CPU, as OpenCLIP's evaluation transform: a bicubic resize
  (PIL's, with antialiasing, rounded to uint8), the centre crop, then /255 and the mean and std.
- True: the uint8 frame is copied to the detector's device and resized there by torch's bicubic
  resize with antialiasing (the same filter as PIL's, in floating point), rounded to whole pixel
  values as PIL's uint8 output is. Pixels then differ from PIL's by at most a few levels of 255
  (PIL resamples in fixed point); in exchange the CPU does no resize, which on a GPU takes the
  preprocess off a line's critical path.
"""
from __future__ import annotations

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image

from ..data.images import rgb_array, to_rgb_image

VIEWS = ("center_crop", "squash")


def resized_size(height: int, width: int, size: int, view: str) -> tuple[int, int]:
    """(h, w) before the crop: "squash" resizes to size x size; "center_crop" resizes the shorter
    side to `size`, the longer one in proportion (torchvision's `Resize(int)`: truncated)."""
    if view == "squash":
        return size, size
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def center_crop_box(height: int, width: int, size: int) -> tuple[int, int]:
    """(top, left) of the centre size x size square (torchvision's `CenterCrop` rounding)."""
    return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))


class FrameInput:
    """Frames (PIL images or H x W x 3 uint8 arrays, any size) -> B x 3 x S x S on `device`.

    `pixels(frames)`: float32 whole pixel values in [0, 255]; `__call__(frames)`: normalized
    (OpenAI mean/std), the backbone's input."""

    def __init__(self, size: int, view: str, device: torch.device, resize_on_device: bool = False):
        if view not in VIEWS:
            raise ValueError(f"input view {view!r}; known: {VIEWS}")
        self.size, self.view, self.device, self.on_device = size, view, device, resize_on_device
        self.mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN, device=device).view(3, 1, 1)
        self.std = torch.tensor(open_clip.OPENAI_DATASET_STD, device=device).view(3, 1, 1)

    def __call__(self, frames: list) -> torch.Tensor:
        # ToTensor then Normalize, op for op, so that the PIL way is bitwise OpenCLIP's transform
        return self.pixels(frames).div(255).sub(self.mean).div(self.std)

    def pixels(self, frames: list) -> torch.Tensor:
        one = self._resize_on_device if self.on_device else self._resize_with_pil
        return torch.stack([one(frame) for frame in frames])

    def _resize_with_pil(self, frame) -> torch.Tensor:
        image = to_rgb_image(frame)
        width, height = image.size
        h, w = resized_size(height, width, self.size, self.view)
        if (h, w) != (height, width):
            image = image.resize((w, h), Image.BICUBIC)
        pixels = torch.from_numpy(np.array(image)).to(self.device).permute(2, 0, 1)  # 3 x h x w uint8
        return self._crop(pixels).float()

    def _resize_on_device(self, frame) -> torch.Tensor:
        pixels = torch.from_numpy(np.array(rgb_array(frame))).to(self.device).permute(2, 0, 1).float()  # 3 x H x W (a copy: Ray hands frames over read-only)
        h, w = resized_size(*pixels.shape[1:], self.size, self.view)
        if (h, w) != tuple(pixels.shape[1:]):
            resized = F.interpolate(pixels[None], size=(h, w), mode="bicubic", antialias=True, align_corners=False)
            pixels = resized[0].round_().clamp_(0, 255)
        return self._crop(pixels)

    def _crop(self, pixels: torch.Tensor) -> torch.Tensor:
        """3 x h x w -> 3 x S x S: the centre square (a no-op for "squash")."""
        top, left = center_crop_box(*pixels.shape[1:], self.size)
        return pixels[:, top : top + self.size, left : left + self.size]
