"""Image-quality, segmentation and anomaly-detection metrics: numpy arrays in, floats and dicts out.

Anomaly metrics follow the MOOD challenge (Zimmerer et al., IEEE TMI 41(10), 2022; the reference
evaluation is ``MIC-DKFZ/mood``, ``scripts/evalresults.py``): the voxels of all cases are pooled
before a score is computed, so a case with a large lesion weighs more than one with a small lesion,
and a pooled score is not the mean of per-case scores.

Conventions shared by every anomaly metric here:

- ``maps``, ``labels`` and ``masks`` are sequences of per-case arrays (cases may differ in shape);
  a single numpy array is taken as a stack of cases along its first axis.
- Labels and masks are cast to bool: any non-zero value is anomalous (or foreground).
- With foreground masks, voxels outside a case's mask are dropped from both the predictions and the
  labels. Unlike MOOD, map values are not clipped to [0, 1]; clipping only adds ties.
- A voxel or scan is called anomalous when its score is strictly greater than the threshold.
- A metric that is undefined for the data (for example an AUROC with one class only) is ``nan``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
from monai.metrics import compute_hausdorff_distance
from skimage.metrics import mean_squared_error, structural_similarity
from sklearn.metrics import average_precision_score, roc_auc_score

ArrayCases = Sequence[np.ndarray] | np.ndarray
_Case = tuple[np.ndarray, np.ndarray]


# ---------------------------------------------------------------------------- image quality


def _pair(pred, target) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    if pred.shape != target.shape:
        raise ValueError(f"pred shape {pred.shape} differs from target shape {target.shape}")
    return pred, target


def _mask_for(mask, shape: tuple[int, ...]) -> np.ndarray:
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != shape:
        raise ValueError(f"mask shape {mask.shape} differs from image shape {shape}")
    if not mask.any():
        raise ValueError("the mask is empty")
    return mask


def psnr(pred, target, mask=None, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB, ``10 log10(data_range**2 / MSE)``.

    With a mask the MSE is taken over the voxels inside the mask only. Identical inputs give
    ``inf``. Works for arrays of any dimension.
    """
    pred, target = _pair(pred, target)
    if mask is not None:
        keep = _mask_for(mask, pred.shape)
        pred, target = pred[keep], target[keep]
    mse = mean_squared_error(target, pred)
    if mse == 0:
        return math.inf
    return float(10.0 * np.log10(data_range**2 / mse))


def _ssim_window(shape: tuple[int, ...]) -> int:
    """skimage's default 7-voxel window, shrunk to the largest odd size that fits a small image."""
    if len(shape) not in (2, 3):
        raise ValueError(f"ssim needs a 2D or 3D array, got shape {shape}")
    smallest = min(shape)
    if smallest < 3:
        raise ValueError(f"ssim needs at least 3 voxels along every axis, got shape {shape}")
    return min(7, smallest if smallest % 2 else smallest - 1)


def ssim(pred, target, mask=None, data_range: float = 1.0) -> float:
    """Structural similarity (Wang et al., IEEE TIP 2004) of a 2D or 3D image, via scikit-image.

    Without a mask this is skimage's mean SSIM (uniform 7-voxel window, borders cropped). With a
    mask it is the mean of skimage's full SSIM map over the voxels inside the mask (borders kept).
    Images thinner than 7 voxels along an axis use the largest odd window that fits.
    """
    pred, target = _pair(pred, target)
    window = _ssim_window(pred.shape)
    if mask is None:
        return float(structural_similarity(target, pred, data_range=data_range, win_size=window))
    keep = _mask_for(mask, pred.shape)
    _, ssim_map = structural_similarity(
        target, pred, data_range=data_range, win_size=window, full=True
    )
    return float(ssim_map[keep].mean())


# ---------------------------------------------------------------------------- segmentation


def _bool_pair(pred, target) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred, dtype=bool)
    target = np.asarray(target, dtype=bool)
    if pred.shape != target.shape:
        raise ValueError(f"pred shape {pred.shape} differs from target shape {target.shape}")
    return pred, target


def _dice_counts(overlap: int, n_pred: int, n_target: int) -> float:
    total = n_pred + n_target
    return 1.0 if total == 0 else float(2.0 * overlap / total)


def dice(pred, target) -> float:
    """Dice coefficient ``2|P & T| / (|P| + |T|)`` of two boolean masks.

    Two empty masks agree perfectly, so both empty gives 1.0 (one empty gives 0.0).
    """
    pred, target = _bool_pair(pred, target)
    overlap = np.count_nonzero(pred & target)
    return _dice_counts(overlap, np.count_nonzero(pred), np.count_nonzero(target))


