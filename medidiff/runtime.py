"""Where the work runs: the torch device a config or option asks for, and its AMP dtype."""

from __future__ import annotations

import torch

from medidiff.config import Config
from medidiff.errors import InputError


def select_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when there is a GPU; a named device must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(None, f"unknown device '{name}'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(None, "device 'cuda' was asked for but no CUDA GPU is available")
    return device


def cpu_has_native_bf16() -> bool:
    """The CPU computes bf16 in hardware (AVX512-BF16 or AMX), where oneDNN runs a bf16
    convolution faster than fp32 (cpu-small's training step: 1.65 times on an AVX512-BF16 EPYC);
    without it bf16 is emulated and slower."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch >= 2.3
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def amp_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """``auto``: bf16 where the GPU supports it, else fp16; on the CPU bf16 where it runs in
    hardware, else full precision."""
    mode = cfg.train.amp
    if mode == "auto" and device.type == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() else None
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None
    if mode == "fp16":
        return torch.float16
    if mode == "bf16" or (device.type == "cuda" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def micro_batch(spatial_dims: int, device: torch.device) -> int:
    """The fixed number of rows a network sees at inference (``medidiff.models.batching``).

    2D: 16 slices. On the CPU, oneDNN's results for a batch of 16 or more are the same at 1 and
    2 threads (below 16 they are not), so shards run with other thread counts agree; and 16 is
    faster than 32 on 2 cores (cpu-small network: 0.96 against 1.20 s per 64 slices). 3D: one
    volume or window.
    """
    return 16 if spatial_dims == 2 else 1
