"""The CLIP model names a detector may give (`detector.model`): OpenCLIP's model configs and the
project's own (`rareclip-tiny`), read from their JSON files, so that a configuration is checked
without importing OpenCLIP or torch."""
from __future__ import annotations

import difflib
import functools
import importlib.util
from pathlib import Path
from typing import Optional

MODEL_CONFIG_DIR = Path(__file__).parent / "backbone" / "model_configs"  # the project's model configs


@functools.cache
def openclip_model_names() -> frozenset[str]:
    """What `open_clip.list_models()` says once the project's configs are added: one name per
    JSON file of OpenCLIP's `model_configs` folder and of MODEL_CONFIG_DIR."""
    spec = importlib.util.find_spec("open_clip")
    folders = [MODEL_CONFIG_DIR, *(Path(p) / "model_configs" for p in (spec.submodule_search_locations or []))]
    return frozenset(path.stem for folder in folders for path in folder.glob("*.json"))


def model_name_problem(name: str) -> Optional[str]:
    """Why `name` is no model name (with the closest ones), or None."""
    if name in openclip_model_names():
        return None
    by_lower = {known.lower(): known for known in sorted(openclip_model_names())}
    close = [by_lower[match] for match in difflib.get_close_matches(name.lower(), by_lower, n=3, cutoff=0.6)]
    hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
    return f"not an OpenCLIP model name{hint} (the paper's is 'ViT-L-14-336'; 'rareclip-tiny' is the small test model)"
