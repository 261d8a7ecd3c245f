"""NVFlare's FedAvg and FedProx recipes with fedseg's resilient round (``ResilientFedAvg``), and
FedOpt as a FedAvg recipe whose controller is ``ResilientFedOpt``.

The recipes build their server controller in ``_create_controller``, the hook NVFlare keeps for
framework recipes to extend (nvflare/recipe/fedavg.py); everything else (persistor, model
selector, script runner, filters) stays the recipe's own.
"""

from __future__ import annotations

from typing import Any

from nvflare.app_opt.pt.recipes.fedavg import FedAvgRecipe
from nvflare.app_opt.pt.recipes.fedprox import FedProxRecipe
from nvflare.recipe.utils import ensure_config_type_dict

from fedseg import nvflare_internals
from fedseg.app.grouped_fedavg import GroupedFedAvg
from fedseg.app.resilient_fedavg import ResilientFedAvg
from fedseg.app.resilient_fedopt import CONSTANT_LR, ResilientFedOpt

#: server component id of the torch model ``ResilientFedOpt``'s optimizer steps
FEDOPT_MODEL_ID = "fedopt_model"


class _ResilientRound:
    """Mixin: the recipe's ``FedAvg`` controller becomes ``ResilientFedAvg`` with these settings."""

    def __init__(
        self,
        *,
        round_timeout: int,
        min_sites: int,
        start_round: int = 0,
        grouped: bool = False,
        shared_keys: list[str] | None = None,
        server_optimizer: dict[str, Any] | None = None,
        optimizer_state: str = "",
        personalize: bool = False,
        **kwargs: Any,
    ) -> None:
        self.personalize = personalize
        self.round_timeout, self.min_sites, self.start_round = round_timeout, min_sites, start_round
        self.grouped, self.shared_keys = grouped, shared_keys
        self.server_optimizer, self.optimizer_state = server_optimizer, optimizer_state
        super().__init__(**kwargs)  # type: ignore[call-arg]

    def _create_controller(self, persistor_id: str, model_params: Any, model_aggregator: Any) -> ResilientFedAvg:
        """NVFlare's FedAvg controller of this recipe, as ``ResilientFedAvg``, ``GroupedFedAvg`` or
        (with a server optimizer) ``ResilientFedOpt``."""
        base = super()._create_controller(persistor_id, model_params, model_aggregator)  # type: ignore[misc]
        # Same arguments as the recipe's own FedAvg (read back from it, so none is forgotten when
        # NVFlare adds one), plus the round's timeout, its minimum and the resume round.
        extra: dict[str, Any] = {"shared_keys": self.shared_keys} if self.grouped else {}
        if self.personalize:
            extra["personalize"] = True
        controller = GroupedFedAvg if self.grouped else ResilientFedAvg
        if self.server_optimizer is not None:
            controller = ResilientFedOpt
            # config_type "dict": the job loader must pass these through, not build them (an optimizer
            # needs the model's parameters, which FedOpt.run gives it); FedOptRecipe does the same.
            extra = dict(extra, source_model=FEDOPT_MODEL_ID, optimizer_args=ensure_config_type_dict(self.server_optimizer),
                         lr_scheduler_args=ensure_config_type_dict(CONSTANT_LR), device="cpu",
                         optimizer_state=self.optimizer_state)
        return controller(
            **extra,
            num_clients=base.num_clients,
            num_rounds=base.num_rounds,
            start_round=self.start_round,
            persistor_id=nvflare_internals.persistor_id(base),
            model=base.model,
            save_filename=base.save_filename,
            aggregator=base.aggregator,
            stop_cond=base.stop_cond,
            patience=base.patience,
            task_name=base.task_name,
            exclude_vars=base.exclude_vars,
            aggregation_weights=base.aggregation_weights or None,
            memory_gc_rounds=base.memory_gc_rounds,
            enable_tensor_disk_offload=base.enable_tensor_disk_offload,
            fedprox_mu=base.fedprox_mu,
            round_timeout=self.round_timeout,
            min_sites=self.min_sites,
            # how often the round's wait (and NVFlare's task monitor) checks for the last answer:
            # NVFlare's 0.5 s (and 0.2 s) add up to 0.7 s to every round; the check is an in-memory
            # count, so 0.05 s costs the server nothing (fedseg.app.task_timing)
            task_check_period=0.05,
        )


class ResilientFedAvgRecipe(_ResilientRound, FedAvgRecipe):
    """``FedAvgRecipe`` whose rounds end on time and survive a failing site."""


class ResilientFedProxRecipe(_ResilientRound, FedProxRecipe):
    """``FedProxRecipe`` whose rounds end on time and survive a failing site."""
