"""FedRep: FedPer's split (a shared encoder, a personal head), trained in two phases each round.

Each round the site first trains its head with the received encoder frozen (``head_epochs``), then
the encoder with its head frozen (the rest of the round's ``local_epochs``), and sends only the
encoder (Collins et al. 2021, as FL4Health's FedRep client does). The server side is FedPer's:
an encoder-only global model, the head filtered out of every result, the payload audit.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedseg.config import profile, setting
from fedseg.jobs.base import Job
from fedseg.jobs.fedper import FedPer, FedPerOptions


@dataclass(frozen=True)
class FedRepOptions(FedPerOptions):
    """FedPer's options (the personal head, FedBN) and how a round splits its epochs."""

    head_epochs: int = setting(1, "fedrep: epochs of each round that train the head (the encoder frozen); "
                               "the rest of the round's local epochs train the encoder (the head frozen)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.head_epochs < 1:
            raise ValueError(f"head_epochs must be >= 1, got {self.head_epochs}")


class FedRep(FedPer):
    """Exploiting shared representations (Collins et al. 2021): head first, then the shared encoder."""

    name = "fedrep"
    description = "FedPer's split, each round training the head first, then the encoder"
    options = FedRepOptions
    site_plugin = "fedseg.app.personalization:FedRepPlugin"
    compare_variants = {}

    def study_job(self) -> Job:
        """A round's epochs are split between head and encoder: 25 rounds of 2 epochs, the study's 50
        epochs per case."""
        return Job(algorithm=self.name, study=profile("study").override(rounds=25, local_epochs=2), name=self.name)

    def check(self, job: Job) -> None:
        epochs = job.study.federation.local_epochs
        if job.options.head_epochs >= epochs:
            raise ValueError(f"fedrep: head_epochs ({job.options.head_epochs}) must be fewer than the round's "
                             f"local_epochs ({epochs}): the encoder trains in the epochs left")


ALGORITHM = FedRep
