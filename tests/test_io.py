"""Reading scans (NIfTI, DICOM series, PNG), refusing bad ones in one line, writing atomically."""

from __future__ import annotations

import gzip
import io
import os
import shutil
import struct
import tempfile
import time
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from medidiff.errors import InputError
from medidiff.io.discover import case_name, discover_inputs
from medidiff.io.read import load_image, reader_for
from medidiff.io.validate import check_voxels, repair_nonfinite, validate_input
from medidiff.io.write import atomic_write_bytes, atomic_write_text, safe_output_path, save_nifti
from tests.helpers import huge_header

RNG = np.random.default_rng(0)


def _volume(shape=(6, 7, 8)) -> np.ndarray:
    return RNG.random(shape).astype(np.float32)


def _nifti(path: Path, data: np.ndarray, affine=None) -> Path:
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)
    return path


def _assert_refused(path, *words: str, fn=load_image) -> InputError:
    """`fn(path)` raises InputError: one line, naming the file and the problem."""
    with pytest.raises(InputError) as info:
        fn(path)
    message = str(info.value)
    assert "\n" not in message and "\r" not in message
    assert Path(path).name in message
    for word in words:
        assert word in message
    return info.value


# -- NIfTI ---------------------------------------------------------------------------------------


def test_nifti_round_trip_keeps_shape_affine_and_values(tmp_path):
    affine = np.array([[0, -2.0, 0, 10], [1.5, 0, 0, -20], [0, 0, 3.0, 5], [0, 0, 0, 1]])
    data = _volume()
    out = save_nifti(data.astype(np.float64), affine, tmp_path / "case.nii.gz")
    array, loaded_affine = load_image(out)
    assert array.dtype == np.float32 and array.shape == (1, 6, 7, 8)
    np.testing.assert_allclose(array[0], data, rtol=1e-6)
    np.testing.assert_allclose(loaded_affine, affine, atol=1e-5)
    header = nib.load(out).header
    assert header.get_data_dtype() == np.float32
    assert (int(header["sform_code"]), int(header["qform_code"])) == (1, 1)
    assert header["descrip"].tobytes().strip(b"\0") == b""


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int32])
def test_save_nifti_keeps_integer_types(tmp_path, dtype):
    labels = (RNG.random((5, 6, 7)) * 4).astype(dtype)
    out = save_nifti(labels, np.eye(4), tmp_path / "seg.nii.gz")
    img = nib.load(out)
    assert img.get_data_dtype() == dtype
    np.testing.assert_array_equal(np.asarray(img.dataobj), labels)


def test_save_nifti_bool_becomes_uint8_and_channel_is_dropped(tmp_path):
    mask = RNG.random((1, 5, 6, 7)) > 0.5
    img = nib.load(save_nifti(mask, np.eye(4), tmp_path / "mask.nii"))
    assert img.shape == (5, 6, 7) and img.get_data_dtype() == np.uint8


def test_save_nifti_gz_is_deterministic(tmp_path):
    data = _volume()
    a = save_nifti(data, np.eye(4), tmp_path / "a.nii.gz").read_bytes()
    time.sleep(1.1)  # a gzip mtime would differ now
    b = save_nifti(data, np.eye(4), tmp_path / "b.nii.gz").read_bytes()
    assert a == b and a[4:8] == b"\0\0\0\0"


def test_nifti_with_a_header_extension_loads(tmp_path):
    img = nib.Nifti1Image(_volume(), np.eye(4))
    img.header.extensions.append(nib.nifti1.Nifti1Extension("comment", b"made by a scanner " * 20))
    nib.save(img, tmp_path / "ext.nii.gz")
    assert load_image(tmp_path / "ext.nii.gz")[0].shape == (1, 6, 7, 8)


def test_2d_nifti_and_trailing_singleton_4d_load(tmp_path):
    two_d = _nifti(tmp_path / "slice.nii", RNG.random((9, 10)).astype(np.float32))
    assert load_image(two_d)[0].shape == (1, 9, 10)
    four_d = _nifti(tmp_path / "vol4.nii.gz", _volume()[..., None])
    assert load_image(four_d)[0].shape == (1, 6, 7, 8)


# -- DICOM ---------------------------------------------------------------------------------------


