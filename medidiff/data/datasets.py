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

from medidiff.config import DataConfig
from medidiff.data.transforms import volume_transforms
from medidiff.errors import InputError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
# the keys of a dataset.json entry that hold paths (others: flags, numbers, descriptions)
PATH_KEYS = ("image", "label", "mask", "brain")


def _is_nifti(path: Path) -> bool:
    return path.name.endswith(NIFTI_SUFFIXES)


def read_split(data_dir: str | Path, split: str = "training") -> list[dict[str, str]]:
    """Entries (``{"image": path, ...}``, absolute paths) of a split of a data folder.

    With a ``dataset.json`` the split's list is used (``training``, ``validation`` or ``test``).
    Without it, every NIfTI file directly in the folder (or in its ``images/`` subfolder) is an
    image of the training split.
    """
    root = Path(data_dir)
    if not root.exists():
        raise InputError(root, "does not exist")
    if not root.is_dir():
        raise InputError(root, "is not a folder")
    manifest = root / "dataset.json"
    if manifest.is_file():
        return _entries_from_manifest(manifest, split)
    if split != "training":
        return []
    folder = root / "images" if (root / "images").is_dir() else root
    files = sorted(p for p in folder.iterdir() if _is_nifti(p))
    if not files:
        raise InputError(root, "holds no NIfTI scans and no dataset.json")
    return [{"image": str(p)} for p in files]


def _entries_from_manifest(manifest: Path, split: str) -> list[dict[str, str]]:
    try:
        spec = json.loads(manifest.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError(manifest, "is not valid JSON") from None
    entries = spec.get(split, [])
    if not isinstance(entries, list):
        raise InputError(manifest, f"'{split}' must be a list")
    out = []
    for entry in entries:
        item = {"image": entry} if isinstance(entry, str) else dict(entry)
        if "image" not in item:
            raise InputError(manifest, f"an entry of '{split}' has no 'image'")
        for key, value in item.items():
            if key in PATH_KEYS and isinstance(value, str):
                path = (manifest.parent / value).resolve()
                if not path.exists():
                    raise InputError(path, f"listed in {manifest.name} but does not exist")
                item[key] = str(path)
        out.append(item)
    return out


def fingerprint(entries: list[dict[str, str]]) -> str:
    """A short hash of the training files' names, sizes and bytes (first MiB), for model.yaml."""
    digest = hashlib.sha256()
    for entry in entries:
        path = Path(entry["image"])
        digest.update(path.name.encode())
        for item in sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]:
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
