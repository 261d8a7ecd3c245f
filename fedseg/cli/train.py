"""``fedseg train``: centralized training over several sites' datalists, or local-only on one."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedseg.cli import UserError
from fedseg.cli._options import add_dataclass_options, add_study_options, add_verbose_option, dataclass_from_args
from fedseg.config import TrainSettings


def register(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser(
        "train",
        help="centralized (several datalists) or local-only (one datalist) training, resumable",
        description="Trains SegmentationModule on the union of the given datalists' training cases "
        "(one datalist = local-only training of that site). Writes OUT/config.json, "
        "OUT/checkpoints/{last,best}.ckpt, OUT/metrics.csv, OUT/curves.png, OUT/results.json. "
        "Running the same command again resumes from OUT/checkpoints/last.ckpt. Refuses to start "
        "on data that fails `fedseg data check`.",
    )
    train.add_argument("datalists", type=Path, nargs="+", help="site datalist JSON file(s)")
    train.add_argument("--out", type=Path, required=True, help="run folder")
    add_dataclass_options(train, TrainSettings)  # --data-root, --epochs, --accelerator, ..., --wandb
    add_verbose_option(train)
    add_study_options(train, "study", sections=("model", "data", "federation"),
                      skip=("round_timeout", "min_sites_per_round", "poll_interval", "site_threads", "gpus_per_site"))
    train.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    from fedseg.cli.simulate import study_or_error
    from fedseg.lightning_modules.data.check import DatasetCheckError
    from fedseg.lightning_modules.data.datalist import DatalistError
    from fedseg.lightning_modules.safe_load import CheckpointError
    from fedseg.lightning_modules.training import TrainConfig, train
    from fedseg.run.console import quiet_console

    study = study_or_error(args)
    log_file = args.out / "logs" / "train.log"
    try:
        cfg = TrainConfig.from_settings(args.datalists, args.out, study, dataclass_from_args(args, TrainSettings))
        with quiet_console(log_file, verbose=args.verbose) as console:
            if not args.verbose:
                console.print(f"Lightning's logs: {log_file}")
            results = train(cfg, console=None if args.verbose else console)
    except DatasetCheckError as err:
        raise UserError(f"the training data fails the dataset check:\n{err}") from None
    except (DatalistError, CheckpointError, ValueError) as err:
        raise UserError(str(err)) from None
    print(
        f"{results['kind']} training: {results['epochs_done']} epochs, best val_dice "
        f"{results['best_val_dice']:.4f} -> {results['best_checkpoint']}"
    )
    return 0
