"""Enhancement benchmark: diffusion denoising and super-resolution against fair baselines.

Denoising (5% and 10% Rician noise, sigma as a fraction of the clean scan's 99th-percentile head
intensity): the conditional denoiser (and, with --anomaly-model, zero-shot SDEdit with a
normative model) against scikit-image's non-local means (3D, sigma estimated), total
variation, BM4D (when the optional ``bm4d`` package is installed: ``pip install
medidiff[bm4d]``, free for non-commercial use only) and the same network trained by L1
regression on the same pairs (``benchmarks/_regression.py``). Super-resolution (x2 and x4
in-plane averaging): the SR3-style model against bicubic and cubic B-spline interpolation on the
same grid and against its regression counterpart. PSNR and SSIM inside the head (the clean
scan's non-zero voxels), data range = the clean scan's 99th-percentile head intensity, on the
clean scan's own grid; wall time per scan; network evaluations (NFE) per slice.

    python benchmarks/enhance.py                     # data and cpu-small models built if missing
    python benchmarks/enhance.py --split validation  # regenerated held-out validation subjects
    python benchmarks/enhance.py --write-docs

``--split test`` (default) uses the example data's ``enhance/`` copies of healthy test scans;
``--split validation`` makes the same copies of validation subjects, for choosing settings
without looking at the test scans. Results go to benchmarks/results/enhance-<split>.json and,
with --write-docs, into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import yaml
from scipy import ndimage
from skimage.restoration import denoise_nl_means, denoise_tv_chambolle

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import machine, write_section  # noqa: E402
from benchmarks._regression import as_regression, train_regression  # noqa: E402
from medidiff import metrics  # noqa: E402
from medidiff.api import Denoiser, SuperResolver  # noqa: E402
from medidiff.data import degrade  # noqa: E402
from medidiff.data.transforms import foreground_mask  # noqa: E402
from medidiff.tasks.enhance.denoise import estimate_sigma  # noqa: E402

NOISE = {"noisy05": 0.05, "noisy10": 0.10}
SCALES = {"lowres2": 2, "lowres4": 4}
# Baseline parameters as multiples of the estimated sigma, chosen on validation subjects
# (benchmarks/enhance.py --split validation; never on the test scans): NLM h = 0.4 sigma and TV
# weight = 0.5 sigma were within 0.15 dB of the best of a sweep at both noise levels.
NLM_H, TV_WEIGHT = 0.4, 0.5
# BM4D's parameter is the noise standard deviation itself (not a smoothing weight), so it gets
# the estimate as it is; its low-complexity profile keeps the benchmark in reach on 2 CPU cores.
BM4D_SIGMA = 1.0
REGRESSION = "regression (L1, same pairs)"
# The estimators a diffusion model offers (sampling settings over the model's own): one sample,
# the mean of 4 (the posterior mean by Monte Carlo, with their spread) and the one-step x0
# prediction from pure noise (Tweedie's posterior mean E[x | condition] in one evaluation).
ESTIMATORS = {
    "one sample": {"sampler": "ddim", "steps": 2, "eta": 0.0, "samples": 1},
    "mean of 4 samples": {"sampler": "ddim", "steps": 2, "eta": 0.0, "samples": 4},
    "one-step posterior mean": {"sampler": "x0", "steps": 1, "samples": 1},
}


def bm4d_denoiser():
    """``(unit volume, sigma) -> volume`` with BM4D (Maggioni et al. 2013; Makinen et al. 2020)
    when the optional ``bm4d`` package is installed, else None. Its licence allows
    non-commercial use only, so it is an extra, never a dependency."""
    try:
        import bm4d
        from bm4d.profiles import BM4DProfileLC
    except ImportError:
        return None
    profile = BM4DProfileLC()
    profile.num_threads = torch.get_num_threads()

    def run(unit: np.ndarray, sigma: float) -> np.ndarray:
        return np.asarray(bm4d.bm4d(unit, BM4D_SIGMA * sigma, profile=profile), np.float32)

    return run


def run(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "medidiff", *args], check=True)


def ensure(data: Path, models: dict[str, Path], preset: str, regression: bool = True) -> None:
    """Build the example data and train missing cpu-small models (resuming a partial one), and
    each one's regression counterpart with its budget (its steps, the config's time limit)."""
    if not (data / "dataset.json").is_file():
        run("data", "example", str(data))
    for task, folder in models.items():
        if folder is None:
            continue
        config = REPO / "configs" / task / f"{preset}.yaml"
        if not (folder / "model.yaml").is_file():
            run("train", str(config), "--data", str(data), "--out", str(folder), "--no-tracking",
                *(["--resume"] if folder.exists() else []))
        target = regression_folder(folder)
        if regression and not (target / "model.yaml").is_file():
            spec = yaml.safe_load((folder / "model.yaml").read_text())
            minutes = spec["config"]["train"]["max_minutes"] or 1e6
            train_regression(config, data, target, int(spec["info"]["steps"]), minutes * 60)


def regression_folder(folder: Path) -> Path:
    return folder.with_name(folder.name.replace("-model", "") + "-regression")


def validation_copies(data: Path, work: Path, count: int) -> list[dict[str, Path]]:
    """The example data's enhancement copies, made for ``count`` validation subjects."""
    from medidiff.data.example import (
        _enhance_copies,
        load_template,
        split_roles,
        synthesize_subject,
        write_nifti,
    )

    spec = json.loads((data / "dataset.json").read_text())
    roles = split_roles(len(spec["training"]) + len(spec["validation"]) + len(spec["test"]),
                        spec["seed"])
    template, cases = None, []
    for index in [i for i, r in enumerate(roles) if r == "val"][:count]:
        name = f"sub-{index:03d}"
        paths = {k: work / k / f"{name}.nii.gz" for k in ("clean", *NOISE, *SCALES)}
        if not all(p.is_file() for p in paths.values()):
            template = template or load_template(spec["spacing_mm"])
            subject = synthesize_subject(template, spec["seed"], index)
            for kind, (array, affine) in _enhance_copies(subject, spec["seed"], index).items():
                write_nifti(paths[kind], array, affine)
        cases.append(paths)
    return cases