def _copy_dicom(name: str, folder: Path) -> Path:
    folder.mkdir(exist_ok=True)
    return Path(shutil.copy(get_testdata_file(name), folder))


def _mr_series(folder: Path, depths=(0, 1, 2, 3), spacing=2.0) -> list[np.ndarray]:
    """Slices of MR_small at z0 + spacing * depth; files named in reverse order of depth."""
    folder.mkdir()
    template = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    series_uid, pixels = generate_uid(), []
    for i, depth in enumerate(depths):
        ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
        x, y, z = (float(v) for v in template.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, z + spacing * depth]
        ds.InstanceNumber, ds.SeriesInstanceUID, ds.SOPInstanceUID = (
            i + 1,
            series_uid,
            generate_uid(),
        )
        slice_pixels = (ds.pixel_array.astype(np.int32) + 100 * i).astype(np.int16)
        ds.PixelData = slice_pixels.tobytes()
        pixels.append(slice_pixels)
        ds.save_as(folder / f"im{len(depths) - i:03d}.dcm")
    return pixels


@pytest.mark.parametrize(
    "name, size, spacing", [("MR_small.dcm", 64, 0.3125), ("CT_small.dcm", 128, 0.661468)]
)
def test_bundled_dicom_file_reads_as_a_series(tmp_path, name, size, spacing):
    copied = _copy_dicom(name, tmp_path / "series")
    array, affine = load_image(tmp_path / "series")
    assert array.shape == (1, size, size) and array.dtype == np.float32
    ds = pydicom.dcmread(copied)
    lps = np.array([float(v) for v in ds.ImagePositionPatient])
    np.testing.assert_allclose(affine[:3, 3], lps * [-1, -1, 1], atol=1e-4)  # LPS -> RAS
    np.testing.assert_allclose(np.abs(np.diag(affine)[:2]), [spacing, spacing], rtol=1e-5)


def test_dicom_slices_stack_by_instance_number_with_slice_spacing(tmp_path):
    pixels = _mr_series(tmp_path / "mr", spacing=2.0)
    array, affine = load_image(tmp_path / "mr")
    assert array.shape == (1, 64, 64, 4)
    for k, slice_pixels in enumerate(pixels):  # MONAI swaps rows/columns: axis 0 is x
        np.testing.assert_array_equal(array[0, :, :, k], slice_pixels.T)
    np.testing.assert_allclose(affine[:3, 2], [0, 0, 2.0], atol=1e-4)


def test_case_name_of_dicom_folder_ignores_patient_fields(tmp_path):
    copied = _copy_dicom("MR_small.dcm", tmp_path / "scan-07")
    ds = pydicom.dcmread(copied)
    ds.PatientName, ds.PatientID = "DOE^JANE", "PID123456"
    ds.save_as(copied)
    assert case_name(tmp_path / "scan-07") == "scan-07"
    array, affine = load_image(tmp_path / "scan-07")
    out = save_nifti(array, affine, tmp_path / "out.nii.gz")
    raw = gzip.decompress(out.read_bytes())
    assert b"DOE" not in raw and b"PID123456" not in raw


def test_single_dicom_image_without_geometry_loads_like_a_projection(tmp_path):
    copied = _copy_dicom("MR_small.dcm", tmp_path / "xray")
    ds = pydicom.dcmread(copied)
    del ds.ImageOrientationPatient, ds.ImagePositionPatient
    ds.save_as(copied)
    array, affine = load_image(tmp_path / "xray")
    assert array.shape == (1, 64, 64) and np.all(np.isfinite(affine))


def test_dicom_folder_with_two_series_is_refused_without_identifiers(tmp_path):
    _copy_dicom("MR_small.dcm", tmp_path / "mixed")
    _copy_dicom("CT_small.dcm", tmp_path / "mixed")
    error = _assert_refused(tmp_path / "mixed", "2 DICOM series", fn=validate_input)
    uids = {
        pydicom.dcmread(get_testdata_file(n)).SeriesInstanceUID
        for n in ("MR_small.dcm", "CT_small.dcm")
    }
    assert not any(uid in str(error) for uid in uids)


def test_dicom_series_with_a_missing_slice_is_refused(tmp_path):
    _mr_series(tmp_path / "gap", depths=(0, 1, 3, 4))
    _assert_refused(tmp_path / "gap", "unevenly spaced")


