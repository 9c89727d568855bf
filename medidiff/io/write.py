"""Writing results safely: atomic files, NIfTI output, paths kept inside the output folder.

Outputs are written atomically (temporary file, fsync, rename) so a killed process never leaves a
half-written file under its final name.
"""

from __future__ import annotations

import gzip
import os
import secrets
from pathlib import Path

import nibabel as nib
import numpy as np

from medidiff.io.discover import _error, _shown


def safe_output_path(out_dir: str | Path, name: str | Path) -> Path:
    """`out_dir / name`, refused (InputError) if it would resolve outside `out_dir`."""
    out_dir = Path(out_dir)
    target = out_dir / name
    inside = os.path.realpath(out_dir)
    resolved = os.path.realpath(target)
    if Path(name).is_absolute() or resolved == inside or not Path(resolved).is_relative_to(inside):
        raise _error(name, f"would be written outside the output folder {_shown(out_dir)}")
    return target


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
    elif data.ndim == 4:  # channel-first channels of a 3D grid: NIfTI keeps them last
        data = np.moveaxis(data, 0, -1)
    if data.ndim not in (2, 3, 4):
        raise ValueError(f"save_nifti expects a 2D or 3D array, got shape {data.shape}")
    if data.dtype == bool:
        return data.astype(np.uint8)
    if data.dtype.kind == "f":
        return data.astype(np.float32, copy=False)
    if data.dtype.kind in "iu":
        return data
    raise ValueError(f"save_nifti cannot write data of type {data.dtype}")


def save_nifti(array, affine, path: str | Path, compresslevel: int = 1) -> Path:
    """Write `array` (2D/3D, or channel-first 4D: channels go last, as NIfTI and MONAI's reader
    keep them) with `affine` to `path` atomically.

    gzip level 1: an anomaly map and its mask of a 2 mm head took 0.26 s against level 6's
    0.46 s, for files 7% larger; scoring writes both for every scan.

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
