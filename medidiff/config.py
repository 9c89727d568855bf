"""Typed configuration: YAML in, validated, overridable with ``key=value``, saved with every run.

One ``Config`` describes a whole experiment: the data pipeline, the network, the noise schedule,
the training loop and the settings of each task. Unknown keys and wrong types are errors that
name the key (``ConfigError``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from medidiff.data.io import MAX_VOXELS as MAX_GRID_VOXELS
from medidiff.errors import ConfigError, InputError

MAX_DRAWS = 256  # noise draws or samples per scan: more only costs time (and batch memory)

TaskName = Literal["anomaly", "denoise", "superres", "segment"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    """How scans become training examples (MONAI transforms, see ``medidiff.data.transforms``)."""

    spatial_dims: Literal[2, 3] = 2
    slice_axis: Literal[0, 1, 2] = 2
    spacing: list[float] | None = Field(default=None, description="resample to this spacing (mm)")
    size: list[int] = Field(default_factory=lambda: [64, 64])
    patch: list[int] | None = None
    intensity_percentiles: tuple[float, float] = (0.0, 99.5)
    intensity_ceiling: float = Field(
        default=1.0, ge=1.0, le=10.0,
        description="the percentiles map to [0, 1]; values are then clipped to [0, ceiling]. "
                    "Above 1, what is brighter than the brightest healthy tissue stays so")
    min_foreground: float = Field(default=0.1, ge=0.0, le=1.0)
    foreground_threshold: float = Field(default=0.02, ge=0.0, le=1.0)
    cache: bool = True
    augment: bool = False

    @model_validator(mode="after")
    def _check_sizes(self) -> DataConfig:
        want = 2 if self.spatial_dims == 2 else 3
        if len(self.size) != want:
            raise ValueError(f"data.size needs {want} numbers for spatial_dims={self.spatial_dims}")
        if self.spacing is not None and len(self.spacing) != 3:
            raise ValueError("data.spacing needs 3 numbers (mm), or null to keep the scan's")
        if self.patch is not None and len(self.patch) != want:
            raise ValueError(f"data.patch needs {want} numbers")
        if any(s <= 0 for s in self.size) or any(s <= 0 for s in (self.spacing or [1])):
            raise ValueError("data.size and data.spacing must be positive")
        for name, shape in (("size", self.size), ("patch", self.patch or [1])):
            if math.prod(shape) > MAX_GRID_VOXELS:  # a model.yaml must not make us allocate this
                raise ValueError(f"data.{name} {shape} exceeds {MAX_GRID_VOXELS} voxels")
        return self


class ModelConfig(_Section):
    """Arguments of MONAI's ``DiffusionModelUNet`` (see ``medidiff.models.unet``)."""

    channels: list[int] = Field(default_factory=lambda: [32, 64, 64])
    attention_levels: list[bool] = Field(default_factory=lambda: [False, False, True])
    num_res_blocks: int = Field(default=1, ge=1)
    num_head_channels: int = Field(default=32, ge=1)
    norm_num_groups: int = Field(default=32, ge=1)


class DiffusionConfig(_Section):
    """The training noise schedule (MONAI ``DDPMScheduler`` betas)."""

    num_train_timesteps: int = Field(default=1000, ge=10)
    schedule: Literal["linear_beta", "scaled_linear_beta", "sigmoid_beta", "cosine"] = "linear_beta"
    beta_start: float = Field(default=1e-4, gt=0)
    beta_end: float = Field(default=0.02, gt=0)
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "epsilon"


