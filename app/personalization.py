"""The site side of the personalized methods: what each keeps at the site and how it trains it.

Each is a ``fedseg.app.site_plugin.SitePlugin`` made with its algorithm's options dataclass; the
algorithm's declaration names it (``fedseg.jobs.<name>``: ``Algorithm.site_plugin``) and the site
runner makes it from the job's options. All of them keep their personal part in the site's store
(``PersonalModelStore``: atomic, owner-only, surviving restarts and later jobs of the same study)
and never send it; at the end of the job
(``personalize`` task) each makes its personal model and the runner scores it on the site's own
validation cases.

- **FedPer** (Arivazhagan et al. 2019): the head (the decoder levels nearest the output) stays; only
  the encoder is sent, and the received encoder is loaded under the site's own head.
- **FedRep** (Collins et al. 2021): FedPer's split, trained in two phases each round: the head with
  the received encoder frozen (``head_epochs``), then the encoder with the head frozen.
- **Ditto** (Li et al. 2021): the global model trains as in FedAvg; beside it a personal model
  trains on the same cases with the proximal term ``lambda/2 ||w_personal - w_global||^2`` towards
  the global model received that round.
- **Fine-tuning**: FedAvg, then the final global model trained further on the site's own cases.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pytorch_lightning import Callback

from fedseg.app.site_plugin import SitePlugin, progress

if TYPE_CHECKING:  # the options dataclasses are declared with their algorithms; the runner runs the plug-ins
    from fedseg.app.personal_store import PersonalModelStore
    from fedseg.app.site_runner import SiteRunner
    from fedseg.jobs.ditto import DittoOptions
    from fedseg.jobs.fedper import FedPerOptions
    from fedseg.jobs.fedrep import FedRepOptions
    from fedseg.jobs.finetune import FineTuneOptions


class SharedKeysMismatch(RuntimeError):
    """The model the server sent does not have exactly the keys this site shares."""


class FedPerPlugin(SitePlugin):
    """The personal head stays here: only shared keys are sent, the received encoder is loaded
    without touching the head, and the head lives in the site's ``PersonalModelStore``."""

    strict_load = False

    def __init__(self, options: FedPerOptions) -> None:
        self.keep_norm_local = options.keep_norm_local
        self.personal_head = options.personal_head
        self.personal: list[str] = []
        self.shared: list[str] = []
        self.store: Any = None

    def setup(self, runner: SiteRunner) -> None:
        from fedseg.app.fedper import SharedKeysFLCallback, personal_keys

        self.personal = personal_keys(runner.model, self.keep_norm_local, self.personal_head)
        self.shared = [k for k in runner.model.state_dict() if k not in set(self.personal)]
        self._callback = SharedKeysFLCallback(self.shared, load_state_dict_strict=False)
        self.store = _store(runner)
        record = self.store.load_into(runner.model, self.personal)
        progress(f"[fedseg] {runner.site}: personal head ({self.personal_head}, {len(self.personal)} tensors) " + (
            f"reused from {self.store.path} (global round {record.global_round})" if record
            else "new (site new to the study)"))

    def callbacks(self) -> list[Any]:
        return [self._callback]

    def check_received(self, runner: SiteRunner, input_model: Any) -> None:
        """The received encoder must be exactly this site's shared keys: the model is loaded without
        its head (non-strictly), so a naming drift between server and site would otherwise leave
        encoder weights silently unloaded."""
        received = set(input_model.params or {})
        if received and received != set(self.shared):
            missing, unexpected = sorted(set(self.shared) - received), sorted(received - set(self.shared))
            raise SharedKeysMismatch(
                f"the server sent {len(received)} parameters, not this site's {len(self.shared)} shared encoder keys "
                f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
                f"{'...' if len(unexpected) > 3 else ''}): the job's network differs from the site's")

    def after_round(self, runner: SiteRunner, input_model: Any) -> None:
        self.store.save(runner.model, self.personal, global_round=input_model.current_round, job_id=runner.job_id)

    def after_failure(self, runner: SiteRunner) -> None:
        self.store.load_into(runner.model, self.personal)  # drop the half-trained head of the failed round

    def shareable(self, state: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in state.items() if k not in set(self.personal)}

    def personal_model(self, runner: SiteRunner, input_model: Any) -> Any:
        """The final encoder under this site's own head."""
        runner.model.load_state_dict(dict(input_model.params), strict=False)
        return runner.model


class HeadThenEncoder(Callback):
    """FedRep's round: the first ``head_epochs`` epochs train the head only, the rest the encoder only.

    NVFlare's Lightning patch continues the fit loop across rounds, so a round's epochs are counted
    from the epoch its fit started at. Frozen parameters get no gradient, so AdamW leaves them alone.
    """

    def __init__(self, head_keys: list[str], head_epochs: int) -> None:
        self.head = set(head_keys)
        self.head_epochs = head_epochs
        self.first_epoch = 0

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.first_epoch = trainer.current_epoch

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        head_phase = trainer.current_epoch - self.first_epoch < self.head_epochs
        for name, parameter in pl_module.named_parameters():
            parameter.requires_grad_((name in self.head) == head_phase)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        for parameter in pl_module.parameters():
            parameter.requires_grad_(True)


