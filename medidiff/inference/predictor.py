"""The one predictor every task's inference derives from, in the spirit of nnU-Net v2's
``nnUNetPredictor`` (``nnunetv2/inference/predict_from_raw_data.py``).

    predictor = SomeTaskPredictor.load(model_dir, device="auto", **settings)
    result = predictor.predict_file("scan.nii.gz")       # or predict_array(volume, affine)
    outcomes = predictor.predict_files(inputs, out_dir, overwrite=..., part_id=..., num_parts=...)

The base loads a model folder, turns a file or an array (with its affine; no temporary file)
into the model grid through the model's MONAI chain, checks the voxels, maps arrays on the grid
back to the input's space (``Invertd``), and runs a folder of inputs: sharded, resumable, each
case isolated, its resolved settings written as JSON into the output folder. A task's subclass
says what it computes on the grid, what it writes and what goes into its table row.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import EnsureChannelFirstd, EnsureTyped, LoadImaged, Orientationd
from pydantic import BaseModel, ValidationError

from medidiff.data.datasets import fingerprint
from medidiff.data.transforms import Chain, image_transforms, invert_to_input, volume_transforms
from medidiff.errors import ConfigError, InputError, QualityError
from medidiff.inference import backends
from medidiff.inference.cases import CaseOutcome, inputs_of_part, merge_rows, run_cases
from medidiff.io.discover import CaseFiles
from medidiff.io.read import reader_for
from medidiff.io.validate import (
    check_voxels,
    repair_nonfinite,
    same_grid,
    spatial_ndim,
    validate_input,
)
from medidiff.io.write import atomic_write_text
from medidiff.models.batching import FixedBatch
from medidiff.models.folder import LoadedModel, load_model
from medidiff.preprocess import cache
from medidiff.preprocess.pipeline import Preprocessed, Preprocessor
from medidiff.report import save_png
from medidiff.runtime import micro_batch, select_device

log = logging.getLogger("medidiff")

# transforms that only read and orient: voxels are checked after them, before any resampling
# or intensity scaling can hide or spread a NaN or Inf
_LOADING = (LoadImaged, EnsureChannelFirstd, EnsureTyped, Orientationd)


def with_overrides(section: BaseModel, **overrides) -> BaseModel:
    """A config section with the given fields replaced (``None`` keeps the model's), validated
    as the section itself validates them."""
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return type(section).model_validate({**section.model_dump(), **given})
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"{key}: {first['msg']}") from None


@contextlib.contextmanager
def reading(path: Path | None):
    """Reader failures inside a MONAI chain (which wraps them in RuntimeError) as InputError."""
    try:
        yield
    except InputError:
        raise
    except Exception as err:
        raise InputError(path, f"could not be read ({type(err).__name__})") from None


@dataclass
class Prepared:
    """A scan on the model grid: the MONAI data dict and the chain that can invert it."""

    source: Path | None  # None for an array
    pipeline: Chain
    data: dict
    repaired: int = 0  # non-finite voxels replaced (with repair_nonfinite)
    native: Preprocessed | None = None  # the model's preprocessing, and the way back

    @property
    def image(self) -> MetaTensor:
        return self.data["image"]

    @property
    def volume(self) -> torch.Tensor:
        """The (C, *spatial) scan on the model grid as a plain float tensor."""
        return self.image.as_tensor().float()

    @property
    def original_affine(self) -> np.ndarray:
        """The input's own voxel-to-world affine."""
        if self.native is not None:
            return self.native.native_affine
        return np.asarray(self.image.meta.get("original_affine", np.eye(4)), np.float64)

    def to_input(self, array, nearest: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """An array on the model grid (channel first or not) in the input's space, and the
        input's affine: the image's recorded spatial transforms replayed in reverse."""
        image = self.image
        tensor = torch.as_tensor(np.asarray(array, dtype=np.float32))
        tensor = tensor if tensor.ndim == image.ndim else tensor[None]
        data = {**self.data, "grid": MetaTensor(tensor, meta=image.meta,
                                                applied_operations=image.applied_operations)}
        out, affine = invert_to_input(self.pipeline, data, "grid", nearest=nearest)
        if self.native is None:
            return out, affine
        return self.native.to_native(out, nearest=nearest), self.native.native_affine


class Predictor:
    """Base of every task's predictor; see the module docstring."""

    task: ClassVar[Any] = None  # the task object (``medidiff.tasks.base.Task``)
    section: ClassVar[str] = ""  # the config section holding the settings' defaults
    stage: ClassVar[str] = ""  # MLflow run name, settings file ``<stage>_settings.json``
    table: ClassVar[str] = ""  # the per-case CSV in the output folder
    verb: ClassVar[str] = "done"  # what the summary says of finished cases
    images_2d: ClassVar[bool] = False  # 2D images (PNG) are accepted by a 2D model
    figure_key: ClassVar[str] = "overlay"  # the MLflow image key of each case's figure

    def __init__(self, model: LoadedModel, settings: BaseModel, device: torch.device, *,
                 repair_nonfinite: bool = False, backend: str | None = None):
        self.model, self.settings, self.device = model, settings, device
        self.cfg = model.config
        self.repair_nonfinite = repair_nonfinite
        self.preprocessor = Preprocessor(self.cfg.preprocess) if self.cfg.preprocess.enabled else None
        self.backend = backends.resolve(backend or self.cfg.inference.backend, device)
        network = backends.wrap(model.net, self.backend, folder=model.folder,
                                weights_sha256=model.weights_sha256)
        # a fixed network batch: results do not depend on --batch-size or on sharding
        self.net = FixedBatch(network, micro_batch(self.cfg.data.spatial_dims, device))

    # -- loading ------------------------------------------------------------------------------
    @classmethod
    def open_model(cls, folder: str | Path, device: torch.device) -> LoadedModel:
        return load_model(folder, cls.task, device=str(device))

    @classmethod
    def load(cls, folder: str | Path, device: str = "auto", **options) -> Predictor:
        """Load a model folder. ``options`` that name fields of the model's settings section
        override them (``None`` keeps the model's); the others go to the constructor."""
        dev = select_device(device)
        return cls.from_model(cls.open_model(folder, dev), dev, **options)

    @classmethod
    def from_model(cls, model: LoadedModel, device: torch.device, **options) -> Predictor:
        """A predictor over an already loaded model (``options`` as for ``load``)."""
        section = getattr(model.config, cls.section)
        fields = type(section).model_fields
        settings = with_overrides(section, **{k: v for k, v in options.items() if k in fields})
        return cls(model, settings, device,
                   **{k: v for k, v in options.items() if k not in fields})

    def describe(self) -> dict:
        """The resolved settings, as written next to the outputs and logged to MLflow."""
        return {**self.settings.model_dump(mode="json"), "model": str(self.model.folder),
                "task": self.model.task, "repair_nonfinite": self.repair_nonfinite,
                "backend": self.backend}

    # -- preprocessing ------------------------------------------------------------------------
    def transforms(self, ndim: int, reader) -> list:
        """The MONAI chain from a file to the model grid (a task may drop or add steps)."""
        build = image_transforms if ndim == 2 else volume_transforms
        return list(build(self.cfg.data, reader=reader).transforms)

    def check_image(self, path: Path | None, image: MetaTensor) -> None:
        """A task's own checks of the loaded image (channels, extent)."""

    @property
    def contrasts(self) -> list[str]:
        """The contrasts the model takes, in channel order."""
        return list(self.cfg.data.contrasts or ["t1"])

    def prepare_input(self, item: Path | CaseFiles) -> Prepared:
        """A scan, or a case of one scan per contrast, on the model grid."""
        if isinstance(item, CaseFiles):
            return self.prepare_case(item.files)
        return self.prepare_file(item)

    def prepare_file(self, path: str | Path) -> Prepared:
        path = Path(path)
        validate_input(path)
        if len(self.contrasts) > 1:
            raise InputError(path, f"is one scan; this model takes {', '.join(self.contrasts)}: "
                                   "give one file per contrast (CASE_0000.nii.gz, "
                                   "CASE_0001.nii.gz, ...)")
        return self._prepare({"image": str(path)}, path, spatial_ndim(path), reader_for(path))

    def prepare_case(self, files: Sequence[str | Path]) -> Prepared:
        """The contrasts of one case (one 3D scan each, in the model's channel order) on the
        model grid, registered once (``Preprocessor.run_channels``); results come back on the
        first one's grid. Without registration the scans must share one grid."""
        files = [Path(f) for f in files]
        if len(files) != len(self.contrasts):
            raise InputError(files[0] if files else None,
                             f"a case of {len(files)} scans; the model takes "
                             f"{len(self.contrasts)} ({', '.join(self.contrasts)})")
        if len(files) == 1:
            return self._prepare({"image": str(files[0])}, files[0], spatial_ndim(files[0]),
                                 reader_for(files[0]))
        loaded = []
        for path in files:
            validate_input(path)
            if spatial_ndim(path) != 3:
                raise InputError(path, "is not a 3D scan; each contrast of a case must be one")
            loaded.append(self._load({"image": str(path)}, path, 3, reader_for(path)))
        for path, (data, *_rest) in zip(files, loaded, strict=True):
            if data["image"].shape[0] != 1:
                raise InputError(path, f"holds {data['image'].shape[0]} volumes; each contrast "
                                       "must be one 3D scan")
        data, steps, split, _ = loaded[0]
        repaired = sum(item[3] for item in loaded)
        if self.preprocessor is not None:
            data, native = self._preprocess(data, files[0], [item[0] for item in loaded], files)
            inverse = Chain(steps[split:])
        else:
            data, native = {**data, "image": _stack_channels(loaded, files)}, None
            inverse = Chain(steps)
        with reading(files[0]):
            data = Chain(steps[split:])(data)
        return Prepared(files[0], inverse, data, repaired, native)

    def prepare_array(self, array: np.ndarray, affine: np.ndarray) -> Prepared:
        """An in-memory scan (2D or 3D, no channel axis) with its voxel-to-world affine."""
        array = np.asarray(array, dtype=np.float32)
        affine = np.asarray(affine, dtype=np.float64)
        if array.ndim not in (2, 3) or affine.shape != (4, 4):
            raise InputError(None, f"expected a 2D or 3D array and a 4x4 affine, got shapes "
                                   f"{array.shape} and {affine.shape}")
        if len(self.contrasts) > 1:
            raise InputError(None, f"this model takes {', '.join(self.contrasts)}: score a "
                                   "case's files (prepare_case), one per contrast")
        meta = {"affine": torch.as_tensor(affine), "original_affine": affine,
                "spatial_shape": np.asarray(array.shape), "original_channel_dim": "no_channel",
                "filename_or_obj": "array"}
        image = MetaTensor(torch.from_numpy(array.copy()), affine=torch.as_tensor(affine),
                           meta=meta)
        return self._prepare({"image": image}, None, array.ndim, None, loaded=True)

    def _prepare(self, data: dict, path: Path | None, ndim: int, reader,
                 loaded: bool = False) -> Prepared:
        data, steps, split, repaired = self._load(data, path, ndim, reader, loaded)
        native, inverse = None, Chain(steps)  # the objects that ran: Invertd checks them
        if self.preprocessor is not None:  # a new image: only the steps after it are inverted
            data, native = self._preprocess(data, path)
            inverse = Chain(steps[split:])
        with reading(path):
            data = Chain(steps[split:])(data)
        return Prepared(path, inverse, data, repaired, native)

    def _load(self, data: dict, path: Path | None, ndim: int, reader,
              loaded: bool = False) -> tuple[dict, list, int, int]:
        """The scan read and oriented, its voxels checked (and repaired where asked): the data,
        the chain's steps (without loading for an array), where loading ends in them, and the
        count of repaired voxels."""
        if ndim == 2 and not (self.images_2d and self.cfg.data.spatial_dims == 2):
            raise InputError(path, "is a 2D image; this model works on 3D volumes")
        chain = self.transforms(ndim, reader)
        steps = [t for t in chain if not (loaded and isinstance(t, LoadImaged))]
        split = next((i for i, t in enumerate(steps) if not isinstance(t, _LOADING)), len(steps))
        with reading(path):
            data = Chain(steps[:split])(data)
        image = data["image"]
        if image.ndim != ndim + 1:
            raise InputError(path, f"has {image.ndim - 1} spatial dimensions after loading; "
                                   f"expected {ndim}")
        self.check_image(path, image)
        repaired = check_voxels(path if path is not None else "array", image,
                                repair=self.repair_nonfinite)
        if repaired:  # the caller reports it (the count is in the result)
            fixed, _ = repair_nonfinite(image.as_tensor().numpy())
            data["image"] = MetaTensor(torch.from_numpy(fixed), meta=image.meta,
                                       applied_operations=image.applied_operations)
        return data, steps, split, repaired

    def _preprocess(self, data: dict, path: Path | None, channels: list[dict] | None = None,
                    files: list[Path] | None = None) -> tuple[dict, Preprocessed]:
        """The model's preprocessing of the loaded scan (``channels``: the loaded data of each
        contrast of a case, ``files`` their files); a failed registration is refused."""
        image = data["image"]
        meta = image.meta
        shape = meta.get("spatial_shape", image.shape[1:])
        affine = meta.get("original_affine", image.affine)
        files = files or ([path] if path is not None else None)
        channels = channels or [data]
        if files is not None and not self.repair_nonfinite:  # files: registered once, cached
            entry = {"image": str(files[0]) if len(files) == 1 else [str(f) for f in files]}
            folder, record = cache.cached(self.cfg.preprocess, entry,
                                          preprocessor=self.preprocessor,
                                          contrasts=self.contrasts)
            native = Preprocessed.load(folder, shape, affine, record)
        else:
            scans = [(c["image"][0].numpy(), np.asarray(c["image"].affine)) for c in channels]
            native = self.preprocessor.run_channels(scans, self.contrasts[:len(scans)],
                                                    files or [path] * len(scans),
                                                    native_shape=shape, native_affine=affine)
        if native.failures:
            raise QualityError(path, native.failures)
        affine = torch.as_tensor(native.affine)
        channels = native.image if native.image.ndim == 4 else native.image[None]
        out = MetaTensor(torch.from_numpy(channels), affine=affine,
                         meta={"original_affine": native.affine, "affine": affine,
                               "spatial_shape": np.asarray(channels.shape[1:]),
                               "filename_or_obj": meta.get("filename_or_obj", "array")})
        return {**data, "image": out}, native

    # -- what a task supplies -------------------------------------------------------------------
    def predict(self, prep: Prepared, progress=None):
        """The task's result for a prepared scan (arrays in the input's space)."""
        raise NotImplementedError

    def output_names(self, case: str) -> list[str]:
        raise NotImplementedError

    def write(self, result, out_dir: Path, case: str) -> list[Path]:
        raise NotImplementedError

    def figure(self, result, case: str) -> np.ndarray | None:
        """The case's picture (RGB uint8), written as ``CASE.png`` and logged; None: none."""
        return None

    def case_outputs(self, case: str) -> list[str]:
        """Every file a finished case has: the task's, and the transform of a registration."""
        registered = self.preprocessor is not None and self.preprocessor.registers
        return self.output_names(case) + ([f"{case}_transform.tfm"] if registered else [])

    def failed_row(self, case: str, reasons: list[str]) -> dict:
        """The table row of a scan whose preprocessing failed its quality control."""
        return {"case": case, "ood": 1, "ood_reason": "; ".join(reasons)}

    def row(self, result, case: str) -> dict:
        return {"case": case}

    # -- running ----------------------------------------------------------------------------------
    def predict_file(self, path: str | Path, progress=None):
        return self.predict(self.prepare_file(path), progress)

    def predict_array(self, array: np.ndarray, affine: np.ndarray, progress=None):
        return self.predict(self.prepare_array(array, affine), progress)

    def predict_files(self, inputs: Sequence[str | Path], out_dir: str | Path, *,
                      overwrite: bool = False, part_id: int = 0, num_parts: int = 1,
                      tracker=None, on_case: Callable[[CaseOutcome], None] | None = None,
                      progress: Callable[[int, int], None] | None = None, run_name: str | None = None, nested: bool = False,
                      params: dict | None = None) -> list[CaseOutcome]:
        """Predict every input (expanded, then this part's share) into ``out_dir``.

        Inputs that cannot be used and cases that fail become ``failed`` outcomes (each
        reported once, through ``on_case``); finished cases are skipped unless ``overwrite``.
        ``progress(done, total)`` follows the cases.
        """
        paths, unusable = inputs_of_part(inputs, part_id, num_parts, on_case,
                                         self.cfg.data.contrasts)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        # what the outputs were computed with: the same file for any split of the inputs
        settings = {**self.describe(), **(params or {})}
        atomic_write_text(out_dir / f"{self.stage}_settings.json",
                          json.dumps(settings, indent=2, default=str) + "\n")
        settings.update(overwrite=overwrite, part_id=part_id, num_parts=num_parts)
        with (tracker.run(run_name or self.stage, nested=nested,
                          tags={"stage": self.stage, "model_task": self.model.task})
              if tracker else contextlib.nullcontext()):
            if tracker:
                tracker.log_params({**settings, "inputs": len(paths)})
                log_inputs_dataset(tracker, paths)

            def process(path: Path, case: str) -> dict:
                try:
                    prep = self.prepare_input(path)
                except QualityError as err:  # recorded in the table, then reported as failed
                    if self.table:
                        merge_rows(out_dir / self.table, [self.failed_row(case, err.reasons)])
                    raise
                result = self.predict(prep)
                self.write(result, out_dir, case)
                if prep.native is not None:
                    prep.native.save_transform(out_dir / f"{case}_transform.tfm")
                figure = self.figure(result, case)
                if figure is not None:
                    save_png(figure, out_dir / f"{case}.png")
                    if tracker:
                        tracker.log_image(figure, key=f"{self.figure_key}/{case}")
                row = self.row(result, case)
                if prep.repaired:
                    row["repaired_voxels"] = prep.repaired
                if prep.native is not None:
                    row.update({f"qc_{k}": v for k, v in prep.native.qc.items()})
                return row

            finished = []

            def case_done(outcome: CaseOutcome) -> None:
                finished.append(outcome)
                if on_case:
                    on_case(outcome)
                if progress:
                    progress(len(finished), len(paths))

            if progress:
                progress(0, len(paths))
            outcomes = run_cases(paths, out_dir, self.case_outputs, process, overwrite,
                                 case_done, table=self.table)
            if tracker:
                self.log_summary(tracker, outcomes, out_dir)
        return unusable + outcomes

    def log_summary(self, tracker, outcomes: list[CaseOutcome], out_dir: Path) -> None:
        """Counts, the mean of each numeric column of the table, and the table, to MLflow."""
        done = [o for o in outcomes if o.status == "done"]
        summary = {"done": len(done), "failed": sum(o.status == "failed" for o in outcomes)}
        for key in (done[0].row if done else {}):
            values = [_number(o.row.get(key)) for o in done]
            if key != "case" and all(v is not None for v in values):
                summary[f"mean_{key}"] = float(np.nanmean(values))
        tracker.log_metrics(summary)
        if (out_dir / self.table).is_file():
            tracker.log_artifact(out_dir / self.table)


def _stack_channels(loaded: list[tuple], files: list[Path]) -> MetaTensor:
    """The loaded contrasts of a case as one image of as many channels; they must share a grid
    (a model without registration cannot align them)."""
    first = loaded[0][0]["image"]
    for path, (data, *_rest) in zip(files[1:], loaded[1:], strict=True):
        image = data["image"]
        if not same_grid(image.shape[1:], image.affine, first.shape[1:], first.affine):
            raise InputError(path, f"is on another grid ({tuple(image.shape[1:])}) than the "
                                   f"case's first scan {files[0].name} "
                                   f"({tuple(first.shape[1:])}); a model without registration "
                                   "needs the contrasts of a case on one grid")
    stacked = torch.cat([item[0]["image"].as_tensor() for item in loaded])
    return MetaTensor(stacked, meta=first.meta, applied_operations=first.applied_operations)


def log_inputs_dataset(tracker, paths: Sequence[Path]) -> None:
    """The scored inputs as the run's "inputs" dataset: the fingerprint of their files and
    their common folder (paths only, nothing read from the scans' headers)."""
    if not paths:
        return
    try:
        paths = [f for p in paths for f in (p.files if isinstance(p, CaseFiles) else [p])]
        regular = [p for p in paths if Path(p).is_file() or Path(p).is_dir()]  # never a FIFO
        digest = fingerprint([{"image": str(p)} for p in regular])
        folder = os.path.commonpath([str(Path(p).resolve().parent) for p in paths])
    except (OSError, ValueError):  # an unreadable input fails as its own case, not the run
        return
    tracker.log_dataset("inputs", digest, folder, "scoring")


def _number(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None
