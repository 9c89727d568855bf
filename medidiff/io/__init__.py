"""Scans in and results out, one module per job (import from the module, nothing is re-exported).

- `medidiff.io.discover`: finding inputs (files, DICOM series folders, folders of them) and
  the case names their outputs are called after.
- `medidiff.io.validate`: checking a scan from its headers before loading, and its voxels after
  (limits `MAX_VOXELS`, `MAX_PNG_PIXELS`, `MAX_INTENSITY`, `MAX_HEADER_BYTES`).
- `medidiff.io.read`: reading a scan through MONAI (`reader_for`, `load_image`).
- `medidiff.io.write`: writing files atomically, NIfTI output, output paths kept in their folder.
"""
