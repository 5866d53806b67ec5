"""Image- and pixel-level anomaly-detection metrics (docs/algorithms/rareclip.md section 7).

Every metric is returned as a fraction in [0, 1] (multiply by 100 for the paper's %).

AUROC and AP equal scikit-learn's ``roc_auc_score`` and ``average_precision_score``;
F1-max is the maximum of 2PR/(P+R) over the points of ``precision_recall_curve`` (the
usual anomaly-detection evaluation code). All three are evaluated at every distinct
score value, so ties are handled as in scikit-learn. They are computed from a single
numpy sort, which keeps 100 x 256 x 256 pixel evaluations fast.

Undefined metrics: when the ground truth holds a single class the metrics that need the
missing class are returned as NaN and a ``RuntimeWarning`` names each of them:

* no positives (all labels 0, or all masks empty): auroc, ap, f1_max (and pro) are NaN;
* no negatives (all labels 1, or masks covering every pixel): auroc (and pro) are NaN,
  while ap = f1_max = 1 as in scikit-learn.

Two conventions of the pixel metrics differ between evaluation codes (:class:`PixelProtocol`):
how masks are sampled down to the metric resolution, and how the PRO curve is integrated
(exactly, as the MVTec AD evaluation code does; or at 200 thresholds with the kept FPRs
rescaled to [0, 1], as cflow-ad's code and the RareCLIP authors' ``cal_pro_score`` do).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

__all__ = ["PixelProtocol", "image_metrics", "pixel_metrics", "pro_score"]

PRO_MAX_FPR = 0.3
PRO_CURVES = ("exact", "steps")


@dataclass(frozen=True)
class PixelProtocol:
    """How :func:`pixel_metrics` brings masks to its resolution and integrates PRO."""

    mask_resize: str = "nearest-exact"  # torch mode: pixel centres; "nearest": legacy floor(i * in / out)
    pro_curve: str = "exact"  # "exact" | "steps" (see :func:`pro_score`)
    pro_steps: int = 200  # thresholds of the "steps" curve

    def __post_init__(self):
        if self.mask_resize not in ("nearest-exact", "nearest"):
            raise ValueError(f"mask_resize must be 'nearest-exact' or 'nearest', got {self.mask_resize!r}")
        if self.pro_curve not in PRO_CURVES:
            raise ValueError(f"pro_curve must be one of {PRO_CURVES}, got {self.pro_curve!r}")


def image_metrics(labels, scores) -> dict[str, float]:
    """Image-level ``auroc``, ``f1_max`` and ``ap``.

    labels: (N,) bool or 0/1, 1 = anomalous; scores: (N,) anomaly scores, higher = more anomalous.
    """
    y = _as_binary(labels, "labels").ravel()
    s = _as_scores(scores, "scores").ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels has {y.size} entries but scores has {s.size}")
    order, ends = _distinct_thresholds(s)
    return _ranking_metrics(y[order], ends, "image")


def pixel_metrics(masks, maps, size: int = 256, protocol: PixelProtocol = PixelProtocol()) -> dict[str, float]:
    """Pixel-level ``auroc``, ``f1_max``, ``ap`` and ``pro`` over all pixels of all images.

    masks: (N, H, W) bool or 0/1 ground truth; maps: (N, H', W') float anomaly maps.
    Both are brought to (N, size, size) first unless already that size: maps by bilinear
    interpolation (``align_corners=False``, no antialiasing), masks by ``protocol.mask_resize``
    sampling then binarized at > 0.5. PRO is :func:`pro_score` with FPR limit 0.3 and the
    protocol's curve.
    """
    m = _resize(_as_scores(masks, "masks"), size, protocol.mask_resize) > 0.5  # (N, size, size)
    a = _resize(_as_scores(maps, "maps"), size, "bilinear")  # (N, size, size)
    if m.shape[0] != a.shape[0]:
        raise ValueError(f"{m.shape[0]} masks but {a.shape[0]} maps")
    order, ends = _distinct_thresholds(a.ravel())
    out = _ranking_metrics(m.ravel()[order], ends, "pixel")
    if protocol.pro_curve == "exact":
        out["pro"] = _pro_from_sorted(m, order, ends, PRO_MAX_FPR)
    else:
        out["pro"] = _pro_at_steps(m, a, PRO_MAX_FPR, protocol.pro_steps)
    return out


def pro_score(masks, maps, max_fpr: float = PRO_MAX_FPR, curve: str = "exact", steps: int = 200) -> float:
    """Normalized area under the per-region-overlap (PRO) curve for FPR in [0, max_fpr].

    masks: (N, H, W) bool ground truth; maps: (N, H, W) anomaly maps (same shape, no resizing).
    Regions are the connected components (8-connectivity, ``scipy.ndimage.label``) of every
    mask, K of them over all images. For a threshold th,

    * PRO(th) = (1/K) * sum_k |{p in region k : map(p) above th}| / |region k|,
    * FPR(th) = |{p : mask(p) = 0, map(p) above th}| / |{p : mask(p) = 0}|.

    ``curve="exact"`` (the MVTec AD evaluation code's definition): "above" is >=; the curve is
    the point (0, 0) followed by (FPR(th), PRO(th)) for every distinct map value th in
    decreasing order (both coordinates non-decreasing). It is integrated with the trapezoid
    rule from FPR 0 to ``max_fpr``, the segment crossing ``max_fpr`` being linearly
    interpolated there, and the area is divided by ``max_fpr``, so a perfect detector scores 1.

    ``curve="steps"`` (cflow-ad's code, which the RareCLIP authors use for their Table 1):
    "above" is >; the thresholds are ``numpy.arange(lo, hi, (hi - lo) / steps)`` in the maps'
    dtype, lo and hi the smallest and largest map value; only points with FPR < ``max_fpr``
    are kept, their FPRs rescaled to [0, 1] by their own min and max, and the area under
    PRO over those rescaled FPRs is the trapezoid rule's. It depends on the maps' value range
    (a monotone transform of the maps changes it) and reads up to about a point apart from
    the exact curve.

    Returns NaN with a warning when there is no region (all masks empty) or no normal pixel,
    and for "steps" when the kept points span no FPR (constant maps, say).
    """
    if curve not in PRO_CURVES:
        raise ValueError(f"curve must be one of {PRO_CURVES}, got {curve!r}")
    m = _as_binary(masks, "masks").astype(bool)
    a = _as_scores(maps, "maps")
    if m.shape != a.shape or m.ndim != 3:
        raise ValueError(f"masks {m.shape} and maps {a.shape} must both be (N, H, W)")
    if curve == "steps":
        return _pro_at_steps(m, a, max_fpr, steps)
    order, ends = _distinct_thresholds(a.ravel())
    return _pro_from_sorted(m, order, ends, max_fpr)


def _as_binary(x, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype != bool and not np.isin(arr, (0, 1)).all():
        raise ValueError(f"{name} must be binary (bool or 0/1)")
    return arr.astype(np.int8)


def _as_scores(x, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float64)
    if np.isnan(arr).any():
        raise ValueError(f"{name} contains NaN")
    return arr


def _resize(x: np.ndarray, size: int, mode: str) -> np.ndarray:
    """(N, H, W) -> (N, size, size) with torch interpolation; unchanged if already that size."""
    if x.ndim != 3:
        raise ValueError(f"expected an (N, H, W) array, got shape {x.shape}")
    if x.shape[1:] == (size, size):
        return x
    kwargs = {"align_corners": False} if mode == "bilinear" else {}
    t = torch.from_numpy(np.ascontiguousarray(x))[:, None]  # (N, 1, H, W)
    return F.interpolate(t, size=(size, size), mode=mode, **kwargs)[:, 0].numpy()


def _distinct_thresholds(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Descending sort order of ``scores`` and the last sorted index of each distinct value."""
    order = np.argsort(scores)[::-1]
    s = scores[order]
    ends = np.r_[np.flatnonzero(s[1:] != s[:-1]), s.size - 1]
    return order, ends


def _ranking_metrics(y_sorted: np.ndarray, ends: np.ndarray, level: str) -> dict[str, float]:
    """AUROC, AP and F1-max from labels sorted by decreasing score (sklearn's curve points)."""
    tps = np.cumsum(y_sorted, dtype=np.float64)[ends]  # true positives at each threshold
    fps = (ends + 1) - tps  # false positives at each threshold
    n_pos, n_neg = tps[-1], fps[-1]
    out = {"auroc": np.nan, "f1_max": np.nan, "ap": np.nan}
    if n_pos > 0 and n_neg > 0:
        tp0, fp0 = np.r_[0.0, tps], np.r_[0.0, fps]
        out["auroc"] = float(np.sum(np.diff(fp0) * (tp0[1:] + tp0[:-1])) / (2.0 * n_pos * n_neg))
    if n_pos > 0:
        precision = tps / (tps + fps)
        recall = tps / n_pos
        out["ap"] = float(np.sum(np.diff(np.r_[0.0, recall]) * precision))
        denom = precision + recall
        f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
        out["f1_max"] = float(f1.max())
    for name, value in out.items():
        if np.isnan(value):
            missing = "positive" if n_pos == 0 else "negative"
            _warn_undefined(f"{level} {name}", f"no {missing} samples")
    return out


def _mask_regions(masks: np.ndarray) -> tuple[np.ndarray, int, int]:
    """Flattened region ids of (N, H, W) masks (0 = normal; 8-connected inside each image, no
    link across images), the number of regions and of normal pixels; warns where PRO is undefined."""
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True
    regions, k = ndimage.label(masks, structure=structure)
    regions = regions.ravel()
    n_normal = int(np.count_nonzero(regions == 0))
    if k == 0 or n_normal == 0:
        _warn_undefined("pixel pro", "no anomalous region" if k == 0 else "no normal pixel", stacklevel=5)
    return regions, k, n_normal


def _pro_from_sorted(masks: np.ndarray, order: np.ndarray, ends: np.ndarray, max_fpr: float) -> float:
    """The exact PRO (see :func:`pro_score`) given the descending order of the flattened maps."""
    regions, k, n_normal = _mask_regions(masks)
    if k == 0 or n_normal == 0:
        return float("nan")
    region_size = np.bincount(regions, minlength=k + 1).astype(np.float64)
    weight = 1.0 / (k * region_size)  # each region's pixels together weigh 1/K
    weight[0] = 0.0
    regions = regions[order]  # region id of each pixel, by decreasing score
    pro = np.r_[0.0, np.cumsum(weight[regions])[ends]]
    fpr = np.r_[0.0, np.cumsum(regions == 0)[ends] / n_normal]
    cut = np.searchsorted(fpr, max_fpr, side="right")  # first point past max_fpr (fpr[-1] = 1)
    x, y = fpr[:cut], pro[:cut]
    if cut < fpr.size:
        t = (max_fpr - fpr[cut - 1]) / (fpr[cut] - fpr[cut - 1])
        x = np.r_[x, max_fpr]
        y = np.r_[y, pro[cut - 1] + t * (pro[cut] - pro[cut - 1])]
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1])) / 2.0 / max_fpr)


