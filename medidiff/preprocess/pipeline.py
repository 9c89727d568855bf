"""``Preprocessor``: a native scan to the model's input space, and results back.

Forward (as the field does it, references/preprocessing.md): head mask (Otsu) -> N4 bias
correction -> rigid or affine registration to the head template -> resampling onto the
template grid (linear) -> skull stripping with the template's brain mask, eroded a little ->
intensity normalisation inside the brain. Quality control measures every registration.
Backward: any array on the template grid goes onto the scan's own grid through the inverse
transform, linearly for maps and by nearest neighbour for masks and labels.
The contrasts of one subject (``run_channels``) are registered once: channel 0 as above, the
others aligned rigidly to it and resampled through both transforms at once, each measured
against its own contrast's template and normalised on its own.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from medidiff.config import PreprocessConfig
from medidiff.errors import ConfigError, InputError
from medidiff.io.validate import same_grid
from medidiff.preprocess import brain_extraction, quality
from medidiff.preprocess.bias import head_mask, n4
from medidiff.preprocess.register import align_channel, register
from medidiff.preprocess.space import from_sitk, reference, resample, to_sitk
from medidiff.preprocess.template import load_template, template_for


@dataclass
class Preprocessed:
    """A scan on the preprocessed grid, and how to get back to its own grid."""

    image: np.ndarray  # (X, Y, Z) float32 on the grid below; (C, X, Y, Z) for C contrasts
    affine: np.ndarray  # the template's grid (or the scan's, without registration)
    native_shape: tuple[int, ...]
    native_affine: np.ndarray
    transform: sitk.Transform | None = None  # template point -> scan point
    brain: np.ndarray | None = None  # uint8 brain mask on the grid, with skull stripping
    qc: dict[str, float] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    kind: str = "head"  # what the scan held: a head, or a skull-stripped brain

    def to_native(self, array: np.ndarray, nearest: bool = False) -> np.ndarray:
        """An array on the preprocessed grid, on the scan's own grid."""
        image = to_sitk(array, self.affine)
        inverse = self.transform.GetInverse() if self.transform is not None else None
        out = resample(image, reference(self.native_shape, self.native_affine), inverse, nearest)
        return from_sitk(out)[0].astype(np.float32)

    def from_native(self, array: np.ndarray, affine: np.ndarray,
                    nearest: bool = False) -> np.ndarray:
        """An array on the scan's grid (e.g. its labels), on the preprocessed grid."""
        out = resample(to_sitk(array, affine), reference(self.image.shape[-3:], self.affine),
                       self.transform, nearest)
        return from_sitk(out)[0]

    @classmethod
    def load(cls, folder: Path, native_shape, native_affine, qc: dict) -> Preprocessed:
        """A preprocessed scan from its cache folder (``medidiff.preprocess.cache``); the
        transform is ITK's plain-text format, parsed, never executed."""
        image = nib.load(folder / "image.nii.gz")
        brain = folder / "brain.nii.gz"
        transform = folder / "transform.tfm"
        data = np.asarray(image.dataobj, np.float32)
        if data.ndim == 4:  # contrasts: NIfTI keeps them last
            data = np.moveaxis(data, -1, 0)
        return cls(data, image.affine.copy(),
                   tuple(int(s) for s in native_shape), np.asarray(native_affine, np.float64),
                   sitk.ReadTransform(str(transform)) if transform.is_file() else None,
                   np.asarray(nib.load(brain).dataobj, np.uint8) if brain.is_file() else None,
                   dict(qc.get("qc", {})), list(qc.get("failures", [])),
                   str(qc.get("kind", "head")))

    def save_transform(self, path: str | Path) -> Path | None:
        """The forward transform as an ITK text file (``.tfm``), written atomically."""
        if self.transform is None:
            return None
        path = Path(path)
        handle, tmp = tempfile.mkstemp(suffix=".tfm", dir=path.parent)
        os.close(handle)
        try:
            sitk.WriteTransform(self.transform, tmp)
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
        return path


