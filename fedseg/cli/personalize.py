"""``fedseg personalize``: a site's personal model as one checkpoint = a global checkpoint of the job +
the site's stored personal part (``fedseg.app.personal_store``).

Every personalized algorithm keeps its personal part in the site's store: FedPer's and FedRep's
head (``<store>/<study>.pt``, completed by the global encoder checkpoint), Ditto's personal model
(``<study>.ditto.pt``) and the fine-tuned model (``<study>.finetune.pt``), whole models that take
only their settings from the global checkpoint.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedseg.cli import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "personalize",
        help="write this site's personal model (FedPer, FedRep, Ditto, fine-tuning) as one checkpoint",
        description="Run at a site: writes a full SegmentationModule checkpoint that `fedseg evaluate` and "
        "`fedseg predict` take, from a global checkpoint of the job and the site's stored personal part: "
        "FedPer's or FedRep's head (<store>/<study>.pt) with the global encoder "
        "(RUN/checkpoints/{best,final}_global_encoder.ckpt); Ditto's or the fine-tuned model "
        "(<study>.ditto.pt, <study>.finetune.pt) with the final global checkpoint, which gives its settings.",
    )
    p.add_argument("global_checkpoint", type=Path, metavar="GLOBAL",
                   help="the job's global checkpoint: RUN/checkpoints/{best,final}_global_encoder.ckpt (FedPer, "
                   "FedRep) or final_global.ckpt (Ditto, fine-tuning)")
    p.add_argument("stored", type=Path, metavar="STORED",
                   help="the site's personal model store file: <store>/<study>.pt, <study>.ditto.pt or "
                   "<study>.finetune.pt (the store is the site config's head_store)")
    p.add_argument("--out", type=Path, required=True, help="output checkpoint")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from fedseg.app.fedper import personalize
    from fedseg.lightning_modules.owner_only import owner_only_files

    for path in (args.global_checkpoint, args.stored):
        if not path.is_file():
            raise UserError(f"{path}: not found")
    try:
        # a model trained on the site's patients: the checkpoint is 0600 (and any folder made for it 0700)
        with owner_only_files():
            out = personalize(args.global_checkpoint, args.stored, args.out)
    except ValueError as err:
        raise UserError(str(err)) from None
    print(f"personalized model written to {out}")
    return 0
