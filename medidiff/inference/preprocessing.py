"""``medidiff preprocess``: the preprocessing stage on its own (as nnU-Net's plan-and-preprocess).

Per case: ``CASE_preprocessed.nii.gz`` (registered, skull-stripped, normalised), ``CASE_brain.nii.gz``,
``CASE_transform.tfm`` (template point -> scan point, ITK text), ``CASE_qc.png`` (the template's
brain outline over the registered scan) and a row of ``preprocess.csv`` with the quality
numbers. The cache that training and calibration read is filled on the way, so that training
on the same raw folder afterwards registers nothing again.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path

import nibabel as nib
import numpy as np

from medidiff.config import Config
from medidiff.errors import QualityError
from medidiff.inference.cases import CaseOutcome, inputs_of_part, merge_rows, run_cases
from medidiff.io.write import atomic_write_text
from medidiff.preprocess import cache
from medidiff.preprocess.figures import qc_figure
from medidiff.preprocess.pipeline import Preprocessor
from medidiff.report import save_png

TABLE = "preprocess.csv"


def output_names(case: str) -> list[str]:
    return [f"{case}_preprocessed.nii.gz", f"{case}_brain.nii.gz", f"{case}_transform.tfm",
            f"{case}_qc.png"]


def preprocess_files(cfg: Config, inputs: Sequence[str | Path], out_dir: str | Path, *,
                     overwrite: bool = False, part_id: int = 0, num_parts: int = 1,
                     on_case: Callable[[CaseOutcome], None] | None = None,
                     tracker=None) -> list[CaseOutcome]:
    """Preprocess this part's share of the inputs into ``out_dir`` (see the module docstring)."""
    if not cfg.preprocess.enabled:
        raise QualityError(None, ["the config's preprocess section does nothing (registration "
                                  "and bias_correction are 'none')"])
    paths, unusable = inputs_of_part(inputs, part_id, num_parts, on_case)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = cfg.preprocess.model_dump(mode="json")
    preprocessor = Preprocessor(cfg.preprocess)
    atomic_write_text(out_dir / "preprocess_settings.json", json.dumps(settings, indent=2) + "\n")

    def process(path: Path, case: str) -> dict:
        folder, qc = cache.cached(cfg.preprocess, {"image": str(path)}, preprocessor=preprocessor)
        if qc["failures"]:
            merge_rows(out_dir / TABLE, [{"case": case, "ok": 0,
                                          "reason": "; ".join(qc["failures"])}])
            raise QualityError(path, qc["failures"])
        for source, name in zip((cache.IMAGE, cache.BRAIN, cache.TRANSFORM), output_names(case),
                                strict=False):
            if (folder / source).is_file():
                shutil.copyfile(folder / source, out_dir / name)
        image = np.asarray(nib.load(folder / cache.IMAGE).dataobj)
        brain = (np.asarray(nib.load(folder / cache.BRAIN).dataobj)
                 if (folder / cache.BRAIN).is_file() else np.ones(image.shape, np.uint8))
        figure = qc_figure(image, brain, case)
        save_png(figure, out_dir / f"{case}_qc.png")
        if tracker:
            tracker.log_image(figure, key=f"qc/{case}")
        return {"case": case, "ok": 1, **{f"qc_{k}": v for k, v in qc["qc"].items()}}

    with tracker.run("preprocess", tags={"stage": "preprocess"}) if tracker else nullcontext():
        if tracker:
            tracker.log_params({**settings, "inputs": len(paths)})
        outcomes = run_cases(paths, out_dir, _outputs(cfg), process, overwrite, on_case,
                             table=TABLE)
    return unusable + outcomes


def _outputs(cfg: Config):
    def names(case: str) -> list[str]:
        wanted = output_names(case)
        if cfg.preprocess.skull_strip == "none":
            wanted.remove(f"{case}_brain.nii.gz")
        if cfg.preprocess.registration == "none":
            wanted.remove(f"{case}_transform.tfm")
        return wanted

    return names
