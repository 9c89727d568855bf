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

from medidiff import names
from medidiff.errors import ConfigError, InputError
from medidiff.io.validate import MAX_VOXELS as MAX_GRID_VOXELS

MAX_DRAWS = 256  # noise draws or samples per scan: more only costs time (and batch memory)



def one_of(valid: tuple[str, ...]) -> Any:
    """``Literal`` of the names in ``valid`` (a tuple of ``medidiff.names``).

    pydantic then rejects any other value with a message that lists the valid names, and the
    docs (``medidiff.config_docs``) read them from the annotation.
    """
    return Literal.__getitem__(valid)


TaskName = one_of(names.TASK_NAMES)
SamplerName = one_of(names.SAMPLERS)
ScheduleName = one_of(names.NOISE_SCHEDULES)
PredictionType = one_of(names.PREDICTION_TYPES)
AmpMode = one_of(names.AMP_MODES)
LossWeighting = one_of(names.LOSS_WEIGHTINGS)
LossNorm = one_of(names.LOSS_NORMS)
NoiseKind = one_of(names.NOISE_KINDS)
DiffusionNoise = one_of(names.DIFFUSION_NOISES)
EncodingName = one_of(names.ENCODINGS)
FusionName = one_of(names.FUSIONS)
ResampleMode = one_of(names.RESAMPLE_MODES)
BiasCorrection = one_of(names.BIAS_CORRECTIONS)
Registration = one_of(names.REGISTRATIONS)
TemplateName = one_of(names.TEMPLATES)
SkullStrip = one_of(names.SKULL_STRIPS)
InputKind = one_of(names.INPUT_KINDS)
ContrastName = one_of(names.CONTRASTS)
Normalisation = one_of(names.NORMALISATIONS)
InferenceBackend = one_of(names.INFERENCE_BACKENDS)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    """How scans become training examples (MONAI transforms, see ``medidiff.data.transforms``)."""

    contrasts: list[ContrastName] | None = Field(
        default=None,
        description="the contrasts the model takes, in channel order, from those the data "
                    "set's dataset.json names (`modality` or `channel_names`; a data set that "
                    "names none is T1); null: all of them. Set when training starts and kept "
                    "in model.yaml")
    spatial_dims: Literal[2, 3] = Field(
        default=2, description="2: the model sees slices of the volumes; 3: volumes or patches")
    slice_axis: Literal[0, 1, 2] = Field(
        default=2,
        description="2D: the axis slices are taken along, after RAS reorientation (2 = axial)")
    spacing: list[float] | None = Field(
        default=None, description="resample to this spacing in mm (null keeps the scan's)")
    size: list[int] = Field(
        default_factory=lambda: [64, 64],
        description="model grid: in-plane size (2D) or volume size (3D), padded or cropped")
    patch: list[int] | None = Field(
        default=None, description="3D: random training patch size (null: the whole grid)")
    intensity_percentiles: tuple[float, float] | None = Field(
        default=(0.0, 99.5),
        description="percentiles of each scan mapped to 0 and 1; null: keep the intensities "
                    "`preprocess.normalise` gave the registered scan (a large bright lesion "
                    "moves a scan's top percentiles, and with them every healthy voxel); "
                    "without registration the default percentiles are used")
    intensity_ceiling: float = Field(
        default=1.0, ge=1.0, le=10.0,
        description="intensities are then clipped to [0, ceiling]; above 1, voxels brighter "
                    "than the brightest healthy tissue (a hyperintense lesion in white matter) "
                    "stay brighter instead of being clipped to it")
    min_foreground: float = Field(
        default=0.1, ge=0.0, le=1.0,
        description="2D: training slices need this share of foreground voxels")
    foreground_threshold: float = Field(
        default=0.02, ge=0.0, le=1.0, description="intensity above which a voxel is foreground")
    cache: bool = Field(
        default=True, description="cache preprocessed volumes in memory (MONAI `CacheDataset`)")

    @model_validator(mode="before")
    @classmethod
    def _drop_augment(cls, data: Any) -> Any:
        """``data.augment`` was read by nothing and is gone; model.yaml files that hold it load."""
        if isinstance(data, dict) and "augment" in data:
            data = {k: v for k, v in data.items() if k != "augment"}
        return data

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

    channels: list[int] = Field(default_factory=lambda: [32, 64, 64],
                                description="`DiffusionModelUNet` channels per level")
    attention_levels: list[bool] = Field(default_factory=lambda: [False, False, True],
                                         description="self-attention per level")
    num_res_blocks: int = Field(default=1, ge=1, description="residual blocks per level")
    num_head_channels: int = Field(default=32, ge=1, description="channels per attention head")
    norm_num_groups: int = Field(default=32, ge=1,
                                 description="group-norm groups (must divide every channel count)")


