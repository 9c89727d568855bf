"""Evaluating anomaly maps against lesion masks, as the MOOD challenge does, plus per-scan metrics.

Voxels pooled over all cases are those of the scorer's foreground (where the map is above zero:
medidiff's maps are zero outside the foreground) together with every lesion voxel, so lesions
missed by the foreground count as misses. Dice at the calibrated threshold uses the masks that
``anomaly score`` wrote; the best Dice is an oracle (it looks at the labels).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from medidiff import metrics
from medidiff.errors import InputError
from medidiff.inference.cases import read_table

MAP_SUFFIX = "_anomaly.nii.gz"
MASK_SUFFIX = "_anomaly_mask.nii.gz"


def _read(path: Path) -> np.ndarray:
    try:
        return np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)
    except Exception as err:  # nibabel raises many types for bad files
        raise InputError(path, f"is not a readable NIfTI file ({type(err).__name__})") from None


def _label_path(label_dir: Path, case: str) -> Path | None:
    for suffix in (".nii.gz", ".nii"):
        path = label_dir / f"{case}{suffix}"
        if path.is_file():
            return path
    return None


def load_cases(pred_dir: str | Path, label_dir: str | Path) -> list[dict]:
    """Pair every ``CASE_anomaly.nii.gz`` with ``CASE.nii.gz`` in the label folder."""
    pred_dir, label_dir = Path(pred_dir), Path(label_dir)
    for folder in (pred_dir, label_dir):
        if not folder.is_dir():
            raise InputError(folder, "does not exist" if not folder.exists() else "is not a folder")
    maps = sorted(pred_dir.glob(f"*{MAP_SUFFIX}"))
    if not maps:
        raise InputError(pred_dir, f"holds no *{MAP_SUFFIX} files")
    scores = {row["case"]: float(row["score"]) for row in read_table(pred_dir / "scores.csv")}
    cases = []
    for map_path in maps:
        case = map_path.name[: -len(MAP_SUFFIX)]
        label_path = _label_path(label_dir, case)
        if label_path is None:
            raise InputError(label_dir, f"has no label file for case '{case}' ({case}.nii.gz)")
        amap, label = _read(map_path), _read(label_path) > 0.5
        if amap.shape != label.shape:
            raise InputError(label_path, f"has shape {label.shape}, the map has {amap.shape}")
        mask_path = pred_dir / f"{case}{MASK_SUFFIX}"
        predicted = _read(mask_path) > 0.5 if mask_path.is_file() else None
        cases.append({"case": case, "map": amap, "label": label,
                      "mask": (amap > 0) | label, "predicted": predicted,
                      "score": scores.get(case, float(np.sort(amap.ravel())[-100:].mean()))})
    return cases


def evaluate_folder(pred_dir: str | Path, label_dir: str | Path) -> dict:
    """All metrics for a prediction folder (see the module docstring)."""
    cases = load_cases(pred_dir, label_dir)
    result = metrics.evaluate_anomaly(cases)
    with_masks = [c for c in cases if c["predicted"] is not None]
    if with_masks:
        pred = np.concatenate([c["predicted"][c["mask"]] for c in with_masks])
        truth = np.concatenate([c["label"][c["mask"]] for c in with_masks])
        result["dice_at_calibrated_threshold"] = metrics.dice(pred, truth)
        lesioned = [c for c in with_masks if c["label"].any()]
        result["mean_case_dice_at_calibrated_threshold"] = (
            float(np.mean([metrics.dice(c["predicted"], c["label"]) for c in lesioned]))
            if lesioned else float("nan"))
    result["cases"] = [c["case"] for c in cases]
    return result


def summary_entry(pred_dir: str | Path, label_dir: str | Path,
                  cases: list[dict] | None = None, max_voxels: int = 200_000) -> dict:
    """What the summary picture shows of one method's folder: its pooled voxels (those of the
    pooled AP, subsampled evenly to ``max_voxels`` after sorting by score), its pooled AP, its
    scans' scores with whether each holds a lesion, and the calibrated per-scan threshold
    recorded in ``score_settings.json`` (None when absent)."""
    pred_dir = Path(pred_dir)
    cases = load_cases(pred_dir, label_dir) if cases is None else cases
    scores = np.concatenate([c["map"][c["mask"]] for c in cases])
    truth = np.concatenate([c["label"][c["mask"]] for c in cases])
    ap = metrics.pooled_average_precision([c["map"] for c in cases], [c["label"] for c in cases],
                                          [c["mask"] for c in cases])
    if scores.size > max_voxels:  # the curve's shape survives an even subsample of the ranking
        order = np.argsort(scores, kind="stable")
        keep = order[np.linspace(0, order.size - 1, max_voxels).round().astype(int)]
        scores, truth = scores[keep], truth[keep]
    threshold = None
    settings = pred_dir / "score_settings.json"
    if settings.is_file():
        import json

        try:
            threshold = json.loads(settings.read_text()).get("scan_threshold")
        except (OSError, ValueError):
            threshold = None
    return {"scores": scores, "labels": truth, "ap": ap,
            "scans": [(c["case"], float(c["score"]), bool((c["label"] & c["mask"]).any()))
                      for c in cases],
            "scan_threshold": float(threshold) if threshold is not None else None}


def summary_picture(folders: dict[str, str | Path], label_dir: str | Path,
                    title: str = "anomaly detection on the test scans") -> np.ndarray:
    """The summary figure (RGB uint8) of one or more methods' prediction folders
    (method -> folder): their precision-recall curves on one plot, their per-scan scores."""
    from medidiff.tasks.anomaly.figures import summary_figure

    return summary_figure({m: summary_entry(f, label_dir) for m, f in folders.items()}, title)


def method_of(pred_dir: str | Path) -> str:
    """The method a folder was scored with (``score_settings.json``), else the folder's name."""
    import json

    try:
        return str(json.loads((Path(pred_dir) / "score_settings.json").read_text())["method"])
    except (OSError, ValueError, KeyError, TypeError):
        return Path(pred_dir).name


def format_metrics(result: dict) -> str:
    keys = ["pooled_ap", "pooled_auroc", "dice_at_calibrated_threshold", "best_dice_oracle",
            "scan_auroc", "scan_ap", "n_cases", "n_anomalous_cases"]
    lines = []
    for key in keys:
        if key in result:
            value = result[key]
            text = f"{value:.4f}" if isinstance(value, float) else str(value)
            lines.append(f"{key:32s} {text}")
    return "\n".join(lines)
