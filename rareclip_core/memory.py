"""Patch rarity memory (sec. 3): Loose Similarity, Sequential Coreset Sampling, IPRB and DPRB banks."""
from __future__ import annotations

import math

import torch

from . import samplers

_EPS = 1e-9  # guards floor/ceil of products like 100 * 0.99 against binary rounding


def loose_similarity(s: torch.Tensor, y: float) -> torch.Tensor:
    """Eq. 17: divide all of `s` by its k-th smallest value, k = floor(numel * (1 - Y)), cap at 1.

    Y = 0 divides by the max. (ALGORITHM.md's rank, which the authors' code uses, rather than
    the paper's ceil(n * Y)-th largest.)
    """
    flat = s.reshape(-1).float()
    k = min(flat.numel(), max(1, math.floor(flat.numel() * (1 - y) + _EPS)))
    reference = flat.kthvalue(k).values.clamp_min(1e-12)
    return torch.clamp(s / reference.to(s.dtype), max=1.0)


def rarity_score(similarity: torch.Tensor, ratio: float, dim: int = 0) -> torch.Tensor:
    """Eq. 6: 1 - mean of the top ceil(X * n) similarities along `dim` (n = size of `dim`)."""
    k = max(1, math.ceil(ratio * similarity.shape[dim] - _EPS))
    return 1 - similarity.topk(k, dim=dim).values.mean(dim)


