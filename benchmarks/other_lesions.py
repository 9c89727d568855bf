"""Lesions the example-data generator does not make, on scans the model never saw.

Starts from the healthy test scans of the example data and writes, with their masks: a
hypo-intense cuboid with sharp edges, two small textured hyper-intense spheres, and an irregular
blob brightened by 30% of the brain's 99th percentile (brighter than white matter), plus two
unchanged healthy copies. Score and evaluate them with the CLI as a user would:

    python benchmarks/other_lesions.py --out benchmarks/work/other
    medidiff anomaly calibrate --model MODEL --data benchmarks/work/data --no-tracking
    for m in diffusion zscore threshold; do
      medidiff anomaly score --model MODEL --method $m --out benchmarks/work/other/$m \\
          --no-tracking benchmarks/work/other/scans
      medidiff anomaly evaluate --pred benchmarks/work/other/$m \\
          --labels benchmarks/work/other/masks --no-tracking
    done
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from medidiff.data.datasets import read_split  # noqa: E402


def brain(x: np.ndarray) -> np.ndarray:
    """Voxels well inside the brain (eroded above the 30th percentile of the non-zero ones)."""
    return ndi.binary_erosion(x > np.percentile(x[x > 0], 30), iterations=4)


def ball(shape, centre, radius: float) -> np.ndarray:
    grid = np.indices(shape).transpose(1, 2, 3, 0)
    return ((grid - np.asarray(centre)) ** 2).sum(-1) <= radius**2


def lesioned(kind: str, x: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    b = brain(x)
    centre = np.argwhere(b).mean(0).astype(int)
    y, p99 = x.copy(), np.percentile(x[b], 99)
    if kind == "cuboid":  # hypo-intense, sharp edges
        c = centre + (12, 8, 6)
        m = np.zeros(x.shape, bool)
        m[c[0] - 6:c[0] + 6, c[1] - 5:c[1] + 5, c[2] - 4:c[2] + 4] = True
        m &= b
        y[m] *= 0.35
    elif kind == "spheres":  # two small hyper-intense spheres with texture
        m = (ball(x.shape, centre + (-15, 5, 4), 4) | ball(x.shape, centre + (10, -12, -3), 4)) & b
        texture = ndi.gaussian_filter(rng.standard_normal(x.shape), 1.5)
        y[m] = 0.9 * p99 + 0.15 * p99 * texture[m] / texture[m].std()
    else:  # irregular blob, brighter than white matter
        region = ball(x.shape, centre + (-8, -10, 8), 9)
        noise = ndi.gaussian_filter(rng.standard_normal(x.shape), 3)
        m = ndi.binary_opening(region & (noise > np.percentile(noise[region], 40)) & b)
        y[m] += 0.3 * p99
    return y, m


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO / "benchmarks" / "work" / "data")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "work" / "other")
    parser.add_argument("--seed", type=int, default=123)
    args = parser.parse_args()
    healthy = [e for e in read_split(args.data, "test")
               if not np.asarray(nib.load(e["mask"]).dataobj).any()]
    if len(healthy) < 3:
        sys.exit(f"{args.data}: needs 3 healthy test scans, found {len(healthy)}")
    rng = np.random.default_rng(args.seed)
    (args.out / "scans").mkdir(parents=True, exist_ok=True)
    (args.out / "masks").mkdir(parents=True, exist_ok=True)
    jobs = [("cuboid", healthy[0]), ("spheres", healthy[1]), ("blob", healthy[2]),
            ("healthy1", healthy[0]), ("healthy2", healthy[1])]
    for kind, entry in jobs:
        img = nib.load(entry["image"])
        x = np.asarray(img.dataobj).astype(np.float32)
        y, m = (x, np.zeros(x.shape, bool)) if kind.startswith("healthy") else lesioned(kind, x, rng)
        nib.save(nib.Nifti1Image(y, img.affine), args.out / "scans" / f"{kind}.nii.gz")
        nib.save(nib.Nifti1Image(m.astype(np.uint8), img.affine),
                 args.out / "masks" / f"{kind}.nii.gz")
        print(f"{kind:9s} from {Path(entry['image']).name}: {int(m.sum())} lesion voxels")


if __name__ == "__main__":
    main()
