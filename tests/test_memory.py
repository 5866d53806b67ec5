"""Hand-computed cases for the rarity memory (Eq. 6, 8-9, 13-18) and the incremental SCS."""

import numpy as np
import pytest
import torch

from rareclip_core.detectors.rareclip import samplers
from rareclip_core.detectors.rareclip.memory import (
    DirectPatchRarityBank,
    PatchRarityBank,
    loose_similarity,
    rarity_score,
    sequential_coreset_indices,
)

from rareclip_core.detectors.rareclip.samplers import greedy_coreset_indices, kmeans_indices


def unit(*xy):
    return torch.tensor(xy, dtype=torch.float64)


def test_loose_similarity_divides_by_quantile_and_caps():
    s = torch.arange(1, 11, dtype=torch.float64) / 10  # 0.1 ... 1.0
    # Y = 10%: k = floor(10 * 0.9) = 9, the 9th smallest is 0.9
    expected = torch.clamp(s / 0.9, max=1.0)
    assert torch.allclose(loose_similarity(s, 0.1), expected)
    assert loose_similarity(s, 0.1)[-2:].tolist() == [1.0, 1.0]
    # Y = 0: divide by the max
    assert torch.allclose(loose_similarity(s, 0.0), s)
    # applied to all values of a matrix at once: 2 x 5, k = floor(10 * 0.8) = 8 -> 0.8
    assert torch.allclose(loose_similarity(s.view(2, 5), 0.2), torch.clamp(s / 0.8, max=1).view(2, 5))
    # start_dim=1: each bank (row) by its own k-th smallest, k = floor(5 * 0.8) = 4
    banks = torch.stack([s[:5], 2 * s[:5]])  # [.1 .. .5], [.2 .. 1.]
    expected = torch.stack([torch.clamp(s[:5] / 0.4, max=1), torch.clamp(2 * s[:5] / 0.8, max=1)])
    assert torch.allclose(loose_similarity(banks, 0.2, start_dim=1), expected)


def test_loose_similarity_floors_at_zero_and_survives_a_reference_of_zero_or_less():
    # Y = 25%: k = floor(4 * 0.75) = 3, the 3rd smallest is 0.4; -0.4 / 0.4 = -1 is floored at 0
    s = torch.tensor([-0.4, 0.2, 0.4, 0.8])
    assert loose_similarity(s, 0.25).tolist() == [0.0, 0.5, 1.0, 1.0]
    # the 3rd smallest is 0 (or less): what is above it is as similar as can be, the rest not at all
    for dtype in (torch.float16, torch.float32, torch.float64):
        assert loose_similarity(torch.tensor([-0.4, -0.2, 0.0, 0.3], dtype=dtype), 0.25).tolist() == [0, 0, 0, 1]
        assert loose_similarity(torch.tensor([-0.4, -0.3, -0.2, 0.3], dtype=dtype), 0.25).tolist() == [0, 0, 0, 1]


def test_a_frame_unlike_everything_remembered_has_rarity_one_and_leaves_the_memory_bounded():
    # a black frame with random weights gave negative cosines to every remembered patch: the
    # rarity must be the maximum, 1, not 1 - (-0.6 / 1e-12), and the memory must stay in [0, 1]
    bank = PatchRarityBank(max_features=100, max_images=10, k=1, rarity_ratio=0.3, loose_ratio=0.0, dtype=torch.float64)
    bank.score(torch.stack([unit(1, 0), unit(0, 1)])[None])
    # each test patch's nearest memorized feature has cosine -0.6 (a for the first, b for the second)
    rarity = bank.score(torch.stack([unit(-0.6, -0.8), unit(-0.8, -0.6)])[None]).rarity
    assert rarity[0].tolist() == [1.0, 1.0]
    assert bank.image_similarity[0].tolist() == [[1, 1, 0, 0], [0, 0, 1, 1]]


def test_loose_similarity_rank_is_robust_to_binary_rounding():
    # 100 * (1 - 0.01) is 98.99999999999999 in binary; the rank must still be 99
    s = torch.arange(1, 101, dtype=torch.float64)
    assert loose_similarity(s, 0.01)[98] == 1.0 and loose_similarity(s, 0.01)[97] == 98 / 99


