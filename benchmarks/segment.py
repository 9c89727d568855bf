"""Segmentation benchmark: the diffusion ensemble against one sample, a U-Net and multi-Otsu.

On the example data's held-out test subjects (their tissue ``label`` entries: 1 CSF, 2 GM,
3 WM), in each scan's own space: Dice per class and mean, HD95 (mm), for
- the diffusion ensemble (N samples, mean of the soft maps then argmax; also majority vote),
- a single diffusion sample (each of the N on its own, metrics averaged),
- a supervised nnU-Net-style U-Net (``medidiff.tasks.segment.baselines``) on the same slices,
  crops, foreground slices and mapping back: trained until its loss converges (``unet``) and
  its weights at the diffusion model's training CPU time (``unet-equal-budget``), with its
  loss curve and its Dice by training time,
- 3-class multi-Otsu thresholds (scikit-image) inside the brain (the scan's non-zero voxels),
plus, for the ensemble and the UNet, the AUROC of the uncertainty map for each one's own
misclassified brain voxels.

    OMP_NUM_THREADS=1 python benchmarks/segment.py   # data and models are built if missing
    OMP_NUM_THREADS=1 python benchmarks/segment.py --max-test 4 --write-docs

Results go to benchmarks/results/segment.json and, with --write-docs, into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import machine, write_section  # noqa: E402
from medidiff.api import Segmenter  # noqa: E402
from medidiff.config import Config  # noqa: E402
from medidiff.data.datasets import fingerprint, read_split, training_dataset  # noqa: E402
from medidiff.io.read import load_image  # noqa: E402
from medidiff.metrics import dice_per_class  # noqa: E402
from medidiff.tasks.segment.baselines import (  # noqa: E402
    DEEP_SUPERVISION,
    FILTERS,
    UNetSegmenter,
    build_unet,
    otsu_labels,
    train_unet,
)
from medidiff.tasks.segment.evaluation import (  # noqa: E402
    evaluate_labels,
    load_reference,
    voxel_spacing,
)
from medidiff.tasks.segment.task import fuse  # noqa: E402

WINDOW_SECONDS = 60.0  # CPU seconds over which the UNet's loss is averaged to judge convergence
METHODS = ("ensemble", "ensemble-vote", "single", "unet", "unet-equal-budget", "otsu")


def ensure_data_and_model(data: Path, model: Path, preset: str) -> float | None:
    """Build what is missing; the diffusion model's training CPU seconds when trained here."""
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    if not (data / "dataset.json").is_file():
        subprocess.run([sys.executable, "-m", "medidiff", "data", "example", str(data)],
                       check=True, env=env)
    if (model / "model.yaml").is_file():
        return None
    started = _child_cpu()
    subprocess.run([sys.executable, "-m", "medidiff", "train",
                    str(REPO / "configs" / "segment" / f"{preset}.yaml"), "--data", str(data),
                    "--out", str(model), "--no-tracking"], check=True, env=env)
    return _child_cpu() - started


def _child_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def ensure_unet(cfg: Config, data: Path, folder: Path, budget_cpu: float, max_cpu: float,
                every: float) -> tuple[list[dict], dict]:
    """The supervised baseline's weight snapshots (by CPU time) and its training record; trained
    here (and kept in ``folder``) unless a record for the same budget and limits is there."""
    record, weights = folder / "unet_training.json", folder / "unet_snapshots.pt"
    plan = {"budget_cpu_seconds": budget_cpu, "max_cpu_seconds": max_cpu, "every": every,
            "window": WINDOW_SECONDS,
            "data": fingerprint(read_split(data, "training")), "lr": cfg.train.lr}
    if record.is_file() and weights.is_file():
        info = json.loads(record.read_text())
        if info["plan"] == plan:
            states = torch.load(weights, weights_only=True)
            return [{**s, "state": st} for s, st in zip(info["snapshots"], states, strict=True)], info
    dataset = training_dataset(cfg.data, read_split(data, "training"), keys=("image", "label"))
    wall = time.monotonic()
    marks = sorted({budget_cpu, *np.arange(every, max_cpu, every).tolist()})
    _, log = train_unet(cfg, dataset, max_cpu_seconds=max_cpu, snapshot_at=marks,
                        window_seconds=WINDOW_SECONDS)
    info = {"plan": plan, **log.describe(), "wall_seconds": time.monotonic() - wall}
    folder.mkdir(parents=True, exist_ok=True)
    torch.save([s["state"] for s in log.snapshots], weights)
    record.write_text(json.dumps(info, indent=2) + "\n")
    return log.snapshots, info