def test_copies(data: Path) -> list[dict[str, Path]]:
    spec = json.loads((data / "dataset.json").read_text())
    return [{k: data / v for k, v in entry.items()} for entry in spec["enhance"]]


def load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    image = nib.load(path)
    return np.asarray(image.dataobj, np.float32), image.affine


def scores(pred: np.ndarray, clean: np.ndarray) -> dict:
    """PSNR and SSIM inside the head, data range = the clean scan's 99th percentile there."""
    head = clean > 0
    scale = float(np.percentile(clean[head], 99))
    pred = pred[tuple(slice(0, s) for s in clean.shape)]
    return {"psnr": metrics.psnr(pred / scale, clean / scale, mask=head),
            "ssim": metrics.ssim(pred / scale, clean / scale, mask=head)}


def spread(out, clean: np.ndarray) -> dict:
    """The samples' spread inside the head, against the actual error of their mean: the mean
    standard deviation over samples, the RMS error, and how well the spread ranks the error
    (Spearman correlation over head voxels), all in units of the clean 99th percentile."""
    std = out.std if hasattr(out, "image") else None  # an EnhanceResult (an array has .std())
    if std is None:
        return {}
    from scipy.stats import spearmanr

    head = clean > 0
    scale = float(np.percentile(clean[head], 99))
    crop = tuple(slice(0, s) for s in clean.shape)
    error = np.abs(out.image[crop] - clean)[head] / scale
    sd = std[crop][head] / scale
    return {"spread_mean": float(sd.mean()), "rmse": float(np.sqrt((error ** 2).mean())),
            "spread_error_spearman": float(spearmanr(sd, error).statistic)}


def timed(fn, *args, **kwargs):
    started = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - started


def classical_denoisers(noisy: np.ndarray) -> dict:
    """Non-local means (3D), total variation and (if installed) BM4D with their parameters set
    from the estimated sigma (NLM's and TV's multiples chosen on validation subjects, never on
    the evaluated scans; BM4D's is the estimate itself)."""
    scale = float(np.percentile(noisy, 99.5))
    unit = noisy / scale
    sigma = estimate_sigma(unit, foreground_mask(unit, 0.02))
    methods = {
        "nlm": lambda: denoise_nl_means(unit, h=NLM_H * sigma, sigma=sigma, patch_size=5,
                                        patch_distance=6, fast_mode=True) * scale,
        "tv": lambda: denoise_tv_chambolle(unit, weight=TV_WEIGHT * sigma) * scale,
    }
    bm4d = bm4d_denoiser()
    if bm4d is not None:
        methods["bm4d"] = lambda: bm4d(unit, sigma) * scale
    return methods


def denoise_rows(cases, models: dict, baselines: bool = True) -> list[dict]:
    rows = []
    for case in cases:
        clean, _ = load(case["clean"])
        for level in NOISE:
            noisy, _ = load(case[level])
            methods = {"noisy input": (lambda x=noisy: x, 0)}
            if baselines:
                methods.update({k: (f, 0) for k, f in classical_denoisers(noisy).items()})
            for name, denoiser in models.items():
                methods[name] = (lambda d=denoiser, p=case[level]: d.predict_file(p), None)
            for name, (fn, nfe) in methods.items():
                out, seconds = timed(fn)
                info = getattr(out, "info", {})
                image = getattr(out, "image", out)
                rows.append({"task": "denoise", "level": level, "case": case["clean"].name,
                             "method": name, "seconds": seconds,
                             "nfe_per_slice": info.get("nfe_per_slice", nfe),
                             "sigma_estimate": info.get("sigma_fraction"), **scores(image, clean),
                             **spread(out, clean)})
                print(f"  {level} {case['clean'].name[:7]} {name:24s} PSNR {rows[-1]['psnr']:.2f} "
                      f"SSIM {rows[-1]['ssim']:.4f} {seconds:.1f} s", flush=True)
    return rows


