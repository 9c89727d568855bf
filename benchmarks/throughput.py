"""Training and scoring throughput: medidiff's Trainer against a plain MONAI loop, on any device.

Training, in images/s: ``Trainer.train_step`` (learning-rate schedule, gradient clipping, EMA,
AMP on GPU) against a plain loop over the same ``DiffusionModelUNet`` built from the same config,
fed the same pre-drawn batches on the same device: AdamW, MONAI's ``DDPMScheduler.add_noise``,
MSE on the noise, no EMA. The two alternate in rounds, so that other work on a shared machine
slows both alike, and each reports its median round. On CUDA both also run under autocast (AMP:
bf16 where supported, else fp16) beside fp32.

Scoring, in slices/s: ``AnomalyDetector.score_grid`` on preprocessed test volumes (the slices
with foreground, each costing levels x draws x steps network evaluations), with the network just
benchmarked. Weights do not change speed, so no trained model is needed.

Peak memory: ``torch.cuda.max_memory_allocated`` on GPU; on CPU the process's peak resident set
size while the loop runs (sampled every 10 ms; both networks and the data stay loaded).

    OMP_NUM_THREADS=1 python benchmarks/throughput.py --steps 4 --rounds 3 --write-docs

Results go to benchmarks/results/throughput.json and, with --write-docs, into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import psutil
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
warnings.filterwarnings("ignore")  # MONAI's deprecation notes would bury the numbers

from benchmarks._common import write_section  # noqa: E402
from medidiff.api import AnomalyDetector  # noqa: E402
from medidiff.config import load_config  # noqa: E402
from medidiff.data.datasets import read_split  # noqa: E402
from medidiff.diffusion.schedule import NoiseSchedule  # noqa: E402
from medidiff.models.folder import build_network  # noqa: E402
from medidiff.runtime import amp_dtype  # noqa: E402
from medidiff.tasks.registry import get_task  # noqa: E402
from medidiff.tracking.tracker import device_name  # noqa: E402
from medidiff.training.trainer import Trainer, draw_batch  # noqa: E402


class PeakMemory:
    """Peak memory while a block runs: CUDA allocations on GPU, sampled process RSS on CPU."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0

    @contextlib.contextmanager
    def measure(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            yield
            torch.cuda.synchronize()
            self.peak = max(self.peak, torch.cuda.max_memory_allocated())
            return
        process, done = psutil.Process(), threading.Event()

        def sample() -> None:
            while not done.is_set():
                self.peak = max(self.peak, process.memory_info().rss)
                done.wait(0.01)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            yield
        finally:
            done.set()
            sampler.join()


class PlainLoop:
    """The reference: MONAI's UNet and DDPMScheduler with AdamW and an MSE loss, nothing else."""

    def __init__(self, cfg, device: torch.device, amp: torch.dtype | None, weights: dict):
        self.device, self.amp = device, amp
        self.net = build_network(cfg, get_task(cfg.task)).to(device)
        self.net.load_state_dict(weights)
        self.scheduler = NoiseSchedule(**cfg.diffusion.model_dump()).to_monai()
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=cfg.train.lr,
                                     weight_decay=cfg.train.weight_decay)
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)

    def train_step(self, batch: dict[str, torch.Tensor]) -> float:
        x0 = batch["image"].to(self.device)
        noise = torch.randn_like(x0)
        t = torch.randint(0, self.scheduler.num_train_timesteps, (x0.shape[0],),
                          device=self.device)
        x_t = self.scheduler.add_noise(x0, noise, t)
        autocast = (torch.autocast(self.device.type, dtype=self.amp) if self.amp
                    else contextlib.nullcontext())
        with autocast:
            pred = self.net(x_t, timesteps=t)
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        return float(loss.detach())


def ensure_data(data: Path) -> None:
    if not (data / "dataset.json").is_file():
        subprocess.run([sys.executable, "-m", "medidiff", "data", "example", str(data)], check=True)


