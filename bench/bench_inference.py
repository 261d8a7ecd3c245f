"""Whole-case inference as ``fedseg predict`` runs it, per network, split into its parts.

For each network (default: the study's U-Net and SegResNet, 16 features, the study's 128³ sliding
window) a fresh untrained checkpoint is written to a temp dir in the format ``fedseg train`` writes
(no weights can be downloaded; timing does not depend on the weights, except a little the writing
of the label file, whose foreground share is printed). Then, per network and repeat, a **subprocess**
runs ``fedseg predict CKPT CASE --out TMP --device DEVICE`` through fedseg's own CLI entry point
(``fedseg.cli.main``), so it pays the imports and start-up that command pays. Inside it, timers are
wrapped around the product's own functions, which run unchanged:

=================  ==========================================================================
imports            torch, MONAI, nibabel, fedseg (from the child's first line)
load model         ``inference.load_model`` (checkpoint -> ``TrainedNetwork`` in eval mode)
discover           ``find_cases`` (the case folder's files)
load+preprocess    ``CasePredictor.preprocess``: reading the NIfTI files and the "predict" transforms
network            ``LoadedModel.segment``: sliding-window inference over the whole volume
resample           ``CasePredictor.to_source_grid``: MONAI ``Invertd`` back onto the source grid
write              ``inference.write_label``: the gzip NIfTI
other              the rest of ``predict_cases`` (reference header, label conversion, counts)
case               ``predict_cases`` in all (the four parts above and "other")
rest               interpreter start-up, building the CLI parser, exit: process - the rest of the row
process            the subprocess' whole wall time, measured by the parent
                   (= imports + load model + discover + case + rest)
=================  ==========================================================================

Repeats are interleaved (network order reversed every other repeat); medians are reported, with
the network's share of the case and of the process, the ratio to the earlier hand measurements on
2 CPU cores (``REFERENCE_SECONDS``: whole process) and the SegResNet / U-Net ratio of this run.

    .venv/bin/python bench/bench_inference.py                   # CPU, unet + segresnet, ~2-3 min on 2 cores
    .venv/bin/python bench/bench_inference.py --networks unet --repeats 3
    .venv/bin/python bench/bench_inference.py --device cuda --repeats 3
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()  # the child's "imports" count from here

import argparse  # noqa: E402 - after the clock starts
import functools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from collections import defaultdict  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CASE = "BraTS2021_00006"
#: earlier hand measurements: whole ``fedseg predict`` process per case, 2 CPU cores, study settings
REFERENCE_SECONDS = {"unet": 12.0, "segresnet": 49.0}
PARTS: tuple[str, ...] = ("imports", "load model", "discover", "load+preprocess", "network", "resample", "write",
                          "other", "case", "rest", "process")
#: the parts that add up to the process' time
TOP_LEVEL: tuple[str, ...] = ("imports", "load model", "discover", "case")


def default_case() -> Path:
    """``$FEDSEG_SHARED/data/real/<case>``, else ``<repo>/../shared/data/real/<case>``."""
    shared = Path(os.environ["FEDSEG_SHARED"]) if os.environ.get("FEDSEG_SHARED") else REPO.parent / "shared"
    return shared / "data" / "real" / DEFAULT_CASE


# --------------------------------------------------------------------------------------------
# child: one `fedseg predict` with timers


def timed(owner: Any, name: str, part: str, times: dict[str, float],
          on_result: Callable[[Any], None] | None = None) -> None:
    """Replace ``owner.name`` (a function or method) by a wrapper adding its wall time to ``times[part]``."""
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            result = original(*args, **kwargs)
        finally:
            times[part] += time.perf_counter() - start
        if on_result is not None:
            on_result(result)
        return result

    setattr(owner, name, wrapper)


def run_child(args: argparse.Namespace) -> int:
    """Run ``fedseg predict`` in this process with the product's functions timed; write the timings as JSON."""
    import fedseg.cli
    from fedseg.cli import predict as predict_cli
    from fedseg.lightning_modules import inference

    times: dict[str, float] = defaultdict(float)
    times["imports"] = time.perf_counter() - STARTED
    info: dict[str, Any] = {}

    def preprocessed(item: dict[str, Any]) -> None:
        info["preprocessed_shape"] = list(item["image"].shape)

    def written(predictions: list[Any]) -> None:
        p = predictions[0]
        info["source_shape"] = list(p.shape)
        info["foreground"] = 1 - p.voxels.get(0, 0) / math.prod(p.shape)

    timed(inference, "load_model", "load model", times)
    timed(predict_cli, "find_cases", "discover", times)
    timed(inference.CasePredictor, "preprocess", "load+preprocess", times, preprocessed)
    timed(inference.LoadedModel, "segment", "network", times)
    timed(inference.CasePredictor, "to_source_grid", "resample", times)
    timed(inference, "write_label", "write", times)
    timed(inference, "predict_cases", "case", times, written)

    argv = ["predict", str(args.checkpoint), str(args.case), "--out", str(args.out), "--device", args.device]
    rc = fedseg.cli.main(argv)
    times["other"] = times["case"] - sum(times[p] for p in ("load+preprocess", "network", "resample", "write"))
    Path(args.timings).write_text(json.dumps({"rc": rc, "times": times, **info}))
    return rc


# --------------------------------------------------------------------------------------------
# parent: checkpoints, subprocesses, report


def write_checkpoint(network: str, features: int, path: Path) -> Path:
    """An untrained study ``SegmentationModule`` of ``network``, saved as Lightning's ModelCheckpoint would."""
    import pytorch_lightning as pl
    import torch

    from fedseg.config import profile
    from fedseg.lightning_modules.module import SegmentationModule

    module = SegmentationModule(**profile("study").override(network=network, features=features).module_args())
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": pl.__version__}, path)
    return path


