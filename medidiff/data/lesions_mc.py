"""Synthetic lesions as each MR contrast shows them: MS-like ovoids, tumour with oedema, stroke.

``lesions.py`` paints intensity outliers into one image. Here a lesion is tissue, and every
contrast of a subject shows that same tissue its own way, as multi-contrast data (BraTS, MS
lesion challenges, ISLES) do: bright on T2, FLAIR and PD, dark on T1. Shapes are lesions.py's
soft (sigmoid-edged) ellipsoids with its smooth multiplicative texture; one texture per lesion
part serves every contrast, so a lesion's heterogeneity is the same in each.

One kind is drawn per lesioned subject, each equally likely:

- ``ms``: 3-8 small ovoids (semi-axes 2-6 mm) in white matter, most of them within 10 mm of a
  ventricle (the periventricular lesions typical of multiple sclerosis);
- ``tumour``: a core (semi-axes 5-12 mm) inside a larger oedema (1.6-2.4 times the core) that
  spreads through the parenchyma, not into CSF; T1 shows the core darkest, FLAIR the oedema
  brightest;
- ``stroke``: a larger region (semi-axes 10-22 mm) centred in cortex, reaching the white matter
  beneath it (cortical/subcortical), in the parenchyma only.

Each part changes a contrast by ``CHANGE`` times that contrast's white-matter level (its median in
label 3), scaled by one factor of 0.8-1.2 per part. Dark changes stop at the brain's 1st
percentile and bright ones at 1 (the templates' full scale), never beyond the tissue already
there. The mask is one for all contrasts: every voxel inside the brain where a part's soft weight
exceeds 0.5. Deterministic from the ``numpy.random.Generator`` passed in.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage as ndi

from medidiff.data.lesions import _random_rotation, _soft_weight, _texture
from medidiff.errors import InputError

KINDS = ("ms", "tumour", "stroke")
# Each part's change as a multiple of the contrast's white-matter level (T1 WM is bright, so
# its multiples are smaller; FLAIR's oedema the largest of all).
CHANGE = {
    "ms": {"t1": -0.3, "t2": 0.8, "flair": 0.9, "pd": 0.35},
    "core": {"t1": -0.55, "t2": 0.6, "flair": 0.35, "pd": 0.3},
    "oedema": {"t1": -0.15, "t2": 0.75, "flair": 1.0, "pd": 0.35},
    "stroke": {"t1": -0.4, "t2": 0.8, "flair": 0.8, "pd": 0.35},
}
CEILING = 1.0  # bright lesions stop at the templates' full scale
TAIL = 0.01  # soft weights below this are cut, so a lesion changes no voxel far from its mask


def _ellipsoid(radii_mm: np.ndarray, spacing: np.ndarray, rng: np.random.Generator) -> dict:
    """lesions.py's shape description: semi-axes, a random rotation, an edge of about a voxel."""
    return {"radii_mm": np.asarray(radii_mm, float), "rotation": _random_rotation(3, rng),
            "edge_mm": float(rng.uniform(0.5, 1.5) * spacing.min())}


def _weight(shape, centre, spacing, shape_spec) -> np.ndarray:
    """The soft ellipsoid weight on the whole grid (zero outside its box)."""
    box, weight = _soft_weight(shape, centre, spacing, shape_spec)
    full = np.zeros(shape, np.float32)
    full[box] = np.where(weight >= TAIL, weight, 0.0)
    return full


