"""AdaptCLIP's three learned parts and their checkpoint in the authors' format (sec. 2 of
docs/algorithms/adaptclip.md). D = CLIP's embedding width, P = patches per image.

- `TextualLearner` (Eq. 4): learned context tokens of a normal and an abnormal prompt, fed to
  the frozen text tower as embeddings.
- `VisualLearner` (Eq. 1-3): residual bottleneck MLPs for the patch tokens and the global feature.
- `PromptQueryLearner` (Eq. 5-8): one BatchNorm per compared layer, then a local (map) head and
  a global (image) head, each ONE module shared by all layers.

The checkpoint is a torch file `{"textual_learner": ..., "visual_learner": ..., "pq_learner": ...}`
of these modules' state dicts, key for key (the authors' names, `local_adater` included).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ...config import ConfigError
from ...torch_files import read_torch_file

CHECKPOINT_PARTS = ("textual_learner", "visual_learner", "pq_learner")
PQ_LOCAL_WIDTHS = (128, 64)  # channels of the local head's two upsampling stages
PQ_GLOBAL_WIDTHS = (128, 64)  # hidden widths of the global head


@dataclass(frozen=True)
class AdapterShapes:
    """What the adapters' shapes depend on: the CLIP model's widths and the config."""

    embed_dim: int  # D: the joint embedding width (768 for ViT-L-14-336)
    text_width: int  # the text tower's width (768 for ViT-L-14-336)
    context_length: int  # the text tower's token count (77)
    context_tokens: int  # learned context tokens per prompt (12)
    n_layers: int  # compared layers of the prompt-query adapter (4)


class TextualLearner(nn.Module):
    """Eq. 4: prompts [SOT, ctx_1..ctx_n, ".", EOT, pad...] as token embeddings, with learned
    ctx (`ctx_pos` normal, `ctx_neg` abnormal) and the frozen rest in buffers."""

    def __init__(self, shapes: AdapterShapes):
        super().__init__()
        n, width, length = shapes.context_tokens, shapes.text_width, shapes.context_length
        self.ctx_pos = nn.Parameter(torch.empty(1, 1, n, width).normal_(std=0.02))
        self.ctx_neg = nn.Parameter(torch.empty(1, 1, n, width).normal_(std=0.02))
        for state in ("pos", "neg"):
            self.register_buffer(f"token_prefix_{state}", torch.zeros(1, 1, 1, width))
            self.register_buffer(f"token_suffix_{state}", torch.zeros(1, 1, length - 1 - n, width))
            self.register_buffer(f"tokenized_prompts_{state}", torch.zeros(1, 1, length, dtype=torch.int32))

    @torch.no_grad()
    def fill_frozen_tokens(self, model: nn.Module, tokenizer) -> None:
        """The buffers from the text tower: ids and embeddings of "X X ... X." (one X per ctx token)."""
        n = self.ctx_pos.shape[2]
        ids = tokenizer([" ".join(["X"] * n) + "."]).to(self.ctx_pos.device)  # 1 x L
        embedded = model.token_embedding(ids).float()  # 1 x L x W
        for state in ("pos", "neg"):
            getattr(self, f"token_prefix_{state}").copy_(embedded[:, None, :1])
            getattr(self, f"token_suffix_{state}").copy_(embedded[:, None, 1 + n :])
            getattr(self, f"tokenized_prompts_{state}").copy_(ids[:, None].to(torch.int32))

    def forward(self, model: nn.Module) -> torch.Tensor:
        """w'_n, w'_a: 2 x D, L2-normalized, through `model`'s text tower (differentiable in ctx)."""
        rows = []
        for state in ("pos", "neg"):
            prompt = torch.cat(
                [getattr(self, f"token_prefix_{state}"), getattr(self, f"ctx_{state}"), getattr(self, f"token_suffix_{state}")],
                dim=2,
            )[0]  # 1 x L x W
            ids = getattr(self, f"tokenized_prompts_{state}")[0]  # 1 x L
            rows.append(encode_text_embeddings(model, prompt, ids))
        return F.normalize(torch.cat(rows), dim=-1)