def unet_segmenters(segmenter: Segmenter, snapshots: list[dict], budget_cpu: float) -> dict:
    """``unet`` (the last snapshot: converged, or at the time limit), ``unet-equal-budget``
    (at the diffusion model's CPU time) and, by CPU seconds, every snapshot for the curve."""
    def at(snapshot: dict) -> UNetSegmenter:
        net = build_unet(segmenter.cfg)
        net.load_state_dict(snapshot["state"])
        return UNetSegmenter(net, segmenter)

    return {"unet": at(snapshots[-1]), "unet-equal-budget": at(nearest(snapshots, budget_cpu)),
            "curve": {round(s["cpu_seconds"]): at(s) for s in snapshots}}


def diffusion_metrics(segmenter: Segmenter, entry: dict, cache: Path | None) -> dict:
    """The diffusion rows of one test scan (ensemble, vote, single samples, Dice by ensemble
    size, seconds), reused from ``cache`` only when stored for the same scan and label bytes,
    model weights and sampling settings."""
    key = {"image": _sha256(entry["image"]), "label": _sha256(entry["label"]),
           "weights": segmenter.model.weights_sha256,
           "settings": {k: v for k, v in segmenter.describe().items() if k != "model"}}
    stored = cache / f"{Path(entry['image']).name}.json" if cache else None
    if stored is not None and stored.is_file():
        record = json.loads(stored.read_text())
        if record["key"] == key:
            return record["metrics"]
    k = segmenter.num_classes
    raw, affine = load_image(entry["image"])
    reference, spacing = load_reference(entry["label"], raw.shape[1:]), voxel_spacing(affine)
    started = time.perf_counter()
    result = segmenter.predict_file(entry["image"])
    seconds = time.perf_counter() - started
    prep = segmenter.prepare_file(Path(entry["image"]))

    def labels_of(probs: torch.Tensor) -> np.ndarray:
        return segmenter.to_input_space(prep, probs)[0]

    out = {"ensemble": evaluate_labels(result.labels, reference, k, spacing, result.uncertainty),
           "ensemble-vote": evaluate_labels(labels_of(fuse(result.grid.samples, "vote")),
                                            reference, k, spacing)}
    singles = [evaluate_labels(labels_of(sample), reference, k, spacing)
               for sample in result.grid.samples]
    out["single"] = {key: float(np.nanmean([s[key] for s in singles])) for key in singles[0]}
    out["ensemble-size"] = {str(n): mean_dice(labels_of(fuse(result.grid.samples[:n])),
                                              reference, k) for n in range(1, len(singles) + 1)}
    out["seconds"] = seconds
    if stored is not None:
        stored.parent.mkdir(parents=True, exist_ok=True)
        stored.write_text(json.dumps({"key": key, "metrics": out}, default=float) + "\n")
    return out


def _sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def mean_dice(labels: np.ndarray, reference: np.ndarray, k: int) -> float:
    return float(np.mean(list(dice_per_class(labels, reference, range(1, k)).values())))


