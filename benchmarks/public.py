"""The field's anomaly benchmark on public data: train on IXI, calibrate on held-out IXI, test
on BraTS (Baur et al. 2021; Behrendt et al. 2023; Bercea et al. 2024).

For users who have the data (neither data set ships with medidiff; see
``../shared/references/datasets.md`` for where to get them):

    OMP_NUM_THREADS=2 python benchmarks/public.py --train ~/data/IXI --test ~/data/BraTS2021 \\
        --contrast t2 [--preset configs/anomaly/cpu-small.yaml] [--train-set KEY=VALUE ...]

1. ``medidiff data import ixi`` (or ``bids``/``nnunet`` with ``--train-format``: IXI has no
   FLAIR) and ``medidiff data import brats`` write the two data sets' ``dataset.json`` files
   (linking the source files) under ``--work``;
2. a share of the IXI training subjects (``--healthy-test``, seeded) is set aside as healthy
   test scans, so the per-scan AUROC has negatives the model never saw;
3. ``medidiff train PRESET --data IXI --set data.contrasts=[CONTRAST]`` trains and calibrates on
   IXI's held-out validation subjects, as the README's commands do;
4. the BraTS scans of that contrast (heads already skull-stripped and in SRI-24 space: detected
   as brains and registered to the template's brain) and the healthy IXI test scans are scored
   with the diffusion method, the registered z-score and intensity thresholding, and evaluated
   on each scan's own grid against the BraTS ``seg`` (every tumour label) and empty masks.

Prints, and writes to ``--work/public.json``: pooled AP, Dice at the calibrated threshold, best
(oracle) Dice, per-scan AUROC and seconds per scan of each method, and the model's training
time. Nothing is tuned on BraTS.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import command_line, machine, score_folder  # noqa: E402

METHODS = ("diffusion", "zscore", "threshold")


def medidiff(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "medidiff", *args], check=True)


def imported(kind: str, src: Path, out: Path) -> dict:
    if not (out / "dataset.json").is_file():
        medidiff("data", "import", kind, str(src), str(out))
    return json.loads((out / "dataset.json").read_text())


def hold_out_healthy(ixi: Path, share: float, seed: int) -> list[dict]:
    """Move a seeded share of IXI's training entries out of training (once); returns them."""
    listing = json.loads((ixi / "dataset.json").read_text())
    if "healthy_test" not in listing:
        training = list(listing["training"])
        random.Random(seed).shuffle(training)
        count = max(1, int(round(share * len(training))))
        listing["healthy_test"] = training[:count]
        listing["training"] = [e for e in listing["training"] if e not in training[:count]]
        listing["numTraining"] = len(listing["training"])
        (ixi / "dataset.json").write_text(json.dumps(listing, indent=2) + "\n")
    return listing["healthy_test"]


def file_of(root: Path, entry: dict, contrasts: list[str], contrast: str) -> Path:
    image = entry["image"]
    files = image if isinstance(image, list) else [image]
    return (root / files[contrasts.index(contrast)]).resolve()


def test_folder(work: Path, ixi: Path, brats: Path, healthy: list[dict], contrast: str):
    """Links to the scans to score (``CASE.nii.gz``) and their masks (``CASE.nii.gz``: the BraTS
    seg, or zeros on a healthy scan's grid)."""
    inputs, masks = work / f"inputs-{contrast}", work / f"masks-{contrast}"
    inputs.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    b_list = json.loads((brats / "dataset.json").read_text())
    i_list = json.loads((ixi / "dataset.json").read_text())
    for entry in b_list["test"]:
        source = file_of(brats, entry, b_list["contrasts"], contrast)
        case = source.name.split(".nii")[0]
        _link(inputs / f"{case}.nii.gz", source)
        _link(masks / f"{case}.nii.gz", (brats / entry["mask"]).resolve())
    for entry in healthy:
        source = file_of(ixi, entry, i_list["contrasts"], contrast)
        case = source.name.split(".nii")[0]
        _link(inputs / f"{case}.nii.gz", source)
        empty = masks / f"{case}.nii.gz"
        if not empty.exists():
            image = nib.load(source)
            nib.save(nib.Nifti1Image(np.zeros(image.shape[:3], np.uint8), image.affine), empty)
    return inputs, masks


def _link(link: Path, source: Path) -> None:
    if not link.is_symlink():
        link.symlink_to(source)


def score(model: Path, method: str, inputs: Path, out: Path, masks: Path) -> dict:
    """As ``score_folder``; a case that fails (a BraTS scan QC refuses) is reported and
    counted, and the others are evaluated."""
    result = score_folder(model, method, inputs, out, masks)
    for message in result["failed"]:
        print(f"{method}: {message}", file=sys.stderr)
    return {**result, "failed": len(result["failed"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=Path, required=True, help="the IXI folder (T1, T2, PD)")
    parser.add_argument("--train-format", default="ixi", choices=("ixi", "bids", "nnunet"),
                        help="the healthy training set's layout (IXI has no FLAIR: a FLAIR "
                             "model trains on a BIDS or nnU-Net set of healthy heads)")
    parser.add_argument("--test", type=Path, required=True, help="a BraTS 2021 or 2023 folder")
    parser.add_argument("--contrast", choices=("t2", "flair"), default="t2")
    parser.add_argument("--preset", type=Path,
                        default=REPO / "configs" / "anomaly" / "cpu-small.yaml")
    parser.add_argument("--train-set", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--healthy-test", type=float, default=0.1,
                        help="share of IXI subjects set aside as healthy test scans")
    parser.add_argument("--work", type=Path, default=REPO / "benchmarks" / "work" / "public")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    ixi, brats = args.work / "ixi", args.work / "brats"
    i_list = imported(args.train_format, args.train, ixi)
    imported("brats", args.test, brats)
    if args.contrast not in i_list["contrasts"]:
        raise SystemExit(f"{args.train}: its import holds {', '.join(i_list['contrasts'])}, "
                         f"no {args.contrast} (IXI has no FLAIR: give a BIDS or nnU-Net set of "
                         "healthy heads with --train-format)")
    healthy = hold_out_healthy(ixi, args.healthy_test, seed=0)
    model = args.work / f"model-{args.contrast}"
    started = time.perf_counter()
    if not (model / "model.yaml").is_file():
        medidiff("train", str(args.preset), "--data", str(ixi), "--out", str(model),
                 "--no-tracking", "--set", f"data.contrasts=[{args.contrast}]",
                 *[a for item in args.train_set for a in ("--set", item)])
    train_minutes = (time.perf_counter() - started) / 60
    inputs, masks = test_folder(args.work, ixi, brats, healthy, args.contrast)
    result = {"machine": machine(), "contrast": args.contrast, "model": str(model),
              "train_minutes_this_run": train_minutes,
              "command": command_line("public.py"),
              "methods": {m: score(model, m, inputs, args.work / "scores" / args.contrast / m,
                                   masks) for m in METHODS}}
    (args.work / "public.json").write_text(json.dumps(result, indent=2) + "\n")
    print("| method | pooled AP | Dice@cal | best Dice | scan AUROC | s/scan | failed |")
    print("|---|---|---|---|---|---|---|")
    for method, m in result["methods"].items():
        print(f"| {method} | {m['pooled_ap']:.3f} | {m['dice_at_calibrated_threshold']:.3f} | "
              f"{m['best_dice_oracle']:.3f} | {m['scan_auroc']:.3f} | "
              f"{m['seconds_per_scan']:.1f} | {m['failed']} |")


if __name__ == "__main__":
    main()
