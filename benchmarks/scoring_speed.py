"""CPU scoring speed: inference backends side by side, the fixed cost per scan, the presets.

One process, one model, the same test scans. Every backend scores every scan in turn (rounds
interleave the backends, so that other work on a shared machine slows them alike) through
``AnomalyDetector.predict_files``, the path ``medidiff anomaly score`` takes: reading,
preprocessing (registration where the model registers), the network, median filter,
standardisation, the way back to the scan's space, figure and NIfTI writing. The network's own
time is clocked inside the fixed-size batch, so each scan's time splits into preprocessing,
network and the rest (the fixed cost). Maps are compared with eager PyTorch's on the model grid:
the largest difference relative to eager's range, and whether the masks at the calibrated
threshold are identical.

    OMP_NUM_THREADS=2 python benchmarks/scoring_speed.py --model demo/model --data demo/data \
        --write-docs

Results go to benchmarks/results/scoring-speed.json and, with --write-docs, docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
warnings.filterwarnings("ignore")

from benchmarks._common import machine, write_section  # noqa: E402
from medidiff.api import AnomalyDetector  # noqa: E402
from medidiff.data.datasets import read_split  # noqa: E402
from medidiff.inference.backends import available  # noqa: E402
from medidiff.preprocess.cache import cache_root  # noqa: E402
from medidiff.tasks.anomaly.scoring import nfe_per_slice  # noqa: E402


class Clocked(torch.nn.Module):
    """A network (module or exported graph) that adds up the time spent in it."""

    def __init__(self, net):
        super().__init__()
        self.net, self.seconds = net, 0.0

    def forward(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return self.net(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - started


def detector_for(model: Path, backend: str, preset: str | None) -> AnomalyDetector:
    detector = AnomalyDetector.load(model, device="cpu", backend=backend, preset=preset)
    detector.net.net = Clocked(detector.net.net)
    return detector


def score_one(detector: AnomalyDetector, scan: Path, out: Path) -> dict:
    """Score one file as the CLI does; seconds split into preprocessing, network and the rest."""
    clock = detector.net.net
    clock.seconds = 0.0
    prepare = detector.prepare_file
    spent = {"preprocess": 0.0}

    def timed_prepare(path):
        started = time.perf_counter()
        try:
            return prepare(path)
        finally:
            spent["preprocess"] += time.perf_counter() - started

    predict, kept = detector.predict, {}

    def keeping_predict(prep, progress=None):
        kept["result"] = predict(prep, progress)
        return kept["result"]

    detector.prepare_file, detector.predict = timed_prepare, keeping_predict
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(cache_root(), ignore_errors=True)  # a new scan: registered, not cached
    started = time.perf_counter()
    outcome = detector.predict_files([scan], out)[0]
    total = time.perf_counter() - started
    detector.prepare_file, detector.predict = prepare, predict
    if outcome.status != "done":
        raise RuntimeError(f"{scan}: {outcome.status} {outcome.message}")
    return {"total": total, "network": clock.seconds, "preprocess": spent["preprocess"],
            "fixed": total - clock.seconds - spent["preprocess"], "grid": kept["result"].grid}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO / "demo" / "model")
    parser.add_argument("--data", type=Path, default=REPO / "demo" / "data")
    parser.add_argument("--scans", type=int, default=3, help="test scans scored per backend")
    parser.add_argument("--backends", nargs="+", default=["eager", "compile", "onnx", "openvino"])
    parser.add_argument("--presets", nargs="*", default=["fast"],
                        help="presets also timed (with the fastest backend)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" /
                        "scoring-speed.json")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    os.environ["MEDIDIFF_CACHE"] = tempfile.mkdtemp(prefix="medidiff-speed-cache-")

    backends = [b for b in args.backends if available(b)]
    scans = [args.data / e["image"] for e in read_split(args.data, "test")[:args.scans]]
    work = Path(tempfile.mkdtemp(prefix="medidiff-speed-"))
    runs = {b: detector_for(args.model, b, None) for b in backends}
    # first calls: torch.compile compiles, onnx/openvino export (cached in the model folder)
    first = {}
    for name, detector in runs.items():
        started = time.perf_counter()
        score_one(detector, scans[0], work / "warm")
        first[name] = time.perf_counter() - started
    results = {name: [] for name in runs}
    for scan in scans:  # interleaved: scan by scan, every backend
        for name, detector in runs.items():
            results[name].append(score_one(detector, scan, work / name))
            print(f"{name:9s} {scan.name}: {results[name][-1]['total']:.1f} s", flush=True)
    eager = results.get("eager")
    rows = []
    entry = runs[backends[0]].entry
    threshold = entry["voxel_threshold"] if entry else None
    for name, timings in results.items():
        row = summary(name, timings, first[name], nfe_per_slice(runs[name].settings, "diffusion"))
        if eager is not None:
            row.update(compare(timings, eager, threshold))
        rows.append(row)
    fastest = min(rows, key=lambda r: r["seconds_per_scan"])["backend"]
    for preset in args.presets:
        detector = detector_for(args.model, fastest, preset)
        score_one(detector, scans[0], work / "warm")
        timings = [score_one(detector, scan, work / preset) for scan in scans]
        rows.append({**summary(fastest, timings, None, nfe_per_slice(detector.settings,
                                                                    "diffusion")),
                     "preset": preset})
    shutil.rmtree(work, ignore_errors=True)
    record = {"machine": machine(), "model": str(args.model), "scans": [s.name for s in scans],
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    table = markdown(record, rows)
    print(table)
    if args.write_docs:
        write_section("scoring-speed", table, title="Scoring speed on the CPU")


def summary(name: str, timings: list[dict], first: float | None, nfe: int) -> dict:
    med = {k: statistics.median(t[k] for t in timings)
           for k in ("total", "network", "preprocess", "fixed")}
    return {"backend": name, "preset": "default", "nfe_per_slice": nfe,
            "seconds_per_scan": med["total"], "network_seconds": med["network"],
            "preprocess_seconds": med["preprocess"], "fixed_seconds": med["fixed"],
            "first_scan_seconds": first}


def compare(timings: list[dict], eager: list[dict], threshold: float | None) -> dict:
    worst, same = 0.0, True
    for mine, ref in zip(timings, eager, strict=True):
        a, b = mine["grid"].anomaly_map, ref["grid"].anomaly_map
        worst = max(worst, float(np.abs(a - b).max() / max(float(b.max() - b.min()), 1e-12)))
        if threshold is not None:
            same &= bool(np.array_equal(a >= threshold, b >= threshold))
    return {"max_diff_over_range": worst, "same_masks": same}


def markdown(record: dict, rows: list[dict]) -> str:
    eager = next((r for r in rows if r["backend"] == "eager" and r["preset"] == "default"), None)
    lines = [f"Machine: {record['machine']}. Model: `{record['model']}`; {len(record['scans'])} "
             f"raw test scans ({', '.join(record['scans'])}), each scored from its file as "
             f"`medidiff anomaly score` does (median over scans). Command: `python "
             f"benchmarks/scoring_speed.py {' '.join(sys.argv[1:])}`.", "",
             "| backend | preset | NFE/slice | s/scan | network s | preprocessing s | fixed s | "
             "speed-up over eager | max map diff / range | same masks | first scan s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = eager["seconds_per_scan"] / r["seconds_per_scan"] if eager else float("nan")
        diff, first = r.get("max_diff_over_range"), r["first_scan_seconds"]
        lines.append(
            f"| {r['backend']} | {r['preset']} | {r['nfe_per_slice']} | "
            f"{r['seconds_per_scan']:.1f} | {r['network_seconds']:.1f} | "
            f"{r['preprocess_seconds']:.1f} | {r['fixed_seconds']:.2f} | {ratio:.2f} | "
            f"{'-' if diff is None else f'{diff:.1e}'} | "
            f"{'-' if 'same_masks' not in r else ('yes' if r['same_masks'] else 'no')} | "
            f"{'-' if first is None else f'{first:.0f}'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