def test_rarity_is_one_minus_mean_of_top_x_share():
    s = torch.tensor([[0.1], [0.9], [0.5], [0.7], [0.3], [0.2], [0.8], [0.4], [0.6], [1.0]])
    # 10 images, X = 30%: top 3 = 1.0, 0.9, 0.8
    assert rarity_score(s, 0.3, dim=0).item() == pytest.approx(1 - 0.9)
    # ceil(0.3 * 4) = 2 of 4 images
    assert rarity_score(s[:4], 0.3, dim=0).item() == pytest.approx(1 - 0.8)
    assert rarity_score(s[:1], 0.3, dim=0).item() == pytest.approx(0.9)


def test_sequential_coreset_keeps_first_preserves_order_and_floors_negatives():
    feats = torch.stack([unit(1, 0), unit(0.6, 0.8), unit(-1, 0), unit(0.8, 0.6)])
    # s = [0, 0.6, max(-1, -0.6) -> floored to 0, max(0.8, 0.96, -0.8) = 0.96]
    assert sequential_coreset_indices(feats, 3).tolist() == [0, 1, 2]
    # with the floor, feature 2 ties feature 1 at 0 and the earlier one wins
    assert sequential_coreset_indices(feats, 1).tolist() == [0]
    assert sequential_coreset_indices(feats, 2).tolist() == [0, 2]
    assert sequential_coreset_indices(feats, 9).tolist() == [0, 1, 2, 3]
    # batched over banks: each bank on its own
    # reversed order: s = [0, max(-0.8) -> 0, max(0.96, -0.6), max(0.8, -1, 0.6)] = [0, 0, 0.96, 0.8]
    assert sequential_coreset_indices(torch.stack([feats, feats.flip(0)]), 2).tolist() == [[0, 2], [0, 1]]


def test_psm_update_eq16_three_steps():
    bank = PatchRarityBank(max_features=100, max_images=10, k=1, rarity_ratio=0.3, loose_ratio=0.0, dtype=torch.float64)
    a, b, c, d = unit(1, 0), unit(0, 1), unit(1, 0), unit(0.6, 0.8)
    e, f = unit(0, 1), unit(0.8, 0.6)
    assert bank.score(torch.stack([a, b])[None]).rarity is None
    assert bank.image_similarity.tolist() == [[[1.0, 1.0]]]
    # step 1: sim = [[1, 0], [.6, .8]], 1-NN v = [1, .8], LS(Y=0) divides by 1
    rarity = bank.score(torch.stack([c, d])[None]).rarity
    assert rarity[0].tolist() == pytest.approx([0.0, 0.2])
    assert np.allclose(bank.image_similarity[0].numpy(), [[1, 1, 1, 0.8], [1, 0.8, 1, 1]])
    # step 2: e's NN is b (1.0), f's NN is d (0.96); S_t2H = [[1, .8 * .96], [.8, .96]]
    rarity = bank.score(torch.stack([e, f])[None]).rarity
    assert rarity[0].tolist() == pytest.approx([0.0, 0.04])
    assert bank.image_similarity.shape == (1, 3, 6)
    expected = [[1, 1, 1, 0.8, 1, 0.768], [1, 0.8, 1, 1, 0.8, 0.96], [0.8, 1, 0.8, 0.96, 1, 1]]
    assert np.allclose(bank.image_similarity[0].numpy(), expected)
    assert bank.features.shape == (1, 6, 2)


def test_bank_respects_sizes_and_newest_images():
    torch.manual_seed(0)
    bank = PatchRarityBank(max_features=20, max_images=4, k=3)
    for _ in range(12):
        bank.score(torch.nn.functional.normalize(torch.randn(1, 8, 5), dim=2))
    assert bank.features.shape == (1, 20, 5)
    assert bank.image_similarity.shape == (1, 4, 20)
    # the last row holds the newest image: ones on its own memorized features
    assert bank.image_similarity[0, -1].max() == 1.0


def test_offline_scoring_leaves_bank_untouched():
    torch.manual_seed(1)
    bank = PatchRarityBank(max_features=20, max_images=4)
    for _ in range(5):
        bank.score(torch.nn.functional.normalize(torch.randn(1, 8, 5), dim=2))
    before = {k: v.clone() for k, v in bank.state_dict().items()}
    bank.score(torch.nn.functional.normalize(torch.randn(1, 8, 5), dim=2), update=False)
    assert all(torch.equal(before[k], v) for k, v in bank.state_dict().items())


