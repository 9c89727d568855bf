"""MR contrasts by one name each, and the namings the field's data sets give them.

medidiff calls a contrast ``t1``, ``t1ce``, ``t2``, ``flair`` or ``pd`` (``medidiff.names.CONTRASTS``).
Data sets spell them their own way: Decathlon's ``modality`` and nnU-Net's ``channel_names``
(``"T1w"``, ``"FLAIR"``), BraTS 2021 (``t1, t1ce, t2, flair``) and 2023 (``t1n, t1c, t2w, t2f``),
BIDS suffixes (``T1w, T2w, FLAIR, PDw``), IXI (``T1, T2, PD``). ``canonical`` maps each to ours;
``BIDS_SUFFIX`` and ``DISPLAY`` go the other way.
"""

from __future__ import annotations

from medidiff.errors import InputError
from medidiff.names import CONTRASTS

_ALIASES = {
    "t1": ("t1", "t1w", "t1n", "t1-weighted", "mprage", "t1_mprage"),
    "t1ce": ("t1ce", "t1c", "t1gd", "t1-gd", "t1w-gd", "t1post", "ce-t1w"),
    "t2": ("t2", "t2w", "t2-weighted"),
    "flair": ("flair", "t2f", "t2-flair", "t2flair", "t2_flair"),
    "pd": ("pd", "pdw", "pd-weighted"),
}
ALIASES = {alias: name for name, spellings in _ALIASES.items() for alias in spellings}

BIDS_SUFFIX = {"t1": "T1w", "t1ce": "T1w", "t2": "T2w", "flair": "FLAIR", "pd": "PDw"}
"""The BIDS ``anat`` suffix of each contrast (a contrast-enhanced T1 is a ``T1w`` with ``ce-``)."""

DISPLAY = {"t1": "T1", "t1ce": "T1ce", "t2": "T2", "flair": "FLAIR", "pd": "PD"}
"""How ``dataset.json`` files written by medidiff name each contrast (``modality``)."""


def canonical(name: str, source=None) -> str:
    """medidiff's name of a contrast spelled ``name`` (any case), or an InputError naming it."""
    key = str(name).strip().lower().replace(" ", "")
    if key in ALIASES:
        return ALIASES[key]
    raise InputError(source, f"unknown contrast '{name}' (known: {', '.join(CONTRASTS)} and "
                             "their usual spellings, e.g. T1w, T2w, FLAIR, t2f, t1n)")


def maybe_canonical(name: str) -> str | None:
    """As ``canonical``, or None for a name that is no contrast (a BIDS ``mask`` suffix)."""
    return ALIASES.get(str(name).strip().lower().replace(" ", ""))


def dataset_contrasts(spec: dict, source=None) -> list[str]:
    """The contrasts a ``dataset.json`` names, in channel order: medidiff's ``contrasts`` list,
    else nnU-Net's ``channel_names`` or Decathlon's ``modality`` (``{"0": "T1w", ...}``); a data
    set that names none is one T1 channel (as medidiff's example data were before contrasts)."""
    if isinstance(spec.get("contrasts"), list) and spec["contrasts"]:
        return [canonical(c, source) for c in spec["contrasts"]]
    for key in ("channel_names", "modality"):
        table = spec.get(key)
        if isinstance(table, dict) and table:
            try:
                order = sorted(table, key=int)
            except ValueError:
                raise InputError(source, f"'{key}' must be keyed by channel index") from None
            names = [canonical(table[k], source) for k in order]
            if len(set(names)) != len(names):
                raise InputError(source, f"'{key}' names a contrast twice: {names}")
            return names
    return ["t1"]