def _pro_at_steps(masks: np.ndarray, maps: np.ndarray, max_fpr: float, steps: int) -> float:
    """The "steps" PRO (see :func:`pro_score`): each pixel counted once, by how many of the
    thresholds lie below its value, instead of one pass over the maps per threshold."""
    regions, k, n_normal = _mask_regions(masks)
    if k == 0 or n_normal == 0:
        return float("nan")
    lo, hi = maps.min(), maps.max()
    if not hi > lo:
        _warn_undefined("pixel pro", "the maps are constant")
        return float("nan")
    thresholds = np.arange(lo, hi, (hi - lo) / steps)  # (T,) ascending, in the maps' dtype
    n = thresholds.size
    below = np.searchsorted(thresholds, maps.ravel(), side="left")  # thresholds th < value: the pixel is above them
    counts = np.bincount(regions * (n + 1) + below, minlength=(k + 1) * (n + 1)).reshape(k + 1, n + 1)
    above = counts.sum(axis=1, keepdims=True) - np.cumsum(counts, axis=1)[:, :n]  # (K+1, T) pixels > th_j
    region_size = counts.sum(axis=1)[1:, None].astype(np.float64)
    pro = (above[1:] / region_size).mean(axis=0)  # (T,)
    fpr = above[0] / n_normal  # (T,), non-increasing
    kept = fpr < max_fpr
    x, y = fpr[kept], pro[kept]
    if x.size < 2 or not x.max() > x.min():
        _warn_undefined("pixel pro", f"fewer than two distinct FPRs under {max_fpr} at {steps} thresholds")
        return float("nan")
    x = (x - x.min()) / (x.max() - x.min())
    return float(-np.sum(np.diff(x) * (y[1:] + y[:-1])) / 2.0)  # x falls as th rises


def _warn_undefined(metric: str, reason: str, stacklevel: int = 4) -> None:
    warnings.warn(f"{metric} is undefined ({reason}); returning NaN", RuntimeWarning, stacklevel=stacklevel)