@pytest.mark.parametrize("n_keep,m", [(12, 5), (30, 8)])
def test_incremental_scs_keeps_the_direct_definitions_set(n_keep, m):
    """500 steps: the bank's incremental SCS keeps exactly what exact SCS on [PFM; F_test] keeps."""
    gen = torch.Generator().manual_seed(n_keep)
    bank = PatchRarityBank(max_features=n_keep, max_images=5, dtype=torch.float64)
    reference = torch.zeros(0, 6, dtype=torch.float64)
    for _ in range(500):
        centers = torch.randn(3, 6, generator=gen, dtype=torch.float64)
        x = centers[torch.randint(0, 3, (m,), generator=gen)] + 0.7 * torch.randn(m, 6, generator=gen, dtype=torch.float64)
        x = torch.nn.functional.normalize(x, dim=1)
        bank.score(x[None])
        reference = torch.cat([reference, x])
        reference = reference[sequential_coreset_indices(reference, n_keep)]
        assert torch.equal(bank.features[0], reference)


@pytest.mark.parametrize("sampler", ["random", "kmeans", "greedy"])
def test_ablation_samplers_keep_sizes_and_protected(sampler):
    torch.manual_seed(3)
    bank = PatchRarityBank(max_features=15, max_images=5, sampler=sampler, max_protected=3)
    bank.score(torch.nn.functional.normalize(torch.randn(1, 3, 4), dim=2), reference=True)
    refs = bank.features.clone()
    for _ in range(10):
        bank.score(torch.nn.functional.normalize(torch.randn(1, 6, 4), dim=2))
    assert bank.features.shape == (1, 15, 4)
    assert torch.equal(bank.features[:, :3], refs) and bank.n_reference.tolist() == [3]


def test_direct_bank_eq5_max_similarity_per_image():
    bank = DirectPatchRarityBank(max_images=2, alpha=1.0, rarity_ratio=0.5)
    a, b, c = unit(1, 0), unit(0, 1), unit(0.6, 0.8)
    assert bank.score(torch.stack([a, b])[None]).rarity is None
    bank.score(torch.stack([a, a])[None])
    # per test patch, similarity to image 1 {a, b} and image 2 {a}: c -> [.8, .6]; top ceil(.5*2)=1
    rarity = bank.score(torch.stack([c, b])[None], update=False).rarity
    assert rarity[0].tolist() == pytest.approx([0.2, 0.0])
    bank.score(torch.stack([b, b])[None])
    assert bank.n_images == 2