def dice_per_class(pred_labels, target_labels, labels: Sequence[Hashable]) -> dict:
    """Dice of each label value in two label maps: ``{label: dice(pred == label, target == label)}``.

    A label absent from both maps gets 1.0, as in :func:`dice`.
    """
    pred_labels, target_labels = np.asarray(pred_labels), np.asarray(target_labels)
    return {label: dice(pred_labels == label, target_labels == label) for label in labels}


def hd95(pred, target, spacing=None) -> float:
    """95th-percentile symmetric Hausdorff distance between the surfaces of two boolean masks.

    Computed by MONAI's ``compute_hausdorff_distance(..., percentile=95)``: the larger of the two
    directed 95th percentiles. ``spacing`` (a number or one value per axis) gives the distance in
    physical units; without it, in voxels. Returns ``nan`` when either mask is empty, because the
    distance to an empty surface is undefined.
    """
    pred, target = _bool_pair(pred, target)
    if not pred.any() or not target.any():
        return math.nan
    with warnings.catch_warnings():
        # MONAI 1.5-1.6 passes its own deprecated `always_return_as_numpy` internally.
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
        distance = compute_hausdorff_distance(
            pred[None, None], target[None, None], include_background=True, percentile=95,
            spacing=spacing,
        )
    return float(distance.item())


# ---------------------------------------------------------------------------- anomaly: voxels


def _as_float(values) -> np.ndarray:
    values = np.asarray(values)
    return values if values.dtype.kind == "f" else values.astype(np.float64)


def _masked(index: int, values: np.ndarray, mask) -> np.ndarray:
    """A case's values inside its mask (all of them without one), flattened."""
    if mask is None:
        return values.ravel()
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != values.shape:
        raise ValueError(f"case {index}: mask shape {mask.shape} != map shape {values.shape}")
    return values[mask]


def _one_case(index: int, score_map, label, mask) -> _Case:
    score_map, label = _as_float(score_map), np.asarray(label, dtype=bool)
    if label.shape != score_map.shape:
        raise ValueError(f"case {index}: label shape {label.shape} != map shape {score_map.shape}")
    return _masked(index, score_map, mask), _masked(index, label, mask)


def _cases(maps: ArrayCases, labels: ArrayCases, masks: ArrayCases | None) -> list[_Case]:
    """Each case's foreground scores and labels as flat arrays, after checking the shapes."""
    maps, labels = list(maps), list(labels)
    masks = [None] * len(maps) if masks is None else list(masks)
    if not maps:
        raise ValueError("no cases given")
    if not len(maps) == len(labels) == len(masks):
        raise ValueError(f"{len(maps)} maps, {len(labels)} labels and {len(masks)} masks")
    return [_one_case(i, m, y, k) for i, (m, y, k) in enumerate(zip(maps, labels, masks, strict=True))]


def _pool(cases: list[_Case]) -> _Case:
    return np.concatenate([s for s, _ in cases]), np.concatenate([y for _, y in cases])


def _average_precision(scores: np.ndarray, is_positive: np.ndarray) -> float:
    if not is_positive.any():
        return math.nan
    return float(average_precision_score(is_positive, scores))


def _auroc(scores: np.ndarray, is_positive: np.ndarray) -> float:
    if is_positive.all() or not is_positive.any():
        return math.nan
    return float(roc_auc_score(is_positive, scores))


def pooled_average_precision(maps: ArrayCases, labels: ArrayCases, masks=None) -> float:
    """Voxel-level average precision over the pooled voxels of all cases (MOOD pixel task).

    Concatenates each case's (foreground) voxels and computes scikit-learn's
    ``average_precision_score``. ``nan`` when no voxel is anomalous.
    """
    return _average_precision(*_pool(_cases(maps, labels, masks)))


def pooled_auroc(maps: ArrayCases, labels: ArrayCases, masks=None) -> float:
    """Voxel-level ROC AUC over the pooled voxels of all cases, as in MOOD's pooling.

    ``nan`` when the pooled voxels hold one class only.
    """
    return _auroc(*_pool(_cases(maps, labels, masks)))


