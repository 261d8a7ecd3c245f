"""``fedseg train``: centralized training over several sites' datalists, or local-only on one."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedseg.cli import UserError, three_ints


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
    train.add_argument("--data-root", type=Path, default=None, help="override the datalists' data root")
    train.add_argument("--network", default="unet", help="unet, resunet, attention_unet, segresnet, unetplusplus")
    train.add_argument("--features", type=int, default=16, help="base width of the network")
    train.add_argument("--norm", choices=["instance", "batch"], default="instance")
    train.add_argument("--modalities", nargs="+", default=["t1", "t1ce", "t2", "flair"])
    train.add_argument("--roi", type=int, nargs="+", default=[128], help="crop size: one or three numbers")
    train.add_argument("--normalization", choices=["zscore", "minmax"], default="zscore")
    train.add_argument("--epochs", type=int, default=50)
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--batch-size", type=int, default=2)
    train.add_argument("--num-workers", type=int, default=1)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--accelerator", default="auto", help="auto, cpu or gpu")
    train.add_argument("--cache-dir", type=Path, default=None, help="preprocessed-volume cache (default OUT/cache)")
    train.add_argument("--no-hd95", action="store_true", help="skip HD95 during validation (faster on CPU)")
    train.add_argument(
        "--wandb", choices=["off", "offline", "online"], default="off",
        help="Weights & Biases tracking: offline writes OUT/wandb (upload later with `wandb sync`); "
        "online needs WANDB_API_KEY in the environment",
    )
    train.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    from fedseg.lightning_modules.data.check import DatasetCheckError
    from fedseg.lightning_modules.data.datalist import DatalistError
    from fedseg.lightning_modules.training import TrainConfig, train

    roi = three_ints(args.roi, "--roi")
    cfg = TrainConfig(
        datalists=args.datalists,
        out=args.out,
        data_root=args.data_root,
        network=args.network,
        features=args.features,
        network_kwargs={"norm": args.norm},
        modalities=tuple(args.modalities),
        roi_size=tuple(roi),
        normalization=args.normalization,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        seed=args.seed,
        accelerator=args.accelerator,
        cache_dir=args.cache_dir,
        hd95=not args.no_hd95,
        wandb=args.wandb,
    )
    try:
        results = train(cfg)
    except DatasetCheckError as err:
        raise UserError(f"the training data fails the dataset check:\n{err}") from None
    except (DatalistError, ValueError) as err:
        raise UserError(str(err)) from None
    print(
        f"{results['kind']} training: {results['epochs_done']} epochs, best val_dice "
        f"{results['best_val_dice']:.4f} -> {results['best_checkpoint']}"
    )
    return 0

