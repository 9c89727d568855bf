"""Anomaly scoring end to end on the tiny model: geometry, files, calibration, batch behaviour."""

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from medidiff.api import AnomalyDetector
from medidiff.errors import ModelFolderError
from tests.helpers import run_cli


def _test_scans(example_data: Path) -> list[Path]:
    return sorted((example_data / "test" / "images").glob("*.nii.gz"))


def test_calibration_is_stored_for_every_method(tiny_model):
    cal = yaml.safe_load((tiny_model / "model.yaml").read_text())["calibration"]
    methods = {e["settings"]["method"] for e in cal["entries"]}
    assert methods == {"diffusion", "zscore", "threshold"}
    for entry in cal["entries"]:
        assert entry["voxel_threshold"] > 0
        assert np.isfinite(entry["scan_threshold"])
    assert cal["validation_scans"] == 1 and cal["target_fpr"] == 0.01
    assert (tiny_model / "baseline_zscore.safetensors").is_file()


def test_calibrated_threshold_gives_target_fpr_on_healthy_scan(tiny_model, example_data):
    detector = AnomalyDetector.load(tiny_model, device="cpu")
    val = json.loads((example_data / "dataset.json").read_text())["validation"][0]["image"]
    data = detector.prepare_file(example_data / val).data
    grid = detector.score_grid(data["image"].as_tensor())
    threshold = detector.calibration()["voxel_threshold"]
    fpr = float((grid.anomaly_map[grid.foreground] > threshold).mean())
    assert fpr <= 0.011  # calibrated on this very scan: at most the 1% target


def test_score_cli_writes_maps_in_input_space(tiny_model, example_data, tmp_path):
    scans = _test_scans(example_data)
    out = tmp_path / "pred"
    code, _, err = run_cli("anomaly", "score", "--model", str(tiny_model), "--out", str(out),
                           *map(str, scans))
    assert code == 0, err
    for scan in scans:
        case = scan.name[:-7]
        src = nib.load(scan)
        amap = nib.load(out / f"{case}_anomaly.nii.gz")
        mask = nib.load(out / f"{case}_anomaly_mask.nii.gz")
        assert amap.shape == src.shape == mask.shape
        np.testing.assert_allclose(amap.affine, src.affine, atol=1e-5)
        assert amap.get_data_dtype() == np.float32 and mask.get_data_dtype() == np.uint8
        data = np.asarray(amap.dataobj)
        assert np.isfinite(data).all() and data.min() >= 0 and data.max() > 0
        assert (out / f"{case}.png").read_bytes()[:4] == b"\x89PNG"
    rows = list(csv.DictReader((out / "scores.csv").open()))
    assert [r["case"] for r in rows] == sorted(s.name[:-7] for s in scans)
    assert {"case", "score", "flagged", "ood"} <= set(rows[0])


def test_rerun_skips_finished_cases_unless_overwrite(tiny_model, example_data, tmp_path):
    scan = _test_scans(example_data)[0]
    out = tmp_path / "pred"
    args = ["anomaly", "score", "--model", str(tiny_model), "--out", str(out), str(scan)]
    assert run_cli(*args)[0] == 0
    stamp = (out / f"{scan.name[:-7]}_anomaly.nii.gz").stat().st_mtime_ns
    code, _, err = run_cli(*args)
    assert code == 0 and "1 skipped" in err
    assert (out / f"{scan.name[:-7]}_anomaly.nii.gz").stat().st_mtime_ns == stamp
    code, _, err = run_cli(*args, "--overwrite")
    assert code == 0 and "1 scored" in err


