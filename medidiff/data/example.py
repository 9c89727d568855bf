"""The example data set: synthetic subjects made from the MNI152 2009a template shipped by nilearn.

No patient data can be downloaded, so each subject is the ICBM 2009a nonlinear symmetric template
(Fonov et al. 2011, 1 mm, skull-stripped) moved by a random smooth elastic plus affine
deformation and given a bias field, a gamma curve and Rician noise; its grey and white matter
probability maps move with it and give the tissue labels. Test scans carry synthetic lesions
(``lesions.py``, MOOD / FPI protocol), and healthy held-out scans get noisy and low-resolution
copies (``degrade.py``). Everything is deterministic from ``(seed, subject index)``; the layout
is the one in ``docs/design-notes.md``.
"""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi

from medidiff.data import degrade
from medidiff.data.lesions import add_lesion
from medidiff.errors import InputError
from medidiff.io.write import atomic_write_text, save_nifti

TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
LABELS = {"0": "background", "1": "CSF", "2": "GM", "3": "WM"}
ENHANCE_NOISE = {"noisy05": 0.05, "noisy10": 0.10}  # sigma as a fraction of the reference
ENHANCE_SCALES = {"lowres2": 2, "lowres4": 4}
# Independent random streams per purpose, so adding a draw to one never shifts another.
_SUBJECT, _NOISE, _LESION, _SPLIT, _ENHANCE = range(5)

Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class Template:
    """The MNI152 2009a volumes, float32, cropped to the brain and prepared for ``spacing_mm``."""

    t1: np.ndarray  # in [0, 1], anti-alias smoothed for the output spacing
    gm: np.ndarray  # probability in [0, 1]
    wm: np.ndarray
    brain: np.ndarray  # smoothed indicator: 1.0 inside the skull-stripped brain
    affine: np.ndarray  # voxel -> RAS mm of the cropped arrays
    fov_shape: tuple[int, int, int]  # the uncropped 1 mm template, which sets the field of view
    fov_affine: np.ndarray
    spacing_mm: float


def template_dir() -> Path:
    """The folder of nilearn's packaged data holding the MNI152 2009a files (never downloads).

    Found without importing nilearn, whose import (scikit-learn, pandas) takes seconds.
    """
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise InputError(None, "nilearn is not installed; it ships the MNI152 template we need")
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"


