"""The `threshold: auto` rule: a line's threshold from its own first scores, robust to a few
defects among them (the median and the median absolute deviation ignore up to half outliers)."""
from __future__ import annotations

import numpy as np

MAD_TO_SD = 1.4826  # MAD * this = the standard deviation of normally distributed scores


def robust_threshold(scores, mads: float) -> float:
    """median(scores) + mads * 1.4826 * MAD(scores), MAD = median |score - median|.

    On the first N ok scores of a line this flags a later score as an anomaly when it lies more
    than `mads` (normal-equivalent) standard deviations above the line's typical score; a few
    defects among the N move neither the median nor the MAD much."""
    values = np.asarray(scores, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError("robust_threshold needs a non-empty 1-D list of scores")
    median = float(np.median(values))
    mad = float(np.median(np.abs(values - median)))
    return median + mads * MAD_TO_SD * mad
