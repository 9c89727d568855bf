"""Every closed set of names medidiff accepts, written once.

The config (``medidiff.config``), the command line (``click.Choice``), the implementations and
the docs (``medidiff.config_docs``) all take their valid names from here, so a new sampler or
method is added in one place and an error message always lists what is valid. Plain tuples, in
the order the docs list them; no heavy imports, so the CLI can read them before loading torch.
"""

from __future__ import annotations

TASK_NAMES = ("anomaly", "denoise", "superres", "segment")
"""What a model is trained for (``task``)."""

SAMPLERS = ("ddpm", "ddim", "dpmpp2m", "x0")
"""Reverse-process samplers (``medidiff.diffusion.samplers.SAMPLERS`` holds one of each)."""

ANOMALY_METHODS = ("diffusion", "zscore", "threshold")
"""Anomaly scoring: the diffusion model, or a baseline (voxel-wise z-score; thresholding)."""

FUSIONS = ("mean", "vote")
"""How sampled segmentations are fused: mean class probabilities, or majority vote."""

ENCODINGS = ("onehot", "bits")
"""How a segmentation label map is encoded for the diffusion model: one-hot or analog bits."""

RESAMPLE_MODES = ("nearest", "linear")
"""How a segmentation goes back to the scan's grid: labels nearest, or probabilities linear."""

NOISE_SCHEDULES = ("linear_beta", "scaled_linear_beta", "sigmoid_beta", "cosine")
"""MONAI beta schedules (``diffusion.schedule``)."""

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
"""What the network predicts (``diffusion.prediction_type``)."""

DIFFUSION_NOISES = ("gaussian", "simplex")
"""The noise of the diffusion process (``diffusion.noise``; ``diffusion.noise``)."""

LOSS_NORMS = ("l2", "l1")
"""The per-voxel error of the training loss (``train.loss_norm``; ``training.loss``)."""

LOSS_WEIGHTINGS = ("uniform", "min_snr")
"""How the training loss weighs noise levels (``train.loss_weighting``; ``training.loss``)."""

AMP_MODES = ("auto", "off", "bf16", "fp16")
"""Mixed precision (``train.amp``)."""

NOISE_KINDS = ("rician", "gaussian")
"""Noise added to clean scans when training a denoising model (``denoise.noise``)."""

BIAS_CORRECTIONS = ("none", "n4")
"""Bias-field correction before registration (``preprocess.bias_correction``)."""

REGISTRATIONS = ("none", "rigid", "affine")
"""Registration of a scan to the head template (``preprocess.registration``)."""

TEMPLATES = ("auto", "mni152-2009c-t1", "mni152-2009c-t2", "mni152-2009c-flair")
"""Packaged head templates (MNI ICBM152 2009c, 2 mm; ``preprocess.template``); ``auto`` picks
the one of the model's contrast."""

TEMPLATE_OF_CONTRAST = {"t1": "mni152-2009c-t1", "t1ce": "mni152-2009c-t1",
                        "t2": "mni152-2009c-t2", "pd": "mni152-2009c-t2",
                        "flair": "mni152-2009c-flair"}
"""The template ``preprocess.template: auto`` means for a model whose first contrast is the key."""

NORMALISATIONS = ("none", "p99", "median", "histogram")
"""Intensity normalisation of a registered brain (``preprocess.normalise``)."""

CONTRASTS = ("t1", "t1ce", "t2", "flair", "pd")
"""MR contrasts (``data.contrasts``; ``medidiff.data.contrasts`` maps the field's spellings)."""

INPUT_KINDS = ("auto", "head", "brain")
"""What a scan holds (``preprocess.input``): a head with skull, a skull-stripped brain, or
detected per scan."""

SKULL_STRIPS = ("none", "template", "deepbet")
"""Brain extraction (``preprocess.skull_strip``): the template's brain mask after registration,
or a learned T1 brain mask on the scan's own grid before it (``medidiff[deepbet]``)."""

INFERENCE_BACKENDS = ("auto", "eager", "compile", "onnx", "openvino")
"""How the network runs at inference (``inference.backend``; ``medidiff.inference.backends``)."""

SCORING_PRESETS = ("fast", "default", "reference")
"""Named anomaly-scoring settings (``--preset``; ``medidiff.tasks.anomaly.presets``)."""

RUN_FORMATS = ("table", "csv", "json", "markdown")
"""Output formats of ``medidiff runs compare``."""

IMPORT_FORMATS = ("ixi", "brats", "atlas", "bids", "decathlon", "nnunet")
"""Public data layouts ``medidiff data import`` reads (``medidiff.data.importers``)."""

IMPORT_ALIASES = {"brats2021": "brats", "brats2023": "brats"}
"""Other names of an import format: ``brats`` of one edition only."""

__all__ = [
    "AMP_MODES",
    "ANOMALY_METHODS",
    "CONTRASTS",
    "DIFFUSION_NOISES",
    "BIAS_CORRECTIONS",
    "ENCODINGS",
    "FUSIONS",
    "IMPORT_ALIASES",
    "IMPORT_FORMATS",
    "INFERENCE_BACKENDS",
    "INPUT_KINDS",
    "LOSS_NORMS",
    "LOSS_WEIGHTINGS",
    "NOISE_KINDS",
    "NOISE_SCHEDULES",
    "NORMALISATIONS",
    "PREDICTION_TYPES",
    "REGISTRATIONS",
    "RESAMPLE_MODES",
    "RUN_FORMATS",
    "SAMPLERS",
    "SCORING_PRESETS",
    "SKULL_STRIPS",
    "TASK_NAMES",
    "TEMPLATE_OF_CONTRAST",
    "TEMPLATES",
]
