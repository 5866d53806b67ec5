"""Patch rarity memory (sec. 3): Loose Similarity, Sequential Coreset Sampling, IPRB and DPRB banks."""
from __future__ import annotations

import copy
import math
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ...ops.rows import RowWindow, gather_rows
from . import samplers

_EPS = 1e-9  # guards floor/ceil of products like 100 * 0.99 against binary rounding


def loose_similarity(s: torch.Tensor, y: float, start_dim: int = 0) -> torch.Tensor:
    """Eq. 17: divide all values of `s` from `start_dim` on by their k-th smallest value,
    k = floor(numel * (1 - Y)), cap at 1. Dimensions before `start_dim` index independent banks.

    Y = 0 divides by the max. (The rank the authors' code uses, rather than the paper's
    ceil(n * Y)-th largest: docs/algorithms/rareclip.md, "Loose similarity".)
    The result is also floored at 0, and a reference of 0 or less counts as the smallest positive
    number: a patch unlike everything remembered (negative cosines, as a black frame can give)
    scores as unlike as can be, instead of flipping sign or growing without bound. Where every
    value is positive, as nearest-neighbour cosines of CLIP features are, this changes nothing.
    """
    flat = s.flatten(start_dim).float()  # (banks...) x n
    n = flat.shape[-1]
    k = min(n, max(1, math.floor(n * (1 - y) + _EPS)))
    reference = flat.kthvalue(k, dim=-1).values.to(s.dtype).clamp_min(torch.finfo(s.dtype).tiny)
    reference = reference.reshape(reference.shape + (1,) * (s.dim() - start_dim))
    return torch.clamp(s / reference, min=0.0, max=1.0)


def rarity_score(similarity: torch.Tensor, ratio: float, dim: int = 0) -> torch.Tensor:
    """Eq. 6: 1 - mean of the top ceil(X * n) similarities along `dim` (n = size of `dim`)."""
    k = max(1, math.ceil(ratio * similarity.shape[dim] - _EPS))
    return 1 - similarity.topk(k, dim=dim).values.mean(dim)


class BankScores(NamedTuple):
    """What a bank stack says about M test patches: B x M each, or None."""

    rarity: torch.Tensor | None  # Eq. 6 / 15; None for the first image of the stream (empty memory)
    reference: torch.Tensor | None  # k-shot map, 1 - LS(max similarity to the references); None without references


def blend_with_references(own, reference, weights: tuple[float, float]):
    """The k-shot blend of a rarity quantity (map or c_rare) with its reference counterpart:
    (a own + b reference) / (a + b) for a bank kind's `reference_weights` (a, b)."""
    a, b = weights
    return (a * own + b * reference) / (a + b)


def _true_positions_first(mask: torch.Tensor, n: int) -> torch.Tensor:
    """Per row of a B x N bool mask, the first n positions when those where it is True come
    first, each part ascending (a stable sort): the True positions, padded with False ones
    when a row has fewer than n."""
    return torch.argsort((~mask).to(torch.uint8), dim=1, stable=True)[:, :n]


def _check_bank_count(got: int, expected: int, what: str) -> None:
    if got != expected:
        raise ValueError(f"{what} {got} banks, this bank stack has {expected}")


