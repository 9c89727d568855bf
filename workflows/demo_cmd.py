"""``medidiff demo``: the main job end to end on the bundled example data."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import click
from medidiff.workflows.common import (
    echo,
    make_tracker,
    predict_files,
    terminate_as_interrupt,
    tracking_options,
)


def preset_path(task: str, preset: str) -> Path:
    """``configs/<task>/<preset>.yaml`` of this checkout."""
    from medidiff.errors import InputError

    root = Path(__file__).resolve().parents[1] / "configs"
    path = root / task / f"{preset}.yaml"
    if not path.is_file():
        raise InputError(path, "preset not found (medidiff must be installed from its checkout)")
    return path


@click.command()
@click.option("--out", "out_dir", default="demo", show_default=True,
              type=click.Path(file_okay=False), help="Folder for data, model and results.")
@click.option("--preset", default="cpu-small", show_default=True,
              help="Anomaly config preset (configs/anomaly/PRESET.yaml).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--subjects", type=click.IntRange(min=6), default=24, show_default=True,
              help="Example subjects: 60% train, 15% validation, 25% test.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config value of the preset (repeatable).")
@click.option("--device", default="auto", show_default=True)
@tracking_options
def demo(out_dir, preset, seed, subjects, overrides, device, experiment, tracking_uri,
         no_tracking) -> None:
    """Example data -> normative model -> calibration -> scoring -> evaluation vs baselines."""
    from medidiff.workflows.anomaly_cmd import (
        evaluation_metrics,
        evaluation_summary,
        use_closest_calibration,
    )
    from medidiff.workflows.train_cmd import train_and_calibrate

    from medidiff.api import AnomalyDetector, evaluate_folder
    from medidiff.config import load_config
    from medidiff.data.datasets import read_split
    from medidiff.data.example import make_example_dataset
    from medidiff.data.raw import make_raw_dataset
    from medidiff.io.write import atomic_write_text
    from medidiff.names import ANOMALY_METHODS
    from medidiff.report import save_png
    from medidiff.tasks.anomaly.evaluation import summary_picture

    started = time.monotonic()
    out = Path(out_dir)
    data_dir, model_dir = out / "data", out / "model"
    cfg = load_config(preset_path("anomaly", preset),
                      [f"train.device={device}", f"train.seed={seed}", *overrides])
    if tracking_uri is None and not os.environ.get("MLFLOW_TRACKING_URI"):
        out.mkdir(parents=True, exist_ok=True)  # the demo's runs stay with its outputs
        tracking_uri = f"sqlite:///{(out / 'mlflow.db').resolve()}"
    tracker = make_tracker(experiment, tracking_uri, no_tracking)
    terminate_as_interrupt()
    with tracker.run("demo", tags={"stage": "demo", "preset": preset}):
        tracker.log_params({"preset": preset, "seed": seed, "subjects": subjects})
        raw = cfg.preprocess.registration != "none"  # a preset that registers gets raw scans
        if not (data_dir / "dataset.json").is_file():
            kind = "raw scans (skull, head pose, native grids, DICOM)" if raw else "registered"
            echo(f"[1/4] example data, {kind} -> {data_dir}")
            if raw:
                make_raw_dataset(data_dir, seed=seed, subjects=subjects)
            else:
                make_example_dataset(data_dir, seed=seed, subjects=subjects)
        echo(f"[2/4] train the normative model ({preset}) -> {model_dir}")
        resume = (model_dir / "checkpoints").exists() and not (model_dir / "model.yaml").exists()
        if not (model_dir / "model.yaml").exists():
            trained = train_and_calibrate(cfg, data_dir, model_dir, resume, tracker, True,
                                          nested=True)
            tracker.link_model(trained.model_id)  # the train run's model, on this run's page
        else:  # trained by an earlier demo: logged from this run
            tracker.log_model_folder(model_dir)
        tests = [e["image"] for e in read_split(data_dir, "test")]
        results = {}
        for step, method in enumerate(ANOMALY_METHODS):
            echo(f"[3/4] score {len(tests)} test scans: {method} ({step + 1}/{len(ANOMALY_METHODS)})")
            detector = AnomalyDetector.load(model_dir, device=device, method=method)
            use_closest_calibration(detector)
            pred = out / "scores" / method
            predict_files(detector, tests, pred, 0, 1, False, tracker,
                          run_name=f"score-{method}", nested=True)
            with tracker.run(f"evaluate-{method}", nested=True, tags={"stage": "evaluate"}):
                metrics = evaluate_folder(pred, data_dir / "test" / "masks")
                metrics["nfe_per_slice"] = detector.describe()["nfe_per_slice"]
                tracker.log_metrics(evaluation_metrics(metrics))
                tracker.set_description(evaluation_summary(metrics))
            results[method] = metrics
        atomic_write_text(out / "metrics.json", json.dumps(results, indent=2) + "\n")
        tracker.log_dict(results, "metrics.json")
        summary = summary_picture({m: out / "scores" / m for m in results},
                                  data_dir / "test" / "masks", "the demo's test scans: "
                                  "diffusion model against the baselines")
        save_png(summary, out / "summary.png")
        tracker.log_image(summary, key="summary")
        tracker.log_metrics({f"eval/{m}_pooled_ap": r["pooled_ap"] for m, r in results.items()})
        tracker.set_description("pooled AP on the test scans: " + ", ".join(
            f"{m} {r['pooled_ap']:.4f}" for m, r in results.items()))
    echo("[4/4] results on the test scans (pooled over voxels; best Dice is an oracle):")
    click.echo(results_table(results))
    echo(f"done in {(time.monotonic() - started) / 60:.1f} min; outputs in {out}/")
    if not no_tracking:
        from medidiff.tracking import tracking_uri as resolve

        mlflow = Path(sys.executable).parent / "mlflow"  # on the PATH or not, this one works
        echo(f"open the MLflow UI:  {mlflow} ui --backend-store-uri {resolve(tracking_uri)}")


def results_table(results: dict) -> str:
    columns = [("pooled_ap", "AP"), ("pooled_auroc", "AUROC"),
               ("dice_at_calibrated_threshold", "Dice@cal"), ("best_dice_oracle", "Dice*"),
               ("scan_auroc", "scan AUROC"), ("nfe_per_slice", "NFE")]
    header = f"{'method':12s}" + "".join(f"{title:>12s}" for _, title in columns)
    lines = [header]
    for method, metrics in results.items():
        cells = []
        for key, _ in columns:
            value = metrics.get(key, float("nan"))
            cells.append(f"{value:12.3f}" if isinstance(value, float) else f"{value:>12}")
        lines.append(f"{method:12s}" + "".join(cells))
    return "\n".join(lines)