def evaluate_case(segmenter: Segmenter, unets: dict, entry: dict,
                  cache: Path | None) -> tuple[dict, dict]:
    """Metrics of every method on one test scan, and the seconds each method took."""
    k = segmenter.num_classes
    raw, affine = load_image(entry["image"])
    reference, spacing = load_reference(entry["label"], raw.shape[1:]), voxel_spacing(affine)
    out = diffusion_metrics(segmenter, entry, cache)
    seconds = {"diffusion": out.pop("seconds")}
    prep = segmenter.prepare_file(Path(entry["image"]))
    for name in ("unet", "unet-equal-budget"):
        started = time.perf_counter()
        unet = unets[name].predict(prep)
        seconds[name] = time.perf_counter() - started
        out[name] = evaluate_labels(unet.labels, reference, k, spacing, unet.uncertainty)
    out["unet-curve"] = {str(t): mean_dice(u.predict(prep).labels, reference, k)
                         for t, u in unets["curve"].items()}
    out["otsu"] = evaluate_labels(otsu_labels(raw[0]), reference, k, spacing)
    return out, seconds


def summarise(cases: list[dict], methods=METHODS) -> dict:
    """Mean of each metric over the test scans, per method."""
    return {m: {key: float(np.nanmean([c[m][key] for c in cases])) for key in cases[0][m]}
            for m in methods}


def markdown(summary: dict, header: str, names: dict[int, str]) -> str:
    classes = sorted(names)
    lines = [header, "",
             "| method | " + " | ".join(f"Dice {names[c]}" for c in classes)
             + " | mean Dice | mean HD95 (mm) | uncertainty AUROC |",
             "|---|" + "---|" * (len(classes) + 3)]
    for method, row in summary.items():
        dice = " | ".join(f"{row[f'dice_{c}']:.3f}" for c in classes)
        auroc = f"{row['uncertainty_auroc']:.3f}" if "uncertainty_auroc" in row else "-"
        lines.append(f"| {method} | {dice} | **{row['dice_mean']:.3f}** | "
                     f"{row['hd95_mean']:.2f} | {auroc} |")
    return "\n".join(lines)


