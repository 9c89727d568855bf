"""What every benchmark script shares: the machine's description and its docs section."""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "benchmarks.md"


def machine(device: torch.device | str = "cpu") -> str:
    """CPU model (or processor), torch threads and version, for the record next to numbers; the
    GPU's name first when ``device`` is a CUDA device."""
    gpu = ""
    if torch.device(device).type == "cuda":
        gpu = f"{torch.cuda.get_device_name(torch.device(device))} with "
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{gpu}{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def write_section(section: str, text: str, title: str | None = None) -> None:
    """Replace the text between ``<!-- section:start -->`` and its end marker in
    docs/benchmarks.md (appending the section, under ``title``, when it is missing)."""
    start, end = f"<!-- {section}:start -->", f"<!-- {section}:end -->"
    doc = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n"
    if start not in doc:
        heading = f"\n## {title}\n" if title else ""
        doc = doc.rstrip("\n") + f"\n{heading}\n{start}\n{end}\n"
    before, rest = doc.split(start, 1)
    DOCS.write_text(f"{before}{start}\n{text}\n{end}{rest.split(end, 1)[1]}")


def command_line(script: str) -> str:
    """The command that reproduces this run: ``OMP_NUM_THREADS`` when set, the script and its
    arguments as given."""
    command = " ".join([f"python benchmarks/{script}", *sys.argv[1:]])
    threads = os.environ.get("OMP_NUM_THREADS")
    return f"OMP_NUM_THREADS={threads} {command}" if threads else command


def score_folder(model: Path, method: str, inputs: Path, out: Path, masks: Path) -> dict:
    """Score a folder of inputs with an anomaly model and ``method`` into ``out`` and evaluate
    the maps against ``masks``: pooled AP, Dice at the calibrated threshold, best Dice, scan
    AUROC, cases, seconds per input, and the messages of the cases that failed."""
    from medidiff.api import AnomalyDetector, evaluate_folder

    detector = AnomalyDetector.load(model, method=method)
    started = time.perf_counter()
    outcomes = detector.predict_files([inputs], out, overwrite=True)
    seconds = (time.perf_counter() - started) / max(1, len(outcomes))
    result = evaluate_folder(out, masks)
    return {k: result[k] for k in ("pooled_ap", "dice_at_calibrated_threshold",
                                   "best_dice_oracle", "scan_auroc", "n_cases")} | {
        "seconds_per_scan": seconds,
        "failed": [f"{o.case}: {o.message}" for o in outcomes if o.status != "done"]}
