"""FLAIR alone, T2 alone and three contrasts together, against thresholding and the z-score.

Trains the ``cpu-small`` preset on a raw example data set in T1, T2 and FLAIR (``medidiff data
example --raw --contrasts t1,t2,flair``) once per contrast setting (``data.contrasts``), as the
README's commands do (train, then calibrate on the healthy validation scans), and scores the raw
test scans of a hold-out set of other subjects (another seed) with the diffusion method, the
registered voxel-wise z-score and intensity thresholding (on the brightest contrast: FLAIR), each
evaluated in the scans' own space against the lesion masks. Single-contrast models are given one
file per case; the three-contrast model the hold-out's files in nnU-Net channel naming
(``CASE_0000``, ``CASE_0001``, ``CASE_0002``) in one folder.

    OMP_NUM_THREADS=2 python benchmarks/contrasts.py --write-docs

``--data``/``--holdout`` default to sets made under ``--work`` (24 subjects, seed 0; 40
subjects, seed 5). Training runs to its step count: ``train.max_minutes`` is raised so that a
busy machine does not cap it (the time each model took is reported).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import command_line, machine, score_folder, write_section  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "contrasts.json"
SETTINGS = {"flair": ["flair"], "t2": ["t2"], "t1-t2-flair": ["t1", "t2", "flair"]}
METHODS = ("diffusion", "zscore", "threshold")


def make_data(path: Path, subjects: int, seed: int) -> None:
    if not (path / "dataset.json").is_file():
        subprocess.run([sys.executable, "-m", "medidiff", "data", "example", str(path), "--raw",
                        "--contrasts", "t1,t2,flair", "--subjects", str(subjects),
                        "--seed", str(seed)], check=True)


def train(data: Path, model: Path, contrasts: list[str], extra: list[str]) -> float:
    """Train and calibrate the preset on ``contrasts`` (skipped when done); wall seconds."""
    if (model / "model.yaml").is_file():
        return float(json.loads((model / "benchmark.json").read_text())["train_seconds"])
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "medidiff", "train",
                    str(REPO / "configs" / "anomaly" / "cpu-small.yaml"), "--data", str(data),
                    "--out", str(model), "--no-tracking",
                    "--set", f"data.contrasts=[{','.join(contrasts)}]",
                    "--set", "train.max_minutes=60",
                    *[a for item in extra for a in ("--set", item)]], check=True)
    seconds = time.perf_counter() - started
    (model / "benchmark.json").write_text(json.dumps({"train_seconds": seconds}) + "\n")
    return seconds


def inputs(holdout: Path, contrasts: list[str], work: Path) -> Path:
    """A folder of links to the hold-out's test scans: as they are named (``CASE_FLAIR``: its
    lesion mask on its grid is ``test/masks/CASE_FLAIR.nii.gz``) for one contrast, ``CASE_000k``
    (nnU-Net channel naming, in the model's order) for several."""
    listing = json.loads((holdout / "dataset.json").read_text())
    order = listing["contrasts"]
    folder = work / f"inputs-{'-'.join(contrasts)}"
    folder.mkdir(parents=True, exist_ok=True)
    for entry in listing["test"]:
        case = Path(entry["mask"]).name.removesuffix(".nii.gz")
        for k, contrast in enumerate(contrasts):
            source = holdout / entry["image"][order.index(contrast)]
            suffix = ".nii.gz" if source.name.endswith(".nii.gz") else ""
            name = source.name if len(contrasts) == 1 else f"{case}_{k:04d}{suffix}"
            link = folder / name
            if not link.is_symlink():
                link.symlink_to(source.resolve())
    return folder


def score(model: Path, method: str, folder: Path, out: Path, masks: Path) -> dict:
    result = score_folder(model, method, folder, out, masks)
    failed = result.pop("failed")
    if failed:
        raise SystemExit(f"scoring failed: {failed}")
    return result


def markdown(result: dict) -> str:
    rows = ["| model | contrasts | method | pooled AP | Dice@cal | best Dice | scan AUROC | "
            "s/scan |", "|---|---|---|---|---|---|---|---|"]
    for name, setting in result["settings"].items():
        for method, m in setting["methods"].items():
            rows.append(f"| {name} | {', '.join(setting['contrasts'])} | {method} | "
                        f"{m['pooled_ap']:.3f} | {m['dice_at_calibrated_threshold']:.3f} | "
                        f"{m['best_dice_oracle']:.3f} | {m['scan_auroc']:.3f} | "
                        f"{m['seconds_per_scan']:.1f} |")
    lines = [f"Machine: {result['machine']}. Training data: `{result['data']}`; scored: the "
             f"{result['n_cases']} raw test scans of `{result['holdout']}` (other subjects, "
             "another seed).", "", f"Command: `{result['command']}`.", "", *rows, ""]
    for name, setting in result["settings"].items():
        m = setting["methods"]
        better = max(m["zscore"]["pooled_ap"], m["threshold"]["pooled_ap"])
        lines.append(f"- {name}: diffusion AP / better baseline AP = "
                     f"{m['diffusion']['pooled_ap'] / better:.2f}; training "
                     f"{setting['train_minutes']:.1f} min wall ({setting['steps']} steps).")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="raw example in t1,t2,flair (default: made)")
    parser.add_argument("--holdout", type=Path, help="hold-out raw set (default: made)")
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--train-set", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--work", type=Path, default=REPO / "benchmarks" / "work" / "contrasts")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    args.data = args.data or args.work / "data"
    args.holdout = args.holdout or args.work / "holdout"
    make_data(args.data, 24, 0)
    make_data(args.holdout, 40, 5)
    masks = args.holdout / "test" / "masks"
    result = {"machine": machine(), "data": str(args.data), "holdout": str(args.holdout),
              "command": command_line("contrasts.py"),
              "settings": {}}
    for name in args.settings:
        contrasts = SETTINGS[name]
        model = args.work / f"model-{name}"
        seconds = train(args.data, model, contrasts, args.train_set)
        folder = inputs(args.holdout, contrasts, args.work)
        methods = {m: score(model, m, folder, args.work / "scores" / name / m, masks)
                   for m in METHODS}
        info = yaml.safe_load((model / "model.yaml").read_text()).get("info", {})
        result["settings"][name] = {"contrasts": contrasts, "train_minutes": seconds / 60,
                                    "steps": info.get("steps"), "methods": methods}
        result["n_cases"] = methods["diffusion"]["n_cases"]
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    print(text)
    if args.write_docs:
        write_section("contrasts", text, "T2, FLAIR and several contrasts (issue 19)")


if __name__ == "__main__":
    main()
