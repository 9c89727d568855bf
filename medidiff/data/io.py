"""Reading scans (NIfTI, DICOM series folders, PNG) through MONAI and writing results safely.

Every input is checked cheaply (headers only) before voxel data is read, so a hostile or broken
file ends in one `InputError` line instead of a traceback or an allocation its header asks for.
Outputs are written atomically (temporary file, fsync, rename) so a killed process never leaves a
half-written file under its final name.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import logging
import math
import os
import re
import secrets
import warnings
from collections.abc import Iterator, Sequence
from functools import cache
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from monai.data import NibabelReader, PILReader, PydicomReader
from monai.data.image_reader import ImageReader
from monai.transforms import LoadImage
from PIL import Image

from medidiff.errors import InputError

# 1024**3 / 4 voxels is 1 GiB as float32: far above any scan we expect, far below an OOM kill.
MAX_VOXELS = 1024**3 // 4
MAX_PNG_PIXELS = 8192 * 8192  # below PIL's decompression-bomb warning (about 89 M pixels)
MAX_INTENSITY = 1e30  # beyond this, spans and products of voxel values overflow float32
MAX_HEADER_BYTES = 16 * 1024**2  # NIfTI header plus extensions (vox_offset)
_GZIP_MAX_RATIO = 1100  # deflate cannot expand more than about 1032:1
_NIFTI_SUFFIXES = (".nii.gz", ".nii")
_DICOM_SKIP_SUFFIXES = (".nii", ".gz", ".png", ".json", ".csv", ".txt", ".yaml", ".yml")
_CASE_NAME_MAX = 100
_UNSUPPORTED = "has an unsupported type; expected .nii, .nii.gz, .png or a DICOM folder"


# -- paths and names ---------------------------------------------------------------------------


def _shown(path: str | Path) -> str:
    """The path as one printable line: control characters and undecodable bytes escaped."""
    text = str(path)
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _error(path: str | Path, problem: str) -> InputError:
    return InputError(_shown(path), problem)


def _kind(path: Path) -> str | None:
    """'nifti', 'png' or 'dicom' (a folder), judged by the name alone; None if unsupported."""
    if path.is_dir():
        return "dicom"
    name = path.name.lower()
    if name.endswith(_NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(".png"):
        return "png"
    return None


def _is_dicom_file(path: Path) -> bool:
    """A Part-10 DICOM file: the 'DICM' magic at byte 128."""
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _visible_entries(folder: Path) -> list[Path]:
    """A folder's entries without hidden ones, sorted by name (MONAI's glob skips hidden too)."""
    try:
        names = sorted(e.name for e in os.scandir(folder) if not e.name.startswith("."))
    except OSError as e:
        raise _error(folder, f"cannot be listed ({e.strerror or type(e).__name__})") from None
    return [folder / n for n in names]


def _dicom_candidates(folder: Path) -> list[Path]:
    """Files of a folder that claim to be DICOM: a `.dcm` suffix or the DICM magic."""
    found = []
    for entry in _visible_entries(folder):
        if not entry.is_file():
            continue
        name = entry.name.lower()
        if name.endswith(".dcm"):
            found.append(entry)
        elif not name.endswith(_DICOM_SKIP_SUFFIXES) and _is_dicom_file(entry):
            found.append(entry)
    return found


def _is_dicom_series(folder: Path) -> bool:
    return bool(_dicom_candidates(folder))


def _discover_one(path: Path) -> list[Path]:
    if not path.exists():
        raise _error(path, "does not exist")
    if path.is_dir():
        if _is_dicom_series(path):
            return [path]
        items = [
            e
            for e in _visible_entries(path)
            if (e.is_file() and _kind(e) in ("nifti", "png"))
            or (e.is_dir() and _is_dicom_series(e))
        ]
        if not items:
            raise _error(path, "holds no NIfTI, PNG or DICOM series")
        return items
    if _kind(path) is None:
        if path.name.lower().endswith(".dcm") or _is_dicom_file(path):
            raise _error(path, "is a single DICOM file; pass the folder of its series instead")
        raise _error(path, _UNSUPPORTED)
    return [path]


def discover_inputs(paths: Sequence[str | Path]) -> list[Path]:
    """The scans named by `paths`: files, DICOM series folders, or folders of them (one level).

    The result is de-duplicated and sorted by path, so that every process sharding the same
    inputs (`--part-id/--num-parts`) sees the same list whatever the order of its arguments.
    """
    found: dict[str, Path] = {}
    for given in paths:
        for item in _discover_one(Path(given)):
            found.setdefault(os.path.realpath(item), item)
    return sorted(found.values(), key=str)


def case_name(path: str | Path) -> str:
    """The name outputs of a scan are called after: `case.nii.gz` -> `case`, a folder -> its name.

    Only the file or folder name is used (never a DICOM header field, which may hold a patient's
    name), reduced to letters, digits, `-`, `_` and `.` (no leading dot), so that an output can
    never leave its folder. Distinct inputs may share a case name (`a/x.nii`, `b/x.nii`).
    """
    path = Path(path)
    name = Path(os.path.abspath(path)).name
    lower = name.lower()
    for suffix in (*_NIFTI_SUFFIXES, ".png"):
        if lower.endswith(suffix) and not path.is_dir():
            name = name[: -len(suffix)]
            break
    name = re.sub(r"[^\w.-]+", "_", name).strip("._")
    return name[:_CASE_NAME_MAX] or "case"


def safe_output_path(out_dir: str | Path, name: str | Path) -> Path:
    """`out_dir / name`, refused (InputError) if it would resolve outside `out_dir`."""
    out_dir = Path(out_dir)
    target = out_dir / name
    inside = os.path.realpath(out_dir)
    resolved = os.path.realpath(target)
    if Path(name).is_absolute() or resolved == inside or not Path(resolved).is_relative_to(inside):
        raise _error(name, f"would be written outside the output folder {_shown(out_dir)}")
    return target


# -- cheap checks before loading ---------------------------------------------------------------


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence reader libraries' warnings and log lines: problems become one InputError line."""
    with warnings.catch_warnings(), _muted_logger("nibabel.global"):
        warnings.simplefilter("ignore")
        yield


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


