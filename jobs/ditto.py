"""Ditto: the global model trains as in FedAvg; each site also keeps a personal model beside it.

After its FedAvg update has left, a site trains its personal model on the same cases with the
proximal term ``lambda/2 ||w_personal - w_global||^2`` towards the global model it received that
round (Li et al. 2021; NVFlare's ``PTDittoHelper`` has the same loss, but drives a plain PyTorch
loop: here a Lightning callback adds the term's gradient, ``fedseg.app.personalization``). Only the
global model's update leaves the site; the personal model lives in the site's store. Each site
trains ``local_epochs`` for the global model and ``personal_epochs`` for its own: twice FedAvg's
site compute with the defaults.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedseg.config import setting
from fedseg.jobs.base import Algorithm


@dataclass(frozen=True)
class DittoOptions:
    ditto_lambda: float = setting(0.01, "ditto: weight of the pull of each personal model towards the global one")
    personal_epochs: int = setting(0, "ditto/apfl: epochs of the personal model per round (0: the round's local epochs)")

    def __post_init__(self) -> None:
        if not self.ditto_lambda >= 0 or self.personal_epochs < 0:
            raise ValueError("ditto_lambda and personal_epochs must be >= 0")


class Ditto(Algorithm):
    """Fair and robust federated learning through personalization (Li et al. 2021)."""

    name = "ditto"
    description = "a personal model per site beside the global one, pulled towards it"
    options = DittoOptions
    personal = True
    site_plugin = "fedseg.app.personalization:DittoPlugin"
    addons = frozenset({"privacy", "contribution", "wandb", "resume", "quantize"})


ALGORITHM = Ditto
