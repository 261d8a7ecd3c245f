"""``fedseg personalize``: a site's FedPer model = the global encoder + the site's own head."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedseg.cli import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "personalize",
        help="combine a FedPer global encoder checkpoint with this site's head into one checkpoint",
        description="Run at a site: writes a full SegmentationModule checkpoint (global encoder + "
        "the site's head from its head store) that `fedseg evaluate` and `fedseg predict` take.",
    )
    p.add_argument("encoder", type=Path, help="RUN/checkpoints/{best,final}_global_encoder.ckpt")
    p.add_argument("head", type=Path, help="the site's head store file, <head_store>/<study>.pt")
    p.add_argument("--out", type=Path, required=True, help="output checkpoint")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from fedseg.app.fedper import personalize
    from fedseg.lightning_modules.owner_only import owner_only_files

    for path in (args.encoder, args.head):
        if not path.is_file():
            raise UserError(f"{path}: not found")
    try:
        # a model trained on the site's patients: the checkpoint is 0600 (and any folder made for it 0700)
        with owner_only_files():
            out = personalize(args.encoder, args.head, args.out)
    except ValueError as err:
        raise UserError(str(err)) from None
    print(f"personalized model written to {out}")
    return 0
