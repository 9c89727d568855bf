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


def entry_key(cfg: PreprocessConfig, entry: dict, label_keys: Sequence[str]) -> str:
    parts = {"version": VERSION, "preprocess": cfg.model_dump(mode="json"),
             "image": content_digest(entry["image"]),
             "labels": {k: content_digest(entry[k]) for k in label_keys}}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def cached(cfg: PreprocessConfig, entry: dict, label_keys: Sequence[str] = (),
           preprocessor: Preprocessor | None = None) -> tuple[Path, dict]:
    """The cache folder of an entry's preprocessing (filled if needed) and its QC record."""
    folder = cache_root() / "preprocess" / entry_key(cfg, entry, label_keys)
    if not (folder / QC).is_file():
        _fill(folder, preprocessor or Preprocessor(cfg), entry, label_keys)
    return folder, json.loads((folder / QC).read_text())


def preprocess_entries(cfg: PreprocessConfig, entries: list[dict], label_keys: Sequence[str] = (),
                       progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """The entries with their image (and labels) replaced by preprocessed, cached files, and
    their quality numbers under ``qc``. Scans whose registration fails quality control are
    left out, with a warning.
    """
    if not cfg.enabled:
        return entries
    preprocessor, out = Preprocessor(cfg), []
    for i, entry in enumerate(entries):
        folder, record = cached(cfg, entry, label_keys, preprocessor)
        if record["failures"]:
            log.warning("%s: left out (%s)", entry["image"], "; ".join(record["failures"]))
        else:
            out.append({**entry, "image": str(folder / IMAGE),
                        **{k: str(folder / f"{k}.nii.gz") for k in label_keys},
                        "source": str(entry["image"]), "qc": record["qc"]})
        if progress:
            progress(i + 1, len(entries))
    if not out:
        raise InputError(None, "no scan passed the preprocessing's quality control")
    return out


def _fill(folder: Path, preprocessor: Preprocessor, entry: dict, label_keys) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
    try:
        array, affine = load_image(entry["image"])
        result = preprocessor.run(array[0], affine, entry["image"])
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


def write_preprocessed(result: Preprocessed, out_dir: Path, image: str, brain: str,
                       transform: str) -> list[Path]:
    """The preprocessed scan, its brain mask and its transform (each when there is one)."""
    written = [save_nifti(result.image, result.affine, out_dir / image)]
    if result.brain is not None:
        written.append(save_nifti(result.brain.astype(np.uint8), result.affine, out_dir / brain))
    saved = result.save_transform(out_dir / transform)
    return written + ([saved] if saved else [])
