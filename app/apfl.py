"""APFL's site side: the local model ``v``, the mixing weight ``alpha`` and their training.

Adaptive Personalized Federated Learning (Deng et al. 2020), as FL4Health implements it
(``fl4health/model_bases/apfl_base.py``, ``clients/apfl_client.py``): the site's personal prediction
mixes the OUTPUTS (logits) of its local model and of the global model,
``alpha * v(x) + (1 - alpha) * w(x)``. Here that is ``MixedSegmentation``: a ``SegmentationModule``
whose network is the mixture (``MixedNetwork``), so the study's loss, AdamW with its cosine schedule,
the sliding-window validation and the region metrics are the ones every fedseg model uses, and the
personal phase is a plain Lightning fit, as Ditto's.

Each round, after the global model's FedAvg update has left the site (``ApflPlugin.after_round``),
``v`` and ``alpha`` train ``personal_epochs`` on the site's training cases on the loss of the mixed
output, with ``w`` = the global model the site received that round, frozen (no gradient, kept in
eval mode; the site's own copy of the global model, which the patched Trainer sends, is not touched).
``v`` takes AdamW steps; ``alpha`` takes its own plain gradient step at ``apfl_alpha_lr`` and is
clipped to [0, 1]. Mixing outputs makes the gradient of ``alpha`` exact by autograd,
``dL/dalpha = <dL/dy, v(x) - w(x)>``; FL4Health and FedTorch use the parameter-mixing surrogate
``sum((v - w) * (alpha g_v + (1 - alpha) g_w)) + 0.02 alpha`` from the paper's interpolated-parameter
form, which needs ``w``'s gradients too (a backward through the global model); it is not used here.
The mixture is against the received global model rather than the site's own update of it, because
the personal model that is scored (and used) at the end is the mixture with the final received one.

``v`` starts as the first global model the site receives (as Ditto's personal model does); ``v`` and
``alpha`` are kept in the site's ``PersonalModelStore`` (kind ``apfl``: atomic, owner-only) and never
sent. In the ``personalize`` task the site's personal model is the mixture of its ``v`` and ``alpha``
with the final global model; the runner scores it on the site's validation cases (only scores leave).

Mixing parameters instead (one network ``alpha v + (1 - alpha) w``) would score with a plain
``SegmentationModule`` too, but ``alpha``'s gradient is then the surrogate above, and it is not
what FL4Health's model predicts with; mixing outputs costs one extra forward of ``w`` per step.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fedseg.app.personalization import _local_trainer, _store
from fedseg.app.site_plugin import SitePlugin, progress
from fedseg.lightning_modules.module import SegmentationModule

if TYPE_CHECKING:
    from fedseg.app.site_runner import SiteRunner
    from fedseg.jobs.apfl import ApflOptions

#: the store's kind (``<study>.apfl.pt``)
STORE_KIND = "apfl"


class MixedNetwork(nn.Module):
    """``alpha * local(x) + (1 - alpha) * global_model(x)`` on logits; the global network is frozen."""

    def __init__(self, local: nn.Module, global_model: nn.Module, alpha: float) -> None:
        super().__init__()
        self.local = local
        self.global_model = global_model
        self.global_model.requires_grad_(False)
        self.alpha = nn.Parameter(torch.tensor(float(alpha)))

    def train(self, mode: bool = True) -> MixedNetwork:
        super().train(mode)
        self.global_model.eval()  # frozen: no normalization statistics or dropout of its own change
        return self

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.alpha * self.local(image) + (1.0 - self.alpha) * self.global_model(image)


class MixedSegmentation(SegmentationModule):
    """A ``SegmentationModule`` whose network is APFL's mixture of a local and the global network.

    Its AdamW trains the local network only (the global one has no gradient); ``alpha`` takes its
    own step before each optimizer step (``on_before_optimizer_step``) and its gradient is then
    dropped, so AdamW leaves it alone. ``alpha`` stays in AdamW's parameter list on purpose: with
    mixed precision (a GPU), Lightning unscales the gradients of the optimizer's parameters before
    that hook (``MixedPrecision.optimizer_step``), so ``alpha``'s gradient is unscaled too.
    """

    def __init__(self, *, apfl_alpha: float, apfl_alpha_lr: float, **module_args: Any) -> None:
        super().__init__(**module_args)
        self.network = MixedNetwork(self.network, copy.deepcopy(self.network), apfl_alpha)
        self.alpha_lr = apfl_alpha_lr

    @property
    def alpha(self) -> float:
        return float(self.network.alpha.detach())

    def personal_keys(self) -> list[str]:
        """The state that stays at the site: the local network and ``alpha`` (not the global copy)."""
        return [k for k in self.state_dict() if k.startswith(("network.local.", "network.alpha"))]

    def load_global(self, params: dict[str, torch.Tensor]) -> None:
        """The global model's weights (a ``SegmentationModule`` state, as the server sends it)."""
        _load_network(self.network.global_model, params)

    def load_local(self, params: dict[str, torch.Tensor]) -> None:
        _load_network(self.network.local, params)

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        alpha = self.network.alpha
        if alpha.grad is not None:
            with torch.no_grad():
                if torch.isfinite(alpha.grad):  # an AMP step with overflowing gradients is skipped
                    alpha.sub_(self.alpha_lr * alpha.grad).clamp_(0.0, 1.0)
            alpha.grad = None