# -- loading -----------------------------------------------------------------------------------


def _to_grey(image: Image.Image) -> Image.Image:
    """Any PIL mode to 32-bit float grey: luminance for colour (alpha dropped), 16-bit kept."""
    if image.mode == "F":
        return image
    if image.mode == "P":
        image = image.convert("RGBA")
    try:
        return image.convert("F")
    except ValueError:  # modes without a direct route to F
        return image.convert("RGB").convert("F")


def reader_for(path: str | Path) -> ImageReader:
    """The MONAI reader for a scan, to pass to `LoadImage(d)(reader=...)`.

    NIfTI: `NibabelReader` (trailing singleton dimensions squeezed). DICOM folder:
    `PydicomReader` reading the files with the DICM magic, affine in RAS. PNG: `PILReader`
    converting to float grey, first array axis = image x (MONAI's convention, as for NIfTI).
    """
    kind = _kind(Path(path))
    if kind == "nifti":
        return NibabelReader(squeeze_non_spatial_dims=True)
    if kind == "dicom":
        return PydicomReader(fname_regex=None, affine_lps_to_ras=True)
    if kind == "png":
        return PILReader(converter=_to_grey, formats=("PNG",))
    raise _error(path, _UNSUPPORTED)


@cache
def _loader() -> LoadImage:
    # LoadImage instantiates every registered reader; MONAI 1.6's nvImageCodec one logs a warning.
    with _quiet(), _muted_logger("monai.data.nvimgcodec_pydicom_plugin"):
        return LoadImage(image_only=True, ensure_channel_first=True, dtype=np.float32)