def timed_steps(loop, batches: list[dict], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for batch in batches:
        loop.train_step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def training(cfg, data: Path, work: Path, device: torch.device, args) -> tuple[list[dict], Trainer]:
    """Every loop's images/s (median round) and peak memory; returns the rows and a trainer."""
    precisions = {"fp32": "off"}
    if device.type == "cuda":
        precisions = {"amp": "auto", "fp32": "off"}
    loops, trainer = {}, None
    for name, mode in precisions.items():
        pcfg = cfg.model_copy(deep=True)
        pcfg.train.amp, pcfg.train.device = mode, str(device)
        trainer = Trainer(pcfg, data, work / f"model-{name}", task=get_task(pcfg.task))
        amp = amp_dtype(pcfg, device)
        label = f"{name} ({str(amp).replace('torch.', '')})" if amp else name
        loops[("medidiff Trainer.train_step", label)] = trainer
        loops[("plain MONAI loop", label)] = PlainLoop(pcfg, device, amp,
                                                       trainer.unwrapped().state_dict())
    trainer.load_data()
    generator = torch.Generator().manual_seed(0)
    size = cfg.train.batch_size
    batches = [draw_batch(trainer.dataset, size, generator)
               for _ in range(args.warmup + args.rounds * args.steps)]
    warm, timed = batches[:args.warmup], batches[args.warmup:]
    memory = {key: PeakMemory(device) for key in loops}
    for key, loop in loops.items():
        with memory[key].measure():
            timed_steps(loop, warm, device)
    seconds = {key: [] for key in loops}
    for r in range(args.rounds):
        block = timed[r * args.steps:(r + 1) * args.steps]
        order = list(loops.items())
        for key, loop in (order if r % 2 == 0 else order[::-1]):  # neither always goes first
            with memory[key].measure():
                seconds[key].append(timed_steps(loop, block, device))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{k[0].split()[0]} {k[1]} {args.steps * size / s[-1]:.1f} img/s"
            for k, s in seconds.items()), flush=True)
    rows = []
    for (loop, precision), times in seconds.items():
        median = statistics.median(times)
        rows.append({"loop": loop, "precision": precision,
                     "images_per_second": args.steps * size / median,
                     "ms_per_step": 1000 * median / args.steps,
                     "rounds_images_per_second": [args.steps * size / t for t in times],
                     "peak_memory_gb": memory[(loop, precision)].peak / 2**30})
    return rows, trainer


def scoring(trainer: Trainer, data: Path, device: torch.device, args) -> dict:
    """slices/s of AnomalyDetector.score_grid on preprocessed test volumes."""
    folder = trainer.finish()
    detector = AnomalyDetector.load(folder, device=str(device))
    scans = [e["image"] for e in read_split(data, "test")][:args.score_volumes]
    volumes = [detector.prepare_file(Path(scan)).image for scan in scans]
    axis = detector.cfg.data.slice_axis
    middle = volumes[0].shape[axis + 1] // 2
    detector.score_grid(volumes[0].narrow(axis + 1, middle - 2, 4))  # warm-up on 4 slices
    memory, times, slices = PeakMemory(device), [], 0
    for volume in volumes:
        with memory.measure():
            started = time.perf_counter()
            grid = detector.score_grid(volume)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        other = tuple(d for d in range(grid.foreground.ndim) if d != axis)
        slices += int(grid.foreground.any(axis=other).sum())
    settings = detector.settings
    return {"slices_per_second": slices / sum(times), "slices": slices,
            "volumes": len(volumes), "seconds": sum(times),
            "evaluations_per_slice": len(settings.noise_levels) * settings.draws * settings.steps,
            "settings": settings.describe(), "peak_memory_gb": memory.peak / 2**30}


def markdown(result: dict) -> str:
    lines = [result["header"], "",
             "| loop | precision | images/s | ms/step | peak memory (GiB) |",
             "|---|---|---:|---:|---:|"]
    for row in result["training"]:
        lines.append(f"| {row['loop']} | {row['precision']} | {row['images_per_second']:.1f} | "
                     f"{row['ms_per_step']:.0f} | {row['peak_memory_gb']:.2f} |")
    lines += ["", *(f"- {line}" for line in result["ratios"])]
    s = result["scoring"]
    lines += [f"- Scoring (`AnomalyDetector.score_grid`, {s['settings']['sampler']} sampler, "
              f"{s['evaluations_per_slice']} network evaluations per slice): "
              f"**{s['slices_per_second']:.2f} slices/s** ({s['slices']} foreground slices of "
              f"{s['volumes']} volume(s) in {s['seconds']:.1f} s), peak memory "
              f"{s['peak_memory_gb']:.2f} GiB."]
    return "\n".join(lines)