def _load_network(network: nn.Module, params: dict[str, torch.Tensor]) -> None:
    """A ``SegmentationModule`` state (``network.*`` keys) into a bare network, every key (strict)."""
    network.load_state_dict({k.removeprefix("network."): v for k, v in params.items()}, strict=True)


class ApflPlugin(SitePlugin):
    """The local model and mixing weight beside the global model: trained after each FedAvg update."""

    def __init__(self, options: ApflOptions) -> None:
        from nvflare.app_opt.lightning.callbacks import RestoreState

        self.apfl_alpha = options.apfl_alpha
        self.apfl_alpha_lr = options.apfl_alpha_lr
        self.personal_epochs = options.personal_epochs
        self.model: Any = None
        self.store: Any = None
        self.keys: list[str] = []
        self.started = False
        # v's AdamW moments and cosine schedule go on from round to round, as Ditto's do
        self.optimizer_state = RestoreState()

    def setup(self, runner: SiteRunner) -> None:
        study = runner.job.study
        self.personal_epochs = self.personal_epochs or study.federation.local_epochs
        args = {**study.module_args(), "max_epochs": study.federation.rounds * self.personal_epochs}
        self.model = MixedSegmentation(apfl_alpha=self.apfl_alpha, apfl_alpha_lr=self.apfl_alpha_lr, **args)
        self.keys = self.model.personal_keys()
        self.store = _store(runner, kind=STORE_KIND)
        record = self.store.load_into(self.model, self.keys)
        self.started = record is not None
        progress(f"[fedseg] {runner.site}: APFL local model and mixing weight " + (
            f"reused from {self.store.path} (alpha={self.model.alpha:.3f})" if record
            else f"new: the local model starts from the first global model it receives, alpha={self.apfl_alpha}"))

    def after_round(self, runner: SiteRunner, input_model: Any) -> None:
        """After the global update was sent: ``v`` and ``alpha`` on the mixture with this round's global model."""
        received = {k: v.detach().clone() for k, v in (input_model.params or {}).items()}
        self.model.load_global(received)
        if not self.started:
            self.model.load_local(received)
            self.started = True
        round_no = input_model.current_round or 0
        self.model.schedule_offset = round_no * self.personal_epochs
        trainer = _local_trainer(runner, "apfl", self.personal_epochs, [self.optimizer_state])
        # its own random stream: the global model's training draws what it would under FedAvg
        trainer.fit(self.model, datamodule=runner.datamodule.stream("apfl"))
        self.store.save(self.model, self.keys, global_round=round_no, job_id=runner.job_id)
        progress(f"[fedseg] {runner.site}: APFL mixing weight alpha={self.model.alpha:.4f} after round {round_no + 1}")

    def after_failure(self, runner: SiteRunner) -> None:
        """A failed round (e.g. in the personal phase): back to the stored ``v`` and ``alpha``."""
        if self.store.exists():
            self.store.load_into(self.model, self.keys)

    def personal_model(self, runner: SiteRunner, input_model: Any) -> Any:
        """The mixture of this site's ``v`` and ``alpha`` with the final global model."""
        final = dict(input_model.params)
        self.model.load_global(final)
        if not self.started:  # a site that joined at the very end: v is the global model, the mixture too
            self.model.load_local(final)
        return self.model


__all__ = ["ApflPlugin", "MixedNetwork", "MixedSegmentation"]