def training_budget(data: Path, model: Path, preset: str, cpu_seconds: float | None) -> dict:
    """Train the diffusion model if missing; its training time is the UNet's budget."""
    record = model / "benchmark_training.json"
    wall = time.monotonic()
    cpu = ensure_data_and_model(data, model, preset)
    if cpu is not None:
        record.write_text(json.dumps({"cpu_seconds": cpu,
                                      "wall_seconds": time.monotonic() - wall}) + "\n")
    if cpu_seconds is not None:
        return {"cpu_seconds": cpu_seconds, "given": True}
    if not record.is_file():
        raise SystemExit(f"{record} is missing: pass --unet-cpu-seconds or retrain the model")
    return json.loads(record.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO / "benchmarks" / "work" / "data")
    parser.add_argument("--model", type=Path, default=REPO / "benchmarks" / "work" / "segment")
    parser.add_argument("--unet", type=Path, default=REPO / "benchmarks" / "work" / "segment-unet",
                        help="where the UNet baseline's snapshots are kept (reused when trained "
                             "for the same budget, limits and data)")
    parser.add_argument("--preset", default="cpu-small")
    parser.add_argument("--samples", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--max-test", type=int, default=None,
                        help="score only the first N test scans (every method on the same ones)")
    parser.add_argument("--unet-cpu-seconds", type=float, default=None,
                        help="the equal budget (default: the diffusion model's training CPU time)")
    parser.add_argument("--unet-max-cpu-minutes", type=float, default=30.0,
                        help="the UNet trains until its loss converges or for this long")
    parser.add_argument("--unet-snapshot-minutes", type=float, default=2.5,
                        help="CPU minutes between the UNet snapshots scored for Dice by time")
    parser.add_argument("--diffusion-cache", type=Path,
                        default=REPO / "benchmarks" / "work" / "segment-diffusion",
                        help="per-scan diffusion results, reused only for the same scan, label, "
                             "weights and settings")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per process (1: on a shared machine, OpenMP threads "
                             "that wait for each other burn CPU time)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "segment.json")
    parser.add_argument("--write-docs", action="store_true")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite the table from the results file (--out) without running")
    args = parser.parse_args()
    if args.report_only:
        result = json.loads(args.out.read_text())
        text = report(result)
        print(text)
        if args.write_docs:
            write_section("segment", text)
        return

    torch.set_num_threads(args.threads)
    started = time.monotonic()
    budget = training_budget(args.data, args.model, args.preset, args.unet_cpu_seconds)
    segmenter = Segmenter.load(args.model, device="cpu", samples=args.samples, steps=args.steps)
    snapshots, unet_info = ensure_unet(segmenter.cfg, args.data, args.unet,
                                       budget["cpu_seconds"], args.unet_max_cpu_minutes * 60,
                                       args.unet_snapshot_minutes * 60)
    print(f"UNet: stopped ({unet_info['stopped']}) after {snapshots[-1]['steps']} steps, "
          f"{snapshots[-1]['cpu_seconds'] / 60:.1f} CPU-min", flush=True)
    unets = unet_segmenters(segmenter, snapshots, budget["cpu_seconds"])
    cases, seconds = [], []
    for entry in read_split(args.data, "test")[:args.max_test]:
        metrics, took = evaluate_case(segmenter, unets, entry, args.diffusion_cache)
        cases.append(metrics)
        seconds.append(took)
        print(Path(entry["image"]).name, {m: round(metrics[m]["dice_mean"], 3) for m in METHODS},
              took, flush=True)
    result = {"summary": summarise(cases), "ensemble_size_dice": mean_of(cases, "ensemble-size"),
              "unet_dice_by_cpu_seconds": mean_of(cases, "unet-curve"), "cases": cases,
              "scans": [Path(e["image"]).name for e in read_split(args.data, "test")][:len(cases)],
              "settings": segmenter.describe(), "model_info": segmenter.model.info,
              "diffusion_training": budget, "unet_training": unet_info,
              "unet_equal_budget_snapshot": {k: v for k, v in nearest(snapshots, budget["cpu_seconds"])
                                             .items() if k != "state"},
              "seconds_per_scan": {k: float(np.mean([s[k] for s in seconds])) for k in seconds[0]},
              "machine": machine(), "preset": args.preset, "max_test": args.max_test,
              "total_seconds": time.monotonic() - started}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=float) + "\n")
    text = report(result)
    print(text)
    if args.write_docs:
        write_section("segment", text)


def mean_of(cases: list[dict], key: str) -> dict:
    """Mean over the scans of a per-scan mapping (ensemble size or CPU time -> mean Dice)."""
    return {n: float(np.mean([c[key][n] for c in cases])) for n in cases[0][key]}


def nearest(snapshots: list[dict], cpu_seconds: float) -> dict:
    """The snapshot taken nearest to a CPU time (the first after it, when it was reached)."""
    return min(snapshots, key=lambda s: abs(s["cpu_seconds"] - cpu_seconds))


