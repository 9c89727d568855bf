"""The raw example data set: synthetic scans as a scanner writes them, for the preprocessing stage.

The example data set (``example.py``) lies in template space, skull-stripped. Here each subject
keeps its skull and comes in scanner form, with the ground truth a preprocessing pipeline
(registration to a head template, skull stripping, bias correction) is evaluated against:

1. a head of its own: the packaged MNI ICBM152 2009c T1 head template (2 mm), scaled per axis by
   0.92-1.08 about the head's centre and moved by a smooth elastic field (example.py's random
   field, at most 2-4 mm; ``anatomy_variability`` multiplies it); its brain mask and tissue
   labels (from nilearn's 2009a GM/WM maps, same MNI space) move with it. Test subjects get
   lesions inside the brain (``lesions.py``). This subject on the template's 2 mm grid is kept
   under ``registered/``.
2. a random head pose (rotations up to 15 degrees about each axis, shifts up to 20 mm, about
   the head's centre): ``pose`` maps template-space world mm to native world mm (RAS).
3. a native grid, one of three acquisitions (thick-slice axial, 2 mm sagittal 3D, coronal) in one
   of several axis orientations, covering the posed head with a margin; the posed subject is
   resampled onto it (linear for the image, nearest for masks and labels), then gets a
   bias field, a gamma curve and Rician noise (example.py's, noise everywhere as in a magnitude
   image), and scanner units (int16, a random gain).
4. about one subject in four is written as a DICOM series folder instead of NIfTI; its ground
   truth lies on exactly the grid the project's reader returns for that folder.

``contrasts`` (default ``("t1",)``, today's data set byte for byte) writes each subject in each
contrast: T2 from the packaged 2009c T2 head (same grid as the T1), FLAIR synthesised from the T2
and the tissue maps with the fluid nulled (``_flair``), PD as the T2 with less contrast. Every
contrast shares the subject's deformation and its lesion mask (``lesions_mc.py``: MS-like,
tumour with oedema or stroke-like, as each contrast shows them); each is acquired on a native
grid of its own (an acquisition drawn per contrast) after a small extra rigid motion (up to 2
degrees and 2 mm) on top of the subject's pose, with its own bias field, noise and gain. Labels,
brain and lesion masks are written on the first contrast's grid; a test subject's lesion mask
also on each contrast's own grid (``test/masks/NAME_FLAIR.nii.gz``, ..., named as its scan), for
models of one contrast.

Each dataset.json entry carries the ``pose`` and ``landmarks``: fixed anatomical points in
template MNI mm and the same points in native world mm after the subject's deformation and pose,
so that registration errors can be measured in mm. Everything is deterministic from
``(seed, subject index)``.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi
from scipy.spatial.transform import Rotation

from medidiff.data.contrasts import BIDS_SUFFIX, DISPLAY, canonical
from medidiff.data.example import (
    LABELS,
    Progress,
    _check_out_dir,
    _intensity,
    _read,
    _rician_in_brain,
    _smooth_random_field,
    _tissue_labels,
    _torch_generator,
    load_template,
    split_roles,
    write_nifti,
)
from medidiff.data.lesions import add_lesion
from medidiff.data.lesions_mc import add_contrast_lesions
from medidiff.errors import InputError
from medidiff.io.write import atomic_write_bytes, atomic_write_text, save_nifti

TEMPLATES = Path(__file__).resolve().parents[1] / "preprocess" / "templates"
HEAD_THRESHOLD = 30.0 / 255.0  # the template's background is about 10/255, the scalp above 40
# Fixed anatomical points in template MNI mm (approximations read off the 2009c head template):
# four inside the brain, two eye globe centres, the vertex and the nasion just inside the skin.
LANDMARKS_MM = {
    "anterior_commissure": (0.0, 2.0, -4.0),
    "posterior_commissure": (0.0, -26.0, -2.0),
    "left_temporal_pole": (-40.0, 14.0, -34.0),
    "right_temporal_pole": (40.0, 14.0, -34.0),
    "left_eye": (-32.0, 56.0, -40.0),
    "right_eye": (32.0, 56.0, -40.0),
    "vertex": (0.0, -20.0, 98.0),
    "nasion": (0.0, 84.0, -44.0),
}
# Acquisitions: orientation codes (array axis -> direction; slices always along the last axis,
# as in a DICOM series), in-plane and slice spacings (mm) to draw from. Values are multiples of
# 0.25 mm, so DICOM's decimal strings hold every grid exactly.
ACQUISITIONS = {
    "axial": {"codes": ("LPS", "RAS", "LAS", "LPI"), "in_plane": (1.5, 1.75, 2.0),
              "slice": (3.0, 4.0, 5.0)},
    "sagittal-3d": {"codes": ("PIR", "ASL", "PIL", "ASR"), "in_plane": (2.0,), "slice": (2.0,)},
    "coronal": {"codes": ("LIP", "RSA", "LIA", "RIP"), "in_plane": (2.0,), "slice": (3.5,)},
}
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
# Own random streams (example.py uses 0-4 for its own purposes).
_DEFORM, _POSE, _GRID, _FORMAT, _LESION, _SCANNER, _NOISE = range(20, 27)
# Streams of the contrasts after the first (the first keeps the streams above); torch noise of
# the contrast in channel k > 0 comes from stream _CONTRAST_NOISE + k.
_MOTION, _CONTRAST_GRID, _CONTRAST_SCANNER, _CONTRAST_LESION = range(27, 31)
_CONTRAST_NOISE = 40
CONTRASTS = ("t1", "t2", "flair", "pd")  # the contrasts this generator can write
MOTION_DEG, MOTION_MM = 2.0, 2.0  # between the scans of one subject, about each axis
# FLAIR from T2 (template units): T2 above FLUID[0] is partly fluid, pure at FLUID[1]; tissue
# keeps half of T2's contrast above WM_T2 (the 2009c T2's white matter, about 0.42).
FLUID, WM_T2, FLUID_SIGNAL = (0.6, 0.9), 0.42, 0.05


# -- the template ------------------------------------------------------------------------------


@cache
def head_template() -> dict:
    """The packaged 2 mm head template and brain mask (float32 in [0, 1]), with the 2009a GM/WM.

    ``gm``/``wm`` are nilearn's 1 mm 2009a maps smoothed for 2 mm (``load_template``), read
    through ``gm_affine``; the rest share the packaged grid's ``affine``.
    """
    arrays = {}
    for key, name in (("t1", "t1_head.nii.gz"), ("brain", "brain_mask.nii.gz")):
        path = TEMPLATES / name
        if not path.is_file():
            raise InputError(path, "packaged head template missing; reinstall medidiff")
        image = nib.load(path)
        arrays[key] = np.asarray(image.dataobj, dtype=np.float32)
    arrays["t1"] /= np.float32(255.0)
    affine = image.affine.copy()
    head = _head_mask(arrays["t1"])
    # The template's background is residual averaging noise, not signal: an MR magnitude image
    # has nothing but noise there, which the scanner stage adds (and zeros compress well).
    arrays["t1"] *= head
    lo, hi = (affine[:3, :3] @ b + affine[:3, 3] for b in _bounds(head))
    tissue = load_template(2.0)
    return {**arrays, "affine": affine, "centre": (lo + hi) / 2, "head": head,
            "gm": tissue.gm, "wm": tissue.wm, "gm_affine": tissue.affine}


@cache
def t2_template() -> np.ndarray:
    """The packaged 2 mm 2009c T2 head (float32 in [0, 1]) on the T1's grid, inside its head."""
    path = TEMPLATES / "t2_head.nii.gz"
    if not path.is_file():
        raise InputError(path, "packaged T2 head template missing; reinstall medidiff")
    t2 = np.asarray(nib.load(path).dataobj, dtype=np.float32) / np.float32(255.0)
    return (t2 * head_template()["head"]).astype(np.float32)


