"""The CLIP model names a detector may give (`detector.model`): OpenCLIP's model configs and the
project's own (`rareclip-tiny`), read from their JSON files, so that a configuration is checked
without importing OpenCLIP or torch."""
from __future__ import annotations

import difflib
import functools
import importlib.util
import json
from pathlib import Path
from typing import Optional

MODEL_CONFIG_DIR = Path(__file__).parent / "backbone" / "model_configs"  # the project's model configs


@functools.cache
def _model_config_files() -> dict[str, Path]:
    """Model name -> its JSON file: OpenCLIP's `model_configs` folder and MODEL_CONFIG_DIR."""
    spec = importlib.util.find_spec("open_clip")
    folders = [*(Path(p) / "model_configs" for p in (spec.submodule_search_locations or [])), MODEL_CONFIG_DIR]
    return {path.stem: path for folder in folders for path in sorted(folder.glob("*.json"))}


def openclip_model_names() -> frozenset[str]:
    """What `open_clip.list_models()` says once the project's configs are added."""
    return frozenset(_model_config_files())


@functools.cache
def _model_config(name: str) -> dict:
    return json.loads(_model_config_files()[name].read_text())


def _vision_config(name: str) -> dict:
    return _model_config(name).get("vision_cfg", {})


def model_uses_quick_gelu(name: str) -> bool:
    """Whether the model's own config makes its MLPs QuickGELU (OpenCLIP's '-quickgelu' names);
    False for a name with no config (a kind that names no OpenCLIP model)."""
    return name in _model_config_files() and bool(_model_config(name).get("quick_gelu", False))


def vision_depth(name: str) -> Optional[int]:
    """The number of transformer blocks of the model's vision tower, from its JSON config; None
    where that tower is no OpenCLIP ViT (a ResNet, whose `layers` is a list; a timm model)."""
    vision = _vision_config(name)
    layers = vision.get("layers")
    return layers if isinstance(layers, int) and "timm_model_name" not in vision else None


def vision_patch_size(name: str) -> int:
    """The patch side of the model's ViT, in pixels (call it where `vision_depth` is not None)."""
    patch = _vision_config(name)["patch_size"]
    return patch if isinstance(patch, int) else patch[0]


def model_name_problem(name: str) -> Optional[str]:
    """Why `name` is no model name (with the closest ones), or None."""
    if name in openclip_model_names():
        return None
    by_lower = {known.lower(): known for known in sorted(openclip_model_names())}
    close = [by_lower[match] for match in difflib.get_close_matches(name.lower(), by_lower, n=3, cutoff=0.6)]
    hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
    return f"not an OpenCLIP model name{hint} (the paper's is 'ViT-L-14-336'; 'rareclip-tiny' is the small test model)"


def model_problem(name: str) -> Optional[str]:
    """Why a detector cannot use `name`: no model of that name, or no ViT (every detector reads
    a ViT's patch tokens by block); None when it can."""
    problem = model_name_problem(name)
    if problem is None and vision_depth(name) is None:
        problem = "its vision tower is not OpenCLIP's own ViT (it is a ResNet or a timm model); the detectors read that ViT's patch tokens block by block"
    return problem
