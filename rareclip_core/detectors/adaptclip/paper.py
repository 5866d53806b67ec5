"""The AdaptCLIP paper's figures (Table 1: image AUROC, Table 2: pixel AUPR), for `evaluate` to print beside a run's."""
from __future__ import annotations

from typing import Optional

from ...contract import PaperFigures

# In %, (mean, std over the paper's 3 reference draws; None for zero-shot, which has no draw).
# Image AUROC and pixel AUPR (our P-AP); MVTec AD with the VisA-trained adapters, VisA with the
# MVTec-trained ones.
FIGURES = {
    ("mvtec", 0): {"I-AUROC": (93.5, None), "P-AP": (38.3, None)},
    ("mvtec", 1): {"I-AUROC": (94.5, 0.5), "P-AP": (53.7, 0.9)},
    ("mvtec", 2): {"I-AUROC": (95.7, 0.6), "P-AP": (55.1, 0.5)},
    ("mvtec", 4): {"I-AUROC": (96.6, 0.3), "P-AP": (57.2, 0.8)},
    ("visa", 0): {"I-AUROC": (84.8, None), "P-AP": (26.1, None)},
    ("visa", 1): {"I-AUROC": (90.5, 1.2), "P-AP": (38.9, 0.3)},
    ("visa", 2): {"I-AUROC": (92.2, 0.8), "P-AP": (40.7, 0.6)},
    ("visa", 4): {"I-AUROC": (93.1, 0.2), "P-AP": (41.8, 0.6)},
}
TRAINED_ON = {"mvtec": "VisA", "visa": "MVTec AD"}


def paper_figures(dataset: str, shots: int) -> Optional[PaperFigures]:
    """The paper's I-AUROC and P-AUPR for MVTec AD / VisA with 0, 1, 2 or 4 normal references; None otherwise."""
    values = FIGURES.get((dataset, shots))
    if values is None:
        return None
    note = (f"their ViT-L-14-336 at 518 with adapters trained on {TRAINED_ON[dataset]}"
            + (f"; {shots} train images drawn with replacement by seeds 10/20/30, test in the official order" if shots else ""))
    return PaperFigures("AdaptCLIP paper, Tables 1 and 2", "AdaptCLIP" + (f", {shots}-shot" if shots else ", zero-shot"), values, note)
