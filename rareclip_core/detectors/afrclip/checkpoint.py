"""AFR-CLIP's checkpoint format [ours; no official one exists]: one `torch.save` dict
{"config": {...}, "state_dict": {...}} with the learned parts only (keys `visual_adapters.{s}.*`,
`text_adapter.*`, `cmfr.*`, `sp.proj.{k}.*`, `sp.prompts`; CLIP and the CNN are not included).
`config` holds what fixes the shapes (`AFRCLIPConfig.heads_shape`). Training checkpoints add a
`training` entry (epoch, optimizer state, losses) that the detector ignores."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from ...config import ConfigError
from ...data.files import atomic_write
from ...torch_files import read_torch_file
from .config import AFRCLIPConfig
from .parts import AFRCLIPHeads


def new_heads(config: AFRCLIPConfig, width: int, embed_dim: int, cnn_dim: int) -> AFRCLIPHeads:
    """Learned parts with seeded random initial values (`config.seed`), global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return AFRCLIPHeads(width, embed_dim, cnn_dim, len(config.stage_blocks), config.n_prompts)


def load_heads(config: AFRCLIPConfig, width: int, embed_dim: int, cnn_dim: int) -> AFRCLIPHeads:
    """`new_heads`, then `config.weights` when set (eval mode, frozen)."""
    heads = new_heads(config, width, embed_dim, cnn_dim)
    if config.weights is not None:
        checkpoint = read_checkpoint(config.weights, "detector.weights")
        apply_checkpoint(heads, checkpoint, config.heads_shape(width, embed_dim, cnn_dim), config.weights)
    return heads.eval().requires_grad_(False)


def read_checkpoint(path: str | Path, field: str) -> dict:
    """The checkpoint dict at `path` (weights_only=True: nothing is unpickled); ConfigError
    naming `field` when the file is missing or not in this format."""
    checkpoint = read_torch_file(path, field, "AFR-CLIP checkpoint",
                                 "train one with `run_cluster.py train-afrclip` or set it to null")
    if not isinstance(checkpoint, dict) or not {"config", "state_dict"} <= set(checkpoint):
        raise ConfigError(f"{field}: {path} is not an AFR-CLIP checkpoint (expected a dict with 'config' and 'state_dict')")
    return checkpoint


def apply_checkpoint(heads: AFRCLIPHeads, checkpoint: dict, shape: dict, path: str | Path, field: str = "detector.weights") -> None:
    """Load the checkpoint's learned parts; ConfigError listing missing, unexpected or
    mismatched keys (and the settings that differ) when it was made for another model."""
    state = checkpoint["state_dict"]
    expected = heads.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or mismatched:
        saved = checkpoint.get("config", {})
        differ = {k: (saved.get(k), v) for k, v in shape.items() if saved.get(k) != v}
        raise ConfigError(
            f"{field}: {path} does not fit this detector: missing keys {missing}, unexpected keys "
            f"{unexpected}, shape mismatches {mismatched}; settings (checkpoint, this config) that differ: {differ}. "
            "Use a checkpoint trained with the same model, cnn, stage_blocks and n_prompts."
        )
    heads.load_state_dict(state)


def save_checkpoint(heads: AFRCLIPHeads, shape: dict, path: str | Path, training: Optional[dict] = None) -> None:
    """Write the format above atomically (a reader never sees half a file)."""
    content = {"config": dict(shape), "state_dict": {k: v.detach().cpu().clone() for k, v in heads.state_dict().items()}}
    if training is not None:
        content["training"] = training
    atomic_write(Path(path), lambda tmp: torch.save(content, tmp))
