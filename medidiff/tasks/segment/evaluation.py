"""Segmentation against reference label maps: Dice, HD95 and the uncertainty's error AUROC."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medidiff import metrics
from medidiff.errors import InputError
from medidiff.io.read import load_image


def load_reference(path: str | Path, shape: tuple[int, ...]) -> np.ndarray:
    """A reference label map as integers; its shape must be the image's (``shape``)."""
    path = Path(path)
    array, _ = load_image(path)
    labels = np.rint(array[0]).astype(np.int64)
    if labels.shape != tuple(shape):
        raise InputError(path, f"has shape {labels.shape}, but its image has shape {tuple(shape)}")
    return labels


def evaluate_labels(pred: np.ndarray, reference: np.ndarray, num_classes: int,
                    spacing=None, uncertainty: np.ndarray | None = None) -> dict[str, float]:
    """Dice and HD95 (mm with ``spacing``) per foreground class and their means; with an
    uncertainty map, the AUROC of it for the misclassified voxels inside the reference's
    foreground (``uncertainty_auroc``, Hendrycks & Gimpel 2017)."""
    classes = list(range(1, num_classes))
    dice = metrics.dice_per_class(pred, reference, classes)
    out = {f"dice_{c}": dice[c] for c in classes}
    out["dice_mean"] = float(np.mean(list(dice.values())))
    hd = [metrics.hd95(pred == c, reference == c, spacing=spacing) for c in classes]
    out.update({f"hd95_{c}": h for c, h in zip(classes, hd, strict=True)})
    out["hd95_mean"] = float(np.nanmean(hd)) if not np.all(np.isnan(hd)) else float("nan")
    if uncertainty is not None:
        out["uncertainty_auroc"] = metrics.uncertainty_error_auroc(
            uncertainty, pred != reference, mask=reference > 0)
    return out


def voxel_spacing(affine: np.ndarray) -> list[float]:
    """Voxel size (mm) along each array axis, from the affine's column norms."""
    return [float(s) for s in np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))]
