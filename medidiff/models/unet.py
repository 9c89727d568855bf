"""Factory around MONAI's ``DiffusionModelUNet`` that checks its arguments first, so that a bad
model config is reported as the config key it comes from instead of a MONAI traceback."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn as nn
from monai.networks.nets import DiffusionModelUNet

from medidiff.errors import ConfigError


def _check(ok: bool, key: str, problem: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {problem}")


def _as_levels(value, n: int, key: str) -> tuple:
    """An int/bool given once for every level, or a sequence with one entry per level."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        _check(
            len(value) == n, key, f"needs one entry per level of channels ({n}), got {len(value)}"
        )
        return tuple(value)
    return (value,) * n


def _validate(
    spatial_dims,
    in_channels,
    out_channels,
    channels,
    attention_levels,
    num_res_blocks,
    num_head_channels,
    norm_num_groups,
    num_class_embeds,
    dropout_cattn,
) -> tuple[tuple, tuple]:
    _check(spatial_dims in (2, 3), "spatial_dims", f"must be 2 or 3, got {spatial_dims}")
    _check(in_channels >= 1, "in_channels", f"must be >= 1, got {in_channels}")
    _check(out_channels >= 1, "out_channels", f"must be >= 1, got {out_channels}")
    _check(
        len(channels) >= 1 and all(c > 0 for c in channels),
        "channels",
        f"must be a non-empty list of positive ints, got {list(channels)}",
    )
    _check(norm_num_groups >= 1, "norm_num_groups", f"must be >= 1, got {norm_num_groups}")
    bad = [c for c in channels if c % norm_num_groups]
    _check(
        not bad,
        "channels",
        f"every entry must be divisible by norm_num_groups={norm_num_groups} (not {bad})",
    )
    _check(
        len(attention_levels) == len(channels),
        "attention_levels",
        f"needs one entry per level of channels ({len(channels)}), got {len(attention_levels)}",
    )
    blocks = _as_levels(num_res_blocks, len(channels), "num_res_blocks")
    _check(all(b >= 1 for b in blocks), "num_res_blocks", f"must be >= 1, got {num_res_blocks}")
    heads = _as_levels(num_head_channels, len(channels), "num_head_channels")
    # the middle block always has self-attention, at the last level's width
    attended = [i for i, a in enumerate(attention_levels) if a] + [len(channels) - 1]
    for i in sorted(set(attended)):
        _check(
            heads[i] >= 1 and channels[i] % heads[i] == 0,
            "num_head_channels",
            f"{heads[i]} must divide the attention width channels[{i}]={channels[i]}",
        )
    _check(
        num_class_embeds is None or num_class_embeds >= 1,
        "num_class_embeds",
        f"must be None or >= 1, got {num_class_embeds}",
    )
    _check(0.0 <= dropout_cattn <= 1.0, "dropout_cattn", f"must be in [0, 1], got {dropout_cattn}")
    return blocks, heads


def build_unet(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    channels: Sequence[int] = (32, 64, 64),
    attention_levels: Sequence[bool] = (False, False, True),
    num_res_blocks: int | Sequence[int] = 1,
    num_head_channels: int | Sequence[int] = 32,
    norm_num_groups: int = 32,
    num_class_embeds: int | None = None,
    resblock_updown: bool = False,
    dropout_cattn: float = 0.0,
) -> DiffusionModelUNet:
    """A checked ``DiffusionModelUNet``; call it as ``net(x, timesteps=t, class_labels=y)``.

    Inputs need spatial sizes divisible by :func:`spatial_multiple`. ``class_labels`` are only
    used when ``num_class_embeds`` is set (then they are required): MONAI silently ignores them
    otherwise. Its last convolution starts at zero, so a new network outputs zeros. Attention runs
    through ``torch.nn.functional.scaled_dot_product_attention``.
    """
    channels, attention_levels = tuple(channels), tuple(bool(a) for a in attention_levels)
    blocks, heads = _validate(
        spatial_dims,
        in_channels,
        out_channels,
        channels,
        attention_levels,
        num_res_blocks,
        num_head_channels,
        norm_num_groups,
        num_class_embeds,
        dropout_cattn,
    )
    return DiffusionModelUNet(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        num_res_blocks=blocks,
        channels=channels,
        attention_levels=attention_levels,
        norm_num_groups=norm_num_groups,
        resblock_updown=resblock_updown,
        num_head_channels=heads,
        num_class_embeds=num_class_embeds,
        dropout_cattn=dropout_cattn,
        # PyTorch's scaled_dot_product_attention: the same weights and results as the explicit
        # attention matrix, without materialising it (memory-efficient/flash kernels on GPU)
        use_flash_attention=True,
    )


def spatial_multiple(channels: Sequence[int]) -> int:
    """Every spatial size fed to the network must be a multiple of this (one halving per level)."""
    return 2 ** (len(channels) - 1)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (all, or only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
