"""AFR-CLIP's frozen parts and how they are built: the CLIP vision tower run with self-prompting
(Eq. 17-18), the CNN, and the three text prompts of a product (Eq. 2, before the adapter)."""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import open_clip
import torch
import torch.nn.functional as F

from ...backbone import VisionOptions, backbone_dtype, create_clip_model, vision_forward
from .checkpoint import load_heads
from .cnn import build_cnn, cnn_input
from .config import AFRCLIPConfig
from .parts import AFRCLIPHeads

# T^n, T^a, T^s (the paper's examples; class-aware: {} is the line's product name)
PROMPT_TEMPLATES = ("a photo of a normal {}", "a photo of a defective {}", "a photo of a {}")


class PromptedVision(torch.nn.Module):
    """The frozen CLIP vision tower and CNN. `stage_tokens` runs the tower with K prompt tokens
    [ours, the VPT reading of Eq. 18]: appended before the first of `prompt_blocks`, refreshed
    before the others, dropped after the last, so every stage sees 1 + P tokens."""

    def __init__(self, config: AFRCLIPConfig, visual: torch.nn.Module, cnn: torch.nn.Module, device: torch.device):
        super().__init__()
        self.dtype = backbone_dtype(config.precision, device)
        self.visual = visual.to(device=device, dtype=self.dtype).eval().requires_grad_(False)
        self.cnn = cnn.to(device=device, dtype=self.dtype).eval().requires_grad_(False)
        self.device = device
        self.stage_blocks = tuple(config.stage_blocks)
        self.prompt_blocks = tuple(config.prompt_blocks)
        self.cnn_size = config.cnn_image_size or config.image_size
        self.grid = self.visual.grid_size[0]
        self.width = self.visual.transformer.width

    @torch.no_grad()
    def cnn_features(self, images: torch.Tensor) -> torch.Tensor:
        """F_cnn: CLIP-normalized B x 3 x S x S -> B x C, float32."""
        return self.cnn(cnn_input(images.to(self.device, self.dtype), self.cnn_size)).float()

    def stage_tokens(self, images: torch.Tensor, prompts: torch.Tensor) -> list[torch.Tensor]:
        """Per stage block B x (1 + P) x W (float32). prompts: B x K x W, P~_v (Eq. 16);
        gradients reach them when enabled (training)."""
        n = 1 + self.grid**2
        prompts = prompts.to(self.dtype)
        first, last = self.prompt_blocks[0], self.prompt_blocks[-1]

        def insert_prompts(block: int, x: torch.Tensor) -> torch.Tensor:
            if first <= block <= last:
                return torch.cat([x[:, :n], prompts], dim=1)  # Eq. 18: append, then overwrite
            if block == last + 1:
                return x[:, :n]
            return x

        options = VisionOptions(blocks=self.stage_blocks, token_hook=insert_prompts)
        out = vision_forward(self.visual, images.to(self.device, self.dtype), options)
        return [out.tokens[b][:, :n].float() for b in self.stage_blocks]


@dataclass
class AFRCLIPModel:
    vision: PromptedVision
    heads: AFRCLIPHeads
    text: dict[str, torch.Tensor]  # product -> 3 x D frozen prompt embeddings (normal, abnormal, stateless)


def prompt_text(product: str) -> list[str]:
    return [template.format(product) for template in PROMPT_TEMPLATES]


@torch.no_grad()
def encode_prompts(clip: torch.nn.Module, model_name: str, products: list[str]) -> dict[str, torch.Tensor]:
    """Each product's three prompts through the frozen text tower, L2-normalized [ours]: 3 x D."""
    tokenizer = open_clip.get_tokenizer(model_name)
    device = next(clip.parameters()).device
    out = {}
    for product in products:
        embeddings = clip.encode_text(tokenizer(prompt_text(product)).to(device)).float()
        out[product] = F.normalize(embeddings, dim=-1).cpu()
    return out


def load_model(config: AFRCLIPConfig, device: torch.device, products: list[str], training: bool = False) -> AFRCLIPModel:
    """CLIP (text tower used once, then dropped), the CNN, and the learned parts: `weights`, or
    seeded random ones (with a warning where CLIP's weights are real, unless `training`)."""
    clip = create_clip_model(config)
    text = encode_prompts(clip, config.model, products)
    cnn, cnn_dim = build_cnn(config)
    vision = PromptedVision(config, clip.visual, cnn, device)
    heads = load_heads(config, vision.width, clip.visual.output_dim, cnn_dim)
    if config.weights is None and config.pretrained is not None and not training:
        warnings.warn(
            "detector.weights is not set: AFR-CLIP's adapters, CMFR and prompts are untrained, so its scores "
            "are noise. Train them with `run_cluster.py train-afrclip` and set detector.weights to the file.",
            stacklevel=2,
        )
    return AFRCLIPModel(vision, heads.to(device), text)