def interpolators(low: np.ndarray, factor: int) -> dict:
    """Bicubic (torch, per slice) and cubic B-spline (scipy) on the grid ``degrade`` aligns."""
    size = [n * factor for n in low.shape[:2]]

    def bicubic():
        slices = torch.from_numpy(np.moveaxis(low, 2, 0))[:, None]
        return np.moveaxis(degrade.upsample_to(slices, size, factor=factor)[:, 0].numpy(), 0, 2)

    def bspline():
        grid = np.meshgrid(*[(np.arange(n) - (factor - 1) / 2) / factor for n in size],
                           np.arange(low.shape[2]), indexing="ij")
        return ndimage.map_coordinates(low, grid, order=3, mode="nearest")

    return {"bicubic": bicubic, "b-spline": bspline}


def superres_rows(cases, models: dict, baselines: bool = True) -> list[dict]:
    rows = []
    for case in cases:
        clean, clean_affine = load(case["clean"])
        for level, factor in SCALES.items():
            low, _ = load(case[level])
            methods = {k: (f, 0) for k, f in interpolators(low, factor).items() if baselines}
            for name, resolver in models.items():
                methods[name] = (lambda r=resolver, p=case[level]: r.predict_file(p), None)
            for name, (fn, nfe) in methods.items():
                out, seconds = timed(fn)
                info = getattr(out, "info", {})
                if hasattr(out, "affine"):  # the model's grid must be the clean scan's
                    np.testing.assert_allclose(out.affine, clean_affine, atol=1e-4)
                rows.append({"task": "superres", "level": level, "case": case["clean"].name,
                             "method": name, "seconds": seconds,
                             "nfe_per_slice": info.get("nfe_per_slice", nfe),
                             **scores(getattr(out, "image", out), clean),
                             **spread(out, clean)})
                print(f"  {level} {case['clean'].name[:7]} {name:24s} PSNR {rows[-1]['psnr']:.2f} "
                      f"SSIM {rows[-1]['ssim']:.4f} {seconds:.1f} s", flush=True)
    return rows


