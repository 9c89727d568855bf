"""Baselines for the diffusion segmenter: a supervised U-Net run exactly as the diffusion model
is run, and 3-class multi-Otsu thresholds.

    net, log = train_unet(segmenter.cfg, dataset, max_cpu_seconds=1800)
    baseline = UNetSegmenter(net, segmenter)
    result = baseline.predict_file("scan.nii.gz")   # a SegmentResult, as the Segmenter's

The U-Net is configured as nnU-Net configures a 2D network (Isensee et al. 2021): MONAI
``DynUNet``, instance norm, leaky ReLU, Dice + cross-entropy on the full-resolution output and
on deep-supervision heads (weights halving with depth). It trains on the diffusion model's
training slices with its augmentation (random ``data.patch`` crops), and predicts through the
same preprocessing, foreground slices, windows and mapping back to the input's space
(``foreground_grid``, ``Segmenter.finish``); its uncertainty is the normalised entropy of its
softmax, as the ensemble's is of its fused probabilities.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from medidiff.config import Config
from medidiff.inference.grid import GridRunner
from medidiff.inference.predictor import Prepared
from medidiff.tasks.enhance.denoise import crop_batch
from medidiff.tasks.segment.predictor import (
    Segmenter,
    SegmentGrid,
    SegmentResult,
    foreground_grid,
)
from medidiff.training.trainer import draw_batch

FILTERS = (16, 32, 64, 128)
DEEP_SUPERVISION = 2  # heads below the full-resolution output


def build_unet(cfg: Config, filters=FILTERS, deep_supervision: int = DEEP_SUPERVISION):
    """An nnU-Net-style 2D or 3D ``DynUNet`` for the model's image channels and classes."""
    from monai.networks.nets import DynUNet

    dims, levels = cfg.data.spatial_dims, len(filters)
    strides = [1] + [2] * (levels - 1)
    return DynUNet(spatial_dims=dims, in_channels=cfg.segment.image_channels,
                   out_channels=cfg.segment.num_classes, kernel_size=[3] * levels,
                   strides=strides, upsample_kernel_size=strides[1:], filters=list(filters),
                   norm_name="instance", deep_supervision=deep_supervision > 0,
                   deep_supr_num=max(1, deep_supervision))


def unet_multiple(net) -> int:
    """The spatial multiple a ``DynUNet``'s input must have."""
    return math.prod(int(np.max(s)) for s in net.strides)


