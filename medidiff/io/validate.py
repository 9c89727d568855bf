"""Checking scans before (and right after) their voxels are read.

Every input is checked cheaply (headers only) before voxel data is read, so a hostile or broken
file ends in one `InputError` line instead of a traceback or an allocation its header asks for.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import logging
import math
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from PIL import Image

from medidiff.errors import InputError
from medidiff.io.discover import (
    _UNSUPPORTED,
    _dicom_candidates,
    _error,
    _is_dicom_file,
    _kind,
    _shown,
    _visible_entries,
)

# 1024**3 / 4 voxels is 1 GiB as float32: far above any scan we expect, far below an OOM kill.
MAX_VOXELS = 1024**3 // 4
MAX_PNG_PIXELS = 8192 * 8192  # below PIL's decompression-bomb warning (about 89 M pixels)
MAX_INTENSITY = 1e30  # beyond this, spans and products of voxel values overflow float32
MAX_HEADER_BYTES = 16 * 1024**2  # NIfTI header plus extensions (vox_offset)
_GZIP_MAX_RATIO = 1100  # deflate cannot expand more than about 1032:1


# -- cheap checks before loading ---------------------------------------------------------------


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence reader libraries' warnings and log lines: problems become one InputError line."""
    with warnings.catch_warnings(), _muted_logger("nibabel.global"):
        warnings.simplefilter("ignore")
        yield


@contextlib.contextmanager
def _muted_logger(name: str) -> Iterator[None]:
    logger = logging.getLogger(name)
    old = logger.disabled
    logger.disabled = True
    try:
        yield
    finally:
        logger.disabled = old


def same_grid(shape, affine, other_shape, other_affine) -> bool:
    """Whether two images lie on one voxel grid (shape, and affine within 0.001 mm): the
    test the contrasts of a case pass to be stacked voxel by voxel without registration."""
    return (tuple(int(s) for s in shape) == tuple(int(s) for s in other_shape)
            and np.allclose(np.asarray(affine, float), np.asarray(other_affine, float),
                            atol=1e-3))


def validate_input(path: str | Path) -> None:
    """Check a scan from its headers alone; raise InputError naming the file and the problem."""
    path = Path(path)
    if not path.exists():
        raise _error(path, "does not exist")
    if not (path.is_file() or path.is_dir()):  # a FIFO or device would block or never end
        raise _error(path, "is not a regular file or folder")
    kind = _kind(path)
    if kind is None:
        raise _error(path, _UNSUPPORTED)
    with _quiet():
        {"nifti": _validate_nifti, "png": _validate_png, "dicom": _validate_dicom}[kind](path)


def spatial_ndim(path: str | Path) -> int:
    """2 for a 2D image (PNG, 2D NIfTI, one-slice DICOM series), 3 for a volume (from headers)."""
    path = Path(path)
    kind = _kind(path)
    if kind == "png":
        return 2
    if kind == "dicom":
        return 2 if len(_dicom_candidates(path)) == 1 else 3
    with _quiet():
        shape = [int(d) for d in nib.load(str(path)).header.get_data_shape()]
    while len(shape) > 2 and shape[-1] == 1:
        shape.pop()
    return min(len(shape), 3)


def _check_shape(
    path: Path, shape: Sequence[int], limit: int = MAX_VOXELS, unit: str = "voxels"
) -> tuple[int, ...]:
    """The spatial shape (trailing singleton dimensions beyond the third dropped), checked."""
    dims = [int(d) for d in shape]
    while len(dims) > 3 and dims[-1] == 1:
        dims.pop()
    if not dims or min(dims) < 1:
        raise _error(path, f"has an empty dimension (shape {tuple(dims)})")
    if len(dims) > 3 or sum(d > 1 for d in dims) < 2:
        n = len(dims) if len(dims) > 3 else sum(d > 1 for d in dims)
        raise _error(path, f"has {n} dimension{'s' * (n != 1)}; expected a 2D or 3D image")
    count = math.prod(dims)
    if count > limit:
        shown = "x".join(map(str, dims))
        raise _error(path, f"declares {count} {unit} ({shown}); the limit is {limit}")
    return tuple(dims)


def check_resampled_size(
    path: str | Path, shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]
) -> None:
    """Refuse a scan that resampling to `target` spacing (mm) would blow up beyond MAX_VOXELS.

    A few voxels whose header claims a huge spacing are a tiny file but a huge grid at the
    model's spacing: memory must be bounded by the scan, not by what its header claims.
    """
    dims = [math.ceil(n * s / t) for n, s, t in zip(shape, spacing, target, strict=False)]
    count = math.prod(dims)
    if count > MAX_VOXELS:
        shown = "x".join(map(str, dims))
        raise _error(
            path,
            f"would have {count} voxels ({shown}) at the model's spacing of "
            f"{'x'.join(f'{t:g}' for t in target)} mm; the limit is {MAX_VOXELS}",
        )


