"""nnU-Net v2 raw: ``dataset.json`` with ``channel_names`` and ``file_ending``,
``imagesTr/{CASE}_{XXXX}.nii.gz`` (XXXX the channel, 0000 first), ``labelsTr/{CASE}.nii.gz``,
``imagesTs/`` in the same naming."""

from __future__ import annotations

import re
from pathlib import Path

from medidiff.data.importers.layout import Case, Layout, check_case, source_spec
from medidiff.errors import InputError


def _cases(folder: Path, ending: str, channels: int) -> dict[str, list[Path]]:
    """{case: one file per channel} of an images folder; a case missing a channel is refused."""
    if not folder.is_dir():
        return {}
    pattern = re.compile(rf"^(.+)_(\d{{4}}){re.escape(ending)}$")
    found: dict[str, dict[int, Path]] = {}
    for path in sorted(folder.iterdir()):
        match = pattern.match(path.name)
        if match and not path.name.startswith("."):
            found.setdefault(match.group(1), {})[int(match.group(2))] = path
    cases = {}
    for case, files in sorted(found.items()):
        for index in range(channels):
            if index not in files:
                raise InputError(folder, f"case {case} has no {case}_{index:04d}{ending}")
        cases[case] = [files[i] for i in range(channels)]
    return cases


def collect(src: Path) -> Layout:
    """imagesTr (with labelsTr) as training cases, imagesTs as test cases."""
    spec, contrasts = source_spec(src, "channel_names", "nnU-Net v2 raw")
    ending = spec.get("file_ending")
    if ending not in (".nii", ".nii.gz"):
        raise InputError(src / "dataset.json", f"file_ending {ending!r}: only NIfTI "
                                               "('.nii.gz', '.nii') is imported")
    training = []
    for case, files in _cases(src / "imagesTr", ending, len(contrasts)).items():
        label = src / "labelsTr" / f"{case}{ending}"
        if not label.is_file():
            raise InputError(label, f"does not exist (the label of training case {case})")
        training.append(Case(case, files, label=label))
    test = [Case(case, files) for case, files in
            _cases(src / "imagesTs", ending, len(contrasts)).items()]
    if not training and not test:
        raise InputError(src, f"holds no nnU-Net scans (imagesTr/<case>_0000{ending})")
    for case in training + test:
        check_case(case, contrasts)
    name = str(spec.get("name") or src.name)
    return Layout(name, str(spec.get("description") or f"nnU-Net v2 data set {name}"), contrasts,
                  input=None, space=None, training=training, test=test)
