"""Time per epoch of the training data pipeline: no cache vs the on-disk PersistentDataset cache.

Builds a BraTS-2021-layout site in a temporary folder, either by byte-copying the real case
BraTS2021_00006 (default: realistic gzip decode cost, 240x240x155) or by writing synthetic
gzip NIfTI volumes with nibabel (``--source synthetic``), then iterates the ``SegDataModule``
training loader: ``--epochs`` epochs without cache, then one cold and ``--epochs`` warm epochs
with the cache. Prints the seconds per epoch and the ratios, all measured in this one run.

    .venv/bin/python bench/bench_cache.py                      # ~1-2 min on 2 cores
    .venv/bin/python bench/bench_cache.py --cases 16 --epochs 3 --workers 1

Note: the OS page cache holds both the sources and the cache files after their first read, so
this compares decode + preprocessing against reading a tensor file, not disk speeds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from fedseg.lightning_modules.data.datalist import MODALITIES, Case, Datalist
from fedseg.lightning_modules.data.datamodule import DataConfig, SegDataModule
from fedseg.lightning_modules.data.transforms import PreprocessConfig

REAL_CASE = "BraTS2021_00006"


def default_real_root() -> Path:
    shared = Path(os.environ.get("FEDSEG_SHARED", Path(__file__).resolve().parents[2] / "shared"))
    return shared / "data" / "real"


def copy_real_cases(real_root: Path, root: Path, n: int) -> list[Case]:
    """``n`` byte copies of the real case under new case ids (same decode cost per case)."""
    cases = []
    for i in range(n):
        cid = f"BraTS2021_{90000 + i:05d}"
        (root / cid).mkdir(parents=True)
        for suffix in (*MODALITIES, "seg"):
            shutil.copyfile(real_root / REAL_CASE / f"{REAL_CASE}_{suffix}.nii.gz", root / cid / f"{cid}_{suffix}.nii.gz")
        images = tuple(f"{cid}/{cid}_{m}.nii.gz" for m in MODALITIES)
        cases.append(Case(cid, images, MODALITIES, f"{cid}/{cid}_seg.nii.gz", "brats2021"))
    return cases


def write_synthetic_cases(root: Path, n: int, size: int, seed: int = 0) -> list[Case]:
    """``n`` cases of ``size``^3 int16 images (noisy brain ellipsoid) and a 1/2/4 label, gzip NIfTI."""
    rng = np.random.default_rng(seed)
    grid = np.indices((size,) * 3).astype(np.float32) / size - 0.5
    brain = (grid**2 / np.array([0.4, 0.45, 0.4])[:, None, None, None] ** 2).sum(0) < 1
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    cases = []
    for i in range(n):
        cid = f"BraTS2021_{80000 + i:05d}"
        (root / cid).mkdir(parents=True)
        centre = rng.uniform(-0.15, 0.15, 3)[:, None, None, None]
        dist = np.sqrt(((grid - centre) ** 2).sum(0))
        label = np.select([dist < 0.05, dist < 0.1, dist < 0.18], [4, 1, 2], 0).astype(np.uint8) * brain
        nib.save(nib.Nifti1Image(label, affine), root / cid / f"{cid}_seg.nii.gz")
        for m in MODALITIES:
            img = (rng.normal(400, 60, brain.shape) * brain + 150 * (label > 0)).astype(np.int16)
            nib.save(nib.Nifti1Image(img, affine), root / cid / f"{cid}_{m}.nii.gz")
        images = tuple(f"{cid}/{cid}_{m}.nii.gz" for m in MODALITIES)
        cases.append(Case(cid, images, MODALITIES, f"{cid}/{cid}_seg.nii.gz", "brats2021"))
    return cases


def time_epoch(dm: SegDataModule) -> float:
    start = time.perf_counter()
    n = 0
    for batch in dm.train_dataloader():
        n += batch["image"].shape[0]
    assert n > 0
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--source", choices=("real", "synthetic"), default="real")
    p.add_argument("--real-root", type=Path, default=default_real_root())
    p.add_argument("--cases", type=int, default=4)
    p.add_argument("--size", type=int, default=96, help="synthetic volume side (voxels)")
    p.add_argument("--epochs", type=int, default=2, help="uncached epochs, and warm cached epochs")
    p.add_argument("--roi", type=int, default=128)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--tmp", type=Path, default=None, help="parent folder of the temporary site")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="fedseg-bench-", dir=args.tmp) as tmp:
        root, cache = Path(tmp) / "data", Path(tmp) / "cache"
        t0 = time.perf_counter()
        if args.source == "real":
            if not (args.real_root / REAL_CASE).is_dir():
                p.error(f"{args.real_root / REAL_CASE} not found (use --source synthetic or --real-root)")
            cases = copy_real_cases(args.real_root, root, args.cases)
            what = f"{args.cases} copies of {REAL_CASE} (240x240x155 x 4 modalities + seg, gzip)"
        else:
            cases = write_synthetic_cases(root, args.cases, args.size)
            what = f"{args.cases} synthetic cases {args.size}^3 x 4 modalities + seg (gzip)"
        print(f"site: {what}; written in {time.perf_counter() - t0:.1f} s")

        datalist = Datalist(cases, [], root)
        roi = min(args.roi, args.size) if args.source == "synthetic" else args.roi
        base = DataConfig(
            preprocess=PreprocessConfig(roi_size=(roi,) * 3),
            batch_size=1,
            num_workers=args.workers,
            cache_dir=cache,
        )
        plain = SegDataModule(datalist, DataConfig(**{**base.__dict__, "use_cache": False}))
        cached = SegDataModule(datalist, base)

        plain_times = [time_epoch(plain) for _ in range(args.epochs)]
        cold = time_epoch(cached)
        warm_times = [time_epoch(cached) for _ in range(args.epochs)]
        cache_mb = sum(f.stat().st_size for f in cache.glob("*.pt")) / 2**20

    plain_s, warm_s = float(np.mean(plain_times)), float(np.mean(warm_times))
    n = args.cases
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"train loader, roi {roi}^3, batch 1, workers {args.workers}, torch threads {_threads()}, "
          f"{os.cpu_count()} CPUs, load average {load} (other jobs on the machine skew the numbers)")
    print(f"  no cache      : {_fmt(plain_times)} s/epoch  ({plain_s / n:.2f} s/case)")
    print(f"  cache, cold   : {cold:.2f} s/epoch  ({cold / n:.2f} s/case)")
    print(f"  cache, warm   : {_fmt(warm_times)} s/epoch  ({warm_s / n:.2f} s/case)")
    print(f"  cache on disk : {cache_mb:.0f} MiB ({cache_mb / n:.1f} MiB/case)")
    print(f"  speed-up warm vs no cache: {plain_s / warm_s:.1f}x;  cold epoch costs {cold / plain_s:.2f}x a plain one")
    return 0


def _fmt(times: list[float]) -> str:
    return ", ".join(f"{t:.2f}" for t in times)


def _threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    sys.exit(main())
