"""What every benchmark script shares: the machine's description and its docs section."""

from __future__ import annotations

import platform
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
