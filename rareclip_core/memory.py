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


def _append_earlier_max(
    sim_old: torch.Tensor, sim_new: torch.Tensor, upper: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`_earlier_max` for m rows appended after n features, without building the m x (n + m)
    matrix: sim_old (m x n, all earlier) and sim_new (m x m, earlier where column < row; `upper`
    is the m x m mask of columns >= row). Same values and argmax (max picks the first maximum,
    so the old part wins ties, as in the concatenated row)."""
    best_new, arg_new = sim_new.float().masked_fill(upper, float("-inf")).max(dim=1)
    if sim_old.shape[1] == 0:
        none = torch.isinf(best_new)
        return best_new.clamp_min(0).masked_fill(none, 0), arg_new.masked_fill(none, -1)
    best_old, arg_old = sim_old.float().max(dim=1)
    take_old = best_old >= best_new
    best = torch.where(take_old, best_old, best_new)
    return best.clamp_min(0), torch.where(take_old, arg_old, arg_new + sim_old.shape[1])


def keep_smallest(scores: torch.Tensor, n_keep: int, protected: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of the n_keep smallest scores (protected rows first, ties to the earlier row), ascending."""
    key = scores.float()
    if protected is not None:
        key = key.masked_fill(protected, float("-inf"))  # not key[protected] = ...: no host sync
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
        self.n_protected = 0  # protected.sum(), kept on the host so a step needs no device sync
        self.generator = torch.Generator().manual_seed(self.seed)  # random / k-means samplers
        self.last_stale = 0  # rows whose Eq. 8 argmax was evicted at the last update (recomputed)
        self._upper: torch.Tensor | None = None  # m x m mask of columns >= row, cached per m

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
        sim = (features @ self.features.T).float()  # M x N; converted once for a low-precision bank
        rarity = s_t2h = None
        if len(self):
            v, idx = sim.topk(min(self.k, len(self)), dim=1)  # M x K
            v = loose_similarity(v, self.loose_ratio)
            # n_I x M x K -> n_I x M; index_select: the same gather as [:, idx], several times faster on CPU
            gathered = self.image_similarity.index_select(1, idx.reshape(-1)).view(self.n_images, *idx.shape)
            s_t2h = (gathered * v).mean(-1)
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
        self.n_protected = 0

    def _upper_mask(self, m: int, device) -> torch.Tensor:
        if self._upper is None or self._upper.shape[0] != m or self._upper.device != device:
            self._upper = torch.ones(m, m, dtype=torch.bool, device=device).triu()
        return self._upper

    def _memorize(self, features, sim, s_t2h, protect: bool) -> None:
        """Eq. 16, SCS and the newest N_I,max rows. Sizes stay at N_F features and N_I,max rows
        once reached; the only data-dependent work is the recomputation of stale Eq. 8 rows."""
        m, n = features.shape[0], len(self)
        device = features.device
        if s_t2h is None:
            s_t2h = torch.zeros(self.n_images, m, device=device)
        s_m2t = loose_similarity(sim.amax(0), self.loose_ratio) if n else sim.new_zeros(0)  # amax: no argmax
        # Eq. 16: [[PSM, S_t2H], [S_M2t, 1]], of which only the newest N_I,max rows are kept
        first = max(0, self.n_images + 1 - self.max_images)
        psm = torch.cat(
            [
                torch.cat([self.image_similarity[first:], s_t2h[first:]], dim=1),
                torch.cat([s_m2t, torch.ones(m, device=device)])[None],
            ]
        )
        feats = torch.cat([self.features, features])
        # Eq. 8 for the new rows: against the bank (sim) and the earlier rows of this image
        s_new, arg_new = _append_earlier_max(sim, features @ features.T, self._upper_mask(m, device))
        redundancy = torch.cat([self.redundancy, s_new])
        nearest = torch.cat([self.nearest_earlier, arg_new])
        protected = torch.cat([self.protected, torch.full((m,), protect, device=device)])
        n_protected = self.n_protected + (m if protect else 0)
        if n_protected > self.max_protected:
            # protection holds for at most max_protected references: the least redundant ones
            still = keep_smallest(redundancy[protected], self.max_protected)
            which = protected.nonzero().squeeze(1)[still]
            protected = torch.zeros_like(protected)
            protected[which] = True
            n_protected = self.max_protected
        self.last_stale = 0
        if n + m > self.max_features:
            keep = self._select(feats, redundancy, protected)  # protected rows are always kept
            feats, psm = feats.index_select(0, keep), psm.index_select(1, keep)
            redundancy, nearest, protected, self.last_stale = self._reindex(keep, feats, redundancy, nearest, protected)
        self.features = feats
        self.image_similarity = psm
        self.redundancy, self.nearest_earlier, self.protected = redundancy, nearest, protected
        self.n_protected = n_protected

    def _select(self, feats, redundancy, protected) -> torch.Tensor:
        if self.sampler == "scs":
            return keep_smallest(redundancy, self.max_features, protected)
        return samplers.select(self.sampler, feats.float(), self.max_features, protected, self.generator)

    @staticmethod
    def _reindex(keep, feats, redundancy, nearest, protected):
        """Carry Eq. 8 bookkeeping over an eviction; rows whose argmax left are recomputed.
        Returns the new (redundancy, nearest, protected) and the number of recomputed rows."""
        n_total = redundancy.shape[0]
        new_position = torch.full((n_total,), -1, dtype=torch.long, device=keep.device)
        new_position[keep] = torch.arange(keep.shape[0], device=keep.device)
        redundancy, nearest, protected = (x.index_select(0, keep) for x in (redundancy, nearest, protected))
        has_nearest = nearest >= 0
        nearest = torch.where(has_nearest, new_position[nearest.clamp_min(0)], nearest)
        n_stale = PatchRarityBank._recompute_stale(has_nearest & (nearest < 0), feats, redundancy, nearest)
        return redundancy, nearest, protected, n_stale

    @staticmethod
    def _recompute_stale(stale_mask, feats, redundancy, nearest) -> int:
        """Eq. 8 again, in place, for the rows whose argmax was evicted; returns their number R.
        The only step work whose size depends on the data (R x N_F similarities), and the one
        host sync of an update (R is needed to size it)."""
        stale = stale_mask.nonzero().squeeze(1)
        if stale.numel():
            s, arg = _earlier_max((feats[stale] @ feats.T).float(), stale)
            redundancy[stale], nearest[stale] = s, arg
        return stale.numel()

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
        self.n_protected = int(self.protected.sum())
        self.generator.set_state(state["generator"].cpu())


class DirectPatchRarityBank:
    """RareCLIP-d's DPRB (Eq. 5, 6, 10): SCS(F, alpha M) features of each of the latest N_I,max
    images; a patch's similarity to an image is its max similarity to that image's set.

    The per-image sets live in a preallocated buffer with `slack` spare rows: an image is written
    in place and the newest rows move to the front once every `slack` images, instead of copying
    the whole N_I,max x S x C memory (374 MB per bank at the paper's sizes) at every step.
    """

    def __init__(self, max_images: int, alpha: float = 1 / 3, rarity_ratio: float = 0.3, dtype=torch.float32):
        self.max_images = max_images
        self.alpha = alpha
        self.rarity_ratio = rarity_ratio
        self.dtype = dtype
        self.slack = max(4, max_images // 8)
        self._buffer: torch.Tensor | None = None  # (N_I,max + slack) x S x C
        self._start = self._end = 0  # rows in use

    @property
    def features(self) -> torch.Tensor | None:  # n_I x S x C, oldest first (a view)
        return None if self._buffer is None else self._buffer[self._start : self._end]

    @property
    def n_images(self) -> int:
        return self._end - self._start

    def score(self, features: torch.Tensor, update: bool = True, protect: bool = False) -> torch.Tensor | None:
        """Rarity of M test patches; `protect` has no effect (images age out after N_I,max)."""
        features = features.to(self.dtype)
        rarity = None
        if self.n_images:
            memory = self.features
            n_images, per_image, c = memory.shape
            sim = features @ memory.reshape(-1, c).T  # M x (n_I * S)
            s = sim.float().view(-1, n_images, per_image).amax(-1).T  # n_I x M
            rarity = rarity_score(s, self.rarity_ratio, dim=0)
        if update:
            kept = features[sequential_coreset_indices(features.float(), max(1, int(self.alpha * features.shape[0])))]
            self._append(kept)
        return rarity

    def _append(self, kept: torch.Tensor) -> None:
        if self._buffer is None or self._buffer.shape[1:] != kept.shape:
            self._allocate(self.max_images + self.slack, kept)
        if self._end == self._buffer.shape[0]:
            self._compact()
        self._buffer[self._end] = kept
        self._end += 1
        self._start = max(self._start, self._end - self.max_images)

    def _compact(self) -> None:
        """Slack used up: the newest N_I,max - 1 rows move to the front (once every `slack` images)."""
        keep = min(self.n_images, self.max_images - 1)
        shift_to_front(self._buffer, self._end - keep, keep)
        self._start, self._end = 0, keep

    def _allocate(self, rows: int, like: torch.Tensor) -> None:
        self._buffer = like.new_empty(rows, *like.shape)
        self._start = self._end = 0

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {} if not self.n_images else {"features": self.features}

    def load_state_dict(self, state: dict[str, torch.Tensor], device: torch.device | str = "cpu") -> None:
        self._buffer, self._start, self._end = None, 0, 0
        if state:
            features = state["features"].to(device, self.dtype)
            self._allocate(max(features.shape[0], self.max_images) + self.slack, features[0])
            self._buffer[: features.shape[0]] = features
            self._end = features.shape[0]


def shift_to_front(buffer: torch.Tensor, start: int, n: int, dim: int = 0) -> None:
    """In place, along `dim`: buffer[:n] = buffer[start:start + n] (start >= 1), in chunks of at
    most `start` rows, which never overlap their source, so no temporary copy is needed."""
    done = 0
    while done < n:
        size = min(start, n - done)
        buffer.narrow(dim, done, size).copy_(buffer.narrow(dim, start + done, size))
        done += size
