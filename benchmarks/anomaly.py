"""Anomaly-detection benchmark: the AnoDDPM reference, medidiff's fast settings and the baselines.

Everything runs in one process on one trained model and the same scans: each setting is
calibrated on the healthy validation scans (voxel threshold at 1% false-positive rate), then
scores the test scans (lesioned and healthy). Maps are compared on the model grid with the lesion
masks resampled by the same MONAI pipeline (nearest neighbour).

    python benchmarks/anomaly.py                      # data and model are built if missing
    python benchmarks/anomaly.py --settings default reference zscore --write-docs

Results go to benchmarks/results/anomaly.json and, with --write-docs, into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import machine, write_section  # noqa: E402
from medidiff import metrics  # noqa: E402
from medidiff.api import AnomalyDetector  # noqa: E402
from medidiff.config import AnomalyConfig  # noqa: E402
from medidiff.data.datasets import cached_volumes, read_split  # noqa: E402
from medidiff.names import INFERENCE_BACKENDS  # noqa: E402
from medidiff.preprocess.cache import preprocess_entries  # noqa: E402
from medidiff.tasks.anomaly.baselines import ZSCORE_FILE  # noqa: E402
from medidiff.tasks.anomaly.calibration import fit_zscore_baseline, standardise_healthy  # noqa: E402
from medidiff.tasks.anomaly.scoring import describe  # noqa: E402
from medidiff.tasks.registry import load_model  # noqa: E402

SETTINGS = {
    "zscore": dict(method="zscore"),
    "threshold": dict(method="threshold"),
    "reference": dict(sampler="ddpm", noise_levels=(250,), steps=250, draws=1),
    "ddim10": dict(sampler="ddim", noise_levels=(250,), steps=10, draws=1, eta=0.0),
    "ddim10-x2": dict(sampler="ddim", noise_levels=(250,), steps=10, draws=2),
    "ddim10-eta1-x2": dict(sampler="ddim", noise_levels=(250,), steps=10, draws=2, eta=1.0),
    "ddim10-eta1-x2-t150": dict(sampler="ddim", noise_levels=(150,), steps=10, draws=2, eta=1.0),
    "ddim10-eta1-x2-t350": dict(sampler="ddim", noise_levels=(350,), steps=10, draws=2, eta=1.0),
    "ddim5-eta1-x4": dict(sampler="ddim", noise_levels=(250,), steps=5, draws=4, eta=1.0),
    "ddim5-eta1-x2": dict(sampler="ddim", noise_levels=(250,), steps=5, draws=2, eta=1.0),
    "ddim10-eta1-x1": dict(sampler="ddim", noise_levels=(250,), steps=10, draws=1, eta=1.0),
    "x0-t250-x1": dict(sampler="x0", noise_levels=(250,), steps=1, draws=1),
    "x0-t250-x2": dict(sampler="x0", noise_levels=(250,), steps=1, draws=2),
    "x0-t250-x4": dict(sampler="x0", noise_levels=(250,), steps=1, draws=4),
    "x0-t150-x2": dict(sampler="x0", noise_levels=(150,), steps=1, draws=2),
    "x0-t350-x2": dict(sampler="x0", noise_levels=(350,), steps=1, draws=2),
    "ddim2-eta1-x2": dict(sampler="ddim", noise_levels=(250,), steps=2, draws=2, eta=1.0),
    "ddim3-eta1-x2": dict(sampler="ddim", noise_levels=(250,), steps=3, draws=2, eta=1.0),
    "dpmpp3-x2": dict(sampler="dpmpp2m", noise_levels=(250,), steps=3, draws=2),
    "x0-t250-x10": dict(sampler="x0", noise_levels=(250,), steps=1, draws=10),
    "x0-3lvl-x2": dict(sampler="x0", noise_levels=(150, 250, 350), steps=1, draws=2),
    "x0-3lvl-x4": dict(sampler="x0", noise_levels=(150, 250, 350), steps=1, draws=4),
    "x0-3lvl-x8": dict(sampler="x0", noise_levels=(150, 250, 350), steps=1, draws=8),
}
# medidiff's default scoring settings (AnomalyConfig defaults); marked in the table
DEFAULT = describe(AnomalyConfig(), "diffusion")


def ensure_data_and_model(data: Path, model: Path, preset: str, train_set: list[str]) -> None:
    if not (data / "dataset.json").is_file():
        subprocess.run([sys.executable, "-m", "medidiff", "data", "example", str(data)], check=True)
    if not (model / "model.yaml").is_file():
        subprocess.run([sys.executable, "-m", "medidiff", "train",
                        str(REPO / "configs" / "anomaly" / f"{preset}.yaml"), "--data", str(data),
                        "--out", str(model), "--no-tracking",
                        *[arg for item in train_set for arg in ("--set", item)],
                        *(["--resume"] if model.exists() else [])],
                       check=True)


def load_split(cfg, data: Path, split: str, limit: int | None, slab: int):
    entries = read_split(data, split)[:limit]
    masks = ("mask",) if entries and all("mask" in e for e in entries) else ()
    entries = preprocess_entries(cfg.preprocess, entries, label_keys=masks)  # raw scans: as scored
    keys = [{"image": e["image"], **({"mask": e["mask"]} if "mask" in e else {})} for e in entries]
    label_keys = ("mask",) if all("mask" in k for k in keys) else ()
    items = [dict(v) for v in cached_volumes(cfg.data, keys, label_keys=label_keys)]
    return [central_slab(item, cfg, slab) for item in items] if slab else items


def central_slab(item: dict, cfg, slab: int) -> dict:
    """The ``slab`` slices around the brain's centre along the slice axis (chosen from the image
    alone, never from labels), to keep the full-length reference affordable on a CPU."""
    axis = cfg.data.slice_axis + 1
    image = np.asarray(item["image"])
    fg = (image > cfg.data.foreground_threshold).sum(axis=tuple(d for d in range(image.ndim)
                                                               if d != axis))
    centre = int(round(float((np.arange(fg.size) * fg).sum() / max(fg.sum(), 1))))
    start = int(np.clip(centre - slab // 2, 0, max(fg.size - slab, 0)))
    index = np.arange(start, min(start + slab, fg.size))
    out = {k: torch.as_tensor(np.take(np.asarray(v), index, axis=axis)) for k, v in item.items()
           if k in ("image", "mask")}
    out["slab"] = index
    return out


def score(detector, item: dict, stats):
    """Score one preprocessed item; z-score statistics follow the item's slab."""
    if stats is not None and "slab" in item:
        axis = detector.cfg.data.slice_axis
        detector._zscore = {k: np.take(v, item["slab"], axis=axis) for k, v in stats.items()}
    return detector.score_grid(torch.as_tensor(item["image"]).as_subclass(torch.Tensor))


