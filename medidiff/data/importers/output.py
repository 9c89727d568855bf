"""An import's output folder: links (or copies) to the source files, 4D splits, dataset.json.

dataset.json is written last and atomically, so its presence marks a complete import.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np

from medidiff.data.contrasts import DISPLAY
from medidiff.data.importers.layout import Case, Channel, Layout, nifti_ending
from medidiff.errors import InputError
from medidiff.io.write import atomic_write_text, safe_output_path, save_nifti


def check_out_dir(out: Path, src: Path) -> None:
    """Refuse a file, a folder that already holds a data set, or one inside the source."""
    if out.exists() and not out.is_dir():
        raise InputError(out, "is a file, not a folder")
    if (out / "dataset.json").exists():
        raise InputError(out, "already holds a data set; choose another folder")
    if out.resolve().is_relative_to(src.resolve()):
        raise InputError(out, f"is inside the source {src}, which is never modified; "
                              "choose a folder outside it")


def validation_indices(count: int, fraction: float, seed: int) -> set[int]:
    """Which of ``count`` training cases are held out: round(count * fraction) of them, at
    least one when the fraction is above 0 and at least one case stays for training."""
    if fraction <= 0 or count < 2:
        return set()
    size = min(max(1, round(count * fraction)), count - 1)
    return {int(i) for i in np.random.default_rng(seed).permutation(count)[:size]}


def place(source: Path, target: Path, copy: bool) -> None:
    """``target`` as a symbolic link to ``source`` (absolute), or a copy: with ``copy`` or where
    the file system refuses links. Through a temporary name, so a stale target is replaced."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    try:
        if not copy:
            try:
                os.symlink(os.path.abspath(source), tmp)
            except OSError:
                copy = True
        if copy:
            shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _entry(case: Case, layout: Layout, out: Path, copy: bool) -> dict:
    """Place one case's files under ``out``; its dataset.json entry (paths relative to out)."""
    files, data, affine = [], None, None
    for source, contrast in zip(case.images, layout.contrasts, strict=True):
        if isinstance(source, Channel):
            name = f"images/{case.name}_{contrast}{nifti_ending(source.path)}"
            if data is None:  # one read of the 4D file for all its channels
                image = nib.load(source.path)
                data, affine = np.asanyarray(image.dataobj), image.affine
            save_nifti(data[..., source.index], affine, safe_output_path(out, name))
        else:
            name = f"images/{case.name}_{contrast}{nifti_ending(source)}"
            place(source, safe_output_path(out, name), copy)
        files.append(name)
    entry = {"image": files if len(files) > 1 else files[0]}
    for key, folder, path in (("mask", "masks", case.mask), ("label", "labels", case.label)):
        if path is not None:
            entry[key] = f"{folder}/{case.name}{nifti_ending(path)}"
            place(path, safe_output_path(out, entry[key]), copy)
    if case.lesion is not None:
        entry["lesion"] = case.lesion
    return entry


def write_dataset(layout: Layout, fmt: str, src: Path, out: Path, *, validation_fraction: float,
                  seed: int, copy: bool) -> Path:
    """Place every case's files under ``out`` and write ``out/dataset.json`` (returned)."""
    names = [case.name for case in layout.training + layout.test]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise InputError(src, f"holds two cases named {twice[0]}")
    held = validation_indices(len(layout.training), validation_fraction, seed) \
        if layout.split_validation else set()
    splits = {"training": [], "validation": [], "test": []}
    for index, case in enumerate(layout.training):
        split = "validation" if index in held else "training"
        splits[split].append(_entry(case, layout, out, copy))
    splits["test"] = [_entry(case, layout, out, copy) for case in layout.test]
    channels = {str(i): DISPLAY[c] for i, c in enumerate(layout.contrasts)}
    spec = {
        "name": layout.name, "description": layout.description, "source_format": fmt,
        "source": str(src.resolve()), "tensorImageSize": "3D",
        "contrasts": list(layout.contrasts), "modality": channels, "channel_names": channels,
        "input": layout.input, "space": layout.space, **layout.extra, **splits,
        "numTraining": len(splits["training"]), "numValidation": len(splits["validation"]),
        "numTest": len(splits["test"]), "notes": list(layout.notes),
    }
    return atomic_write_text(out / "dataset.json", json.dumps(spec, indent=2) + "\n")
