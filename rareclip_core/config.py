"""DetectorConfig: every knob of RareCLIP with the paper's defaults (docs/algorithms/rareclip.md)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(top level)"
        lines.append(f"  {field}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def read_yaml(path: str | Path) -> dict:
    """A YAML file's mapping, or ConfigError naming the file and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of settings, not {type(data).__name__}")
    return data


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @classmethod
    def from_dict(cls, data: dict, source: str = "<dict>"):
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise ConfigError(format_validation_error(err, source)) from None

    @classmethod
    def from_yaml(cls, path: str | Path, section: Optional[str] = None):
        """Load from a YAML file; `section` picks a top-level key (e.g. `detector`)."""
        data = read_yaml(path)
        if section is not None:
            if section not in data:
                raise ConfigError(f"{path} has no top-level `{section}:` section")
            data = data[section]
        return cls.from_dict(data, source=str(path) + (f" [{section}]" if section else ""))


class DetectorConfig(StrictModel):
    """RareCLIP detector settings. Defaults are the paper's and the authors' (docs/algorithms/rareclip.md)."""

    # Backbone (sec. 1)
    model: str = "ViT-L-14-336"
    pretrained: Optional[str] = Field(
        "openai", description="'openai', a local checkpoint path, or null for random weights"
    )
    image_size: int = Field(518, ge=32)
    seed: int = Field(0, description="seeds random weights (pretrained: null) and samplers")
    rarity_blocks: list[int] = Field(default_factory=lambda: [6, 12, 18, 24], min_length=1)
    text_blocks: list[int] = Field(default_factory=lambda: [12, 16, 20, 24], min_length=1)
    scales: list[int] = Field(default_factory=lambda: [1, 3], min_length=1)
    device: str = Field("auto", description="'auto' (cuda when available), 'cpu', 'cuda', 'cuda:N'")
    precision: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        "auto", description="backbone precision; 'auto' is fp16 on CUDA and fp32 on CPU"
    )
    bank_dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32",
        description="storage of the banks' patch features; float16/bfloat16 halve it but move scores by "
        "more than 1e-3 (SCS choices flip on near-ties): check with benchmarks/bank_precision.py",
    )
    # Text prompt branch (sec. 2)
    tpb_weights: Optional[str] = Field(
        None, description="TPB checkpoint (authors' format, key `trainable_linearlayer`)"
    )
    text_temperature: float = Field(20.0, gt=0)
    text_cache_dir: Optional[str] = Field(
        "~/.cache/rareclip", description="where cached text embeddings live; null disables"
    )
    foreground_ratio: float = Field(
        0.5, gt=0, le=1, description="LAIFs average the floor(ratio M) patches highest in the mean text map"
    )
    # Patch rarity (sec. 3)
    rarity_branch: Literal["iprb", "dprb"] = "iprb"
    max_features: int = Field(4107, ge=1, description="N_F, patch feature memory size")
    max_images: int = Field(200, ge=1, description="N_I,max, remembered images")
    k_neighbors: int = Field(3, ge=1)
    rarity_ratio: float = Field(0.3, gt=0, le=1, description="X, top share of images")
    loose_ratio: float = Field(0.01, ge=0, lt=1, description="Y, loose similarity degree")
    sampler: Literal["scs", "random", "kmeans", "greedy"] = "scs"
    dprb_alpha: float = Field(
        0.333, gt=0, le=1, description="RareCLIP-d keeps int(alpha M) features per image (the authors' 0.333: 455 of 1369)"
    )
    dprb_reference_loose_ratio: float = Field(
        0.02, ge=0, lt=1, description="RareCLIP-d's k-shot map: Y of its loose similarity (the authors' 0.02)"
    )
    # Image rarity and re-scoring (sec. 4-5)
    image_memory_size: int = Field(1000, ge=1)
    blur_sigma: float = Field(4.0, gt=0)
    blur_kernel: int = Field(25, ge=1)
    rescore_min_images: int = Field(20, ge=0)
    rescore_divisor: int = Field(20, ge=1)
    rescore_max_neighbors: int = Field(9, ge=1)
    rescore_temperature: float = Field(200.0, gt=0)
    # Modes (sec. 6)
    mode: Literal["online", "offline"] = "online"

    @model_validator(mode="after")
    def _check(self):
        if self.blur_kernel % 2 == 0:
            raise ValueError(f"blur_kernel must be odd, got {self.blur_kernel}")
        for name in ("rarity_blocks", "text_blocks"):
            if any(b < 1 for b in getattr(self, name)):
                raise ValueError(f"{name} are 1-indexed transformer blocks (>= 1)")
        if any(r < 1 or r % 2 == 0 for r in self.scales):
            raise ValueError(f"scales must be odd neighbourhood sizes >= 1, got {self.scales}")
        return self

    def fingerprint(self) -> str:
        """Hash of every setting that changes the detector's state or results."""
        data = self.model_dump(exclude={"device", "text_cache_dir"})
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
