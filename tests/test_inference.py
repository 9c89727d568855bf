"""The one inference path: results independent of batching and sharding, one failure report,
settings written beside the outputs, non-finite voxels refused (or repaired on request)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from tests.helpers import REPO, random_model, run_cli

# task -> (predictor name in medidiff.api, stochastic settings, example-data folder, count)
TASKS = {
    "anomaly": ("AnomalyDetector", dict(sampler="ddim", eta=1.0, steps=2, draws=2),
                "train/images", 3),
    "denoise": ("Denoiser", dict(eta=1.0, steps=2, samples=2), "enhance/noisy05", 2),
    "superres": ("SuperResolver", dict(eta=1.0, steps=2, samples=2), "enhance/lowres4", 2),
    "segment": ("Segmenter", dict(eta=1.0, steps=2, samples=3), "train/images", 3),
}


def _inputs(example_data: Path, folder: str, count: int, out: Path | None = None) -> list[Path]:
    """``count`` scans of an example-data folder; with ``out``, short slabs of them (12 slices,
    cheap to run) written there, as many as asked even where the folder holds fewer scans."""
    scans = sorted((example_data / folder).glob("*.nii.gz"))
    if out is None:
        return scans[:count]
    out.mkdir(parents=True, exist_ok=True)
    slabs = []
    for i in range(count):
        image = nib.load(scans[i % len(scans)])
        start = image.shape[2] // 2 - 6 + 12 * (i // len(scans))
        slabs.append(out / f"slab{i}.nii.gz")
        nib.save(image.slicer[:, :, start:start + 12], slabs[-1])
    return slabs


def _live_model(folder: Path, task: str) -> Path:
    """A cpu-tiny model folder whose every weight is random (MONAI zero-initialises the output
    layer, which would make a conditional model's samples independent of their noise)."""
    import torch

    from medidiff.config import load_config
    from medidiff.models.folder import build_network, save_model_folder
    from medidiff.tasks.registry import get_task

    cfg = load_config(REPO / "configs" / task / "cpu-tiny.yaml")
    torch.manual_seed(0)
    state = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v
             for k, v in build_network(cfg, get_task(task)).state_dict().items()}
    return save_model_folder(folder, cfg, state, {"steps": 0})


