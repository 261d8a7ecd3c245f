"""APFL: the global model trains as in FedAvg; each site also keeps a local model and a mixing weight.

Adaptive Personalized Federated Learning (Deng et al. 2020), as FL4Health implements it
(``fl4health/model_bases/apfl_base.py``): each site keeps a local model ``v`` and a mixing weight
``alpha`` it learns, and its personal prediction mixes the two models' OUTPUTS (logits),
``alpha * v(x) + (1 - alpha) * w(x)``, where ``w`` is the global model. The global model trains as in
FedAvg and is the only thing that leaves the site. After its FedAvg update has left, a site trains
``v`` and ``alpha`` on the same cases on the loss of the mixed output, with ``w`` (this round's global
model) frozen; ``alpha`` takes its own gradient step (``apfl_alpha_lr``) and is clipped to [0, 1]
(``fedseg.app.apfl``). ``v`` and ``alpha`` live in the site's store; at the end of the job the site
scores the mixture of its ``v`` and ``alpha`` with the final global model on its own validation cases.

Site compute: ``local_epochs`` for the global model as in FedAvg, then ``personal_epochs`` of the
mixture, whose steps also run the frozen global model forward (no backward through it): a mixture
epoch took 1.04-1.24 times a plain one on a CPU, so about 2.1-2.3 times FedAvg's site compute with
the defaults (Ditto: 2 times), and three networks in memory at the site.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedseg.config import setting
from fedseg.jobs.base import RESULT_TASKS, Algorithm, Job


@dataclass(frozen=True)
class ApflOptions:
    apfl_alpha: float = setting(0.5, "apfl: initial weight of each site's local model in its mixture with the global "
                                "one (0: the global model only, 1: the local model only)")
    apfl_alpha_lr: float = setting(0.01, "apfl: learning rate of the mixing weight (plain gradient steps, clipped to [0, 1])")
    personal_epochs: int = setting(0, "ditto/apfl: epochs of the personal model per round (0: the round's local epochs)")

    def __post_init__(self) -> None:
        if not 0.0 <= self.apfl_alpha <= 1.0:
            raise ValueError(f"apfl_alpha must be in [0, 1], got {self.apfl_alpha!r}")
        if not self.apfl_alpha_lr >= 0 or self.personal_epochs < 0:
            raise ValueError("apfl_alpha_lr and personal_epochs must be >= 0")


class Apfl(Algorithm):
    """Adaptive personalized federated learning (Deng et al. 2020)."""

    name = "apfl"
    description = "a local model per site mixed with the global one by a learned weight"
    options = ApflOptions
    personal = True
    site_plugin = "fedseg.app.apfl:ApflPlugin"
    addons = frozenset({"privacy", "contribution", "wandb", "resume", "quantize"})

    def finish(self, recipe: Any, job: Job) -> None:
        """The server's audit of every result's parameter names: it shows that no part of a site's
        local model or mixing weight reached the server (they are in another module at the site,
        ``fedseg.app.apfl.MixedSegmentation``, never in the model a site sends)."""
        from fedseg.app.payload_audit import PayloadKeyAudit

        for task in RESULT_TASKS:  # one registration per task, as FedPer's (exact task names)
            recipe.add_server_input_filter(PayloadKeyAudit(), tasks=[task])


ALGORITHM = Apfl