def report(result: dict) -> str:
    info, unet, equal = result["model_info"], result["unet_training"], result[
        "unet_equal_budget_snapshot"]
    train, s, per_scan = result["diffusion_training"], result["settings"], result["seconds_per_scan"]
    final, n_cases = unet["snapshots"][-1], len(result["cases"])
    stopped = ("trained until its loss converged" if unet["stopped"] == "converged" else
               "trained for its time limit, its loss not yet converged")
    limit = f" --max-test {result['max_test']}" if result.get("max_test") else ""
    limit += (f" --unet-max-cpu-minutes {unet['plan']['max_cpu_seconds'] / 60:g}"
              f" --unet-snapshot-minutes {unet['plan']['every'] / 60:g}")
    scans = (f"The first {n_cases} held-out test scans ({', '.join(result['scans'])}; every "
             "method on the same scans)" if result.get("max_test") else
             f"{n_cases} held-out test scans")
    header = (
        f"Command: `OMP_NUM_THREADS=1 python benchmarks/segment.py --preset {result['preset']}"
        f"{limit} --write-docs`. Machine: {result['machine']} (shared with other jobs). "
        f"{scans} of the example data, scored in their own 2 mm space. Diffusion: `{result['preset']}` "
        f"({info.get('steps')} steps, {info.get('parameters')} parameters, "
        f"{train['cpu_seconds'] / 60:.1f} CPU-min); {s['samples']} samples, {s['sampler']} "
        f"{s['steps']} steps ({s['nfe_per_slice']} network calls per slice), "
        f"{per_scan['diffusion']:.0f} s/scan (wall, on the shared machine). UNet: nnU-Net-style MONAI `DynUNet` "
        f"({'-'.join(map(str, FILTERS))}, instance norm, Dice+CE with {DEEP_SUPERVISION} "
        f"deep-supervision heads), on the diffusion model's training slices and random crops; "
        f"run as the diffusion model is (its foreground slices, windows and mapping back), "
        f"{per_scan['unet']:.1f} s/scan; its uncertainty is its softmax's normalised entropy. "
        f"`unet`: {stopped} ({final['steps']} steps, {final['cpu_seconds'] / 60:.1f} CPU-min, "
        f"{unet['wall_seconds'] / 60:.1f} min wall; AdamW, learning rate down tenfold at the "
        f"first window of {unet['plan']['window'] / 60:.0f} CPU-min without a 1% "
        f"better loss, stop at the second); "
        f"`unet-equal-budget`: the same run's weights after {equal['steps']} steps, "
        f"{equal['cpu_seconds'] / 60:.1f} CPU-min, the diffusion model's training budget. "
        f"`single` is the mean over the {s['samples']} samples taken one at a time. "
        "Uncertainty AUROC: how well each method's uncertainty ranks its own misclassified "
        "brain voxels above its correct ones.")
    names = {1: "CSF", 2: "GM", 3: "WM"}
    sizes = ", ".join(f"{n}: {d:.3f}" for n, d in result["ensemble_size_dice"].items())
    curve = ", ".join(f"{row['cpu_seconds'] / 60:.1f}: {row['loss']:.3f}" for row in unet["curve"])
    by_time = ", ".join(f"{float(t) / 60:.1f}: {d:.3f}"
                        for t, d in result["unet_dice_by_cpu_seconds"].items())
    summary = result["summary"]
    dice = {m: row["dice_mean"] for m, row in summary.items()}
    targets = (
        f"Targets (issue 13): UNet - multi-Otsu = {dice['unet'] - dice['otsu']:+.3f} "
        f"(want >= +0.05: otherwise the baseline is broken); ensemble - UNet = "
        f"{dice['ensemble'] - dice['unet']:+.3f} (issue 5 wanted >= -0.02); ensemble - "
        f"equal-budget UNet = "
        f"{dice['ensemble'] - dice['unet-equal-budget']:+.3f}; uncertainty AUROC, ensemble "
        f"{summary['ensemble']['uncertainty_auroc']:.3f} against UNet "
        f"{summary['unet']['uncertainty_auroc']:.3f}. Issue 5's: ensemble - multi-Otsu = "
        f"{dice['ensemble'] - dice['otsu']:+.3f} (want >= +0.03), ensemble - single sample = "
        f"{dice['ensemble'] - dice['single']:+.3f} (want > 0).")
    return (markdown(summary, header, names)
            + f"\n\nMean Dice of the ensemble by number of samples fused: {sizes}.\n\n"
            f"UNet training loss (Dice+CE, mean per window) by CPU-minutes: {curve}.\n\n"
            f"UNet mean Dice on these scans by CPU-minutes of training: {by_time}.\n\n{targets}")


if __name__ == "__main__":
    main()
