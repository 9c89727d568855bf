"""Segmentation as conditional generation of the label map (Wolleb et al. 2022; MedSegDiff).

The image is the condition, concatenated after the noisy target (Wolleb et al. 2022, "Diffusion
models for implicit image segmentation ensembles"; Wu et al. 2023, MedSegDiff). The label map
becomes a code in [-1, 1]: one-hot, one channel per class, or analog bits (Chen et al. 2023,
"Analog bits"), ceil(log2 K) channels. Several samples from independent noise are decoded into
class probabilities and fused: their mean, then argmax (or a majority vote); the normalised
entropy of the fused probabilities is the voxel-wise uncertainty.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from medidiff.config import Config, SegmentConfig
from medidiff.diffusion.noise import StackedGenerator, sample_seed
from medidiff.diffusion.samplers import get_sampler, nfe, timestep_schedule
from medidiff.diffusion.schedule import NoiseSchedule
from medidiff.errors import ConfigError, InputError
from medidiff.names import ENCODINGS, FUSIONS
from medidiff.tasks.base import Task, TrainingInputs, model_fn
from medidiff.tasks.enhance.denoise import crop_batch


class SegmentTask(Task):
    """Target: the encoded label map; condition: the image (``label`` entries of the data)."""

    name = "segment"
    label_keys = ("label",)

    def target_channels(self, cfg: Config) -> int:
        return code_channels(cfg.segment.num_classes, cfg.segment.encoding)

    def condition_channels(self, cfg: Config) -> int:
        return cfg.segment.image_channels

    def training_inputs(self, batch: dict, cfg: Config, generator: torch.Generator) -> TrainingInputs:
        image, labels = batch["image"], batch["label"]
        section = cfg.segment
        if image.shape[1] != section.image_channels:
            raise InputError(None, f"training images have {image.shape[1]} channels, but "
                                   f"segment.image_channels is {section.image_channels}")
        check_label_values(labels, section.num_classes)
        both = crop_batch(torch.cat([image, labels.to(image.dtype)], dim=1), cfg, generator)
        image, labels = both[:, :-1], both[:, -1:]
        target = encode_labels(labels, section.num_classes, section.encoding)
        return TrainingInputs(target=target, condition=image * 2.0 - 1.0)


# -- label codes ------------------------------------------------------------------------------
def code_channels(num_classes: int, encoding: str) -> int:
    """Channels of the code: K for one-hot, ceil(log2 K) for analog bits."""
    if encoding == "onehot":
        return num_classes
    if encoding == "bits":
        return max(1, math.ceil(math.log2(num_classes)))
    raise ConfigError(f"segment.encoding: unknown encoding {encoding!r} (valid: {', '.join(ENCODINGS)})")


def check_label_values(labels: torch.Tensor, num_classes: int) -> None:
    """Labels must be the integers 0 .. K-1 (K = ``segment.num_classes``)."""
    top = int(labels.max().round()) if labels.numel() else 0
    if top >= num_classes or (labels.numel() and float(labels.min()) < -0.5):
        raise InputError(None, f"a label map holds class {top}, but segment.num_classes is "
                               f"{num_classes} (classes 0..{num_classes - 1}); set "
                               "segment.num_classes to the number of labels in dataset.json")


def _bit_table(num_classes: int, channels: int) -> torch.Tensor:
    """(K, C) 0/1 table: bit j of class k."""
    classes = torch.arange(num_classes)[:, None]
    return ((classes >> torch.arange(channels)[None, :]) & 1).float()


def encode_labels(labels: torch.Tensor, num_classes: int, encoding: str = "onehot") -> torch.Tensor:
    """(B, 1, *S) class map -> (B, C, *S) code with values -1 and 1."""
    index = labels[:, 0].round().long()
    if encoding == "onehot":
        code = F.one_hot(index, num_classes).movedim(-1, 1).float()
    else:
        table = _bit_table(num_classes, code_channels(num_classes, encoding)).to(labels.device)
        code = table[index].movedim(-1, 1)
    return code * 2.0 - 1.0


def decode_probabilities(code: torch.Tensor, num_classes: int,
                         encoding: str = "onehot") -> torch.Tensor:
    """(B, C, *S) generated code -> (B, K, *S) class probabilities that sum to 1.

    One-hot: each channel mapped to [0, 1] and normalised. Analog bits: each channel is the
    probability of its bit, bits independent; classes beyond K are dropped and the rest
    renormalised. A voxel with no evidence for any class gets the uniform distribution.
    """
    q = ((code.float() + 1.0) / 2.0).clamp(0.0, 1.0)
    if encoding == "onehot":
        probs = q
    else:
        table = _bit_table(num_classes, code_channels(num_classes, encoding)).to(code.device)
        table = table.reshape(1, *table.shape, *[1] * (code.ndim - 2))
        probs = (table * q[:, None] + (1 - table) * (1 - q[:, None])).prod(dim=2)
    total = probs.sum(dim=1, keepdim=True)
    uniform = torch.full_like(probs, 1.0 / num_classes)
    return torch.where(total > 1e-6, probs / total.clamp_min(1e-6), uniform)


def decode_labels(code: torch.Tensor, num_classes: int, encoding: str = "onehot") -> torch.Tensor:
    """(B, C, *S) code -> (B, 1, *S) class map (argmax of the decoded probabilities)."""
    return decode_probabilities(code, num_classes, encoding).argmax(dim=1, keepdim=True)


# -- ensembles --------------------------------------------------------------------------------
def fuse(probs: torch.Tensor, method: str = "mean") -> torch.Tensor:
    """(N, K, *S) per-sample probabilities -> (K, *S) fused probabilities.

    ``mean``: the mean of the soft maps (Wolleb et al. 2022 average their samples). ``vote``: the
    share of samples whose argmax is each class (majority vote), ties broken by the mean.
    """
    mean = probs.mean(dim=0)
    if method == "mean":
        return mean
    if method != "vote":
        raise ConfigError(f"segment.fusion: unknown fusion {method!r} (valid: {', '.join(FUSIONS)})")
    votes = F.one_hot(probs.argmax(dim=1), probs.shape[1]).movedim(-1, 1).float().mean(dim=0)
    tie_broken = votes + 1e-3 * mean
    return tie_broken / tie_broken.sum(dim=0, keepdim=True)


def entropy(probs: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Entropy of class probabilities along ``dim``, divided by log K: 0 certain, 1 uniform."""
    p = probs.clamp_min(1e-12)
    return (-(probs * p.log()).sum(dim=dim) / math.log(probs.shape[dim])).clamp(0.0, 1.0)