class TrainConfig(_Section):
    """The one training loop shared by every task."""

    steps: int = Field(default=2000, ge=1)
    batch_size: int = Field(default=16, ge=1)
    lr: float = Field(default=2e-4, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_steps: int = Field(default=100, ge=0)
    grad_clip: float | None = 1.0
    ema_decay: float = Field(default=0.999, ge=0, lt=1)
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    checkpoint_every: int = Field(default=200, ge=1)
    sample_every: int = Field(default=500, ge=1)
    log_every: int = Field(default=20, ge=1)
    seed: int = 0
    num_workers: int = Field(default=0, ge=0)
    device: str = "auto"
    max_minutes: float | None = Field(default=None, gt=0)
    max_timestep: int | None = Field(
        default=None, ge=1,
        description="train on timesteps below this only (a model that is only ever used from "
                    "partial noise, like an anomaly model scored at t <= 350, spends all its "
                    "capacity where it is used; it cannot sample from pure noise)")

    @field_validator("amp", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        """YAML reads a bare ``off`` (``amp: off``, ``--set train.amp=off``) as false."""
        return "off" if value is False else value


class AnomalyConfig(_Section):
    """Reconstruction-based scoring (AnoDDPM and successors): partial noising, reverse, residual."""

    sampler: Literal["ddpm", "ddim", "dpmpp2m", "x0"] = "ddim"
    noise_levels: list[int] = Field(default_factory=lambda: [250])
    steps: int = Field(default=5, ge=1)
    draws: int = Field(default=4, ge=1, le=MAX_DRAWS)
    eta: float = Field(default=1.0, ge=0.0, le=1.0)
    median_kernel: int = Field(default=5, ge=1)
    standardise: bool = Field(
        default=True,
        description="divide the residual voxel-wise by its spread over the healthy validation "
                    "scans (after subtracting their mean), so that places every reconstruction "
                    "misses, such as cortical folds, stop looking anomalous (docs/benchmarks.md); "
                    "needs scans in a common space, as the z-score baseline, and at least 3 "
                    "validation scans, otherwise the map stays the raw residual")
    score_top_fraction: float = Field(default=0.01, gt=0, le=1)
    target_fpr: float = Field(default=0.01, gt=0, lt=1)
    scan_fpr: float = Field(default=0.05, gt=0, lt=1)
    batch_size: int = Field(default=32, ge=1)
    seed: int = 0


class _EnhanceConfig(_Section):
    """What denoising and super-resolution share: 2D slice context, intensity jitter, sampling."""

    context: int = Field(default=0, ge=0, description="2D: neighbour slices on each side")
    intensity_jitter: float = Field(default=0.2, ge=0.0, lt=1.0)
    sampler: Literal["ddpm", "ddim", "dpmpp2m", "x0"] = "ddim"
    steps: int = Field(default=10, ge=1)
    eta: float = Field(default=0.0, ge=0.0, le=1.0)
    samples: int = Field(default=1, ge=1, le=MAX_DRAWS)
    batch_size: int = Field(default=32, ge=1)
    seed: int = 0


class DenoiseConfig(_EnhanceConfig):
    """Conditional denoising: the noisy scan (with its neighbour slices in 2D) is the condition.

    Training degrades clean scans on the fly: ``noise`` kinds drawn per example, sigma uniform
    in ``sigma_range`` as a fraction of the brain's 99th-percentile intensity. The noise level
    reaches the network as one of ``noise_bins`` class labels.
    """

    noise: list[Literal["rician", "gaussian"]] = Field(default_factory=lambda: ["rician", "gaussian"])
    sigma_range: tuple[float, float] = (0.02, 0.15)
    noise_bins: int = Field(default=16, ge=2)
    foreground_only: float = Field(default=0.5, ge=0.0, le=1.0,
                                   description="fraction of examples with noise in the head only")
    context: int = Field(default=1, ge=0, description="2D: neighbour slices on each side")

    @model_validator(mode="before")
    @classmethod
    def _one_noise_kind(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("noise"), str):
            data = {**data, "noise": [data["noise"]]}
        return data

    @model_validator(mode="after")
    def _check_range(self) -> DenoiseConfig:
        low, high = self.sigma_range
        if not 0 < low <= high:
            raise ValueError("denoise.sigma_range needs 0 < low <= high")
        if not self.noise:
            raise ValueError("denoise.noise needs at least one noise kind")
        return self


class SuperResConfig(_EnhanceConfig):
    """Conditional super-resolution (SR3): the interpolated low-resolution scan is the condition.

    Training averages ``scales``-fold along the super-resolved axes (in-plane for 2D models,
    the slice axis for 3D models, unless ``axes`` names them); the scale reaches the network as
    a class label (its index in ``scales``).
    """

    scales: list[int] = Field(default_factory=lambda: [2, 4])
    axes: list[Literal[0, 1, 2]] | None = None

    @model_validator(mode="after")
    def _check_scales(self) -> SuperResConfig:
        if not self.scales or any(s < 2 for s in self.scales):
            raise ValueError("superres.scales needs integer factors of at least 2")
        if self.axes is not None and len(set(self.axes)) != len(self.axes):
            raise ValueError("superres.axes must not repeat an axis")
        return self


class SegmentConfig(_Section):
    """Conditional segmentation (Wolleb et al. 2022): the image is the condition.

    The label map is generated as a code in [-1, 1]: one-hot (one channel per class) or analog
    bits (Chen et al. 2023, ceil(log2 K) channels). ``samples`` maps are drawn per scan and fused.
    """

    num_classes: int = Field(default=4, ge=2, description="classes, background 0 included")
    encoding: Literal["onehot", "bits"] = "onehot"
    image_channels: int = Field(default=1, ge=1)
    sampler: Literal["ddpm", "ddim", "dpmpp2m", "x0"] = "ddim"
    steps: int = Field(default=10, ge=1)
    eta: float = Field(default=0.0, ge=0.0, le=1.0)
    samples: int = Field(default=5, ge=1, le=MAX_DRAWS)
    fusion: Literal["mean", "vote"] = "mean"
    resample: Literal["nearest", "linear"] = "nearest"
    batch_size: int = Field(default=32, ge=1)
    seed: int = 0


class Config(_Section):
    """A whole experiment."""

    task: TaskName = "anomaly"
    name: str = "experiment"
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = Field(default_factory=DiffusionConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    anomaly: AnomalyConfig = Field(default_factory=AnomalyConfig)
    denoise: DenoiseConfig = Field(default_factory=DenoiseConfig)
    superres: SuperResConfig = Field(default_factory=SuperResConfig)
    segment: SegmentConfig = Field(default_factory=SegmentConfig)

    @model_validator(mode="after")
    def _check_max_timestep(self) -> Config:
        limit = self.train.max_timestep
        if limit is not None and self.task != "anomaly":
            raise ValueError(f"train.max_timestep is for anomaly models; a {self.task} model "
                             "samples from pure noise and must learn every level")
        if limit is not None and self.task == "anomaly" and max(self.anomaly.noise_levels) >= limit:
            raise ValueError(f"anomaly.noise_levels must stay below train.max_timestep ({limit})")
        return self

    def trained_timesteps(self) -> int:
        """The network learns timesteps 0 up to (not including) this one."""
        total = self.diffusion.num_train_timesteps
        return min(self.train.max_timestep or total, total)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def _describe(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "(top level)"
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown key '{key}'"
    return f"{source}: key '{key}': {first['msg']}"


def from_dict(data: dict[str, Any], source: str = "config") -> Config:
    """Validate a plain dict; errors name the offending key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of keys, got {type(data).__name__}")
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_describe(err, source)) from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """``train.steps=10`` -> (["train", "steps"], 10); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key=value`` overrides to a raw config dict (before validation)."""
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text!r}: '{part}' is not a section")
            node = child
        node[parts[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with the safe loader; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "does not exist" if not path.exists() else "is not a file")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        line = getattr(getattr(err, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise InputError(path, f"is not valid YAML{where}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InputError(path, "must hold a mapping of keys")
    return data


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Load a YAML config, apply ``key=value`` overrides, validate."""
    data = apply_overrides(read_yaml(path), overrides or [])
    return from_dict(data, source=str(path))


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