def _flair(t2: np.ndarray, brain: np.ndarray, csf: np.ndarray) -> np.ndarray:
    """A FLAIR from a T2: the fluid a voxel holds is nulled, the tissue keeps half T2's contrast.

    Fluid is read from T2 brightness (CSF, and outside the brain the eyes) and, inside the brain,
    from the CSF fraction of the tissue maps (``csf``, at the brain's voxels), since a voxel of
    CSF and tissue is not bright on T2 yet is dark on FLAIR; that fraction, smoothed, also
    spills over the brain mask's edge, so the CSF just outside it is nulled too. Inversion
    recovery leaves the fluid ``FLUID_SIGNAL``; grey matter comes out a little brighter than
    white matter.
    """
    fluid = np.clip((t2 - FLUID[0]) / (FLUID[1] - FLUID[0]), 0.0, 1.0)
    in_csf = np.zeros_like(fluid)
    in_csf[brain] = np.clip((csf - 0.2) / 0.6, 0.0, 1.0)
    # spilt across the brain mask's edge, which is no edge in the image
    fluid = np.maximum(fluid, np.maximum(in_csf, ndi.gaussian_filter(in_csf, 0.8)))
    tissue = np.where(t2 > WM_T2, WM_T2 + 0.5 * (np.minimum(t2, FLUID[0]) - WM_T2), t2)
    return ((1.0 - fluid) * tissue + fluid * FLUID_SIGNAL).astype(np.float32)


