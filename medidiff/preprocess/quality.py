"""Is a registration usable? Two numbers a person can read, measured on the template grid.

- ``correlation``: rank (Spearman) correlation of the registered scan with the template inside
  the template's brain, on both images smoothed by 2 mm. Ranks make it blind to what differs
  between scanners and heads without the registration failing (gamma, bias left after N4,
  the brain's brightness against the scalp, noise); a T2 scan on a T1 template, a CT, a knee or
  a diverged registration stays low or negative.
- ``head_dice``: overlap of the registered scan's foreground (head, or brain for a
  skull-stripped scan) with the template's, counted inside the scan's field of view only: a
  scan that stops at the chin or cuts the vertex is not a failed registration.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.stats import rankdata

SMOOTH_VOXELS = 1.0  # on the 2 mm template grid


def correlation(image: np.ndarray, template: np.ndarray, mask: np.ndarray) -> float:
    """Pearson correlation of the ranks of ``image`` and ``template`` inside ``mask``."""
    a, b = image[mask].astype(np.float64), template[mask].astype(np.float64)
    if a.size < 2 or a.std() == 0 or b.std() == 0:
        return 0.0
    return float(np.corrcoef(rankdata(a), rankdata(b))[0, 1])


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 2.0 * float(np.logical_and(a, b).sum()) / total if total else 0.0


def measure(image: np.ndarray, foreground: np.ndarray, inside: np.ndarray, target: np.ndarray,
            target_mask: np.ndarray, brain: np.ndarray) -> dict[str, float]:
    """QC numbers of a registered scan: ``image`` and its ``foreground`` on the template grid,
    ``inside`` its field of view there; ``target`` the template it was registered to (head or
    brain) with its foreground ``target_mask``, ``brain`` the template's brain mask."""
    smooth = ndimage.gaussian_filter(image, SMOOTH_VOXELS)
    reference = ndimage.gaussian_filter(target, SMOOTH_VOXELS)
    within = brain & inside
    return {"correlation": round(correlation(smooth, reference, within), 4),
            "head_dice": round(dice(foreground & inside, target_mask & inside), 4)}


def failures(qc: dict[str, float], min_correlation: float, min_head_dice: float) -> list[str]:
    """Why a registration is unusable (empty when it is fine)."""
    reasons = []
    if qc["correlation"] < min_correlation:
        reasons.append(f"registration failed: correlation with the template {qc['correlation']:.2f}"
                       f" < {min_correlation:g} (another contrast or body part, or diverged; "
                       "check preprocess.template and the scan's contrast)")
    if qc["head_dice"] < min_head_dice:
        reasons.append(f"registration failed: overlap with the template {qc['head_dice']:.2f}"
                       f" < {min_head_dice:g} (check preprocess.input: head or brain)")
    return reasons