def ratios(rows: list[dict]) -> list[str]:
    by_key = {(r["loop"].split()[0], r["precision"].split()[0]): r for r in rows}
    speed = {key: r["images_per_second"] for key, r in by_key.items()}
    rounds = {key: r["rounds_images_per_second"] for key, r in by_key.items()}
    lines = []
    for precision in ("fp32", "amp"):
        if ("medidiff", precision) in speed:
            ratio = speed[("medidiff", precision)] / speed[("plain", precision)]
            # the two loops ran back to back in each round: their ratio there shares the load
            paired = [a / b for a, b in zip(rounds[("medidiff", precision)],
                                            rounds[("plain", precision)], strict=True)]
            lines.append(f"medidiff / plain MONAI training throughput, {precision}: "
                         f"**{ratio:.3f}** (ratio of the median rounds; round by round "
                         f"{min(paired):.2f} to {max(paired):.2f}, median "
                         f"{statistics.median(paired):.2f})")
    if ("medidiff", "amp") in speed:
        lines.append(f"AMP / fp32 speed-up, medidiff: "
                     f"**{speed[('medidiff', 'amp')] / speed[('medidiff', 'fp32')]:.2f}**")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path,
                        default=REPO / "configs" / "anomaly" / "cpu-small.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="config override, e.g. train.batch_size=32")
    parser.add_argument("--data", type=Path, default=REPO / "benchmarks" / "work" / "data")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--steps", type=int, default=5, help="training steps per timed round")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per loop")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per loop first")
    parser.add_argument("--score-volumes", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="results JSON [default: "
                        "benchmarks/results/throughput.json, throughput-cuda.json on a GPU]")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()

    ensure_data(args.data)
    load = os.getloadavg()[0]
    cfg = load_config(args.config, args.overrides)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    # one docs section and results file per device kind: a GPU run keeps the CPU numbers
    section = "throughput" if device.type == "cpu" else f"throughput-{device.type}"
    args.out = args.out or REPO / "benchmarks" / "results" / f"{section}.json"
    with tempfile.TemporaryDirectory() as work:
        rows, trainer = training(cfg, args.data, Path(work), device, args)
        score = scoring(trainer, args.data, device, args)
    config = args.config.resolve()
    config = config.relative_to(REPO) if config.is_relative_to(REPO) else config
    omp = os.environ.get("OMP_NUM_THREADS")
    threads = f"OMP_NUM_THREADS={omp} " if omp else ""
    command = f"{threads}python benchmarks/throughput.py " + " ".join(sys.argv[1:])
    shared = (f" The CPU was shared with other work while this ran (load average {load:.1f} on "
              f"{os.cpu_count()} cores at the start), so the numbers are noisy; the loops "
              "alternate round by round to be slowed alike." if device.type == "cpu" else "")
    header = (f"Machine: {device_name()} ({device.type}, {torch.get_num_threads()} threads, "
              f"torch {torch.__version__}). Config `{config}`"
              f"{' ' + ' '.join(args.overrides) if args.overrides else ''}: "
              f"{cfg.data.size[0]}x{cfg.data.size[1]} slices, batch {cfg.train.batch_size}; "
              f"{args.rounds} timed rounds of {args.steps} steps per loop after {args.warmup} "
              f"warm-up steps, median round shown. Command: `{command}`.{shared}")
    result = {"header": header, "device": device.type, "machine": device_name(),
              "training": rows, "ratios": ratios(rows), "scoring": score}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    text = markdown(result)
    print(text)
    if args.write_docs:
        write_section(section, text, title=None if device.type == "cpu"
                      else f"Throughput on {device.type.upper()}")


if __name__ == "__main__":
    main()