def run_one(checkpoint: Path, case: Path, device: str, work: Path) -> dict[str, Any]:
    """One ``fedseg predict`` subprocess; its timings, with ``process`` = its whole wall time."""
    timings = work / "timings.json"
    out = work / "pred"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--checkpoint", str(checkpoint),
           "--case", str(case), "--out", str(out), "--device", device, "--timings", str(timings)]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    process = time.perf_counter() - start
    if done.returncode != 0 or not timings.is_file():
        raise SystemExit(f"fedseg predict failed (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")
    result = json.loads(timings.read_text())
    t = result["times"]
    t["process"] = process
    t["rest"] = process - sum(t[p] for p in TOP_LEVEL)
    return result


def windows(shape: list[int], roi: int, overlap: float) -> int:
    """Sliding windows MONAI places over ``shape`` (C, *S) with a cubic ``roi`` and ``overlap``."""
    interval = max(int(roi * (1 - overlap)), 1)
    return math.prod(1 if s <= roi else math.ceil((s - roi) / interval) + 1 for s in shape[1:])


def median_times(results: list[dict[str, Any]]) -> dict[str, float]:
    return {p: statistics.median(r["times"].get(p, 0.0) for r in results) for p in PARTS}


def print_report(by_network: dict[str, list[dict[str, Any]]], roi: int) -> None:
    medians = {net: median_times(rs) for net, rs in by_network.items()}
    print(f"\nseconds per case, median over {len(next(iter(by_network.values())))} process(es) per network:")
    print(f"{'network':<11}" + "".join(f"{p:>{max(len(p) + 1, 8)}}" for p in PARTS) + f"{'reference':>10}{'÷ ref':>7}")
    for net, t in medians.items():
        ref = REFERENCE_SECONDS.get(net)
        row = f"{net:<11}" + "".join(f"{t[p]:>{max(len(p) + 1, 8)}.2f}" for p in PARTS)
        row += f"{ref:>10.1f}{t['process'] / ref:>7.2f}" if ref else f"{'-':>10}{'-':>7}"
        print(row)
    print("\nshares:")
    for net, t in medians.items():
        first = by_network[net][0]
        shape = first.get("preprocessed_shape", [])
        resample_write = t["resample"] + t["write"]
        print(f"  {net}: network {t['network'] / t['case']:.0%} of the case, {t['network'] / t['process']:.0%} of the "
              f"process; load+preprocess {t['load+preprocess'] / t['case']:.0%}, resample+write "
              f"{resample_write / t['case']:.0%}, other {t['other'] / t['case']:.0%} of the case; start-up "
              f"(process - case) {t['process'] - t['case']:.1f} s, of it imports {t['imports']:.1f} s")
        if shape:
            print(f"    preprocessed {shape} -> {windows(shape, roi, 0.25)} windows of {roi}³ "
                  f"({t['network'] / windows(shape, roi, 0.25):.2f} s each); written {first.get('source_shape')}, "
                  f"{first.get('foreground', 0):.1%} foreground (untrained model)")
    if "unet" in medians and "segresnet" in medians:
        measured = medians["segresnet"]["process"] / medians["unet"]["process"]
        network = medians["segresnet"]["network"] / medians["unet"]["network"]
        reference = REFERENCE_SECONDS["segresnet"] / REFERENCE_SECONDS["unet"]
        print(f"\nsegresnet / unet, whole process: {measured:.2f} in this run (reference {reference:.2f}); "
              f"network part alone: {network:.2f}")


def run_parent(args: argparse.Namespace) -> None:
    import torch

    from fedseg.config import profile

    study = profile("study")
    roi = study.data.roi[0]
    host = torch.cuda.get_device_name(0) if args.device == "cuda" else f"cpu, {os.cpu_count()} cores"
    print(f"fedseg predict on {args.case.name} ({host}), networks {' '.join(args.networks)} "
          f"(features {args.features}, window {roi}³, overlap 0.25); {args.repeats} interleaved repeat(s)")
    by_network: dict[str, list[dict[str, Any]]] = {net: [] for net in args.networks}
    with tempfile.TemporaryDirectory(prefix="bench_inference_") as tmp:
        checkpoints = {net: write_checkpoint(net, args.features, Path(tmp) / f"{net}.ckpt") for net in args.networks}
        for r in range(args.repeats):
            for net in args.networks if r % 2 == 0 else args.networks[::-1]:
                with tempfile.TemporaryDirectory(dir=tmp) as work:
                    result = run_one(checkpoints[net], args.case, args.device, Path(work))
                by_network[net].append(result)
                t = result["times"]
                print(f"  repeat {r + 1} {net:<10} process {t['process']:6.1f} s, case {t['case']:6.1f} s, "
                      f"network {t['network']:6.1f} s", flush=True)
    print_report(by_network, roi)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", type=Path, default=None, help=f"a BraTS case folder (default: {default_case()})")
    parser.add_argument("--networks", nargs="+", default=["unet", "segresnet"])
    parser.add_argument("--features", type=int, default=None, help="network width (default: the study's, 16)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--repeats", type=int, default=2, help="processes per network, interleaved")
    # the child's own options (one fedseg predict run)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--timings", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.case = args.case or default_case()
    if args.child:
        sys.exit(run_child(args))
    if not args.case.is_dir():
        parser.error(f"--case {args.case}: no such folder (set FEDSEG_SHARED or pass --case)")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.features is None:
        from fedseg.config import profile

        args.features = profile("study").model.features
    run_parent(args)


if __name__ == "__main__":
    main()