def _contrast_images(t1, t2, brain, csf, contrasts) -> dict[str, np.ndarray]:
    """The subject in each contrast (T1 always: it sets the head's extent)."""
    images = {"t1": t1}
    if "t2" in contrasts:
        images["t2"] = t2
    if "flair" in contrasts:
        images["flair"] = _flair(t2, brain, csf)
    if "pd" in contrasts:  # PD: T2's order of tissues with less contrast between them
        images["pd"] = (t2 ** np.float32(0.6)).astype(np.float32)
    return images


def _head_mask(t1: np.ndarray) -> np.ndarray:
    """The head: the largest component above ``HEAD_THRESHOLD``, holes filled, one voxel wider."""
    labels, count = ndi.label(t1 > HEAD_THRESHOLD)
    sizes = ndi.sum_labels(np.ones_like(labels), labels, range(1, count + 1))
    head = ndi.binary_fill_holes(labels == 1 + int(np.argmax(sizes)))
    return ndi.binary_dilation(head)


def _bounds(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First and last voxel index of ``mask`` along each axis."""
    idx = np.nonzero(mask)
    return np.array([i.min() for i in idx], float), np.array([i.max() for i in idx], float)


def _world(affine: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """Apply a 4x4 affine to ``(3, ...)`` coordinates."""
    shift = affine[:3, 3].reshape(3, *[1] * (coords.ndim - 1))
    return np.tensordot(affine[:3, :3], coords, axes=1) + shift


# -- one subject in template space -------------------------------------------------------------


def _deformation(tpl: dict, rng: np.random.Generator, variability: float = 1.0) -> dict:
    """A per-axis scaling about the head's centre and a smooth displacement (mm, RAS).

    ``variability`` multiplies the displacement (largest shift 2 to 4 mm at 1, about 1.2 mm
    on average), for data sets whose anatomy varies more than the default's.

    The map drawn is subject -> template: ``phi(x) = c + (x - c) / scale + d(x)``, with ``d``
    sampled on the template grid (the subject's grid too). A subject with ``scale`` > 1 is a
    larger head than the template.
    """
    shape = tpl["t1"].shape
    scale = rng.uniform(0.92, 1.08, 3)
    displacement = _smooth_random_field(shape, 32.0, 2.0, 3, rng)
    displacement *= np.float32(rng.uniform(2.0, 4.0))  # largest shift, mm
    displacement *= np.float32(variability)  # exact at 1
    return {"scale": scale, "displacement": displacement, "centre": tpl["centre"]}


def _displacement(tpl: dict, field: dict, points_mm: np.ndarray) -> np.ndarray:
    """``d`` at subject world points ``(3, N)`` (mm), read trilinearly."""
    voxels = _world(np.linalg.inv(tpl["affine"]), points_mm)
    return np.stack([ndi.map_coordinates(channel, voxels, order=1, mode="nearest")
                     for channel in field["displacement"]])


def _to_template(tpl: dict, field: dict, points_mm: np.ndarray) -> np.ndarray:
    """``phi`` at subject world points ``(3, N)`` (mm)."""
    c = field["centre"][:, None]
    return c + (points_mm - c) / field["scale"][:, None] + _displacement(tpl, field, points_mm)


def _from_template(tpl: dict, field: dict, points_mm: np.ndarray) -> np.ndarray:
    """Subject world points ``q`` with ``phi(q) = p`` for template points ``p`` (3, N).

    Fixed-point iteration ``q <- c + scale * (p - c - d(q))``: it converges since the field is
    smooth (a few mm over tens of mm), far below the rate at which it would diverge.
    """
    c, s = field["centre"][:, None], field["scale"][:, None]
    q = c + s * (points_mm - c)
    for _ in range(30):
        q = c + s * (points_mm - c - _displacement(tpl, field, q))
    return q


def _subject(tpl: dict, seed: int, index: int, lesion: bool, attempt: int,
             variability: float, contrasts: tuple[str, ...] = ("t1",)) -> dict:
    """The subject on the template grid: head (skull on) in each contrast (``images``, T1
    always), brain mask, labels, lesion mask and the lesion's description (None without)."""
    field = _deformation(tpl, np.random.default_rng([seed, _DEFORM, index]), variability)
    shape, affine = tpl["t1"].shape, tpl["affine"]
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"))
    world = _to_template(tpl, field, _world(affine, grid).reshape(3, -1))
    coords = _world(np.linalg.inv(affine), world).astype(np.float32)
    image = _read(tpl["t1"], coords).reshape(shape)
    brain = (_read(tpl["brain"], coords) > 0.5).reshape(shape)
    inside = _world(np.linalg.inv(tpl["gm_affine"]), world[:, brain.ravel()])
    gm, wm = _read(tpl["gm"], inside), _read(tpl["wm"], inside)
    labels = np.zeros(shape, np.uint8)
    labels[brain] = _tissue_labels(gm, wm)
    mask, info = np.zeros(shape, np.uint8), None
    if contrasts == ("t1",):  # the T1 data set as it always was, with lesions.py's lesions
        if lesion:
            lesion_rng = np.random.default_rng([seed, _LESION, index, attempt])
            image, mask, _ = add_lesion(image, brain, 2.0, lesion_rng)
        images = {"t1": image}
    else:
        t2 = _read(t2_template(), coords).reshape(shape)
        images = _contrast_images(image, t2, brain, 1.0 - gm - wm, contrasts)
        if lesion:
            lesion_rng = np.random.default_rng([seed, _CONTRAST_LESION, index, attempt])
            images, mask, info = add_contrast_lesions(images, labels, 2.0, lesion_rng)
    return {"images": images, "brain": brain.astype(np.uint8), "labels": labels, "mask": mask,
            "field": field, "lesion": info}


# -- pose and native grid ----------------------------------------------------------------------


def _pose(centre: np.ndarray, rng: np.random.Generator, degrees: float = 15.0,
          mm: float = 20.0) -> np.ndarray:
    """Rigid 4x4 about ``centre`` (template world mm -> native world mm): rotations up to
    ``degrees`` about each axis, shifts up to ``mm`` along each (also the motion between scans,
    native world -> native world)."""
    rotation = Rotation.from_euler("xyz", rng.uniform(-degrees, degrees, 3),
                                   degrees=True).as_matrix()
    pose = np.eye(4)
    pose[:3, :3] = rotation
    pose[:3, 3] = centre + rng.uniform(-mm, mm, 3) - rotation @ centre
    return pose


def _acquisition_kinds(subjects: int, seed: int, channel: int = 0) -> list[str]:
    """The acquisition of each subject: every three consecutive subjects get all three kinds
    (drawn anew for each contrast after the first, ``channel`` > 0)."""
    names = list(ACQUISITIONS)
    rng = np.random.default_rng([seed, _GRID] if channel == 0 else [seed, _CONTRAST_GRID, channel])
    rounds = -(-subjects // len(names))
    return [names[i] for _ in range(rounds) for i in rng.permutation(len(names))][:subjects]


def native_grid(kind: str, head_mm: np.ndarray, rng: np.random.Generator) -> dict:
    """Shape, RAS affine and orientation of a grid of ``kind`` covering ``head_mm`` (3, N).

    The affine is built from the orientation codes with nibabel's ``axcodes2ornt``; the field
    of view is the head's bounding box plus a 5-12 mm margin on each side, its origin rounded
    to 0.25 mm.
    """
    spec = ACQUISITIONS[kind]
    codes = spec["codes"][rng.integers(len(spec["codes"]))]
    in_plane = spec["in_plane"][rng.integers(len(spec["in_plane"]))]
    spacing = np.array([in_plane, in_plane, spec["slice"][rng.integers(len(spec["slice"]))]])
    lo = head_mm.min(axis=1) - rng.uniform(5.0, 12.0, 3)
    hi = head_mm.max(axis=1) + rng.uniform(5.0, 12.0, 3)
    ornt = nib.orientations.axcodes2ornt(tuple(codes))
    affine, shape = np.eye(4), []
    for axis, (ras, flip) in enumerate(ornt.astype(int)):
        n = int(math.ceil((hi[ras] - lo[ras]) / spacing[axis])) + 1
        shape.append(n)
        affine[:3, axis] = 0.0
        affine[ras, axis] = flip * spacing[axis]
        start = lo[ras] if flip > 0 else lo[ras] + (n - 1) * spacing[axis]
        affine[ras, 3] = round(start * 4) / 4
    return {"shape": tuple(shape), "affine": affine, "orientation": codes, "acquisition": kind,
            "spacing_mm": [float(s) for s in spacing]}


def _resample(volume: np.ndarray, matrix: np.ndarray, shape, order: int):
    """``volume`` read at ``matrix @ (native voxel)`` (4x4, native voxel -> template voxel)."""
    out = np.float32 if order else volume.dtype
    return ndi.affine_transform(volume, matrix[:3, :3], matrix[:3, 3], output_shape=tuple(shape),
                                order=order, output=out, prefilter=False)


def _scanner_image(posed: np.ndarray, grid: dict, seed: int, index: int,
                   channel: int = 0) -> tuple[np.ndarray, dict]:
    """Gamma, bias field and global scale (example.py), Rician noise, int16 at a random gain.

    Each contrast (``channel``) is a scan of its own: its own draws of all of them.
    """
    first = channel == 0
    rng = np.random.default_rng([seed, _SCANNER, index] if first
                                else [seed, _CONTRAST_SCANNER, index, channel])
    shape = grid["shape"]
    everywhere = np.ones(shape, bool)
    spacing = float(np.prod(grid["spacing_mm"]) ** (1 / 3))
    unit = posed / np.float32(max(float(posed.max()), 1e-6))
    image = _intensity(unit, everywhere, shape, spacing, rng)
    fraction = float(rng.uniform(0.01, 0.03))
    noise = _torch_generator(seed, _NOISE if first else _CONTRAST_NOISE + channel, index)
    image = _rician_in_brain(image, everywhere, fraction, noise)
    target = math.exp(rng.uniform(math.log(300.0), math.log(3000.0)))  # head's 99th percentile
    gain = target / max(float(np.percentile(image[unit > HEAD_THRESHOLD], 99)), 1e-6)
    scan = np.clip(np.round(image * gain), 0, np.iinfo(np.int16).max).astype(np.int16)
    return scan, {"noise_fraction": round(fraction, 6), "gain": round(float(gain), 6)}


# -- writing -----------------------------------------------------------------------------------


def _lps(vector: np.ndarray) -> list[float]:
    """RAS to LPS (DICOM patient coordinates), rounded, never -0."""
    return [round(float(v), 4) + 0.0 for v in vector * np.array([-1.0, -1.0, 1.0])]


def write_dicom_series(folder: Path, scan: np.ndarray, affine: np.ndarray, seed: int,
                       index: int, description: str, series: int = 0) -> None:
    """One file per slice along the last axis; MONAI's reader gives back ``scan`` and ``affine``.

    Array axis 0 runs along the rows (DICOM's row direction, ``Columns`` long), axis 1 down the
    columns, axis 2 across slices; positions and orientations are in LPS. No patient
    identifiers and no dates; UIDs are derived from ``(seed, index)``, so files are reproducible.
    The scans of one subject (``series`` 0, 1, ...: its contrasts) share the study and frame of
    reference; each has its own series and instance UIDs.
    """
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    def uid(*parts) -> str:
        return generate_uid(entropy_srcs=["medidiff-raw", str(seed), str(index), *map(str, parts)])

    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    own = () if series == 0 else (f"series{series}",)  # the first series: UIDs as always
    study, series_uid, frame = uid("study"), uid("series", *own), uid("frame")
    for k in range(scan.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = uid("slice", k, *own)
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MR_IMAGE_STORAGE, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series_uid, frame
        ds.PatientName, ds.PatientID = "anonymous", "anonymous"
        ds.PatientIdentityRemoved, ds.DeidentificationMethod = "YES", "synthetic data"
        ds.Modality, ds.SeriesDescription, ds.ImageType = "MR", description, ["DERIVED", "PRIMARY"]
        ds.SeriesNumber, ds.InstanceNumber = series + 1, k + 1
        rows, columns = _lps(affine[:3, 0] / spacing[0]), _lps(affine[:3, 1] / spacing[1])
        ds.ImageOrientationPatient = rows + columns  # along a row, down a column
        position = _lps(affine[:3, :3] @ [0.0, 0.0, k] + affine[:3, 3])
        ds.ImagePositionPatient = position
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]  # between rows, between columns
        ds.SliceThickness = ds.SpacingBetweenSlices = float(spacing[2])
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1.0, 0.0, "US"
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = scan.shape[1], scan.shape[0]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = np.ascontiguousarray(scan[:, :, k].T).astype("<i2").tobytes()
        buffer = io.BytesIO()
        pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
        atomic_write_bytes(folder / f"slice{k:03d}.dcm", buffer.getvalue())


def _dicom_subjects(roles: list[str], seed: int) -> set[int]:
    """About one subject in four: at least one training and one test subject, the rest drawn."""
    rng = np.random.default_rng([seed, _FORMAT])
    train = [i for i, r in enumerate(roles) if r == "train"]
    test = [i for i, r in enumerate(roles) if r.startswith("test")]
    chosen = {train[rng.integers(len(train))], test[rng.integers(len(test))]}
    rest = [i for i in rng.permutation(len(roles)).tolist() if i not in chosen]
    return chosen | set(rest[: max(0, round(len(roles) / 4) - len(chosen))])


def _landmarks(tpl: dict, field: dict, pose: np.ndarray) -> dict:
    """Each landmark in template MNI mm and in native world mm (deformation, then pose)."""
    template_mm = np.array(list(LANDMARKS_MM.values()), float).T
    native = _world(pose, _from_template(tpl, field, template_mm))
    return {name: {"template_mm": [float(v) for v in template_mm[:, i]],
                   "native_mm": [round(float(v), 4) for v in native[:, i]]}
            for i, name in enumerate(LANDMARKS_MM)}


def _geometry(tpl: dict, kind: str, pose: np.ndarray, head_voxels: np.ndarray,
              centre_mm: np.ndarray, seed: int, index: int, channel: int) -> dict:
    """One scan's pose, native grid and native voxel -> template voxel matrix.

    The first contrast (``channel`` 0) is acquired at the subject's ``pose``; each later one
    after a small rigid motion about the posed head's centre (``MOTION_DEG``, ``MOTION_MM``).
    """
    if channel:
        posed_centre = (pose @ [*centre_mm, 1.0])[:3]
        motion_rng = np.random.default_rng([seed, _MOTION, index, channel])
        pose = _pose(posed_centre, motion_rng, MOTION_DEG, MOTION_MM) @ pose
    grid_rng = np.random.default_rng([seed, _GRID, index] if channel == 0
                                     else [seed, _CONTRAST_GRID, index, channel])
    grid = native_grid(kind, _world(pose @ tpl["affine"], head_voxels), grid_rng)
    # native voxel -> native world -> template world (inverse pose) -> template voxel
    matrix = np.linalg.inv(tpl["affine"]) @ np.linalg.inv(pose) @ grid["affine"]
    return {"pose": pose, "grid": grid, "matrix": matrix}


def _posed_subject(tpl: dict, kinds: list[str], lesion: bool, seed: int, index: int,
                   variability: float, contrasts: tuple[str, ...] = ("t1",)) -> tuple:
    """The subject and, per contrast (acquisition ``kinds``), its pose, grid and matrix.

    A lesion small enough to fall between thick slices would leave an empty mask on the first
    contrast's native grid (where masks are written): it is drawn again (a further draw of the
    lesion stream) until the mask shows.
    """
    for attempt in range(8):
        subject = _subject(tpl, seed, index, lesion, attempt, variability, contrasts)
        head_voxels = np.stack(np.nonzero(subject["images"]["t1"] > HEAD_THRESHOLD)).astype(float)
        centre_mm = _world(tpl["affine"], head_voxels).mean(axis=1)
        pose = _pose(centre_mm, np.random.default_rng([seed, _POSE, index]))
        scans = [_geometry(tpl, kind, pose, head_voxels, centre_mm, seed, index, channel)
                 for channel, kind in enumerate(kinds)]
        first = scans[0]
        if not lesion or _resample(subject["mask"], first["matrix"], first["grid"]["shape"],
                                   0).any():
            break
    return subject, scans


def _write_scan(out_dir: Path, tpl: dict, subject: dict, contrast: str, scan: dict,
                paths: tuple[str, str], dicom: bool, seed: int, index: int,
                channel: int) -> dict:
    """Write one contrast (native scan, its registered image); return its metadata."""
    grid = scan["grid"]
    posed = _resample(subject["images"][contrast], scan["matrix"], grid["shape"], 1)
    pixels, scanner = _scanner_image(posed, grid, seed, index, channel)
    if dicom:
        write_dicom_series(out_dir / paths[0], pixels, grid["affine"], seed, index,
                           f"synthetic {DISPLAY[contrast]} {grid['acquisition']} "
                           f"{grid['orientation']}", channel)
    else:
        save_nifti(pixels, grid["affine"], out_dir / paths[0], compresslevel=6)
    # Quantised to 1/256 (the template's own 8 bits): the float32 file compresses a third better.
    image = np.round(subject["images"][contrast] * 256) / np.float32(256)
    save_nifti(image, tpl["affine"], out_dir / paths[1], compresslevel=6)
    return {
        "contrast": contrast,
        "image": paths[0],
        "registered_image": paths[1],
        "format": "dicom" if dicom else "nifti",
        "acquisition": grid["acquisition"],
        "orientation": grid["orientation"],
        "spacing_mm": grid["spacing_mm"],
        "shape": list(grid["shape"]),
        "pose": [[round(float(v), 8) for v in row] for row in scan["pose"]],
        **scanner,
    }


def _make_one(out_dir: Path, tpl: dict, name: str, role: str, kinds: list[str], dicom: bool,
              seed: int, index: int, variability: float,
              contrasts: tuple[str, ...] = ("t1",)) -> dict:
    """Synthesise, pose, resample and write one subject; return its dataset.json entry.

    With contrasts other than exactly T1, image names carry the BIDS suffix of their contrast,
    ``image`` lists one path per contrast (a string for one) and ``channels`` each one's
    metadata; the top level keeps the first contrast's, as single-contrast readers expect.
    """
    folder = {"train": "train", "val": "val"}.get(role, "test")
    subject, scans = _posed_subject(tpl, kinds, role == "test-lesion", seed, index,
                                    variability, contrasts)
    grid, matrix = scans[0]["grid"], scans[0]["matrix"]
    shape, affine = grid["shape"], grid["affine"]
    plain = contrasts == ("t1",)
    suffixes = [""] if plain else [f"_{BIDS_SUFFIX[c]}" for c in contrasts]
    images = [f"{folder}/images/{name}{s}" + ("" if dicom else ".nii.gz") for s in suffixes]
    registered_images = [f"registered/images/{name}{s}.nii.gz" for s in suffixes]
    entry = {"image": images[0] if len(images) == 1 else images,
             "label": f"{folder}/labels/{name}.nii.gz", "brain": f"{folder}/brains/{name}.nii.gz"}
    native = {"label": subject["labels"], "brain": subject["brain"]}
    registered = {"image": registered_images[0] if len(images) == 1 else registered_images,
                  "brain": f"registered/brains/{name}.nii.gz"}
    if folder == "test":
        entry["mask"] = f"test/masks/{name}.nii.gz"
        entry["lesion"] = role == "test-lesion"
        native["mask"] = subject["mask"]
        registered["mask"] = f"registered/masks/{name}.nii.gz"
    for key, volume in native.items():
        write_nifti(out_dir / entry[key], _resample(volume, matrix, shape, 0), affine)
    paths = list(zip(images, registered_images, strict=True))
    channels = [_write_scan(out_dir, tpl, subject, contrast, scan, paths[k], dicom, seed, index, k)
                for k, (contrast, scan) in enumerate(zip(contrasts, scans, strict=True))]
    if not plain and folder == "test":  # each contrast's own grid: a model of one scores it
        for channel, scan, suffix in zip(channels, scans, suffixes, strict=True):
            channel["mask"] = f"test/masks/{name}{suffix}.nii.gz"
            write_nifti(out_dir / channel["mask"], _resample(subject["mask"], scan["matrix"],
                                                             scan["grid"]["shape"], 0),
                        scan["grid"]["affine"])
    for key in ("brain", "mask"):
        if key in registered:
            write_nifti(out_dir / registered[key], subject[key], tpl["affine"])
    first = channels[0]
    entry.update({
        "format": first["format"],
        "registered": registered,
        **{key: first[key] for key in ("acquisition", "orientation", "spacing_mm", "shape",
                                       "pose")},
        "landmarks": _landmarks(tpl, subject["field"], scans[0]["pose"]),
        "scale": [round(float(s), 6) for s in subject["field"]["scale"]],
        **{key: first[key] for key in ("noise_fraction", "gain")},
    })
    if not plain:
        entry["channels"] = channels
        if subject["lesion"] is not None:
            entry["lesion_kind"] = subject["lesion"]["kind"]
    return entry


def check_contrasts(contrasts) -> tuple[str, ...]:
    """``contrasts`` in medidiff's names (any usual spelling), each once and one we can make."""
    names = tuple(canonical(c) for c in ([contrasts] if isinstance(contrasts, str)
                                           else contrasts))
    if not names:
        raise InputError(None, "contrasts: name at least one")
    repeated = sorted({c for c in names if names.count(c) > 1})
    if repeated:
        raise InputError(None, f"contrasts: {', '.join(repeated)} named more than once")
    unsupported = [c for c in names if c not in CONTRASTS]
    if unsupported:
        raise InputError(None, f"contrasts: the raw example cannot make {', '.join(unsupported)} "
                               f"(it makes {', '.join(CONTRASTS)})")
    return names


def _description(contrasts: tuple[str, ...]) -> str:
    """dataset.json's description; exactly the T1 data set's text for ``("t1",)``."""
    if contrasts == ("t1",):
        return (
            "Synthetic raw T1-weighted head scans (skull on, random head pose, native grids and "
            "orientations, bias field, gamma, Rician noise, int16 scanner units; some as DICOM "
            "series) derived from the MNI ICBM152 2009c head template with tissue labels from "
            "the 2009a GM/WM maps (Fonov et al. 2011); synthetic lesions (MOOD/FPI protocol) "
            "in test scans; ground truth in template space under registered/."
        )
    names = ", ".join(DISPLAY[c] for c in contrasts)
    return (
        f"Synthetic raw head scans in {len(contrasts)} contrast(s), {names}, each on its own "
        "native grid with a small motion between scans (skull on, random head pose, native "
        "grids and orientations, bias field, gamma, Rician noise, int16 scanner units; some "
        "subjects as DICOM series) derived from the MNI ICBM152 2009c T1 and T2 head templates "
        "(FLAIR synthesised from the T2 with CSF nulled, PD from the T2 with less contrast) with "
        "tissue labels from the 2009a GM/WM maps (Fonov et al. 2011); synthetic lesions as each "
        "contrast shows them (MS-like ovoids, tumour with oedema, stroke-like; one mask for "
        "all contrasts) in test scans; labels and masks on the first contrast's grid, test "
        "masks also on each contrast's (named as its scan); ground "
        "truth in template space under registered/."
    )


def make_raw_dataset(out_dir: str | Path, seed: int = 0, subjects: int = 24,
                     progress: Progress | None = None, anatomy_variability: float = 1.0,
                     contrasts: Sequence[str] = ("t1",)) -> dict:
    """Build the raw example data set (see the module docstring); return the dataset.json index.

    Layout: ``{train,val,test}/images`` (``.nii.gz`` files or DICOM series folders),
    ``{train,val,test}/{labels,brains}``, ``test/masks``, ``registered/{images,brains,masks}``
    and ``dataset.json``, written last, so that its presence marks a complete data set.
    ``progress`` is called as ``progress(done, total, message)`` after each subject.
    ``anatomy_variability`` multiplies each subject's smooth displacement from the template
    (1: at most 2 to 4 mm; 0: the template's anatomy up to scaling). ``contrasts`` (of
    ``CONTRASTS``, any usual spelling) are written for every subject, in this order; the
    first one's grid carries the labels and masks.
    """
    out_dir = Path(out_dir)
    contrasts = check_contrasts(contrasts)
    _check_out_dir(out_dir)
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise InputError(None, f"seed must be a non-negative integer, got {seed!r}")
    seed = int(seed)
    if not 0.0 <= float(anatomy_variability) <= 4.0:
        raise InputError(None, "anatomy_variability must lie in [0, 4], "
                         f"got {anatomy_variability!r}")
    variability = float(anatomy_variability)
    roles = split_roles(int(subjects), seed)
    kinds = [_acquisition_kinds(len(roles), seed, k) for k in range(len(contrasts))]
    dicom = _dicom_subjects(roles, seed)
    tpl = head_template()
    lists = {"training": [], "validation": [], "test": []}
    for index, role in enumerate(roles):
        name = f"sub-{index:03d}"
        entry = _make_one(out_dir, tpl, name, role, [k[index] for k in kinds], index in dicom,
                          seed, index, variability, contrasts)
        lists[{"train": "training", "val": "validation"}.get(role, "test")].append(entry)
        if progress is not None:
            progress(index + 1, len(roles), f"{name} ({role}, {entry['format']})")
    channels = {str(k): DISPLAY[c] for k, c in enumerate(contrasts)}
    plain = contrasts == ("t1",)
    index = {
        "name": "medidiff-example-raw",
        "description": _description(contrasts),
        "reference": "https://nist.mni.mcgill.ca/icbm-152-nonlinear-atlases-2009/",
        "licence": (
            "MNI ICBM152 2009 template licence (free use with attribution): Copyright (C) "
            "1993-2004 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological "
            "Institute, McGill University; see medidiff/preprocess/templates/COPYING"
        ),
        "raw": True,
        "seed": seed,
        "anatomy_variability": variability,
        "tensorImageSize": "3D",
        **({} if plain else {"contrasts": list(contrasts)}),
        "modality": channels,
        **({} if plain else {"channel_names": channels}),
        "template_space": "MNI ICBM152 2009c, 2 mm (medidiff/preprocess/templates/t1_head.nii.gz)",
        "pose_convention": "pose maps template-space world mm to native world mm (RAS)",
        "labels": LABELS,
        **{f"num{key.capitalize()}": len(items) for key, items in lists.items()},
        **lists,
    }
    atomic_write_text(out_dir / "dataset.json", json.dumps(index, indent=2) + "\n")
    return index
