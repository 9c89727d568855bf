"""Synthetic lesions with known masks, for evaluating anomaly detection without patient data.

Follows the synthetic-outlier protocols of the MOOD challenge and of FPI (Tan et al. 2020,
"Detecting outliers with foreign patch interpolation"; its 3D sphere notebook): intensity-shifted
ellipsoids placed inside the brain, here with soft (sigmoid) edges, random orientation and a
smooth noise texture, so a model cannot find them from sharp edges or flat intensity alone.

Three kinds, drawn at random per lesion:
- ``hyper`` / ``hypo``: add (subtract) 0.25-0.6 of the brain's 99th-percentile intensity,
  modulated by the texture; clearly visible, like the MOOD/FPI intensity lesions.
- ``subtle``: replace the tissue by a textured intensity that stays inside the normal tissue
  range (between the brain's 5th and 95th percentiles): a realistic hard case that an intensity
  threshold cannot find.
Everything is numpy and deterministic from the ``numpy.random.Generator`` passed in.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage as ndi
from scipy.special import expit

from medidiff.errors import InputError

KIND_PROBABILITIES = {"hyper": 0.4, "hypo": 0.4, "subtle": 0.2}
MAX_RADIUS_FRACTION = 0.15  # of the brain's largest extent
MIN_RADIUS_MM = 3.0


def _random_rotation(ndim: int, rng: np.random.Generator) -> np.ndarray:
    """Uniformly random rotation matrix (QR of a Gaussian matrix, signs fixed, det +1)."""
    q, r = np.linalg.qr(rng.standard_normal((ndim, ndim)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _brain_extent_mm(brain: np.ndarray, spacing: np.ndarray) -> float:
    """Largest side of the brain's bounding box, in mm."""
    idx = np.nonzero(brain)
    return float(max((i.max() - i.min() + 1) * s for i, s in zip(idx, spacing, strict=True)))


def _draw_shape(extent_mm: float, spacing: np.ndarray, ndim: int, rng: np.random.Generator) -> dict:
    """Semi-axes (mm), rotation and edge width of one ellipsoid.

    The size is log-uniform from a few mm (at least a voxel) to 15% of the brain's extent, so
    small lesions, the hard ones, are as common as large ones.
    """
    r_min = max(MIN_RADIUS_MM, float(spacing.max()))
    r_max = max(r_min * 1.5, MAX_RADIUS_FRACTION * extent_mm)
    radius = float(np.exp(rng.uniform(np.log(r_min), np.log(r_max))))
    radii = np.clip(radius * rng.uniform(0.7, 1.3, ndim), 0.7 * r_min, r_max)
    return {
        "radii_mm": radii,
        "rotation": _random_rotation(ndim, rng),
        "edge_mm": float(rng.uniform(0.5, 1.5) * spacing.min()),
    }


def _pick_centre(distance_mm: np.ndarray, radius_mm: float, rng: np.random.Generator) -> np.ndarray:
    """A voxel deep enough in the brain that most of the lesion lies inside it.

    Choosing a voxel centre (not a continuous point) guarantees the lesion mask is never empty.
    """
    depth = min(0.5 * radius_mm, 0.5 * float(distance_mm.max()))
    candidates = np.argwhere(distance_mm >= max(depth, 1e-6))
    return candidates[rng.integers(len(candidates))]


def _soft_weight(shape, centre, spacing, lesion) -> tuple[tuple[slice, ...], np.ndarray]:
    """Sigmoid-edged ellipsoid weight in (0, 1) on the lesion's bounding box.

    Weight is 0.5 on the ellipsoid surface; the box reaches a few edge widths beyond it.
    """
    reach = lesion["radii_mm"].max() + 6 * lesion["edge_mm"]
    box = tuple(
        slice(max(0, int(c - reach / s)), min(n, int(c + reach / s) + 2))
        for c, s, n in zip(centre, spacing, shape, strict=True)
    )
    grids = np.meshgrid(*[(np.arange(b.start, b.stop) - c) * s for b, c, s in
                          zip(box, centre, spacing, strict=True)], indexing="ij")
    offsets = np.stack(grids, axis=-1) @ lesion["rotation"]  # coordinates in the lesion's frame
    distance = np.sqrt(np.sum((offsets / lesion["radii_mm"]) ** 2, axis=-1))
    sharpness = lesion["radii_mm"].mean() / lesion["edge_mm"]
    return box, expit((1.0 - distance) * sharpness).astype(np.float32)


