"""The AFR-CLIP paper's zero-shot figures (Tables 1-2: image and pixel AUROC and F1-max), for
`evaluate` to print beside a run's figures."""
from __future__ import annotations

from typing import Optional

from ...contract import PaperFigures

# In %, no std (one trained model, no shuffling: the paper's results do not depend on order)
ZERO_SHOT = {
    "mvtec": {"I-AUROC": 93.4, "I-F1-max": 92.3, "P-AUROC": 92.3, "P-F1-max": 47.9},
    "visa": {"I-AUROC": 87.0, "I-F1-max": 84.7, "P-AUROC": 96.0, "P-F1-max": 38.1},
    "btad": {"I-AUROC": 95.8, "I-F1-max": 93.2, "P-AUROC": 95.0, "P-F1-max": 52.1},
    "mpdd": {"I-AUROC": 77.9, "I-F1-max": 84.5, "P-AUROC": 97.1, "P-F1-max": 35.6},
}


def paper_figures(dataset: str, shots: int = 0) -> Optional[PaperFigures]:
    """The paper's row for this dataset (zero-shot only; None otherwise)."""
    if dataset not in ZERO_SHOT or shots:
        return None
    values = {metric: (value, None) for metric, value in ZERO_SHOT[dataset].items()}
    other = "VisA" if dataset != "visa" else "MVTec AD"
    return PaperFigures("AFR-CLIP paper, Tables 1-2", "AFR-CLIP, zero-shot", values,
                        f"their weights, trained on {other} (none published; a run here uses ours)")