def _read_template() -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The T1, GM and WM volumes as float32 in [0, 1], and their shared affine."""
    arrays = {}
    for key, name in TEMPLATE_FILES.items():
        path = template_dir() / name
        if not path.is_file():
            raise InputError(path, "MNI152 2009a template missing from nilearn; reinstall nilearn")
        image = nib.load(path)
        arrays[key] = np.asarray(image.dataobj, dtype=np.float32) / np.float32(255.0)
    return arrays, image.affine.copy()


def load_template(spacing_mm: float = 2.0) -> Template:
    """Read the template, crop it to the brain and smooth it once against aliasing.

    Sampling a 1 mm volume at ``spacing_mm`` needs a low-pass filter first; a Gaussian with
    FWHM ``sqrt(spacing**2 - 1)`` mm is applied once here, so no subject ever works at 1 mm.
    Cropping (with a margin wider than the filter) makes every later read cheaper.
    """
    arrays, affine = _read_template()
    fov_shape = arrays["t1"].shape
    sigma = math.sqrt(max(spacing_mm**2 - 1.0, 0.0)) / 2.3548
    support = (arrays["t1"] > 0) | (arrays["gm"] > 0) | (arrays["wm"] > 0)
    margin = int(3 * sigma) + 2
    lo, box = [], []
    for axis in range(3):
        used = np.flatnonzero(support.any(axis=tuple(a for a in range(3) if a != axis)))
        lo.append(max(int(used[0]) - margin, 0))
        box.append(slice(lo[-1], int(used[-1]) + margin + 1))
    box = tuple(box)
    arrays = {k: v[box] for k, v in arrays.items()}

    def smooth(a):
        return ndi.gaussian_filter(a, sigma, truncate=3.0) if sigma > 0 else a

    brain = smooth((arrays["t1"] > 0).astype(np.float32))
    # Normalised convolution: dividing by the smoothed mask keeps the brain's rim from
    # darkening by blending with the zero background.
    t1 = np.where(brain > 1e-3, smooth(arrays["t1"]) / np.maximum(brain, 1e-3), 0.0)
    cropped = affine.copy()
    cropped[:3, 3] = affine[:3, :3] @ np.array(lo) + affine[:3, 3]
    return Template(t1.astype(np.float32), smooth(arrays["gm"]), smooth(arrays["wm"]), brain,
                    cropped, tuple(fov_shape), affine, float(spacing_mm))


def output_grid(template: Template) -> tuple[tuple[int, ...], np.ndarray]:
    """Shape and RAS affine of the ``spacing_mm`` grid covering the template's field of view.

    The new grid has the same centre and at least the same extent (197 x 233 x 189 mm gives
    99 x 117 x 95 voxels at 2 mm).
    """
    fine_shape = np.array(template.fov_shape)
    shape = tuple(int(math.ceil(n / template.spacing_mm)) for n in fine_shape)
    centre = template.fov_affine[:3, :3] @ ((fine_shape - 1) / 2) + template.fov_affine[:3, 3]
    affine = np.eye(4)
    affine[:3, :3] = np.diag(np.full(3, template.spacing_mm))
    affine[:3, 3] = centre - affine[:3, :3] @ ((np.array(shape) - 1) / 2)
    return shape, affine


def _smooth_random_field(shape, control_mm, spacing_mm, channels, rng) -> np.ndarray:
    """Random field on a coarse control grid, smoothed and interpolated to ``shape``.

    Returns ``(channels, *shape)`` float32 with values of order 1 (max |value| = 1 per channel).
    """
    coarse = tuple(max(2, int(math.ceil(n * spacing_mm / control_mm)) + 1) for n in shape)
    field = ndi.gaussian_filter(rng.standard_normal((channels, *coarse)), (0, 1, 1, 1))
    field /= np.abs(field).max(axis=(1, 2, 3), keepdims=True)
    fine = F.interpolate(torch.from_numpy(field).float()[None], size=shape, mode="trilinear",
                         align_corners=True)
    return fine[0].numpy()


def _sampling_coordinates(template: Template, shape, affine, rng) -> np.ndarray:
    """Template voxel coordinates ``(3, *shape)`` to read for each output voxel.

    We draw the inverse mapping (output -> template) directly: a random affine about the field
    of view's centre (rotations up to 4 degrees, scaling 0.95-1.05, shifts up to 4 mm) plus a
    smooth elastic displacement of up to 2-5 mm. The inverse of such a map is as random and as
    smooth, so this is a random subject without ever inverting a deformation.
    """
    angles = np.deg2rad(rng.uniform(-4.0, 4.0, 3))
    rotation = np.eye(3)
    for axis, angle in enumerate(angles):
        c, s = math.cos(angle), math.sin(angle)
        i, j = [a for a in range(3) if a != axis]
        r = np.eye(3)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        rotation = rotation @ r
    linear = rotation @ np.diag(rng.uniform(0.95, 1.05, 3))
    shift = rng.uniform(-4.0, 4.0, 3)
    displacement = _smooth_random_field(shape, 24.0, template.spacing_mm, 3, rng)
    displacement *= np.float32(rng.uniform(2.0, 5.0))  # largest shift, mm
    centre = affine[:3, :3] @ ((np.array(shape) - 1) / 2) + affine[:3, 3]
    to_template = np.linalg.inv(template.affine)
    # output voxel -> world -> (affine about the centre) -> template voxel, as one 3x4 matrix
    world = np.eye(4)
    world[:3, :3], world[:3, 3] = linear, centre + shift - linear @ centre
    voxel_map = (to_template @ world @ affine)[:3]
    grid = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    coords = np.empty((3, *shape), dtype=np.float32)
    for row in range(3):
        m = voxel_map[row].astype(np.float32)
        coords[row] = m[0] * grid[0] + m[1] * grid[1] + m[2] * grid[2] + m[3]
        coords[row] += np.tensordot(to_template[row, :3].astype(np.float32), displacement, axes=1)
    return coords


def _read(volume: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """Trilinear read of ``volume`` at voxel ``coords`` (0 outside), float32."""
    return ndi.map_coordinates(volume, coords, order=1, prefilter=False, output=np.float32)


def _tissue_labels(gm: np.ndarray, wm: np.ndarray) -> np.ndarray:
    """1 CSF, 2 GM, 3 WM: argmax of (1 - gm - wm, gm, wm), for voxels inside the brain."""
    csf = np.clip(1.0 - gm - wm, 0.0, None)
    return (np.argmax(np.stack([csf, gm, wm]), axis=0) + 1).astype(np.uint8)


def _intensity(t1: np.ndarray, brain: np.ndarray, shape, spacing_mm, rng) -> np.ndarray:
    """Scanner-like contrast: gamma 0.8-1.2, a smooth +/-10-20% bias field, a global scale."""
    gamma = rng.uniform(0.8, 1.2)
    bias = 1.0 + rng.uniform(0.1, 0.2) * _smooth_random_field(shape, 80.0, spacing_mm, 1, rng)[0]
    scale = rng.uniform(0.85, 1.15)
    image = np.clip(t1, 0.0, 1.0) ** np.float32(gamma) * bias * np.float32(scale)
    return np.where(brain, image, 0.0).astype(np.float32)


def _torch_generator(seed: int, stream: int, index: int) -> torch.Generator:
    """A torch generator seeded from ``(seed, stream, index)`` through numpy's SeedSequence."""
    state = np.random.SeedSequence([seed, stream, index]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


def _rician_in_brain(image: np.ndarray, brain: np.ndarray, fraction: float,
                     generator: torch.Generator) -> np.ndarray:
    """Rician noise with sigma = ``fraction`` of the brain's 99th percentile, kept in the brain.

    Zeroing the background afterwards mimics skull-stripped scans, whose background is 0.
    """
    x = torch.from_numpy(image)[None, None]
    mask = torch.from_numpy(brain)[None, None]
    sigma = fraction * degrade.reference_intensity(x, mask)
    noisy = degrade.add_rician_noise(x, sigma, generator)[0, 0].numpy()
    return np.where(brain, noisy, 0.0).astype(np.float32)


def synthesize_subject(template: Template, seed: int, index: int) -> dict:
    """One healthy subject, deterministic from ``(seed, index)``.

    Returns ``clean`` (before noise), ``image`` (with Rician noise, sigma 1-3% of the brain's
    99th percentile), ``labels`` (uint8), ``brain`` (bool) and ``affine``.
    """
    rng = np.random.default_rng([seed, _SUBJECT, index])
    shape, affine = output_grid(template)
    coords = _sampling_coordinates(template, shape, affine, rng)
    brain = _read(template.brain, coords) > 0.5
    # Intensities and tissue maps are only needed inside the brain: read them there alone.
    inside = coords[:, brain]
    t1 = np.zeros(shape, dtype=np.float32)
    t1[brain] = _read(template.t1, inside)
    clean = _intensity(t1, brain, shape, template.spacing_mm, rng)
    labels = np.zeros(shape, dtype=np.uint8)
    labels[brain] = _tissue_labels(_read(template.gm, inside), _read(template.wm, inside))
    noise = rng.uniform(0.01, 0.03)
    image = _rician_in_brain(clean, brain, noise, _torch_generator(seed, _NOISE, index))
    return {"clean": clean, "image": image, "labels": labels, "brain": brain, "affine": affine,
            "noise_fraction": float(noise)}


def split_roles(subjects: int, seed: int) -> list[str]:
    """Role of each subject: "train", "val", "test-lesion" or "test-healthy".

    60/15/25% (24/6/10 of 40) in index order, with at least 1 validation and 2 test subjects;
    about two thirds of the test subjects get lesions, at least one is healthy (two from six
    test subjects on) and at least one is lesioned. Which ones is drawn from the seed.
    """
    n_test = max(2, round(0.25 * subjects))
    n_val = max(1, round(0.15 * subjects))
    n_train = subjects - n_test - n_val
    if n_train < 1:
        raise InputError(None, f"need at least 4 subjects for train, val and test, got {subjects}")
    n_healthy = max(2 if n_test >= 6 else 1, n_test - round(2 * n_test / 3))
    healthy = set(np.random.default_rng([seed, _SPLIT]).permutation(n_test)[:n_healthy].tolist())
    tests = ["test-healthy" if i in healthy else "test-lesion" for i in range(n_test)]
    return ["train"] * n_train + ["val"] * n_val + tests


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    """Save a ``.nii.gz`` atomically and byte-identically across runs (fast compression)."""
    save_nifti(array, affine, path, compresslevel=1)


def _coarse_affine(affine: np.ndarray, factor: int) -> np.ndarray:
    """Affine of the grid made by ``degrade.downsample(..., factor, dims=(0, 1))``."""
    step = np.eye(4)
    step[0, 0] = step[1, 1] = factor
    step[0, 3] = step[1, 3] = (factor - 1) / 2  # coarse voxel centre in fine voxel units
    return affine @ step


def _enhance_copies(subject: dict, seed: int, index: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Noisy and low-resolution copies of a subject's noise-free scan, with their affines."""
    clean, brain, affine = subject["clean"], subject["brain"], subject["affine"]
    copies = {"clean": (clean, affine)}
    for offset, (name, fraction) in enumerate(ENHANCE_NOISE.items()):
        generator = _torch_generator(seed, _ENHANCE, 2 * index + offset)
        copies[name] = (_rician_in_brain(clean, brain, fraction, generator), affine)
    for name, factor in ENHANCE_SCALES.items():
        low = degrade.downsample(torch.from_numpy(clean)[None, None], factor, dims=(0, 1))
        copies[name] = (low[0, 0].numpy(), _coarse_affine(affine, factor))
    return copies


def _enhance_subjects(roles: list[str]) -> list[int]:
    """Healthy test subjects, topped up with validation subjects to at least two."""
    chosen = [i for i, r in enumerate(roles) if r == "test-healthy"]
    spare = [i for i, r in enumerate(roles) if r == "val"]
    return sorted(chosen + spare[: max(0, 2 - len(chosen))])


def _check_out_dir(out_dir: Path) -> None:
    """Refuse a file, or a folder that already holds a data set; nothing is overwritten."""
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(out_dir, "is a file, not a folder")
    if (out_dir / "dataset.json").exists():
        raise InputError(out_dir, "already holds a data set; choose another folder")


def _save_subject(out_dir: Path, name: str, role: str, subject: dict, seed: int, index: int) -> dict:
    """Write one subject's files; return its dataset.json entry (paths relative to out_dir)."""
    folder = {"train": "train", "val": "val"}.get(role, "test")
    entry = {"image": f"{folder}/images/{name}.nii.gz", "label": f"{folder}/labels/{name}.nii.gz"}
    image = subject["image"]
    if folder == "test":
        mask = np.zeros(image.shape, dtype=np.uint8)
        if role == "test-lesion":
            rng = np.random.default_rng([seed, _LESION, index])
            spacing = float(subject["affine"][0, 0])
            image, mask, _ = add_lesion(image, subject["brain"], spacing, rng)
        entry["mask"] = f"test/masks/{name}.nii.gz"
        entry["lesion"] = role == "test-lesion"
        write_nifti(out_dir / entry["mask"], mask, subject["affine"])
    write_nifti(out_dir / entry["image"], image, subject["affine"])
    write_nifti(out_dir / entry["label"], subject["labels"], subject["affine"])
    return entry


def make_example_dataset(
    out_dir: str | Path,
    seed: int = 0,
    subjects: int = 40,
    spacing_mm: float = 2.0,
    progress: Progress | None = None,
) -> Path:
    """Build the example data set (layout in ``docs/design-notes.md``); return dataset.json.

    Subjects come from the MNI152 2009a template (see the module docstring); ``progress`` is
    called as ``progress(done, total, message)`` after each subject. dataset.json is written
    last, so its presence marks a complete data set.
    """
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise InputError(None, f"seed must be a non-negative integer, got {seed!r}")
    if not 0.5 <= float(spacing_mm) <= 10.0:
        raise InputError(None, f"spacing_mm must be between 0.5 and 10, got {spacing_mm}")
    roles = split_roles(int(subjects), int(seed))
    enhance = set(_enhance_subjects(roles))
    template = load_template(float(spacing_mm))
    lists = {"training": [], "validation": [], "test": [], "enhance": []}
    for index, role in enumerate(roles):
        name = f"sub-{index:03d}"
        subject = synthesize_subject(template, int(seed), index)
        entry = _save_subject(out_dir, name, role, subject, int(seed), index)
        lists[{"train": "training", "val": "validation"}.get(role, "test")].append(entry)
        if index in enhance:
            copies = _enhance_copies(subject, int(seed), index)
            for kind, (array, affine) in copies.items():
                write_nifti(out_dir / "enhance" / kind / f"{name}.nii.gz", array, affine)
            lists["enhance"].append({k: f"enhance/{k}/{name}.nii.gz" for k in copies})
        if progress is not None:
            progress(index + 1, len(roles), f"{name} ({role})")
    return _write_dataset_json(out_dir, lists, int(seed), float(spacing_mm))


def _write_dataset_json(out_dir: Path, lists: dict, seed: int, spacing_mm: float) -> Path:
    """Decathlon-style index of the data set, with the medidiff extras (test flags, enhance)."""
    index = {
        "name": "medidiff-example",
        "description": (
            "Synthetic T1-weighted brain scans derived from the MNI152 2009a nonlinear symmetric "
            "template (Fonov et al. 2011) shipped with nilearn: random elastic and affine "
            "deformations, bias field, gamma and Rician noise; tissue labels from its GM/WM "
            "maps; synthetic lesions (MOOD/FPI protocol) in test scans."
        ),
        "reference": "https://nist.mni.mcgill.ca/icbm-152-nonlinear-atlases-2009/",
        "licence": "MNI ICBM152 2009 template licence (free use with attribution)",
        "tensorImageSize": "3D",
        "modality": {"0": "T1"},
        "labels": LABELS,
        "numTraining": len(lists["training"]),
        "numValidation": len(lists["validation"]),
        "numTest": len(lists["test"]),
        "seed": seed,
        "spacing_mm": spacing_mm,
        **lists,
    }
    path = out_dir / "dataset.json"
    atomic_write_text(path, json.dumps(index, indent=2) + "\n")
    return path