def test_unreadable_scan_is_skipped_others_scored(tiny_model, example_data, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    good = _test_scans(example_data)[0]
    shutil.copy(good, inputs / good.name)
    (inputs / "broken.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    out = tmp_path / "pred"
    code, _, err = run_cli("anomaly", "score", "--model", str(tiny_model), "--out", str(out),
                           str(inputs))
    assert code == 2
    assert "broken.nii.gz" in err and "Traceback" not in err
    assert (out / f"{good.name[:-7]}_anomaly.nii.gz").is_file()
    assert not list(out.glob("broken*"))


def test_baseline_methods_score(tiny_model, example_data, tmp_path):
    scan = _test_scans(example_data)[0]
    for method in ("zscore", "threshold"):
        detector = AnomalyDetector.load(tiny_model, device="cpu", method=method)
        result = detector.predict_file(scan)
        assert result.anomaly_map.shape == nib.load(scan).shape
        assert result.anomaly_map.max() > 0


def test_score_array_matches_score_file(tiny_model, example_data):
    scan = _test_scans(example_data)[0]
    detector = AnomalyDetector.load(tiny_model, device="cpu")
    image = nib.load(scan)
    from_file = detector.predict_file(scan)
    from_array = detector.predict_array(np.asarray(image.dataobj), image.affine)
    np.testing.assert_allclose(from_file.anomaly_map, from_array.anomaly_map, atol=1e-5)
    assert from_file.score == pytest.approx(from_array.score, rel=1e-5)


def test_evaluate_reports_pooled_metrics(tiny_model, example_data, tmp_path):
    out = tmp_path / "pred"
    assert run_cli("anomaly", "score", "--model", str(tiny_model), "--out", str(out),
                   *map(str, _test_scans(example_data)))[0] == 0
    metrics_json = tmp_path / "metrics.json"
    code, stdout, err = run_cli("anomaly", "evaluate", "--pred", str(out), "--labels",
                                str(example_data / "test" / "masks"), "--out", str(metrics_json))
    assert code == 0, err
    result = json.loads(metrics_json.read_text())
    assert 0 <= result["pooled_ap"] <= 1 and 0 <= result["pooled_auroc"] <= 1
    assert 0 <= result["best_dice_oracle"] <= 1
    assert result["n_cases"] == 2 and result["n_anomalous_cases"] == 1
    assert "pooled_ap" in stdout


def test_model_of_another_task_is_refused(tiny_model, tmp_path):
    other = tmp_path / "denoiser"
    shutil.copytree(tiny_model, other)
    meta = yaml.safe_load((other / "model.yaml").read_text())
    meta["config"]["task"] = "denoise"
    (other / "model.yaml").write_text(yaml.safe_dump(meta))
    with pytest.raises(ModelFolderError, match="holds a 'denoise' model"):
        AnomalyDetector.load(other)


def test_sharded_scoring_writes_the_same_files(tiny_model, example_data, tmp_path):
    scans = list(map(str, _test_scans(example_data)))
    base = ["anomaly", "score", "--model", str(tiny_model), "--no-tracking"]
    assert run_cli(*base, "--out", str(tmp_path / "one"), *scans)[0] == 0
    for part in (0, 1):
        assert run_cli(*base, "--out", str(tmp_path / "two"), "--part-id", str(part),
                       "--num-parts", "2", *scans)[0] == 0
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "two").iterdir())
    assert not [name for name in names if name.endswith(".lock")]  # nothing left beside results
    assert (tmp_path / "one" / "scores.csv").read_text() == (tmp_path / "two" / "scores.csv").read_text()


