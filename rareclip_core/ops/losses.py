"""Segmentation losses shared by the detectors' training (RareCLIP's TPB, AdaptCLIP's adapters, AFR-CLIP)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def focal_loss(logits: torch.Tensor, mask: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Focal loss (Lin et al.; RareCLIP Eq. 4, AdaptCLIP training): mean over pixels of -(1 - p_t)^gamma log p_t.

    logits: B x 2 x H x W (channel 0 normal, 1 abnormal); mask: B x H x W in {0, 1};
    p_t = softmax(logits)[mask], computed as a log-softmax for stability.
    """
    log_pt = F.log_softmax(logits, dim=1).gather(1, mask[:, None].long())[:, 0]
    return (-((1 - log_pt.exp()) ** gamma) * log_pt).mean()


def dice_loss(probs: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Dice loss (RareCLIP Eq. 4, AdaptCLIP training): 1 - (2 sum(p y) + s) / (sum p + sum y + s) per image, mean over the batch.

    probs, target: B x H x W.
    """
    p, y = probs.flatten(1), target.flatten(1).to(probs.dtype)
    return (1 - (2 * (p * y).sum(1) + smooth) / (p.sum(1) + y.sum(1) + smooth)).mean()
