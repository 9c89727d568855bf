"""Raw scans against the same scans in template space, with a model that registers.

Scores the raw test scans of a raw example data set (skull, head pose, native grids, bias,
int16, DICOM series) with a model whose preprocessing registers and skull-strips (the demo's
cpu-small model), evaluates the maps in each scan's own space against the lesion masks on the
raw grids, and scores the same subjects as they lie in template space (``registered/``) with the
same model and settings. Also: the z-score baseline after registration, the brain-mask Dice of
the registration against the known brain mask, the landmark error in mm, and the time that
preprocessing adds to scoring.

    OMP_NUM_THREADS=2 python benchmarks/raw_scans.py --write-docs   # builds data and model
    OMP_NUM_THREADS=2 python benchmarks/raw_scans.py --data demo/data --model demo/model

Without ``--data``, a raw example data set of ``--subjects`` subjects (seed ``--seed``) is made
under the work folder; without ``--model``, the ``cpu-small`` preset is trained on it as the
demo trains it (``--train-set`` overrides its config).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import command_line, machine, write_section  # noqa: E402
from medidiff.api import AnomalyDetector, evaluate_folder  # noqa: E402
from medidiff.io.read import load_image  # noqa: E402
from medidiff.preprocess.pipeline import Preprocessor  # noqa: E402
from medidiff.preprocess.quality import dice  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "raw-scans.json"
_LPS = np.diag([-1.0, -1.0, 1.0])


def score(model: Path, method: str, inputs: list[Path], out: Path, labels: Path) -> dict:
    """Score ``inputs`` into ``out`` and evaluate against ``labels``; seconds per scan."""
    detector = AnomalyDetector.load(model, method=method)
    if detector.entry is None:
        detector.entry = detector.closest_calibration()
    started = time.perf_counter()
    outcomes = detector.predict_files(inputs, out, overwrite=True)
    seconds = (time.perf_counter() - started) / len(inputs)
    failed = [o.message for o in outcomes if o.status != "done"]
    if failed:
        raise SystemExit(f"scoring failed: {failed}")
    return {**evaluate_folder(out, labels), "seconds_per_scan": seconds}


def registration(entries: list[dict], data: Path, model_cfg) -> dict:
    """Brain-mask Dice (the template mask as it is, and eroded for scoring) and landmark error
    of the model's preprocessing on each raw scan, and its time per scan (uncached)."""
    plain = Preprocessor(model_cfg.preprocess.model_copy(update={"mask_erosion_mm": 0.0}))
    eroded = Preprocessor(model_cfg.preprocess)
    rows = []
    for entry in entries:
        array, affine = load_image(data / entry["image"])
        started = time.perf_counter()
        result = eroded.run(array[0], affine)
        seconds = time.perf_counter() - started
        whole = plain.run(array[0], affine)
        truth = np.asarray(nib.load(data / entry["brain"]).dataobj) > 0
        back = whole.to_native(whole.brain.astype(np.float32), nearest=True) > 0
        used = result.to_native(result.brain.astype(np.float32), nearest=True) > 0
        errors = []
        for mark in entry["landmarks"].values():
            moved = result.transform.TransformPoint(tuple(_LPS @ np.asarray(mark["template_mm"])))
            errors.append(float(np.linalg.norm(_LPS @ np.asarray(moved) - mark["native_mm"])))
        rows.append({"case": Path(entry["image"]).name, "format": entry["format"],
                     "acquisition": entry["acquisition"], "orientation": entry["orientation"],
                     "brain_dice": dice(back, truth), "brain_dice_eroded": dice(used, truth),
                     "landmark_mm": float(np.mean(errors)), "seconds": seconds, **result.qc})
    return {"cases": rows, **{f"mean_{k}": float(np.mean([r[k] for r in rows]))
                              for k in ("brain_dice", "brain_dice_eroded", "landmark_mm",
                                        "seconds", "correlation", "head_dice")}}


def template_copies(entries: list[dict], data: Path, work: Path) -> tuple[list[Path], Path]:
    """The test subjects as they lie in template space, and their masks, named by case."""
    images, masks = work / "template-images", work / "template-masks"
    for folder in (images, masks):
        folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for entry in entries:
        case = Path(entry["image"]).name.removesuffix(".nii.gz")
        shutil.copyfile(data / entry["registered"]["image"], images / f"{case}.nii.gz")
        shutil.copyfile(data / entry["registered"]["mask"], masks / f"{case}.nii.gz")
        paths.append(images / f"{case}.nii.gz")
    return paths, masks


