"""The per-case pictures and the evaluation's summary: one readable style for every task."""

from __future__ import annotations

import json
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest

from medidiff.preprocess.figures import qc_figure
from medidiff.report import png_bytes
from medidiff.tasks.anomaly.evaluation import summary_picture
from medidiff.tasks.anomaly.figures import anomaly_figure
from medidiff.tasks.enhance.figures import enhance_figure
from medidiff.tasks.segment.figures import segment_figure

SHAPE = (32, 36, 24)
MIN_SLICE_PX = 256


def _phantom(seed: int = 0):
    rng = np.random.default_rng(seed)
    x, y, z = np.indices(SHAPE)
    brain = ((x - 16) / 13) ** 2 + ((y - 18) / 15) ** 2 + ((z - 12) / 10) ** 2 < 1
    lesion = (x - 20) ** 2 + (y - 12) ** 2 + (z - 13) ** 2 < 12
    image = np.clip(brain * 0.6 + 0.3 * lesion + rng.normal(0, 0.02, SHAPE), 0, 1)
    return image.astype(np.float32), brain, lesion, rng


def _anomaly_grid():
    image, brain, lesion, rng = _phantom()
    amap = (4.0 * lesion + np.abs(rng.normal(0, 0.5, SHAPE)) * brain).astype(np.float32)
    return SimpleNamespace(image=image, recon=np.clip(image - 0.3 * lesion, 0, 1),
                           anomaly_map=amap, foreground=brain, score=3.1), lesion


def _anomaly(score=3.1, flagged=True, **kwargs):
    grid, lesion = _anomaly_grid()
    return anomaly_figure(grid, threshold=2.0, case="sub-01", score=score, flagged=flagged,
                          scan_threshold=2.5, method="diffusion", spacing=(2.0, 2.0, 2.0),
                          lesion=lesion, **kwargs)


def _enhance(task="denoise"):
    image, brain, _, rng = _phantom(1)
    noisy = np.clip(image + rng.normal(0, 0.05, SHAPE), 0, 1).astype(np.float32)
    info = ({"sigma": 0.05, "sigma_fraction": 0.08, "sigma_estimated": True, "zero_shot": False,
             "class_label": 2, "nfe_per_slice": 20} if task == "denoise" else
            {"factors": [1, 1, 2], "class_label": 0, "trained_scale": 2, "nfe_per_slice": 20})
    return enhance_figure(SimpleNamespace(before=noisy, after=image, info=info), 2,
                          case="sub-02", task=task, spacing=(2.0, 2.0, 2.0))


def _segment(mean=0.01):
    image, brain, lesion, rng = _phantom(2)
    labels = lesion.astype(np.uint8)
    uncertainty = np.clip(np.abs(rng.normal(0, 0.05, SHAPE)) + 0.4 * lesion, 0, 1)
    grid = SimpleNamespace(image=image, labels=labels, uncertainty=uncertainty.astype(np.float32))
    return segment_figure(grid, 2, case="sub-03", mean_uncertainty=mean, spacing=(2.0, 2.0, 2.0),
                          reference=lesion)


def _qc():
    image, brain, _, _ = _phantom(3)
    return qc_figure(image * 900, brain.astype(np.uint8), "sub-04")


FIGURES = {"anomaly": (_anomaly, 3), "denoise": (_enhance, 3),
           "super-resolve": (lambda: _enhance("super-resolve"), 3), "segment": (_segment, 3),
           "qc": (_qc, 1)}


