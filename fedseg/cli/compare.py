"""``fedseg compare``: centralized vs local-only vs federated, same sites, same compute budget."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedseg.cli import UserError
from fedseg.cli._options import add_dataclass_options, add_study_options, add_verbose_option, dataclass_from_args
from fedseg.config import ComparisonSettings


def register(subparsers: argparse._SubParsersAction) -> None:
    # the methods' names and help come from fedseg.experiments.methods (no torch, so `fedseg --help` stays fast)
    from fedseg.experiments.methods import methods_help

    cmp = subparsers.add_parser(
        "compare",
        help="compare centralized, local-only and federated training on the same sites (same budget)",
        description="Trains every method on the same sites with the same budget (every training case "
        "seen ROUNDS x LOCAL_EPOCHS times), scores each method's final model on each site's own "
        "held-out test cases where every site has a test datalist beside its datalist (SITE.test.json, as the "
        "synthetic sites do; with the standard error over those cases), else on its validation cases, and writes OUT/comparison.json|csv|png and OUT/verdict.txt (one run folder "
        "per method: OUT/<method>/). Sites: the profile's synthetic sites in OUT/synth by default. "
        "Running the same command again skips the methods already done. " + methods_help(),
    )
    cmp.add_argument("--out", type=Path, required=True, help="comparison folder")
    cmp.add_argument("--datalists", type=Path, nargs="+", default=None, help="one datalist per site (site-N.json -> site-N)")
    cmp.add_argument("--data-root", type=Path, default=None, help="override the datalists' data root")
    add_dataclass_options(cmp, ComparisonSettings)
    cmp.add_argument("--seeds", type=int, nargs="+", default=None, metavar="SEED",
                     help="run the whole comparison once per seed (OUT/seed-<s>/, instead of --seed) and "
                     "summarize mean ± sd over seeds and each method's difference to fedavg paired by seed "
                     "(OUT/seeds.txt|csv|json)")
    add_verbose_option(cmp)
    add_study_options(cmp, "demo")
    options = cmp.add_argument_group("options of the federated methods")
    seen: set[str] = set()
    for cls in _algorithm_option_classes():
        add_dataclass_options(options, cls, seen=seen)
    cmp.set_defaults(func=run_compare, site_group=[])


def _algorithm_option_classes() -> list[type]:
    from fedseg.jobs.base import algorithms

    return [algo.options for algo in algorithms().values() if algo.options is not None]


def run_compare(args: argparse.Namespace) -> int:
    from fedseg.cli._options import algorithm_options_from_args
    from fedseg.cli.simulate import site_datalists, study_or_error
    from fedseg.experiments.compare import CompareSettings, ComparisonError, compare
    from fedseg.lightning_modules.data.check import DatasetCheckError
    from fedseg.lightning_modules.data.datalist import DatalistError

    from fedseg.run.console import quiet_console

    study = study_or_error(args)
    methods = dataclass_from_args(args, ComparisonSettings).methods
    datalists = site_datalists(args, study)
    log_file = args.out / "logs" / "compare.log"
    try:
        settings = CompareSettings(study=study, options=algorithm_options_from_args(args))
        with quiet_console(log_file, verbose=args.verbose) as console:
            if not args.verbose:
                console.print(f"NVFlare's and Lightning's logs: {log_file}")
            if args.seeds:
                from fedseg.experiments.seed_sweep import sweep_seeds

                sweep = sweep_seeds(datalists, args.out, settings, args.seeds, methods=methods,
                                    data_root=args.data_root, progress=console.print, console=console)
            else:
                results = compare(datalists, args.out, settings, methods=methods, data_root=args.data_root,
                                  progress=console.print, console=console)
    except DatasetCheckError as err:
        raise UserError(f"the training data fails the dataset check:\n{err}") from None
    except (ComparisonError, DatalistError, ValueError) as err:
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