def summary(rows: list[dict]) -> list[dict]:
    """Mean over cases per (task, level, method)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["task"], row["level"], row["method"]), []).append(row)
    out = []
    for (task, level, method), items in groups.items():
        out.append({"task": task, "level": level, "method": method, "cases": len(items),
                    **{k: float(np.mean([r[k] for r in items]))
                       for k in ("psnr", "ssim", "seconds", "spread_mean", "rmse",
                                 "spread_error_spearman") if k in items[0]},
                    "nfe_per_slice": items[0]["nfe_per_slice"]})
    return out


def markdown(table: list[dict], header: str) -> str:
    names = {"noisy05": "noise 5%", "noisy10": "noise 10%", "lowres2": "x2", "lowres4": "x4"}
    lines = [header, "", "| task | degradation | method | PSNR (dB) | SSIM | NFE/slice | s/scan "
             "| spread / RMS error | spread-error rank corr. |", "|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        ratio = (f"{r['spread_mean'] / r['rmse']:.2f} | {r['spread_error_spearman']:.2f}"
                 if "spread_mean" in r else "- | -")
        lines.append(f"| {r['task']} | {names[r['level']]} | {r['method']} | {r['psnr']:.2f} | "
                     f"{r['ssim']:.4f} | {r['nfe_per_slice']} | {r['seconds']:.1f} | {ratio} |")
    return "\n".join(lines)


def parse() -> argparse.Namespace:
    work = REPO / "benchmarks" / "work"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=work / "data")
    parser.add_argument("--denoise-model", type=Path, default=work / "denoise-model")
    parser.add_argument("--superres-model", type=Path, default=work / "superres-model")
    parser.add_argument("--anomaly-model", type=Path, default=None,
                        help="also denoise zero-shot (SDEdit) with this normative model")
    parser.add_argument("--preset", default="cpu-small")
    parser.add_argument("--split", choices=["test", "validation"], default="test")
    parser.add_argument("--cases", type=int, default=None, help="at most this many scans")
    parser.add_argument("--tasks", nargs="+", choices=["denoise", "superres"],
                        default=["denoise", "superres"])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V",
                        help="sampling setting for the diffusion models (steps=10, samples=4)")
    parser.add_argument("--no-baselines", dest="baselines", action="store_false",
                        help="leave out the classical methods (for choosing a model's settings)")
    parser.add_argument("--estimators", nargs="+", choices=list(ESTIMATORS),
                        default=list(ESTIMATORS), help="the diffusion models' estimators to run")
    parser.add_argument("--no-regression", dest="regression", action="store_false",
                        help="leave out the regression counterparts (trained when missing)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--results", default=None,
                        help="name of the results file in benchmarks/results/ (default: "
                             "enhance-<split>) and, with --write-docs, of the docs section")
    parser.add_argument("--write-docs", action="store_true")
    return parser.parse_args()


def regression_predictor(kind, diffusion_folder: Path, device: str, **settings):
    """The regression counterpart of a diffusion model folder, run by the same predictor in
    one network evaluation per slice."""
    folder = regression_folder(diffusion_folder)
    return as_regression(kind.load(folder, device, sampler="x0", steps=1, samples=1,
                                   **settings))


def training_steps(folders: list[Path], regression: bool) -> dict[str, int]:
    """Steps each model folder (and its regression counterpart) was trained for."""
    if regression:
        folders = [f for folder in folders for f in (folder, regression_folder(folder))]
    return {f.name: yaml.safe_load((f / "model.yaml").read_text())["info"]["steps"]
            for f in folders}


def settings_from(overrides: list[str]) -> dict:
    out = {}
    for item in overrides:
        key, value = item.split("=", 1)
        if key == "sampler":
            out[key] = value
        elif key == "consistency":
            out[key] = value.lower() in ("1", "true", "yes", "on")
        else:
            out[key] = float(value) if key == "eta" else int(value)
    return out


def main() -> None:
    args = parse()
    models = {"denoise": args.denoise_model if "denoise" in args.tasks else None,
              "superres": args.superres_model if "superres" in args.tasks else None}
    ensure(args.data, models, args.preset, args.regression)
    cases = (test_copies(args.data) if args.split == "test" else
             validation_copies(args.data, REPO / "benchmarks" / "work" / "enhance-val",
                               args.cases or 2))[: args.cases]
    settings = settings_from(args.overrides)
    started, rows = time.perf_counter(), []
    if "denoise" in args.tasks:
        denoisers = {f"diffusion, {name}": Denoiser.load(args.denoise_model, args.device,
                                                         **{**settings, **ESTIMATORS[name]})
                     for name in args.estimators}
        if args.anomaly_model is not None:
            denoisers["diffusion (SDEdit, anomaly model)"] = Denoiser.load(
                args.anomaly_model, args.device, **settings)
        if args.regression:
            denoisers[REGRESSION] = regression_predictor(Denoiser, args.denoise_model, args.device)
        rows += denoise_rows(cases, denoisers, args.baselines)
    if "superres" in args.tasks:
        resolvers = {}
        for name in args.estimators:
            chosen = {**settings, **ESTIMATORS[name]}
            resolvers[f"SR3, {name}"] = SuperResolver.load(args.superres_model, args.device,
                                                          **chosen)
            if name == "one sample":  # what data consistency adds to the same sample
                resolvers[f"SR3, {name}, no consistency"] = SuperResolver.load(
                    args.superres_model, args.device, **{**chosen, "consistency": False})
        if args.regression:
            for consistent in (True, False):
                name = REGRESSION + ("" if consistent else ", no consistency")
                resolvers[name] = regression_predictor(SuperResolver, args.superres_model,
                                                       args.device, consistency=consistent)
        rows += superres_rows(cases, resolvers, args.baselines)
    table = summary(rows)
    name = args.results or f"enhance-{args.split}"
    out = REPO / "benchmarks" / "results" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    steps = training_steps([m for m in models.values() if m], args.regression)
    out.write_text(json.dumps({"rows": rows, "summary": table, "settings": settings,
                               "training_steps": steps}, indent=2, default=float) + "\n")
    omp = os.environ.get("OMP_NUM_THREADS")
    threads = f"OMP_NUM_THREADS={omp} " if omp else ""
    header = (f"Machine: {machine()}. Split: {args.split} ({len(cases)} scans), models (training "
              f"steps): {', '.join(f'{k} ({v})' for k, v in steps.items())}; sampling "
              f"{settings or 'defaults'}. Benchmark wall time {time.perf_counter() - started:.0f} s."
              f" Command: `{threads}python benchmarks/enhance.py {' '.join(sys.argv[1:])}`.")
    text = markdown(table, header)
    print(text)
    if args.write_docs:
        write_section("enhance" if args.results is None else name, text)


if __name__ == "__main__":
    main()
