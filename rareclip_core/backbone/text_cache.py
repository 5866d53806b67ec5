"""A disk cache for text embeddings: the text tower runs once per (model, weights, prompts)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Optional

import open_clip
import torch
from safetensors.torch import load_file, save_file

from ..config import DetectorSettings
from .clip import uses_quick_gelu


def weights_identity(config: DetectorSettings) -> dict:
    """What identifies the text tower's weights: model, tag or file (path, size, mtime), its
    activation; for seeded random weights the seed and the image size (the text tower is drawn
    after a vision tower whose size follows the image size)."""
    pretrained = config.pretrained
    if pretrained is not None and Path(pretrained).expanduser().is_file():
        stat = Path(pretrained).expanduser().stat()
        pretrained = f"{Path(pretrained).expanduser().resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    return {
        "model": config.model,
        "pretrained": pretrained,
        "quick_gelu": uses_quick_gelu(config),
        "seed": config.seed if config.pretrained is None else None,
        "image_size": config.image_size if config.pretrained is None else None,
        "open_clip": open_clip.__version__,
    }


def cached_text_tensor(
    cache_dir: Optional[str], name: str, identity: dict, compute: Callable[[], torch.Tensor]
) -> torch.Tensor:
    """`compute()` once per `identity` (a JSON-able dict), kept as `<cache_dir>/<name>-<hash>.safetensors`;
    `cache_dir` None computes every time. A broken cache file is recomputed."""
    if cache_dir is None:
        return compute()
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]
    cache = Path(cache_dir).expanduser() / f"{name}-{key}.safetensors"
    if cache.is_file():
        try:
            return load_file(str(cache))["tensor"]
        except Exception:  # noqa: BLE001 - a broken cache file is recomputed
            cache.unlink(missing_ok=True)
    tensor = compute().contiguous()
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".tmp{id(tensor)}")
    save_file({"tensor": tensor}, str(tmp))
    tmp.replace(cache)
    return tensor