def _outputs(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.nii.gz"))}


@pytest.mark.parametrize("task", list(TASKS))
def test_outputs_do_not_depend_on_batch_size_or_sharding(task, tmp_path, example_data):
    import medidiff.api

    name, settings, folder, count = TASKS[task]
    predictor_class = getattr(medidiff.api, name)
    model = _live_model(tmp_path / "model", task)
    inputs = _inputs(example_data, folder, count, tmp_path / "inputs")

    def run(out: Path, batch_size: int | None, parts: int) -> dict[str, bytes]:
        predictor = predictor_class.load(model, device="cpu", batch_size=batch_size, **settings)
        for part in range(parts):
            outcomes = predictor.predict_files(inputs, out, part_id=part, num_parts=parts)
            assert all(o.status == "done" for o in outcomes), outcomes
        return _outputs(out)

    reference = run(tmp_path / "default", None, 1)
    assert len(reference) >= count
    assert run(tmp_path / "batch1", 1, 1) == reference
    assert run(tmp_path / "parts", None, count) == reference  # one scan per part
    # and the noise is not the same for every draw: two seeds give different results
    other = predictor_class.load(model, device="cpu", seed=1, **settings)
    other.predict_files(inputs[:1], tmp_path / "seed1")
    first = sorted(reference)[0]
    assert (tmp_path / "seed1" / first).read_bytes() != reference[first]


def test_every_inference_command_writes_its_resolved_settings(tiny_model, example_data,
                                                             tmp_path):
    scan = _inputs(example_data, "test/images", 1)[0]
    code, _, err = run_cli("anomaly", "score", "--model", str(tiny_model), "--out",
                           str(tmp_path / "o"), "--no-tracking", "--draws", "1", "--batch-size",
                           "7", str(scan))
    assert code == 0, err
    written = json.loads((tmp_path / "o" / "score_settings.json").read_text())
    assert written["draws"] == 1 and written["batch_size"] == 7 and written["method"] == "diffusion"
    assert written["model"] == str(tiny_model)
    assert "part_id" not in written  # the file is the same for any split of the inputs


def test_denoise_reports_each_failure_once(tmp_path):
    model = random_model(tmp_path / "model", "denoise")
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not a nifti file at all")
    code, _, err = run_cli("denoise", "--model", str(model), "--out", str(tmp_path / "o"),
                           "--no-tracking", str(bad))
    assert code == 2 and "Traceback" not in err
    assert sum("bad.nii.gz" in line for line in err.splitlines()) == 1, err
    assert err.strip().splitlines()[-1] == "0 enhanced, 0 skipped (outputs exist), 1 failed"


def _inf_plane_scan(example_data: Path, tmp_path: Path) -> Path:
    source = nib.load(_inputs(example_data, "test/images", 1)[0])
    data = np.asarray(source.dataobj, np.float32).copy()
    data[:, :, data.shape[2] // 2] = np.inf  # one whole plane, well under 0.5% of the voxels
    path = tmp_path / "inf.nii.gz"
    nib.save(nib.Nifti1Image(data, source.affine), path)
    return path


def test_a_plane_of_inf_is_refused_unless_repair_is_asked(tiny_model, example_data, tmp_path):
    scan = _inf_plane_scan(example_data, tmp_path)
    plane = int(np.prod(nib.load(scan).shape[:2]))
    code, _, err = run_cli("anomaly", "score", "--model", str(tiny_model), "--out",
                           str(tmp_path / "o"), "--no-tracking", "--draws", "1", str(scan))
    assert code == 2 and f"{plane} NaN/Inf voxels" in err and "inf.nii.gz" in err, err
    assert not list((tmp_path / "o").glob("inf_*"))
    code, _, err = run_cli("anomaly", "score", "--model", str(tiny_model), "--out",
                           str(tmp_path / "r"), "--no-tracking", "--draws", "1",
                           "--repair-nonfinite", str(scan))
    assert code == 0 and "replaced" in err and str(plane) in err, err
    amap = nib.load(tmp_path / "r" / "inf_anomaly.nii.gz").get_fdata()
    assert np.isfinite(amap).all()
    assert "repaired_voxels" in (tmp_path / "r" / "scores.csv").read_text()


def test_calibrate_method_calibrates_only_that_method(tiny_model, example_data, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    meta = yaml.safe_load((model / "model.yaml").read_text())
    for entry in meta["calibration"]["entries"]:
        entry["voxel_threshold"] = 123.0  # a value no calibration would choose
    (model / "model.yaml").write_text(yaml.safe_dump(meta))
    code, _, err = run_cli("anomaly", "calibrate", "--model", str(model), "--data",
                           str(example_data), "--no-tracking", "--method", "threshold")
    assert code == 0, err
    entries = yaml.safe_load((model / "model.yaml").read_text())["calibration"]["entries"]
    by_method = {e["settings"]["method"]: e["voxel_threshold"] for e in entries}
    assert set(by_method) == {"diffusion", "zscore", "threshold"}
    assert by_method["diffusion"] == 123.0 and by_method["zscore"] == 123.0
    assert by_method["threshold"] != 123.0


def test_array_input_needs_no_temporary_file(tiny_model, example_data, monkeypatch):
    import tempfile

    from medidiff.api import AnomalyDetector

    def refuse(*args, **kwargs):
        raise AssertionError("a temporary file was made")

    detector = AnomalyDetector.load(tiny_model, device="cpu", draws=1)
    source = nib.load(_inputs(example_data, "test/images", 1)[0])
    monkeypatch.setattr(tempfile, "TemporaryDirectory", refuse)
    monkeypatch.setattr(tempfile, "NamedTemporaryFile", refuse)
    result = detector.predict_array(np.asarray(source.dataobj), source.affine)
    assert result.anomaly_map.shape == source.shape
    np.testing.assert_allclose(result.affine, source.affine)
