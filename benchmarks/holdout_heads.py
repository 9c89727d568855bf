"""Hold-out raw heads made independently of medidiff's raw example generator.

Check data that differs on purpose from what the pipeline is tuned on (``medidiff data example
--raw``): another brain (nilearn's MNI 2009a T1, 1 mm, its own rendering) inside the 2009c
head, scaled 0.88-1.12 per axis and turned (rotations up to 15 degrees, shifts up to 20 mm),
other protocols (1 mm sagittal as IXI's T1, thick axial, coronal, oblique slabs up to 10
degrees), fields of view that cut the vertex or the chin, a stronger bias field (up to about
+-40%), another scalp-to-brain contrast and gamma, Rician noise everywhere and int16 units.
Nothing here calls ``medidiff.data.raw``; only the lesions come from ``medidiff.data.lesions``.

For every subject it writes the raw head (``heads/``), the same subject skull-stripped in its
own space (``brains-native/``: the head times the true brain mask) and in template space
(``brains-mni/``: on the packaged 2 mm template grid), the subject in template space with its
skull (``registered/``), and the lesion and brain masks on each grid.

    python benchmarks/holdout_heads.py OUT [--subjects 13] [--seed 100]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi
from scipy.spatial.transform import Rotation

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from medidiff.data.example import template_dir  # noqa: E402
from medidiff.data.lesions import add_lesion  # noqa: E402

NECK_MM = 90
TEMPLATES = REPO / "medidiff" / "preprocess" / "templates"
# protocol: spacing (mm) along the array axes, extent (mm) along them, slice direction
PROTOCOLS = {
    "sagittal-1mm": {"spacing": (1.2, 0.9375, 0.9375), "extent": (180, 256, 256), "axes": "ASR",
                     "shift": (0, 0, -40)},
    "axial-thick": {"spacing": (0.9, 0.9, 5.0), "extent": (230, 230, 150), "axes": "LPS"},
    "coronal": {"spacing": (1.0, 1.0, 3.0), "extent": (220, 240, 220), "axes": "LSA",
                "shift": (0, 0, -30)},
    "axial-3mm-oblique": {"spacing": (1.2, 1.2, 3.0), "extent": (240, 240, 140), "axes": "RPI"},
}


def _read(path: Path) -> tuple[np.ndarray, np.ndarray]:
    image = nib.load(path)
    return np.asarray(image.dataobj, np.float32), image.affine.copy()


def canvas() -> dict:
    """The 2009a brain inside the 2009c head, on nilearn's 1 mm 2009a grid (MNI mm)."""
    brain, affine = _read(template_dir() / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
    brain /= brain.max()
    head2, head_affine = _read(TEMPLATES / "t1_head.nii.gz")
    head2 /= head2.max()
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in brain.shape], indexing="ij")).reshape(3, -1)
    to_head = np.linalg.inv(head_affine) @ affine
    coords = to_head[:3, :3] @ grid + to_head[:3, 3:]
    head = ndi.map_coordinates(head2, coords, order=1).reshape(brain.shape).astype(np.float32)
    inside = ndi.binary_erosion(brain > 0.02, iterations=1)
    # a neck: the lowest axial slice of the head repeated 90 mm further down, narrowing a little
    # (the template stops below the cerebellum; scanners see the neck, which moves the head's
    # centre of mass and extends what registration has to ignore)
    neck = NECK_MM
    bottom = head[:, :, 2]
    layers = []
    for k in range(neck, 0, -1):
        shrink = 1.0 - 0.15 * k / neck
        layer = ndi.zoom(bottom, shrink, order=1)
        pad = [((n - m) // 2, n - m - (n - m) // 2) for n, m in
               zip(bottom.shape, layer.shape, strict=True)]
        layers.append(np.pad(layer, pad))
    head = np.concatenate([np.stack(layers, axis=2), head], axis=2)
    pad = ((0, 0), (0, 0), (neck, 0))
    brain, inside = np.pad(brain, pad), np.pad(inside, pad)
    affine = affine.copy()
    affine[:3, 3] -= affine[:3, 2] * neck
    return {"head": head, "brain_image": brain, "brain": inside, "affine": affine}


def _oriented_affine(codes: str, spacing, extent_mm, centre, tilt: np.ndarray) -> tuple:
    """A grid's shape and RAS affine: array axes along ``codes``, centred on ``centre``."""
    ornt = nib.orientations.axcodes2ornt(tuple(codes))
    linear = np.zeros((3, 3))
    shape = []
    for axis, (ras, flip) in enumerate(ornt.astype(int)):
        linear[ras, axis] = flip * spacing[axis]
        shape.append(int(math.ceil(extent_mm[axis] / spacing[axis])))
    linear = tilt @ linear
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = centre - linear @ ((np.array(shape) - 1) / 2)
    return tuple(shape), affine


def _smooth_field(shape, rng, cells=4) -> np.ndarray:
    coarse = rng.standard_normal((cells,) * 3)
    field = ndi.zoom(coarse, [n / cells for n in shape], order=3)[tuple(slice(0, n) for n in shape)]
    return (field / max(np.abs(field).max(), 1e-6)).astype(np.float32)


def _subject(base: dict, rng: np.random.Generator, lesion: bool) -> dict:
    """One subject in MNI space (1 mm canvas): contrast, lesion; and its pose."""
    gamma = rng.uniform(0.7, 1.4)
    scalp = rng.uniform(0.8, 1.6)
    brain_gain = rng.uniform(0.85, 1.15)
    image = np.where(base["brain"], base["brain_image"] * brain_gain, base["head"] * scalp)
    image = np.clip(image, 0, None) ** gamma
    mask = np.zeros(image.shape, np.uint8)
    if lesion:
        image, mask, _ = add_lesion(image.astype(np.float32), base["brain"], 1.0, rng)
    scale = rng.uniform(0.88, 1.12, 3)
    rotation = Rotation.from_euler("xyz", rng.uniform(-15, 15, 3), degrees=True).as_matrix()
    centre = np.array([0.0, -18.0, 18.0])
    pose = np.eye(4)  # MNI mm -> native world mm
    pose[:3, :3] = rotation @ np.diag(scale)
    pose[:3, 3] = centre + rng.uniform(-20, 20, 3) - pose[:3, :3] @ centre
    return {"image": image.astype(np.float32), "mask": mask, "pose": pose, "gamma": gamma,
            "scalp": scalp}


def _sample(volume, volume_affine, shape, affine, pose, order) -> np.ndarray:
    """``volume`` (MNI space) on a native grid: native voxel -> world -> MNI -> volume voxel."""
    matrix = np.linalg.inv(volume_affine) @ np.linalg.inv(pose) @ affine
    out = np.float32 if order else volume.dtype
    return ndi.affine_transform(volume, matrix[:3, :3], matrix[:3, 3], output_shape=shape,
                                order=order, output=out, prefilter=False)


def _scanner(image: np.ndarray, rng) -> np.ndarray:
    """Bias field (up to about +-40%), Rician noise everywhere, int16 at a random gain."""
    bias = np.exp(rng.uniform(0.15, 0.35) * _smooth_field(image.shape, rng))
    image = image * bias
    sigma = rng.uniform(0.015, 0.04) * float(np.percentile(image[image > 0.05], 99))
    noisy = np.hypot(image + rng.normal(0, sigma, image.shape), rng.normal(0, sigma, image.shape))
    gain = math.exp(rng.uniform(math.log(200.0), math.log(4000.0)))
    return np.clip(np.round(noisy * gain), 0, 32767).astype(np.int16)


def _save(array, affine, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), path)
    return str(path)


