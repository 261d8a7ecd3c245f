"""Calibrate the synthetic sites: how much better does a site with many cases learn than one with few?

For each data seed, one synthetic site (``--site``'s scanner and rater) is generated twice with the
same seed, with ``--small`` and with ``--large`` cases: the small site's cases are the first of the
large site's, and both share the same held-out test cases. Each is trained as ``fedseg compare``'s
local-only method trains a site (``training.train``, the study's budget of epochs, the final
``last.ckpt``) and scored on the test cases with ``test_sets.score_test_set``. The gap, large minus
small, is paired by test case.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/calibrate_synth.py --out /tmp/calib \\
        --data-seeds 0 1 --tumours varied

Writes OUT/calibration.json (every setting and number) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data-seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--train-seed", type=int, default=0)
    parser.add_argument("--site", type=int, default=1, help="which built-in site's scanner and rater (1-based)")
    parser.add_argument("--small", type=int, default=4)
    parser.add_argument("--large", type=int, default=24)
    parser.add_argument("--test-cases", type=int, default=16)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--profile", default="demo")
    parser.add_argument("--epochs", type=int, default=40, help="training budget in epochs (demo: 20 rounds x 2)")
    parser.add_argument("--tumours", default="varied")
    parser.add_argument("--equal-steps", action="store_true",
                        help="train the small site for as many optimizer steps as the large one (more epochs), "
                        "so that the gap is the data's, not the budget's")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from fedseg.config import profile
    from fedseg.lightning_modules.data.synth import SynthConfig, generate
    from fedseg.lightning_modules.test_sets import mean_and_sem, score_test_set
    from fedseg.lightning_modules.training import TrainConfig, train

    study = profile(args.profile).override(roi=(args.size,) * 3, hd95=False, rounds=args.epochs, local_epochs=1,
                                           seed=args.train_seed)
    runs: list[dict] = []
    for data_seed in args.data_seeds:
        scores = {}
        for n in (args.small, args.large):
            counts = tuple([1] * (args.site - 1) + [n])
            root = args.out / f"seed{data_seed}" / f"n{n}"
            synth = generate(SynthConfig(n_sites=args.site, site_cases=counts, test_cases=args.test_cases,
                                         shape=(args.size,) * 3, seed=data_seed, tumours=args.tumours), root / "synth")
            site = f"site-{args.site}"
            epochs = args.epochs
            if args.equal_steps and n == args.small:  # the large site's steps: its training batches x epochs
                n_small, n_large = (_n_train(n, synth.config.val_fraction), _n_train(args.large, synth.config.val_fraction))
                batches = lambda k: -(-k // study.data.batch_size)  # noqa: E731
                epochs = args.epochs * batches(n_large) // batches(n_small)
            started = time.perf_counter()
            result = train(TrainConfig(datalists=[synth.datalists[site]], out=root / "run", study=study,
                                       epochs=epochs, progress=False, check_data=False))
            seconds = time.perf_counter() - started
            scored = score_test_set(result["last_checkpoint"], synth.test_datalists[site])
            scores[n] = scored
            runs.append({"data_seed": data_seed, "cases": n, "n_train": result["n_train_cases"], "epochs": epochs,
                         "train_seconds": round(seconds, 1), "test": scored.to_json()})
            print(f"seed {data_seed} cases {n:>3} ({result['n_train_cases']} train, {epochs} epochs): "
                  + "  ".join(f"{r} {scored.mean[r]['dice']:.3f}±{scored.sem[r]['dice']:.3f}" for r in scored.mean)
                  + f"  [{seconds:.0f} s]", flush=True)
        small, large = scores[args.small], scores[args.large]
        gap = {}
        for region in small.mean:
            a = [r["dice"] for r in small.rows if r["region"] == region]
            b = [r["dice"] for r in large.rows if r["region"] == region]
            gap[region] = mean_and_sem(np.array(b) - np.array(a))
        runs.append({"data_seed": data_seed, "gap_large_minus_small": {r: {"mean": m, "sem": s} for r, (m, s) in gap.items()}})
        print(f"seed {data_seed} gap {args.large}-{args.small}: "
              + "  ".join(f"{r} {m:+.3f}±{s:.3f}" for r, (m, s) in gap.items()), flush=True)
    document = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                "study": study.flat(), "torch_threads": torch.get_num_threads(), "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "calibration.json").write_text(json.dumps(document, indent=2, default=str))
    return 0


def _n_train(n: int, val_fraction: float) -> int:
    """Training cases of a site of ``n`` (``splits.train_val_split``'s count)."""
    from fedseg.lightning_modules.data.splits import train_val_split

    return len(train_val_split(list(range(n)), val_fraction, np.random.default_rng(0))[0])


if __name__ == "__main__":
    sys.exit(main())