def timesteps(settings: SegmentConfig, num_train_timesteps: int) -> list[int]:
    """From pure noise (the last training step) down, ``steps`` evenly spaced timesteps."""
    start = num_train_timesteps - 1
    return timestep_schedule(start, min(settings.steps, start), num_train_timesteps)


def nfe_per_slice(settings: SegmentConfig) -> int:
    return settings.samples * nfe(settings.sampler, settings.steps)


@torch.no_grad()
def sample_probabilities(net, images: torch.Tensor, ids: list[tuple[int, ...]], cfg: Config,
                         schedule: NoiseSchedule, settings: SegmentConfig,
                         device: torch.device) -> torch.Tensor:
    """(B, C, *S) images in [0, 1] -> (B, N * K, *S) class probabilities of N samples each.

    Every (row, sample) starts from its own seeded Gaussian noise (``ids`` names the rows);
    samples are folded into the batch, at most ``batch_size`` at a time.
    """
    section, n = cfg.segment, settings.samples
    pairs = [(row, sample) for row in range(images.shape[0]) for sample in range(n)]
    code_shape = (code_channels(section.num_classes, section.encoding), *images.shape[2:])
    options = {"eta": settings.eta} if settings.sampler == "ddim" else {}
    steps = timesteps(settings, schedule.num_train_timesteps)
    chunks = []
    for start in range(0, len(pairs), settings.batch_size):
        chunk = pairs[start:start + settings.batch_size]
        generator = StackedGenerator([sample_seed(settings.seed, sample, *ids[row])
                                      for row, sample in chunk])
        rows = torch.as_tensor([row for row, _ in chunk])
        condition = images[rows].to(device) * 2.0 - 1.0
        x = schedule.draw_noise((len(chunk), *code_shape), generator, device=device)
        code = get_sampler(settings.sampler)(model_fn(net, condition), x, steps, schedule,
                                             generator=generator, clip=True, **options)
        chunks.append(decode_probabilities(code, section.num_classes, section.encoding).cpu())
    probs = torch.cat(chunks)
    return probs.reshape(images.shape[0], n * probs.shape[1], *probs.shape[2:])


def certain_background(samples: int, num_classes: int):
    """The runner's fill: slices that are not run are background with certainty."""

    def fill(slices: torch.Tensor) -> torch.Tensor:
        out = torch.zeros((slices.shape[0], samples, num_classes, *slices.shape[2:]))
        out[:, :, 0] = 1.0
        return out.flatten(1, 2)

    return fill
