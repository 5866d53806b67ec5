"""Test-time adaptation (paper sec. 3.3, Eq. 7-11): a linear adapter on the patch tokens, fresh
for every frame, trained for a few AdamW steps so that pseudo-anomalous patches score abnormal
(L_mask) while the query's adapted map stays close to its zero-shot joint map (L_sim)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .text import abnormal_log_probability, abnormal_probability


@dataclass(frozen=True)
class AdaptationSettings:
    steps: int
    lr: float
    weight_decay: float
    mask_weight: float
    sim_weight: float
    temperature: float


class TokenAdapter(torch.nn.Module):
    """L(x) = 0.5 x + 0.5 (W x/|x| + b) (AnoVL's `Adapter`, which its VisA script uses), W and b drawn as torch's Linear
    default (uniform in +-1/sqrt(D)) but from `generator`, so a restored line draws the same."""

    def __init__(self, dim: int, generator: torch.Generator):
        super().__init__()
        bound = dim ** -0.5
        self.weight = torch.nn.Parameter((2 * torch.rand(dim, dim, generator=generator) - 1) * bound)
        self.bias = torch.nn.Parameter((2 * torch.rand(dim, generator=generator) - 1) * bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x + 0.5 * F.linear(F.normalize(x, dim=-1), self.weight, self.bias)


@dataclass
class Adaptation:
    scores: torch.Tensor  # M, the query's adapted abnormal probabilities after the last step (S')
    losses: list[float]  # the total loss before each step and after the last (steps + 1 values)
    adapter: TokenAdapter  # as trained (for inspection)


def adapt(
    query: torch.Tensor,
    pseudo: torch.Tensor,
    pseudo_patches: torch.Tensor,
    target: torch.Tensor,
    text: torch.Tensor,
    settings: AdaptationSettings,
    generator: torch.Generator,
) -> Adaptation:
    """query, pseudo: M x D patch tokens of the query and of its pseudo-anomalous copy;
    pseudo_patches: M bool (Omega); target: M, the zero-shot joint map L_sim keeps S' close to.

    L = mask_weight * L_mask + sim_weight * L_sim, with L_mask = -mean over Omega of
    log S~'_a (ours; zero when Omega is empty) and L_sim = mean (S' - target)^2 (ours)."""
    losses = []
    # autograd on, also when the caller runs under torch.inference_mode (inputs copied out of it)
    with torch.inference_mode(False), torch.enable_grad():
        adapter = TokenAdapter(query.shape[-1], generator).to(query.device)
        optimizer = torch.optim.AdamW(adapter.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
        query, target, text = query.clone(), target.clone(), text.clone()
        masked = pseudo[pseudo_patches].clone()
        for step in range(settings.steps + 1):
            scores = abnormal_probability(F.normalize(adapter(query), dim=-1), text, settings.temperature)
            loss = settings.sim_weight * (scores - target).pow(2).mean()
            if len(masked):
                log_abnormal = abnormal_log_probability(F.normalize(adapter(masked), dim=-1), text, settings.temperature)
                loss = loss - settings.mask_weight * log_abnormal.mean()
            losses.append(float(loss.detach()))
            if step == settings.steps:
                break
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return Adaptation(scores.detach(), losses, adapter.requires_grad_(False))
