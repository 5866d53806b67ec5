"""The text side (paper Eq. 1-3): one embedding per state from the class-aware prompts, and the
softmax over (normal, abnormal) of cosine similarities divided by the temperature."""
from __future__ import annotations

import open_clip
import torch
import torch.nn.functional as F

from ...backbone.text_cache import cached_text_tensor, weights_identity
from .config import DualImageConfig
from .prompts import state_sentences


@torch.no_grad()
def encode_states(model: torch.nn.Module, config: DualImageConfig) -> torch.Tensor:
    """D x 2 (column 0 normal, 1 abnormal): per state the mean of the RAW sentence embeddings,
    then L2-normalized (AnoVL's order: mean first, normalize after)."""
    tokenizer = open_clip.get_tokenizer(config.model)
    device = next(model.parameters()).device
    columns = []
    for abnormal in (False, True):
        tokens = tokenizer(state_sentences(config.product, config.is_texture, abnormal)).to(device)
        columns.append(F.normalize(model.encode_text(tokens).float().mean(0), dim=0))
    return torch.stack(columns, dim=1).cpu()


def state_embeddings(model: torch.nn.Module, config: DualImageConfig) -> torch.Tensor:
    """`encode_states`, cached on disk per model, weights, product and prompt kind."""
    identity = {
        **weights_identity(config),
        "sentences": [state_sentences(config.product, config.is_texture, a) for a in (False, True)],
    }
    return cached_text_tensor(config.text_cache_dir, "dual-image-text", identity, lambda: encode_states(model, config))


def abnormal_probability(features: torch.Tensor, text: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(cos(f, t) / tau)[abnormal] for L2-normalized features ... x D and text D x 2 -> ..."""
    return torch.softmax(features @ text / temperature, dim=-1)[..., 1]


def abnormal_log_probability(features: torch.Tensor, text: torch.Tensor, temperature: float) -> torch.Tensor:
    """log of `abnormal_probability`, computed stably (for L_mask)."""
    return torch.log_softmax(features @ text / temperature, dim=-1)[..., 1]
