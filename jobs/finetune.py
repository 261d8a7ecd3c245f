"""Fine-tuning after FedAvg: the cheap personalization baseline.

FedAvg's rounds, then each site trains the final global model further on its own training cases
(``finetune_epochs`` at ``finetune_lr_factor`` times the study's learning rate, cosine to zero) and
keeps the result at the site (its store); only its validation scores leave it. That costs each site
``finetune_epochs`` epochs on top of FedAvg's budget.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedseg.config import setting
from fedseg.jobs.fedavg import FedAvg


@dataclass(frozen=True)
class FineTuneOptions:
    finetune_epochs: int = setting(5, "finetune: epochs each site trains the final global model on its own cases")
    finetune_lr_factor: float = setting(0.3, "finetune: its learning rate, as a fraction of the study's")

    def __post_init__(self) -> None:
        if self.finetune_epochs < 1 or not self.finetune_lr_factor > 0:
            raise ValueError("finetune_epochs must be >= 1 and finetune_lr_factor > 0")


class FineTune(FedAvg):
    """FedAvg followed by local fine-tuning of the final global model at each site."""

    name = "finetune"
    description = "FedAvg, then each site fine-tunes the final global model on its own cases"
    options = FineTuneOptions
    personal = True
    site_plugin = "fedseg.app.personalization:FineTunePlugin"
    addons = frozenset({"privacy", "contribution", "wandb", "resume", "quantize"})


ALGORITHM = FineTune
