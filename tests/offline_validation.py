"""Scoring a global model outside NVFlare: what a site's validation of it must equal."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from fedseg.jobs.base import Job


def validate_state(state: Mapping[str, torch.Tensor], job: Job, datalist: Path) -> float:
    """val_dice of the global model ``state`` on one site's validation cases, as that site computes it."""
    import pytorch_lightning as pl

    from fedseg.lightning_modules.data.datalist import read_datalist
    from fedseg.lightning_modules.module import SegmentationModule
    from fedseg.lightning_modules.training import build_datamodule

    model = SegmentationModule(**job.study.module_args())
    model.load_state_dict(dict(state))
    data = build_datamodule(job.study, read_datalist(datalist), cache_dir=None)
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_checkpointing=False, accelerator="cpu")
    return float(trainer.validate(model, datamodule=data, verbose=False)[0]["val_dice"])


def validate_checkpoint(checkpoint: Path, job: Job, datalist: Path) -> float:
    """val_dice of a global checkpoint (NVFlare's ``{"model": state}`` file) on one site's validation cases."""
    return validate_state(torch.load(checkpoint, weights_only=True)["model"], job, datalist)
