"""``fedseg evaluate CKPT DATALIST``: per-case, per-region scores of a checkpoint, a summary, box plots."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedseg.cli import UserError

SPLIT_CHOICES: tuple[str, ...] = ("validation", "training", "all")  # = evaluation.SPLITS (torch-free here)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="score a checkpoint on a datalist's cases: per-case table, summary, box plots",
        description=(
            "Loads a fedseg checkpoint, segments each case of the chosen split with sliding-window "
            "inference on the whole (RAS, brain-cropped) volume and scores it per region (ET, TC, "
            "WT, overall): Dice, IoU, precision, recall, volume similarity, HD95 in mm. Writes "
            "OUT/per_case.csv, OUT/per_case.json, OUT/summary.json (mean, median, worst case per "
            "region) and OUT/boxplot_<region>.png. Default OUT: RUN/evaluation/<datalist>-<split> "
            "for RUN/checkpoints/<ckpt>."
        ),
    )
    parser.add_argument("checkpoint", metavar="CKPT", type=Path, help="checkpoint (e.g. RUN/checkpoints/best.ckpt)")
    parser.add_argument("datalist", metavar="DATALIST", type=Path, help="datalist JSON with labelled cases")
    parser.add_argument("--data-root", type=Path, default=None, help="override the datalist's data root")
    parser.add_argument("--out", type=Path, default=None, help="output folder (see above for the default)")
    parser.add_argument(
        "--split", choices=SPLIT_CHOICES, default="validation", help="cases to score (default validation)"
    )
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.set_defaults(func=_evaluate)


def default_out(checkpoint: Path, datalist: Path, split: str) -> Path:
    """``RUN/evaluation/<datalist stem>-<split>`` for ``RUN/checkpoints/x.ckpt``, else beside the file."""
    folder = checkpoint.resolve().parent
    run = folder.parent if folder.name == "checkpoints" else folder
    return run / "evaluation" / f"{datalist.stem}-{split}"


def _evaluate(args: argparse.Namespace) -> int:
    from fedseg.lightning_modules.data.datalist import DatalistError
    from fedseg.lightning_modules.evaluation import EvaluationError, evaluate_checkpoint
    from fedseg.lightning_modules.inference import InferenceError
    from fedseg.lightning_modules.labels import LabelError

    out = args.out or default_out(args.checkpoint, args.datalist, args.split)

    def progress(i: int, n: int, case_id: str, scores: dict[str, float]) -> None:
        dice = " ".join(f"{r.upper()} {scores[f'dice_{r}']:.3f}" for r in ("et", "tc", "wt"))
        hd = f"  hd95 {scores['hd95']:.1f} mm" if "hd95" in scores else ""
        print(f"[{i + 1}/{n}] {case_id}: dice {dice}{hd}", file=sys.stderr, flush=True)

    try:
        result = evaluate_checkpoint(
            args.checkpoint, args.datalist, out=out, split=args.split, data_root=args.data_root,
            device=args.device, progress=progress,
        )
    except (EvaluationError, InferenceError, DatalistError, LabelError) as err:
        raise UserError(str(err)) from None
    print(result.format())
    print(f"wrote {len(result.files)} files to {out}")
    return 0
