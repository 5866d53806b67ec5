"""Text prompt branch (TPB): prompt embeddings, the 4 linear layers, Eq. 1-3 (sec. 2)."""
from __future__ import annotations

import warnings
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F

from ...backbone.text_cache import cached_text_tensor, weights_identity
from ...config import ConfigError
from ...torch_files import read_torch_file
from .config import RareCLIPConfig
from .prompts import ABNORMAL_STATES, NORMAL_STATES, state_sentences

TPB_CHECKPOINT_KEY = "trainable_linearlayer"


class TextProjection(torch.nn.Module):
    """One learnable Linear(C, D) per TPB block; state dict keys `fc.{i}.weight|bias` as the authors'."""

    def __init__(self, width: int, embed_dim: int, n_blocks: int):
        super().__init__()
        self.fc = torch.nn.ModuleList(torch.nn.Linear(width, embed_dim) for _ in range(n_blocks))

    def forward(self, tokens: list[torch.Tensor]) -> list[torch.Tensor]:
        """tokens: per block B x M x C -> per block B x M x D, L2-normalized."""
        return [F.normalize(fc(t), dim=-1) for fc, t in zip(self.fc, tokens)]


def init_text_projection(config: RareCLIPConfig, width: int, embed_dim: int) -> TextProjection:
    """Seeded random layers, or the configured checkpoint in the authors' format."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        projection = TextProjection(width, embed_dim, len(config.text_blocks))
    if config.tpb_weights is not None:
        load_tpb_checkpoint(projection, config.tpb_weights)
    elif config.pretrained is not None:
        warnings.warn(
            "detector.tpb_weights is not set: the text branch's linear layers are untrained, so its "
            "maps are noise. Set it to a TPB checkpoint (or train one with `run_cluster.py train-tpb`).",
            stacklevel=2,
        )
    return projection.eval().requires_grad_(False)


def load_tpb_checkpoint(projection: TextProjection, path: str) -> None:
    """Load a torch checkpoint `{'trainable_linearlayer': {'fc.i.weight': D x C, 'fc.i.bias': D}}`."""
    checkpoint = read_torch_file(path, "detector.tpb_weights", "TPB checkpoint", "set it to a TPB checkpoint or null")
    if not isinstance(checkpoint, dict) or TPB_CHECKPOINT_KEY not in checkpoint:
        raise ConfigError(f"detector.tpb_weights: {path} is not a TPB checkpoint (no '{TPB_CHECKPOINT_KEY}' key)")
    state = checkpoint[TPB_CHECKPOINT_KEY]
    expected = projection.state_dict()
    mismatched = [
        k for k in expected if k not in state or tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if mismatched or len(state) != len(expected):
        shapes = {k: tuple(v.shape) for k, v in state.items()}
        raise ConfigError(
            f"{path}: TPB layers do not fit this backbone/text_blocks; expected "
            f"{ {k: tuple(v.shape) for k, v in expected.items()} }, got {shapes}"
        )
    projection.load_state_dict(state)


def save_tpb_checkpoint(projection: TextProjection, path: str) -> None:
    """Write the authors' format, loadable by their code and by `load_tpb_checkpoint`."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().clone() for k, v in projection.state_dict().items()}
    torch.save({TPB_CHECKPOINT_KEY: state}, path)


@torch.inference_mode()
def encode_state_embeddings(model: torch.nn.Module, tokenizer) -> torch.Tensor:
    """F_text, D x 2 (column 0 normal, 1 abnormal): per state, mean of normalized sentences, normalized."""
    columns = []
    device = next(model.parameters()).device
    for states in (NORMAL_STATES, ABNORMAL_STATES):
        tokens = tokenizer(state_sentences(states)).to(device)
        emb = F.normalize(model.encode_text(tokens).float(), dim=-1).mean(0)
        columns.append(F.normalize(emb, dim=0))
    return torch.stack(columns, dim=1).cpu()


def cached_state_embeddings(config: RareCLIPConfig, model: torch.nn.Module) -> torch.Tensor:
    """F_text from the text cache (`backbone.text_cache`) or computed with the text tower once."""
    identity = {**weights_identity(config), "prompts": [state_sentences(NORMAL_STATES), state_sentences(ABNORMAL_STATES)]}
    return cached_text_tensor(
        config.text_cache_dir, "text", identity, lambda: encode_state_embeddings(model, open_clip.get_tokenizer(config.model))
    )


def text_anomaly_map(projected: list[torch.Tensor], text_features: torch.Tensor, temperature: float) -> torch.Tensor:
    """Eq. 1: A_text = mean over blocks of softmax(T <F~, F_text>)[abnormal]; B x M x D -> B x M."""
    probs = [torch.softmax(temperature * p @ text_features, dim=-1)[..., 1] for p in projected]
    return torch.stack(probs).mean(0)


def text_image_score(image_embedding: torch.Tensor, text_features: torch.Tensor, temperature: float) -> torch.Tensor:
    """Eq. 2: c_text = softmax(T <F_image, F_text>)[abnormal]; B x D -> B."""
    return torch.softmax(temperature * image_embedding @ text_features, dim=-1)[..., 1]
