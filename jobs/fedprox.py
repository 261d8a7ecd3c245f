"""FedProx: FedAvg plus the proximal term ``mu/2 ||w - w_global||^2`` at every site.

NVFlare's ``FedProxRecipe`` in fedseg's resilient round; the term is added to the site's gradients
by NVFlare's Lightning patch (the server sends ``mu`` with the global model).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedseg.config import setting
from fedseg.jobs.base import Algorithm, Job


@dataclass(frozen=True)
class FedProxOptions:
    fedprox_mu: float = setting(0.01, "fedprox: weight of the proximal term")

    def __post_init__(self) -> None:
        if not self.fedprox_mu >= 0:
            raise ValueError(f"fedprox_mu must be >= 0, got {self.fedprox_mu}")


class FedProx(Algorithm):
    """FedAvg with a proximal term that keeps each site's update near the global model (Li et al. 2020)."""

    name = "fedprox"
    description = "FedAvg with a proximal term at each site"
    options = FedProxOptions

    def recipe(self, job: Job, common: dict[str, Any], round_args: dict[str, Any]) -> Any:
        from fedseg.jobs.resilient_recipes import ResilientFedProxRecipe

        return ResilientFedProxRecipe(key_metric="val_dice", key_metric_mode="max", fedprox_mu=job.options.fedprox_mu,
                                      **round_args, **common)


ALGORITHM = FedProx
