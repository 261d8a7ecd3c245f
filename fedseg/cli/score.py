"""``fedseg score PRED REF``: per-region Dice, IoU, precision, recall, VS, HD95 of label files."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedseg.cli import UserError

#: kept in step with fedseg.lightning_modules.labels.CONVENTIONS (a test checks it); listed here
#: because importing labels pulls in torch, and ``fedseg --help`` must stay fast.
CONVENTION_CHOICES: tuple[str, ...] = ("auto", "brats2021", "brats2023", "msd")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "score",
        help="score predicted label files against reference label files",
        description=(
            "Score predicted label files against reference label files per region (ET, TC, WT): "
            "Dice, IoU, precision, recall, volume similarity and HD95 in mm (voxel spacing of the "
            "reference header). PRED and REF are two label files, or two folders whose files are "
            "paired by the numeric groups of their names (pred/00132-000.nii.gz with "
            "ref/BraTS-MET-00132-000-seg.nii.gz)."
        ),
    )
    parser.add_argument("pred", metavar="PRED", type=Path, help="predicted label file or folder")
    parser.add_argument("ref", metavar="REF", type=Path, help="reference label file or folder")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder to write scores.json and scores.csv into (default: print only)",
    )
    for which in ("pred", "ref"):
        parser.add_argument(
            f"--{which}-convention",
            choices=CONVENTION_CHOICES,
            default="auto",
            help=f"label convention of the {which} files (default: auto, guessed from the values)",
        )
    parser.add_argument(
        "--allow-unpaired",
        action="store_true",
        help="score the pairs found, warn about the others (default: unpaired is an error)",
    )
    parser.set_defaults(func=_score)


def _inside(path: Path, folder: Path) -> bool:
    return folder.is_dir() and path.resolve().is_relative_to(folder.resolve())


def _score(args: argparse.Namespace) -> int:
    from fedseg.lightning_modules.labels import LabelError
    from fedseg.lightning_modules.scoring import ScoringError, score_files

    if args.out is not None:
        for source in (args.pred, args.ref):
            if _inside(args.out, source):
                raise UserError(
                    f"--out {args.out} is inside the input folder {source}; write elsewhere"
                )

    def progress(i: int, n: int, case_id: str) -> None:
        print(f"[{i + 1}/{n}] {case_id}", file=sys.stderr, flush=True)

    try:
        table = score_files(
            args.pred,
            args.ref,
            pred_convention=args.pred_convention,
            ref_convention=args.ref_convention,
            allow_unpaired=args.allow_unpaired,
            progress=progress,
        )
    except (ScoringError, LabelError) as err:
        raise UserError(str(err)) from err
    print(table.format())
    if args.out is not None:
        json_path, csv_path = table.write(args.out)
        print(f"wrote {json_path} and {csv_path}")
    return 0
