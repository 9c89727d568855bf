"""Segmentation benchmark: the diffusion ensemble against one sample, a U-Net and multi-Otsu.

On the example data's held-out test subjects (their tissue ``label`` entries: 1 CSF, 2 GM,
3 WM), in each scan's own space: Dice per class and mean, HD95 (mm), for
- the diffusion ensemble (N samples, mean of the soft maps then argmax; also majority vote),
- a single diffusion sample (each of the N on its own, metrics averaged),
- a MONAI ``UNet`` trained on the same slices with the same compute budget (the CPU time the
  diffusion model's training used; on an idle machine that is the same wall-clock time),
- 3-class multi-Otsu thresholds (scikit-image) inside the brain (the scan's non-zero voxels),
plus the AUROC of the uncertainty map for the ensemble's misclassified brain voxels.

    python benchmarks/segment.py                     # data and models are built if missing
    python benchmarks/segment.py --write-docs

Results go to benchmarks/results/segment.json and, with --write-docs, into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
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
from medidiff.data.datasets import read_split, training_dataset  # noqa: E402
from medidiff.io.read import load_image  # noqa: E402
from medidiff.metrics import dice_per_class  # noqa: E402
from medidiff.tasks.enhance.denoise import crop_batch  # noqa: E402
from medidiff.tasks.segment.evaluation import (  # noqa: E402
    evaluate_labels,
    load_reference,
    voxel_spacing,
)
from medidiff.tasks.segment.task import fuse  # noqa: E402
from medidiff.training.trainer import draw_batch  # noqa: E402

METHODS = ("ensemble", "ensemble-vote", "single", "unet", "otsu")


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


def train_unet(cfg: Config, data: Path, cpu_seconds: float, seed: int = 0) -> tuple[torch.nn.Module, dict]:
    """The plain supervised baseline: MONAI UNet, Dice + cross-entropy, on the diffusion
    model's training slices and crops, until it has used ``cpu_seconds`` of CPU time."""
    from monai.losses import DiceCELoss
    from monai.networks.nets import UNet

    torch.manual_seed(seed)
    k = cfg.segment.num_classes
    net = UNet(spatial_dims=2, in_channels=cfg.segment.image_channels, out_channels=k,
               channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=2)
    dataset = training_dataset(cfg.data, read_split(data, "training"), keys=("image", "label"))
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.train.lr)
    generator = torch.Generator().manual_seed(seed)
    started, wall, steps, loss = time.process_time(), time.monotonic(), 0, torch.tensor(np.nan)
    while time.process_time() - started < cpu_seconds:
        batch = draw_batch(dataset, cfg.train.batch_size, generator)
        both = crop_batch(torch.cat([batch["image"], batch["label"]], dim=1), cfg, generator)
        loss = loss_fn(net(both[:, :-1]), both[:, -1:].round())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps += 1
    info = {"steps": steps, "cpu_seconds": time.process_time() - started,
            "wall_seconds": time.monotonic() - wall, "final_loss": loss.item()}
    return net.eval(), info


@torch.no_grad()
def unet_probabilities(net, volume: torch.Tensor, cfg: Config, batch: int = 32) -> torch.Tensor:
    """Softmax of the UNet slice by slice: (C, H, W, D) -> (K, H, W, D)."""
    axis = cfg.data.slice_axis + 1
    slices = volume.movedim(axis, 0)
    out = torch.cat([net(slices[i:i + batch]).softmax(dim=1) for i in range(0, len(slices), batch)])
    return out.movedim(0, axis)  # (K, ...) with the slice axis back in place


def otsu_labels(image: np.ndarray) -> np.ndarray:
    """3-class multi-Otsu of the brain's intensities (labels 1, 2, 3 by increasing intensity)."""
    from skimage.filters import threshold_multiotsu

    brain = image > 0
    labels = np.zeros(image.shape, np.uint8)
    labels[brain] = np.digitize(image[brain], threshold_multiotsu(image[brain], classes=3)) + 1
    return labels