def run_setting(model, name: str, val, test, device, backend: str = "auto") -> list[dict]:
    """Calibrate on ``val``, score ``test``. A diffusion setting gives two results from the same
    reconstructions: the standardised map (medidiff's) and the raw residual (AnoDDPM's)."""
    # standardise=True: both maps come from the same reconstructions, raw and standardised
    detector = AnomalyDetector.from_model(model, device, backend=backend,
                                          **{"standardise": True, **SETTINGS[name]})
    settings = detector.settings
    stats = detector.zscore_stats() if detector.method == "zscore" else None
    detector._residual_stats = {}  # raw residuals; standardised below as calibrate does
    grids = [score(detector, v, stats) for v in val]
    maps = {"raw": [g.anomaly_map for g in grids]}
    residual_stats = standardise_healthy(detector, grids)
    if residual_stats is not None:
        maps["standardised"] = [g.anomaly_map for g in grids]
    foreground = [g.foreground for g in grids]
    thresholds = {k: metrics.threshold_at_fpr(v, 0.01, masks=foreground) for k, v in maps.items()}
    cases = {k: [] for k in maps}
    seconds = []
    for item in test:
        started = time.perf_counter()
        grid = score(detector, item, stats)
        seconds.append(time.perf_counter() - started)
        label = np.asarray(item["mask"][0]) > 0.5
        for kind in maps:
            if kind == "standardised":
                grid = detector.finish_grid(grid, residual_stats)
            cases[kind].append({"map": grid.anomaly_map.copy(), "label": label,
                                "mask": grid.foreground | label, "score": grid.score})
    results = []
    for kind in maps:
        result = metrics.evaluate_anomaly(cases[kind], voxel_threshold=thresholds[kind])
        described = {**describe(settings, detector.method), "standardise": kind == "standardised"}
        label = name if detector.method != "diffusion" else f"{name} {kind}"
        result.update({"setting": label, "settings": described, "map": kind,
                       "nfe_per_slice": described["nfe_per_slice"],
                       "seconds_per_scan": float(np.mean(seconds)),
                       "voxel_threshold": thresholds[kind]})
        results.append(result)
    return results


