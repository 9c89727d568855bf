"""Learned brain extraction (deepbet, an optional extra): the clear error without it, weights that
are checked and never unpickled as code, and the mask it makes on a raw example head."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import zipfile

import nibabel as nib
import numpy as np
import pytest

from medidiff.errors import InputError
from medidiff.preprocess import brain_extraction as be


def test_without_the_extra_the_error_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(be, "_MODULES", ("medidiff_no_such_module",))  # as if not installed
    assert not be.available("deepbet")
    with pytest.raises(InputError) as err:
        be.learned_brain_mask(np.zeros((8, 8, 8), np.float32), np.eye(4))
    assert str(err.value) == be.NEEDS_EXTRA
    assert "pip install 'medidiff[deepbet]'" in str(err.value)


def test_a_weights_file_with_another_hash_is_refused(tmp_path):
    fake = tmp_path / "model.pt"
    fake.write_bytes(b"not deepbet's network")
    with pytest.raises(InputError, match="SHA-256 pinned") as err:
        be.load_network(fake, be.WEIGHTS["model.pt"])
    assert err.value.path == str(fake)


def test_a_tampered_copy_of_the_real_weights_is_refused(tmp_path):
    pytest.importorskip("deepbet")
    copy = tmp_path / "model.pt"
    shutil.copy(be.weights_folder() / "model.pt", copy)
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0x01
    copy.write_bytes(bytes(data))
    with pytest.raises(InputError, match="SHA-256 pinned") as err:
        be.load_network(copy, be.WEIGHTS["model.pt"])
    assert err.value.path == str(copy) and "\n" not in str(err.value)


def _archive_calling(module: str, name: str) -> bytes:
    """A TorchScript-like archive whose pickle would call ``module.name``."""
    payload = f"\x80\x02c{module}\n{name}\nX\x04\x00\x00\x00echo\x85R.".encode("latin-1")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("net/data.pkl", payload)
    return buffer.getvalue()


def test_an_archive_with_code_in_its_pickle_is_refused_even_with_the_right_hash(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(_archive_calling("os", "system"))
    with pytest.raises(InputError, match="refusing the global os.system"):
        be.load_network(path, hashlib.sha256(path.read_bytes()).hexdigest())


def test_the_mask_comes_back_on_the_input_grid_whatever_its_axis_order(monkeypatch):
    """The networks see the closest RAS voxel order (as deepbet's ``as_closest_canonical``);
    the mask is returned in the array's own order."""
    seen = {}

    class Fake:
        def run_model(self, x):
            seen["x"] = x.copy()
            return x

        def postprocess(self, mask):
            return mask

    monkeypatch.setattr(be, "available", lambda method: True)
    monkeypatch.setattr(be, "weights_folder", lambda: "unused")
    monkeypatch.setattr(be, "_extractor", lambda folder: Fake())
    array = np.zeros((6, 7, 5), np.float32)
    array[1, 2, 3] = 1.0
    affine = np.array([[0, 0, -2.0, 0], [-1.5, 0, 0, 0], [0, 3.0, 0, 0], [0, 0, 0, 1]])  # P S L
    mask = be.learned_brain_mask(array, affine)
    assert mask.dtype == bool and mask.shape == array.shape
    assert np.array_equal(mask, array > 0.5)
    canonical = nib.as_closest_canonical(nib.Nifti1Image(array, affine)).get_fdata()
    assert np.array_equal(seen["x"], canonical)


def test_deepbet_finds_the_brain_of_a_raw_example_head(tmp_path):
    pytest.importorskip("deepbet")
    from medidiff.data.raw import make_raw_dataset
    from medidiff.io.read import load_image

    make_raw_dataset(tmp_path, seed=5, subjects=4)
    entry = json.loads((tmp_path / "dataset.json").read_text())["training"][0]
    image, affine = load_image(tmp_path / entry["image"])
    truth = load_image(tmp_path / entry["brain"], labels=True)[0][0] > 0.5
    mask = be.learned_brain_mask(image[0], affine)
    assert mask.shape == truth.shape
    dice = 2 * (mask & truth).sum() / (mask.sum() + truth.sum())
    assert dice > 0.9, f"Dice {dice:.3f} on {entry['image']} ({entry['orientation']})"


def test_skull_strip_deepbet_without_the_extra_is_refused_before_any_scan(monkeypatch):
    from medidiff.config import PreprocessConfig
    from medidiff.errors import ConfigError
    from medidiff.preprocess.pipeline import Preprocessor

    monkeypatch.setattr(be, "_MODULES", ("medidiff_no_such_module",))
    cfg = PreprocessConfig(registration="affine", skull_strip="deepbet")
    with pytest.raises(ConfigError, match=r"pip install 'medidiff\[deepbet\]'"):
        Preprocessor(cfg)


def test_skull_strip_deepbet_is_for_t1_models():
    from medidiff.config import Config

    with pytest.raises(ValueError, match="T1 heads only, not t2"):
        Config.model_validate({"task": "anomaly", "data": {"contrasts": ["t2"]},
                               "preprocess": {"registration": "affine",
                                              "skull_strip": "deepbet"}})


def test_a_learned_mask_makes_the_head_a_brain_registered_to_the_template_brain(monkeypatch):
    """The preprocessing around the network (which is stood in for by the true brain mask):
    the head is stripped on its own grid, registered as a brain, and its own mask, not the
    template's, comes back on the scan's grid."""
    from medidiff.config import PreprocessConfig
    from medidiff.preprocess.pipeline import Preprocessor
    from tests.test_preprocess import _posed_head

    image, affine, brain, _ = _posed_head()
    calls = []

    def stand_in(array, aff, method, source=None):
        calls.append(method)
        assert np.array_equal(array, image)  # the raw head, before bias correction
        return brain

    monkeypatch.setattr(be, "available", lambda method="deepbet": True)
    monkeypatch.setattr(be, "learned_brain_mask", stand_in)
    cfg = PreprocessConfig(registration="affine", skull_strip="deepbet", bias_correction="n4")
    result = Preprocessor(cfg).run(image, affine, "head.nii.gz")
    assert calls == ["deepbet"] and result.kind == "brain"
    assert not result.failures, (result.failures, result.qc)
    assert result.image[result.brain == 0].max() == 0  # nothing outside the learned mask
    back = result.to_native(result.brain.astype(np.float32), nearest=True) > 0
    dice = 2 * np.logical_and(back, brain).sum() / (back.sum() + brain.sum())
    assert dice > 0.95, dice  # not eroded: the scan's own brain


def test_skull_strip_deepbet_on_a_raw_example_head_passes_quality_control(tmp_path):
    pytest.importorskip("deepbet")
    from medidiff.config import PreprocessConfig
    from medidiff.data.raw import make_raw_dataset
    from medidiff.io.read import load_image
    from medidiff.preprocess.pipeline import Preprocessor

    make_raw_dataset(tmp_path, seed=6, subjects=4)
    entry = json.loads((tmp_path / "dataset.json").read_text())["training"][-1]
    image, affine = load_image(tmp_path / entry["image"])
    truth = load_image(tmp_path / entry["brain"], labels=True)[0][0] > 0.5
    cfg = PreprocessConfig(registration="affine", skull_strip="deepbet", bias_correction="n4")
    result = Preprocessor(cfg).run(image[0], affine, entry["image"])
    assert result.kind == "brain" and not result.failures, (result.failures, result.qc)
    back = result.to_native(result.brain.astype(np.float32), nearest=True) > 0
    dice = 2 * (back & truth).sum() / (back.sum() + truth.sum())
    assert dice > 0.9, f"Dice {dice:.3f} on {entry['image']}"