def test_dicom_without_pixel_data_is_refused(tmp_path):
    copied = _copy_dicom("MR_small.dcm", tmp_path / "nopix")
    ds = pydicom.dcmread(copied)
    del ds.PixelData
    ds.save_as(copied)
    _assert_refused(tmp_path / "nopix", "no DICOM image with pixel data")


# -- PNG -----------------------------------------------------------------------------------------

_RGB = (RNG.random((8, 12, 3)) * 255).astype(np.uint8)
_LUMA = _RGB @ np.array([0.299, 0.587, 0.114])


def _png_cases():
    grey = (RNG.random((8, 12)) * 255).astype(np.uint8)
    deep = (RNG.random((8, 12)) * 60000).astype(np.uint16)
    rgba = np.concatenate([_RGB, np.full((8, 12, 1), 128, np.uint8)], axis=-1)
    palette = Image.fromarray(_RGB, "RGB").quantize(16)
    palette_luma = np.asarray(palette.convert("RGB")) @ np.array([0.299, 0.587, 0.114])
    return {
        "L": (Image.fromarray(grey, "L"), grey),
        "RGB": (Image.fromarray(_RGB, "RGB"), _LUMA),
        "RGBA": (Image.fromarray(rgba, "RGBA"), _LUMA),
        "P": (palette, palette_luma),
        "I;16": (Image.fromarray(deep), deep),
    }


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "I;16"])
def test_png_modes_load_as_one_grey_channel(tmp_path, mode):
    image, expected = _png_cases()[mode]
    assert image.mode == mode
    image.save(tmp_path / "x.png")
    array, affine = load_image(tmp_path / "x.png")
    assert array.shape == (1, 12, 8)  # MONAI's PILReader: axis 0 is x (width)
    np.testing.assert_allclose(array[0], np.asarray(expected, dtype=float).T, atol=0.6)
    np.testing.assert_array_equal(affine, np.eye(4))


def test_png_too_large_is_refused_before_decoding(tmp_path):
    path = tmp_path / "wide.png"
    Image.new("1", (9000, 9000)).save(path)
    huge = tmp_path / "bomb.png"
    Image.new("1", (15000, 15000)).save(huge)  # beyond PIL's own bomb limit
    _assert_refused(huge, "too many pixels", fn=validate_input)
    _assert_refused(path, "81000000 pixels", "the limit is", fn=validate_input)


# -- bad input: one line naming the file ---------------------------------------------------------


def test_missing_file_and_empty_folder(tmp_path):
    _assert_refused(tmp_path / "nope.nii.gz", "does not exist")
    _assert_refused(
        tmp_path / "nope.nii.gz", "does not exist", fn=lambda p: discover_inputs([p])
    )
    (tmp_path / "empty").mkdir()
    _assert_refused(
        tmp_path / "empty",
        "holds no NIfTI, PNG or DICOM series",
        fn=lambda p: discover_inputs([p]),
    )


