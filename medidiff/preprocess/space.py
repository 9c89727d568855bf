"""Arrays with nibabel/MONAI RAS affines and SimpleITK images, which live in LPS.

ITK's physical space is LPS, nibabel's and MONAI's RAS: the affine is converted, the array is
never transposed by hand except for numpy's (z, y, x) view of an ITK image.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def to_sitk(array: np.ndarray, affine: np.ndarray) -> sitk.Image:
    """A (X, Y, Z) array with its voxel-to-RAS affine as a float32 SimpleITK image."""
    affine = np.asarray(affine, dtype=np.float64)
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(array, np.float32).T))
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetDirection(tuple((_RAS_TO_LPS @ affine[:3, :3] / spacing).ravel().tolist()))
    image.SetOrigin(tuple((_RAS_TO_LPS @ affine[:3, 3]).tolist()))
    return image


def from_sitk(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """The (X, Y, Z) array of a SimpleITK image and its voxel-to-RAS affine."""
    array = sitk.GetArrayFromImage(image).T
    spacing = np.asarray(image.GetSpacing())
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = _RAS_TO_LPS @ direction * spacing
    affine[:3, 3] = _RAS_TO_LPS @ np.asarray(image.GetOrigin())
    return array, affine


def reference(shape, affine: np.ndarray) -> sitk.Image:
    """An empty image that only carries a grid (for resampling onto it)."""
    return to_sitk(np.zeros(tuple(int(s) for s in shape), np.float32), affine)


def resample(image: sitk.Image, grid: sitk.Image, transform: sitk.Transform | None,
             nearest: bool = False) -> sitk.Image:
    """``image`` on ``grid``: each grid point p takes the value at ``transform(p)`` (ITK maps
    output points to input points), linear or nearest, zero outside."""
    interpolator = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
    return sitk.Resample(image, grid, transform or sitk.Transform(), interpolator, 0.0,
                         image.GetPixelID())
