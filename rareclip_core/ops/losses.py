"""Segmentation losses shared by the detectors' training (RareCLIP's TPB, AdaptCLIP's adapters, AFR-CLIP)."""
from __future__ import annotations

import torch


def focal_loss(probs: torch.Tensor, mask: torch.Tensor, gamma: float = 2.0, smooth: float = 1e-5) -> torch.Tensor:
    """Focal loss (Lin et al.) as the authors' code computes it (RareCLIP Eq. 4, AdaptCLIP and
    AFR-CLIP training; APRIL-GAN's and AnomalyCLIP's `FocalLoss`): mean over pixels of
    -(1 - p_t)^gamma log p_t, with p_t = sum_c clamp(onehot_c, s, 1 - s) P_c + s, so that
    p_t = (1 - s) P[true] + s P[other] + s and log p_t is bounded below by log s (s = 1e-5).

    probs: B x 2 x H x W probabilities (channel 0 normal, 1 abnormal); mask: B x H x W in {0, 1}.
    """
    mask = mask.to(probs.dtype)
    one_hot = torch.stack([1 - mask, mask], dim=1).clamp(smooth, 1 - smooth)  # B x 2 x H x W
    pt = (one_hot * probs).sum(1) + smooth
    return (-((1 - pt) ** gamma) * pt.log()).mean()


def dice_loss(probs: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Dice loss (RareCLIP Eq. 4, AdaptCLIP training): 1 - (2 sum(p y) + s) / (sum p + sum y + s) per image, mean over the batch.

    probs, target: B x H x W.
    """
    p, y = probs.flatten(1), target.flatten(1).to(probs.dtype)
    return (1 - (2 * (p * y).sum(1) + smooth) / (p.sum(1) + y.sum(1) + smooth)).mean()
