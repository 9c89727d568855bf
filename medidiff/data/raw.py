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

Each dataset.json entry carries the ``pose`` and ``landmarks``: fixed anatomical points in
template MNI mm and the same points in native world mm after the subject's deformation and pose,
so that registration errors can be measured in mm. Everything is deterministic from
``(seed, subject index)``.
"""

from __future__ import annotations

import io
import json
import math
from functools import cache
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi
from scipy.spatial.transform import Rotation

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
    return {**arrays, "affine": affine, "centre": (lo + hi) / 2,
            "gm": tissue.gm, "wm": tissue.wm, "gm_affine": tissue.affine}


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
             variability: float) -> dict:
    """The subject on the template grid: head (skull on), brain mask, labels, lesion mask."""
    field = _deformation(tpl, np.random.default_rng([seed, _DEFORM, index]), variability)
    shape, affine = tpl["t1"].shape, tpl["affine"]
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"))
    world = _to_template(tpl, field, _world(affine, grid).reshape(3, -1))
    coords = _world(np.linalg.inv(affine), world).astype(np.float32)
    image = _read(tpl["t1"], coords).reshape(shape)
    brain = (_read(tpl["brain"], coords) > 0.5).reshape(shape)
    inside = _world(np.linalg.inv(tpl["gm_affine"]), world[:, brain.ravel()])
    labels = np.zeros(shape, np.uint8)
    labels[brain] = _tissue_labels(_read(tpl["gm"], inside), _read(tpl["wm"], inside))
    mask = np.zeros(shape, np.uint8)
    if lesion:
        lesion_rng = np.random.default_rng([seed, _LESION, index, attempt])
        image, mask, _ = add_lesion(image, brain, 2.0, lesion_rng)
    return {"image": image, "brain": brain.astype(np.uint8), "labels": labels, "mask": mask,
            "field": field}


# -- pose and native grid ----------------------------------------------------------------------


def _pose(centre: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rigid 4x4 (template world mm -> native world mm): rotations <= 15 deg, shifts <= 20 mm."""
    rotation = Rotation.from_euler("xyz", rng.uniform(-15.0, 15.0, 3), degrees=True).as_matrix()
    pose = np.eye(4)
    pose[:3, :3] = rotation
    pose[:3, 3] = centre + rng.uniform(-20.0, 20.0, 3) - rotation @ centre
    return pose


def _acquisition_kinds(subjects: int, seed: int) -> list[str]:
    """The acquisition of each subject: every three consecutive subjects get all three kinds."""
    names = list(ACQUISITIONS)
    rng = np.random.default_rng([seed, _GRID])
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


def _scanner_image(posed: np.ndarray, grid: dict, seed: int, index: int) -> tuple[np.ndarray, dict]:
    """Gamma, bias field and global scale (example.py), Rician noise, int16 at a random gain."""
    rng = np.random.default_rng([seed, _SCANNER, index])
    shape = grid["shape"]
    everywhere = np.ones(shape, bool)
    spacing = float(np.prod(grid["spacing_mm"]) ** (1 / 3))
    unit = posed / np.float32(max(float(posed.max()), 1e-6))
    image = _intensity(unit, everywhere, shape, spacing, rng)
    fraction = float(rng.uniform(0.01, 0.03))
    image = _rician_in_brain(image, everywhere, fraction, _torch_generator(seed, _NOISE, index))
    target = math.exp(rng.uniform(math.log(300.0), math.log(3000.0)))  # head's 99th percentile
    gain = target / max(float(np.percentile(image[unit > HEAD_THRESHOLD], 99)), 1e-6)
    scan = np.clip(np.round(image * gain), 0, np.iinfo(np.int16).max).astype(np.int16)
    return scan, {"noise_fraction": round(fraction, 6), "gain": round(float(gain), 6)}


# -- writing -----------------------------------------------------------------------------------


