"""Learned brain extraction of T1 heads with deepbet, an optional extra (``medidiff[deepbet]``).

deepbet (Fisch et al., "deepbet: Fast brain extraction of T1-weighted MRI using Convolutional
Neural Networks", Comput. Biol. Med. 179, 2024; MIT) runs two LinkNet3d networks: one finds the
brain's bounding box on the head squeezed to 128^3, the other segments that box stretched to
256^3. Its wheel ships them as TorchScript archives (``data/models/*.pt``: pickled module objects
plus TorchScript code), which ``torch.load(weights_only=True)`` refuses and ``torch.jit.load``
would run. Neither happens here: the architecture is rebuilt below from the archives' code, read
as text, and only the tensors are taken from the archive by an unpickler that admits tensor
rebuilding and nothing else, after the file's SHA-256 matched the one pinned for deepbet 1.0.2.
deepbet's own array functions then do its pre- and post-processing.
"""

from __future__ import annotations

import collections
import hashlib
import importlib.util
import io
import pickle
import zipfile
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from torch import nn

from medidiff.errors import ConfigError, InputError

METHODS = ("deepbet",)
NEEDS_EXTRA = ("preprocess.skull_strip 'deepbet' needs the deepbet extra: "
               "pip install 'medidiff[deepbet]'")
HASH_MISMATCH = "does not match the SHA-256 pinned for deepbet 1.0.2 (file swapped or damaged)"
# sha256 of deepbet 1.0.2's data/models files (the wheel's RECORD gives the same digests).
WEIGHTS = {
    "bbox_model.pt": "39a7b2b5f799faa1391ea97bfcdc0b9299f20d84f2316a4ff8918dc4685e40aa",
    "model.pt": "de8ee7c69654d0dd3935dc4a5d84571d8ecf4637a6bfc01df399c4c2bc86e0fd",
}
_MODULES = ("deepbet", "cc3d", "fill_voids")  # deepbet's bet.py imports the last two
_RAS = np.array([[0, 1], [1, 1], [2, 1]])


def available(method: str = "deepbet") -> bool:
    """Whether ``method``'s package is installed (it is imported only when a mask is made)."""
    return method in METHODS and all(importlib.util.find_spec(m) is not None for m in _MODULES)


# The network, as the archives' code (code/__torch__/...) runs it: every convolution is followed
# by an instance norm without affine parameters; LinkNet's encoder blocks are residual.

def _conv(c_in, c_out, kernel, stride=1, padding=0, bias=False, relu=True, transpose=False,
          output_padding=0) -> nn.Sequential:
    conv = (nn.ConvTranspose3d(c_in, c_out, kernel, stride, padding, output_padding, bias=bias)
            if transpose else nn.Conv3d(c_in, c_out, kernel, stride, padding, bias=bias))
    layers = [conv, nn.InstanceNorm3d(c_out)]
    return nn.Sequential(*layers, nn.ReLU()) if relu else nn.Sequential(*layers)


class _Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        first = _conv(c_in, c_out, 3, stride, 1)
        self.double_conv = nn.Sequential(*first, *_conv(c_out, c_out, 3, 1, 1, relu=False))
        if stride != 1 or c_in != c_out:
            self.downsample = _conv(c_in, c_out, 1, stride, relu=False)
        self.act = nn.ReLU()

    def forward(self, x):
        skip = self.downsample(x) if hasattr(self, "downsample") else x
        return self.act(self.double_conv(x) + skip)


class _Down(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__(collections.OrderedDict(
            block1=_Block(c_in, c_out, stride), block2=_Block(c_out, c_out, 1)))


class _Up(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, stride: int):
        mid = c_in // 4
        super().__init__(collections.OrderedDict(
            conv1=_conv(c_in, mid, 1),
            tp_conv=_conv(mid, mid, 3, stride, 1, transpose=True, output_padding=stride - 1),
            conv2=_conv(mid, c_out, 1)))


class LinkNet3d(nn.Module):
    """deepbet's network (LinkNet, Chaurasia & Culurciello 2017, in 3D): (B, 1, D, H, W) in
    deepbet's intensity units to (B, 2, D, H, W) softmax (channel 1: brain); D, H, W multiples
    of 32."""

    def __init__(self):
        super().__init__()
        self.init = nn.Sequential(*_conv(1, 16, 7, 2, 3), nn.MaxPool3d(3, 2, 1))
        widths = (16, 16, 32, 64, 128)
        for i in range(4):
            setattr(self, f"down{i}", _Down(widths[i], widths[i + 1], 1 if i == 0 else 2))
            setattr(self, f"up{i}", _Up(widths[4 - i], widths[3 - i], 2 if i < 3 else 1))
        self.tp_conv1 = _conv(16, 8, 3, 2, 1, bias=True, transpose=True, output_padding=1)
        self.conv = _conv(8, 8, 3, 1, 1, bias=True)
        self.tp_conv2 = nn.ConvTranspose3d(8, 2, 2, 2, bias=True)

    def forward(self, x):
        skips = [self.init(x)]
        for i in range(4):
            skips.append(getattr(self, f"down{i}")(skips[-1]))
        y = skips.pop()
        for i in range(4):
            y = getattr(self, f"up{i}")(y) + skips.pop()
        return torch.softmax(self.tp_conv2(self.conv(self.tp_conv1(y))), 1)


class _ScriptedModule:
    """What a TorchScript class name in the archive's pickle becomes: a record of its
    attributes, with no code of its own; nothing is imported for it."""

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise pickle.UnpicklingError("a module's state is not a dict")
        self.state = state


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None):
    """``torch._utils._rebuild_tensor_v2``'s arguments to a tensor, without calling torch's."""
    return storage.as_strided(tuple(size), tuple(stride), int(offset)).clone()