def _nifti_open(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _nifti_header_class(path: Path, first4: bytes):
    for klass in (nib.Nifti1Header, nib.Nifti2Header):
        size = klass.template_dtype.itemsize
        if first4 in (size.to_bytes(4, "little"), size.to_bytes(4, "big")):
            return klass
    raise _error(path, "is not a readable NIfTI file (no NIfTI header)")


def _check_nifti_prefix(path: Path) -> nib.Nifti1Header:
    """Parse header and extensions from a bounded prefix, so nibabel never reads unbounded.

    A hostile extension (negative or huge size) in a small `.nii.gz` would make nibabel
    decompress far more than the file holds; here it fails on at most MAX_HEADER_BYTES.
    Returns the header as written, before nibabel's fixes (it silently flips negative pixdims).
    """
    try:
        with _nifti_open(path) as f:
            first4 = f.read(4)
            klass = _nifti_header_class(path, first4)
            size = klass.template_dtype.itemsize
            block = first4 + f.read(size - 4)
            if len(block) < size:
                raise _error(path, "is not a readable NIfTI file (header cut short)")
            offset = float(klass(block, check=False)["vox_offset"])
            if not size + 4 <= offset <= MAX_HEADER_BYTES:
                raise _error(path, f"has an invalid NIfTI data offset ({offset:g})")
            prefix = block + f.read(int(offset) - size)
        return klass.from_fileobj(io.BytesIO(prefix), check=False)
    except InputError:
        raise
    except Exception as e:  # corrupt gzip, short read, bad extension: all the same to a user
        raise _error(path, f"is not a readable NIfTI file ({_reason(e, path)})") from None


def _reason(exc: BaseException, path: Path) -> str:
    """A short, one-line reason from an exception raised by a reader library."""
    lines = str(exc).replace(str(path), path.name).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    return _shown(text[:120])


def _validate_nifti(path: Path) -> None:
    raw = _check_nifti_prefix(path)
    try:
        img = nib.load(path)
        header, shape, affine = img.header, img.shape, np.asarray(img.affine, dtype=float)
        dtype, offset = img.get_data_dtype(), int(header["vox_offset"])
    except Exception as e:
        raise _error(path, f"is not a readable NIfTI file ({_reason(e, path)})") from None
    if dtype.kind not in "biuf" or dtype.fields is not None:
        raise _error(path, f"has an unsupported NIfTI data type ({dtype})")
    dims = _check_shape(path, shape)
    _check_nifti_size(path, math.prod(shape) * dtype.itemsize, offset)
    if path.name.lower().endswith(".gz"):
        _check_gzip_stream(path, math.prod(shape) * dtype.itemsize + offset)
    _check_spacing(path, np.asarray(raw["pixdim"][1 : 1 + len(dims)], dtype=float))
    _check_affine(path, affine, len(dims))


def _check_nifti_size(path: Path, nbytes: int, offset: int) -> None:
    """The voxel data a header declares must fit in the file (or, gzipped, its best expansion)."""
    size = path.stat().st_size
    if path.name.lower().endswith(".gz"):
        if nbytes + offset > size * _GZIP_MAX_RATIO:
            raise _error(
                path,
                f"is truncated: declares {nbytes} bytes of voxels, more than "
                f"a {size}-byte gzip file can hold",
            )
    elif nbytes + offset > size:
        raise _error(
            path,
            f"is truncated: declares {nbytes} bytes of voxels after byte "
            f"{offset}, but the file has {size} bytes",
        )


def _check_gzip_stream(path: Path, expected: int) -> None:
    """Decompress to the end in bounded chunks, so gzip checks the stream's CRC and length.

    Readers stop after the voxels they need and never reach the CRC in the gzip trailer: a
    flipped bit in the deflate stream would otherwise give wrong voxels without a word.
    """
    total, limit = 0, expected + MAX_HEADER_BYTES
    try:
        with gzip.open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                total += len(chunk)
                if total > limit:  # trailing data nobody reads: not worth decompressing
                    return
    except Exception as e:
        raise _error(path, f"is truncated or corrupt ({_reason(e, path)})") from None
    if total < expected:
        raise _error(
            path, f"is truncated: declares {expected} bytes with its header, holds {total}"
        )


def _check_spacing(path: Path, spacing: np.ndarray) -> None:
    if not (np.all(np.isfinite(spacing)) and np.all(spacing > 0)):
        shown = ", ".join(f"{s:g}" for s in spacing)
        raise _error(path, f"has invalid pixel spacing ({shown}); it must be positive and finite")


def _check_affine(path: Path, affine: np.ndarray, ndim: int) -> None:
    """Finite, and the columns of the spatial axes linearly independent (well conditioned)."""
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise _error(path, "has a non-finite affine (orientation) matrix")
    singular = np.linalg.svd(affine[:3, :ndim], compute_uv=False)
    if singular[-1] <= 1e-6 * max(singular[0], 1e-12):
        raise _error(path, "has a singular affine (orientation) matrix")


def _validate_png(path: Path) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=("PNG",)) as im:
                width, height = im.size
                im.verify()  # chunk CRCs, without decoding pixels
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _error(path, f"declares too many pixels; the limit is {MAX_PNG_PIXELS}") from None
    except Exception as e:
        raise _error(path, f"is not a readable PNG file ({_reason(e, path)})") from None
    _check_shape(path, (width, height), MAX_PNG_PIXELS, "pixels")


