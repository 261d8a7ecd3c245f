"""``fedseg compare``: centralized vs local-only vs federated, same sites, same compute budget."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedseg.cli import UserError, three_ints


def register(subparsers: argparse._SubParsersAction) -> None:
    # the methods are checked by jobs.compare (importing it here would load torch for `fedseg --help`)
    cmp = subparsers.add_parser(
        "compare",
        help="compare centralized, local-only and federated training on the same sites (same budget)",
        description="Trains every method on the same sites with the same budget (every training case "
        "seen ROUNDS x LOCAL_EPOCHS times), scores each method's final model on each site's own "
        "validation cases, and writes OUT/comparison.json|csv|png and OUT/verdict.txt (one run folder "
        "per method: OUT/<method>/). Sites: synthetic heterogeneous sites in OUT/synth by default. "
        "Running the same command again skips the methods already done.",
    )
    cmp.add_argument("--out", type=Path, required=True, help="comparison folder")
    cmp.add_argument("--datalists", type=Path, nargs="+", default=None, help="one datalist per site (site-N.json -> site-N)")
    cmp.add_argument("--data-root", type=Path, default=None, help="override the datalists' data root")
    cmp.add_argument("--sites", type=int, default=3, help="number of synthetic sites (ignored with --datalists)")
    cmp.add_argument("--cases", type=int, default=8, help="synthetic cases per site")
    cmp.add_argument("--size", type=int, default=48, help="synthetic volume size")
    cmp.add_argument("--heterogeneity", type=float, default=1.0, help="synthetic sites: 0 = IID, 1 = built-in profiles")
    cmp.add_argument("--synth-groups", type=int, choices=[1, 2], default=1,
                     help="synthetic sites in 2 imaging-protocol groups (for the grouped method)")
    cmp.add_argument("--methods", nargs="+", default=["centralized", "local", "fedavg", "fedper"], metavar="METHOD",
                     help="any of centralized, local, fedavg, fedprox, fedopt, fedper, contribution, fedavg-svt, "
                     "fedavg-percentile, grouped, grouped-shared (default: %(default)s)")
    cmp.add_argument("--rounds", type=int, default=10, help="FL rounds; the budget is rounds x local epochs")
    cmp.add_argument("--local-epochs", type=int, default=2)
    cmp.add_argument("--network", default="unet")
    cmp.add_argument("--features", type=int, default=8)
    cmp.add_argument("--norm", choices=["instance", "batch"], default="instance")
    cmp.add_argument("--modalities", nargs="+", default=["t1", "t1ce", "t2", "flair"])
    cmp.add_argument("--roi", type=int, nargs="+", default=[48], help="crop size: one or three numbers")
    cmp.add_argument("--lr", type=float, default=3e-3)
    cmp.add_argument("--batch-size", type=int, default=2)
    cmp.add_argument("--seed", type=int, default=0, help="seed of every method: the initial global model, data order and augmentation")
    cmp.add_argument("--seeds", type=int, nargs="+", default=None, metavar="SEED",
                     help="run the whole comparison once per seed (OUT/seed-<s>/, instead of --seed) and "
                     "summarize mean ± sd over seeds and each method's difference to fedavg paired by seed "
                     "(OUT/seeds.txt|csv|json)")
    cmp.add_argument("--no-hd95", action="store_true", help="skip HD95 (faster on CPU)")
    cmp.add_argument("--keep-norm-local", action="store_true", help="fedper: keep normalization layers local too (FedBN)")
    cmp.add_argument("--poll-interval", type=float, default=0.5, help="seconds a simulated site waits between task requests")
    cmp.set_defaults(func=run_compare)


def site_datalists(args: argparse.Namespace) -> dict[str, Path]:
    """Given datalists keyed by file stem, or synthetic sites in OUT/synth (reused when it matches)."""
    if args.datalists:
        from fedseg.cli.simulate import named_datalists

        return named_datalists(args.datalists)
    from fedseg.lightning_modules.data.synth import SynthConfig, SynthError, generate, is_synth_output, load_synth_config

    folder = args.out / "synth"
    try:
        cfg = SynthConfig(n_sites=args.sites, cases_per_site=args.cases, shape=(args.size,) * 3, heterogeneity=args.heterogeneity,
                         groups=args.synth_groups)
    except SynthError as err:
        raise UserError(str(err)) from None
    if is_synth_output(folder) and (folder / "datalists" / "all.json").exists():
        # a resumed comparison must score on the same data: reuse it, never regenerate under finished runs
        if load_synth_config(folder) != cfg:
            raise UserError(f"{folder} holds synthetic sites made with other settings; use a new --out")
        print(f"synthetic sites: reusing {folder}")
        return {f"site-{k + 1}": folder / "datalists" / f"site-{k + 1}.json" for k in range(cfg.n_sites)}
    result = generate(cfg, folder)
    print(result.summary())
    return dict(result.datalists)


def run_compare(args: argparse.Namespace) -> int:
    from fedseg.jobs.compare import CompareSettings, ComparisonError, compare
    from fedseg.lightning_modules.data.check import DatasetCheckError
    from fedseg.lightning_modules.data.datalist import DatalistError

    roi = three_ints(args.roi, "--roi")
    datalists = site_datalists(args)
    try:
        settings = CompareSettings(
            rounds=args.rounds,
            local_epochs=args.local_epochs,
            network=args.network,
            features=args.features,
            norm=args.norm,
            modalities=tuple(args.modalities),
            roi=tuple(roi),
            lr=args.lr,
            batch_size=args.batch_size,
            hd95=not args.no_hd95,
            seed=args.seed,
            keep_norm_local=args.keep_norm_local,
            poll_interval=args.poll_interval,
        )
        if args.seeds:
            from fedseg.jobs.seed_sweep import sweep_seeds

            sweep = sweep_seeds(datalists, args.out, settings, args.seeds, methods=args.methods, data_root=args.data_root)
        else:
            results = compare(datalists, args.out, settings, methods=args.methods, data_root=args.data_root)
    except DatasetCheckError as err:
        raise UserError(f"the training data fails the dataset check:\n{err}") from None
    except (ComparisonError, DatalistError) as err:
        raise UserError(str(err)) from None
    if args.seeds:
        print()
        print(sweep.format_table())
        print(f"\nfiles: {args.out.resolve()}/seeds.txt, seeds.csv, seeds.json; one comparison per seed in seed-<s>/")
        return 0
    print()
    print(results.format_table())
    print()
    print(results.verdict())
    print(f"\nfiles: {args.out.resolve()}/comparison.json, comparison.csv, comparison.png, verdict.txt")
    return 0
