"""Preprocessed training and calibration scans, cached by content and settings.

A scan is registered once per preprocessing setting: the cache key is a hash of the scan's
bytes (every file of a DICOM series), of its label files and of the ``preprocess`` section, so
that training twice on one raw folder, or calibrating after training, never registers twice,
and a changed scan or setting is never served stale. The cache lives in ``$MEDIDIFF_CACHE``
(default ``~/.cache/medidiff``); each entry is written into a temporary folder and renamed,
so an interrupted run leaves nothing half-written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from medidiff.config import PreprocessConfig
from medidiff.errors import InputError
from medidiff.io.read import load_image
from medidiff.io.write import atomic_write_text, save_nifti
from medidiff.preprocess.pipeline import Preprocessed, Preprocessor

log = logging.getLogger("medidiff")

VERSION = "3"  # bump when the preprocessing's output changes for the same settings
IMAGE, BRAIN, TRANSFORM, QC = "image.nii.gz", "brain.nii.gz", "transform.tfm", "qc.json"
# (Preprocessed.load reads the same names)


def cache_root() -> Path:
    return Path(os.environ.get("MEDIDIFF_CACHE") or Path.home() / ".cache" / "medidiff")


def content_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes, or of a folder's files (names and bytes, sorted)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for item in files:
        digest.update(item.relative_to(path).as_posix().encode() if path.is_dir() else b"")
        with item.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def image_files(entry: dict) -> list[str]:
    """The files of an entry's image: one scan, or one per contrast (a list)."""
    image = entry["image"]
    return [str(f) for f in image] if isinstance(image, list | tuple) else [str(image)]


def entry_key(cfg: PreprocessConfig, entry: dict, label_keys: Sequence[str],
              contrasts: Sequence[str] | None = None) -> str:
    files = image_files(entry)
    parts = {"version": VERSION, "preprocess": cfg.model_dump(mode="json"),
             "image": content_digest(files[0]) if len(files) == 1 else
             [content_digest(f) for f in files],
             "labels": {k: content_digest(entry[k]) for k in label_keys}}
    if len(files) > 1:  # each channel is measured against its own contrast's template
        parts["contrasts"] = list(contrasts or [])
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def cached(cfg: PreprocessConfig, entry: dict, label_keys: Sequence[str] = (),
           preprocessor: Preprocessor | None = None,
           contrasts: Sequence[str] | None = None) -> tuple[Path, dict]:
    """The cache folder of an entry's preprocessing (filled if needed) and its QC record.
    An entry of several contrasts (``image`` a list, ``contrasts`` their names) becomes one
    image of as many channels."""
    folder = cache_root() / "preprocess" / entry_key(cfg, entry, label_keys, contrasts)
    if not (folder / QC).is_file():
        _fill(folder, preprocessor or Preprocessor(cfg), entry, label_keys, contrasts)
    return folder, json.loads((folder / QC).read_text())


def preprocess_entries(cfg: PreprocessConfig, entries: list[dict], label_keys: Sequence[str] = (),
                       progress: Callable[[int, int], None] | None = None,
                       contrasts: Sequence[str] | None = None) -> list[dict]:
    """The entries with their image (and labels) replaced by preprocessed, cached files, and
    their quality numbers under ``qc``. Scans whose registration fails quality control are
    left out, with a warning. ``contrasts``: the model's, for entries of several.
    """
    if not cfg.enabled:
        return entries
    preprocessor, out = Preprocessor(cfg), []
    for i, entry in enumerate(entries):
        folder, record = cached(cfg, entry, label_keys, preprocessor, contrasts)
        if record["failures"]:
            log.warning("%s: left out (%s)", image_files(entry)[0], "; ".join(record["failures"]))
        else:
            out.append({**entry, "image": str(folder / IMAGE),
                        **{k: str(folder / f"{k}.nii.gz") for k in label_keys},
                        "source": image_files(entry)[0], "qc": record["qc"]})
        if progress:
            progress(i + 1, len(entries))
    if not out:
        raise InputError(None, "no scan passed the preprocessing's quality control")
    return out


def _fill(folder: Path, preprocessor: Preprocessor, entry: dict, label_keys,
          contrasts: Sequence[str] | None = None) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
    try:
        files = image_files(entry)
        scans = [_one_volume(f) for f in files]
        names = list(contrasts) if contrasts and len(contrasts) == len(files) else (
            [f"channel {k}" for k in range(len(files))])
        result = preprocessor.run_channels(scans, names, files)
        write_preprocessed(result, tmp, IMAGE, BRAIN, TRANSFORM)
        for key in label_keys:
            labels, label_affine = load_image(entry[key], labels=True)
            moved = result.from_native(labels[0], label_affine, nearest=True)
            save_nifti(np.rint(moved).astype(np.uint8), result.affine, tmp / f"{key}.nii.gz")
        atomic_write_text(tmp / QC, json.dumps({"qc": result.qc, "failures": result.failures,
                                                  "kind": result.kind}))
        try:
            tmp.rename(folder)
        except OSError:  # another process filled it first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _one_volume(path: str) -> tuple[np.ndarray, np.ndarray]:
    """A scan as a (X, Y, Z) array and its affine; a file of several volumes is refused."""
    array, affine = load_image(path)
    if array.shape[0] != 1:
        raise InputError(path, f"holds {array.shape[0]} volumes; each contrast must be one 3D "
                               "scan (one file per contrast)")
    return array[0], affine


def write_preprocessed(result: Preprocessed, out_dir: Path, image: str, brain: str,
                       transform: str) -> list[Path]:
    """The preprocessed scan, its brain mask and its transform (each when there is one)."""
    written = [save_nifti(result.image, result.affine, out_dir / image)]
    if result.brain is not None:
        written.append(save_nifti(result.brain.astype(np.uint8), result.affine, out_dir / brain))
    saved = result.save_transform(out_dir / transform)
    return written + ([saved] if saved else [])
