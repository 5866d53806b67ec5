"""Tests for rareclip_core.metrics against scikit-learn and a slow PRO reference."""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage
from sklearn.metrics import (
    auc,
    average_precision_score,
    precision_recall_curve,
    roc_auc_score,
)

from rareclip_core.metrics import PixelProtocol, image_metrics, pixel_metrics, pro_score


def sklearn_metrics(y, s):
    p, r, _ = precision_recall_curve(y, s)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = 2 * p * r / (p + r)
    return {
        "auroc": roc_auc_score(y, s),
        "ap": average_precision_score(y, s),
        "f1_max": np.max(f1[np.isfinite(f1)]),
    }


def slow_pro(masks, maps, max_fpr=0.3):
    """Straightforward PRO: loop over thresholds (a fine grid plus every distinct value) and regions."""
    regions = []  # (image index, region mask) pairs
    for n, mask in enumerate(masks):
        lab, k = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [(n, lab == j) for j in range(1, k + 1)]
    normal = ~masks
    grid = np.linspace(maps.min() - 1, maps.max() + 1, 97)
    thresholds = np.sort(np.unique(np.r_[maps.ravel(), grid]))[::-1]
    points = [(0.0, 0.0)]
    for th in thresholds:
        hit = maps >= th
        overlap = np.mean([hit[n][region].mean() for n, region in regions])
        fpr = (hit & normal).sum() / normal.sum()
        points.append((fpr, overlap))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:]):
        if x1 <= max_fpr:
            area += (x1 - x0) * (y0 + y1) / 2
        else:
            y_cut = y0 + (max_fpr - x0) / (x1 - x0) * (y1 - y0)
            area += (max_fpr - x0) * (y0 + y_cut) / 2
            break
    return area / max_fpr


@pytest.mark.parametrize("seed", range(8))
def test_image_metrics_match_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 300))
    y = (rng.random(n) < rng.uniform(0.1, 0.9)).astype(int)
    y[:2] = [0, 1]
    # few distinct values -> many ties; the shift makes positives score higher on average
    s = np.round(rng.random(n) + 0.3 * y, int(rng.integers(1, 3)))
    got, ref = image_metrics(y, s), sklearn_metrics(y, s)
    for key in ("auroc", "ap", "f1_max"):
        assert got[key] == pytest.approx(ref[key], abs=1e-6), key


