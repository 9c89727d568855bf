"""Training data sets: a folder or a Decathlon-style ``dataset.json``, as 2D slices or 3D patches.

Deterministic preprocessing is cached once (MONAI ``CacheDataset``); 2D mode then keeps every
slice along the configured axis that holds enough foreground, as one in-memory tensor.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from monai.data import CacheDataset, Dataset
from monai.transforms import Compose, RandSpatialCropd

from medidiff.config import Config, DataConfig
from medidiff.data.contrasts import dataset_contrasts
from medidiff.data.transforms import volume_transforms
from medidiff.errors import ConfigError, InputError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
# the keys of a dataset.json entry that hold paths (others: flags, numbers, descriptions)
PATH_KEYS = ("image", "label", "mask", "brain")


def _is_nifti(path: Path) -> bool:
    return path.name.endswith(NIFTI_SUFFIXES)


def read_split(data_dir: str | Path, split: str = "training",
               contrasts: list[str] | None = None) -> list[dict[str, str]]:
    """Entries (``{"image": path, ...}``, absolute paths) of a split of a data folder.

    With a ``dataset.json`` the split's list is used (``training``, ``validation`` or ``test``).
    Without it, every NIfTI file directly in the folder (or in its ``images/`` subfolder) is an
    image of the training split, a T1. ``contrasts`` picks, from a data set of several
    contrasts (``image`` a list, one file per contrast, in the order ``data_contrasts`` gives),
    those a model takes: ``image`` is then one path, or a list for several (None: all).
    """
    root = Path(data_dir)
    if not root.exists():
        raise InputError(root, "does not exist")
    if not root.is_dir():
        raise InputError(root, "is not a folder")
    manifest = root / "dataset.json"
    if manifest.is_file():
        return _entries_from_manifest(manifest, split, contrasts)
    if contrasts is not None and list(contrasts) != ["t1"]:
        raise InputError(root, f"has no dataset.json naming its contrasts; a model of "
                               f"{', '.join(contrasts)} needs one (modality or channel_names)")
    if split != "training":
        return []
    folder = root / "images" if (root / "images").is_dir() else root
    files = sorted(p for p in folder.iterdir() if _is_nifti(p))
    if not files:
        raise InputError(root, "holds no NIfTI scans and no dataset.json")
    return [{"image": str(p)} for p in files]


def _manifest(path: Path) -> dict:
    try:
        spec = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError(path, "is not valid JSON") from None
    if not isinstance(spec, dict):
        raise InputError(path, "must hold a JSON object")
    return spec


def data_contrasts(data_dir: str | Path) -> list[str]:
    """The contrasts of a data folder, in channel order (a folder without dataset.json: T1)."""
    manifest = Path(data_dir) / "dataset.json"
    if not manifest.is_file():
        return ["t1"]
    return dataset_contrasts(_manifest(manifest), manifest)


def resolve_contrasts(cfg: Config, data_dir: str | Path) -> Config:
    """``cfg`` with ``data.contrasts`` set from the data folder when it is null (all of the
    data set's), and the ``auto`` template resolved for the first of them; training records
    both in model.yaml, so scoring reads scans of the same contrasts, registered alike."""
    contrasts = cfg.data.contrasts or data_contrasts(data_dir)
    if len(contrasts) > 1 and cfg.task != "anomaly":
        raise ConfigError(f"data.contrasts: {Path(data_dir)} holds {', '.join(contrasts)}; "
                          f"{cfg.task} models take one contrast: pick one, e.g. "
                          f"--set data.contrasts=[{contrasts[-1]}]")
    data = cfg.to_dict()
    data["data"]["contrasts"] = list(contrasts)
    return Config.model_validate(data)


def _pick(manifest: Path, image, have: list[str], wanted: list[str]):
    """The files of ``wanted`` contrasts from an entry's ``image`` (one path per contrast)."""
    files = image if isinstance(image, list) else [image]
    if len(files) != len(have):
        raise InputError(manifest, f"an entry lists {len(files)} images for "
                                   f"{len(have)} contrasts ({', '.join(have)})")
    chosen = [files[have.index(c)] for c in wanted]
    return chosen[0] if len(chosen) == 1 else chosen


def _entries_from_manifest(manifest: Path, split: str,
                           contrasts: list[str] | None = None) -> list[dict[str, str]]:
    spec = _manifest(manifest)
    have = dataset_contrasts(spec, manifest)
    wanted = list(contrasts) if contrasts is not None else have
    missing = [c for c in wanted if c not in have]
    if missing:
        raise InputError(manifest, f"has no {', '.join(missing)} scans (its contrasts: "
                                   f"{', '.join(have)}); set data.contrasts to some of those")
    entries = spec.get(split, [])
    if not isinstance(entries, list):
        raise InputError(manifest, f"'{split}' must be a list")
    out = []
    for entry in entries:
        item = {"image": entry} if isinstance(entry, str | list) else dict(entry)
        if "image" not in item:
            raise InputError(manifest, f"an entry of '{split}' has no 'image'")
        item["image"] = _pick(manifest, item["image"], have, wanted)
        for key, value in item.items():
            if key in PATH_KEYS and isinstance(value, str | list):
                item[key] = _resolved(manifest, value)
        out.append(item)
    return out


def _resolved(manifest: Path, value):
    """A path (or list of paths) of a dataset.json, absolute; refused when it does not exist."""
    if isinstance(value, list):
        return [_resolved(manifest, v) for v in value]
    path = (manifest.parent / value).resolve()
    if not path.exists():
        raise InputError(path, f"listed in {manifest.name} but does not exist")
    return str(path)


def fingerprint(entries: list[dict[str, str]]) -> str:
    """A short hash of the training files' names, sizes and bytes (first MiB), for model.yaml."""
    digest = hashlib.sha256()
    for entry in entries:
        image = entry["image"]
        for path in map(Path, image if isinstance(image, list | tuple) else [image]):
            digest.update(path.name.encode())
            files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
            for item in files:
                digest.update(str(item.stat().st_size).encode())  # a DICOM series: each slice
                with item.open("rb") as handle:
                    digest.update(handle.read(1 << 20))
    return digest.hexdigest()[:16]


def cached_volumes(cfg: DataConfig, entries, label_keys=(), num_workers: int = 0):
    """Preprocess every entry once (cached in memory when ``cfg.cache``)."""
    pipeline = volume_transforms(cfg, label_keys=label_keys)
    if cfg.cache:
        return CacheDataset(entries, pipeline, num_workers=num_workers or None, progress=False)
    return Dataset(entries, pipeline)


class SliceDataset(torch.utils.data.Dataset):
    """All slices along ``axis`` of preprocessed volumes with enough foreground, in memory.

    With ``context`` c > 0 each image slice comes with its c neighbours on either side as
    channels (2c + 1, the slice itself in the middle; repeated at the volume's ends).
    """

    def __init__(self, volumes, cfg: DataConfig, keys=("image",), context: int = 0):
        self.keys = tuple(keys)
        stacks: dict[str, list[torch.Tensor]] = {k: [] for k in self.keys}
        axis = cfg.slice_axis + 1  # channel first
        for item in volumes:
            image = torch.as_tensor(item["image"])
            fg = (image > cfg.foreground_threshold).float().mean(
                dim=[d for d in range(image.ndim) if d != axis]
            )
            keep = torch.nonzero(fg >= cfg.min_foreground).flatten()
            for key in self.keys:
                data = torch.as_tensor(item[key]).movedim(axis, 0)
                rows = keep[:, None] + torch.arange(-context, context + 1)
                if key != "image" or not context:
                    rows = keep[:, None]
                data = data[rows.clamp(0, data.shape[0] - 1)].flatten(1, 2)
                stacks[key].append(data.float().clone())
        self.data = {k: torch.cat(v) if v else torch.empty(0) for k, v in stacks.items()}
        if len(self) == 0:
            raise InputError(None, "no training slice has enough foreground (data.min_foreground)")

    def __len__(self) -> int:
        return int(self.data[self.keys[0]].shape[0])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {k: v[index] for k, v in self.data.items()}


class PatchDataset(torch.utils.data.Dataset):
    """Random 3D patches (or whole volumes) of preprocessed volumes."""

    def __init__(self, volumes, cfg: DataConfig, keys=("image",)):
        self.volumes = volumes
        self.keys = tuple(keys)
        crop = [RandSpatialCropd(keys=self.keys, roi_size=cfg.patch, random_size=False)]
        self.crop = Compose(crop) if cfg.patch else None

    def set_random_state(self, seed: int) -> None:
        if self.crop is not None:
            self.crop.set_random_state(seed=seed)

    def __len__(self) -> int:
        return len(self.volumes)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = {k: torch.as_tensor(self.volumes[index][k]).float() for k in self.keys}
        if self.crop is not None:
            item = self.crop(item)
        return {k: torch.as_tensor(v).as_subclass(torch.Tensor) for k, v in item.items()}


def training_dataset(cfg: DataConfig, entries, keys=("image",), num_workers: int = 0,
                     context: int = 0):
    """The data set the training loop draws batches from (``context``: see SliceDataset)."""
    label_keys = [k for k in keys if k != "image"]
    volumes = cached_volumes(cfg, entries, label_keys=label_keys, num_workers=num_workers)
    if cfg.spatial_dims == 2:
        return SliceDataset(volumes, cfg, keys=keys, context=context)
    return PatchDataset(volumes, cfg, keys=keys)
