"""Public data layouts to medidiff's dataset.json (``medidiff data import FORMAT SRC OUT``).

One module per layout (``IMPORTERS``, keyed by ``medidiff.names.IMPORT_FORMATS``), each with
``collect(src) -> Layout``: it reads names and NIfTI headers only and raises ``InputError`` for
what it cannot use. ``output`` then links (or copies) the files under OUT and writes
OUT/dataset.json last. SRC is never modified.
"""

from __future__ import annotations

import json
from pathlib import Path

from medidiff.data.importers import atlas, bids, brats, decathlon, ixi, nnunet
from medidiff.data.importers.output import check_out_dir, write_dataset
from medidiff.errors import InputError
from medidiff.names import IMPORT_ALIASES, IMPORT_FORMATS

_MODULES = {"ixi": ixi, "brats": brats, "atlas": atlas, "bids": bids, "decathlon": decathlon,
            "nnunet": nnunet}
IMPORTERS = {name: _MODULES[name] for name in IMPORT_FORMATS}
"""Format name -> its module (``collect``), in the order the docs list them."""


def import_dataset(fmt: str, src, out, *, validation_fraction: float = 0.15, seed: int = 0,
                   copy: bool = False) -> Path:
    """Import the ``fmt`` data set in ``src`` into ``out``; returns ``out/dataset.json``.

    Training cases of healthy layouts (IXI, BIDS) give a seeded ``validation`` share of
    ``validation_fraction``. Files are symbolic links to the sources unless ``copy``.
    """
    key = str(fmt).strip().lower()
    name = IMPORT_ALIASES.get(key, key)
    if name not in IMPORTERS:
        known = ", ".join(IMPORT_FORMATS + tuple(IMPORT_ALIASES))
        raise InputError(None, f"unknown import format '{fmt}' (known: {known})")
    if not 0 <= float(validation_fraction) < 1:
        raise InputError(None, f"validation_fraction must be in [0, 1), got {validation_fraction}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InputError(None, f"seed must be a non-negative integer, got {seed!r}")
    src, out = Path(src).absolute(), Path(out)
    if not src.exists():
        raise InputError(src, "does not exist")
    if not src.is_dir():
        raise InputError(src, "is not a folder")
    check_out_dir(out, src)
    options = {"name": key} if key in IMPORT_ALIASES else {}
    layout = IMPORTERS[name].collect(src, **options)
    return write_dataset(layout, name, src, out, validation_fraction=float(validation_fraction),
                         seed=seed, copy=copy)


def summary(manifest: str | Path) -> str:
    """One line on an import: cases per split, contrasts, source format, notes."""
    manifest = Path(manifest)
    spec = json.loads(manifest.read_text())
    line = (f"imported {spec['numTraining']} training, {spec['numValidation']} validation, "
            f"{spec['numTest']} test cases ({', '.join(spec['contrasts'])}) from "
            f"{spec['source_format']} into {manifest.parent}")
    return "; ".join([line, *spec.get("notes", [])])


__all__ = ["IMPORTERS", "import_dataset", "summary"]