def _monotone_ramp(rgb: np.ndarray, min_length: int = 150) -> bool:
    """Some column holds a run of at least ``min_length`` rows whose luminance changes in one
    direction only, through many distinct levels: a colour bar."""
    luminance = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    for column in luminance.T[rgb.shape[1] // 2:]:
        steps = np.sign(np.diff(column))
        for direction in (-1, 1):
            bad = np.flatnonzero(steps == -direction)
            edges = np.concatenate([[-1], bad, [steps.size]])
            longest = int(np.argmax(np.diff(edges)))
            start, stop = edges[longest] + 1, edges[longest + 1] + 1
            run = column[start:stop]
            if run.size >= min_length and np.unique(run.round()).size >= 60 \
                    and np.ptp(run) > 120:
                return True
    return False


@pytest.mark.parametrize("kind", list(FIGURES))
def test_every_figure_is_a_large_rgb_array(kind):
    make, rows = FIGURES[kind]
    figure = make()
    assert figure.dtype == np.uint8 and figure.ndim == 3 and figure.shape[2] == 3
    columns = 3
    assert figure.shape[0] >= rows * MIN_SLICE_PX and figure.shape[1] >= columns * MIN_SLICE_PX
    assert figure.std() > 10  # not blank
    assert png_bytes(figure)[:4] == b"\x89PNG"


@pytest.mark.parametrize("kind", ["anomaly", "denoise", "super-resolve", "segment"])
def test_every_map_has_a_colour_bar(kind):
    assert _monotone_ramp(FIGURES[kind][0]())


def test_plain_slices_have_no_colour_bar():
    assert not _monotone_ramp(_qc())


def test_the_anomaly_title_follows_the_score_and_the_flag():
    flagged, calm = _anomaly(3.1, True), _anomaly(1.2, False)
    assert flagged.shape == calm.shape
    differs = np.flatnonzero((flagged != calm).any(axis=(1, 2)))
    assert differs.size and differs.max() < 70  # the title text, nothing below it
    assert not np.array_equal(_anomaly(3.1, True), _anomaly(3.1, True, ood=["too bright"]))


def test_the_enhance_and_segment_titles_follow_their_numbers():
    assert not np.array_equal(_segment(0.01)[:60], _segment(0.2)[:60])
    image, _, _, _ = _phantom(1)
    result = SimpleNamespace(before=image, after=image, info={"sigma": 0.05, "sigma_fraction": 0.1})
    other = SimpleNamespace(before=image, after=image, info={"sigma": 0.02, "sigma_fraction": 0.04})
    assert not np.array_equal(enhance_figure(result)[:60], enhance_figure(other)[:60])


def test_a_2d_anomaly_figure_without_reconstruction():
    grid, _ = _anomaly_grid()
    flat = SimpleNamespace(image=grid.image[:, :, 12], recon=None,
                           anomaly_map=grid.anomaly_map[:, :, 12],
                           foreground=grid.foreground[:, :, 12], score=1.0)
    figure = anomaly_figure(flat, threshold=None, case="slice")
    assert figure.dtype == np.uint8 and figure.shape[0] >= MIN_SLICE_PX
    assert _monotone_ramp(figure)


def _save(array, path):
    nib.save(nib.Nifti1Image(np.asarray(array, np.float32), np.eye(4)), str(path))


def test_summary_figure_renders_from_small_synthetic_cases(tmp_path):
    labels = tmp_path / "labels"
    labels.mkdir()
    folders = {}
    for m, method in enumerate(("diffusion", "zscore")):
        pred = tmp_path / method
        pred.mkdir()
        rows = ["case,score,flagged"]
        for i in range(4):
            image, brain, lesion, rng = _phantom(10 + i)
            lesion = lesion & (i < 2)
            amap = ((2.0 - m) * lesion + np.abs(rng.normal(0, 0.5, SHAPE))) * brain
            _save(amap, pred / f"c{i}_anomaly.nii.gz")
            if m == 0:
                _save(lesion, labels / f"c{i}.nii.gz")
            rows.append(f"c{i},{float(amap.max()):.4f},0")
        (pred / "scores.csv").write_text("\n".join(rows) + "\n")
        (pred / "score_settings.json").write_text(json.dumps({"method": method,
                                                              "scan_threshold": 2.0}))
        folders[method] = pred
    both = summary_picture(folders, labels)
    one = summary_picture({"diffusion": folders["diffusion"]}, labels)
    assert both.dtype == np.uint8 and both.shape[2] == 3 and both.shape[0] >= 400
    assert both.shape[1] > one.shape[1]  # one panel of scan scores per method
