"""FedAvg: the sites' updates averaged by case count, in fedseg's resilient round.

NVFlare's ``FedAvgRecipe`` (in-time weighted averaging; each site weighs its update by its number
of training cases) whose controller is ``ResilientFedAvg`` (round timeout, minimum of sites,
participation report) or, with the ``groups`` add-on, ``GroupedFedAvg``.
"""

from __future__ import annotations

from fedseg.jobs.base import Algorithm


class FedAvg(Algorithm):
    """Federated averaging (McMahan et al. 2017), weighted by each site's training cases."""

    name = "fedavg"
    description = "federated averaging, weighted by each site's training cases"
    # its recipe is Algorithm's default: the resilient FedAvg round


ALGORITHM = FedAvg