def intensity_scale(values: np.ndarray, reference: np.ndarray, method: str) -> float:
    """What a registered scan is divided by, from its voxels inside the brain (or head).

    ``p99``: their 99th percentile, which a bright lesion of a few percent of the brain raises,
    darkening every healthy voxel. ``median``: their median, mapped to where the template's
    median lies in units of its 99th percentile, so healthy scans come out on the ``p99`` scale
    while a lesion moves the median by a fraction of its own share of the voxels.
    """
    if method == "p99":
        return max(float(np.percentile(values, 99)), 1e-6)
    ratio = float(np.median(reference)) / max(float(np.percentile(reference, 99)), 1e-6)
    return max(float(np.median(values)) / ratio, 1e-6)


HISTOGRAM_LANDMARKS = (5.0, 10.0, 25.0, 50.0, 75.0, 90.0)


def standardise_histogram(image: np.ndarray, values: np.ndarray,
                          reference: np.ndarray) -> np.ndarray:
    """Piecewise-linear histogram standardisation (Nyul and Udupa 1999): the brain's
    percentiles ``HISTOGRAM_LANDMARKS`` go to the template's (on its 99th-percentile scale),
    linearly between them and beyond them with the outer segments' slopes (zero stays zero).

    Scanners, heads and sequences differ in gamma and tissue contrast, which one scale factor
    (``median``) leaves; landmarks up to the 90th percentile keep a lesion of a few percent of
    the brain from moving them much (a bright lesion stays bright above them).
    """
    src = np.percentile(values, HISTOGRAM_LANDMARKS)
    dst = np.percentile(reference, HISTOGRAM_LANDMARKS) / max(np.percentile(reference, 99), 1e-6)
    src = np.maximum.accumulate(src + np.arange(len(src)) * 1e-6)  # strictly increasing
    xs, ys = np.concatenate([[0.0], src]), np.concatenate([[0.0], dst])
    out = np.interp(image, xs, ys)
    slope = (ys[-1] - ys[-2]) / max(xs[-1] - xs[-2], 1e-6)
    above = image > xs[-1]
    out[above] = ys[-1] + (image[above] - xs[-1]) * slope
    return np.maximum(out, 0.0).astype(np.float32)


@contextlib.contextmanager
def _threads(count: int):
    """ITK's thread count for the block (a fixed count gives the same bytes every run)."""
    old = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(count)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(old)