def _best_dice(scores: np.ndarray, is_positive: np.ndarray, n_thresholds: int | None):
    n_positive = np.count_nonzero(is_positive)
    if n_positive == 0 or scores.size == 0:
        return math.nan, math.nan
    order = np.argsort(scores)
    ranked = scores[order]
    # positives_above[i]: anomalous voxels among ranked[i:], i.e. those predicted by a threshold
    # with i voxels at or below it.
    positives_above = np.append(np.cumsum(is_positive[order][::-1])[::-1], 0)
    if n_thresholds is None:
        distinct = ranked[np.append(ranked[1:] != ranked[:-1], True)]
        thresholds = np.append(np.nextafter(ranked[0], -np.inf), distinct)
    else:
        thresholds = np.linspace(ranked[0], ranked[-1], n_thresholds).astype(ranked.dtype)
    at_or_below = np.searchsorted(ranked, thresholds, side="right")
    overlap = positives_above[at_or_below]
    dices = 2.0 * overlap / (ranked.size - at_or_below + n_positive)
    best = int(np.argmax(dices))
    return float(dices[best]), float(thresholds[best])


def best_dice(maps: ArrayCases, labels: ArrayCases, masks=None, n_thresholds: int | None = None):
    """ORACLE: the best pooled Dice any single voxel threshold reaches, as ``(dice, threshold)``.

    This looks at the test labels to choose the threshold, so it is an upper bound to report
    beside, never instead of, the Dice at a threshold calibrated on healthy scans (the
    "best-achievable Dice" of Meissen et al. 2021, UPD_study, autoDDPM and THOR). With
    ``n_thresholds=None`` (default) it is exact: one sort and cumulative counts evaluate every
    distinct map value as a threshold. With an integer it evaluates that many thresholds evenly
    spaced between the smallest and largest pooled value, as those papers do over [0, 1]. Voxels
    with ``map > threshold`` are predicted anomalous. ``(nan, nan)`` when no voxel is anomalous.
    """
    return _best_dice(*_pool(_cases(maps, labels, masks)), n_thresholds)


def _dice_at_threshold(cases: list[_Case], threshold: float) -> tuple[float, float]:
    # per case: (overlap, predicted, anomalous) voxel counts
    counts = np.array([
        (np.count_nonzero((scores > threshold) & is_positive),
         np.count_nonzero(scores > threshold), np.count_nonzero(is_positive))
        for scores, is_positive in cases
    ])
    lesioned = [_dice_counts(*row) for row in counts if row[2] > 0]
    mean_case = float(np.mean(lesioned)) if lesioned else math.nan
    return _dice_counts(*counts.sum(axis=0)), mean_case


def dice_at_threshold(maps: ArrayCases, labels: ArrayCases, threshold: float, masks=None):
    """Dice of ``map > threshold`` as ``(pooled_dice, mean_case_dice)``.

    ``pooled_dice`` counts overlaps over the voxels of all cases together (empty prediction and
    empty labels give 1.0, as in :func:`dice`). ``mean_case_dice`` is the mean per-case Dice over
    the cases that hold an anomalous voxel; ``nan`` when none does.
    """
    return _dice_at_threshold(_cases(maps, labels, masks), threshold)


def _foreground_values(maps: ArrayCases, masks: ArrayCases | None) -> np.ndarray:
    maps = [_as_float(m) for m in maps]
    masks = [None] * len(maps) if masks is None else list(masks)
    if len(masks) != len(maps):
        raise ValueError(f"{len(maps)} maps and {len(masks)} masks")
    values = [_masked(i, m, k) for i, (m, k) in enumerate(zip(maps, masks, strict=True))]
    return np.concatenate(values) if values else np.empty(0)


def threshold_at_fpr(healthy_maps: ArrayCases, fpr: float = 0.01, masks=None) -> float:
    """Threshold that at most a fraction ``fpr`` of healthy (foreground) values strictly exceed.

    The empirical ``1 - fpr`` quantile of the pooled healthy values, taken as the order statistic
    that guarantees the rate (exactly ``fpr`` up to rounding when there are no ties), so calibration
    never uses anomalous labels (design §4). Pass healthy validation maps (with their foreground
    masks) for a voxel threshold, or a 1-D array of healthy scan scores for a scan threshold.
    """
    if not 0.0 <= fpr <= 1.0:
        raise ValueError(f"fpr must lie in [0, 1], got {fpr}")
    values = _foreground_values(healthy_maps, masks)
    if values.size == 0:
        raise ValueError("no healthy values to calibrate on")
    allowed_above = math.floor(round(fpr * values.size, 6))
    if allowed_above >= values.size:
        return float(np.nextafter(values.min(), -np.inf))
    rank = values.size - 1 - allowed_above
    return float(np.partition(values, rank)[rank])