def test_truncated_and_garbage_nifti(tmp_path):
    full = _nifti(tmp_path / "full.nii.gz", _volume((20, 20, 20))).read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(full[: len(full) // 2])
    _assert_refused(tmp_path / "cut.nii.gz", "truncated or corrupt")
    (tmp_path / "head.nii.gz").write_bytes(full[:60])
    _assert_refused(tmp_path / "head.nii.gz", "not a readable NIfTI")
    (tmp_path / "junk.nii.gz").write_bytes(RNG.bytes(700))
    _assert_refused(tmp_path / "junk.nii.gz", "not a readable NIfTI")
    raw = _nifti(tmp_path / "full.nii", _volume((20, 20, 20))).read_bytes()
    (tmp_path / "cut.nii").write_bytes(raw[:2000])
    _assert_refused(tmp_path / "cut.nii", "truncated", fn=validate_input)


@pytest.mark.parametrize(
    "shape, words",
    [((5, 6, 7, 3), "has 4 dimensions; expected a 2D or 3D image"), ((40,), "has 1 dimension")],
)
def test_4d_and_1d_images_are_refused(tmp_path, shape, words):
    path = _nifti(tmp_path / "img.nii.gz", RNG.random(shape).astype(np.float32))
    _assert_refused(path, words, fn=validate_input)


def test_nan_and_constant_images_are_refused(tmp_path):
    data = _volume()
    data[1, 2, 3], data[2, 2, 2] = np.nan, np.inf
    _assert_refused(_nifti(tmp_path / "nan.nii.gz", data), "contains 2 NaN/Inf voxels")
    _assert_refused(_nifti(tmp_path / "flat.nii.gz", np.ones((4, 5, 6), np.float32)), "constant")


def test_an_empty_label_map_is_a_label_map(tmp_path):
    """A healthy scan's lesion mask is all background: refused as a scan, read as labels."""
    from medidiff.io.read import load_image

    path = _nifti(tmp_path / "mask.nii.gz", np.zeros((4, 5, 6), np.float32))
    with pytest.raises(InputError, match="constant"):
        load_image(path)
    array, _ = load_image(path, labels=True)
    assert array.shape == (1, 4, 5, 6) and not array.any()


def test_check_voxels_accepts_tensors_from_pipelines():
    import torch

    with pytest.raises(InputError, match="contains 1 NaN/Inf voxels"):
        check_voxels("scan.nii.gz", torch.tensor([[0.0, float("nan")], [1.0, 2.0]]))
    check_voxels("scan.nii.gz", torch.tensor([[0.0, 1.0]]))


def test_a_plane_of_inf_is_refused_with_its_count(tmp_path):
    data = _volume()
    data[:, :, 4] = np.inf  # one whole plane: 6 x 7 voxels
    error = _assert_refused(_nifti(tmp_path / "inf_plane.nii.gz", data), "42 NaN/Inf voxels",
                            "non-finite", "--repair-nonfinite")
    assert "42" in str(error)
    with pytest.raises(InputError, match="contains 42 NaN/Inf voxels"):
        check_voxels("scan.nii.gz", data)
    minus = _volume()
    minus[0] = -np.inf
    with pytest.raises(InputError, match="contains 56 NaN/Inf voxels"):
        check_voxels("scan.nii.gz", minus)


def test_all_nan_scan_is_refused_even_when_repaired():
    data = np.full((4, 5, 6), np.nan, np.float32)
    with pytest.raises(InputError, match="contains 120 NaN/Inf voxels"):
        check_voxels("scan.nii.gz", data)
    with pytest.raises(InputError, match="constant"):  # repaired to all zeros: no contrast
        check_voxels("scan.nii.gz", data, repair=True)


def test_check_voxels_with_repair_returns_the_count():
    data = _volume()
    data[:, :, 4] = np.inf
    data[0, 0, 0] = np.nan
    before = data.copy()
    assert check_voxels("scan.nii.gz", data, repair=True) == 43
    np.testing.assert_array_equal(data, before)  # the caller repairs, not the check
    assert check_voxels("scan.nii.gz", _volume(), repair=True) == 0
    assert check_voxels("scan.nii.gz", _volume()) == 0


def test_repair_nonfinite_uses_the_lowest_finite_value_and_keeps_its_input():
    data = np.array([[3.0, np.inf], [np.nan, -np.inf], [2.0, 5.0]], np.float32)
    before = data.copy()
    repaired, count = repair_nonfinite(data)
    assert count == 3
    assert repaired.dtype == np.float32
    np.testing.assert_array_equal(repaired, [[3.0, 2.0], [2.0, 2.0], [2.0, 5.0]])
    np.testing.assert_array_equal(data, before)  # NaN compares equal here: input untouched
    clean, none = repair_nonfinite(repaired)
    assert none == 0 and clean is not repaired
    np.testing.assert_array_equal(clean, repaired)
    zeros, count = repair_nonfinite(np.full((2, 3), np.nan))
    assert count == 6 and np.all(zeros == 0)


def test_zero_spacing_and_singular_affine_are_refused(tmp_path):
    img = nib.Nifti1Image(_volume(), np.diag([1.0, 1.0, 1.0, 1.0]))
    img.header["pixdim"][2] = 0.0
    nib.save(img, tmp_path / "flat.nii.gz")
    _assert_refused(tmp_path / "flat.nii.gz", "pixel spacing", fn=validate_input)
    img = nib.Nifti1Image(_volume(), np.eye(4))
    img.set_sform(np.array([[1.0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0], [0, 0, 0, 1]]), code=1)
    nib.save(img, tmp_path / "singular.nii.gz")
    _assert_refused(tmp_path / "singular.nii.gz", "singular affine", fn=validate_input)


@pytest.mark.parametrize("name", ["huge.nii", "huge.nii.gz"])
def test_absurd_declared_size_is_refused_without_allocating(tmp_path, name):
    path = huge_header(tmp_path / name)
    assert path.stat().st_size < 1024
    tracemalloc.start()
    started = time.perf_counter()
    try:
        _assert_refused(path, "1000000000000000 voxels")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - started < 2.0 and peak < 20 * 1024**2


def test_hostile_extension_in_small_gzip_is_refused_within_bounds(tmp_path):
    """An extension size of 7 makes nibabel read(-1): the whole decompressed stream."""
    buffer = io.BytesIO()
    header = nib.Nifti1Header()
    header.set_data_shape((4, 4, 4))
    header["vox_offset"] = 352 + 16
    header.write_to(buffer)
    raw = buffer.getvalue()[:348] + b"\x01\0\0\0" + struct.pack("<ii", 7, 0)
    path = tmp_path / "bomb.nii.gz"
    path.write_bytes(gzip.compress(raw + b"\0" * 64 * 1024**2, compresslevel=9))
    tracemalloc.start()
    try:
        _assert_refused(path, "not a readable NIfTI", fn=validate_input)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * 1024**2


def test_unsupported_suffix_and_single_dicom_file(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    _assert_refused(
        tmp_path / "notes.txt", "unsupported type", fn=lambda p: discover_inputs([p])
    )
    copied = _copy_dicom("MR_small.dcm", tmp_path / "d")
    _assert_refused(copied, "folder of its series", fn=lambda p: discover_inputs([p]))


def test_control_characters_in_a_file_name_stay_on_one_line(tmp_path):
    with pytest.raises(InputError) as info:
        validate_input(tmp_path / "bad\nname.nii.gz")
    assert "\n" not in str(info.value) and "bad\\nname.nii.gz" in str(info.value)


# -- discovery, names, output paths --------------------------------------------------------------


def test_discover_inputs_finds_files_and_series_one_level_deep(tmp_path):
    _nifti(tmp_path / "b.nii.gz", _volume())
    _nifti(tmp_path / "a.nii", _volume())
    Image.fromarray(_RGB).save(tmp_path / "c.png")
    _copy_dicom("MR_small.dcm", tmp_path / "series1")
    (tmp_path / "notes.txt").write_text("ignored")
    (tmp_path / "other").mkdir()
    _nifti(tmp_path / "other" / "deep.nii.gz", _volume())  # two levels down: not found
    _nifti(tmp_path / ".hidden.nii.gz", _volume())
    found = discover_inputs([tmp_path, tmp_path / "a.nii"])
    assert [p.name for p in found] == ["a.nii", "b.nii.gz", "c.png", "series1"]
    assert discover_inputs([tmp_path / "series1"]) == [tmp_path / "series1"]
    assert found == discover_inputs([tmp_path / "a.nii", tmp_path])


@pytest.mark.parametrize(
    "given, expected",
    [
        ("case.nii.gz", "case"),
        ("x.png", "x"),
        ("dir/sub-001.NII", "sub-001"),
        ("../x.nii.gz", "x"),
        ("../../etc/passwd.nii.gz", "passwd"),
        ("..nii.gz", "case"),
        ("a b;rm -rf*.nii.gz", "a_b_rm_-rf"),
        ("tab\there\x1b[31m.png", "tab_here_31m"),
        (".hidden.nii", "hidden"),
    ],
)
def test_case_name_is_sanitised(given, expected):
    name = case_name(given)
    assert name == expected
    assert name and "/" not in name and ".." not in name and name.isprintable()


def test_safe_output_path_refuses_escapes(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    assert safe_output_path(out, "case_anomaly.nii.gz") == out / "case_anomaly.nii.gz"
    for name in ["../x.nii.gz", "/etc/x.nii.gz", "a/../../x", ".", ""]:
        with pytest.raises(InputError):
            safe_output_path(out, name)
    (out / "link").symlink_to(tmp_path)
    with pytest.raises(InputError):
        safe_output_path(out, "link/x.nii.gz")


# -- atomic writes -------------------------------------------------------------------------------


def test_atomic_save_leaves_no_temporary_file(tmp_path):
    save_nifti(_volume(), np.eye(4), tmp_path / "a.nii.gz")
    atomic_write_text(tmp_path / "scores.csv", "case,score\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.nii.gz", "scores.csv"]
    assert (tmp_path / "scores.csv").read_text() == "case,score\n"


def test_failed_atomic_write_keeps_old_file_and_removes_temp(tmp_path, monkeypatch):
    target = atomic_write_bytes(tmp_path / "x.bin", b"old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["x.bin"]


def test_atomic_write_respects_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic_write_bytes(tmp_path / "x.bin", b"1")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


# -- MONAI pipelines and fuzzing -----------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::UserWarning")  # MONAI 1.6: nvImageCodec not installed
def test_reader_for_plugs_into_loadimaged(tmp_path):
    from monai.transforms import LoadImaged

    path = _nifti(tmp_path / "a.nii.gz", _volume())
    item = LoadImaged(keys="image", reader=reader_for(path), ensure_channel_first=True)(
        {"image": str(path)}
    )
    assert tuple(item["image"].shape) == (1, 6, 7, 8)


def _load_or_input_error(path: Path) -> None:
    try:
        array, affine = load_image(path)
    except InputError as e:
        assert "\n" not in str(e) and path.name in str(e)
    else:
        assert array.dtype == np.float32 and affine.shape == (4, 4)


_FUZZ = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_FUZZ
@given(data=st.binary(max_size=2048), suffix=st.sampled_from([".nii.gz", ".nii", ".png"]))
def test_random_bytes_load_or_raise_input_error(data, suffix):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"fuzz{suffix}"
        path.write_bytes(data)
        _load_or_input_error(path)


def _valid_bytes(suffix: str) -> bytes:
    buffer = io.BytesIO()
    if suffix == ".png":
        Image.fromarray(_RGB).save(buffer, format="PNG")
        return buffer.getvalue()
    raw = nib.Nifti1Image(_volume((4, 5, 6)), np.diag([1.0, 2, 3, 1])).to_bytes()
    return gzip.compress(raw, mtime=0) if suffix == ".nii.gz" else raw


@_FUZZ
@given(
    suffix=st.sampled_from([".nii.gz", ".nii", ".png"]),
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=6),
    cut=st.integers(0, 10**6),
)
def test_corrupted_valid_files_load_or_raise_input_error(suffix, flips, cut):
    data = bytearray(_valid_bytes(suffix))
    for where, value in flips:
        data[where % len(data)] = value
    data = data[: max(1, cut % (len(data) + 200))]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"flip{suffix}"
        path.write_bytes(bytes(data))
        _load_or_input_error(path)


def test_intensity_ceiling_keeps_what_is_brighter_than_healthy_tissue(tmp_path):
    """By default the 99.5th percentile maps to 1 and brighter voxels are clipped to it; with
    ``data.intensity_ceiling`` above 1 a hyperintense spot stays brighter than the tissue."""
    from medidiff.config import DataConfig
    from medidiff.data.transforms import volume_transforms

    volume = np.full((20, 20, 20), 100.0, dtype=np.float32)
    volume[:4] = 0.0  # background
    volume[10:12, 10:12, 10:12] = 180.0  # 8 voxels, under 0.5% of the scan
    path = tmp_path / "spot.nii.gz"
    nib.save(nib.Nifti1Image(volume, np.eye(4)), path)
    spot = (slice(None), slice(10, 12), slice(10, 12), slice(10, 12))
    for ceiling, expected in ((1.0, 1.0), (1.5, 1.5), (3.0, 1.8)):
        cfg = DataConfig(spatial_dims=3, size=[20, 20, 20], intensity_ceiling=ceiling)
        image = volume_transforms(cfg)({"image": str(path)})["image"]
        assert float(image[0, 12, 12, 12]) == pytest.approx(1.0)  # healthy tissue
        assert float(image[spot].min()) == pytest.approx(expected, rel=1e-4)
        assert float(image.min()) == 0.0