def markdown(results: list[dict], header: str) -> str:
    lines = [header, "",
             "| setting | map | sampler | levels | steps | draws | NFE/slice | pooled AP | AUROC | "
             "Dice@cal | best Dice (oracle) | scan AUROC | s/scan |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    sampler = {"ddim": lambda s: f"ddim (eta {s['eta']:g})"}
    for r in results:
        s = r["settings"]
        diffusion = s["method"] == "diffusion"
        name = f"**{r['setting']} (default)**" if s == DEFAULT else r["setting"]
        lines.append(
            f"| {name} | {r.get('map', '-') if diffusion else '-'} | "
            f"{sampler.get(s['sampler'], lambda s: s['sampler'])(s) if diffusion else s['method']} | "
            f"{','.join(map(str, s['noise_levels'])) if diffusion else '-'} | "
            f"{s['steps'] if diffusion else '-'} | {s['draws'] if diffusion else '-'} | "
            f"{r['nfe_per_slice']} | {r['pooled_ap']:.3f} | {r['pooled_auroc']:.3f} | "
            f"{r['dice_at_threshold']:.3f} | {r['best_dice_oracle']:.3f} | "
            f"{r.get('scan_auroc', float('nan')):.3f} | {r['seconds_per_scan']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO / "benchmarks" / "work" / "data")
    parser.add_argument("--model", type=Path, default=REPO / "benchmarks" / "work" / "model")
    parser.add_argument("--preset", default="cpu-small")
    parser.add_argument("--train-set", nargs="*", metavar="KEY=VALUE",
                        default=["train.steps=2000", "train.max_minutes=70",
                                 "preprocess.registration=none", "preprocess.skull_strip=none",
                                 "preprocess.bias_correction=none"],
                        help="config overrides for training the model when it is missing "
                             "[default: 2,000 steps, the benchmark's model; the preset's 400 "
                             "are the demo's; no preprocessing: this data set is registered "
                             "and skull-stripped already (benchmarks/raw_scans.py: raw scans)]")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--max-val", type=int, default=None)
    parser.add_argument("--max-test", type=int, default=None)
    parser.add_argument("--slab", type=int, default=0,
                        help="score only this many central slices per scan (0: whole volumes)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None,
                        help="results JSON [default: benchmarks/results/anomaly[-slabN].json]")
    parser.add_argument("--backend", default="auto", choices=INFERENCE_BACKENDS)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()

    name = f"anomaly-slab{args.slab}" if args.slab else "anomaly"
    args.out = args.out or REPO / "benchmarks" / "results" / f"{name}.json"
    ensure_data_and_model(args.data, args.model, args.preset, args.train_set)
    device = torch.device(args.device)
    model = load_model(args.model, task="anomaly", device=str(device))
    if not (args.model / ZSCORE_FILE).is_file():
        fit_zscore_baseline(model, args.data)
    val = load_split(model.config, args.data, "validation", args.max_val, args.slab)
    test = load_split(model.config, args.data, "test", args.max_test, args.slab)
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    for name in args.settings:
        started = time.perf_counter()
        for result in run_setting(model, name, val, test, device, args.backend):
            results[result["setting"]] = result
            print(f"{result['setting']:28s} AP {result['pooled_ap']:.3f}  Dice@cal "
                  f"{result['dice_at_threshold']:.3f}  scan AUROC "
                  f"{result.get('scan_auroc', float('nan')):.3f}  NFE "
                  f"{result['nfe_per_slice']:4d}  {result['seconds_per_scan']:.1f} s/scan "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2, default=float) + "\n")
    order = {name: i for i, name in enumerate(SETTINGS)}
    ordered = sorted(results.values(), key=lambda r: (order.get(r["setting"].split()[0], 99),
                                                      r.get("map") == "standardised"))
    header = (f"Machine: {machine(device)}. Model: `{args.model.name}` "
              f"({model.info.get('steps')} steps, {model.info.get('parameters')} parameters). "
              f"{len(val)} healthy validation scans for calibration, {len(test)} test scans "
              f"({sum(bool(np.any(np.asarray(t['mask']))) for t in test)} with lesions"
              f"{' in the slab' if args.slab else ''}); "
              f"{f'the {args.slab} central slices of each scan' if args.slab else 'whole volumes'}"
              f". Command: `python benchmarks/anomaly.py {' '.join(sys.argv[1:])}`.")
    table = markdown(ordered, header)
    print(table)
    if args.write_docs:
        write_section("anomaly", table)


if __name__ == "__main__":
    main()