class Preprocessor:
    """Runs a model's ``preprocess`` section on scans."""

    def __init__(self, cfg: PreprocessConfig, contrast: str = "t1"):
        self.cfg = cfg
        if cfg.skull_strip in brain_extraction.METHODS and not brain_extraction.available():
            raise ConfigError(brain_extraction.NEEDS_EXTRA)
        self.template = (load_template(template_for(cfg.template, contrast))
                         if cfg.registration != "none" else None)

    @property
    def registers(self) -> bool:
        return self.template is not None

    def run(self, array: np.ndarray, affine: np.ndarray, source=None,
            native_shape=None, native_affine=None) -> Preprocessed:
        """Preprocess a (X, Y, Z) scan with its voxel-to-RAS affine. ``native_*``: the grid to
        map results back to, when ``array`` is a reoriented view of it (default: its own)."""
        native_shape, native_affine = _native_grid(array, affine, native_shape, native_affine)
        with _threads(self.cfg.threads):
            image, head, kind = self._native(array, affine, source)
            if not self.registers:
                out, grid = from_sitk(image)
                return Preprocessed(out.astype(np.float32), grid, native_shape, native_affine,
                                    kind=kind)
            return self._register(image, head, kind, source, native_shape, native_affine)

    def run_channels(self, scans: list[tuple[np.ndarray, np.ndarray]], contrasts: list[str],
                     sources: list, native_shape=None, native_affine=None) -> Preprocessed:
        """Preprocess the contrasts of one subject (``scans``: (array, affine) in channel
        order, ``contrasts`` their names) into one (C, X, Y, Z) image on one grid.

        Channel 0 goes through ``run``; every other channel is aligned rigidly to channel 0
        (scans of one session) and resampled through that alignment and channel 0's
        registration at once, so each is interpolated once. Each is measured against the
        template of its own contrast (a scan of the wrong contrast fails its correlation),
        masked with channel 0's brain and normalised on its own. ``native_*``: channel 0's
        grid. Without registration the channels must share one grid."""
        if len(scans) == 1:
            return self.run(*scans[0], sources[0], native_shape, native_affine)
        array0, affine0 = scans[0]
        native_shape, native_affine = _native_grid(array0, affine0, native_shape, native_affine)
        with _threads(self.cfg.threads):
            image0, head0, kind0 = self._native(array0, affine0, sources[0])
            if not self.registers:
                return self._stack_unregistered(image0, kind0, scans, sources, native_shape,
                                                native_affine)
            first = self._register(image0, head0, kind0, sources[0], native_shape,
                                   native_affine)
            images, qc = [first.image], {**first.qc}
            failures = list(first.failures)
            for k in range(1, len(scans)):
                label = f"channel {k} ({contrasts[k]})"
                image, head, kind = self._native(*scans[k], sources[k], learned=False)
                try:
                    rigid = align_channel(image, image0, head0)
                except InputError as err:
                    raise InputError(sources[k], f"{label} {err.problem}") from None
                transform = sitk.CompositeTransform([rigid, first.transform])  # R(T(x))
                moved, numbers = self._resample_channel(image, head, kind, transform,
                                                        contrasts[k], first.brain)
                qc.update({f"{name}_{contrasts[k]}": v for name, v in numbers.items()})
                if quality.failures(numbers, self.cfg.min_correlation, self.cfg.min_head_dice):
                    failures.append(
                        f"{label}: unlike its template after rigid alignment to channel 0 "
                        f"(correlation {numbers['correlation']:.2f}, head overlap "
                        f"{numbers['head_dice']:.2f}; needs {self.cfg.min_correlation:g} and "
                        f"{self.cfg.min_head_dice:g}): a scan of another contrast, subject or "
                        "session?")
                images.append(moved)
        first.image = np.stack(images).astype(np.float32)
        first.qc, first.failures = qc, failures
        return first

    def _native(self, array, affine, source, learned: bool = True):
        """The scan as an ITK image after bias correction, its head mask and what it holds;
        with a learned brain extraction (``learned``) a head becomes its brain first."""
        array = np.asarray(array, np.float32)
        if array.ndim != 3 or min(array.shape) < 2:
            raise InputError(source, f"has shape {array.shape}; registration and bias "
                                     "correction need a 3D scan with at least 2 slices")
        image = to_sitk(array, affine)
        head = head_mask(image)
        kind = self.cfg.input if self.cfg.input != "auto" else input_kind(array, head)
        if learned and kind == "head" and self.cfg.skull_strip in brain_extraction.METHODS:
            # the learned mask on the raw head (the networks were trained without N4);
            # from here on the scan is a skull-stripped brain
            mask = brain_extraction.learned_brain_mask(array, affine, self.cfg.skull_strip, source)
            array = array * mask
            image, head, kind = to_sitk(array, affine), to_sitk(mask.astype(np.uint8),
                                                                affine), "brain"
        if self.cfg.bias_correction == "n4":
            image = n4(image, head)
        return image, head, kind

    def _stack_unregistered(self, image0, kind0, scans, sources, native_shape,
                            native_affine) -> Preprocessed:
        out, grid = from_sitk(image0)
        images = [out.astype(np.float32)]
        for k in range(1, len(scans)):
            array, affine = scans[k]
            if not same_grid(np.shape(array), affine, np.shape(scans[0][0]), scans[0][1]):
                raise InputError(sources[k], f"channel {k} is on another grid than channel 0; "
                                             "without registration the contrasts of a case "
                                             "must share one grid")
            images.append(from_sitk(self._native(array, affine, sources[k], False)[0])[0]
                          .astype(np.float32))
        return Preprocessed(np.stack(images), grid, native_shape, native_affine, kind=kind0)

    def _resample_channel(self, image, head, kind, transform, contrast, brain):
        """Channel ``image`` on the template grid through ``transform``, masked with channel
        0's ``brain`` and normalised against its own contrast's template; and its QC."""
        template = load_template(template_for("auto", contrast))
        target = template.head * template.brain if kind == "brain" else template.head
        target_mask = template.brain if kind == "brain" else template.head_mask
        fixed = to_sitk(target, template.affine)
        moved = from_sitk(resample(image, fixed, transform))[0].astype(np.float32)
        moved_head = from_sitk(resample(head, fixed, transform, nearest=True))[0] > 0
        inside = _field_of_view(head, fixed, transform)
        qc = quality.measure(moved, moved_head, inside, target, target_mask, template.brain)
        keep, template_keep = moved_head, target_mask
        if brain is not None:  # channel 0's brain, as _register keeps it
            moved = moved * brain
            keep = brain > 0
            if self.cfg.skull_strip == "template":
                template_keep = keep
        if kind == "brain":
            keep = keep & (moved > 0)
        return self._normalise(moved, keep, template.head[template_keep]), qc

    def _normalise(self, moved: np.ndarray, keep: np.ndarray, reference: np.ndarray) -> np.ndarray:
        """``preprocess.normalise`` of a registered scan: its ``keep`` voxels against the
        template's ``reference`` voxels."""
        if self.cfg.normalise == "histogram" and keep.any():
            return standardise_histogram(moved, moved[keep], reference)
        if self.cfg.normalise != "none" and keep.any():
            return moved / intensity_scale(moved[keep], reference, self.cfg.normalise)
        return moved

    def _register(self, image, head, kind, source, native_shape, native_affine) -> Preprocessed:
        template = self.template
        # a skull-stripped scan goes to the template's brain, a head to its head
        target = template.head * template.brain if kind == "brain" else template.head
        target_mask = template.brain if kind == "brain" else template.head_mask
        fixed = to_sitk(target, template.affine)
        brain_region = to_sitk(template.brain.astype(np.float32), template.affine)
        try:
            transform = register(image, fixed, self.cfg.registration,
                                 fixed_brain=brain_region if kind == "head" else None)
        except InputError as err:
            raise InputError(source, str(err)) from None
        moved = from_sitk(resample(image, fixed, transform))[0].astype(np.float32)
        moved_head = from_sitk(resample(head, fixed, transform, nearest=True))[0] > 0
        inside = _field_of_view(head, fixed, transform)
        qc = quality.measure(moved, moved_head, inside, target, target_mask, template.brain)
        failures = quality.failures(qc, self.cfg.min_correlation, self.cfg.min_head_dice)
        brain = None
        keep, template_keep = moved_head, target_mask
        if self.cfg.skull_strip in brain_extraction.METHODS:  # its own brain, not the template's
            brain = moved_head.astype(np.uint8)
            moved = moved * brain
        elif self.cfg.skull_strip == "template":
            spacing = float(np.linalg.norm(template.affine[:3, 0]))
            steps = int(round(self.cfg.mask_erosion_mm / spacing))
            mask = template.brain
            if steps:
                mask = ndimage.binary_erosion(mask, iterations=steps)
            brain = mask.astype(np.uint8)
            moved = moved * brain
            keep = template_keep = mask
        if kind == "brain":  # what the scan's own skull stripping removed is no brain to measure
            keep = keep & (moved > 0)
        moved = self._normalise(moved, keep, template.head[template_keep])
        return Preprocessed(moved.astype(np.float32), template.affine.copy(), native_shape,
                            native_affine, transform, brain, qc, failures, kind)


