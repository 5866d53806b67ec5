"""Memory samplers of the ablation (Table 3) other than SCS: random, k-means, greedy coreset, as
the authors' code runs them (`rareclip.py` RS, KCS, GCS; `sampler.py`).

Each returns the ascending indices of the n_keep features to keep; protected rows (k-shot
references) are always kept. SCS itself lives in `memory` (incremental, inside the bank).
"""
from __future__ import annotations

import torch

# the authors' k-means: at most this many Lloyd steps (IPRB's KCS: 20; RareCLIP-d's: 100), and a
# stop once the centres move less than KMEANS_TOLERANCE (Frobenius norm of the shift)
KMEANS_ITERATIONS = {"iprb": 20, "dprb": 100}
KMEANS_TOLERANCE = 1e-4


def bank_generators(seed: int, n_banks: int) -> list[torch.Generator]:
    """One random stream per bank (bank b from seed + b): the banks draw independently, as the
    authors' banks do from torch's global generator one after another."""
    return [torch.Generator().manual_seed(seed + b) for b in range(n_banks)]


def generator_states(generators: list[torch.Generator]) -> torch.Tensor:
    """The banks' random streams as one tensor (a snapshot's `generators`), a row per bank."""
    return torch.stack([g.get_state() for g in generators])


def restore_generators(generators: list[torch.Generator], states: torch.Tensor) -> None:
    """Set each bank's stream from its row of `generator_states` (banks past the rows keep theirs)."""
    for generator, state in zip(generators, states.cpu()):
        generator.set_state(state.clone())  # a row of its own: set_state reads the storage


def random_indices(n: int, n_keep: int, protected: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Protected rows plus a uniform random choice of the others (RS)."""
    free = (~protected).nonzero().squeeze(1)
    n_free = n_keep - int(protected.sum())
    pick = free[torch.randperm(free.numel(), generator=generator)[:n_free].to(free.device)]
    return torch.cat([protected.nonzero().squeeze(1), pick]).sort().values


def greedy_coreset_indices(features: torch.Tensor, n_keep: int, protected: torch.Tensor) -> torch.Tensor:
    """PatchCore's greedy k-center coreset (GCS): start from the protected rows, or, without any,
    from the row whose Euclidean distances to all rows have the largest L2 norm (PatchCore's
    start); then add the feature farthest from everything chosen until n_keep are chosen. For
    unit features the Euclidean distance sqrt(2 - 2 cos) orders as 1 - cos, used here."""
    chosen = protected.clone()
    if not chosen.any():
        gram = features @ features.T  # N x N
        chosen[torch.sqrt((2 - 2 * gram).clamp_min(0)).norm(dim=1).argmax()] = True
    distance = 1 - (features @ features[chosen].T).max(dim=1).values  # N
    distance[chosen] = float("-inf")
    for _ in range(n_keep - int(chosen.sum())):
        i = int(distance.argmax())
        chosen[i] = True
        distance = torch.minimum(distance, 1 - features @ features[i])
        distance[chosen] = float("-inf")
    return chosen.nonzero().squeeze(1)


def kmeans_indices(
    features: torch.Tensor, n_keep: int, protected: torch.Tensor, generator: torch.Generator, max_iterations: int = 20
) -> torch.Tensor:
    """The authors' KCS over the unprotected features, with n_free = n_keep - |protected| centres
    drawn at random among them: Euclidean Lloyd steps (an empty cluster keeps its centre) until
    the centres move less than KMEANS_TOLERANCE or after `max_iterations`; then each cluster
    keeps its member nearest its centre, an empty one the feature nearest its centre. Picks that
    coincide (the authors then keep a row twice) are made up by the most novel remaining
    features (lowest max similarity to those kept), so that n_keep distinct rows stay."""
    if max_iterations < 1:
        raise ValueError(f"k-means needs at least one step, got max_iterations={max_iterations}")
    free = (~protected).nonzero().squeeze(1)
    n_free = n_keep - int(protected.sum())
    if n_free <= 0:  # the protected rows fill the memory
        return protected.nonzero().squeeze(1)
    points = features[free]  # F x C
    centres = points[torch.randperm(points.shape[0], generator=generator)[:n_free].to(points.device)]
    for _ in range(max_iterations):
        assign = torch.cdist(points, centres).argmin(dim=1)  # F
        counts = torch.bincount(assign, minlength=n_free)
        sums = torch.zeros_like(centres).index_add_(0, assign, points)
        moved = torch.where((counts > 0)[:, None], sums / counts.clamp_min(1)[:, None], centres)
        if torch.linalg.norm(centres - moved) < KMEANS_TOLERANCE:
            break
        centres = moved
    distance = (points - centres[assign]).norm(dim=1)  # each point to its cluster's centre
    nearest = torch.full((n_free,), float("inf"), dtype=distance.dtype, device=points.device)
    nearest = nearest.scatter_reduce(0, assign, distance, "amin")
    index = torch.arange(points.shape[0], device=points.device)
    is_nearest = distance == nearest[assign]
    first = torch.full((n_free,), points.shape[0], device=points.device)  # the first nearest member, as argmin
    first = first.scatter_reduce(0, assign[is_nearest], index[is_nearest], "amin")
    empty = first == points.shape[0]
    if empty.any():
        first[empty] = torch.cdist(centres[empty], points).argmin(dim=1)
    picked = torch.zeros(points.shape[0], dtype=torch.bool, device=points.device)
    picked[first] = True
    missing = n_free - int(picked.sum())
    if missing > 0:
        novelty = (points @ points[picked].T).max(dim=1).values
        novelty[picked] = float("inf")
        picked[torch.argsort(novelty, stable=True)[:missing]] = True
    keep = protected.clone()
    keep[free[picked]] = True
    return keep.nonzero().squeeze(1)


def select(name: str, features: torch.Tensor, n_keep: int, protected: torch.Tensor, generator,
           kmeans_iterations: int = KMEANS_ITERATIONS["iprb"]) -> torch.Tensor:
    """Dispatch by the config's `sampler` name."""
    if name == "random":
        return random_indices(features.shape[0], n_keep, protected, generator)
    if name == "greedy":
        return greedy_coreset_indices(features, n_keep, protected)
    if name == "kmeans":
        return kmeans_indices(features, n_keep, protected, generator, kmeans_iterations)
    raise ValueError(f"unknown sampler {name!r}; expected scs, random, kmeans or greedy")
