"""Server workflow: FedOpt (a server optimizer on the averaged update) with fedseg's resilient round.

NVFlare 2.9's ``FedOpt`` (nvflare/app_opt/pt/fedopt_ctl.py) is a ``FedAvg`` whose ``update_model``
treats the sites' averaged weight change as a gradient for a torch optimizer on the server.
``ResilientFedOpt`` puts it before ``ResilientFedAvg`` in the class order: ``FedOpt.run`` builds the
optimizer and hands over to ``ResilientFedAvg.run`` (round timeout, minimum of sites, report), whose
rounds call ``FedOpt.update_model``. The sites send weight differences (``TransferType.DIFF``).

The server optimizer's state (SGD momentum, Adam moments) is part of the study: after every round
it is written atomically beside the global model (``<app dir>/fedopt_optimizer.pt``, with the
round), and a resumed study (``optimizer_state``: that file, bundled into the job) starts from it,
so FedAvgM's momentum goes on instead of restarting from zero. The state also reaches the durable
study store with every round (``fedseg.app.study_store``); a job continued from the store
(``resume_from_store``) restores the state saved with the round it continues from.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_opt.pt.fedopt_ctl import FedOpt

from fedseg.app.resilient_fedavg import ResilientFedAvg

#: a server learning rate that stays as set: FedOpt requires a scheduler, fedseg's FedOpt uses none
CONSTANT_LR = {"path": "torch.optim.lr_scheduler.ConstantLR", "args": {"factor": 1.0, "total_iters": 0}}
#: the server optimizer's state, saved beside the global model after every round
OPTIMIZER_STATE_FILE = "fedopt_optimizer.pt"


def read_optimizer_state(path: str | os.PathLike) -> dict[str, Any]:
    """``{"round": r, "state": optimizer.state_dict()}`` as saved, read without running code."""
    from fedseg.lightning_modules.safe_load import load_checkpoint

    saved = load_checkpoint(path)
    if not isinstance(saved, dict) or not {"round", "state"} <= set(saved):
        raise ValueError(f"{path}: not a fedseg FedOpt optimizer state")
    return saved


class ResilientFedOpt(FedOpt, ResilientFedAvg):
    """``FedOpt`` whose rounds end on time and survive a failing site.

    Args:
        source_model: id of the server component holding the torch model the optimizer steps.
        optimizer_args, lr_scheduler_args: ``{"path": ..., "args": ...}`` of the server optimizer
            and its scheduler (``CONSTANT_LR``: none).
        device: where the server optimizer runs, e.g. ``"cpu"``.
        *args, **kwargs: ``ResilientFedAvg`` arguments (``round_timeout``, ``min_sites``, ...).
    """

    #: written into the exported job even when equal to FedOpt's defaults: the job says what it runs
    _always_serialize_args = ("optimizer_args", "lr_scheduler_args", "device")

    def __init__(self, *args: Any, device: str = "cpu", optimizer_state: str = "", **kwargs: Any) -> None:
        super().__init__(*args, device=device, **kwargs)
        # FedOpt keeps a torch.device; the job exporter writes constructor arguments from attributes
        # of that name and cannot write a torch.device. A device string works everywhere it is used.
        self.device = str(self.device)
        #: a resumed study's optimizer state: the file name in the server app's custom/ folder
        self.optimizer_state = optimizer_state

    def _initial_model(self) -> FLModel | None:
        """The initial global model; a resumed study's optimizer state is restored with it."""
        model = super()._initial_model()
        if model is not None and self._store_resume:
            path = os.path.join(self._store_resume[1], OPTIMIZER_STATE_FILE)
            if os.path.isfile(path):
                saved = read_optimizer_state(path)
                self.optimizer.load_state_dict(saved["state"])
                self.info(f"FedOpt: server optimizer state of round {saved['round'] + 1} restored from the study store")
                return model
            self.warning(f"FedOpt: no optimizer state in {self._store_resume[1]}; the server optimizer starts afresh")
            return model
        if model is not None and self.optimizer_state:
            # an absolute path on the server (jobs carry no files); a bare name: an older job's custom/ file
            path = (self.optimizer_state if os.path.isabs(self.optimizer_state)
                    else os.path.join(self.get_app_dir(), "custom", self.optimizer_state))
            saved = read_optimizer_state(path)
            self.optimizer.load_state_dict(saved["state"])
            self.info(f"FedOpt: server optimizer state of round {saved['round'] + 1} restored from {self.optimizer_state}")
        return model

    def update_model(self, global_model: FLModel, aggr_result: FLModel) -> FLModel:
        # The optimizer steps its own copy of the model, built fresh from the job's config; the
        # global model is the truth (a resumed study's checkpoint, or a round FedOpt did not make).
        # An in-place copy keeps the optimizer's momentum on the same tensors.
        with torch.no_grad():
            self.torch_model.load_state_dict({k: torch.as_tensor(v) for k, v in global_model.params.items()})
        updated = super().update_model(global_model, aggr_result)
        # FedOpt returns numpy views of the optimizer model's own parameters; the PyTorch persistor
        # and the sites' exchange format want tensors, and a global model the next step cannot change.
        updated.params = {k: torch.tensor(v) for k, v in updated.params.items()}
        self._save_optimizer_state()
        return updated

    def _durable_files(self) -> tuple[str, ...]:
        return (*super()._durable_files(), OPTIMIZER_STATE_FILE)

    def _save_optimizer_state(self) -> None:
        path = os.path.join(self.get_app_dir(), OPTIMIZER_STATE_FILE)
        tmp = f"{path}.tmp"
        torch.save({"round": self.current_round, "state": self.optimizer.state_dict()}, tmp)
        os.replace(tmp, path)
