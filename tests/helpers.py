"""Plain helpers shared by the test modules (fixtures live in ``tests/conftest.py``).

Paths of the repository and its tiny presets, the in-process CLI, loopback ports, and writers of
small scans and untrained model folders. Import them from here, never from another test module.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "anomaly" / "cpu-tiny.yaml"
MEDIDIFF = Path(sys.executable).with_name("medidiff")  # the installed console script

# inference command -> (CLI words, model task, workflow module, output suffix of the main NIfTI)
INFERENCE_COMMANDS = {
    "anomaly score": (("anomaly", "score"), "anomaly", "anomaly_cmd", "_anomaly.nii.gz"),
    "denoise": (("denoise",), "denoise", "enhance_cmd", "_denoised.nii.gz"),
    "super-resolve": (("super-resolve",), "superres", "enhance_cmd", "_sr.nii.gz"),
    "segment": (("segment",), "segment", "segment_cmd", "_seg.nii.gz"),
}

# 8 mm in-plane: coarser than the models' 4 mm, so super-resolution has something to do
SPACING = np.diag([8.0, 8.0, 4.0, 1.0])

_RNG = np.random.default_rng(7)


# -- the command line ----------------------------------------------------------------------------


def run_cli(*args: str) -> tuple[int, str, str]:
    """Run the medidiff CLI in-process; returns (exit code, stdout, stderr)."""
    from medidiff.workflows.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def available_commands() -> list[str]:
    """Inference commands whose workflow exists and is registered with the CLI."""
    from medidiff.workflows.cli import cli

    return [name for name, (words, _, module, _) in INFERENCE_COMMANDS.items()
            if (REPO / "workflows" / f"{module}.py").is_file() and words[0] in cli.commands]


# -- servers -------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_server(server: subprocess.Popen) -> None:
    """Stop the server and the uvicorn worker it started (their own process group)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        server.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGKILL)  # whatever outlived the polite request
    server.wait(timeout=5)


# -- models and scans ----------------------------------------------------------------------------


def random_model(folder: Path, task: str) -> Path:
    """A model folder of the task's cpu-tiny preset with untrained weights."""
    from medidiff.config import load_config
    from medidiff.models.folder import build_network, save_model_folder
    from medidiff.tasks.registry import get_task

    cfg = load_config(REPO / "configs" / task / "cpu-tiny.yaml")
    return save_model_folder(folder, cfg, build_network(cfg, get_task(task)).state_dict(),
                             {"steps": 0})


def head(shape=(16, 16, 12)) -> np.ndarray:
    """A bright textured block in a dark background: a scan with a foreground."""
    data = np.zeros(shape, np.float32)
    inner = tuple(slice(max(1, n // 5), n - max(1, n // 5)) for n in shape)
    data[inner] = 100 + 50 * _RNG.random(data[inner].shape)
    return data


def nifti_bytes(data: np.ndarray, affine=SPACING, gz: bool = True) -> bytes:
    import nibabel as nib

    raw = nib.Nifti1Image(data, affine).to_bytes()
    return gzip.compress(raw, mtime=0) if gz else raw


def huge_header(path: Path) -> Path:
    """A NIfTI-2 header that claims 10^15 voxels, and almost no data after it."""
    import nibabel as nib

    header = nib.Nifti2Header()
    header.set_data_shape((100000, 100000, 100000))
    header.set_data_dtype(np.float32)
    buffer = io.BytesIO()
    header.write_to(buffer)
    raw = buffer.getvalue() + b"\0" * 64
    path.write_bytes(gzip.compress(raw) if path.name.endswith(".gz") else raw)
    return path


def mr_series(folder: Path, count: int = 6, *, step: float = 4.0, pixel_spacing: float = 4.0,
              depths=None, fields: dict | None = None, name: str = "MR_small.dcm") -> Path:
    """A DICOM series of `count` slices of one of pydicom's test files, evenly spaced.

    `fields` are set on every slice (e.g. planted patient identifiers).
    """
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True)
    series = generate_uid()
    for i, depth in enumerate(range(count) if depths is None else depths):
        ds = pydicom.dcmread(get_testdata_file(name))
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, z + step * depth]
        ds.PixelSpacing = [pixel_spacing, pixel_spacing]
        ds.SliceThickness = step
        ds.InstanceNumber, ds.SeriesInstanceUID, ds.SOPInstanceUID = i + 1, series, generate_uid()
        pixels = ds.pixel_array
        ds.PixelData = (pixels.astype(np.int32) + 40 * i).astype(pixels.dtype).tobytes()
        for key, value in (fields or {}).items():
            setattr(ds, key, value)
        ds.save_as(folder / f"slice{i:03d}.dcm")
    return folder