def _earlier_max(sim: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 8 for chosen rows: sim R x N against all features, row r may only see columns < positions[r].

    Returns (s, argmax) with s floored at 0 and argmax -1 where no earlier feature exists.
    """
    columns = torch.arange(sim.shape[1], device=sim.device)
    masked = sim.masked_fill(columns[None, :] >= positions[:, None], float("-inf"))
    if masked.shape[1] == 0:
        return masked.new_zeros(masked.shape[0]), positions.new_full((masked.shape[0],), -1)
    best, arg = masked.max(dim=1)
    none = torch.isinf(best)
    return best.clamp_min(0).masked_fill(none, 0), arg.masked_fill(none, -1)


def keep_smallest(scores: torch.Tensor, n_keep: int, protected: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of the n_keep smallest scores (protected rows first, ties to the earlier row), ascending."""
    key = scores.float().clone()
    if protected is not None:
        key[protected] = float("-inf")
    order = torch.argsort(key, stable=True)[:n_keep]
    return order.sort().values


def sequential_coreset_indices(features: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Eq. 8-9, the direct definition: s_1 = 0, s_i = max_{j<i} <F_i, F_j> floored at 0;
    keep the n_keep smallest s (ties to the earlier feature). Returns kept row indices, ascending."""
    n = features.shape[0]
    if n <= n_keep:
        return torch.arange(n, device=features.device)
    s, _ = _earlier_max(features @ features.T, torch.arange(n, device=features.device))
    return keep_smallest(s, n_keep)


class PatchRarityBank:
    """One IPRB bank (Eq. 11-18): patch feature memory (PFM, N x C) and patch-image similarity
    memory (PSM, n_I x N: a row per remembered image, a column per memorized feature).

    SCS is incremental: each feature's s_i (Eq. 8, against the features kept before it) and its
    argmax are remembered; after an eviction only the rows whose argmax was evicted are
    recomputed, which keeps exactly the set that the direct definition keeps.
    """

    def __init__(
        self,
        max_features: int,
        max_images: int,
        k: int = 3,
        rarity_ratio: float = 0.3,
        loose_ratio: float = 0.01,
        sampler: str = "scs",
        max_protected: int = 0,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
    ):
        self.max_features = max_features
        self.max_images = max_images
        self.k = k
        self.rarity_ratio = rarity_ratio
        self.loose_ratio = loose_ratio
        self.sampler = sampler
        self.max_protected = min(max_protected, max_features)
        self.seed = seed
        self.dtype = dtype
        self.reset()

    def reset(self) -> None:
        self.features: torch.Tensor | None = None  # N x C
        self.image_similarity: torch.Tensor | None = None  # n_I x N
        self.redundancy: torch.Tensor | None = None  # N, s_i of Eq. 8
        self.nearest_earlier: torch.Tensor | None = None  # N, argmax j of s_i, -1 if none
        self.protected: torch.Tensor | None = None  # N bool, k-shot features exempt from eviction
        self.generator = torch.Generator().manual_seed(self.seed)  # random / k-means samplers

    def __len__(self) -> int:
        return 0 if self.features is None else self.features.shape[0]

    @property
    def n_images(self) -> int:
        return 0 if self.image_similarity is None else self.image_similarity.shape[0]

    def score(self, features: torch.Tensor, update: bool = True, protect: bool = False) -> torch.Tensor | None:
        """Rarity of M test patches (features M x C, L2-normalized), Eq. 13-15 with LS (Eq. 18).

        Returns None for the first image of the stream (empty memory). With `update` the image
        is memorized (Eq. 11, 16, SCS, newest N_I,max rows); `protect` marks its features as
        k-shot references that SCS does not evict (at most `max_protected` of them).
        """
        features = features.to(self.dtype)
        if self.features is None:
            self._start(features)
        sim = features @ self.features.T  # M x N
        rarity = s_t2h = None
        if len(self):
            v, idx = sim.float().topk(min(self.k, len(self)), dim=1)  # M x K
            v = loose_similarity(v, self.loose_ratio)
            s_t2h = (self.image_similarity[:, idx] * v).mean(-1)  # n_I x M x K -> n_I x M
            rarity = rarity_score(s_t2h, self.rarity_ratio, dim=0)
        if update:
            self._memorize(features, sim, s_t2h, protect)
        return rarity

    def _start(self, features: torch.Tensor) -> None:
        c, device = features.shape[1], features.device
        self.features = features.new_zeros(0, c)
        self.image_similarity = torch.zeros(0, 0, device=device)
        self.redundancy = torch.zeros(0, device=device)
        self.nearest_earlier = torch.zeros(0, dtype=torch.long, device=device)
        self.protected = torch.zeros(0, dtype=torch.bool, device=device)

    def _memorize(self, features, sim, s_t2h, protect: bool) -> None:
        m, n = features.shape[0], len(self)
        device = features.device
        if s_t2h is None:
            s_t2h = torch.zeros(self.n_images, m, device=device)
        s_m2t = loose_similarity(sim.float().max(0).values, self.loose_ratio) if n else sim.new_zeros(0).float()
        # Eq. 16: [[PSM, S_t2H], [S_M2t, 1]]
        psm = torch.cat(
            [
                torch.cat([self.image_similarity, s_t2h], dim=1),
                torch.cat([s_m2t, torch.ones(m, device=device)])[None],
            ]
        )
        feats = torch.cat([self.features, features])
        positions = torch.arange(n, n + m, device=device)
        s_new, arg_new = _earlier_max(torch.cat([sim, features @ features.T], dim=1).float(), positions)
        redundancy = torch.cat([self.redundancy, s_new])
        nearest = torch.cat([self.nearest_earlier, arg_new])
        protected = torch.cat([self.protected, torch.full((m,), protect, device=device)])
        if int(protected.sum()) > self.max_protected:
            # protection holds for at most max_protected references: the least redundant ones
            still = keep_smallest(redundancy[protected], self.max_protected)
            which = protected.nonzero().squeeze(1)[still]
            protected = torch.zeros_like(protected)
            protected[which] = True
        if n + m > self.max_features:
            keep = self._select(feats, redundancy, protected)
            feats, psm = feats[keep], psm[:, keep]
            redundancy, nearest, protected = self._reindex(keep, feats, redundancy, nearest, protected)
        self.features = feats
        self.image_similarity = psm[-self.max_images :].contiguous()
        self.redundancy, self.nearest_earlier, self.protected = redundancy, nearest, protected

    def _select(self, feats, redundancy, protected) -> torch.Tensor:
        if self.sampler == "scs":
            return keep_smallest(redundancy, self.max_features, protected)
        return samplers.select(self.sampler, feats.float(), self.max_features, protected, self.generator)

    @staticmethod
    def _reindex(keep, feats, redundancy, nearest, protected):
        """Carry Eq. 8 bookkeeping over an eviction; rows whose argmax left are recomputed."""
        n_total = redundancy.shape[0]
        new_position = torch.full((n_total,), -1, dtype=torch.long, device=keep.device)
        new_position[keep] = torch.arange(keep.shape[0], device=keep.device)
        redundancy, nearest, protected = redundancy[keep], nearest[keep], protected[keep]
        has_nearest = nearest >= 0
        nearest = torch.where(has_nearest, new_position[nearest.clamp_min(0)], nearest)
        stale = (has_nearest & (nearest < 0)).nonzero().squeeze(1)
        if stale.numel():
            s, arg = _earlier_max((feats[stale] @ feats.T).float(), stale)
            redundancy[stale], nearest[stale] = s, arg
        return redundancy, nearest, protected

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.features is None:
            return {}
        return {
            "features": self.features,
            "image_similarity": self.image_similarity,
            "redundancy": self.redundancy,
            "nearest_earlier": self.nearest_earlier,
            "protected": self.protected,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor], device: torch.device | str = "cpu") -> None:
        self.reset()
        if not state:
            return
        self.features = state["features"].to(device, self.dtype)
        self.image_similarity = state["image_similarity"].to(device)
        self.redundancy = state["redundancy"].to(device)
        self.nearest_earlier = state["nearest_earlier"].to(device)
        self.protected = state["protected"].to(device)
        self.generator.set_state(state["generator"].cpu())


class DirectPatchRarityBank:
    """RareCLIP-d's DPRB (Eq. 5, 6, 10): SCS(F, alpha M) features of each of the latest N_I,max
    images; a patch's similarity to an image is its max similarity to that image's set."""

    def __init__(self, max_images: int, alpha: float = 1 / 3, rarity_ratio: float = 0.3, dtype=torch.float32):
        self.max_images = max_images
        self.alpha = alpha
        self.rarity_ratio = rarity_ratio
        self.dtype = dtype
        self.features: torch.Tensor | None = None  # n_I x S x C

    @property
    def n_images(self) -> int:
        return 0 if self.features is None else self.features.shape[0]

    def score(self, features: torch.Tensor, update: bool = True, protect: bool = False) -> torch.Tensor | None:
        """Rarity of M test patches; `protect` has no effect (images age out after N_I,max)."""
        features = features.to(self.dtype)
        rarity = None
        if self.features is not None:
            n_images, per_image, c = self.features.shape
            sim = features @ self.features.reshape(-1, c).T  # M x (n_I * S)
            s = sim.float().view(-1, n_images, per_image).max(-1).values.T  # n_I x M
            rarity = rarity_score(s, self.rarity_ratio, dim=0)
        if update:
            kept = features[sequential_coreset_indices(features.float(), max(1, int(self.alpha * features.shape[0])))]
            stack = kept[None] if self.features is None else torch.cat([self.features, kept[None]])
            self.features = stack[-self.max_images :].contiguous()
        return rarity

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {} if self.features is None else {"features": self.features}

    def load_state_dict(self, state: dict[str, torch.Tensor], device: torch.device | str = "cpu") -> None:
        self.features = state["features"].to(device, self.dtype) if state else None
