"""Hostile inputs through every inference command: a one-line error and exit status 2, or a
correct result; never a traceback, a hang or memory set by what a header claims.

The models here are untrained (random weights, written in milliseconds): what is tested is the
path from a file to an output or a refusal, not the quality of the result.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import resource
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom.data import get_testdata_file

from tests.helpers import (
    INFERENCE_COMMANDS,
    MEDIDIFF,
    SPACING,
    available_commands,
    head,
    huge_header,
    mr_series,
    nifti_bytes,
    random_model,
    run_cli,
)

COMMANDS = available_commands()
RNG = np.random.default_rng(7)


# -- models and scans ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("random-models")
    return {name: random_model(root / INFERENCE_COMMANDS[name][1], INFERENCE_COMMANDS[name][1])
            for name in COMMANDS}


def _with_header(data: np.ndarray, change) -> bytes:
    img = nib.Nifti1Image(data, SPACING)
    change(img)
    return gzip.compress(img.to_bytes(), mtime=0)


def _pixdim(index: int, value: float):
    def change(img):
        img.header["pixdim"][index] = value
    return change


def _singular(img) -> None:
    img.set_sform(np.array([[8.0, 8, 0, 0], [0, 0, 4, 0], [0, 0, 0, 0], [0, 0, 0, 1]]), code=1)
    img.set_qform(None, code=0)


def _png(array: np.ndarray, mode: str | None = None, **kwargs) -> bytes:
    image = Image.fromarray(array, mode) if mode else Image.fromarray(array)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **kwargs)
    return buffer.getvalue()


def _dicom_cases(root: Path) -> dict[str, str]:
    """DICOM series folders that must be refused, with a word of the expected message."""
    mr_series(root / "dcm_mixed", 3)
    mixed = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    mixed.save_as(root / "dcm_mixed" / "other.dcm")
    mr_series(root / "dcm_gap", depths=(0, 1, 2, 4, 5))
    mr_series(root / "dcm_nopixels", 3)
    for file in (root / "dcm_nopixels").iterdir():
        ds = pydicom.dcmread(file)
        del ds.PixelData
        ds.save_as(file)
    mr_series(root / "dcm_cutpixels", 3)
    for file in (root / "dcm_cutpixels").iterdir():
        ds = pydicom.dcmread(file)
        ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]
        ds.save_as(file)
    mr_series(root / "dcm_huge", 3)
    for file in (root / "dcm_huge").iterdir():
        ds = pydicom.dcmread(file)
        ds.Rows = ds.Columns = 65000
        ds.save_as(file)
    (root / "dcm_junk").mkdir()
    (root / "dcm_junk" / "slice.dcm").write_bytes(RNG.bytes(700))
    return {"dcm_mixed": "2 DICOM series", "dcm_gap": "unevenly spaced",
            "dcm_nopixels": "pixel data", "dcm_cutpixels": "", "dcm_huge": "voxels",
            "dcm_junk": "DICOM"}


def hostile_inputs(root: Path) -> tuple[dict[str, str], list[str]]:
    """Write the hostile inputs into `root`.

    Returns (refused: file or folder name -> a word of its one-line message, either: names that
    each command must process correctly or refuse in one line).
    """
    ok = head()
    good = nifti_bytes(ok)
    nan, inf = ok.copy(), ok.copy()
    nan[5, 5, 5], inf[6, 6, 6] = np.nan, -np.inf
    files = {
        "random_gz.nii.gz": (RNG.bytes(900), "NIfTI"),
        "random_plain.nii": (RNG.bytes(900), "NIfTI"),
        "random_png.png": (RNG.bytes(900), "PNG"),
        "empty.nii.gz": (b"", "NIfTI"),
        "cut_plain.nii": (nifti_bytes(ok, gz=False)[:1200], "truncated"),
        "cut_stream.nii.gz": (good[: len(good) // 2], ""),
        "bad_crc.nii.gz": (good[:-8] + bytes(b ^ 0xFF for b in good[-8:-4]) + good[-4:], ""),
        "flipped_gz.nii.gz": (good[:10] + bytes(b ^ 0x55 for b in good[10:60]) + good[60:], ""),
        "zero_spacing.nii.gz": (_with_header(ok, _pixdim(2, 0.0)), "pixel spacing"),
        "negative_spacing.nii.gz": (_with_header(ok, _pixdim(1, -8.0)), "pixel spacing"),
        "singular.nii.gz": (_with_header(ok, _singular), "singular affine"),
        "nan.nii.gz": (nifti_bytes(nan), "NaN/Inf"),
        "inf.nii.gz": (nifti_bytes(inf), "NaN/Inf"),
        "constant.nii.gz": (nifti_bytes(np.full((16, 16, 12), 3.0, np.float32)), "constant"),
        "far_apart.nii.gz": (nifti_bytes(ok, np.diag([300.0, 300, 300, 1])), ""),
        "near_float_max.nii.gz": (nifti_bytes(np.where(ok > 0, 3e38, -3e38).astype(np.float32)),
                                  ""),
        "constant_png.png": (_png(np.full((30, 40), 9, np.uint8)), "constant"),
        "line.png": (_png((RNG.random((1, 40)) * 255).astype(np.uint8)), "1 dimension"),
    }
    for name, (data, _) in files.items():
        (root / name).write_bytes(data)
    os.mkfifo(root / "fifo.nii.gz")  # opening it to read would block forever
    refused = {name: word for name, (_, word) in files.items()}
    refused["fifo.nii.gz"] = "not a regular file"
    for name in ("huge_plain.nii", "huge_gz.nii.gz"):  # 100000^3 voxels declared in < 1 KB
        assert huge_header(root / name).stat().st_size < 1024
        refused[name] = "1000000000000000 voxels"
    refused.update(_dicom_cases(root))

    rgb = (RNG.random((30, 40, 3)) * 255).astype(np.uint8)
    either = {
        "control.nii.gz": good,
        "sheared.nii.gz": nifti_bytes(ok, np.array([[8.0, 3, 0, 0], [0, 8, 0, 0],
                                                    [0, 0, 4, 0], [0, 0, 0, 1]])),
        "int16.nii.gz": nifti_bytes(ok.astype(np.int16)),
        "float64.nii.gz": nifti_bytes(ok.astype(np.float64)),
        "rgba.png": _png(np.concatenate([rgb, rgb[..., :1]], axis=-1), "RGBA"),
        "deep16.png": _png((RNG.random((30, 40)) * 60000).astype(np.uint16)),
        "palette.png": _png(np.asarray(Image.fromarray(rgb).quantize(8))),
        "bilevel.png": _png(rgb[..., 0] > 128),
        "grey_alpha.png": _png(rgb[..., :2], "LA"),
    }
    for name, data in either.items():
        (root / name).write_bytes(data)
    mr_series(root / "dcm_ok", 6, pixel_spacing=8.0)
    return refused, [*either, "dcm_ok"]


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    refused, either = hostile_inputs(root)
    return root, refused, either


# -- checking a command's answer -----------------------------------------------------------------


@contextlib.contextmanager
def time_limit(seconds: int):
    """Fail (TimeoutError) instead of hanging, for commands run in this process."""
    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def messages_about(err: str, path: Path) -> set[str]:
    """The distinct messages on stderr about `path` (prefixes such as 'error: ' dropped)."""
    found = set()
    for line in err.splitlines():
        for marker in (f"{path}:", f"{path}/"):
            at = line.find(marker)
            if at >= 0:
                found.add(line[at:])
                break
    return found


def case_of(name: str) -> str:
    from medidiff.io.discover import case_name

    return case_name(name)


def check_answer(command: str, inputs: list[Path], out: Path, code: int, err: str,
                 must_refuse: dict[Path, str]) -> dict[Path, str]:
    """Every input was processed (outputs complete) or refused in exactly one message."""
    assert code in (0, 2), err
    assert "Traceback" not in err, err
    suffix = INFERENCE_COMMANDS[command][3]
    outcome = {}
    for path in inputs:
        said = messages_about(err, path)
        output = out / f"{case_of(path.name)}{suffix}"
        if said:
            assert len(said) == 1, f"{path.name}: more than one message: {said}"
            assert not list(out.glob(f"{case_of(path.name)}_*")), f"{path.name}: left outputs"
            outcome[path] = "refused"
            word = must_refuse.get(path, "")
            assert word in next(iter(said)), f"{path.name}: {said}"
        else:
            assert path not in must_refuse, f"{path.name} was not refused:\n{err}"
            assert output.is_file(), f"{path.name}: neither refused nor processed:\n{err}"
            data = np.asarray(nib.load(output).dataobj)
            assert data.size and np.all(np.isfinite(data)), f"{path.name}: bad output"
            outcome[path] = "done"
    if any(state == "refused" for state in outcome.values()):
        assert code == 2
    return outcome


def run_command(command: str, model: Path, out: Path, inputs: list[Path], *extra: str):
    words = INFERENCE_COMMANDS[command][0]
    with time_limit(600):
        return run_cli(*words, "--model", str(model), "--out", str(out), "--no-tracking",
                       *extra, *map(str, inputs))


# -- the table of hostile inputs, through every command ------------------------------------------


@pytest.mark.parametrize("command", COMMANDS)
def test_hostile_inputs_are_refused_in_one_line_or_processed(command, models, hostile, tmp_path):
    root, refused, either = hostile
    inputs = [root / name for name in (*refused, *either)]
    code, _, err = run_command(command, models[command], tmp_path / "out", inputs)
    outcome = check_answer(command, inputs, tmp_path / "out", code, err,
                           {root / name: word for name, word in refused.items()})
    assert code == 2
    assert outcome[root / "control.nii.gz"] == "done"
    if command == "anomaly score":  # a 2D model scores 2D images of any PNG mode
        assert all(outcome[root / name] == "done" for name in either)


def test_header_claiming_100000_cubed_voxels_is_refused_fast_in_bounded_memory(hostile, models,
                                                                            tmp_path):
    """A real process: refused before allocation, peak RSS of the CLI's own size."""
    root, _, _ = hostile
    names = ["huge_plain.nii", "huge_gz.nii.gz", "far_apart.nii.gz", "dcm_huge", "fifo.nii.gz"]
    words = INFERENCE_COMMANDS["anomaly score"][0]
    args = [str(MEDIDIFF), *words, "--model", str(models["anomaly score"]), "--out",
            str(tmp_path / "out"), "--no-tracking", *(str(root / n) for n in names)]
    code, err, peak_kb, seconds = run_measured(args, tmp_path, timeout=240)
    assert code == 2 and "Traceback" not in err, err
    assert "declares 1000000000000000 voxels" in err and "not a regular file" in err
    for name in names:
        assert len(messages_about(err, root / name)) == 1, (name, err)
    assert peak_kb < 1_500_000, f"peak RSS {peak_kb} KB"  # the CLI itself: about 0.6 GB
    assert seconds < 240