def test_png_slice_is_scored_by_a_2d_model(tiny_model, example_data, tmp_path):
    from PIL import Image

    volume = np.asarray(nib.load(_test_scans(example_data)[0]).dataobj, dtype=np.float32)
    middle = volume[:, :, volume.shape[2] // 2]
    png = tmp_path / "slice.png"
    Image.fromarray((middle / middle.max() * 255).astype(np.uint8)).save(png)
    out = tmp_path / "pred"
    code, _, err = run_cli("anomaly", "score", "--model", str(tiny_model), "--out", str(out),
                           "--no-tracking", str(png))
    assert code == 0, err
    amap = nib.load(out / "slice_anomaly.nii.gz")
    assert amap.shape == Image.open(png).size  # MONAI's PIL reader puts width first
    assert (out / "slice.png").is_file()


def _grid(residual: np.ndarray):
    from medidiff.tasks.anomaly.predictor import GridResult

    residual = residual.astype(np.float32)
    shape = residual.shape
    return GridResult(np.full(shape, 0.5, np.float32), None, residual.copy(),
                      np.ones(shape, bool), 0.0, residual=residual)


def test_standardisation_discounts_what_every_healthy_reconstruction_misses(tiny_model):
    from medidiff.tasks.anomaly import baselines
    from medidiff.tasks.anomaly.calibration import RESIDUAL_SMOOTH, standardise_healthy
    from medidiff.tasks.anomaly.predictor import RESIDUAL_FLOOR
    from medidiff.tasks.anomaly.scoring import postprocess

    detector = AnomalyDetector.load(tiny_model, device="cpu", standardise=True)
    rng = np.random.default_rng(0)
    shape = (20, 20, 10)
    fold = np.zeros(shape)
    fold[2:7] = 0.5  # every healthy reconstruction misses here (a cortical fold, say)
    lesion = np.zeros(shape)
    lesion[12:17, 12:17, 3:8] = 0.3  # smaller than the fold's residual, but new

    def residual(extra=0.0):
        return 0.02 * rng.random(shape) + fold * rng.uniform(0.9, 1.1) + extra

    healthy = [_grid(residual()) for _ in range(4)]
    stats = standardise_healthy(detector, healthy)
    raw = detector.finish_grid(_grid(residual(lesion)), None)
    standardised = detector.finish_grid(_grid(residual(lesion)), stats)
    assert raw.anomaly_map[4, 10, 5] > raw.anomaly_map[14, 14, 5]
    assert standardised.anomaly_map[14, 14, 5] > 5 * standardised.anomaly_map[4, 10, 5]
    # each healthy grid was standardised by the other three (leave one out), not by itself
    others = baselines.fit_zscore([g.residual for g in healthy[1:]], smooth=RESIDUAL_SMOOTH)
    expect = postprocess(baselines.zscore_map(healthy[0].residual, others, floor=RESIDUAL_FLOOR,
                                              one_sided=True),
                         healthy[0].foreground, detector.settings.median_kernel)
    np.testing.assert_allclose(healthy[0].anomaly_map, expect, rtol=1e-6)
    assert standardise_healthy(detector, [_grid(residual()) for _ in range(2)]) is None


def test_calibration_stores_residual_statistics_that_scoring_uses(tiny_model, example_data,
                                                                  tmp_path):
    from medidiff.api import calibrate

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    data = tmp_path / "data"
    data.mkdir()
    listing = json.loads((example_data / "dataset.json").read_text())
    training = [{"image": str((example_data / e["image"]).resolve())} for e in listing["training"]]
    listing.update(training=training, validation=training[:3])  # three healthy scans
    (data / "dataset.json").write_text(json.dumps(listing))
    calibration = calibrate(model, data, device="cpu", methods=("diffusion",), draws=1,
                            standardise=True)
    entry = calibration["entries"][0]
    assert entry["settings"]["standardise"] is True
    stats_file = model / entry["residual_stats"]
    assert stats_file.is_file() and stats_file.parent == model
    detector = AnomalyDetector.load(model, device="cpu", draws=1, standardise=True)
    stats = detector.residual_stats()
    assert set(stats) == {"mean", "std"} and stats["mean"].min() >= 0
    scan = _test_scans(example_data)[0]
    standardised = detector.predict_file(scan).anomaly_map
    raw = AnomalyDetector.load(model, device="cpu", draws=1, standardise=False)
    assert raw.residual_stats() is None
    assert not np.allclose(raw.predict_file(scan).anomaly_map, standardised)
    stats_file.write_bytes(b"not safetensors")
    with pytest.raises(ModelFolderError, match="safetensors"):
        AnomalyDetector.load(model, device="cpu", draws=1, standardise=True).predict_file(scan)
