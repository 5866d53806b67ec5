"""RareCLIPConfig: every knob of RareCLIP with the paper's and the authors' defaults
(docs/algorithms/rareclip.md)."""
from __future__ import annotations

from typing import ClassVar, Literal, Optional

from pydantic import Field, model_validator

from ...config import DetectorSettings


class RareCLIPConfig(DetectorSettings):
    """RareCLIP detector settings. Defaults are the paper's and the authors' (docs/algorithms/rareclip.md)."""

    kind: Literal["rareclip"] = "rareclip"
    weight_fields: ClassVar[tuple[str, ...]] = ("tpb_weights",)
    block_fields: ClassVar[tuple[str, ...]] = ("rarity_blocks", "text_blocks")
    execution_fields: ClassVar[frozenset[str]] = DetectorSettings.execution_fields | {"cuda_graphs", "compile_banks"}
    # Backbone (sec. 1): model, pretrained, image_size, seed, device, precision (DetectorSettings)
    quick_gelu: Optional[bool] = Field(
        False,
        description="whether the towers' MLPs use QuickGELU; false as the authors run it: their OpenCLIP (APRIL-GAN's) "
        "builds OpenAI's model resized to 518 px with GELU, and their TPB weights were trained on those features; "
        "null: as the weights were trained (OpenAI's: QuickGELU)",
    )
    rarity_blocks: list[int] = Field(default_factory=lambda: [6, 12, 18, 24], min_length=1,
                                     description="ViT blocks (1-indexed) whose patch tokens fill the rarity banks")
    text_blocks: list[int] = Field(default_factory=lambda: [12, 16, 20, 24], min_length=1,
                                   description="ViT blocks (1-indexed) that the text branch's linear layers read")
    scales: list[int] = Field(default_factory=lambda: [1, 3], min_length=1,
                              description="neighbourhood sizes averaged before the banks (1: the patch itself); a bank per block and scale")
    cuda_graphs: bool = Field(
        False,
        description="on CUDA, replay the backbone as one CUDA graph per batch size (fewer launches; "
        "its GPU memory is held per batch size); ignored on CPU",
    )
    compile_banks: bool = Field(
        False,
        description="torch.compile the IPRB bank stack's step once the banks are full (their shapes are fixed "
        "from then on): fused kernels, far fewer launches; compiled when the detector is built (seconds); "
        "IPRB with the scs sampler only",
    )
    bank_dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32",
        description="storage of the banks' patch features; float16/bfloat16 halve it but move scores by "
        "more than 1e-3 (SCS choices flip on near-ties): check with benchmarks/precision_effect.py",
    )
    # Text prompt branch (sec. 2)
    tpb_weights: Optional[str] = Field(
        None, description="TPB checkpoint (authors' format, key `trainable_linearlayer`)"
    )
    text_temperature: float = Field(20.0, gt=0, description="T of the text branch's softmax over <patch, state> (Eq. 1)")
    foreground_ratio: float = Field(
        0.5, gt=0, le=1, description="LAIFs average the floor(ratio M) patches highest in the mean text map"
    )
    # Patch rarity (sec. 3)
    rarity_branch: Literal["iprb", "dprb"] = Field("iprb", description="iprb: RareCLIP's indirect patch rarity; dprb: RareCLIP-d's direct one")
    max_features: int = Field(4107, ge=1, description="N_F, patch feature memory size")
    max_images: int = Field(200, ge=1, description="N_I,max, remembered images")
    k_neighbors: int = Field(3, ge=1, description="K, nearest memorized features per test patch")
    rarity_ratio: float = Field(0.3, gt=0, le=1, description="X, top share of images")
    loose_ratio: float = Field(0.01, ge=0, lt=1, description="Y, loose similarity degree")
    sampler: Literal["scs", "random", "kmeans", "greedy"] = Field(
        "scs", description="how the memory is cut down: sequential coreset (the paper), or the ablation's random, k-means, greedy coreset"
    )
    dprb_alpha: float = Field(
        0.333, gt=0, le=1, description="RareCLIP-d keeps int(alpha M) features per image (the authors' 0.333: 455 of 1369)"
    )
    dprb_reference_loose_ratio: float = Field(
        0.02, ge=0, lt=1, description="RareCLIP-d's k-shot map: Y of its loose similarity (the authors' 0.02)"
    )
    # Image rarity and re-scoring (sec. 4-5)
    image_memory_size: int = Field(1000, ge=1, description="images whose embeddings and scores re-scoring keeps")
    blur_sigma: float = Field(4.0, gt=0, description="Gaussian blur of the anomaly map: sigma in pixels")
    blur_kernel: int = Field(25, ge=1, description="Gaussian blur of the anomaly map: kernel side (odd)")
    rescore_min_images: int = Field(20, ge=0, description="Eq. 22 re-scores once more images than this are remembered")
    rescore_divisor: int = Field(20, ge=1, description="Eq. 22 averages over the ceil(n / divisor) most similar images ...")
    rescore_max_neighbors: int = Field(9, ge=1, description="... but at most this many")
    rescore_temperature: float = Field(200.0, gt=0, description="Eq. 22's softmax temperature over the similarities")
    # Modes (sec. 6)
    mode: Literal["online", "offline"] = Field(
        "online", description="online: the memories learn from every frame; offline: they stay as the references left them (order-free)"
    )

    @model_validator(mode="after")
    def _check(self):
        if self.blur_kernel % 2 == 0:
            raise ValueError(f"blur_kernel must be odd, got {self.blur_kernel}")
        for name in ("rarity_blocks", "text_blocks"):
            if any(b < 1 for b in getattr(self, name)):
                raise ValueError(f"{name} are 1-indexed transformer blocks (>= 1)")
        if any(r < 1 or r % 2 == 0 for r in self.scales):
            raise ValueError(f"scales must be odd neighbourhood sizes >= 1, got {self.scales}")
        if self.compile_banks and (self.rarity_branch, self.sampler) != ("iprb", "scs"):
            raise ValueError(
                f"compile_banks compiles the IPRB banks with the scs sampler, not rarity_branch {self.rarity_branch!r} "
                f"with sampler {self.sampler!r}: set compile_banks: false"
            )
        return self