def encode_text_embeddings(model: nn.Module, embeddings: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """OpenCLIP's `encode_text` from token embeddings (B x L x W) instead of ids; the EOT
    position is argmax(ids) as in CLIP. B x D, not normalized."""
    dtype = model.transformer.get_cast_dtype()
    x = embeddings.to(dtype) + model.positional_embedding.to(dtype)
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
    x = x[torch.arange(x.shape[0]), ids.argmax(dim=-1)]
    return x @ model.text_projection if not isinstance(model.text_projection, nn.Linear) else model.text_projection(x)


class ResidualBottleneck(nn.Module):
    """y = x + fc(x), fc = Linear(D, D/4) -> BN -> ReLU -> Linear(D/4, D), no biases; x: ... x D."""

    def __init__(self, width: int):
        super().__init__()
        hidden = width // 4
        self.fc = nn.Sequential(
            nn.Linear(width, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, width, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])  # BatchNorm1d over the feature channels of every token
        return x + self.fc(flat).view_as(x)


class VisualLearner(nn.Module):
    """Eq. 3: the local adapter on patch tokens (named `local_adater` in the authors' files) and
    the global adapter on the global feature."""

    def __init__(self, shapes: AdapterShapes):
        super().__init__()
        self.local_adater = ResidualBottleneck(shapes.embed_dim)
        self.global_adapter = ResidualBottleneck(shapes.embed_dim)


def _local_head(width: int) -> nn.Sequential:
    """D x g x g -> 2 x 4g x 4g: conv, two 2x transposed-conv upsamplings, 1x1 conv to 2 classes."""
    a, b = PQ_LOCAL_WIDTHS
    return nn.Sequential(
        nn.Conv2d(width, a, 3, padding=1, bias=False), nn.BatchNorm2d(a), nn.ReLU(), nn.ConvTranspose2d(a, a, 2, stride=2),
        nn.Conv2d(a, b, 3, padding=1, bias=False), nn.BatchNorm2d(b), nn.ReLU(), nn.ConvTranspose2d(b, b, 2, stride=2),
        nn.Conv2d(b, 2, 1),
    )


def _global_head(width: int) -> nn.Sequential:
    """D -> 2 logits."""
    a, b = PQ_GLOBAL_WIDTHS
    return nn.Sequential(
        nn.Linear(width, a, bias=False), nn.BatchNorm1d(a), nn.ReLU(),
        nn.Linear(a, b, bias=False), nn.BatchNorm1d(b), nn.ReLU(),
        nn.Linear(b, 2, bias=False),
    )


class PromptQueryLearner(nn.Module):
    """Eq. 6-8: `sharebn[l]` per layer; `local_adapter[l]` and `global_adapter[l]` are the same
    module for every l (so the state dict repeats their keys per layer, as the authors')."""

    def __init__(self, shapes: AdapterShapes):
        super().__init__()
        width, n = shapes.embed_dim, shapes.n_layers
        self.sharebn = nn.ModuleList(nn.BatchNorm2d(width) for _ in range(n))
        local, global_ = _local_head(width), _global_head(width)
        self.local_adapter = nn.ModuleList([local] * n)
        self.global_adapter = nn.ModuleList([global_] * n)


class AdaptCLIPAdapters(nn.Module):
    """The three learners under the checkpoint's part names."""

    def __init__(self, shapes: AdapterShapes):
        super().__init__()
        self.shapes = shapes
        self.textual_learner = TextualLearner(shapes)
        self.visual_learner = VisualLearner(shapes)
        self.pq_learner = PromptQueryLearner(shapes)

    def checkpoint(self) -> dict[str, dict[str, torch.Tensor]]:
        """The authors' format: one state dict per part, as CPU copies; a shared head's repeated
        keys share one tensor (so a file stores it once)."""
        copies: dict[int, torch.Tensor] = {}

        def copy(v: torch.Tensor) -> torch.Tensor:
            return copies.setdefault(id(v), v.detach().cpu().clone())

        return {part: {k: copy(v) for k, v in getattr(self, part).state_dict(keep_vars=True).items()}
                for part in CHECKPOINT_PARTS}

    def load_checkpoint(self, checkpoint: dict, source: str, field: str = "detector.weights") -> None:
        """Load `checkpoint` (the authors' format), refusing any missing, extra or misshapen key with
        a message naming `field`, the part and the key. BatchNorm's `num_batches_tracked` may be
        absent. The per-layer copies of a shared head must agree."""
        if not isinstance(checkpoint, dict) or any(p not in checkpoint for p in CHECKPOINT_PARTS):
            found = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
            raise ConfigError(
                f"{field}: {source} is not an AdaptCLIP checkpoint: expected the parts {list(CHECKPOINT_PARTS)}, "
                f"found {found}"
            )
        for part in CHECKPOINT_PARTS:
            module, state = getattr(self, part), checkpoint[part]
            expected = module.state_dict()
            problems = [f"missing {k} {tuple(v.shape)}" for k, v in expected.items()
                        if k not in state and not k.endswith("num_batches_tracked")]
            problems += [f"unexpected {k}" for k in state if k not in expected]
            problems += [
                f"{k} has shape {tuple(state[k].shape)}, expected {tuple(v.shape)}"
                for k, v in expected.items()
                if k in state and tuple(state[k].shape) != tuple(v.shape)
            ]
            if not problems and part == "pq_learner":
                problems = _shared_head_conflicts(state, self.shapes.n_layers)
            if problems:
                raise ConfigError(
                    f"{field}: {source} does not fit this model ({part}): " + "; ".join(f"{part}.{p}" for p in problems)
                    + ". Use the checkpoint trained for this backbone (ViT-L-14-336 for the published files) "
                    "and these patch_blocks and context_tokens."
                )
            module.load_state_dict({k: v for k, v in state.items()}, strict=False)


def _shared_head_conflicts(state: dict[str, torch.Tensor], n_layers: int) -> list[str]:
    """Keys of a shared head whose per-layer copies differ from layer 0's."""
    conflicts = []
    for head in ("local_adapter", "global_adapter"):
        first = {k[len(head) + 3 :]: v for k, v in state.items() if k.startswith(f"{head}.0.")}
        for layer in range(1, n_layers):
            for name, value in first.items():
                key = f"{head}.{layer}.{name}"
                if key in state and not torch.equal(state[key], value):
                    conflicts.append(f"{key} differs from {head}.0.{name} (the head is shared by all layers)")
    return conflicts


def read_checkpoint(path: str, field: str = "detector.weights") -> dict:
    """The torch file at `path`, loaded with weights_only=True (never unpickles code)."""
    return read_torch_file(path, field, "torch checkpoint", "set it to the AdaptCLIP checkpoint (epoch_15.pth) or null")


def save_checkpoint(adapters: AdaptCLIPAdapters, path: str) -> None:
    """Write the authors' format (loadable by their code and by `load_checkpoint`)."""
    Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
    torch.save(adapters.checkpoint(), Path(path).expanduser())