def evaluate_case(segmenter: Segmenter, unet, entry: dict) -> tuple[dict, dict]:
    """Metrics of every method on one test scan, and the seconds each method took."""
    cfg, k = segmenter.cfg, segmenter.num_classes
    raw, affine = load_image(entry["image"])
    reference = load_reference(entry["label"], raw.shape[1:])
    spacing = voxel_spacing(affine)
    seconds = {}
    started = time.perf_counter()
    result = segmenter.predict_file(entry["image"])
    seconds["diffusion"] = time.perf_counter() - started
    prep = segmenter.prepare_file(Path(entry["image"]))

    def labels_of(probs: torch.Tensor) -> np.ndarray:
        return segmenter.to_input_space(prep, probs)[0]

    def score(probs: torch.Tensor) -> dict:
        return evaluate_labels(labels_of(probs), reference, k, spacing)

    def mean_dice(probs: torch.Tensor) -> float:
        return float(np.mean(list(dice_per_class(labels_of(probs), reference, range(1, k))
                                  .values())))

    out = {"ensemble": evaluate_labels(result.labels, reference, k, spacing, result.uncertainty),
           "ensemble-vote": score(fuse(result.grid.samples, "vote"))}
    singles = [score(sample) for sample in result.grid.samples]
    out["single"] = {key: float(np.nanmean([s[key] for s in singles])) for key in singles[0]}
    out["ensemble-size"] = {n: mean_dice(fuse(result.grid.samples[:n], "mean"))
                            for n in range(1, len(singles) + 1)}
    started = time.perf_counter()
    out["unet"] = score(unet_probabilities(unet, prep.volume, cfg))
    seconds["unet"] = time.perf_counter() - started
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
    parser.add_argument("--preset", default="cpu-small")
    parser.add_argument("--samples", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--max-test", type=int, default=None)
    parser.add_argument("--unet-cpu-seconds", type=float, default=None)
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
        text = report(result, args, len(result["cases"]))
        print(text)
        if args.write_docs:
            write_section("segment", text)
        return

    torch.set_num_threads(args.threads)
    started = time.monotonic()
    budget = training_budget(args.data, args.model, args.preset, args.unet_cpu_seconds)
    segmenter = Segmenter.load(args.model, device="cpu", samples=args.samples, steps=args.steps)
    unet, unet_info = train_unet(segmenter.cfg, args.data, budget["cpu_seconds"])
    print(f"UNet: {unet_info}", flush=True)
    cases, seconds = [], []
    for entry in read_split(args.data, "test")[:args.max_test]:
        metrics, took = evaluate_case(segmenter, unet, entry)
        cases.append(metrics)
        seconds.append(took)
        print(Path(entry["image"]).name, {m: round(metrics[m]["dice_mean"], 3) for m in METHODS},
              f"AUROC {metrics['ensemble']['uncertainty_auroc']:.3f}", took, flush=True)
    summary = summarise(cases)
    sizes = {n: float(np.mean([c["ensemble-size"][n] for c in cases]))
             for n in cases[0]["ensemble-size"]}
    result = {"summary": summary, "ensemble_size_dice": sizes, "cases": cases,
              "settings": segmenter.settings.describe(), "model_info": segmenter.model.info,
              "diffusion_training": budget, "unet_training": unet_info,
              "seconds_per_scan": {k: float(np.mean([s[k] for s in seconds])) for k in seconds[0]},
              "machine": machine(), "total_seconds": time.monotonic() - started}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=float) + "\n")
    text = report(result, args, len(cases))
    print(text)
    if args.write_docs:
        write_section("segment", text)


def report(result: dict, args, n_cases: int) -> str:
    info, unet = result["model_info"], result["unet_training"]
    train = result["diffusion_training"]
    s = result["settings"]
    header = (
        f"Command: `python benchmarks/segment.py --preset {args.preset} --write-docs`. "
        f"Machine: {result['machine']} (shared with other jobs). {n_cases} held-out test scans "
        f"of the example data, scored in their own 2 mm space. Diffusion: `{args.preset}` "
        f"({info.get('steps')} steps, {info.get('parameters')} parameters, "
        f"{train['cpu_seconds'] / 60:.1f} CPU-min); {s['samples']} samples, {s['sampler']} "
        f"{s['steps']} steps ({s['nfe_per_slice']} network calls per slice), "
        f"{result['seconds_per_scan']['diffusion']:.0f} s/scan. UNet: MONAI `UNet` "
        f"(16-32-64-128, 2 residual units), Dice+CE, {unet['steps']} steps in the same "
        f"{unet['cpu_seconds'] / 60:.1f} CPU-min ({unet['wall_seconds'] / 60:.1f} min wall), "
        f"{result['seconds_per_scan']['unet']:.1f} s/scan. `single` is the mean over the "
        f"{s['samples']} samples taken one at a time.")
    sizes = ", ".join(f"{n}: {d:.3f}" for n, d in result["ensemble_size_dice"].items())
    names = {1: "CSF", 2: "GM", 3: "WM"}
    dice = {m: row["dice_mean"] for m, row in result["summary"].items()}
    targets = (
        f"Targets (issue 5): ensemble - UNet = {dice['ensemble'] - dice['unet']:+.3f} "
        f"(want >= -0.02); ensemble - multi-Otsu = {dice['ensemble'] - dice['otsu']:+.3f} "
        f"(want >= +0.03); ensemble - single sample = {dice['ensemble'] - dice['single']:+.3f} "
        f"(want > 0); uncertainty AUROC = "
        f"{result['summary']['ensemble']['uncertainty_auroc']:.3f} (want >= 0.75).")
    return (markdown(result["summary"], header, names)
            + f"\n\nMean Dice of the ensemble by number of samples fused: {sizes}.\n\n{targets}")


if __name__ == "__main__":
    main()