class DiffusionConfig(_Section):
    """The training noise schedule (MONAI ``DDPMScheduler`` betas)."""

    num_train_timesteps: int = Field(default=1000, ge=10,
                                     description="T, the number of training noise levels")
    schedule: ScheduleName = Field(default="linear_beta",
                                                    description="MONAI beta schedule")
    beta_start: float = Field(default=1e-4, gt=0, description="the schedule's first beta")
    beta_end: float = Field(default=0.02, gt=0, description="the schedule's last beta")
    prediction_type: PredictionType = Field(
        default="epsilon", description="what the network predicts")
    noise: DiffusionNoise = Field(
        default="gaussian",
        description="the noise the model is trained and sampled with: `gaussian`, or `simplex` "
                    "(AnoDDPM's octaves of simplex noise, standardised: low-frequency noise that "
                    "hides whole lesions from the reconstruction; training draws cost more)")
    noise_patch: int | None = Field(
        default=None, ge=4,
        description="pDDPM: noise one random square patch of this many voxels per training "
                    "example, leave the rest clean, and count the loss in the patch only; "
                    "anomaly scoring then reconstructs the image patch by patch (tiles covering "
                    "the slice, each noised with the rest as context: NFE times the tiles). "
                    "null: the whole image")


class TrainConfig(_Section):
    """The one training loop shared by every task."""

    steps: int = Field(default=2000, ge=1, description="optimisation steps")
    batch_size: int = Field(default=16, ge=1, description="examples per step, per process")
    lr: float = Field(default=2e-4, gt=0,
                      description="AdamW learning rate; linear warm-up then cosine decay to 10%")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay")
    warmup_steps: int = Field(default=100, ge=0,
                              description="steps of linear learning-rate warm-up")
    grad_clip: float | None = Field(default=1.0, description="gradient norm clipping (null: off)")
    ema_decay: float = Field(
        default=0.999, ge=0, lt=1,
        description="EMA of the weights; the model folder holds the EMA weights")
    amp: AmpMode = Field(
        default="auto",
        description="mixed precision: `auto` (bf16 on GPUs that support it, else fp16; on the "
                    "CPU bf16 where it has bf16 instructions (AVX512-BF16 or AMX), else off), "
                    "`off`, `bf16`, `fp16`")
    checkpoint_every: int = Field(
        default=200, ge=1, description="steps between checkpoints (`checkpoints/last.pt`, atomic)")
    checkpoint_minutes: float | None = Field(
        default=5.0, gt=0,
        description="also checkpoint once this many minutes have passed since the last "
                    "checkpoint, so a kill loses at most this much work (null: steps only)")
    sample_every: int = Field(default=500, ge=1,
                              description="steps between sample grids logged to MLflow")
    log_every: int = Field(default=20, ge=1, description="steps between metric logs")
    seed: int = Field(default=0, description="seeds everything")
    num_workers: int = Field(
        default=0, ge=0, description="worker processes that preprocess the scans (0: this one)")
    device: str = Field(default="auto", description="`auto`, `cpu`, `cuda`, `cuda:N`")
    max_minutes: float | None = Field(
        default=None, gt=0,
        description="stop after this wall-clock budget (the model is written as usual)")
    loss_weighting: LossWeighting = Field(
        default="uniform",
        description="`uniform`: the DDPM loss (every noise level weighs the same in the "
                    "prediction target's MSE); `min_snr`: Min-SNR-gamma (Hang et al. 2023), the "
                    "x0 error weighted by min(SNR, min_snr_gamma), which stops the nearly clean "
                    "levels from dominating and converges faster")
    min_snr_gamma: float = Field(default=5.0, gt=0,
                                 description="the SNR cap of `loss_weighting: min_snr`")
    loss_norm: LossNorm = Field(
        default="l2",
        description="the per-voxel error: `l2` (DDPM's squared error, whose minimiser is the "
                    "posterior mean) or `l1` (absolute error, as SR3 and Palette offer and "
                    "regression super-resolution networks train with)")
    max_timestep: int | None = Field(
        default=None, ge=1,
        description="train on noise levels below this only: a model used from partial noise "
                    "alone (an anomaly model scored at t ≤ 350) spends its capacity where it is "
                    "used; scoring above it is refused, and it cannot sample from pure noise")

    @field_validator("amp", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        """YAML reads a bare ``off`` (``amp: off``, ``--set train.amp=off``) as false."""
        return "off" if value is False else value


class AnomalyConfig(_Section):
    """Reconstruction-based scoring (AnoDDPM and successors): partial noising, reverse, residual."""

    sampler: SamplerName = Field(default="ddim", description="default scoring sampler")
    noise_levels: list[int] = Field(default_factory=lambda: [250],
                                    description="partial noise levels (training timesteps)")
    steps: int = Field(default=5, ge=1, description="sampler steps per level")
    draws: int = Field(default=4, ge=1, le=MAX_DRAWS,
                       description="noise draws per level, averaged")
    eta: float = Field(default=1.0, ge=0.0, le=1.0,
                       description="DDIM stochasticity (1: ancestral sampling)")
    median_kernel: int = Field(
        default=5, ge=1, description="median filter size of the map (voxels of the model grid)")
    standardise: bool = Field(
        default=True,
        description="divide the residual, voxel by voxel, by its spread over the healthy "
                    "validation scans (after subtracting their mean); on whole volumes it lifted "
                    "pooled AP from 0.78 to 0.84 (docs/benchmarks.md); needs scans in a common "
                    "space (as the z-score baseline) and at least 3 validation scans, otherwise "
                    "the map stays the raw residual")
    score_top_fraction: float = Field(
        default=0.001, gt=0, le=1,
        description="per-scan score: mean of this top share of foreground map values (0.001 "
                    "of a brain is about 1 ml; a larger share dilutes a small lesion in healthy "
                    "voxels: on a development set scan AUROC 0.92 against 0.82 at 0.01)")
    target_fpr: float = Field(
        default=0.01, gt=0, lt=1,
        description="voxel false-positive rate on healthy validation scans for the mask threshold")
    scan_fpr: float = Field(default=0.05, gt=0, lt=1,
                            description="scan false-positive rate for the `flagged` threshold")
    batch_size: int = Field(default=32, ge=1,
                            description="network batch when scoring (draws included)")
    seed: int = Field(default=0, description="seed of the scoring noise")


class _EnhanceConfig(_Section):
    """What denoising and super-resolution share: 2D slice context, intensity jitter, sampling."""

    context: int = Field(default=0, ge=0, description="2D: neighbour slices on each side")
    intensity_jitter: float = Field(
        default=0.2, ge=0.0, lt=1.0,
        description="training: each example's intensities are scaled by a random factor in "
                    "1 ± this, so the output follows the input's scale")
    sampler: SamplerName = Field(default="ddim", description="reverse sampler")
    steps: int = Field(default=10, ge=1, description="sampler steps")
    eta: float = Field(default=0.0, ge=0.0, le=1.0,
                       description="DDIM stochasticity (0: deterministic, 1: ancestral)")
    samples: int = Field(
        default=1, ge=1, le=MAX_DRAWS,
        description="samples per scan: the output is their mean (with more than 1, their "
                    "standard deviation is written too)")
    batch_size: int = Field(default=32, ge=1,
                            description="slices or windows per network batch, samples included")
    seed: int = Field(default=0, description="seed of the sampling noise")


class DenoiseConfig(_EnhanceConfig):
    """Conditional denoising: the noisy scan (with its neighbour slices in 2D) is the condition.

    Training degrades clean scans on the fly: ``noise`` kinds drawn per example, sigma uniform
    in ``sigma_range`` as a fraction of the brain's 99th-percentile intensity. The noise level
    reaches the network as one of ``noise_bins`` class labels.
    """

    noise: list[NoiseKind] = Field(
        default_factory=lambda: list(names.NOISE_KINDS),
        description="noise kinds added to the training scans, drawn per example (one name or a "
                    "list)")
    sigma_range: tuple[float, float] = Field(
        default=(0.02, 0.15),
        description="training noise sigma, uniform in this range, as a fraction of the brain's "
                    "99th-percentile intensity (0 < low ≤ high)")
    noise_bins: int = Field(
        default=16, ge=2,
        description="the noise level reaches the network as one of this many class labels, "
                    "even bins up to the top of `sigma_range`")
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

    scales: list[int] = Field(
        default_factory=lambda: [2, 4],
        description="training downsampling factors (each at least 2); the scale's index is the "
                    "class label")
    axes: list[Literal[0, 1, 2]] | None = Field(
        default=None,
        description="the super-resolved axes (null: in-plane for 2D models, the slice axis for "
                    "3D models)")
    consistency: bool = Field(
        default=True,
        description="project each sample onto the images whose average over each coarse voxel "
                    "is the input's (data consistency, as DDNM): exact for partial-volume "
                    "(averaged) acquisitions, and never farther from such a scan's truth")

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
    encoding: EncodingName = Field(
        default="onehot",
        description="label code: one channel per class, or ceil(log2 K) analog bits")
    image_channels: int = Field(default=1, ge=1, description="channels of the input scans")
    sampler: SamplerName = Field(default="ddim", description="reverse sampler")
    steps: int = Field(default=10, ge=1, description="sampler steps from pure noise")
    eta: float = Field(default=0.0, ge=0.0, le=1.0,
                       description="DDIM stochasticity (0: deterministic, 1: ancestral)")
    samples: int = Field(default=5, ge=1, le=MAX_DRAWS,
                         description="label maps drawn per scan and fused")
    fusion: FusionName = Field(
        default="mean",
        description="argmax of the mean class probabilities, or majority vote of the samples' "
                    "labels")
    resample: ResampleMode = Field(
        default="nearest",
        description="back to the scan's grid: labels by nearest neighbour, or probabilities "
                    "linearly then argmax")
    batch_size: int = Field(default=32, ge=1,
                            description="slices per network batch, samples included")
    seed: int = Field(default=0, description="seed of the sampling noise")


class PreprocessConfig(_Section):
    """From a scan as the scanner gives it to model input, and back (``medidiff.preprocess``).

    Run identically by training, calibration and every inference command, so that a model is
    always fed what it was trained on; ``registration: none`` keeps scans that are already
    aligned as they are.
    """

    bias_correction: BiasCorrection = Field(
        default="none", description="N4 bias-field correction (SimpleITK) of the native scan")
    registration: Registration = Field(
        default="none", description="align the scan to the head template (rigid or affine, "
                                    "mutual information, SimpleITK); outputs go back through "
                                    "the inverse")
    input: InputKind = Field(
        default="auto",
        description="what a scan holds: `head` (skull on, as scanners give it: registered to "
                    "the template head), `brain` (skull-stripped, as BraTS, ATLAS or HD-BET "
                    "give it: registered to the template's brain), or `auto`: a brain when its "
                    "foreground is brain-sized (below 2.2 l, or below 3.2 l with a zero "
                    "background), else a head")
    template: TemplateName = Field(
        default="auto", description="the head template registered to (`auto`: the one of the "
                                    "model's first contrast; packaged, "
                                               "MNI ICBM152 2009c at 2 mm)")
    skull_strip: SkullStrip = Field(
        default="none", description="template: keep the template's brain mask (eroded by "
                                    "mask_erosion_mm) after registration; deepbet: a learned "
                                    "brain mask of the T1 head on its own grid (the optional "
                                    "extra `medidiff[deepbet]`), after which the brain is "
                                    "registered to the template's brain")
    mask_erosion_mm: float = Field(
        default=2.0, ge=0.0, le=10.0,
        description="erode the template brain mask by this much, so that scalp and CSF at the "
                    "brain's edge that affine alignment leaves are not scored")
    normalise: Normalisation = Field(
        default="median",
        description="intensities of the registered scan, measured inside the brain mask (the "
                    "head without skull stripping): `median` maps the median to where the "
                    "template's median lies when its 99th percentile is 1, which a lesion "
                    "barely moves; `p99` divides by the 99th percentile, which a large bright "
                    "lesion raises (and darkens the rest of the scan); `histogram`: the brain's "
                    "5th-90th percentiles mapped piecewise linearly onto the template's (Nyul "
                    "and Udupa 1999), which also removes gamma and contrast differences between "
                    "scanners and heads; `none` keeps them")
    threads: int = Field(default=1, ge=1, le=64,
                         description="threads for N4 and registration; 1 gives the same bytes "
                                     "on every run")
    min_correlation: float = Field(
        default=0.4, ge=-1.0, le=1.0,
        description="quality control: a registered scan whose correlation with the template "
                    "inside the brain is lower failed (wrong contrast, not a head, diverged)")
    min_head_dice: float = Field(
        default=0.75, ge=0.0, le=1.0,
        description="quality control: the overlap of the registered scan's head with the "
                    "template's head below which the registration failed")

    @field_validator("normalise", mode="before")
    @classmethod
    def _boolean(cls, value: Any) -> Any:
        """model.yaml files written before the choice hold a bool: true meant ``p99``."""
        if isinstance(value, bool):
            return "p99" if value else "none"
        return value

    @model_validator(mode="after")
    def _check_steps(self) -> PreprocessConfig:
        if self.skull_strip != "none" and self.registration == "none":
            raise ValueError(f"preprocess.skull_strip {self.skull_strip!r} needs a registration "
                             "to the template (rigid or affine)")
        return self

    @property
    def enabled(self) -> bool:
        return self.registration != "none" or self.bias_correction != "none"


class InferenceConfig(_Section):
    """How every inference command runs the network (``medidiff.inference.backends``)."""

    backend: InferenceBackend = Field(
        default="auto", description="eager PyTorch, torch.compile, or the network exported once "
                                    "to ONNX and run by ONNX Runtime (onnx) or OpenVINO; auto: "
                                    "on the CPU openvino, else onnx when installed, else eager")


class Config(_Section):
    """A whole experiment."""

    task: TaskName = Field(default="anomaly", description="what the model is for")
    name: str = Field(default="experiment", description="a label for runs")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = Field(default_factory=DiffusionConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    anomaly: AnomalyConfig = Field(default_factory=AnomalyConfig)
    denoise: DenoiseConfig = Field(default_factory=DenoiseConfig)
    superres: SuperResConfig = Field(default_factory=SuperResConfig)
    segment: SegmentConfig = Field(default_factory=SegmentConfig)
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    inference: InferenceConfig = Field(default_factory=InferenceConfig)

    @model_validator(mode="after")
    def _check_contrasts(self) -> Config:
        contrasts = self.data.contrasts
        if contrasts is not None:
            if not contrasts or len(set(contrasts)) != len(contrasts):
                raise ValueError("data.contrasts needs at least one contrast, none twice")
            if self.preprocess.template == "auto":  # model.yaml names the template it used
                self.preprocess.template = names.TEMPLATE_OF_CONTRAST[contrasts[0]]
        learned = self.preprocess.skull_strip not in ("none", "template")
        if learned and contrasts and contrasts[0] not in ("t1", "t1ce"):
            raise ValueError(f"preprocess.skull_strip {self.preprocess.skull_strip!r} extracts "
                             f"brains from T1 heads only, not {contrasts[0]}: use 'template'")
        return self

    @model_validator(mode="after")
    def _check_max_timestep(self) -> Config:
        limit = self.train.max_timestep
        if limit is not None and self.task != "anomaly":
            raise ValueError(f"train.max_timestep is for anomaly models; a {self.task} model "
                             "samples from pure noise and must learn every level")
        if limit is not None and self.task == "anomaly" and max(self.anomaly.noise_levels) >= limit:
            raise ValueError(f"anomaly.noise_levels must stay below train.max_timestep ({limit})")
        if self.diffusion.noise_patch is not None and self.task != "anomaly":
            raise ValueError(f"diffusion.noise_patch is for anomaly models (pDDPM); a {self.task} "
                             "model generates its whole image")
        return self

    @model_validator(mode="after")
    def _check_intensities(self) -> Config:
        if self.data.intensity_percentiles is not None:
            return self
        if self.task in ("denoise", "superres"):
            raise ValueError(f"data.intensity_percentiles: a {self.task} model maps its output "
                             "back to the scan's intensities through them; it cannot be null")
        if self.preprocess.normalise == "none":
            raise ValueError("data.intensity_percentiles: null keeps the intensities the "
                             "preprocessing normalised, so it needs preprocess.normalise")
        if self.preprocess.registration == "none":
            # nothing normalises an unregistered scan: each scan's percentiles do, as they do
            # for every model without registration (the README's recipe for scans already in
            # template space turns registration off on a preset that keeps them)
            self.data.intensity_percentiles = DataConfig.model_fields[
                "intensity_percentiles"].default
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
