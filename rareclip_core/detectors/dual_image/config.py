"""DualImageConfig: every knob of Dual-Image CLIP. Defaults are the paper's where it gives them,
AnoVL's (the same group's AnoCLIP code) where the paper says its architecture is AnoCLIP's, and
ours where our copy of the paper lost the value (each marked; docs/algorithms/dual-image-clip.md)."""
from __future__ import annotations

from typing import ClassVar, Literal, Optional

from pydantic import Field

from ...config import DetectorSettings


class DualImageConfig(DetectorSettings):
    """Dual-Image CLIP settings. Nothing is learned offline: no weights besides CLIP's."""

    kind: Literal["dual_image"] = "dual_image"
    block_fields: ClassVar[tuple[str, ...]] = ("value_value_from",)
    # Backbone (paper: OpenCLIP ViT-B-16+; AnoVL: laion400m_e32 at 240 px)
    model: str = Field("ViT-B-16-plus-240", description="the OpenCLIP model (a ViT); AnoVL's ViT-B-16+")
    pretrained: Optional[str] = Field(
        "laion400m_e32", description="an OpenCLIP tag, a local checkpoint path, or null for random weights"
    )
    image_size: int = Field(240, ge=32, description="the square input side in pixels (15 x 15 patches)")
    value_value_from: int = Field(1, ge=1, description="first block of the V-V attention path (AnoVL: every block)")
    # Prompts (AnoVL's class-aware list)
    product: str = Field("object", min_length=1, description="the line's product name in the prompts, e.g. 'bottle'")
    is_texture: bool = Field(False, description="texture prompts (surface picture, textural photo) instead of object ones")
    # Scores (ours where the paper lost the value)
    temperature: float = Field(0.01, gt=0, description="tau of the text softmax (ours: CLIP's 1/100)")
    text_weight: float = Field(
        0.5, ge=0, le=1, description="a: joint map a*text + (1-a)*visual, image score a*s_text + (1-a)*max(map) (ours)"
    )
    map_smoothing: int = Field(3, ge=1, description="r x r mean on the patch grid before upsampling (AnoVL: 3)")
    # Visual reference from the line's earlier frames (ours: the online reading of the paper's pairs)
    bank_size: int = Field(16, ge=1, description="earlier frames kept as possible references (oldest dropped first)")
    references_per_frame: int = Field(1, ge=1, description="R, references drawn per frame (paper: 1, a pair)")
    reference_policy: Literal["uniform", "lowest_score"] = Field(
        "uniform", description="draw references uniformly from the bank, or take those with the lowest past scores"
    )
    # Test-time adaptation (paper sec. 3.3)
    tta_steps: int = Field(2, ge=0, description="AdamW steps per frame (paper: 2); 0 turns TTA off")
    tta_lr: float = Field(1e-3, gt=0, description="AdamW learning rate (ours, as AnoVL)")
    tta_weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay (torch's default; ours)")
    mask_loss_weight: float = Field(1.0, ge=0, description="weight of L_mask (ours: 1)")
    sim_loss_weight: float = Field(1.0, ge=0, description="weight of L_sim (ours: 1)")
    tta_map_weight: float = Field(0.5, ge=0, le=1, description="final map = (1-w) joint + w adapted (ours: 0.5)")
    pseudo_texture: Literal["bank", "noise"] = Field(
        "bank", description="pseudo-anomaly textures from an earlier frame of the line, or procedural noise (DTD is not available)"
    )
    pseudo_blend_max: float = Field(0.8, ge=0, lt=1, description="DRAEM's beta ~ U(0, max) keeps some of the image under the texture")