def auroc(labels, scores):
    labels, scores = np.asarray(labels), np.asarray(scores)
    pos, neg = scores[labels == 1], scores[labels == 0]
    return ((pos[:, None] > neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean())


def test_rare_cluster_patches_get_high_rarity():
    """5% of all patches come from rare, image-specific clusters (20% of images hold 25% rare
    patches): after 20 images the bank's rarity separates them, better than at the start."""
    gen = torch.Generator().manual_seed(0)
    m, c = 64, 32
    normal_centers = torch.nn.functional.normalize(torch.randn(30, c, generator=gen), dim=1)
    bank = PatchRarityBank(max_features=3 * m, max_images=200)
    per_image = []
    for i in range(60):
        labels = torch.zeros(m, dtype=torch.long)
        # each image shows 12 of the 30 normal patterns, so a short history knows few of them
        seen = torch.randperm(30, generator=gen)[:12]
        x = normal_centers[seen[torch.randint(0, 12, (m,), generator=gen)]]
        if i % 5 == 2:
            labels[: m // 4] = 1
            x[: m // 4] = torch.nn.functional.normalize(torch.randn(c, generator=gen), dim=0)
        x = torch.nn.functional.normalize(x + 0.15 * torch.randn(m, c, generator=gen), dim=1)
        rarity = bank.score(x[None]).rarity
        if rarity is not None:
            per_image.append((labels.numpy(), rarity[0].numpy()))
    def window_auroc(lo, hi):
        return auroc(np.concatenate([l for l, _ in per_image[lo:hi]]), np.concatenate([r for _, r in per_image[lo:hi]]))
    late = window_auroc(19, 59)
    early = window_auroc(0, 10)
    assert late >= 0.95
    assert late > early


@pytest.mark.parametrize("sampler", ["scs", "random", "kmeans", "greedy", "dprb", "dprb-random", "dprb-kmeans"])
def test_bank_stack_equals_banks_stepped_one_by_one(sampler):
    """A stack of 3 banks (the detector steps its 8 as one) gives each bank exactly what it gets
    alone (bank b draws as a bank alone seeded seed + b): rarities, k-shot maps, kept features,
    PSM and Eq. 8 bookkeeping, through reference protection and evictions with a different
    number of stale rows per bank."""
    gen = torch.Generator().manual_seed(7)

    def make(n_banks, seed=0):
        if sampler.startswith("dprb"):
            return DirectPatchRarityBank(max_images=5, alpha=0.5, dtype=torch.float64, n_banks=n_banks,
                                         sampler=sampler.partition("-")[2] or "scs", seed=seed)
        return PatchRarityBank(
            max_features=14, max_images=4, sampler=sampler, max_protected=4, dtype=torch.float64, n_banks=n_banks, seed=seed
        )

    stack, alone = make(3), [make(1, seed=b) for b in range(3)]
    spread = torch.tensor([0.2, 0.7, 1.5], dtype=torch.float64)[:, None, None]  # unlike banks, unlike stale counts
    stale_per_step = []
    for step in range(25):
        centers = torch.randn(3, 2, 6, generator=gen, dtype=torch.float64)
        x = centers[:, torch.randint(0, 2, (6,), generator=gen)] + spread * torch.randn(3, 6, 6, generator=gen, dtype=torch.float64)
        x = torch.nn.functional.normalize(x, dim=2)
        reference, update = step < 2, step % 5 != 4
        got = stack.score(x, update=update, reference=reference)
        expected = [bank.score(x[i : i + 1], update=update, reference=reference) for i, bank in enumerate(alone)]
        for field in ("rarity", "reference"):
            if getattr(got, field) is None:
                assert all(getattr(e, field) is None for e in expected)
            else:
                assert torch.allclose(getattr(got, field), torch.cat([getattr(e, field) for e in expected]), rtol=0, atol=1e-12)
        for bank in (stack, *alone):
            bank.settle()
        stale_per_step.append([getattr(bank, "last_stale", 0) for bank in alone])
        assert getattr(stack, "last_stale", 0) == sum(stale_per_step[-1])
        for key, value in stack.state_dict().items():
            reference = torch.cat([bank.state_dict()[key] for bank in alone])
            assert torch.allclose(value.double(), reference.double(), rtol=0, atol=1e-12), key
    if sampler == "scs":  # the padded stale recomputation was exercised with unequal counts
        assert any(len(set(counts)) > 1 and max(counts) > 0 for counts in stale_per_step)


def patchcore_greedy(features: torch.Tensor, n_keep: int) -> set[int]:
    """The authors' GCS (PatchCore's `_compute_greedy_coreset_indices`), written out: Euclidean
    distances, the first pick where the row of distances has the largest norm."""
    distance = torch.cdist(features, features)
    anchor = distance.norm(dim=1)
    picks = []
    for _ in range(n_keep):
        pick = int(anchor.argmax())
        picks.append(pick)
        anchor = torch.minimum(anchor, distance[:, pick])
    return set(picks)


def authors_kcs(points: torch.Tensor, initial: torch.Tensor, max_iterations: int, tol: float = 1e-4) -> set[int]:
    """The authors' KCS loop, written out from its description, from the given initial centres."""
    centres = points[initial]
    for _ in range(max_iterations):
        assign = torch.cdist(points, centres).argmin(dim=1)
        one_hot = torch.nn.functional.one_hot(assign, centres.shape[0]).double()
        counts = one_hot.sum(0)
        moved = torch.where((counts == 0)[:, None], centres, one_hot.T @ points / counts.clamp(min=1e-10)[:, None])
        if torch.norm(centres - moved) < tol:
            break
        centres = moved
    distance = (points - centres[assign]).norm(dim=1)
    picks = []
    for i in range(centres.shape[0]):
        members = (assign == i).nonzero().squeeze(1)
        picks.append(int(members[distance[members].argmin()]) if members.numel() else int((points - centres[i]).norm(dim=1).argmin()))
    return set(picks)


def test_greedy_coreset_starts_where_patchcore_starts_and_keeps_what_it_keeps():
    # unit vectors at 0, 10, 20 and 150 degrees: the 150-degree one is farthest from the rest
    angles = torch.tensor([0.0, 10.0, 20.0, 150.0], dtype=torch.float64).deg2rad()
    circle = torch.stack([angles.cos(), angles.sin()], dim=1)
    none = torch.zeros(4, dtype=torch.bool)
    assert greedy_coreset_indices(circle, 1, none).tolist() == [3]
    assert greedy_coreset_indices(circle, 2, none).tolist() == [0, 3]
    gen = torch.Generator().manual_seed(5)
    features = torch.nn.functional.normalize(torch.randn(60, 8, generator=gen, dtype=torch.float64), dim=1)
    kept = greedy_coreset_indices(features, 20, torch.zeros(60, dtype=torch.bool))
    assert set(kept.tolist()) == patchcore_greedy(features, 20)


@pytest.mark.parametrize("iterations", [1, 20, 100])
def test_kmeans_keeps_each_cluster_member_nearest_its_centre_as_the_authors_kcs(iterations):
    gen = torch.Generator().manual_seed(11)
    points = torch.nn.functional.normalize(torch.randn(80, 6, generator=gen, dtype=torch.float64), dim=1)
    initial = torch.randperm(80, generator=torch.Generator().manual_seed(3))[:12]
    expected = authors_kcs(points, initial, iterations)
    assert len(expected) == 12  # no two clusters share a pick here: nothing to make up
    kept = kmeans_indices(points, 12, torch.zeros(80, dtype=torch.bool), torch.Generator().manual_seed(3), iterations)
    assert set(kept.tolist()) == expected


def test_random_sampler_banks_draw_independently():
    x = torch.nn.functional.normalize(torch.randn(1, 6, 4, generator=torch.Generator().manual_seed(2)), dim=2)
    bank = PatchRarityBank(max_features=8, max_images=5, sampler="random", n_banks=3)
    for _ in range(4):
        bank.score(x.expand(3, 6, 4))  # the same features in every bank
    kept = [{tuple(row.tolist()) for row in bank.features[b]} for b in range(3)]
    assert kept[0] != kept[1] and kept[1] != kept[2]


@pytest.mark.parametrize("sampler", ["random", "kmeans", "greedy"])
def test_rareclip_d_keeps_what_its_sampler_picks_of_each_image(sampler):
    gen = torch.Generator().manual_seed(4)
    image = torch.nn.functional.normalize(torch.randn(1, 10, 4, generator=gen, dtype=torch.float64), dim=2)
    bank = DirectPatchRarityBank(max_images=3, alpha=0.5, dtype=torch.float64, sampler=sampler, seed=9)
    bank.score(image)
    picked = samplers.select(sampler, image[0].float(), 5, torch.zeros(10, dtype=torch.bool), torch.Generator().manual_seed(9),
                             samplers.KMEANS_ITERATIONS["dprb"])
    assert torch.equal(bank.features[0, 0], image[0, picked])
    scs = DirectPatchRarityBank(max_images=3, alpha=0.5, dtype=torch.float64)
    scs.score(image)
    assert not torch.equal(bank.features, scs.features)


def test_kmeans_keeps_the_references_alone_when_they_fill_the_memory():
    """16-shot at the paper's sizes: 16 x 1369 / 4 >= N_F, so the protected references fill the bank."""
    bank = PatchRarityBank(max_features=14, max_images=5, sampler="kmeans", max_protected=14)
    gen = torch.Generator().manual_seed(1)
    references = [torch.nn.functional.normalize(torch.randn(1, 7, 4, generator=gen), dim=2) for _ in range(2)]
    for image in references:
        bank.score(image, reference=True)  # 14 reference features: all protected, the memory full
    bank.score(torch.nn.functional.normalize(torch.randn(1, 7, 4, generator=gen), dim=2))
    assert torch.equal(bank.features[0], torch.cat(references, dim=1)[0])
    with pytest.raises(ValueError, match="at least one step"):
        kmeans_indices(references[0][0], 3, torch.zeros(6, dtype=torch.bool), torch.Generator(), max_iterations=0)
