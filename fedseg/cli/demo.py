"""``fedseg demo``: the README's main command: a federated run on built-in synthetic sites."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedseg.cli._options import add_job_options, add_study_options, add_verbose_option


def register(subparsers: argparse._SubParsersAction) -> None:
    demo = subparsers.add_parser(
        "demo",
        help="the main run: synthetic heterogeneous sites -> data check -> FedAvg in the NVFlare simulator",
        description="Generates synthetic hospitals under OUT/synth (each with its own scanner and "
        "annotation style), checks them with `fedseg data check`, shows how each site images with "
        "NVFlare's federated statistics (OUT/stats/), trains FedAvg across them in NVFlare's simulator "
        "and prints the per-site result table (OUT/results.json, OUT/val_dice_per_round.png, "
        "OUT/cross_site.png); then trains the smallest site on its own cases and scores both on each site's "
        "held-out test cases: what federation buys it. The `demo` profile's settings.",
    )
    demo.add_argument("--out", type=Path, default=Path("runs/demo"))
    demo.add_argument("--data-only", action="store_true", help="stop after generating and checking the data")
    add_verbose_option(demo)
    add_study_options(demo, "demo")
    add_job_options(demo)
    demo.set_defaults(func=run_demo, datalists=None, data_root=None, site_group=[])


def run_demo(args: argparse.Namespace) -> int:
    from fedseg.cli.simulate import build_job, site_datalists, site_group_settings, study_or_error
    from fedseg.lightning_modules.data.check import check_dataset

    study = study_or_error(args)
    synth_dir = args.out / "synth"
    print(f"[1/5] generating {study.synth.sites} synthetic hospitals in {synth_dir}")
    datalists = site_datalists(args, study, synth_dir)
    print(f"[2/5] checking {synth_dir / 'data'}")
    report = check_dataset(synth_dir / "data")
    print(report.format())
    if not report.ok or args.data_only:
        return 0 if report.ok else 1

    from fedseg.jobs.base import algorithm
    from fedseg.jobs.stats import StatsSettings
    from fedseg.run.console import quiet_console
    from fedseg.run.results import format_table
    from fedseg.run.simulate import simulate
    from fedseg.run.statistics import format_stats, simulate_stats

    job = build_job(args, study, min_clients=len(datalists))
    log_file = args.out / "logs" / "demo.log"
    print(f"[3/5] federated statistics of the sites' images" + ("" if args.verbose else f" (NVFlare's logs: {log_file})"))
    with quiet_console(log_file, verbose=args.verbose):
        # the synthetic sites hold 24, 8 and 4 cases: NVFlare's minimum count of 10 would withhold the
        # per-case figures of two of them (5 withholds the small site's); a real study keeps the default
        stats = simulate_stats(datalists, args.out / "stats", StatsSettings(modalities=study.data.modalities, min_count=5))
    print(format_stats(stats))
    fed = study.federation
    print(f"[4/5] {job.algorithm} in the NVFlare simulator: {len(datalists)} sites x {fed.rounds} rounds x "
          f"{fed.local_epochs} local epochs")
    with quiet_console(log_file, verbose=args.verbose) as console:
        results = simulate(job, datalists, args.out, site_settings=site_group_settings(args.site_group), console=console)
    print()
    print(format_table(results))
    final = results.checkpoints.get("final")
    if final and not algorithm(job.algorithm).personal and job.addons.groups is None:
        from fedseg.run.federation_gain import federation_gain, format_gain

        print(f"\n[5/5] the smallest site alone ({study.epochs} epochs on its own cases), then every model "
              "on each site's held-out test cases")
        with quiet_console(log_file, verbose=args.verbose):
            gains = federation_gain(final, datalists, study, args.out)
        if gains:
            print(format_gain(gains, study.epochs, job.algorithm))
    print(f"\nresults: {args.out.resolve()}: results.json|csv, val_dice_per_round.png, cross_site.png, checkpoints/, "
          "local/ (the smallest site alone); stats/: stats.txt, stats_intensity.png")
    return 0