def run_measured(args: list[str], folder: Path, timeout: float,
                 env: dict | None = None) -> tuple[int, str, int, float]:
    """Run a process; return (exit status, stderr, its own peak RSS in KB, seconds).

    The address space is capped at 8 GB so that a regression fails here instead of taking the
    machine's memory from everyone else.
    """
    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))

    stderr_path = folder / "stderr.txt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MEDIDIFF_PROGRESS": "0", **(env or {})}
    started = time.monotonic()
    with open(stderr_path, "wb") as stderr:
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=stderr, env=env,
                                preexec_fn=cap)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() - started > timeout:
                proc.kill()
                _, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.2)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return (proc.returncode, stderr_path.read_text(errors="replace"), usage.ru_maxrss,
            time.monotonic() - started)


# -- property-based: random bytes and corrupted valid files through every command ----------------


def _valid(kind: str) -> bytes:
    if kind == "png":
        return _png((RNG.random((24, 20)) * 255).astype(np.uint8))
    return nifti_bytes(head((12, 12, 8)), gz=kind == "nii.gz")


_BASES = {kind: _valid(kind) for kind in ("nii.gz", "nii", "png")}
_FUZZ = settings(max_examples=5, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow,
                                        HealthCheck.function_scoped_fixture])

_damaged = st.tuples(
    st.sampled_from(sorted(_BASES)),
    st.one_of(st.none(), st.binary(max_size=600)),  # None: corrupt a valid file
    st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=5),
    st.integers(0, 10**6),
)


def _damage(kind: str, random: bytes | None, flips, cut: int) -> bytes:
    if random is not None:
        return random
    data = bytearray(_BASES[kind])
    for where, value in flips:
        data[where % len(data)] = value
    return bytes(data[: max(1, cut % (len(data) + 200))])


@pytest.mark.parametrize("command", COMMANDS)
@_FUZZ
@given(files=st.lists(_damaged, min_size=1, max_size=4))
def test_damaged_files_through_the_cli(command, models, files):
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        inputs = []
        for i, (kind, random, flips, cut) in enumerate(files):
            path = root / f"in{i}.{kind}"
            path.write_bytes(_damage(kind, random, flips, cut))
            inputs.append(path)
        code, _, err = run_command(command, models[command], root / "out", inputs)
        check_answer(command, inputs, root / "out", code, err, {})