def _texture(shape, spacing, amplitude: float, rng: np.random.Generator) -> np.ndarray:
    """Multiplicative texture ``1 + amplitude * n``, n smoothed white noise of unit std."""
    scale_mm = rng.uniform(2.0, 6.0)
    noise = ndi.gaussian_filter(rng.standard_normal(shape), scale_mm / spacing)
    noise /= max(float(noise.std()), 1e-6)
    return np.clip(1.0 + amplitude * noise, 0.0, None).astype(np.float32)


def _subtle_target(region: np.ndarray, normal_range: tuple[float, float], ref: float,
                   rng: np.random.Generator) -> float:
    """An intensity 0.1-0.2 ``ref`` away from the region's mean yet inside the normal range."""
    mean, step = float(region.mean()), rng.uniform(0.1, 0.2) * ref
    lo, hi = normal_range
    options = [t for t in (mean + step, mean - step) if lo <= t <= hi]
    if not options:
        return float(np.clip(mean + step, lo, hi))
    return float(options[rng.integers(len(options))])


def _apply_one(image, brain, distance_mm, spacing, stats, rng) -> tuple[np.ndarray, dict]:
    """Paint one lesion into ``image`` in place; return its hard mask and its description."""
    kind = str(rng.choice(list(KIND_PROBABILITIES), p=list(KIND_PROBABILITIES.values())))
    lesion = _draw_shape(stats["extent_mm"], spacing, image.ndim, rng)
    centre = _pick_centre(distance_mm, float(lesion["radii_mm"].mean()), rng)
    box, weight = _soft_weight(image.shape, centre, spacing, lesion)
    weight *= brain[box]  # nothing appears outside the (skull-stripped) brain
    patch, ref = image[box], stats["reference"]
    if kind == "subtle":
        target = _subtle_target(patch[weight > 0.5], stats["normal_range"], ref, rng)
        filled = target * _texture(patch.shape, spacing, rng.uniform(0.05, 0.15), rng)
        image[box] = (1.0 - weight) * patch + weight * filled
        value = {"target": round(float(target / ref), 4)}
    else:
        change = rng.uniform(0.25, 0.6) * (1.0 if kind == "hyper" else -1.0)
        value = {"shift": round(float(change), 4)}
        shift = change * ref * _texture(patch.shape, spacing, rng.uniform(0.1, 0.3), rng)
        # Dark lesions stop at the brain's 1st percentile (about CSF): never below the tissue
        # already there, so the brain stays positive, as in a noisy magnitude image.
        image[box] = np.maximum(patch + weight * shift, np.minimum(patch, stats["floor"]))
    mask = np.zeros(image.shape, dtype=bool)
    mask[box] = weight > 0.5
    info = {
        "kind": kind,
        "centre_voxel": [int(c) for c in centre],
        "radii_mm": [round(float(r), 3) for r in lesion["radii_mm"]],
        **value,  # added shift or replacing intensity, as a fraction of the reference
        "voxels": int(mask.sum()),
    }
    return mask, info


def add_lesion(
    image: np.ndarray,
    brain_mask: np.ndarray,
    spacing_mm: float | Sequence[float],
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Add 1-3 synthetic lesions inside the brain (MOOD / FPI synthetic-outlier protocol).

    Returns the new image (float32; ``image`` is not modified), the lesion mask (uint8: soft
    weight above 0.5, inside the brain) and a JSON-ready description of each lesion. Intensities
    are relative to the 99th percentile of the brain intensities, so any scaling works.
    """
    image = np.asarray(image)
    brain = np.asarray(brain_mask).astype(bool)
    if image.shape != brain.shape:
        raise InputError(None, f"image {image.shape} and brain mask {brain.shape} differ in shape")
    if not brain.any():
        raise InputError(None, "brain mask is empty; nowhere to place a lesion")
    spacing = np.broadcast_to(np.asarray(spacing_mm, dtype=float), (image.ndim,)).copy()
    inside = image[brain]
    stats = {
        "reference": float(np.percentile(inside, 99)) or 1.0,
        "normal_range": tuple(float(v) for v in np.percentile(inside, [5, 95])),
        "floor": float(np.percentile(inside, 1)),
        "extent_mm": _brain_extent_mm(brain, spacing),
    }
    distance_mm = ndi.distance_transform_edt(brain, sampling=spacing)
    out = image.astype(np.float32, copy=True)
    mask = np.zeros(image.shape, dtype=bool)
    lesions = []
    for _ in range(int(rng.integers(1, 4))):
        one_mask, info = _apply_one(out, brain, distance_mm, spacing, stats, rng)
        mask |= one_mask
        lesions.append(info)
    info = {"n_lesions": len(lesions), "reference_intensity": stats["reference"], "lesions": lesions}
    return out, mask.astype(np.uint8), info
