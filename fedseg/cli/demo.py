"""``fedseg demo``: the README's main command: a federated run on built-in synthetic sites."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedseg.cli._options import add_job_options, add_study_options


def register(subparsers: argparse._SubParsersAction) -> None:
    demo = subparsers.add_parser(
        "demo",
        help="the main run: synthetic heterogeneous sites -> data check -> FedAvg in the NVFlare simulator",
        description="Generates synthetic hospitals under OUT/synth (each with its own scanner and "
        "annotation style), checks them with `fedseg data check`, trains FedAvg across them in "
        "NVFlare's simulator and prints the per-site result table (OUT/results.json, "
        "OUT/val_dice_per_round.png). The `demo` profile's settings.",
    )
    demo.add_argument("--out", type=Path, default=Path("runs/demo"))
    demo.add_argument("--data-only", action="store_true", help="stop after generating and checking the data")
    add_study_options(demo, "demo")
    add_job_options(demo)
    demo.set_defaults(func=run_demo, datalists=None, data_root=None, site_group=[])


def run_demo(args: argparse.Namespace) -> int:
    from fedseg.cli.simulate import build_job, site_datalists, site_group_settings, study_or_error
    from fedseg.lightning_modules.data.check import check_dataset

    study = study_or_error(args)
    synth_dir = args.out / "synth"
    print(f"[1/3] generating {study.synth.sites} synthetic hospitals in {synth_dir}")
    datalists = site_datalists(args, study, synth_dir)
    print(f"[2/3] checking {synth_dir / 'data'}")
    report = check_dataset(synth_dir / "data")
    print(report.format())
    if not report.ok or args.data_only:
        return 0 if report.ok else 1

    from fedseg.run.results import format_table
    from fedseg.run.simulate import simulate

    job = build_job(args, study, min_clients=len(datalists))
    fed = study.federation
    print(f"[3/3] {job.algorithm} in the NVFlare simulator: {len(datalists)} sites x {fed.rounds} rounds x "
          f"{fed.local_epochs} local epochs")
    results = simulate(job, datalists, args.out, site_settings=site_group_settings(args.site_group))
    print()
    print(format_table(results))
    print(f"\nresults: {args.out.resolve()}/results.json, results.csv, val_dice_per_round.png, checkpoints/best_global.ckpt")
    return 0