def make(out: Path, subjects: int = 13, seed: int = 100) -> dict:
    base = canvas()
    template = nib.load(TEMPLATES / "t1_head.nii.gz")
    t_shape, t_affine = template.shape, template.affine
    identity = np.eye(4)
    entries = []
    for index in range(subjects):
        rng = np.random.default_rng([seed, index])
        name = f"hold-{index:03d}"
        lesion = index % 3 != 0  # about two thirds lesioned
        subject = _subject(base, rng, lesion)
        kind = list(PROTOCOLS)[index % len(PROTOCOLS)]
        spec = PROTOCOLS[kind]
        tilt = Rotation.from_euler("xyz", rng.uniform(-10, 10, 3) * (kind.endswith("oblique")),
                                   degrees=True).as_matrix()
        # the field of view: centred near the head, shifted so it may cut the vertex or chin
        centre = subject["pose"][:3, :3] @ np.array([0, -18.0, 18.0]) + subject["pose"][:3, 3]
        centre = centre + rng.uniform(-12, 12, 3) + np.asarray(spec.get("shift", (0, 0, 0)))
        shape, affine = _oriented_affine(spec["axes"], spec["spacing"], spec["extent"], centre,
                                         tilt)
        head = _sample(subject["image"], base["affine"], shape, affine, subject["pose"], 1)
        brain = _sample(base["brain"].astype(np.uint8), base["affine"], shape, affine,
                        subject["pose"], 0)
        mask = _sample(subject["mask"], base["affine"], shape, affine, subject["pose"], 0)
        scan = _scanner(head, rng)
        entry = {"case": name, "protocol": kind, "lesion": bool(mask.any()),
                 "pose": subject["pose"].round(6).tolist(), "shape": list(shape)}
        entry["head"] = _save(scan, affine, out / "heads" / f"{name}.nii.gz")
        entry["brain_native"] = _save((scan * brain).astype(np.int16), affine,
                                      out / "brains-native" / f"{name}.nii.gz")
        entry["mask"] = _save(mask, affine, out / "masks" / f"{name}.nii.gz")
        entry["brain"] = _save(brain, affine, out / "brain-masks" / f"{name}.nii.gz")
        # the same subject in template space (2 mm template grid, 1 mm canvas smoothed first)
        smooth = ndi.gaussian_filter(subject["image"], 0.7)
        mni = _sample(smooth, base["affine"], t_shape, t_affine, identity, 1)
        mni_brain = _sample(base["brain"].astype(np.uint8), base["affine"], t_shape, t_affine,
                            identity, 0)
        mni_mask = _sample(subject["mask"], base["affine"], t_shape, t_affine, identity, 0)
        rng_mni = np.random.default_rng([seed, index, 1])
        entry["registered"] = _save(_scanner(mni, rng_mni), t_affine,
                                    out / "registered" / f"{name}.nii.gz")
        entry["brain_mni"] = _save((_scanner(mni, rng_mni) * mni_brain).astype(np.int16),
                                   t_affine, out / "brains-mni" / f"{name}.nii.gz")
        entry["mask_mni"] = _save(mni_mask, t_affine, out / "masks-mni" / f"{name}.nii.gz")
        entries.append(entry)
        print(f"{name}: {kind}, lesion={entry['lesion']}, shape={shape}", flush=True)
    index = {"description": __doc__.split("\n\n")[0], "seed": seed, "cases": entries}
    (out / "holdout.json").write_text(json.dumps(index, indent=2) + "\n")
    return index


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--subjects", type=int, default=13)
    parser.add_argument("--seed", type=int, default=100)
    args = parser.parse_args()
    make(args.out, args.subjects, args.seed)


if __name__ == "__main__":
    main()