def _choose(candidates: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One voxel of a boolean volume, uniformly."""
    voxels = np.argwhere(candidates)
    return voxels[rng.integers(len(voxels))]


def _ms_parts(labels, depth, spacing, rng) -> list[tuple[str, np.ndarray]]:
    """3-8 ovoids in white matter, seven in ten placed within 10 mm of a ventricle."""
    wm = (labels == 3) & (depth >= 6.0)
    if not wm.any():
        wm = labels == 3 if (labels == 3).any() else labels > 0
    ventricles = (labels == 1) & (depth >= 20.0)
    near = np.zeros_like(wm)
    if ventricles.any():
        near = wm & (ndi.distance_transform_edt(~ventricles, sampling=spacing) <= 10.0)
    weight = np.zeros(labels.shape, np.float32)
    for _ in range(int(rng.integers(3, 9))):
        pool = near if near.any() and rng.uniform() < 0.7 else wm
        major = rng.uniform(3.0, 6.0)
        radii = major * np.array([1.0, rng.uniform(0.45, 0.75), rng.uniform(0.45, 0.75)])
        spec = _ellipsoid(np.maximum(radii, 2.0), spacing, rng)
        weight = np.maximum(weight, _weight(labels.shape, _choose(pool, rng), spacing, spec))
    return [("ms", weight)]


def _tumour_parts(labels, depth, parenchyma, spacing, rng) -> list[tuple[str, np.ndarray]]:
    """A core deep in the white matter and the oedema around it (minus the core)."""
    core_radii = rng.uniform(5.0, 12.0) * rng.uniform(0.75, 1.25, 3)
    oedema_radii = core_radii * rng.uniform(1.6, 2.4)
    deep = (labels == 3) & (depth >= min(float(core_radii.mean()), 0.5 * float(depth.max())))
    centre = _choose(deep if deep.any() else labels > 0, rng)
    core = _weight(labels.shape, centre, spacing, _ellipsoid(core_radii, spacing, rng))
    oedema = _weight(labels.shape, centre, spacing, _ellipsoid(oedema_radii, spacing, rng))
    return [("core", core), ("oedema", oedema * parenchyma * (1.0 - core))]


def _stroke_parts(labels, depth, parenchyma, spacing, rng) -> list[tuple[str, np.ndarray]]:
    """A large region centred in cortex 4-14 mm deep, cut to the parenchyma."""
    cortex = (labels == 2) & (depth >= 4.0) & (depth <= 14.0)
    radii = rng.uniform(10.0, 22.0) * np.array([1.0, rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0)])
    centre = _choose(cortex if cortex.any() else labels > 0, rng)
    return [("stroke", _weight(labels.shape, centre, spacing, _ellipsoid(radii, spacing, rng))
             * parenchyma)]


def _textured(weight: np.ndarray, spacing, rng: np.random.Generator) -> np.ndarray:
    """``weight`` times lesions.py's texture (amplitude 0.1-0.3), drawn on its bounding box only."""
    support = np.nonzero(weight > 0)
    out = np.zeros_like(weight)
    if not support[0].size:
        return out
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in support)
    out[box] = weight[box] * _texture(weight[box].shape, spacing, rng.uniform(0.1, 0.3), rng)
    return out


def _paint(image: np.ndarray, change: np.ndarray, floor: float) -> np.ndarray:
    """``image + change``, dark changes floored at ``floor`` and bright ones at ``CEILING``, never
    past the tissue already there."""
    painted = image + change
    painted = np.maximum(painted, np.minimum(image, np.float32(floor)))
    return np.minimum(painted, np.maximum(image, np.float32(CEILING))).astype(np.float32)


def add_contrast_lesions(
    images: dict[str, np.ndarray],
    labels: np.ndarray,
    spacing_mm: float | Sequence[float],
    rng: np.random.Generator,
    kind: str | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray, dict]:
    """Add one lesion of ``kind`` (drawn when None) to every contrast of a subject.

    ``images`` maps contrast names (keys of ``CHANGE``'s rows) to volumes of one grid;
    ``labels`` are its tissue labels (0 background, 1 CSF, 2 GM, 3 WM; the brain is label > 0).
    Returns the new images (float32; the inputs are not modified), the lesion mask (uint8,
    inside the brain, the same for every contrast) and a JSON-ready description.
    """
    labels = np.asarray(labels)
    brain = labels > 0
    if not brain.any():
        raise InputError(None, "tissue labels are empty; nowhere to place a lesion")
    unknown = sorted(set(images) - set(CHANGE["ms"]))
    if unknown or any(np.shape(v) != labels.shape for v in images.values()):
        raise InputError(None, f"lesions need contrasts of {sorted(CHANGE['ms'])} on the labels' "
                               f"grid {labels.shape}; got {unknown or 'another grid'}")
    kind = str(rng.choice(KINDS)) if kind is None else kind
    if kind not in KINDS:
        raise InputError(None, f"unknown lesion kind {kind!r} (known: {', '.join(KINDS)})")
    spacing = np.broadcast_to(np.asarray(spacing_mm, float), (3,)).copy()
    depth = ndi.distance_transform_edt(brain, sampling=spacing)
    parenchyma = ndi.gaussian_filter((labels >= 2).astype(np.float32), 0.7)
    if kind == "ms":
        parts = _ms_parts(labels, depth, spacing, rng)
    elif kind == "tumour":
        parts = _tumour_parts(labels, depth, parenchyma, spacing, rng)
    else:
        parts = _stroke_parts(labels, depth, parenchyma, spacing, rng)
    parts = [(tissue, weight * brain) for tissue, weight in parts]
    mask = np.zeros(labels.shape, bool)
    for _, weight in parts:
        mask |= weight > 0.5
    factors = [float(rng.uniform(0.8, 1.2)) for _ in parts]
    textured = [_textured(weight, spacing, rng) for _, weight in parts]
    out = {}
    for contrast, image in images.items():
        image = np.asarray(image, np.float32)
        wm = image[labels == 3] if (labels == 3).any() else image[brain]
        level = float(np.median(wm))
        change = np.zeros(labels.shape, np.float32)
        for (tissue, _), factor, weight in zip(parts, factors, textured, strict=True):
            change += np.float32(CHANGE[tissue][contrast] * factor * level) * weight
        out[contrast] = _paint(image, change, float(np.percentile(image[brain], 1)))
    info = {"kind": kind, "parts": [t for t, _ in parts],
            "factors": [round(f, 4) for f in factors], "voxels": int(mask.sum())}
    return out, mask.astype(np.uint8), info