def _lps(vector: np.ndarray) -> list[float]:
    """RAS to LPS (DICOM patient coordinates), rounded, never -0."""
    return [round(float(v), 4) + 0.0 for v in vector * np.array([-1.0, -1.0, 1.0])]


def write_dicom_series(folder: Path, scan: np.ndarray, affine: np.ndarray, seed: int,
                       index: int, description: str) -> None:
    """One file per slice along the last axis; MONAI's reader gives back ``scan`` and ``affine``.

    Array axis 0 runs along the rows (DICOM's row direction, ``Columns`` long), axis 1 down the
    columns, axis 2 across slices; positions and orientations are in LPS. No patient
    identifiers and no dates; UIDs are derived from ``(seed, index)``, so files are reproducible.
    """
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    def uid(*parts) -> str:
        return generate_uid(entropy_srcs=["medidiff-raw", str(seed), str(index), *map(str, parts)])

    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    study, series, frame = uid("study"), uid("series"), uid("frame")
    for k in range(scan.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = uid("slice", k)
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MR_IMAGE_STORAGE, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientName, ds.PatientID = "anonymous", "anonymous"
        ds.PatientIdentityRemoved, ds.DeidentificationMethod = "YES", "synthetic data"
        ds.Modality, ds.SeriesDescription, ds.ImageType = "MR", description, ["DERIVED", "PRIMARY"]
        ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
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


def _posed_subject(tpl: dict, kind: str, lesion: bool, seed: int, index: int,
                   variability: float) -> tuple:
    """The subject, its pose, its native grid and the native voxel -> template voxel matrix.

    A lesion small enough to fall between thick slices would leave an empty mask on the native
    grid: it is drawn again (a further draw of the lesion stream) until the mask shows.
    """
    for attempt in range(8):
        subject = _subject(tpl, seed, index, lesion, attempt, variability)
        head_voxels = np.stack(np.nonzero(subject["image"] > HEAD_THRESHOLD)).astype(float)
        pose = _pose(_world(tpl["affine"], head_voxels).mean(axis=1),
                     np.random.default_rng([seed, _POSE, index]))
        grid = native_grid(kind, _world(pose @ tpl["affine"], head_voxels),
                           np.random.default_rng([seed, _GRID, index]))
        # native voxel -> native world -> template world (inverse pose) -> template voxel
        matrix = np.linalg.inv(tpl["affine"]) @ np.linalg.inv(pose) @ grid["affine"]
        if not lesion or _resample(subject["mask"], matrix, grid["shape"], 0).any():
            break
    return subject, pose, grid, matrix


def _make_one(out_dir: Path, tpl: dict, name: str, role: str, kind: str, dicom: bool,
              seed: int, index: int, variability: float) -> dict:
    """Synthesise, pose, resample and write one subject; return its dataset.json entry."""
    folder = {"train": "train", "val": "val"}.get(role, "test")
    subject, pose, grid, matrix = _posed_subject(tpl, kind, role == "test-lesion", seed, index,
                                                 variability)
    shape, affine = grid["shape"], grid["affine"]
    posed = _resample(subject["image"], matrix, shape, 1)
    scan, scanner = _scanner_image(posed, grid, seed, index)
    entry = {"image": f"{folder}/images/{name}" + ("" if dicom else ".nii.gz"),
             "label": f"{folder}/labels/{name}.nii.gz", "brain": f"{folder}/brains/{name}.nii.gz"}
    native = {"label": subject["labels"], "brain": subject["brain"]}
    registered = {"image": f"registered/images/{name}.nii.gz",
                  "brain": f"registered/brains/{name}.nii.gz"}
    if folder == "test":
        entry["mask"] = f"test/masks/{name}.nii.gz"
        entry["lesion"] = role == "test-lesion"
        native["mask"] = subject["mask"]
        registered["mask"] = f"registered/masks/{name}.nii.gz"
    for key, volume in native.items():
        write_nifti(out_dir / entry[key], _resample(volume, matrix, shape, 0), affine)
    if dicom:
        write_dicom_series(out_dir / entry["image"], scan, affine, seed, index,
                           f"synthetic T1 {kind} {grid['orientation']}")
    else:
        save_nifti(scan, affine, out_dir / entry["image"], compresslevel=6)
    # Quantised to 1/256 (the template's own 8 bits): the float32 file compresses a third better.
    image = np.round(subject["image"] * 256) / np.float32(256)
    save_nifti(image, tpl["affine"], out_dir / registered["image"], compresslevel=6)
    for key in ("brain", "mask"):
        if key in registered:
            write_nifti(out_dir / registered[key], subject[key], tpl["affine"])
    entry.update({
        "format": "dicom" if dicom else "nifti",
        "registered": registered,
        "acquisition": kind,
        "orientation": grid["orientation"],
        "spacing_mm": grid["spacing_mm"],
        "shape": list(shape),
        "pose": [[round(float(v), 8) for v in row] for row in pose],
        "landmarks": _landmarks(tpl, subject["field"], pose),
        "scale": [round(float(s), 6) for s in subject["field"]["scale"]],
        **scanner,
    })
    return entry


def make_raw_dataset(out_dir: str | Path, seed: int = 0, subjects: int = 24,
                     progress: Progress | None = None, anatomy_variability: float = 1.0) -> dict:
    """Build the raw example data set (see the module docstring); return the dataset.json index.

    Layout: ``{train,val,test}/images`` (``.nii.gz`` files or DICOM series folders),
    ``{train,val,test}/{labels,brains}``, ``test/masks``, ``registered/{images,brains,masks}``
    and ``dataset.json``, written last, so that its presence marks a complete data set.
    ``progress`` is called as ``progress(done, total, message)`` after each subject.
    ``anatomy_variability`` multiplies each subject's smooth displacement from the template
    (1: at most 2 to 4 mm; 0: the template's anatomy up to scaling).
    """
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise InputError(None, f"seed must be a non-negative integer, got {seed!r}")
    seed = int(seed)
    if not 0.0 <= float(anatomy_variability) <= 4.0:
        raise InputError(None, "anatomy_variability must lie in [0, 4], "
                         f"got {anatomy_variability!r}")
    variability = float(anatomy_variability)
    roles = split_roles(int(subjects), seed)
    kinds = _acquisition_kinds(len(roles), seed)
    dicom = _dicom_subjects(roles, seed)
    tpl = head_template()
    lists = {"training": [], "validation": [], "test": []}
    for index, role in enumerate(roles):
        name = f"sub-{index:03d}"
        entry = _make_one(out_dir, tpl, name, role, kinds[index], index in dicom, seed, index,
                          variability)
        lists[{"train": "training", "val": "validation"}.get(role, "test")].append(entry)
        if progress is not None:
            progress(index + 1, len(roles), f"{name} ({role}, {entry['format']})")
    index = {
        "name": "medidiff-example-raw",
        "description": (
            "Synthetic raw T1-weighted head scans (skull on, random head pose, native grids and "
            "orientations, bias field, gamma, Rician noise, int16 scanner units; some as DICOM "
            "series) derived from the MNI ICBM152 2009c head template with tissue labels from "
            "the 2009a GM/WM maps (Fonov et al. 2011); synthetic lesions (MOOD/FPI protocol) "
            "in test scans; ground truth in template space under registered/."
        ),
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
        "modality": {"0": "T1"},
        "template_space": "MNI ICBM152 2009c, 2 mm (medidiff/preprocess/templates/t1_head.nii.gz)",
        "pose_convention": "pose maps template-space world mm to native world mm (RAS)",
        "labels": LABELS,
        **{f"num{key.capitalize()}": len(items) for key, items in lists.items()},
        **lists,
    }
    atomic_write_text(out_dir / "dataset.json", json.dumps(index, indent=2) + "\n")
    return index
