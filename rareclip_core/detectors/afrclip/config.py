"""AFRCLIPConfig: AFR-CLIP's settings. Defaults are the paper's where it gives them; the fields
marked [ours] fill its gaps (docs/algorithms/afrclip.md, "Our choices")."""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal, Optional

from pydantic import Field, field_validator

from ...config import DetectorSettings, names_a_file


class AFRCLIPConfig(DetectorSettings):
    """AFR-CLIP detector settings (backbone fields from DetectorSettings: ViT-L-14-336 at 518)."""

    kind: Literal["afrclip"] = "afrclip"
    weight_fields: ClassVar[tuple[str, ...]] = ("weights",)
    input_view: ClassVar[str] = "squash"  # the paper: "all images are resized to 518x518"
    position_resize: ClassVar[str] = "bilinear"  # not stated; as AdaptCLIP's authors [ours]
    block_fields: ClassVar[tuple[str, ...]] = ("stage_blocks", "prompt_blocks")
    weights: Optional[str] = Field(
        None,
        description="checkpoint of the learned parts (adapters, CMFR, self-prompting), written by "
        "`run_cluster.py train-afrclip`; null: seeded random parts (tests only)",
    )
    product: str = Field("object", min_length=1, description="the line's product name c in the prompts [ours: fallback 'object']")
    stage_blocks: list[int] = Field(
        default_factory=lambda: [6, 12, 18, 24], min_length=1, description="1-indexed blocks ending the stages"
    )
    # Self-prompting (Eq. 15-18)
    n_prompts: int = Field(5, ge=1, description="K, visual prompt tokens")
    prompt_blocks: list[int] = Field(
        default_factory=lambda: [2, 3, 4, 5, 6],
        min_length=1,
        description="blocks fed the prompt tokens: appended before the first, refreshed before the others, "
        "dropped after the last [ours: the paper overwrites K patch tokens]",
    )
    cnn: str = Field("wide_resnet50_2", description="torchvision model builder of the prompt CNN [ours]; a ResNet-like model with `fc`")
    cnn_weights: Optional[str] = Field(
        "IMAGENET1K_V1",
        description="torchvision weights name (e.g. IMAGENET1K_V1), a local state-dict file, or null for random weights",
    )
    cnn_image_size: Optional[int] = Field(None, ge=32, description="side of the CNN's input [ours]; null: image_size")
    # Scoring (Eq. 7-14, 19-21)
    mpfa_size: int = Field(3, ge=1, description="m, MPFA neighbourhood side (odd)")
    temperature: float = Field(1.0, gt=0, description="tau in softmax(S / tau) [ours]; 1.0 is the paper's Eq. 9 and 13")

    @field_validator("mpfa_size")
    @classmethod
    def _odd(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError(f"must be odd, got {value}")
        return value

    @field_validator("stage_blocks")
    @classmethod
    def _increasing(cls, value: list[int]) -> list[int]:
        if value[0] < 1 or sorted(set(value)) != value:
            raise ValueError(f"must be increasing 1-indexed blocks, got {value}")
        return value

    @field_validator("prompt_blocks")
    @classmethod
    def _consecutive(cls, value: list[int]) -> list[int]:
        if value[0] < 2 or value != list(range(value[0], value[0] + len(value))):
            raise ValueError(f"must be consecutive blocks from 2 on (block 1 runs unchanged), got {value}")
        return value

    def weight_file_problems(self) -> list[str]:
        """`weights`, `pretrained` and, where it names a file rather than a torchvision weights
        name, `cnn_weights` (checked before a job starts its actors)."""
        missing = super().weight_file_problems()
        cnn = self.cnn_weights
        if cnn is not None and names_a_file(cnn) and not Path(cnn).expanduser().is_file():
            missing.append(f"detector.cnn_weights: no file at {cnn!r}; set it to the downloaded {self.cnn} "
                           "state dict, a torchvision weights name, or null for random weights (tests only)")
        return missing

    def heads_shape(self, width: int, embed_dim: int, cnn_dim: int) -> dict:
        """What fixes the learned parts' shapes (a checkpoint's `config`)."""
        return {"model": self.model, "width": width, "embed_dim": embed_dim, "cnn": self.cnn, "cnn_dim": cnn_dim,
                "stages": len(self.stage_blocks), "n_prompts": self.n_prompts}
