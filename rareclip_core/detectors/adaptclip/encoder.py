"""AdaptCLIP's frozen backbone (sec. 1 of docs/algorithms/adaptclip.md): its input is the whole
frame squashed to S x S (`FrameInput`, input view "squash"), CLIP's position embedding resized to the new grid by plain bilinear
interpolation, and a forward with the value-value path whose patch tokens the adapters use."""
from __future__ import annotations

from dataclasses import dataclass

import open_clip
import torch
import torch.nn.functional as F

from ...backbone import VisionOptions, backbone_dtype, vision_forward


@dataclass
class FrameFeatures:
    """The frozen backbone's output for one frame (no state involved, so frames batch)."""

    global_feature: torch.Tensor  # D: class token of the last block, projected, no ln_post
    patch_tokens: torch.Tensor  # n_layers x (1 + P) x D: V-V tokens of patch_blocks, ln_post, projected


class AdaptCLIPEncoder(torch.nn.Module):
    """The frozen vision tower: the global feature from the ordinary stream, and the V-V path's
    tokens of `blocks` through ln_post and the projection."""

    def __init__(self, visual: torch.nn.Module, blocks: list[int], value_value_from: int, device, precision: str):
        super().__init__()
        self.dtype = backbone_dtype(precision, device)
        self.visual = visual.to(device=device, dtype=self.dtype).eval().requires_grad_(False)
        self.device = device
        self.options = VisionOptions(blocks=tuple(blocks), value_value_from=value_value_from)
        self.grid = visual.grid_size[0]

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> list[FrameFeatures]:
        """images: B x 3 x S x S, normalized. The projections run one frame at a time so that a
        frame's features are bitwise the same alone or in a batch."""
        visual = self.visual
        out = vision_forward(visual, images.to(self.device, self.dtype), self.options)
        tokens = torch.stack([out.value_tokens[b] for b in self.options.blocks], dim=1)  # B x n x L x C
        frames = []
        for i in range(images.shape[0]):
            global_feature = (out.final[i, :1] @ visual.proj)[0]
            patch_tokens = visual.ln_post(tokens[i]) @ visual.proj
            frames.append(FrameFeatures(global_feature.float(), patch_tokens.float()))
        return frames


def static_text_features(model: torch.nn.Module, sentences: tuple[list[str], list[str]], model_name: str) -> torch.Tensor:
    """w_n, w_a: 2 x D; per class the mean of the sentences' raw text embeddings, then L2-normalized."""
    tokenizer = open_clip.get_tokenizer(model_name)
    device = next(model.parameters()).device
    rows = []
    with torch.inference_mode():
        for class_sentences in sentences:
            rows.append(model.encode_text(tokenizer(class_sentences).to(device)).float().mean(0))
    return F.normalize(torch.stack(rows), dim=-1).clone()