@contextlib.contextmanager
def _muted_logger(name: str) -> Iterator[None]:
    logger = logging.getLogger(name)
    old = logger.disabled
    logger.disabled = True
    try:
        yield
    finally:
        logger.disabled = old


def load_image(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """A scan as (float32 channel-first array, 4x4 affine), checked before and after loading.

    Raises InputError for anything `validate_input` refuses, for a file that fails while its
    voxels are read (truncated data), for NaN/Inf voxels and for a constant image.
    """
    path = Path(path)
    validate_input(path)
    try:
        with _quiet():
            image = _loader()(str(path), reader=reader_for(path))
    except Exception as e:  # the header was fine, the data is not: truncated or corrupt
        raise _error(
            path, f"cannot be read: its data is truncated or corrupt ({_reason(e, path)})"
        ) from None
    array = np.ascontiguousarray(image.numpy(), dtype=np.float32)
    affine = np.asarray(image.affine, dtype=np.float64)
    check_voxels(path, array)
    return array, affine


def check_voxels(path: str | Path, array) -> None:
    """Refuse loaded voxels with NaN/Inf, beyond +-MAX_INTENSITY or without contrast.

    Also for pipelines built on LoadImaged. Finite float32 values near its maximum (3.4e38) pass
    a NaN check but turn into Inf/NaN once scaled, so they are refused here, not written out.
    """
    array = np.asarray(array)
    bad = int(array.size - np.count_nonzero(np.isfinite(array)))
    if bad:
        raise _error(path, f"contains {bad} NaN/Inf voxels")
    if array.size == 0 or array.min() == array.max():
        raise _error(path, "is constant (no contrast)")
    largest = max(abs(float(array.min())), abs(float(array.max())))
    if largest > MAX_INTENSITY:
        raise _error(path, f"has intensities up to {largest:.3g}; the limit is {MAX_INTENSITY:g}")


# -- writing -----------------------------------------------------------------------------------


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` so that readers see the old file or the whole new one, never part.

    A temporary file in the same folder is written, flushed, fsynced and renamed over `path`;
    it is removed if anything fails. The folder is created if needed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name[:200]}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # 0o666 & umask, not 0o600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)
    return path


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable; not possible on every platform."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """`atomic_write_bytes` for text (no newline translation)."""
    return atomic_write_bytes(path, text.encode(encoding))


def _nifti_data(array) -> np.ndarray:
    """float32 for floating data, the array's own integer type otherwise; bool as uint8."""
    data = np.asarray(array)
    if data.ndim == 4 and data.shape[0] == 1:  # channel-first with one channel
        data = data[0]
    if data.ndim not in (2, 3):
        raise ValueError(f"save_nifti expects a 2D or 3D array, got shape {data.shape}")
    if data.dtype == bool:
        return data.astype(np.uint8)
    if data.dtype.kind == "f":
        return data.astype(np.float32, copy=False)
    if data.dtype.kind in "iu":
        return data
    raise ValueError(f"save_nifti cannot write data of type {data.dtype}")


def save_nifti(array, affine, path: str | Path, compresslevel: int = 6) -> Path:
    """Write `array` (2D/3D, or one-channel channel-first 4D) with `affine` to `path` atomically.

    qform and sform (code 1, scanner) come from the affine; `descrip` is empty, so nothing of an
    input's header (which may name a patient) is carried over. `.nii.gz` output is gzipped with
    mtime 0, so the same array and affine always give the same bytes.
    """
    data = _nifti_data(array)
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise ValueError("save_nifti expects a finite 4x4 affine")
    img = nib.Nifti1Image(data, affine, dtype=data.dtype)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header["descrip"] = b""
    img.header.set_xyzt_units("mm", "sec")
    raw = img.to_bytes()
    if Path(path).name.lower().endswith(".gz"):
        raw = gzip.compress(raw, compresslevel=compresslevel, mtime=0)
    return atomic_write_bytes(path, raw)