def test_image_metrics_continuous_scores_and_bool_labels():
    rng = np.random.default_rng(42)
    y = rng.random(500) < 0.3
    s = rng.normal(size=500).astype(np.float32) + y
    got, ref = image_metrics(y, s), sklearn_metrics(y, s)
    for key in ("auroc", "ap", "f1_max"):
        assert got[key] == pytest.approx(ref[key], abs=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_pixel_metrics_match_sklearn_and_slow_pro(seed):
    rng = np.random.default_rng(seed)
    masks = np.zeros((3, 16, 16), dtype=bool)
    masks[0, 2:6, 3:8] = True
    masks[0, 10, 10] = masks[0, 11, 11] = True  # diagonal pair: one region under 8-connectivity
    masks[1, 8:15, 1:4] = True
    maps = np.round(rng.random(masks.shape) + 0.5 * masks, 1)  # ties on purpose
    got = pixel_metrics(masks, maps, size=16)
    ref = sklearn_metrics(masks.ravel(), maps.ravel())
    for key in ("auroc", "ap", "f1_max"):
        assert got[key] == pytest.approx(ref[key], abs=1e-6), key
    assert got["pro"] == pytest.approx(slow_pro(masks, maps), abs=1e-6)


def slow_steps_pro(masks, maps, steps=200, max_fpr=0.3):
    """The cflow-ad / RareCLIP authors' PRO spelled out: one pass per threshold of
    arange(min, max, (max - min) / steps), "above" strictly; points with FPR < max_fpr, their FPRs
    min-max rescaled, sklearn's auc."""
    regions = []
    for n, mask in enumerate(masks):
        lab, k = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [(n, lab == j) for j in range(1, k + 1)]
    normal = ~masks
    pros, fprs = [], []
    for th in np.arange(maps.min(), maps.max(), (maps.max() - maps.min()) / steps):
        hit = maps > th
        pros.append(np.mean([hit[n][region].sum() / region.sum() for n, region in regions]))
        fprs.append((hit & normal).sum() / normal.sum())
    pros, fprs = np.array(pros), np.array(fprs)
    kept = fprs < max_fpr
    x = (fprs[kept] - fprs[kept].min()) / (fprs[kept].max() - fprs[kept].min())
    return auc(x, pros[kept])


@pytest.mark.parametrize("seed", range(6))
def test_steps_pro_matches_the_threshold_loop(seed):
    rng = np.random.default_rng(300 + seed)
    masks = ndimage.binary_opening(rng.random((3, 20, 20)) < 0.3, np.ones((1, 2, 2)))
    masks[0, 0, 0] = True
    maps = ndimage.gaussian_filter(rng.random(masks.shape) + masks, (0, 1, 1)).astype(np.float32)
    if seed % 2:
        maps = np.round(maps, 1).astype(np.float32)  # ties, and thresholds that equal map values
    assert pro_score(masks, maps, curve="steps") == pytest.approx(slow_steps_pro(masks, maps), abs=1e-12)
    assert pro_score(masks, maps, curve="steps", steps=7) == pytest.approx(slow_steps_pro(masks, maps, 7), abs=1e-12)


def test_steps_pro_hand_computed():
    # region {0.9, 0.5}; normals 0.8 and 0.1; thresholds arange(0.1, 0.9, 0.2) = 0.1, 0.3, 0.5, 0.7,
    # "above" strictly: FPR 0.5 at all four. With max_fpr 0.6 all are kept and span no FPR: undefined
    masks = np.array([[[1, 1], [0, 0]]], dtype=bool)
    maps = np.array([[[0.9, 0.5], [0.8, 0.1]]])
    with pytest.warns(RuntimeWarning, match="fewer than two distinct FPRs"):
        assert np.isnan(pro_score(masks, maps, max_fpr=0.6, curve="steps", steps=4))
    # normals 0.8, 0.4, 0.2, 0.1: FPR 3/4, 1/2, 1/4, 1/4 and PRO 1, 1, 1/2, 1/2 at 0.1, 0.3, 0.5, 0.7;
    # kept (FPR < 0.6): the last three, FPRs rescaled to 1, 0, 0: area (1 + 1/2) / 2 = 0.75
    masks = np.array([[[1, 1, 0], [0, 0, 0]]], dtype=bool)
    maps = np.array([[[0.9, 0.5, 0.8], [0.4, 0.2, 0.1]]])
    assert pro_score(masks, maps, max_fpr=0.6, curve="steps", steps=4) == pytest.approx(0.75, abs=1e-12)


def test_steps_pro_moves_with_a_monotone_transform_of_the_maps_and_the_exact_one_does_not():
    rng = np.random.default_rng(5)
    masks = np.zeros((4, 32, 32), dtype=bool)
    masks[:, 8:16, 8:16] = True
    maps = ndimage.gaussian_filter(rng.random(masks.shape) + 0.8 * masks, (0, 2, 2))
    assert pro_score(masks, np.exp(6 * maps)) == pytest.approx(pro_score(masks, maps), abs=1e-12)
    assert abs(pro_score(masks, np.exp(6 * maps), curve="steps") - pro_score(masks, maps, curve="steps")) > 1e-3


@pytest.mark.parametrize("seed", range(6))
def test_pro_matches_slow_reference(seed):
    rng = np.random.default_rng(100 + seed)
    masks = ndimage.binary_opening(rng.random((4, 12, 12)) < 0.25, np.ones((1, 2, 2)))
    masks[0, 0, 0] = True  # at least one region
    decimals = int(rng.integers(1, 4))
    maps = np.round(rng.random(masks.shape) + rng.uniform(0, 1) * masks, decimals)
    assert pro_score(masks, maps) == pytest.approx(slow_pro(masks, maps), abs=1e-6)
    assert pro_score(masks, maps, max_fpr=0.7) == pytest.approx(slow_pro(masks, maps, 0.7), abs=1e-6)


def test_pro_hand_computed():
    masks = np.array([[[1, 1, 0], [0, 0, 0]]], dtype=bool)
    maps = np.array([[[0.9, 0.5, 0.8], [0.1, 0.2, 0.3]]])
    # curve (0,0) (0,.5) (.25,.5) (.25,1) (.5,1): area to 0.3 = .25*.5 + .05*1 = .175
    assert pro_score(masks, maps) == pytest.approx(0.175 / 0.3, abs=1e-12)


def test_pro_uses_8_connectivity_within_images_only():
    # one region {(0,0),(1,1),(1,2)} under 8-connectivity; only (0,0) scores above normals
    masks = np.array([[[1, 0, 0], [0, 1, 1]]], dtype=bool)
    maps = np.array([[[1.0, 0.5, 0.5], [0.5, 0.0, 0.0]]])
    assert pro_score(masks, maps) == pytest.approx(1 / 3, abs=1e-12)
    # same pixel position in two images: two regions (sizes 1 and 2), not one
    masks = np.zeros((2, 2, 2), dtype=bool)
    masks[0, 0, 0] = masks[1, 0, 0] = masks[1, 0, 1] = True
    maps = np.full((2, 2, 2), 0.5)
    maps[0, 0, 0], maps[1, 0, 0], maps[1, 0, 1] = 1.0, 0.0, 0.0
    assert pro_score(masks, maps) == pytest.approx(0.5, abs=1e-12)


def test_pixel_metrics_resizes_maps_bilinear_and_masks_nearest():
    rng = np.random.default_rng(7)
    masks = np.zeros((2, 64, 64), dtype=bool)
    masks[0, 10:30, 20:40] = masks[1, 40:60, 5:15] = True
    maps = rng.random((2, 24, 24)).astype(np.float32)
    got = pixel_metrics(masks, maps, size=32)
    m = F.interpolate(torch.from_numpy(masks).float()[:, None], size=(32, 32), mode="nearest-exact")
    a = F.interpolate(torch.from_numpy(maps)[:, None], size=(32, 32), mode="bilinear", align_corners=False)
    m, a = m[:, 0].numpy() > 0.5, a[:, 0].numpy()
    ref = sklearn_metrics(m.ravel(), a.ravel())
    for key in ("auroc", "ap", "f1_max"):
        assert got[key] == pytest.approx(ref[key], abs=1e-6)
    assert got["pro"] == pytest.approx(pro_score(m, a), abs=1e-12)


def test_pixel_metrics_under_the_authors_protocol_sample_masks_by_legacy_nearest_and_use_the_steps_pro():
    masks = np.zeros((2, 37, 37), dtype=bool)
    masks[0, 3:9, 5:20] = masks[1, 20:37, 30:37] = True
    maps = ndimage.gaussian_filter(masks.astype(np.float32), (0, 2, 2))[:, ::2, ::2]  # (2, 19, 19)
    got = pixel_metrics(masks, maps, size=16, protocol=PixelProtocol(mask_resize="nearest", pro_curve="steps"))
    rows = np.floor(np.arange(16) * 37 / 16).astype(int)  # legacy nearest: floor(i * in / out)
    m = masks[:, rows][:, :, rows]
    a = F.interpolate(torch.from_numpy(maps)[:, None], size=(16, 16), mode="bilinear", align_corners=False)[:, 0].numpy()
    ref = sklearn_metrics(m.ravel(), a.ravel())
    for key in ("auroc", "ap", "f1_max"):
        assert got[key] == pytest.approx(ref[key], abs=1e-6)
    assert got["pro"] == pytest.approx(slow_steps_pro(m, a), abs=1e-12)
    centres = np.floor((np.arange(16) + 0.5) * 37 / 16).astype(int)  # the default samples pixel centres
    assert not np.array_equal(rows, centres)
    with pytest.raises(ValueError, match="pro_curve"):
        PixelProtocol(pro_curve="cflow")


def test_perfect_maps_score_one():
    masks = np.zeros((2, 32, 32), dtype=bool)
    masks[0, 4:9, 4:9] = masks[1, 20:30, 1:3] = True
    got = pixel_metrics(masks, masks.astype(float), size=32)
    assert got == pytest.approx({"auroc": 1.0, "f1_max": 1.0, "ap": 1.0, "pro": 1.0})


def test_image_one_class_gives_nan_with_warning():
    with pytest.warns(RuntimeWarning) as rec:
        got = image_metrics([0, 0, 0], [0.1, 0.5, 0.2])
    assert all(np.isnan(v) for v in got.values())
    messages = " ".join(str(w.message) for w in rec)
    for key in ("image auroc", "image ap", "image f1_max"):
        assert key in messages

    with pytest.warns(RuntimeWarning, match="image auroc"):
        got = image_metrics([1, 1, 1], [0.1, 0.5, 0.2])
    assert np.isnan(got["auroc"])
    assert got["ap"] == pytest.approx(1.0) and got["f1_max"] == pytest.approx(1.0)


def test_pixel_empty_masks_give_nan_with_warning():
    masks = np.zeros((2, 8, 8), dtype=bool)
    maps = np.random.default_rng(0).random((2, 8, 8))
    with pytest.warns(RuntimeWarning) as rec:
        got = pixel_metrics(masks, maps, size=8)
    assert all(np.isnan(v) for v in got.values())
    assert "pixel pro" in " ".join(str(w.message) for w in rec)


def test_no_warning_when_defined():
    masks = np.zeros((1, 8, 8), dtype=bool)
    masks[0, 2:4, 2:4] = True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pixel_metrics(masks, np.random.default_rng(0).random((1, 8, 8)), size=8)
        image_metrics([0, 1], [0.2, 0.1])


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="binary"):
        image_metrics([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        image_metrics([0, 1], [np.nan, 0.2])
    with pytest.raises(ValueError, match="entries"):
        image_metrics([0, 1, 1], [0.1, 0.2])


def test_steps_pro_leaves_out_a_point_at_exactly_max_fpr():
    """The authors keep the thresholds whose FPR is below max_fpr, strictly."""
    masks = np.array([[[1, 1, 0], [0, 0, 0]]], dtype=bool)
    maps = np.array([[[0.9, 0.5, 0.8], [0.4, 0.2, 0.1]]])
    # FPRs at the 4 thresholds: 3/4, 1/2, 1/4, 1/4; below 0.5 only the last two, which span no FPR
    with pytest.warns(RuntimeWarning, match="fewer than two distinct FPRs"):
        assert np.isnan(pro_score(masks, maps, max_fpr=0.5, curve="steps", steps=4))