def markdown(result: dict) -> str:
    rows = ["| scans | method | pooled AP | voxel AUROC | Dice@cal | scan AUROC | s/scan |",
            "|---|---|---|---|---|---|---|"]
    for space in ("native", "template"):
        for method, m in result[space].items():
            rows.append(f"| {space} | {method} | {m['pooled_ap']:.3f} | {m['pooled_auroc']:.3f} | "
                        f"{m['dice_at_calibrated_threshold']:.3f} | {m['scan_auroc']:.3f} | "
                        f"{m['seconds_per_scan']:.1f} |")
    reg = result["registration"]
    ratio = result["native"]["diffusion"]["pooled_ap"] / result["template"]["diffusion"]["pooled_ap"]
    lines = [
        f"Machine: {result['machine']}. Model: `{result['model']}`, data: `{result['data']}` "
        f"({len(reg['cases'])} raw test scans).", "",
        f"Command: `{result['command']}`.", "", *rows, "",
        f"- Native-space AP over template-space AP (diffusion): **{ratio:.2f}** (target >= 0.9).",
        f"- Brain mask against the known one: Dice {reg['mean_brain_dice']:.3f} (the template "
        f"mask as registered), {reg['mean_brain_dice_eroded']:.3f} (eroded by "
        f"{result['mask_erosion_mm']:g} mm, as scored); landmark error "
        f"{reg['mean_landmark_mm']:.1f} mm; correlation with the template "
        f"{reg['mean_correlation']:.3f}, head overlap {reg['mean_head_dice']:.3f}.",
        f"- Preprocessing (N4 + affine registration + resampling, uncached): "
        f"{reg['mean_seconds']:.1f} s per scan, against {result['score_seconds']:.1f} s of "
        f"default scoring of the registered scan: +{100 * reg['mean_seconds'] / result['score_seconds']:.0f}% "
        "(target <= 50%).",
    ]
    return "\n".join(lines)


def shown(path: Path, work: Path) -> str:
    """A path as the results show it: relative to --work when the script made it there."""
    return f"WORK/{path.relative_to(work)}" if path.is_relative_to(work) else str(path)


def ensure_data_and_model(args) -> None:
    """The raw data set and the model the benchmark runs on, made when not given."""
    if args.data is None:
        args.data = args.work / f"data-{args.subjects}-seed{args.seed}"
        if not (args.data / "dataset.json").is_file():
            subprocess.run([sys.executable, "-m", "medidiff", "data", "example", str(args.data),
                            "--raw", "--subjects", str(args.subjects), "--seed", str(args.seed)],
                           check=True)
    if args.model is None:
        args.model = args.work / f"model-{args.data.name}"
        if not (args.model / "model.yaml").is_file():
            subprocess.run([sys.executable, "-m", "medidiff", "train",
                            str(REPO / "configs" / "anomaly" / "cpu-small.yaml"),
                            "--data", str(args.data), "--out", str(args.model), "--no-tracking",
                            *[a for item in args.train_set for a in ("--set", item)],
                            *(["--resume"] if args.model.exists() else [])], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="a raw example data set (default: made)")
    parser.add_argument("--model", type=Path, help="a model that registers (default: trained)")
    parser.add_argument("--subjects", type=int, default=40, help="subjects of a made data set")
    parser.add_argument("--seed", type=int, default=0, help="seed of a made data set")
    parser.add_argument("--train-set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides for a trained model")
    parser.add_argument("--work", type=Path, default=REPO / "benchmarks" / "work" / "raw")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    ensure_data_and_model(args)
    listing = json.loads((args.data / "dataset.json").read_text())
    if not listing.get("raw"):
        raise SystemExit(f"{args.data} is not a raw example data set (medidiff data example --raw)")
    tests = listing["test"]
    raw = [args.data / e["image"] for e in tests]
    copies, copy_masks = template_copies(tests, args.data, args.work)
    result = {"machine": machine(), "model": shown(args.model, args.work),
              "data": shown(args.data, args.work),
              "command": command_line("raw_scans.py")}
    for space, inputs, labels in (("native", raw, args.data / "test" / "masks"),
                                  ("template", copies, copy_masks)):
        result[space] = {m: score(args.model, m, inputs, args.work / space / m, labels)
                         for m in ("diffusion", "zscore", "threshold")}
    detector = AnomalyDetector.load(args.model)
    result["mask_erosion_mm"] = detector.cfg.preprocess.mask_erosion_mm
    result["registration"] = registration(tests, args.data, detector.cfg)
    # scoring a preprocessed scan (the cache is warm after the runs above): network and the rest
    started = time.perf_counter()
    for path in raw:
        detector.predict_file(path)
    result["score_seconds"] = (time.perf_counter() - started) / len(raw)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    print(text)
    if args.write_docs:
        write_section("raw-scans", text, "Raw scans: registration, skull stripping, native space")


if __name__ == "__main__":
    main()
