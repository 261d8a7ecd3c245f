"""``fedseg predict CKPT INPUT --out DIR``: label files for a case folder or a dataset, on the input grid."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedseg.cli import UserError

MODALITY_CHOICES: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")  # = datalist.MODALITIES (torch-free here)
CONVENTION_CHOICES: tuple[str, ...] = ("brats2021", "brats2023", "msd")  # = labels.CONVENTIONS


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="segment a case folder or a dataset with a checkpoint; labels in the input's geometry",
        description=(
            "Segments every case of INPUT (one BraTS case folder, or a dataset in any supported "
            "layout; labels are not needed) and writes OUT/<case_id>.nii.gz (BraTS submission "
            "naming): uint8 labels with the shape, affine and header of the case's image files, in "
            "the case's label convention (BraTS 2021 layout: 0/1/2/4; BraTS 2023: 0/1/2/3; MSD: its "
            "own). OUT must not be inside INPUT. Existing predictions in OUT are replaced."
        ),
    )
    parser.add_argument("checkpoint", metavar="CKPT", type=Path, help="checkpoint (e.g. RUN/checkpoints/best.ckpt)")
    parser.add_argument("input", metavar="INPUT", type=Path, help="a case folder or a dataset folder")
    parser.add_argument("--out", type=Path, required=True, help="output folder (not inside INPUT)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--layout", default="auto", help="dataset layout: auto, msd, generic, brats2021, brats2023")
    parser.add_argument(
        "--convention", choices=CONVENTION_CHOICES, default=None,
        help="label convention of the output (default: the layout's, e.g. brats2023 for generic)",
    )
    parser.add_argument(
        "--modalities", nargs="+", choices=MODALITY_CHOICES, default=None,
        help="input channels, in training order; only for checkpoints that do not store them "
        "(older ones): default all four. Checkpoints from fedseg train store them.",
    )
    parser.set_defaults(func=_predict)


def find_cases(path: Path, layout: str = "auto", convention: str | None = None):  # -> layouts.Dataset
    """The cases of a dataset folder, or the one case of a case folder."""
    from fedseg.lightning_modules.data.layouts import LayoutError, discover, discover_case

    try:
        return discover(path, layout, convention=convention)
    except LayoutError as dataset_error:
        if layout != "auto":
            raise
        try:
            return discover_case(path, convention=convention)
        except LayoutError:
            raise dataset_error from None


def refuse_unconfined(dataset) -> None:  # dataset: layouts.Dataset
    """``DatalistError`` naming every case whose id is no plain file name (it names the output file)
    or whose files lead out of the input folder (a symlink), as ``fedseg data check`` reports them."""
    from fedseg.lightning_modules.data.datalist import DatalistError, confinement_problems

    problems = confinement_problems(((f"case {c.case_id}", c) for c in dataset.cases), dataset.root)
    if problems:
        listed = "\n  ".join(p.format() for p in problems)
        raise DatalistError(f"{dataset.root}: {len(problems)} unsafe case(s), nothing was predicted:\n  {listed}",
                            problems)


def _predict(args: argparse.Namespace) -> int:
    from fedseg.lightning_modules.data.datalist import DatalistError
    from fedseg.lightning_modules.data.layouts import LayoutError
    from fedseg.lightning_modules.inference import (
        InferenceError,
        load_model,
        predict_cases,
        refuse_output_inside_inputs,
    )

    try:
        dataset = find_cases(args.input, args.layout, args.convention)
        refuse_output_inside_inputs(args.out, dataset.cases, dataset.root)
        refuse_unconfined(dataset)
        for note in dataset.notes:
            print(f"note: {note}", file=sys.stderr)
        model = load_model(args.checkpoint, device=args.device, modalities=args.modalities)
        print(
            f"{len(dataset.cases)} case(s) ({dataset.layout}) on {model.device}, modalities "
            f"{' '.join(model.modalities)}", file=sys.stderr, flush=True,
        )

        def progress(i: int, n: int, prediction) -> None:
            values = ", ".join(f"{v}: {c}" for v, c in prediction.voxels.items())
            print(
                f"[{i + 1}/{n}] {prediction.case_id} -> {prediction.path.name} ({prediction.convention}; "
                f"voxels {values}; {prediction.seconds:.1f} s)", file=sys.stderr, flush=True,
            )

        written = predict_cases(model, dataset.cases, dataset.root, args.out, progress=progress)
    except (InferenceError, LayoutError, DatalistError) as err:
        raise UserError(str(err)) from None
    print(f"wrote {len(written)} prediction(s) to {args.out}")
    return 0
