"""Memory samplers of the ablation (Table 3) other than SCS: random, k-means, greedy coreset.

Each returns the ascending indices of the n_keep features to keep; protected rows (k-shot
references) are always kept. SCS itself lives in `memory` (incremental, inside the bank).
"""
from __future__ import annotations

import torch


def random_indices(n: int, n_keep: int, protected: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Protected rows plus a uniform random choice of the others."""
    free = (~protected).nonzero().squeeze(1)
    n_free = n_keep - int(protected.sum())
    pick = free[torch.randperm(free.numel(), generator=generator)[:n_free].to(free.device)]
    return torch.cat([protected.nonzero().squeeze(1), pick]).sort().values


def greedy_coreset_indices(features: torch.Tensor, n_keep: int, protected: torch.Tensor) -> torch.Tensor:
    """PatchCore's greedy k-center coreset: start from the protected rows (or row 0), then add
    the feature farthest (1 - cosine) from everything chosen until n_keep are chosen."""
    chosen = protected.clone()
    if not chosen.any():
        chosen[0] = True
    distance = 1 - (features @ features[chosen].T).max(dim=1).values  # N
    distance[chosen] = float("-inf")
    for _ in range(n_keep - int(chosen.sum())):
        i = int(distance.argmax())
        chosen[i] = True
        distance = torch.minimum(distance, 1 - features @ features[i])
        distance[chosen] = float("-inf")
    return chosen.nonzero().squeeze(1)


def kmeans_indices(
    features: torch.Tensor, n_keep: int, protected: torch.Tensor, generator: torch.Generator, iterations: int = 10
) -> torch.Tensor:
    """Spherical k-means over the unprotected features with n_keep - |protected| centroids; each
    centroid keeps its nearest feature. Duplicate picks are filled by the most novel remaining
    features (lowest max similarity to those kept)."""
    free = (~protected).nonzero().squeeze(1)
    n_free = n_keep - int(protected.sum())
    points = features[free]  # F x C
    init = torch.randperm(points.shape[0], generator=generator)[:n_free].to(points.device)
    centroids = points[init]
    for _ in range(iterations):
        assign = (points @ centroids.T).argmax(dim=1)
        sums = torch.zeros_like(centroids).index_add_(0, assign, points)
        counts = torch.bincount(assign, minlength=n_free)
        moved = counts > 0
        centroids[moved] = torch.nn.functional.normalize(sums[moved], dim=1)
    picked = torch.zeros(points.shape[0], dtype=torch.bool, device=points.device)
    picked[(centroids @ points.T).argmax(dim=1)] = True
    missing = n_free - int(picked.sum())
    if missing > 0:
        novelty = (points @ points[picked].T).max(dim=1).values
        novelty[picked] = float("inf")
        picked[torch.argsort(novelty, stable=True)[:missing]] = True
    keep = protected.clone()
    keep[free[picked]] = True
    return keep.nonzero().squeeze(1)


def select(name: str, features: torch.Tensor, n_keep: int, protected: torch.Tensor, generator) -> torch.Tensor:
    """Dispatch by the config's `sampler` name."""
    if name == "random":
        return random_indices(features.shape[0], n_keep, protected, generator)
    if name == "greedy":
        return greedy_coreset_indices(features, n_keep, protected)
    if name == "kmeans":
        return kmeans_indices(features, n_keep, protected, generator)
    raise ValueError(f"unknown sampler {name!r}; expected scs, random, kmeans or greedy")