def _earlier_max(sim: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 8 for chosen rows: sim ... x R x N against all features, row r may only see columns
    < positions[..., r]. Returns (s, argmax) with s floored at 0 and argmax -1 where no earlier
    feature exists."""
    if sim.shape[-1] == 0:
        return sim.new_zeros(sim.shape[:-1]), positions.new_full(sim.shape[:-1], -1)
    columns = torch.arange(sim.shape[-1], device=sim.device)
    masked = sim.masked_fill(columns >= positions[..., None], float("-inf"))
    best, arg = masked.max(dim=-1)
    none = torch.isinf(best)
    return best.clamp_min(0).masked_fill(none, 0), arg.masked_fill(none, -1)


def _append_earlier_max(
    sim_old: torch.Tensor, sim_new: torch.Tensor, upper: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`_earlier_max` for m rows appended after n features, without building the m x (n + m)
    matrix: sim_old (... x m x n, all earlier) and sim_new (... x m x m, earlier where column <
    row; `upper` is the m x m mask of columns >= row). Same values and argmax (max picks the
    first maximum, so the old part wins ties, as in the concatenated row)."""
    best_new, arg_new = sim_new.float().masked_fill(upper, float("-inf")).max(dim=-1)
    if sim_old.shape[-1] == 0:
        none = torch.isinf(best_new)
        return best_new.clamp_min(0).masked_fill(none, 0), arg_new.masked_fill(none, -1)
    best_old, arg_old = sim_old.float().max(dim=-1)
    take_old = best_old >= best_new
    best = torch.where(take_old, best_old, best_new)
    return best.clamp_min(0), torch.where(take_old, arg_old, arg_new + sim_old.shape[-1])


def keep_smallest(scores: torch.Tensor, n_keep: int, protected: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of the n_keep smallest scores along the last dim (protected rows first, ties to
    the earlier row), ascending."""
    key = scores.float()
    if protected is not None:
        key = key.masked_fill(protected, float("-inf"))  # not key[protected] = ...: no host sync
    order = torch.argsort(key, dim=-1, stable=True)[..., :n_keep]
    return order.sort(dim=-1).values


def sequential_coreset_indices(features: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Eq. 8-9, the direct definition: s_1 = 0, s_i = max_{j<i} <F_i, F_j> floored at 0;
    keep the n_keep smallest s (ties to the earlier feature). features (...) x n x C; returns
    the kept row indices (...) x min(n, n_keep), ascending."""
    n = features.shape[-2]
    positions = torch.arange(n, device=features.device)
    if n <= n_keep:
        return positions.expand(*features.shape[:-2], n)
    s, _ = _earlier_max(features @ features.mT, positions)
    return keep_smallest(s, n_keep)


class PatchRarityBank:
    """B IPRB banks (Eq. 11-18) stepped together, one per (block, scale): patch feature memory
    (PFM, B x N x C) and patch-image similarity memory (PSM, n_I x N per bank: a row per
    remembered image, a column per memorized feature; stored transposed, B x N x n_I, so that
    selecting features is selecting rows).

    Every bank memorizes M features per image, so all hold the same N and n_I; only which
    features they keep differs. A step is one batched computation for all banks: its number of
    kernel launches does not depend on B. An update has one host sync (the stale-row count), in
    `settle`, which the detector calls once the step's results are on the host: so a step syncs
    only there, and the device runs its kernels while the host is still queueing them.

    SCS is incremental: each feature's s_i (Eq. 8, against the features kept before it) and its
    argmax are remembered; after an eviction only the rows whose argmax was evicted are
    recomputed, which keeps exactly the set that the direct definition keeps. Exact ties at the
    N_F cut go to the earlier feature (a stable sort; the authors' unsorted top-k leaves them to
    the implementation).

    k-shot (docs/algorithms/rareclip.md, "k-shot"): reference images are memorized first, so the
    surviving reference features are the first `n_reference[b]` rows of bank b. They are exempt
    from eviction while that count is at most `max_protected` (min(floor(M k / 4), N_F)); above
    it they compete like any feature and the count is updated after each eviction.

    `compiled`: once the banks are full (N_F features, N_I,max rows: fixed shapes from then on),
    a step that memorizes no reference runs through `torch.compile` (one graph, fused kernels);
    filling up and references stay eager. The graph has no host sync (`settle` stays outside).
    If it cannot be compiled, a warning says why and the banks go on eagerly.
    """

    def __init__(
        self,
        *,
        max_features: int,
        max_images: int,
        k: int = 3,
        rarity_ratio: float = 0.3,
        loose_ratio: float = 0.01,
        sampler: str = "scs",
        max_protected: int = 0,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        n_banks: int = 1,
        compiled: bool = False,
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
        self.n_banks = n_banks
        self._compiled_score = self._compile() if compiled else None
        self.reset()

    def reset(self) -> None:
        self.features: torch.Tensor | None = None  # B x N x C
        self.psm_t: torch.Tensor | None = None  # B x N x n_I, PSM transposed
        self.redundancy: torch.Tensor | None = None  # B x N, s_i of Eq. 8
        self.nearest_earlier: torch.Tensor | None = None  # B x N, argmax j of s_i, -1 if none
        self.n_reference: torch.Tensor | None = None  # B, surviving reference features per bank (first rows)
        self.has_references = False  # kept on the host: no device sync to know whether to compute a k-shot map
        self.generators = samplers.bank_generators(self.seed, self.n_banks)  # random / k-means samplers
        self.last_stale = 0  # rows whose Eq. 8 argmax was evicted at the last update (all banks; set by `settle`)
        self.stale: torch.Tensor | None = None  # B x N_F: rows of the last update still to recompute (`settle`)
        self._upper: torch.Tensor | None = None  # m x m mask of columns >= row, cached per m

    def __len__(self) -> int:
        return 0 if self.features is None else self.features.shape[1]

    @property
    def n_images(self) -> int:
        return 0 if self.psm_t is None else self.psm_t.shape[2]

    @torch.inference_mode()
    def compile_ahead(self, n_patches: int, width: int, device: torch.device, update: bool) -> None:
        """Compile the full banks' step now (seconds), so that the line's first full step does
        not wait for the compiler: one step of a throwaway copy whose banks are full of random
        features (the compiled code is kept per code and shapes, not per object)."""
        if not self.compiles:
            return
        stand_in = copy.copy(self)
        stand_in._compiled_score = stand_in._compile()
        b, n = self.n_banks, self.max_features
        stand_in.features = F.normalize(torch.randn(b, n, width, device=device), dim=-1).to(self.dtype)
        stand_in.psm_t = torch.rand(b, n, self.max_images, device=device)
        stand_in.redundancy = torch.rand(b, n, device=device)
        stand_in.nearest_earlier = torch.full((b, n), -1, dtype=torch.long, device=device)
        stand_in.n_reference = torch.zeros(b, dtype=torch.long, device=device)
        stand_in.stale = None
        stand_in.score(F.normalize(torch.randn(b, n_patches, width, device=device), dim=-1), update=update)
        if not stand_in.compiles:  # it warned why
            self._compiled_score = None

    def _compile(self):
        """`_score` through torch.compile, captured whole (a graph break is an error, not a split)."""
        return torch.compile(self._score, fullgraph=True)

    @property
    def compiles(self) -> bool:
        """Whether full banks step through the compiled graph (`compiled`, unless it failed to compile)."""
        return self._compiled_score is not None

    @property
    def is_full(self) -> bool:
        """N_F features and N_I,max images: every later update keeps these shapes."""
        return len(self) == self.max_features and self.n_images == self.max_images

    @property
    def image_similarity(self) -> torch.Tensor | None:
        """The PSM as in the paper: B x n_I x N (a view)."""
        return None if self.psm_t is None else self.psm_t.mT

    def score(self, features: torch.Tensor, update: bool = True, reference: bool = False) -> BankScores:
        """Rarity of M test patches per bank (features B x M x C, L2-normalized), Eq. 13-15 with
        LS (Eq. 18), and the k-shot map when references are memorized.

        With `update` the image is memorized (Eq. 11, 16, SCS, newest N_I,max rows);
        `reference` marks it as a k-shot normal reference (see the class docstring).
        """
        _check_bank_count(features.shape[0], self.n_banks, "features for")
        self.settle()
        features = features.to(self.dtype)
        if self.features is None:
            self._start(features)
        if self._compiled_score is not None and self.is_full and not reference:
            self._upper_mask(features.shape[1], features.device)  # cached out here: the graph reads it, never sets it
            try:
                return self._compiled_score(features, update, reference)
            except torch._dynamo.exc.TorchDynamoException as err:  # raised while compiling, before the graph runs
                warnings.warn(
                    f"compile_banks: the banks' step could not be compiled, so it runs eagerly (same results, "
                    f"more kernel launches); set compile_banks: false to skip the attempt. {type(err).__name__}: "
                    f"{str(err).splitlines()[0] if str(err) else ''}",
                    RuntimeWarning,
                    stacklevel=2,
                )
                self._compiled_score = None
        return self._score(features, update, reference)

    def _score(self, features: torch.Tensor, update: bool, reference: bool) -> BankScores:
        sim = torch.bmm(features, self.features.mT).float()  # B x M x N; converted once for a low-precision bank
        rarity = s_t2h = kshot = None
        if len(self):
            v, idx = sim.topk(min(self.k, len(self)), dim=-1)  # B x M x K
            v = loose_similarity(v, self.loose_ratio, start_dim=1)
            b, m, k = idx.shape
            gathered = gather_rows(self.psm_t, idx.view(b, m * k)).view(b, m, k, self.n_images)
            s_t2h = (gathered * v[..., None]).mean(2)  # B x M x n_I
            rarity = rarity_score(s_t2h, self.rarity_ratio, dim=2)
            if self.has_references:
                kshot = self._reference_map(sim)
        if update:
            self._memorize(features, sim, s_t2h, reference)
        return BankScores(rarity, kshot)

    def _reference_map(self, sim: torch.Tensor) -> torch.Tensor:
        """1 - LS(max similarity of each test patch to the bank's surviving reference features);
        sim B x M x N -> B x M. A bank left with no reference feature gives 1 (nothing alike)."""
        columns = torch.arange(sim.shape[-1], device=sim.device)
        outside = (columns[None] >= self.n_reference[:, None])[:, None]  # B x 1 x N
        nearest = sim.masked_fill(outside, float("-inf")).amax(2)  # B x M
        nearest = nearest.masked_fill(torch.isinf(nearest), 0.0)
        return 1 - loose_similarity(nearest, self.loose_ratio, start_dim=1)

    @staticmethod
    def reference_weights(k: int, t: int) -> tuple[float, float]:
        """The k-shot blend's weights (own, reference) at t images processed (references
        included): ((1 - k/t) x + (k/8) x_ref) / (1 - k/t + k/8)."""
        return 1 - k / t, k / 8

    def _start(self, features: torch.Tensor) -> None:
        b, _, c = features.shape
        device = features.device
        self.features = features.new_zeros(b, 0, c)
        self.psm_t = torch.zeros(b, 0, 0, device=device)
        self.redundancy = torch.zeros(b, 0, device=device)
        self.nearest_earlier = torch.zeros(b, 0, dtype=torch.long, device=device)
        self.n_reference = torch.zeros(b, dtype=torch.long, device=device)

    def _upper_mask(self, m: int, device) -> torch.Tensor:
        if self._upper is None or self._upper.shape[0] != m or self._upper.device != device:
            self._upper = torch.ones(m, m, dtype=torch.bool, device=device).triu()
        return self._upper

    def _memorize(self, features, sim, s_t2h, reference: bool) -> None:
        """Eq. 16, SCS and the newest N_I,max rows. Sizes stay at N_F features and N_I,max rows
        once reached; the only data-dependent work is the recomputation of stale Eq. 8 rows."""
        b, m, _ = features.shape
        n = len(self)
        device = features.device
        if s_t2h is None:
            s_t2h = torch.zeros(b, m, self.n_images, device=device)
        s_m2t = loose_similarity(sim.amax(1), self.loose_ratio, start_dim=1) if n else sim.new_zeros(b, 0)  # B x N
        # Eq. 16: [[PSM, S_t2H], [S_M2t, 1]] (here transposed), keeping the newest N_I,max images
        first = max(0, self.n_images + 1 - self.max_images)
        psm_t = torch.cat(
            [
                torch.cat([self.psm_t[:, :, first:], s_m2t[..., None]], dim=2),
                torch.cat([s_t2h[:, :, first:], torch.ones(b, m, 1, device=device)], dim=2),
            ],
            dim=1,
        )
        feats = torch.cat([self.features, features], dim=1)
        # Eq. 8 for the new rows: against the bank (sim) and the earlier rows of this image
        s_new, arg_new = _append_earlier_max(sim, torch.bmm(features, features.mT), self._upper_mask(m, device))
        redundancy = torch.cat([self.redundancy, s_new], dim=1)
        nearest = torch.cat([self.nearest_earlier, arg_new], dim=1)
        n_reference = self.n_reference + m if reference else self.n_reference  # B
        self.has_references |= reference
        self.last_stale = 0
        if n + m > self.max_features:
            is_reference = torch.arange(n + m, device=device)[None] < n_reference[:, None]  # B x (N + M)
            protected = is_reference & (n_reference <= self.max_protected)[:, None]
            keep = self._select(feats, redundancy, protected)  # B x N_F; protected rows are always kept
            feats, psm_t = gather_rows(feats, keep), gather_rows(psm_t, keep)
            redundancy, nearest, self.stale = self._reindex(keep, feats, redundancy, nearest)
            n_reference = (keep < n_reference[:, None]).sum(1)  # references are the first rows, kept in order
        self.features = feats
        self.psm_t = psm_t
        self.redundancy, self.nearest_earlier = redundancy, nearest
        self.n_reference = n_reference

    def _select(self, feats, redundancy, protected) -> torch.Tensor:
        if self.sampler == "scs":
            return keep_smallest(redundancy, self.max_features, protected)
        return torch.stack(
            [
                samplers.select(self.sampler, f.float(), self.max_features, p, g)
                for f, p, g in zip(feats, protected, self.generators)
            ]
        )

    def settle(self) -> None:
        """Finish the last update: Eq. 8 again for the rows whose argmax was evicted (they are
        recomputed before anything reads them: the next update, a snapshot)."""
        if self.stale is not None:
            stale, self.stale = self.stale, None
            self.last_stale = self._recompute_stale(stale, self.features, self.redundancy, self.nearest_earlier)

    @staticmethod
    def _reindex(keep, feats, redundancy, nearest):
        """Carry Eq. 8 bookkeeping over an eviction. Returns the new (redundancy, nearest) and
        the mask of rows whose argmax left (B x N_F), which `settle` recomputes."""
        new_position = torch.full(redundancy.shape, -1, dtype=torch.long, device=keep.device)  # B x (N + M)
        new_position.scatter_(1, keep, torch.arange(keep.shape[1], device=keep.device).expand_as(keep))
        redundancy, nearest = gather_rows(redundancy, keep), gather_rows(nearest, keep)
        has_nearest = nearest >= 0
        nearest = torch.where(has_nearest, new_position.gather(1, nearest.clamp_min(0)), nearest)
        return redundancy, nearest, has_nearest & (nearest < 0)

    @staticmethod
    def _recompute_stale(stale_mask, feats, redundancy, nearest) -> int:
        """Eq. 8 again, in place, for the rows whose argmax was evicted (stale_mask B x N_F);
        returns their number over all banks. Each bank's stale rows are padded to the largest
        count R, so all banks are recomputed in one B x R x N_F product: the only step work whose
        size depends on the data, and the one host sync of an update (R is needed to size it)."""
        counts = stale_mask.sum(1)
        r_max, n_stale = torch.stack([counts.max(), counts.sum()]).tolist()
        if r_max:
            rows = _true_positions_first(stale_mask, r_max)  # B x R
            valid = stale_mask.gather(1, rows)
            s, arg = _earlier_max(torch.bmm(gather_rows(feats, rows), feats.mT).float(), rows)
            redundancy.scatter_(1, rows, torch.where(valid, s, redundancy.gather(1, rows)))
            nearest.scatter_(1, rows, torch.where(valid, arg, nearest.gather(1, rows)))
        return n_stale

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Stacked over banks; `image_similarity` in the paper's layout, B x n_I x N."""
        self.settle()
        if self.features is None:
            return {}
        return {
            "features": self.features,
            "image_similarity": self.image_similarity,
            "redundancy": self.redundancy,
            "nearest_earlier": self.nearest_earlier,
            "n_reference": self.n_reference,
            "generators": samplers.generator_states(self.generators),
        }

    @torch.inference_mode()
    def load_state_dict(self, state: dict[str, torch.Tensor], device: torch.device | str = "cpu") -> None:
        """Copies, made as inference tensors like those a step makes (a compiled step would
        otherwise compile again for the loaded ones)."""
        self.reset()
        if not state:
            return
        _check_bank_count(state["features"].shape[0], self.n_banks, "state holds")
        self.features = state["features"].to(device, self.dtype, copy=True)
        self.psm_t = state["image_similarity"].to(device).mT.contiguous()
        self.redundancy = state["redundancy"].to(device, copy=True)
        self.nearest_earlier = state["nearest_earlier"].to(device, copy=True)
        self.n_reference = state["n_reference"].to(device, copy=True)
        self.has_references = bool(self.n_reference.any())
        samplers.restore_generators(self.generators, state["generators"])


class DirectPatchRarityBank:
    """RareCLIP-d's DPRB (Eq. 5, 6, 10) for B banks stepped together: SCS(F, int(alpha M))
    features of each of the latest N_I,max images; a patch's similarity to an image is its max
    similarity to that image's set.

    k-shot reference images keep their sets for good (they count toward N_I,max, and the oldest
    other image makes room); their k-shot map is 1 - LS(max similarity to them)^2 with its own
    loose ratio (the authors' 0.02).

    The other images' sets live in a `RowWindow` (B x n x S x C): an image is written in place
    instead of copying the whole N_I,max x S x C memory (374 MB per bank at the paper's sizes).
    """

    def __init__(
        self,
        *,
        max_images: int,
        alpha: float = 0.333,
        rarity_ratio: float = 0.3,
        dtype=torch.float32,
        n_banks: int = 1,
        reference_loose_ratio: float = 0.02,
        sampler: str = "scs",
        seed: int = 0,
    ):
        self.max_images = max_images
        self.alpha = alpha
        self.rarity_ratio = rarity_ratio
        self.dtype = dtype
        self.n_banks = n_banks
        self.reference_loose_ratio = reference_loose_ratio
        self.sampler = sampler
        self.seed = seed
        self.references: torch.Tensor | None = None  # B x k x S x C, the reference images' sets
        self.window = RowWindow(max_images, max(4, max_images // 8), {"features": 1})
        self.generators = samplers.bank_generators(seed, n_banks)  # random / k-means samplers

    @property
    def features(self) -> torch.Tensor | None:  # B x n x S x C, the other images, oldest first (a view)
        return self.window.view("features")

    @property
    def n_references(self) -> int:
        return 0 if self.references is None else self.references.shape[1]

    @property
    def n_images(self) -> int:
        return self.n_references + len(self.window)

    def settle(self) -> None:
        """Nothing to finish: an update here has no deferred work and no host sync."""

    def score(self, features: torch.Tensor, update: bool = True, reference: bool = False) -> BankScores:
        """Rarity of M test patches per bank (features B x M x C) over all remembered images,
        and the k-shot map when references are memorized; B x M each. With `update` the image's
        set is memorized, as a reference when `reference`."""
        _check_bank_count(features.shape[0], self.n_banks, "features for")
        features = features.to(self.dtype)
        per_image = [self._max_similarity(features, sets) for sets in (self.references, self.features)]
        per_image = [s for s in per_image if s is not None]  # each B x M x n
        rarity = rarity_score(torch.cat(per_image, dim=2), self.rarity_ratio, dim=2) if per_image else None
        kshot = None
        if self.references is not None:
            nearest = per_image[0].amax(2)  # B x M, max over every reference feature
            kshot = 1 - loose_similarity(nearest, self.reference_loose_ratio, start_dim=1).square()
        if update:
            kept = gather_rows(features, self._select(features.float()))  # B x S x C
            if reference:
                self.references = kept[:, None] if self.references is None else torch.cat([self.references, kept[:, None]], 1)
                self.window.capacity = max(1, self.max_images - self.n_references)
            else:
                self.window.append(features=kept)
        return BankScores(rarity, kshot)

    def _select(self, features: torch.Tensor) -> torch.Tensor:
        """The int(alpha M) features of each bank's image to keep (B x S, ascending): SCS, or the
        ablation's sampler over the image's own features (the authors' RareCLIP-d `sample`)."""
        n_keep = max(1, int(self.alpha * features.shape[1]))
        if self.sampler == "scs":
            return sequential_coreset_indices(features, n_keep)
        none = torch.zeros(features.shape[1], dtype=torch.bool, device=features.device)
        return torch.stack([
            samplers.select(self.sampler, f, n_keep, none, g, samplers.KMEANS_ITERATIONS["dprb"])
            for f, g in zip(features, self.generators)
        ])

    @staticmethod
    def _max_similarity(features: torch.Tensor, sets: torch.Tensor | None) -> torch.Tensor | None:
        """Eq. 5: per test patch, the max similarity to each image's set; B x M x n."""
        if sets is None or sets.shape[1] == 0:
            return None
        b, n_images, per_image, c = sets.shape
        sim = torch.bmm(features, sets.reshape(b, -1, c).mT)  # B x M x (n S), a view of the buffer
        return sim.float().view(b, -1, n_images, per_image).amax(-1)

    @staticmethod
    def reference_weights(k: int, t: int) -> tuple[float, float]:
        """RareCLIP-d's k-shot blend weights (own, reference): (x + (k/4) x_ref) / (1 + k/4)."""
        return 1.0, k / 4

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = self.window.state_dict()
        if self.references is not None:
            state["references"] = self.references
        if self.sampler != "scs":
            state["generators"] = samplers.generator_states(self.generators)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor], device: torch.device | str = "cpu") -> None:
        self.references = None
        if "references" in state:
            self.references = state["references"].to(device, self.dtype)
            _check_bank_count(self.references.shape[0], self.n_banks, "state holds")
        self.window.capacity = max(1, self.max_images - self.n_references)
        if "features" in state:
            _check_bank_count(state["features"].shape[0], self.n_banks, "state holds")
        self.window.load_state_dict({k: v.to(dtype=self.dtype) for k, v in state.items() if k == "features"}, device)
        self.generators = samplers.bank_generators(self.seed, self.n_banks)
        if "generators" in state:
            samplers.restore_generators(self.generators, state["generators"])