class DeepSupervisionLoss:
    """Dice + cross-entropy summed over the outputs of every head, weights 1, 1/2, 1/4, ...
    normalised (nnU-Net's deep supervision); one output when the network gives one."""

    def __init__(self):
        from monai.losses import DiceCELoss

        self.dice_ce = DiceCELoss(to_onehot_y=True, softmax=True)

    def __call__(self, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        heads = outputs.unbind(dim=1) if outputs.ndim == labels.ndim + 1 else (outputs,)
        weights = torch.tensor([0.5 ** i for i in range(len(heads))])
        weights = weights / weights.sum()
        return sum(w * self.dice_ce(head, labels) for w, head in zip(weights, heads, strict=True))


@dataclass
class TrainingLog:
    """The loss curve (CPU seconds, steps, mean loss of the window) and weight snapshots."""

    curve: list[dict] = field(default_factory=list)
    snapshots: list[dict] = field(default_factory=list)  # {"cpu_seconds", "steps", "state"}
    stopped: str = ""  # why training ended: "converged" or "time"

    def describe(self) -> dict:
        return {"curve": self.curve, "stopped": self.stopped,
                "snapshots": [{k: v for k, v in s.items() if k != "state"}
                              for s in self.snapshots]}


def train_unet(cfg: Config, dataset, *, max_cpu_seconds: float, window_seconds: float = 60.0,
               snapshot_at=(), tolerance: float = 0.01, seed: int = 0, net=None):
    """Train the baseline on ``dataset`` (image and label slices) until its loss converges or
    it has used ``max_cpu_seconds`` of this process's CPU time.

    The loss is averaged over windows of ``window_seconds``; when a window's mean is not
    ``tolerance`` below the best before it, the learning rate drops tenfold, and at the second
    such window training stops ("converged"). Weights are kept at each CPU time of
    ``snapshot_at`` (e.g. another method's training budget) and at the end.
    """
    torch.manual_seed(seed)
    net = net if net is not None else build_unet(cfg)
    loss_fn = DeepSupervisionLoss()
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.train.lr)
    generator = torch.Generator().manual_seed(seed)
    log, pending = TrainingLog(), sorted(snapshot_at)
    started, steps, window, best, plateaus = time.process_time(), 0, [], math.inf, 0
    net.train()
    while True:
        used = time.process_time() - started
        while pending and used >= pending[0]:
            pending.pop(0)
            log.snapshots.append(_snapshot(net, used, steps))
        if used >= max_cpu_seconds:
            log.stopped = "time"
            break
        if used >= window_seconds * (len(log.curve) + 1) and window:
            mean = float(np.mean(window))
            log.curve.append({"cpu_seconds": used, "steps": steps, "loss": mean,
                              "lr": opt.param_groups[0]["lr"]})
            window = []
            if mean > best * (1 - tolerance):
                plateaus += 1
                if plateaus == 2:
                    log.stopped = "converged"
                    break
                for group in opt.param_groups:
                    group["lr"] /= 10
            best = min(best, mean)
        batch = draw_batch(dataset, cfg.train.batch_size, generator)
        both = crop_batch(torch.cat([batch["image"], batch["label"]], dim=1), cfg, generator)
        loss = loss_fn(net(both[:, :-1]), both[:, -1:].round())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        window.append(loss.item())
        steps += 1
    log.snapshots.append(_snapshot(net, time.process_time() - started, steps))
    return net.eval(), log


def _snapshot(net, cpu_seconds: float, steps: int) -> dict:
    return {"cpu_seconds": float(cpu_seconds), "steps": steps,
            "state": copy.deepcopy(net.state_dict())}


class UNetSegmenter:
    """A supervised network run as ``segmenter`` runs its diffusion model: the same
    preprocessing, foreground slices, windows, batch and mapping back to the input's space."""

    def __init__(self, net, segmenter: Segmenter):
        self.net, self.segmenter = net.eval(), segmenter
        self.cfg = segmenter.cfg

    def run(self, batch: torch.Tensor, ids) -> torch.Tensor:
        """(B, C, *S) images in [0, 1] -> (B, K, *S) softmax probabilities."""
        with torch.no_grad():
            return self.net(batch.to(self.segmenter.device)).softmax(dim=1).cpu()

    def segment_grid(self, volume: torch.Tensor, progress=None) -> SegmentGrid:
        runner = GridRunner.for_model(self.cfg, self.segmenter.settings.batch_size)
        runner = replace(runner, multiple=math.lcm(runner.multiple, unet_multiple(self.net)))
        return foreground_grid(self.run, volume, runner, self.cfg, 1, "mean", progress)

    def predict(self, prep: Prepared, progress=None) -> SegmentResult:
        reference = self.segmenter.reference_for(prep)
        return self.segmenter.finish(prep, self.segment_grid(prep.volume, progress), reference)

    def predict_file(self, path: str | Path, progress=None) -> SegmentResult:
        return self.predict(self.segmenter.prepare_file(path), progress)


def otsu_labels(image: np.ndarray) -> np.ndarray:
    """3-class multi-Otsu of the brain's intensities (labels 1, 2, 3 by increasing intensity;
    the brain is the scan's non-zero voxels)."""
    from skimage.filters import threshold_multiotsu

    brain = image > 0
    labels = np.zeros(image.shape, np.uint8)
    labels[brain] = np.digitize(image[brain], threshold_multiotsu(image[brain], classes=3)) + 1
    return labels