class FedRepPlugin(FedPerPlugin):
    """FedPer's split, trained head first (encoder frozen), then encoder (head frozen)."""

    def __init__(self, options: FedRepOptions) -> None:
        super().__init__(options)
        self.head_epochs = options.head_epochs

    def callbacks(self) -> list[Any]:
        return [HeadThenEncoder(self.personal, self.head_epochs), *super().callbacks()]


class ProximalTerm(Callback):
    """Adds ``lambda (w - w_ref)`` to each parameter's gradient: the gradient of
    ``lambda/2 ||w - w_ref||^2``, as NVFlare's Lightning FedProx does (nvflare/app_opt/lightning/fedprox.py)."""

    def __init__(self, reference: dict[str, torch.Tensor], weight: float) -> None:
        self.reference = reference
        self.weight = weight

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        with torch.no_grad():
            for name, parameter in pl_module.named_parameters():
                if parameter.grad is not None and name in self.reference:
                    parameter.grad.add_(parameter - self.reference[name].to(parameter.device), alpha=self.weight)


def _store(runner: SiteRunner, kind: str = "") -> PersonalModelStore:
    """This site's store of personal models for the job's study (``kind``: which personal model)."""
    from fedseg.app.personal_store import PersonalModelStore
    from fedseg.app.site_config import default_head_store

    return PersonalModelStore(runner.config.head_store or default_head_store(runner.site), runner.job.study_name, kind=kind)


def _local_trainer(runner: SiteRunner, folder: str, epochs: int, callbacks: list[Any]) -> Any:
    """An unpatched Trainer: what trains a personal model never talks to the server."""
    from fedseg.lightning_modules.training import make_trainer

    return make_trainer(Path.cwd() / folder, epochs, callbacks=callbacks, logger=False, progress=False,
                        enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0)


class DittoPlugin(SitePlugin):
    """A personal model beside the global one, pulled towards the global model of each round."""

    #: the store's kind (``<study>.ditto.pt``)
    store_kind = "ditto"

    def __init__(self, options: DittoOptions) -> None:
        from nvflare.app_opt.lightning.callbacks import RestoreState

        self.ditto_lambda = options.ditto_lambda
        self.personal_epochs = options.personal_epochs
        self.model: Any = None
        self.store: Any = None
        self.keys: list[str] = []
        # the personal model's AdamW moments and cosine schedule go on from round to round, as the
        # global model's do at the site (NVFlare's Lightning patch keeps them with the same callback)
        self.optimizer_state = RestoreState()

    def setup(self, runner: SiteRunner) -> None:
        from fedseg.lightning_modules.module import SegmentationModule

        epochs = self.personal_epochs or runner.job.study.federation.local_epochs
        self.personal_epochs = epochs
        args = {**runner.job.study.module_args(), "max_epochs": runner.job.study.federation.rounds * epochs}
        self.model = SegmentationModule(**args)
        self.keys = list(self.model.state_dict())
        self.store = _store(runner, kind=self.store_kind)
        record = self.store.load_into(self.model, self.keys)
        self.started = record is not None
        progress(f"[fedseg] {runner.site}: Ditto personal model " + (
            f"reused from {self.store.path}" if record else "new: starts from the first global model it receives"))

    def after_round(self, runner: SiteRunner, input_model: Any) -> None:
        """After the global update was sent: the personal model's epochs, pulled towards this round's global model."""
        received = {k: v.detach().clone() for k, v in (input_model.params or {}).items()}
        if not self.started:
            self.model.load_state_dict(received, strict=True)
            self.started = True
        self.model.schedule_offset = (input_model.current_round or 0) * self.personal_epochs
        trainer = _local_trainer(runner, "ditto", self.personal_epochs,
                                 [ProximalTerm(received, self.ditto_lambda), self.optimizer_state])
        # its own random stream: the global model's training draws what it would under FedAvg
        trainer.fit(self.model, datamodule=runner.datamodule.stream(self.store_kind))
        self.store.save(self.model, self.keys, global_round=input_model.current_round or 0, job_id=runner.job_id)

    def personal_model(self, runner: SiteRunner, input_model: Any) -> Any:
        if not self.started:  # a site that joined at the very end: its personal model is the global one
            self.model.load_state_dict(dict(input_model.params), strict=True)
        return self.model


class FineTunePlugin(SitePlugin):
    """FedAvg's final global model, trained further on this site's own cases; kept at the site."""

    def __init__(self, options: FineTuneOptions) -> None:
        self.finetune_epochs = options.finetune_epochs
        self.finetune_lr_factor = options.finetune_lr_factor

    def personal_model(self, runner: SiteRunner, input_model: Any) -> Any:
        from fedseg.lightning_modules.module import SegmentationModule

        study = runner.job.study
        args = {**study.module_args(), "lr": study.model.lr * self.finetune_lr_factor, "max_epochs": self.finetune_epochs}
        model = SegmentationModule(**args)
        model.load_state_dict(dict(input_model.params), strict=True)
        _local_trainer(runner, "finetune", self.finetune_epochs, []).fit(model, datamodule=runner.datamodule.stream("finetune"))
        store = _store(runner, kind="finetune")
        keys = list(model.state_dict())
        store.save(model, keys, global_round=input_model.current_round or 0, job_id=runner.job_id)
        progress(f"[fedseg] {runner.site}: fine-tuned the final global model for {self.finetune_epochs} epochs "
                 f"(kept at {store.path})")
        return model


__all__ = ["DittoPlugin", "FedPerPlugin", "FedRepPlugin", "FineTunePlugin", "SharedKeysMismatch"]