def _native_grid(array, affine, native_shape, native_affine):
    shape = tuple(native_shape) if native_shape is not None else np.asarray(array).shape
    return shape, np.asarray(native_affine if native_affine is not None else affine, np.float64)


def _field_of_view(head: sitk.Image, fixed: sitk.Image, transform) -> np.ndarray:
    """The template voxels the scan's grid covers, through ``transform``."""
    ones = sitk.Cast(head * 0 + 1, sitk.sitkFloat32)
    return from_sitk(resample(ones, fixed, transform, nearest=True))[0] > 0


BRAIN_MAX_LITRES = 2.2  # a skull-stripped brain (the template's: 1.9 l) with room for large ones
BRAIN_MAX_LITRES_ZERO_BACKGROUND = 3.2  # a head with skull, even scaled by 0.88: above 3 l


def input_kind(array: np.ndarray, foreground: sitk.Image) -> str:
    """``brain`` for a skull-stripped scan, else ``head``: a brain's foreground is smaller than
    any head's, and skull stripping leaves a background of exact zeros, which a magnitude image
    of a head (noise everywhere) does not have."""
    mask = np.asarray(sitk.GetArrayViewFromImage(foreground)).T > 0
    litres = float(mask.sum()) * float(np.prod(foreground.GetSpacing())) / 1e6
    background = array[~mask]
    zeros = float(np.mean(background == 0)) if background.size else 0.0
    if litres < BRAIN_MAX_LITRES or (litres < BRAIN_MAX_LITRES_ZERO_BACKGROUND and zeros > 0.5):
        return "brain"
    return "head"
