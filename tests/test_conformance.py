"""The rules where the authors' code decides what the paper leaves open, each on a hand-computed
case (docs/algorithms/rareclip.md). benchmarks/authors_conformance.py checks the whole detector
against the authors' code itself, given a checkout of it."""
import numpy as np
import pytest
import torch

from rareclip_core.detectors.rareclip.detector import RareCLIPDetector
from rareclip_core.detectors.rareclip.image_memory import local_aggregated_features
from rareclip_core.detectors.rareclip.memory import (
    DirectPatchRarityBank,
    PatchRarityBank,
    blend_with_references,
)


def rows(*vectors):
    return torch.tensor(vectors, dtype=torch.float64)


def test_laif_is_the_normalized_mean_of_raw_tokens_over_the_floor_count():
    # a 4 x 4 grid, one block: token i has norm i + 1 and angle 0.2 i; the mean text map ranks i
    i = np.arange(16)
    raw = (i + 1)[:, None] * np.stack([np.cos(0.2 * i), np.sin(0.2 * i)], axis=1)
    mean_text = torch.tensor(i / 16.0)
    tokens = torch.tensor(raw)[None]

    def expected(patches):
        mean = raw[patches].mean(0)
        return mean / np.linalg.norm(mean)

    # ratio 0.5: the 8 highest patches (8..15); the raw mean, not the mean of unit tokens
    laif = local_aggregated_features(tokens, mean_text, 0.5)[0].numpy()
    assert np.allclose(laif, expected(i[8:]), atol=1e-12)
    unit_mean = (raw[8:] / np.linalg.norm(raw[8:], axis=1, keepdims=True)).mean(0)
    assert not np.allclose(laif, unit_mean / np.linalg.norm(unit_mean), atol=1e-4)
    # ratio 0.3: floor(4.8) = 4 patches (12..15), not 5
    assert np.allclose(local_aggregated_features(tokens, mean_text, 0.3)[0].numpy(), expected(i[12:]), atol=1e-12)
    # no mean text map yet (offline, nothing memorized): every patch
    assert np.allclose(local_aggregated_features(tokens, None, 0.5)[0].numpy(), expected(i), atol=1e-12)


def test_kshot_blend_weights_of_both_branches():
    # RareCLIP: ((1 - k/t) x + (k/8) x_ref) / (1 - k/t + k/8); k = 1, t = 4 -> (0.75, 0.125)
    weights = PatchRarityBank.reference_weights(1, 4)
    assert weights == (0.75, 0.125)
    assert blend_with_references(0.4, 0.1, weights) == pytest.approx((0.75 * 0.4 + 0.125 * 0.1) / 0.875)
    # the first scored frame (t = k): the reference term alone
    assert blend_with_references(0.4, 0.1, PatchRarityBank.reference_weights(4, 4)) == pytest.approx(0.1)
    # RareCLIP-d: (x + (k/4) x_ref) / (1 + k/4); k = 4 -> halfway
    assert DirectPatchRarityBank.reference_weights(4, 9) == (1.0, 1.0)
    assert blend_with_references(0.4, 0.1, DirectPatchRarityBank.reference_weights(4, 9)) == pytest.approx(0.25)


