"""AFR-CLIP's learned parts and its scoring: linear adapters (Eq. 1-2), CMFR (Eq. 3-6), self-prompting
(Eq. 15-16), MPFA (Eq. 19-21) and text-on-text scoring (Eq. 7-13), one stage at a time.

Shapes: W the vision width, D the embedding dim, P patches (a g x g grid), K prompts, C the CNN's
feature dim. Checkpoint keys: `visual_adapters.{s}`, `text_adapter`, `cmfr`, `sp.proj.{k}`, `sp.prompts`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...ops.maps import neighbourhood_mean


class SelfPrompting(torch.nn.Module):
    """Eq. 15-16: P~_v = stack_k Linear_k(F_cnn) + P_l; B x C -> B x K x W."""

    def __init__(self, cnn_dim: int, width: int, n_prompts: int):
        super().__init__()
        self.proj = torch.nn.ModuleList(torch.nn.Linear(cnn_dim, width) for _ in range(n_prompts))
        self.prompts = torch.nn.Parameter(0.02 * torch.randn(n_prompts, width))  # P_l [ours: N(0, 0.02)]

    def forward(self, cnn_features: torch.Tensor) -> torch.Tensor:
        return torch.stack([proj(cnn_features) for proj in self.proj], dim=1) + self.prompts


class CrossModalRectification(torch.nn.Module):
    """CMFR, Eq. 3-6: per token, [F_v,i ; F_t^s] -> Conv -> ReLU -> Conv -> Sigmoid -> Linear
    -> (M_v,i, M_t,i); F_t,i^s = F_t^s + F_v,i * M_v,i. [ours: 1x1 convolutions 2D -> D -> 2D,
    Linear(2D, 2D)]. M_t,i is computed (the paper's split) but no equation uses it."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv1 = torch.nn.Conv1d(2 * dim, dim, kernel_size=1)
        self.conv2 = torch.nn.Conv1d(dim, 2 * dim, kernel_size=1)
        self.linear = torch.nn.Linear(2 * dim, 2 * dim)

    def forward(self, visual: torch.Tensor, stateless: torch.Tensor) -> torch.Tensor:
        """visual: B x N x D, stateless F_t^s: B x D -> rectified text embeddings B x N x D."""
        pairs = torch.cat([visual, stateless[:, None].expand_as(visual)], dim=-1)  # B x N x 2D (Eq. 3)
        hidden = torch.sigmoid(self.conv2(torch.relu(self.conv1(pairs.transpose(1, 2)))))  # B x 2D x N
        m_visual = self.linear(hidden.transpose(1, 2))[..., : visual.shape[-1]]  # Eq. 4-5: M_v, B x N x D
        return stateless[:, None] + visual * m_visual  # Eq. 6


class AFRCLIPHeads(torch.nn.Module):
    """Everything AFR-CLIP learns; CLIP and the CNN stay frozen."""

    def __init__(self, width: int, embed_dim: int, cnn_dim: int, n_stages: int, n_prompts: int):
        super().__init__()
        self.visual_adapters = torch.nn.ModuleList(torch.nn.Linear(width, embed_dim) for _ in range(n_stages))  # Eq. 1
        self.text_adapter = torch.nn.Linear(embed_dim, embed_dim)  # Eq. 2, shared by the three prompts
        self.cmfr = CrossModalRectification(embed_dim)
        self.sp = SelfPrompting(cnn_dim, width, n_prompts)

    def stage_logits(
        self, stage_tokens: list[torch.Tensor], text: torch.Tensor, grid: int, mpfa_size: int, temperature: float
    ) -> torch.Tensor:
        """Per stage and token the two-class logits [S_n, S_a] / tau (Eq. 7-8, 11-12); softmax
        of them is Eq. 9 / 13. stage_tokens: per stage B x (1 + P) x W (class token first);
        text: B x 3 x D, the frozen embeddings of the normal, abnormal and stateless prompts.
        Returns n_stages x B x (1 + P) x 2."""
        normal, abnormal, stateless = self.text_adapter(text).unbind(1)  # Eq. 2, each B x D
        prototypes = F.normalize(torch.stack([normal, abnormal], dim=1), dim=-1)  # B x 2 x D
        out = []
        for adapter, tokens in zip(self.visual_adapters, stage_tokens):
            visual = adapter(tokens)  # Eq. 1, B x (1 + P) x D
            patches = neighbourhood_mean(visual[:, 1:], grid, mpfa_size, border="inside")  # MPFA, Eq. 19-21
            visual = torch.cat([visual[:, :1], patches], dim=1)
            rectified = F.normalize(self.cmfr(visual, stateless), dim=-1)  # Eq. 6 / 10
            out.append(rectified @ prototypes.transpose(1, 2) / temperature)  # cosines, B x (1 + P) x 2
        return torch.stack(out)