def _read_dicom_headers(folder: Path) -> list[pydicom.Dataset]:
    files = _dicom_candidates(folder)
    if not files:
        raise _error(folder, "holds no DICOM files")
    if any(e.is_dir() for e in _visible_entries(folder)):
        raise _error(
            folder, "holds subfolders beside its DICOM files; a series folder must be flat"
        )
    headers = []
    for file in files:
        if not _is_dicom_file(file):
            raise _error(
                file, "has no DICOM preamble ('DICM' at byte 128); expected a Part-10 file"
            )
        try:
            syntax = pydicom.filereader.read_file_meta_info(file).get("TransferSyntaxUID")
            if syntax == pydicom.uid.DeflatedExplicitVRLittleEndian:
                raise _error(file, "uses the deflated transfer syntax, which is not supported")
            headers.append(pydicom.dcmread(file, defer_size="1 KB"))
        except InputError:
            raise
        except Exception as e:
            raise _error(file, f"is not a readable DICOM file ({_reason(e, file)})") from None
    return headers


def _validate_dicom(folder: Path) -> None:
    headers = _read_dicom_headers(folder)
    with_pixels = sum(_has_pixels(h) for h in headers)
    if with_pixels == 0:
        raise _error(folder, "holds no DICOM image with pixel data")
    if with_pixels < len(headers):
        raise _error(
            folder,
            f"holds {len(headers) - with_pixels} DICOM files without pixel data; "
            "a series folder must hold only image slices",
        )
    series = {str(h.get("SeriesInstanceUID", "")) for h in headers}
    if len(series) > 1:
        raise _error(folder, f"holds {len(series)} DICOM series; expected one series per folder")
    _check_dicom_slices(folder, headers)
    _check_dicom_geometry(folder, headers)


def _has_pixels(ds: pydicom.Dataset) -> bool:
    return any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))


def _check_dicom_slices(folder: Path, headers: list[pydicom.Dataset]) -> None:
    """Single-frame grey slices of one size, within the voxel limit."""
    if any(_dicom_int(folder, h, "NumberOfFrames", 1) > 1 for h in headers):
        raise _error(folder, "holds multi-frame DICOM images; expected single-frame slices")
    if any(_dicom_int(folder, h, "SamplesPerPixel", 1) != 1 for h in headers):
        raise _error(folder, "holds colour DICOM images; expected greyscale")
    sizes = {
        (_dicom_int(folder, h, "Rows", 0), _dicom_int(folder, h, "Columns", 0)) for h in headers
    }
    if len(sizes) > 1:
        shown = " and ".join(f"{r}x{c}" for r, c in sorted(sizes)[:2])
        raise _error(folder, f"holds slices of different sizes ({shown})")
    rows, cols = sizes.pop()
    shape = (rows, cols, len(headers)) if len(headers) > 1 else (rows, cols)
    _check_shape(folder, shape)


def _dicom_int(folder: Path, ds: pydicom.Dataset, keyword: str, default: int | None) -> int:
    """An integer attribute of a slice; `default` when absent (None: it is required)."""
    value = ds.get(keyword)
    if value is None or str(value).strip() == "":
        if default is None:
            raise _error(folder, f"has a slice without a {keyword}")
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise _error(folder, f"has a slice with an invalid {keyword}") from None


