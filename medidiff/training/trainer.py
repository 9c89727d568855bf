"""One training loop for every task: AdamW, EMA, AMP on GPU, atomic checkpoints, exact resume.

Batches are drawn i.i.d. from the data set with a seeded ``torch.Generator`` whose state is saved
in every checkpoint, so a resumed run continues the same random stream from the same step.
Checkpoints are written every ``train.checkpoint_every`` steps and, between those, once
``train.checkpoint_minutes`` have passed since the last one. The MLflow run id is recorded in
the output folder as soon as the run opens, so ``--resume`` continues the same run even after a
kill before the first checkpoint.

The trainer never imports a task: its caller passes the task object (``medidiff.tasks.registry
.get_task(cfg.task)``), which says what the network learns (``training_inputs``), its channels
and the data keys it needs.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medidiff.config import Config, dump_config
from medidiff.data.datasets import fingerprint, read_split, resolve_contrasts, training_dataset
from medidiff.diffusion.schedule import NoiseSchedule
from medidiff.errors import ConfigError, InputError
from medidiff.io.write import atomic_write_text
from medidiff.models.checkpoint import load_checkpoint, save_checkpoint
from medidiff.models.ema import EMA
from medidiff.models.folder import build_network, save_model_folder
from medidiff.models.unet import count_parameters
from medidiff.preprocess.cache import preprocess_entries
from medidiff.report import loss_curve
from medidiff.runtime import amp_dtype, select_device
from medidiff.tracking import Tracker
from medidiff.tracking.uri import redact
from medidiff.training.distributed import any_ranks
from medidiff.training.loss import Loss, loss_from_config
from medidiff.training.preview import preview_grid

CHECKPOINT = "checkpoints/last.pt"
RUN_RECORD = "checkpoints/run.json"  # the MLflow run of this folder, written when it opens


@dataclass
class TrainResult:
    model_dir: Path
    steps: int
    final_loss: float
    seconds: float
    images_per_second: float
    run_id: str | None = None
    losses: list[float] = field(default_factory=list)
    model_id: str | None = None  # the MLflow LoggedModel of the model folder, when tracked


def draw_batch(dataset, batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """An i.i.d. batch; the slice data set is indexed in one go."""
    index = torch.randint(len(dataset), (batch_size,), generator=generator)
    if hasattr(dataset, "data"):
        return {k: v[index] for k, v in dataset.data.items()}
    if hasattr(dataset, "set_random_state"):
        dataset.set_random_state(int(torch.randint(2**31 - 1, (1,), generator=generator)))
    items = [dataset[int(i)] for i in index]
    return {k: torch.stack([item[k] for item in items]) for k in items[0]}


def lr_factor(step: int, cfg: Config) -> float:
    """Linear warm-up then cosine decay to 10% of the base rate."""
    warm = cfg.train.warmup_steps
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, cfg.train.steps - warm)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class Trainer:
    """Holds the state of one training run; ``run()`` trains to ``cfg.train.steps``.

    ``task`` is the task object of ``cfg.task``; ``loss`` what a step minimises (default: the
    config's, ``loss_from_config``).
    """

    def __init__(self, cfg: Config, data_dir: str | Path, out_dir: str | Path, *, task: Any,
                 tracker: Tracker | None = None, progress: Callable[[dict], None] | None = None,
                 rank: int = 0, world_size: int = 1, loss: Loss | None = None):
        if getattr(task, "name", None) != cfg.task:
            raise ConfigError(f"task: the config trains a '{cfg.task}' model but the task "
                              f"given is '{getattr(task, 'name', task)}'")
        cfg = resolve_contrasts(cfg, data_dir)
        self.cfg, self.out_dir, self.task = cfg, Path(out_dir), task
        self.tracker = tracker or Tracker(enabled=False)
        self.progress = progress
        self.rank, self.world_size = rank, world_size
        self.device = select_device(cfg.train.device)
        self.loss = loss or loss_from_config(cfg)
        self.clock: Callable[[], float] = time.monotonic
        raw = read_split(data_dir, "training", cfg.data.contrasts)
        if not raw:
            raise InputError(data_dir, "has no training scans")
        self.fingerprint = fingerprint(raw)
        # the model's preprocessing (registration, skull stripping), cached per scan
        self.entries = preprocess_entries(cfg.preprocess, raw, label_keys=task.label_keys,
                                          contrasts=cfg.data.contrasts)
        self.schedule = NoiseSchedule(**cfg.diffusion.model_dump())
        torch.manual_seed(cfg.train.seed)  # the same initial weights, hence EMA, on every rank
        self.net = build_network(cfg, task).to(self.device)
        if rank:
            torch.manual_seed(cfg.train.seed + rank)
        self.ema = EMA(self.net, decay=cfg.train.ema_decay)
        # fused: one kernel for every parameter's update on a GPU (the CPU keeps the default)
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=cfg.train.lr,
                                     weight_decay=cfg.train.weight_decay,
                                     fused=self.device.type == "cuda")
        self.generator = torch.Generator().manual_seed(cfg.train.seed * 1000 + rank)
        self.amp = amp_dtype(cfg, self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp == torch.float16)
        self.step, self.run_id, self.losses = 0, None, []
        self.dataset = None

    # -- checkpoints -------------------------------------------------------------------------
    def checkpoint_path(self) -> Path:
        return self.out_dir / CHECKPOINT

    def save(self) -> None:
        if self.rank != 0:
            return
        save_checkpoint(self.checkpoint_path(), {
            "step": self.step,
            "model": self.unwrapped().state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scaler": self.scaler.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "losses": torch.tensor(self.losses, dtype=torch.float32),
            "run_id": self.run_id or "",
            "world_size": self.world_size,
            "fingerprint": self.fingerprint,
        })

    def resume(self) -> bool:
        """Restore the last checkpoint if there is one; returns whether it did."""
        path = self.checkpoint_path()
        if not path.is_file():
            return False
        state = load_checkpoint(path)
        if int(state.get("world_size", 1)) != self.world_size:
            raise InputError(path, f"was written by a run with world size {state['world_size']}, "
                                   f"this run has {self.world_size}")
        self.unwrapped().load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self.step = int(state["step"])
        self.losses = [float(x) for x in state["losses"]]
        self.run_id = state.get("run_id") or None
        self.restart_stream()
        return True

    def restart_stream(self) -> None:
        """Under DDP, restart this rank's batch stream from (seed, rank, step) at a checkpoint.

        Only rank 0's generator state is in the checkpoint, so a resumed rank cannot continue
        its own stream; restarting every rank at each checkpoint keeps the ranks' batches apart
        and makes a resumed run draw what the uninterrupted one did.
        """
        if self.world_size > 1:
            seed = np.random.SeedSequence([self.cfg.train.seed, self.rank, self.step])
            self.generator.manual_seed(int(seed.generate_state(1)[0]))

    def unwrapped(self) -> torch.nn.Module:
        return getattr(self.net, "module", self.net)

    # -- one step ----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, timesteps: torch.Tensor,
                class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """The network's forward pass, under autocast when AMP is on (what the loss calls)."""
        autocast = (torch.autocast(self.device.type, dtype=self.amp) if self.amp
                    else contextlib.nullcontext())
        with autocast:
            return self.net(x, timesteps=timesteps, class_labels=class_labels)

    def loss_on(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = self.task.training_inputs(batch, self.cfg, self.generator)
        inputs = replace(inputs, **{key: getattr(inputs, key).to(self.device)
                                    for key in ("target", "condition", "class_labels")
                                    if getattr(inputs, key) is not None})
        return self.loss(self.forward, inputs, self.schedule, self.generator)

    def train_step(self, batch: dict[str, torch.Tensor]) -> float:
        for group in self.opt.param_groups:
            group["lr"] = self.cfg.train.lr * lr_factor(self.step, self.cfg)
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss_on(batch)
        self.scaler.scale(loss).backward()
        # read the loss once per step, after the backward pass is queued: on a GPU an earlier
        # read would stall the queue between the forward and backward passes
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"training loss became {value} at step {self.step}")
        if self.cfg.train.grad_clip:
            self.scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.cfg.train.grad_clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.ema.update(self.unwrapped())
        self.step += 1
        return value

    # -- the loop ----------------------------------------------------------------------------
    def load_data(self) -> None:
        keys = ("image", *self.task.label_keys)
        self.dataset = training_dataset(self.cfg.data, self.entries, keys=keys,
                                        num_workers=self.cfg.train.num_workers,
                                        context=self.task.slice_context(self.cfg))

    def run(self, on_checkpoint: Callable[[int], None] | None = None) -> TrainResult:
        if self.dataset is None:
            self.load_data()
        self.net.train()
        cfg = self.cfg.train
        started = saved = self.clock()
        seen, window = 0, []
        while self.step < cfg.steps:
            if cfg.max_minutes or cfg.checkpoint_minutes:
                now = self.clock()
                # every rank must stop (and checkpoint) at the same step, or the others wait
                # in DDP's all-reduce: one collective agrees on both
                stop, due = any_ranks(
                    [bool(cfg.max_minutes) and now - started > cfg.max_minutes * 60,
                     bool(cfg.checkpoint_minutes) and now - saved > cfg.checkpoint_minutes * 60],
                    self.device)
                if stop:
                    break
                if due and self.step > 0:
                    self._checkpoint(on_checkpoint)
                    saved = self.clock()
            loss = self.train_step(draw_batch(self.dataset, cfg.batch_size, self.generator))
            window.append(loss)
            seen += cfg.batch_size * self.world_size
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                self._log(window, seen / max(self.clock() - started, 1e-9))
                window = []
            if self.step % cfg.checkpoint_every == 0 and self.step < cfg.steps:
                self._checkpoint(on_checkpoint)
                saved = self.clock()
            if self.step % cfg.sample_every == 0 and self.rank == 0:
                self.log_preview()
        elapsed = self.clock() - started
        self.save()
        return TrainResult(self.out_dir, self.step, self.losses[-1] if self.losses else float("nan"),
                           elapsed, seen / max(elapsed, 1e-9), self.run_id, list(self.losses))

    def _checkpoint(self, on_checkpoint: Callable[[int], None] | None) -> None:
        self.save()
        self.restart_stream()
        if on_checkpoint:
            on_checkpoint(self.step)

    def _log(self, window: list[float], images_per_second: float) -> None:
        mean = float(np.mean(window)) if window else float("nan")
        self.losses.append(mean)
        lr = self.opt.param_groups[0]["lr"]
        metrics = {"loss": mean, "images_per_second": images_per_second, "lr": lr}
        if self.device.type == "cuda":
            metrics["gpu_peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        # train/...: the runs table groups and sorts them under one "train" prefix
        self.tracker.log_metrics({f"train/{k}": v for k, v in metrics.items()}, step=self.step)
        if self.progress:
            self.progress({"step": self.step, "total": self.cfg.train.steps, **metrics})

    def ema_network(self) -> torch.nn.Module:
        """A fresh network holding the EMA weights, on the trainer's device, in eval mode."""
        with torch.no_grad():
            net = build_network(self.cfg, self.task).to(self.device).eval()
            self.ema.copy_to(net)
        return net

    def log_preview(self, count: int = 4) -> None:
        """A grid of few-step samples from the EMA weights, logged as an image with its step."""
        if self.cfg.data.spatial_dims != 2:
            return
        net = self.ema_network()
        generator = torch.Generator().manual_seed(1234)
        with torch.no_grad():
            batch = draw_batch(self.dataset, count, generator)
            inputs = self.task.training_inputs(batch, self.cfg, generator)
        grid = preview_grid(net, inputs, self.schedule, self.cfg.trained_timesteps() - 1,
                            generator)
        self.tracker.log_image(grid, key="samples", step=self.step)

    def finish(self, calibration: dict[str, Any] | None = None) -> Path:
        """Write the model folder with the EMA weights."""
        net = build_network(self.cfg, self.task)
        self.ema.copy_to(net)
        info = {
            "steps": self.step,
            "final_loss": round(self.losses[-1], 6) if self.losses else None,
            "parameters": count_parameters(net),
            "data_fingerprint": self.fingerprint,
            "training_scans": len(self.entries),
            "device": str(self.device),
        }
        if self.run_id:
            info["mlflow_run_id"] = self.run_id
        return save_model_folder(self.out_dir, self.cfg, net.state_dict(), info, calibration)


def prepare_out_dir(out_dir: Path, resume: bool) -> None:
    """Refuse to train over an existing model unless resuming (nothing written is lost)."""
    if resume or not out_dir.exists():
        return
    if (out_dir / CHECKPOINT).exists() or (out_dir / "model.yaml").exists():
        raise InputError(out_dir, "already holds a model; pass --resume to continue it or "
                                  "choose another --out")


def _run_key(tracker: Tracker) -> dict[str, str]:
    return {"tracking_uri": redact(tracker.uri or ""), "experiment": tracker.experiment}


def record_run(out_dir: Path, tracker: Tracker, run_id: str) -> None:
    """Note the folder's MLflow run (atomically), for ``--resume`` to continue it."""
    atomic_write_text(out_dir / RUN_RECORD,
                      json.dumps({"mlflow_run_id": run_id, **_run_key(tracker)}, indent=1) + "\n")


def recorded_run(out_dir: Path, tracker: Tracker) -> str | None:
    """The run ``record_run`` noted, if it was in the same tracking store and experiment."""
    try:
        record = json.loads((out_dir / RUN_RECORD).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or any(record.get(k) != v for k, v in _run_key(tracker).items()):
        return None
    run_id = record.get("mlflow_run_id")
    return run_id if isinstance(run_id, str) and run_id else None


def run_training(cfg: Config, data_dir: str | Path, out_dir: str | Path, *, task: Any,
                 resume: bool = False, tracker: Tracker | None = None, progress=None,
                 nested: bool = False, rank: int = 0, world_size: int = 1, wrap=None,
                 loss: Loss | None = None) -> TrainResult:
    """Train, write the model folder and log it all to MLflow.

    ``task`` is the task object of ``cfg.task`` (``medidiff.tasks.registry.get_task``). With
    ``resume``, training continues from the last checkpoint (from step 0 if there is none yet)
    in the same MLflow run.
    """
    out_dir = Path(out_dir)
    prepare_out_dir(out_dir, resume)
    tracker = tracker or Tracker(enabled=False)
    trainer = Trainer(cfg, data_dir, out_dir, task=task, tracker=tracker, progress=progress,
                      rank=rank, world_size=world_size, loss=loss)
    resumed = trainer.resume() if resume else False
    if resume and tracker.enabled and not trainer.run_id:  # killed before its first checkpoint
        trainer.run_id = recorded_run(out_dir, tracker)
    if wrap is not None:
        trainer.net = wrap(trainer.net)
    out_dir.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        atomic_write_text(out_dir / "config.yaml", dump_config(cfg))
    tags = {"task": cfg.task, "stage": "train", "data_fingerprint": trainer.fingerprint,
            "resumed": str(resumed)}
    with tracker.run(f"train-{cfg.task}-{cfg.name}", nested=nested, tags=tags,
                     run_id=trainer.run_id, system_metrics=True) as run_id:
        trainer.run_id = run_id
        if run_id and rank == 0:
            record_run(out_dir, tracker, run_id)
            data = Path(data_dir).resolve()
            tracker.log_dataset(data.name or "training", trainer.fingerprint, data, "training")
        if not resumed:
            tracker.log_params({**cfg.to_dict(), "effective_batch_size":
                                cfg.train.batch_size * world_size, "world_size": world_size,
                                "training_scans": len(trainer.entries)})
            tracker.log_artifact(out_dir / "config.yaml")
        try:
            result = trainer.run()
        except KeyboardInterrupt:
            trainer.save()
            raise
        if rank != 0:
            return result
        trainer.finish()
        if trainer.losses:
            curve = loss_curve(trainer.losses, cfg.train.log_every, out_dir / "loss.png")
            tracker.log_artifact(curve)
        tracker.log_metrics({"final_loss": result.final_loss,
                             "train_images_per_second": result.images_per_second,
                             "train_seconds": result.seconds}, step=result.steps)
        result.model_id = tracker.log_model_folder(out_dir)
    return result
