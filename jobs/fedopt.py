"""FedOpt: the averaged update applied by a server optimizer (SGD with momentum: FedAvgM; or Adam).

A FedAvg recipe whose controller is ``ResilientFedOpt`` (``fedseg.app.resilient_fedopt``): NVFlare's
``FedOptRecipe`` runs ScatterAndGather, which has no round timeout or minimum of sites; its
ModelController form, ``FedOpt``, takes fedseg's resilient round. The sites send weight differences
(the server optimizer's gradient) and the optimizer steps the component ``FEDOPT_MODEL_ID``, a
``SegmentationModule`` built from the job's arguments. A resumed FedOpt study also restores the
server optimizer's state (its momentum) saved beside the global checkpoint, which the job carries.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedseg.config import setting
from fedseg.jobs.base import Algorithm, Job

SERVER_OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class FedOptOptions:
    server_optimizer: str = setting("sgd", "fedopt: server optimizer", choices=SERVER_OPTIMIZERS)
    server_lr: float = setting(1.0, "fedopt: server learning rate")
    server_momentum: float = setting(0.6, "fedopt: server SGD momentum")

    def __post_init__(self) -> None:
        if self.server_optimizer not in SERVER_OPTIMIZERS:
            raise ValueError(f"unknown server optimizer {self.server_optimizer!r}; known: {', '.join(SERVER_OPTIMIZERS)}")
        if not self.server_lr > 0 or not 0 <= self.server_momentum < 1:
            raise ValueError("server_lr must be > 0 and server_momentum in [0, 1)")


class FedOpt(Algorithm):
    """Adaptive federated optimization (Reddi et al. 2021): a server optimizer on the averaged update."""

    name = "fedopt"
    description = "a server optimizer, SGD with momentum or Adam, on the averaged update"
    options = FedOptOptions
    # FedOpt's own update replaces the aggregate: no contribution weights or per-group models
    addons = frozenset({"privacy", "wandb", "resume", "quantize"})

    def recipe(self, job: Job, common: dict[str, Any], round_args: dict[str, Any]) -> Any:
        from nvflare.client.config import TransferType

        from fedseg import nvflare_internals
        from fedseg.jobs.resilient_recipes import FEDOPT_MODEL_ID, ResilientFedAvgRecipe
        from fedseg.app.global_model import GlobalModel

        o = job.options
        if o.server_optimizer == "adam":
            optimizer = {"path": "torch.optim.Adam", "args": {"lr": o.server_lr, "betas": [0.9, 0.99]}}
        else:
            optimizer = {"path": "torch.optim.SGD", "args": {"lr": o.server_lr, "momentum": o.server_momentum}}
        state_file = _optimizer_state(job, round_args.get("start_round", 0))
        recipe = ResilientFedAvgRecipe(key_metric="val_dice", key_metric_mode="max", server_optimizer=optimizer,
                                       params_transfer_type=TransferType.DIFF,
                                       # read on the server, as the checkpoint is (fedseg.jobs.base.resume_start)
                                       optimizer_state=str(state_file.resolve()) if state_file else "",
                                       **round_args, **common)
        model = GlobalModel(**common["model"]["args"])  # the exporter writes its network arguments back
        nvflare_internals.fed_job(recipe).to_server(model, id=FEDOPT_MODEL_ID)
        return recipe


def _optimizer_state(job: Job, start_round: int) -> Path | None:
    """The server optimizer's state beside the checkpoint a FedOpt study resumes from (None when not resuming).

    ``ValueError`` when it is missing or from another round: resuming without it would restart the
    momentum from zero, a different algorithm than the study ran.
    """
    if not start_round:
        return None
    from fedseg.app.resilient_fedopt import OPTIMIZER_STATE_FILE, read_optimizer_state
    from fedseg.jobs.resume import find_resume_point

    checkpoint = find_resume_point(Path(job.addons.resume_from)).checkpoint
    state_file = checkpoint.parent / OPTIMIZER_STATE_FILE
    if not state_file.is_file():
        raise ValueError(f"{state_file}: not found. A FedOpt study resumes with its server optimizer's state (its "
                         "momentum), saved beside the global checkpoint; without it the momentum would restart from zero")
    saved_round = read_optimizer_state(state_file)["round"]
    if saved_round + 1 != start_round:
        raise ValueError(f"{state_file} is from round {saved_round + 1}, the checkpoint {checkpoint} from round "
                         f"{start_round}: they must belong together")
    return state_file


ALGORITHM = FedOpt