def _dicom_vector(folder: Path, ds: pydicom.Dataset, keyword: str, size: int) -> np.ndarray:
    try:
        value = np.asarray([float(v) for v in ds[keyword].value], dtype=float)
    except (KeyError, TypeError, ValueError):
        raise _error(folder, f"has a slice without a usable {keyword}") from None
    if value.shape != (size,) or not np.all(np.isfinite(value)):
        raise _error(folder, f"has a slice without a usable {keyword}")
    return value


def _check_dicom_geometry(folder: Path, headers: list[pydicom.Dataset]) -> None:
    """One orientation and spacing; slices (ordered as MONAI orders them) evenly spaced."""
    if len(headers) == 1 and not any(
        k in headers[0] for k in ("ImageOrientationPatient", "ImagePositionPatient")
    ):
        return  # a projection image (X-ray) has no patient geometry: MONAI gives the identity
    orients = [_dicom_vector(folder, h, "ImageOrientationPatient", 6) for h in headers]
    spacings = [_dicom_vector(folder, h, "PixelSpacing", 2) for h in headers]
    positions = [_dicom_vector(folder, h, "ImagePositionPatient", 3) for h in headers]
    _check_spacing(folder, spacings[0])
    normal = np.cross(orients[0][:3], orients[0][3:])
    if not np.isclose(np.linalg.norm(normal), 1.0, atol=1e-3):
        raise _error(folder, "has an invalid ImageOrientationPatient")
    if not all(np.allclose(o, orients[0], atol=1e-4) for o in orients):
        raise _error(folder, "holds slices of different orientations")
    if not all(np.allclose(s, spacings[0], rtol=1e-4) for s in spacings):
        raise _error(folder, "holds slices of different pixel spacings")
    if len(headers) > 1:
        _check_slice_order(folder, headers, [float(p @ normal) for p in positions])


def _check_slice_order(folder: Path, headers: list[pydicom.Dataset], depth: list[float]) -> None:
    numbers = [_dicom_int(folder, h, "InstanceNumber", None) for h in headers]
    if len(set(numbers)) < len(numbers):
        raise _error(folder, "has two slices with the same InstanceNumber")
    steps = np.diff([d for _, d in sorted(zip(numbers, depth, strict=True))])
    if np.any(np.abs(steps) < 1e-3):
        raise _error(folder, "has two slices at the same position")
    mean = np.mean(np.abs(steps))
    if np.any(np.sign(steps) != np.sign(steps[0])) or np.ptp(np.abs(steps)) > 0.01 * mean + 1e-3:
        raise _error(folder, "has unevenly spaced slices (a slice missing or out of order?)")


def check_voxels(path: str | Path, array, *, repair: bool = False, constant_ok: bool = False) -> int:
    """Refuse loaded voxels with NaN/Inf, beyond +-MAX_INTENSITY or without contrast.

    Also for pipelines built on LoadImaged. Finite float32 values near its maximum (3.4e38) pass
    a NaN check but turn into Inf/NaN once scaled, so they are refused here, not written out.

    Any non-finite voxel (NaN, +Inf, -Inf) refuses the scan. With `repair=True` they do not:
    the number of them is returned (0 when none) and the caller replaces them with
    `repair_nonfinite`; the other checks then judge the scan as it will be once repaired.
    `constant_ok`: a label map, which may be all background (a healthy scan's lesion mask).
    """
    array = np.asarray(array)
    bad = int(array.size - np.count_nonzero(np.isfinite(array)))
    if bad and not repair:
        raise _error(
            path,
            f"contains {bad} NaN/Inf voxels (non-finite); pass --repair-nonfinite to replace "
            "them with the scan's lowest finite value",
        )
    if bad:
        array, _ = repair_nonfinite(array)
    if array.size == 0 or (array.min() == array.max() and not constant_ok):
        raise _error(path, "is constant (no contrast)")
    largest = max(abs(float(array.min())), abs(float(array.max())))
    if largest > MAX_INTENSITY:
        raise _error(path, f"has intensities up to {largest:.3g}; the limit is {MAX_INTENSITY:g}")
    return bad


def repair_nonfinite(array) -> tuple[np.ndarray, int]:
    """A copy of `array` with NaN/Inf voxels set to its lowest finite value (0 if it has none).

    Returns the copy and the number of voxels replaced; `array` itself is never modified.
    """
    data = np.array(array, copy=True)
    finite = np.isfinite(data)
    count = int(data.size - np.count_nonzero(finite))
    if count:
        fill = data[finite].min() if finite.any() else 0
        data[~finite] = fill
    return data, count
