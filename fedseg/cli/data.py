"""``fedseg data``: generate synthetic sites, split a pool of cases into sites, check a dataset."""

from __future__ import annotations

import argparse
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from fedseg.cli import UserError, three_ints
from fedseg.cli._options import add_dataclass_options, dataclass_from_args
from fedseg.config import SplitSettings, SynthSettings

_SYNTH = SynthSettings()


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="synthetic data, site splits and dataset checks")
    sub = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)

    synth = sub.add_parser(
        "synth",
        help="generate a synthetic multi-site dataset (BraTS 2021 layout + per-site datalists)",
        description="Writes OUT/data/<case>/... (BraTS 2021 layout), OUT/datalists/site-N.json and "
        "all.json, each site's held-out test cases in OUT/test/ listed in OUT/datalists/site-N.test.json, "
        "OUT/institutions.csv and OUT/synth.json. Sites differ in scanner, annotation style and size "
        "(by default a large, a medium and a small hospital: --site-cases 24 8 4).",
    )
    synth.add_argument("--out", type=Path, required=True, help="output folder (empty, or an earlier synth output)")
    # defaults and help from SynthSettings, the one place of the synthetic data's defaults
    _setting_option(synth, "--sites", "sites", int)
    _setting_option(synth, "--cases", "cases", int)
    _setting_option(synth, "--site-cases", "site_cases", int, nargs="+")
    _setting_option(synth, "--test-cases", "test_cases", int)
    synth.add_argument("--size", type=int, nargs="+", default=[_SYNTH.size],
                       help=f"volume size in voxels: one or three numbers (default {_SYNTH.size})")
    _setting_option(synth, "--val-fraction", "synth_val_fraction", float)
    _setting_option(synth, "--heterogeneity", "heterogeneity", float)
    _setting_option(synth, "--groups", "synth_groups", int)
    _setting_option(synth, "--tumours", "synth_tumours", str)
    _setting_option(synth, "--seed", "synth_seed", int)
    synth.set_defaults(func=_synth)

    split = sub.add_parser(
        "split",
        help="split one pool of cases into N sites with train/validation datalists",
        description="Discovers the cases under DATA_ROOT (any supported layout) and writes one "
        "datalist per site, all.json (the union, for centralized training) and summary.csv to OUT. "
        "OUT must not be inside DATA_ROOT: source data is never written to.",
    )
    split.add_argument("data_root", type=Path)
    split.add_argument("--out", type=Path, required=True)
    add_dataclass_options(split, SplitSettings)  # --sites, --mode, --seed, --val-fraction, ... from their fields
    split.add_argument("--layout", default="auto")
    split.set_defaults(func=_split)

    check = sub.add_parser(
        "check",
        help="validate a dataset folder, case folder or datalist; non-zero exit on any problem",
        description="Reads every file (headers and voxels) and reports each problem with its file. "
        "Never writes to the dataset.",
    )
    check.add_argument("path", type=Path, help="dataset root, case folder, or datalist .json")
    check.add_argument("--layout", default="auto")
    check.add_argument("--data-root", type=Path, default=None, help="with a datalist: the root its paths are under")
    check.add_argument("--convention", default=None, help="override the label convention (brats2021, brats2023, msd)")
    check.add_argument("--modalities", nargs="+", default=None, metavar="MODALITY",
                       help="the modalities every case must have (default: all four; a job's, e.g. t1ce t2 flair)")
    check.set_defaults(func=_check)


def _setting_option(parser: argparse.ArgumentParser, flag: str, name: str, kind: type, **kwargs: Any) -> None:
    """``flag`` for the ``SynthSettings`` field ``name``: its default, help and choices."""
    f = next(f for f in fields(SynthSettings) if f.name == name)
    default = getattr(_SYNTH, name)
    shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
    parser.add_argument(flag, type=kind, default=default, dest=name, choices=f.metadata.get("choices"),
                        help=f"{f.metadata['help']} (default: {shown})", **kwargs)


def _synth(args: argparse.Namespace) -> int:
    from fedseg.lightning_modules.data.synth import SynthConfig, SynthError, generate

    size = three_ints(args.size, "--size")
    try:
        settings = SynthSettings(**{f.name: getattr(args, f.name) for f in fields(SynthSettings) if f.name != "size"})
        cfg = replace(SynthConfig.from_settings(settings), shape=tuple(size))
        result = generate(cfg, args.out)
    except (SynthError, ValueError) as err:
        raise UserError(str(err)) from None
    print(result.summary())
    return 0


def _split(args: argparse.Namespace) -> int:
    from fedseg.lightning_modules.data.layouts import LayoutError, discover
    from fedseg.lightning_modules.data.splits import SplitError, format_summary, split_cases, write_split

    chosen = dataclass_from_args(args, SplitSettings)
    try:
        dataset = discover(args.data_root, args.layout)
        if chosen.sites is None and chosen.mode != "institution":
            raise UserError("--sites is required for this mode")
        datalists = split_cases(
            dataset.cases,
            chosen.sites,
            chosen.mode,
            seed=chosen.seed,
            val_fraction=chosen.val_fraction,
            alpha=chosen.alpha,
            sizes=chosen.sizes,
            institutions_csv=chosen.institutions,
            data_root=dataset.root,
        )
        summary = write_split(datalists, args.out)
    except (LayoutError, SplitError) as err:
        raise UserError(str(err)) from None
    print(format_summary(summary))
    print(f"datalists written to {args.out}")
    return 0


def _check(args: argparse.Namespace) -> int:
    from fedseg.lightning_modules.data.check import check_dataset
    from fedseg.lightning_modules.data.layouts import LayoutError
    from fedseg.lightning_modules.labels import LabelError

    from fedseg.config import MODALITIES

    wanted = tuple(args.modalities or MODALITIES)
    unknown = [m for m in wanted if m not in MODALITIES]
    if unknown:
        raise UserError(f"unknown modalities {unknown}; known: {', '.join(MODALITIES)}")
    try:
        if args.data_root is not None:
            report = check_dataset(args.data_root, args.layout, datalist=args.path, convention=args.convention,
                                   modalities=wanted)
        else:
            report = check_dataset(args.path, args.layout, convention=args.convention, modalities=wanted)
    except (LayoutError, LabelError) as err:
        raise UserError(str(err)) from None
    print(report.format())
    return 0 if report.ok else 1
