"""The RareCLIP paper's Table 1, for `evaluate` to print beside a run's figures."""
from __future__ import annotations

from typing import Optional

from ...contract import PaperFigures

SOURCE = "RareCLIP paper, Table 1"
METRICS = ("I-AUROC", "I-F1-max", "I-AP", "P-AUROC", "P-F1-max", "P-AP", "PRO")
VARIANT_NAMES = {"iprb": "RareCLIP", "dprb": "RareCLIP-d"}


def _row(*values):
    return dict(zip(METRICS, values))


# In %, (mean, std over the paper's 5 seeds); std None where the paper gives none (offline results
# do not depend on the order). None as a whole marks a cell the paper reports but whose value
# cannot be read unambiguously from our text copy (VisA offline: its columns there have fewer
# values than methods).
TABLE_1 = {
    ("mvtec", "online", "iprb"): _row((98.2, 0.2), (97.6, 0.1), (99.3, 0.1), (97.7, 0.2), (64.1, 0.7), (66.1, 1.0), (93.5, 0.1)),
    ("visa", "online", "iprb"): _row((94.4, 0.3), (90.8, 0.4), (95.3, 0.2), (98.8, 0.0), (50.9, 0.3), (47.5, 0.3), (93.5, 0.1)),
    ("mvtec", "online", "dprb"): _row((97.9, 0.2), (97.4, 0.2), (99.1, 0.2), (97.8, 0.1), (62.9, 0.5), (64.2, 1.1), (93.4, 0.1)),
    ("visa", "online", "dprb"): _row((93.5, 0.2), (90.2, 0.3), (94.1, 0.5), (98.9, 0.0), (48.1, 0.4), (44.2, 0.5), (93.2, 0.1)),
    ("mvtec", "offline", "iprb"): _row((91.5, None), (92.9, None), (96.6, None), (91.5, None), (47.5, None), (46.1, None), (86.2, None)),
    ("visa", "offline", "iprb"): _row((86.1, None), (83.1, None), None, (95.7, None), None, None, None),
}


# Table 2: 4 normal references (k-shot), image and pixel AUROC only, no std.
TABLE_2 = {
    ("mvtec", "offline", "iprb"): {"I-AUROC": (97.7, None), "P-AUROC": (98.1, None)},
    ("mvtec", "online", "iprb"): {"I-AUROC": (98.7, None), "P-AUROC": (98.2, None)},
    ("visa", "offline", "iprb"): {"I-AUROC": (94.6, None), "P-AUROC": (98.8, None)},
    ("visa", "online", "iprb"): {"I-AUROC": (95.5, None), "P-AUROC": (98.8, None)},
}


def paper_figures(dataset: str, mode: str, rarity_branch: str, shots: int = 0) -> Optional[PaperFigures]:
    """Table 1's row (zero-shot) or Table 2's (4 references) for this dataset, mode and variant
    (no values where the paper leaves the setting out, e.g. RareCLIP-d offline); None for other
    datasets than MVTec AD and VisA, and for other numbers of references."""
    if dataset not in ("mvtec", "visa") or shots not in (0, 4):
        return None
    table, source = (TABLE_1, SOURCE) if shots == 0 else (TABLE_2, "RareCLIP paper, Table 2")
    row = f"{VARIANT_NAMES[rarity_branch]}, {mode}" + (f", {shots}-shot" if shots else "")
    return PaperFigures(source, row, table.get((dataset, mode, rarity_branch), {}),
                        "their ViT-L-14-336 model and TPB weights" + (", 5 seeds" if shots == 0 else ""))