def test_kshot_map_uses_every_surviving_reference_and_protection_starts_at_the_bound():
    """Rules 1 and 2: the k-shot map compares with all reference features still in the bank;
    references compete while more than max_protected survive, and are exempt from then on."""
    r1, r2, r3 = (1, 0, 0), (0.6, 0.8, 0), (0, 1, 0)
    bank = PatchRarityBank(max_features=4, max_images=5, k=1, loose_ratio=0.0, max_protected=2, dtype=torch.float64)
    bank.score(rows(r1, r2, r3)[None], reference=True)
    assert bank.n_reference.tolist() == [3]
    # max similarity to {r1, r2, r3}: (0.8, 0.6, 0) -> 0.96 (r2), (0, 0.8, 0.6) -> 0.8 (r3); LS(Y=0) / 0.96
    scores = bank.score(rows((0.8, 0.6, 0), (0, 0.8, 0.6))[None], update=False)
    assert scores.reference[0].tolist() == pytest.approx([0.0, 1 - 0.8 / 0.96])
    # 3 references > 2: they compete. s = [r1 0, r2 .6, r3 .8, y1 0, y2 0]: r3 goes, 2 survive
    y1, y2 = (0, 0, 1), (0, 0, -1)
    bank.score(rows(y1, y2)[None])
    assert bank.features[0].tolist() == [list(r1), list(r2), list(y1), list(y2)]
    assert bank.n_reference.tolist() == [2]
    # now 2 <= 2: exempt. s = [r1 0, r2 .6, y1 0, y2 0, z1 0, z2 0]; without protection r2 (the
    # largest) would go; with it the two latest (ties go to the earlier feature) go
    bank.score(rows((0, -1, 0), (-1, 0, 0))[None])
    assert bank.features[0].tolist() == [list(r1), list(r2), list(y1), list(y2)]
    assert bank.n_reference.tolist() == [2]


def test_rareclip_d_keeps_int_0333_m_and_its_kshot_map_squares_the_loose_similarity():
    """Rule 5: int(0.333 M) features per image (455 of 1369), references kept for good, and the
    k-shot map 1 - LS(max similarity, Y = 0.02)^2."""
    gen = torch.Generator().manual_seed(0)
    big = DirectPatchRarityBank(max_images=3)
    big.score(torch.nn.functional.normalize(torch.randn(1, 1369, 4, generator=gen), dim=2))
    assert big.features.shape == (1, 1, 455, 4)

    bank = DirectPatchRarityBank(max_images=2, alpha=1.0, dtype=torch.float64)
    bank.score(rows((1, 0), (0, 1))[None], reference=True)
    test = rows((1, 0), (0.6, 0.8), (0.28, 0.96), (-1, 0))[None]
    # max similarity [1, .8, .96, 0]; M = 4: the floor(4 x 0.98) = 3rd smallest is .96
    kshot = bank.score(test, update=False).reference[0]
    assert kshot.tolist() == pytest.approx([0.0, 1 - (0.8 / 0.96) ** 2, 0.0, 1.0])
    for _ in range(3):
        bank.score(rows((0.6, 0.8), (0.8, 0.6))[None])
    assert bank.n_images == 2 and bank.references[0, 0].tolist() == [[1, 0], [0, 1]]


def test_rescoring_ignores_references(tiny_config, frames):
    """Rule 3: references are not re-scoring candidates and do not count toward its threshold."""
    det = RareCLIPDetector(tiny_config.model_copy(update={"rescore_min_images": 3, "rescore_divisor": 2}))
    det.add_normal_references(frames[:4])
    assert det.images_seen == 4 and len(det.image_memory) == 0 and det.reference_laifs.shape == (4, 4, 64)
    results = [det.step(f) for f in frames[4:9]]
    # n = scored frames remembered + 1: re-scoring (top ceil(n / 2)) starts once n > 3, at the 4th
    assert [r.score == r.parts["preliminary_score"] for r in results] == [True, True, True, False, False]
    assert results[0].parts["images_seen"] == 4


def test_offline_text_mean_leaves_out_the_current_frame(tiny_config, frames):
    """Rule 4: without an update, A^_text = max(A_text, the stored mean), the frame not mixed in."""
    online = RareCLIPDetector(tiny_config)
    for f in frames[:3]:
        online.step(f)
    stored_mean = (online.text_map_sum / 3).float().numpy().reshape(14, 14)
    offline_cfg = tiny_config.model_copy(update={"mode": "offline"})
    a_text = RareCLIPDetector(offline_cfg).step(frames[10]).parts["text_map"]  # nothing memorized: A^_text = A_text
    offline = RareCLIPDetector(offline_cfg)
    offline.load_state_dict(online.state_dict())
    got = offline.step(frames[10]).parts["text_map"]
    assert np.array_equal(got, np.maximum(a_text, stored_mean))
    mixed_in = (online.text_map_sum.float().numpy().reshape(14, 14) + a_text) / 4
    assert not np.allclose(got, np.maximum(a_text, mixed_in))
