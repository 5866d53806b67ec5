"""The Dual-Image CLIP paper's Table 1, for `evaluate` to print beside a run's figures."""
from __future__ import annotations

from typing import Optional

from ...contract import PaperFigures

SOURCE = "Dual-Image CLIP paper (arXiv 2405.04782), Table 1"


def _row(pixel_auroc, pixel_f1, pro, image_auroc, image_f1, image_ap):
    values = {"P-AUROC": pixel_auroc, "P-F1-max": pixel_f1, "PRO": pro,
              "I-AUROC": image_auroc, "I-F1-max": image_f1, "I-AP": image_ap}
    return {k: (v, None) for k, v in values.items()}


# In %: "Ours" (pairs, no TTA) and "Ours+" (pairs and TTA); means over the paper's seeds.
TABLE_1 = {
    ("mvtec", False): _row(92.6, 41.8, 82.6, 93.1, 94.0, 96.6),
    ("mvtec", True): _row(92.8, 42.5, 84.0, 93.2, 94.1, 96.7),
    ("visa", False): _row(94.8, 23.5, 78.6, 82.6, 81.0, 84.2),
    ("visa", True): _row(94.2, 24.1, 79.7, 82.9, 80.9, 84.7),
}


def paper_figures(dataset: str, with_tta: bool, shots: int = 0) -> Optional[PaperFigures]:
    """Table 1's row for the dataset and whether TTA runs; None for other datasets and k-shot."""
    if dataset not in ("mvtec", "visa") or shots:
        return None
    return PaperFigures(
        SOURCE,
        "Ours+ (pair + TTA)" if with_tta else "Ours (pair)",
        TABLE_1[(dataset, with_tta)],
        "ViT-B-16+ (laion400m_e32); each test image paired with a random other test image of its "
        "class, where a line here uses only its earlier frames",
    )
