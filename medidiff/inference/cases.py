"""Running a model over many input scans: discovery, sharding, resumable and safe outputs.

Shared by every inference command. Inputs are split deterministically with ``--part-id K
--num-parts N`` (as nnU-Net does); a case whose outputs all exist is skipped unless
``overwrite``; a case that fails leaves no output behind and does not stop the others. Per-case
tables (``scores.csv``) are merged under a file lock, so several processes can write into one
folder.
"""

from __future__ import annotations

import csv
import fcntl
import io
import os
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from medidiff.errors import InputError, MedidiffError
from medidiff.io.discover import (
    CaseFiles,
    case_name,
    discover_inputs,
    group_channels,
    select_contrast,
)
from medidiff.io.write import atomic_write_text, safe_output_path


@dataclass
class CaseOutcome:
    case: str
    path: Path | None
    status: str  # "done", "skipped" or "failed"
    message: str = ""
    row: dict = field(default_factory=dict)


def shard(items: Sequence, part_id: int, num_parts: int) -> list:
    """The share of ``items`` for part ``part_id`` of ``num_parts`` (round robin)."""
    if num_parts < 1:
        raise InputError(None, f"--num-parts must be at least 1, got {num_parts}")
    if not 0 <= part_id < num_parts:
        raise InputError(None, f"--part-id must be in [0, {num_parts}), got {part_id}")
    return list(items)[part_id::num_parts]


def collect_inputs(paths: Sequence[str | Path]) -> tuple[list[Path], list[CaseOutcome]]:
    """Expand the given paths; a path that cannot be used becomes a failed outcome."""
    found, failed = [], []
    for given in paths:
        try:
            found.extend(discover_inputs([given]))
        except InputError as err:
            failed.append(CaseOutcome(Path(given).name, Path(given), "failed", str(err)))
    unique = sorted(dict.fromkeys(Path(p) for p in found))
    return unique, failed


def inputs_of_part(inputs: Sequence[str | Path], part_id: int, num_parts: int,
                   on_case: Callable[[CaseOutcome], None] | None = None,
                   contrasts: Sequence[str] | None = None
                   ) -> tuple[list[Path | CaseFiles], list[CaseOutcome]]:
    """This part's share of the expanded inputs, and the inputs that cannot be used (each
    reported through ``on_case``, by every part). With ``contrasts`` (the model's): for one,
    scans whose names declare another contrast of the same inputs are left out
    (``medidiff.io.discover.select_contrast``); for several, the inputs are grouped into
    cases of one file per contrast (``medidiff.io.discover.group_channels``)."""
    paths, unusable = collect_inputs(inputs)
    if contrasts is not None and len(contrasts) == 1:
        paths = select_contrast(paths, contrasts[0])
    elif contrasts is not None:
        paths, problems = group_channels(paths, contrasts)
        unusable += [CaseOutcome(case, path, "failed", message)
                     for case, path, message in problems]
    for outcome in unusable:
        if on_case:
            on_case(outcome)
    return shard(paths, part_id, num_parts), unusable


def run_cases(paths: Sequence[Path], out_dir: Path, outputs: Callable[[str], list[str]],
              process: Callable[[Path, str], dict], overwrite: bool = False,
              on_case: Callable[[CaseOutcome], None] | None = None,
              table: str | None = None) -> list[CaseOutcome]:
    """Process each input unless it is finished; failures are isolated and cleaned up.

    With ``table`` (a CSV file name in ``out_dir``, such as ``scores.csv``), the row ``process``
    returns is merged into it after the case's outputs are written, and a case counts as
    finished only when its outputs exist and its row is there: a process killed between the
    two redoes the case instead of leaving it out of the table.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    table_path = safe_output_path(out_dir, table) if table else None
    listed = {row.get("case") for row in read_table(table_path)} if table_path else set()
    outcomes, seen = [], set()
    for path in paths:
        case = path.name if isinstance(path, CaseFiles) else case_name(path)
        if case in seen:
            outcome = CaseOutcome(case, path, "failed", f"{path}: another input has the same "
                                  f"case name '{case}'")
        else:
            seen.add(case)
            outcome = _run_case(path, case, out_dir, outputs, process, overwrite,
                                table_path, table_path is None or case in listed)
        outcomes.append(outcome)
        if on_case:
            on_case(outcome)
    return outcomes


def _run_case(path: Path, case: str, out_dir: Path, outputs, process, overwrite: bool,
              table: Path | None, listed: bool) -> CaseOutcome:
    try:
        targets = [safe_output_path(out_dir, name) for name in outputs(case)]
    except InputError as err:  # e.g. a planted symlink: this case fails, the others go on
        return CaseOutcome(case, path, "failed", str(err))
    if not overwrite and listed and all(t.exists() for t in targets):
        return CaseOutcome(case, path, "skipped", "outputs exist (use --overwrite)")

    def process_and_record(path: Path, case: str) -> dict:
        row = process(path, case)
        if table is not None:
            merge_rows(table, [row])
        return row

    return _process_one(path, case, targets, process_and_record)


def _process_one(path: Path, case: str, targets: list[Path], process) -> CaseOutcome:
    try:
        row = process(path, case)
    except MedidiffError as err:
        _remove(targets)
        return CaseOutcome(case, path, "failed", str(err))
    except BaseException:
        _remove(targets)
        raise
    return CaseOutcome(case, path, "done", "", row)


def _remove(targets: list[Path]) -> None:
    for target in targets:
        target.unlink(missing_ok=True)


@contextmanager
def locked(path: Path):
    """An exclusive advisory lock for read-modify-write of the shared table ``path``, taken on
    its folder (so that no lock file is left beside the results)."""
    handle = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        os.close(handle)  # closing releases the lock


def read_table(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def merge_rows(path: Path, rows: list[dict], key: str = "case") -> list[dict]:
    """Add or replace rows (by ``key``) in a CSV table, atomically and under a lock."""
    with locked(path):
        merged = {row[key]: row for row in read_table(path)}
        for row in rows:
            merged[str(row[key])] = {k: str(v) for k, v in row.items()}
        table = [merged[k] for k in sorted(merged)]
        columns = list(dict.fromkeys(c for row in table for c in row))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(table)
        atomic_write_text(path, buffer.getvalue())
    return table
