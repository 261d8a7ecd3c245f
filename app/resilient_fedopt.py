"""Server workflow: FedOpt (a server optimizer on the averaged update) with fedseg's resilient round.

NVFlare 2.9's ``FedOpt`` (nvflare/app_opt/pt/fedopt_ctl.py) is a ``FedAvg`` whose ``update_model``
treats the sites' averaged weight change as a gradient for a torch optimizer on the server.
``ResilientFedOpt`` puts it before ``ResilientFedAvg`` in the class order: ``FedOpt.run`` builds the
optimizer and hands over to ``ResilientFedAvg.run`` (round timeout, minimum of sites, report), whose
rounds call ``FedOpt.update_model``. The sites send weight differences (``TransferType.DIFF``).
"""

from __future__ import annotations

from typing import Any

import torch
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_opt.pt.fedopt_ctl import FedOpt

from fedseg.app.resilient_fedavg import ResilientFedAvg

#: a server learning rate that stays as set: FedOpt requires a scheduler, fedseg's FedOpt uses none
CONSTANT_LR = {"path": "torch.optim.lr_scheduler.ConstantLR", "args": {"factor": 1.0, "total_iters": 0}}


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

    def __init__(self, *args: Any, device: str = "cpu", **kwargs: Any) -> None:
        super().__init__(*args, device=device, **kwargs)
        # FedOpt keeps a torch.device; the job exporter writes constructor arguments from attributes
        # of that name and cannot write a torch.device. A device string works everywhere it is used.
        self.device = str(self.device)

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
        return updated
