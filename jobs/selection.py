"""Per-site model selection: each site keeps whichever of its candidate models is best on its own cases.

Each site holds out a small inner split of its training cases (``select_fraction``, at least one
case) that no candidate trains on, and trains three candidates on the rest:

- the **global** model, by FedAvg's rounds (the only model that leaves the site);
- its **personal** model, Ditto's (pulled towards each round's global model, ``ditto_lambda``);
- a **local** model trained on the site's own cases only, ``local_epochs`` per round from the first
  global model it receives (as long as ``fedseg compare``'s local-only training).

At the end of the job (``personalize`` task) the site scores the three on its inner split and keeps
the best one (or, with ``select_on="validation"``, on its validation cases, which no candidate trains
on either: nothing is held out from training then, but the validation cases are no longer an
unbiased score of the chosen model, so ``fedseg compare`` runs that variant, ``select-val``, only
where it reports on held-out test cases) (``fedseg.app.model_selection``). The chosen model and the scores behind the choice stay
at the site; only the choice's name (an index into ``protocol.SELECT_CANDIDATES``) and the chosen
model's own scores leave it. The inner split decides on cases the site does not report on (its
validation and test cases), so the choice is not tuned on what is scored.

Cost: each site trains three models a round (``local_epochs`` global, ``personal_epochs`` personal,
``local_epochs`` local): about three times FedAvg's site compute, and each candidate trains on the
site's training cases minus the inner split (a 3-case site trains on 2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedseg.config import setting
from fedseg.jobs.base import RESULT_TASKS, Algorithm, Job
from fedseg.jobs.ditto import DittoOptions


#: what a site chooses its model on: an inner split of its training cases, or its validation cases
SELECT_ON: tuple[str, ...] = ("inner", "validation")


@dataclass(frozen=True)
class SelectOptions(DittoOptions):
    select_fraction: float = setting(0.2, "select: share of each site's training cases held out from every candidate's "
                                          "training to choose its model on (at least 1 case)")
    select_on: str = setting("inner", "select: choose on the inner split of the training cases, or on the site's "
                                      "validation cases (no case held out from training; only where the results are "
                                      "reported on other, held-out test cases)", choices=SELECT_ON)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.select_fraction < 1.0:
            raise ValueError(f"select_fraction must be in (0, 1), got {self.select_fraction!r}")
        if self.select_on not in SELECT_ON:
            raise ValueError(f"select_on must be one of {', '.join(SELECT_ON)}, got {self.select_on!r}")


class Select(Algorithm):
    """Per-site choice between the global model, a Ditto personal model and a local-only model."""

    name = "select"
    description = ("each site keeps the best of the global model, its Ditto model and its own local-only model, "
                   "chosen on training cases it holds out")
    options = SelectOptions
    personal = True
    site_plugin = "fedseg.app.model_selection:SelectionPlugin"
    addons = frozenset({"privacy", "contribution", "wandb", "resume", "quantize"})
    compare_variants = {"select-val": {"select_on": "validation"}}

    def selects_on_validation(self, options: Any) -> bool:
        return options is not None and options.select_on == "validation"

    def finish(self, recipe: Any, job: Job) -> None:
        """The server's audit of every result's names (``metrics/payload_keys.jsonl``): a site's train
        results hold the global model's keys, its ``personalize`` answer scalars only."""
        from fedseg.app.payload_audit import PayloadKeyAudit

        for task in RESULT_TASKS:  # one registration per task, as APFL's (exact task names)
            recipe.add_server_input_filter(PayloadKeyAudit(), tasks=[task])


ALGORITHM = Select
