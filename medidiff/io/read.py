"""Reading scans (NIfTI, DICOM series folders, PNG) through MONAI, checked before and after."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
from monai.data import NibabelReader, PILReader, PydicomReader
from monai.data.image_reader import ImageReader
from monai.transforms import LoadImage
from PIL import Image

from medidiff.io.discover import _UNSUPPORTED, _error, _kind
from medidiff.io.validate import _muted_logger, _quiet, _reason, check_voxels, validate_input

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


def load_image(path: str | Path, labels: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """A scan as (float32 channel-first array, 4x4 affine), checked before and after loading.

    Raises InputError for anything `validate_input` refuses, for a file that fails while its
    voxels are read (truncated data), for NaN/Inf voxels and for a constant image (unless
    ``labels``: a label map may be all background).
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
    check_voxels(path, array, constant_ok=labels)
    return array, affine
