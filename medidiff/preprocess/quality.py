"""Is a registration usable? Two numbers a person can read, measured on the template grid.

- ``correlation``: Pearson correlation of the registered scan with the template inside the
  template's brain: a T1 head on the T1 template is high; a T2 scan, a CT, a knee or a
  diverged registration is low or negative.
- ``head_dice``: overlap of the registered scan's head (its foreground) with the template's.
"""

from __future__ import annotations

import numpy as np


def correlation(image: np.ndarray, template: np.ndarray, mask: np.ndarray) -> float:
    a, b = image[mask].astype(np.float64), template[mask].astype(np.float64)
    if a.size < 2 or a.std() == 0 or b.std() == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 2.0 * float(np.logical_and(a, b).sum()) / total if total else 0.0


def measure(image: np.ndarray, head: np.ndarray, template) -> dict[str, float]:
    """QC numbers of a registered scan (``head``: its foreground on the template grid)."""
    return {"correlation": round(correlation(image, template.head, template.brain), 4),
            "head_dice": round(dice(head, template.head_mask), 4)}


def failures(qc: dict[str, float], min_correlation: float, min_head_dice: float) -> list[str]:
    """Why a registration is unusable (empty when it is fine)."""
    reasons = []
    if qc["correlation"] < min_correlation:
        reasons.append(f"registration failed: correlation with the template {qc['correlation']:.2f}"
                       f" < {min_correlation:g} (another contrast or body part, or diverged)")
    if qc["head_dice"] < min_head_dice:
        reasons.append(f"registration failed: head overlap with the template {qc['head_dice']:.2f}"
                       f" < {min_head_dice:g}")
    return reasons
