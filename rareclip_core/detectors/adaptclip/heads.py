"""AdaptCLIP's computations on backbone features, as logits and differentiable, shared by the
detector (one frame, eval mode) and training (batches). D = embedding width, P = g x g patches.

- `text_alignment_logits` (Eq. 1-2 with the code's cos / temperature): patch and image logits
  against a pair of text features (normal, abnormal).
- `visual_adapter` (Eq. 3): the visual learner on the patch tokens and the global feature.
- `prompt_query_logits` (Eq. 5-8): one layer's comparison of query patches with prompt patches.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .adapters import PromptQueryLearner, VisualLearner


def text_alignment_logits(tokens: torch.Tensor, global_feature: torch.Tensor, text: torch.Tensor,
                          temperature: float, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens B x (1 + P) x D (class token first, dropped), global B x D, text 2 x D ->
    (B x 2 x g x g patch logits, B x 2 image logits); channel 1 is abnormal."""
    patch = F.normalize(tokens[:, 1:], dim=-1) @ text.T / temperature  # B x P x 2
    image = F.normalize(global_feature, dim=-1) @ text.T / temperature
    return patch.transpose(1, 2).reshape(tokens.shape[0], 2, grid, grid), image


def visual_adapter(visual: VisualLearner, tokens: torch.Tensor, global_feature: torch.Tensor):
    """Eq. 3: the local adapter on every token (class token included), the global one on f."""
    return visual.local_adater(tokens), visual.global_adapter(global_feature)


def prompt_query_logits(pq: PromptQueryLearner, layer: int, queries: torch.Tensor, prompts: torch.Tensor,
                        grid: int, top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One layer of the prompt-query adapter. queries B x P x D and prompts B x N x D, both
    L2-normalized (N = k P patches of the normal prompts) ->
    (B x 2 x 4g x 4g local logits, B x 2 image logits, B x P distance 1 - cos to the nearest prompt patch)."""
    b, p, d = queries.shape
    similarity, nearest = (queries @ prompts.transpose(1, 2)).max(dim=2)  # Eq. 5 (cosine, as the code)
    aligned = torch.gather(prompts, 1, nearest[..., None].expand(-1, -1, d))
    joint = queries + (queries - aligned).abs()  # Eq. 6: context + aligned residual
    joint = pq.sharebn[layer](joint.transpose(1, 2).reshape(b, d, grid, grid))
    local = pq.local_adapter[layer](joint)  # Eq. 7
    flat = joint.flatten(2)  # B x D x P
    pooled = (flat.mean(2) + flat.topk(min(top_k, p), dim=2).values.mean(2)) / 2  # Eq. 8 (the code's mean + top-k)
    return local, pq.global_adapter[layer](pooled), 1 - similarity


def upsample(maps: torch.Tensor, size: int) -> torch.Tensor:
    """B x C x h x w -> B x C x size x size, bilinear, align_corners=False."""
    return F.interpolate(maps, size=(size, size), mode="bilinear", align_corners=False)