def uncertainty_error_auroc(uncertainty, error, mask=None) -> float:
    """ROC AUC of an uncertainty map as a detector of wrong voxels (``error`` is a bool map).

    The misclassification-detection AUROC of Hendrycks & Gimpel (ICLR 2017), per voxel: does the
    model say it is unsure where it is wrong (e.g. ``error = pred != target``)? Restricted to ``mask`` when given;
    ``nan`` when all voxels are right or all wrong.
    """
    masks = None if mask is None else [mask]
    return _auroc(*_pool(_cases([uncertainty], [error], masks)))


# ---------------------------------------------------------------------------- anomaly: scans


def _scan_pair(scores, is_anomalous) -> tuple[np.ndarray, np.ndarray]:
    scores = _as_float(scores).ravel()
    is_anomalous = np.asarray(is_anomalous, dtype=bool).ravel()
    if scores.shape != is_anomalous.shape:
        raise ValueError(f"{scores.size} scores for {is_anomalous.size} scans")
    return scores, is_anomalous


def scan_auroc(scores, is_anomalous) -> float:
    """Scan-level ROC AUC of per-scan scores (MOOD sample task, sample-wise AUROC).

    ``nan`` when all scans are anomalous or all healthy: the AUROC needs both classes.
    """
    return _auroc(*_scan_pair(scores, is_anomalous))


def scan_average_precision(scores, is_anomalous) -> float:
    """Scan-level average precision of per-scan scores (the MOOD sample-task metric).

    ``nan`` when no scan is anomalous; when all are, every ranking is perfect and it is 1.0.
    """
    return _average_precision(*_scan_pair(scores, is_anomalous))


def _scan_metrics(cases: Sequence[Mapping], anomalous: np.ndarray, threshold) -> dict:
    scores = [case.get("score") for case in cases]
    if all(score is None for score in scores):
        return {}
    if any(score is None for score in scores):
        raise ValueError("either every case or no case must have a 'score'")
    scores, anomalous = _scan_pair(scores, anomalous)
    out = {"scan_auroc": _auroc(scores, anomalous),
           "scan_ap": _average_precision(scores, anomalous)}
    if threshold is not None:
        flagged = scores > threshold
        out["scan_sensitivity"] = float(flagged[anomalous].mean()) if anomalous.any() else math.nan
        out["scan_specificity"] = (float((~flagged[~anomalous]).mean())
                                   if not anomalous.all() else math.nan)
    return out


def evaluate_anomaly(cases: Sequence[Mapping], voxel_threshold: float | None = None,
                     scan_threshold: float | None = None) -> dict[str, float]:
    """All anomaly-detection metrics of design §4 for a list of cases, as one flat dict.

    Each case is a mapping with ``map`` (float array), ``label`` (bool array, all False for a
    healthy case), optional ``mask`` (foreground) and ``score`` (per-scan score; given for every
    case or for none, in which case the scan keys are left out). A case is anomalous when its
    label holds an anomalous voxel inside its mask. Keys: ``n_cases``, ``n_anomalous_cases``,
    ``pooled_ap`` (MOOD), ``pooled_auroc``, ``best_dice_oracle`` and ``best_dice_oracle_threshold``
    (exact oracle, see :func:`best_dice`); with ``voxel_threshold``: ``dice_at_threshold``,
    ``mean_case_dice_at_threshold`` and ``voxel_fpr_at_threshold`` (share of pooled normal voxels
    above it); with scores: ``scan_auroc``, ``scan_ap``; with ``scan_threshold`` as well:
    ``scan_sensitivity`` and ``scan_specificity`` (a scan is flagged when its score exceeds it).
    """
    prepared = _cases([c["map"] for c in cases], [c["label"] for c in cases],
                      [c.get("mask") for c in cases])
    anomalous = np.array([is_positive.any() for _, is_positive in prepared])
    scores, is_positive = _pool(prepared)
    best, best_threshold = _best_dice(scores, is_positive, None)
    out = {"n_cases": len(prepared), "n_anomalous_cases": int(anomalous.sum()),
           "pooled_ap": _average_precision(scores, is_positive),
           "pooled_auroc": _auroc(scores, is_positive),
           "best_dice_oracle": best, "best_dice_oracle_threshold": best_threshold}
    if voxel_threshold is not None:
        pooled, mean_case = _dice_at_threshold(prepared, voxel_threshold)
        normal = scores[~is_positive]
        out["dice_at_threshold"] = pooled
        out["mean_case_dice_at_threshold"] = mean_case
        out["voxel_fpr_at_threshold"] = (float(np.mean(normal > voxel_threshold))
                                         if normal.size else math.nan)
    out.update(_scan_metrics(cases, anomalous, scan_threshold))
    return out
