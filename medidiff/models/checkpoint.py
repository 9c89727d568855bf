"""Saving and loading weights and training checkpoints without ever executing code from a file.

Inference weights are safetensors (pure data) whose sha256 is recorded in ``model.yaml``.
Training checkpoints (optimiser, EMA, RNG states) use ``torch.save`` for convenience but are only
ever read back with ``torch.load(weights_only=True)``, which refuses pickled code. Every write goes
to a temporary file in the same folder, is fsynced, then renamed over the target, so a crash
leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import collections
import hashlib
import io
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from medidiff.errors import ModelFolderError
from medidiff.io.write import atomic_write_bytes

_SCALARS = (str, bytes, int, float, complex, bool, type(None), torch.dtype, torch.device)
HASH_MISMATCH = "weights do not match the hash recorded in model.yaml (file swapped or truncated)"
UNSAFE = "is not a safe checkpoint (refusing to unpickle code)"


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _plain_tensors(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors with no shared storage (safetensors refuses aliases)."""
    out, seen = {}, set()
    for name, value in state_dict.items():
        if not isinstance(name, str) or not torch.is_tensor(value):
            raise TypeError(f"state_dict entry {name!r} is not a named tensor")
        value = value.detach().cpu().contiguous()
        if value.numel() and value.untyped_storage().data_ptr() in seen:
            value = value.clone()
        seen.add(value.untyped_storage().data_ptr())
        out[name] = value
    return out


def save_weights(
    state_dict: Mapping[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> str:
    """Write ``state_dict`` as safetensors atomically; return the file's sha256 (hex)."""
    data = safetensors.torch.save(_plain_tensors(state_dict), metadata)
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def load_weights(path: str | Path, expected_sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Read a safetensors file onto the CPU, first checking its sha256 when one is given."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ModelFolderError(path, f"cannot read weights ({e.strerror or e})") from None
    if expected_sha256 is not None and hashlib.sha256(data).hexdigest() != expected_sha256.lower():
        raise ModelFolderError(path, HASH_MISMATCH)
    try:
        return safetensors.torch.load(data)
    except Exception as e:  # safetensors raises its own error types for damaged headers
        reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise ModelFolderError(path, f"is not a readable safetensors file ({reason})") from None


def _check_plain(value: Any, where: str) -> None:
    """Refuse, at save time, anything ``torch.load(weights_only=True)`` would refuse later."""
    if torch.is_tensor(value) or isinstance(value, _SCALARS):
        return
    if type(value) in (dict, collections.OrderedDict):
        for key, item in value.items():
            _check_plain(key, f"{where} (a key)")
            _check_plain(item, f"{where}[{key!r}]")
    elif type(value) in (list, tuple, torch.Size):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
    else:
        raise TypeError(
            f"checkpoint{where}: {type(value).__name__} cannot be saved safely; "
            "use tensors and plain dict/list/tuple/str/number values"
        )


def save_checkpoint(path: str | Path, payload: dict) -> Path:
    """Write a training checkpoint (state dicts, step, RNG states as uint8 tensors) atomically."""
    _check_plain(payload, "")
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint with ``torch.load(weights_only=True)`` only, onto the CPU."""
    if not Path(path).is_file():
        raise ModelFolderError(path, "checkpoint file is missing")
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError:
        raise ModelFolderError(path, UNSAFE) from None
    except Exception:  # truncated zip, not a torch file at all, ...
        raise ModelFolderError(
            path, "is not a readable checkpoint (truncated, or not written by torch.save)"
        ) from None
