"""AdaptCLIPConfig: AdaptCLIP's settings with the authors' defaults (docs/algorithms/adaptclip.md)."""
from __future__ import annotations

from typing import ClassVar, Literal, Optional

from pydantic import Field, model_validator

from ...config import DetectorSettings
from ...model_names import vision_patch_size


class AdaptCLIPConfig(DetectorSettings):
    """AdaptCLIP detector settings. Zero-shot until normal references are added, few-shot after."""

    kind: Literal["adaptclip"] = "adaptclip"
    weight_fields: ClassVar[tuple[str, ...]] = ("weights",)
    block_fields: ClassVar[tuple[str, ...]] = ("patch_blocks", "value_value_from")
    input_view: ClassVar[str] = "squash"
    position_resize: ClassVar[str] = "bilinear"
    # Backbone: model, pretrained, image_size (518), seed, device, precision (DetectorSettings)
    weights: Optional[str] = Field(
        None,
        description="the adapters' checkpoint in the authors' format (a torch file with `textual_learner`, "
        "`visual_learner`, `pq_learner`); null: seeded random adapters (tests only)",
    )
    patch_blocks: list[int] = Field(
        default_factory=lambda: [6, 12, 18, 24], min_length=1,
        description="1-indexed blocks whose V-V tokens the prompt-query adapter compares; the last one feeds "
        "the visual and textual adapters",
    )
    value_value_from: int = Field(6, ge=1, description="first block of the value-value attention path")
    context_tokens: int = Field(12, ge=1, description="learned context tokens per textual prompt")
    temperature: float = Field(0.07, gt=0, description="cosine similarities are divided by it")
    top_k: int = Field(10, ge=1, description="the prompt-query image head pools (mean + mean of top k) / 2")
    blur_sigma: float = Field(4.0, gt=0, description="Gaussian blur of the final map, in pixels at image_size")
    max_references: int = Field(16, ge=1, description="normal references a line may hold")
    object_noun: str = Field("object", description="the noun filling every text prompt (class-agnostic)")

    @model_validator(mode="after")
    def _check(self):
        if any(b < self.value_value_from for b in self.patch_blocks):
            raise ValueError(
                f"patch_blocks {self.patch_blocks} must all be >= value_value_from ({self.value_value_from}): "
                "their tokens come from the value-value path"
            )
        if sorted(set(self.patch_blocks)) != self.patch_blocks:
            raise ValueError(f"patch_blocks must be increasing and distinct, got {self.patch_blocks}")
        patch = vision_patch_size(self.model)
        if self.image_size % patch:
            raise ValueError(f"image_size {self.image_size} must be a multiple of model {self.model!r}'s patch size {patch}")
        return self
