"""Patient privacy: DICOM identifiers never reach outputs, MLflow, logs or file names.

DICOM series carrying planted identifiers are run through every inference command in one real
process; then every byte it wrote (outputs, tables, the MLflow database and artifacts, its stdout
and stderr, gzip and PNG streams decompressed) is searched for each identifier.
"""

from __future__ import annotations

import gzip
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import nibabel as nib
import pydicom
import pytest
from pydicom.data import get_testdata_file

from tests.helpers import INFERENCE_COMMANDS, available_commands, mr_series, random_model

COMMANDS = available_commands()

PLANTED = {
    "PatientName": "DOE^JANE_PLANTED",
    "PatientID": "PID-PLANTED-123",
    "PatientBirthDate": "19010203",
    "AccessionNumber": "ACC-PLANTED-456",
    "InstitutionName": "PLANTED GENERAL HOSPITAL",
    "StudyDate": "19020304",
    "SeriesDate": "19030405",
    "ReferringPhysicianName": "DR^PLANTED_REFERRER",
    "StudyDescription": "STUDY-DESCRIPTION-PLANTED",
    "SeriesDescription": "SERIES-DESCRIPTION-PLANTED",
}


def needles() -> set[bytes]:
    """Each planted value, and spellings a leak might take: any part of a name (they all hold
    'PLANTED'), a date as 1901-02-03."""
    found = {b"PLANTED"}
    for value in PLANTED.values():
        found.add(value.encode())
        if value.isdigit():
            found.add(f"{value[:4]}-{value[4:6]}-{value[6:]}".encode())
    return found


def _planted_series(root: Path) -> list[Path]:
    """A 10-slice MR series and a one-slice CT 'series', under neutral folder names."""
    volume = mr_series(root / "scan-a", 10, step=4.0, pixel_spacing=6.0, fields=PLANTED)
    single = root / "scan-b"
    single.mkdir()
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for key, value in PLANTED.items():
        setattr(ds, key, value)
    ds.save_as(single / "image.dcm")
    stored = {value.encode() for value in PLANTED.values()}
    for file in (single / "image.dcm", next(volume.iterdir())):  # the search can find them
        assert all(value in file.read_bytes() for value in stored)
    return [volume, single]


def _png_streams(data: bytes) -> list[bytes]:
    """The decompressed zlib streams of a PNG (image data, zTXt/iTXt text)."""
    streams, pos, idat = [], 8, b""
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        if kind == b"IDAT":
            idat += chunk
        elif kind in (b"zTXt", b"iTXt"):
            try:
                streams.append(zlib.decompress(chunk[chunk.index(b"\0") + 2:]))
            except (ValueError, zlib.error):
                pass
        pos += 12 + length
    if idat:
        streams.append(zlib.decompress(idat))
    return streams


def readable_bytes(path: Path) -> list[bytes]:
    """A file's bytes, and the decompressed bytes of gzip files and PNG streams."""
    raw = path.read_bytes()
    out = [raw, os.fsencode(path.name)]
    if raw[:2] == b"\x1f\x8b":
        out.append(gzip.decompress(raw))
    if raw[:8] == b"\x89PNG\r\n\x1a\n":
        out.extend(_png_streams(raw))
    return out


_DRIVER = """
import json, sys
from medidiff.workflows.cli import main
codes = []
for args in json.loads(sys.argv[1]):
    try:
        codes.append(main(args))
    except SystemExit as exc:
        codes.append(exc.code)
print(json.dumps(codes))
"""


@pytest.mark.skipif(len(COMMANDS) == 0, reason="no inference command")
def test_dicom_identifiers_never_reach_any_written_byte(tiny_model, tmp_path):
    inputs = _planted_series(tmp_path / "in")
    work = tmp_path / "work"  # the process's working directory: stray files land here
    work.mkdir()
    runs = []
    for name in COMMANDS:
        words, task = INFERENCE_COMMANDS[name][:2]
        model = tiny_model if task == "anomaly" else random_model(tmp_path / f"m-{task}", task)
        runs.append([*words, "--model", str(model), "--out", str(work / f"out-{task}"),
                     "--experiment", f"privacy-{task}", *map(str, inputs)])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MEDIDIFF_PROGRESS": "1",
           "MLFLOW_TRACKING_URI": f"sqlite:///{work}/mlflow.db"}
    proc = subprocess.run([sys.executable, "-c", _DRIVER, json.dumps(runs)], cwd=work, env=env,
                          capture_output=True, timeout=900)
    stderr = proc.stderr.decode(errors="replace")
    assert proc.returncode == 0 and "Traceback" not in stderr, stderr
    codes = json.loads(proc.stdout.decode().splitlines()[-1])
    assert codes[0] == 0, stderr  # anomaly scoring handles both series
    assert (work / "out-anomaly" / "scan-a_anomaly.nii.gz").is_file()
    assert (work / "out-anomaly" / "scan-b_anomaly.nii.gz").is_file()

    written = [p for p in work.rglob("*") if p.is_file()]
    assert any(p.name == "mlflow.db" for p in written)
    assert any("overlay" in str(p) for p in written), "no image artifacts to search"
    haystacks = [(str(p.relative_to(work)), data) for p in written for data in readable_bytes(p)]
    haystacks += [("stdout", proc.stdout), ("stderr", proc.stderr)]
    for needle in needles():
        leaks = [where for where, data in haystacks
                 if needle.lower() in data.lower() or needle.lower() in where.lower().encode()]
        assert not leaks, f"{needle!r} found in {leaks}"

    for path in work.rglob("*.nii.gz"):
        header = nib.load(path).header
        for field in ("descrip", "aux_file", "intent_name", "db_name"):
            if field in header:
                assert header[field].tobytes().strip(b"\0 ") == b"", (path.name, field)
        assert len(header.extensions) == 0, path.name