class _TensorsOnly(pickle.Unpickler):
    """Reads a TorchScript archive's ``data.pkl``: tensors, plain values and inert records."""

    _ALLOWED = {("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
                ("torch", "FloatStorage"): torch.float32,
                ("collections", "OrderedDict"): collections.OrderedDict}

    def __init__(self, archive: zipfile.ZipFile, prefix: str):
        super().__init__(io.BytesIO(archive.read(f"{prefix}/data.pkl")))
        self.archive, self.prefix = archive, prefix

    def find_class(self, module, name):
        if module == "__torch__" or module.startswith("__torch__."):
            return _ScriptedModule
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        raise pickle.UnpicklingError(f"refusing the global {module}.{name}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and pid[1] is torch.float32 and str(pid[2]).isdigit()):
            raise pickle.UnpicklingError(f"unexpected storage {pid!r}")
        data = bytearray(self.archive.read(f"{self.prefix}/data/{pid[2]}"))
        if len(data) != 4 * int(pid[4]):
            raise pickle.UnpicklingError(f"storage {pid[2]} has the wrong size")
        return torch.frombuffer(data, dtype=torch.float32)


def _state_dict(record, prefix: str = "") -> dict[str, torch.Tensor]:
    out = {}
    for key, value in record.state.items():
        if isinstance(value, _ScriptedModule):
            out.update(_state_dict(value, f"{prefix}{key}."))
        elif torch.is_tensor(value):
            out[prefix + key] = value
        elif not isinstance(value, (bool, int, float, str, type(None))):
            raise pickle.UnpicklingError(f"unexpected {type(value).__name__} at {prefix}{key}")
    return out


def load_network(path: str | Path, expected_sha256: str) -> LinkNet3d:
    """One of deepbet's networks from its archive, on the CPU, after checking its sha256."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise InputError(path, f"cannot read deepbet's weights ({e.strerror or e})") from None
    if hashlib.sha256(data).hexdigest() != expected_sha256.lower():
        raise InputError(path, HASH_MISMATCH)
    net = LinkNet3d()
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            prefix = archive.namelist()[0].split("/")[0]
            state = _state_dict(_TensorsOnly(archive, prefix).load())
        net.load_state_dict(state, strict=True)
    except Exception as e:  # a pinned file should never get here; say why in one line
        reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise InputError(path, f"is not deepbet's network ({reason})") from None
    return net.eval().requires_grad_(False)


def weights_folder() -> Path:
    """Where the installed deepbet keeps its networks (its wheel's top-level ``data/``)."""
    from deepbet.utils import DATA_PATH

    return Path(DATA_PATH) / "models"


@lru_cache(maxsize=2)
def _extractor(folder: str):
    """deepbet's ``BrainExtraction`` holding the networks loaded here (its ``__init__`` would
    ``torch.jit.load`` them)."""
    from deepbet.bet import BrainExtraction

    bet = BrainExtraction.__new__(BrainExtraction)
    bet.bbox_model = load_network(Path(folder) / "bbox_model.pt", WEIGHTS["bbox_model.pt"])
    bet.model = load_network(Path(folder) / "model.pt", WEIGHTS["model.pt"])
    bet.bbox = None
    return bet


def learned_brain_mask(array: np.ndarray, affine: np.ndarray, method: str = "deepbet",
                       source: str | Path | None = None, threshold: float = 0.5) -> np.ndarray:
    """The brain of a T1 head (X, Y, Z) with its voxel-to-RAS affine, as a bool mask on the same
    grid. As deepbet's ``BrainExtraction.run``: the array in the closest RAS voxel order, the
    networks' probability above ``threshold``, its largest component with holes filled.
    ``source`` names the scan in errors."""
    if method not in METHODS:
        raise ConfigError(f"preprocess.skull_strip: {method!r} is not a learned brain "
                          f"extraction (known: {', '.join(METHODS)})")
    if not available(method):
        raise InputError(None, NEEDS_EXTRA)
    array = np.asarray(array, np.float32)
    if array.ndim != 3 or min(array.shape) < 2:
        raise InputError(source, f"has shape {array.shape}; deepbet needs a 3D scan")
    ornt = nib.io_orientation(np.asarray(affine, np.float64))
    ras = np.ascontiguousarray(nib.apply_orientation(array, ornt))
    bet = _extractor(str(weights_folder()))
    try:
        with torch.no_grad():
            mask = bet.postprocess(bet.run_model(ras.copy()) > threshold)
    except (AssertionError, ValueError):  # deepbet's way of saying the box or mask is empty
        raise InputError(source, "deepbet found no brain in this scan") from None
    back = nib.orientations.ornt_transform(_RAS, ornt)
    return np.ascontiguousarray(nib.apply_orientation(mask, back)).astype(bool)
