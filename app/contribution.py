"""Contribution-weighted aggregation: a site counts by its cases and by how much its update helped.

FedAvg weighs site i by its share of training cases, ``n_i / sum(n)``. fedseg's contribution weight
follows FedCostWAvg (Mächler et al., FeTS 2021 winner), which adds how much the site's round
lowered its own loss:

    k_i = L_i(received global model) / L_i(site i's update)         (cost ratio; > 1: it helped)
    w_i = alpha * n_i / sum(n) + (1 - alpha) * k_i / sum(k)
    w   = cap(w, max_share): no site above max_share of the total (the excess is shared out over
          the others in proportion to their weights, repeated until none exceeds it)

where L_i is the loss (Dice + BCE) on site i's own validation cases: the received model's loss is
what the site already measures before training (``val_loss``), the update's is measured once more
after training by ``UpdateValidationLoss``. ``alpha`` = 1 is FedAvg; FedCostWAvg used 0.5. A site
whose ratio is missing or not finite gets the neutral k = 1. The cap keeps one site with a large
jump (e.g. a small site far from the others) from taking over the global model; it is raised to
``1 / n_sites`` when set below that, since the weights must sum to 1.

Only scalars cross the network for this: the site adds ``fedseg_val_loss_after`` to the meta of
the update it sends anyway.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.aggregators.model_aggregator import ModelAggregator
from nvflare.app_common.aggregators.weighted_aggregation_helper import WeightedAggregationHelper
from pytorch_lightning import Callback

from fedseg.app.protocol import CONTRIBUTION_KEY, LOSS_AFTER_KEY, NUM_STEPS_KEY, WEIGHTS_KEY
from fedseg.config import ContributionWeights

#: the add-on's defaults, written once in its options dataclass
_DEFAULTS = ContributionWeights()


@dataclass(frozen=True)
class SiteRound:
    """What the server knows of one site's round: its cases and its loss before and after."""

    cases: float
    loss_before: float
    loss_after: float

    @property
    def cost_ratio(self) -> float:
        """``loss_before / loss_after``, or the neutral 1 when either is missing or not positive."""
        if not (math.isfinite(self.loss_before) and math.isfinite(self.loss_after)):
            return 1.0
        if self.loss_before <= 0 or self.loss_after <= 0:
            return 1.0
        return self.loss_before / self.loss_after


def contribution_weights(sites: Mapping[str, SiteRound], alpha: float = _DEFAULTS.contribution_alpha,
                         max_share: float = _DEFAULTS.max_site_share) -> dict[str, float]:
    """The normalized weight of each site (see the module docstring); they sum to 1."""
    if not sites:
        return {}
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    total_cases = sum(s.cases for s in sites.values())
    total_ratio = sum(s.cost_ratio for s in sites.values())
    n = len(sites)
    weights = {
        name: alpha * (s.cases / total_cases if total_cases > 0 else 1.0 / n)
        + (1.0 - alpha) * (s.cost_ratio / total_ratio if total_ratio > 0 else 1.0 / n)
        for name, s in sites.items()
    }
    return cap_shares(weights, max(max_share, 1.0 / n))


def cap_shares(weights: Mapping[str, float], max_share: float) -> dict[str, float]:
    """Normalize ``weights`` and lower any share above ``max_share`` to it, giving the excess to the
    uncapped sites in proportion to their weights (repeated until no share exceeds the cap)."""
    total = sum(weights.values())
    shares = {k: v / total for k, v in weights.items()}
    capped: set[str] = set()
    while True:
        over = [k for k, v in shares.items() if k not in capped and v > max_share + 1e-12]
        if not over:
            return shares
        capped.update(over)
        free = [k for k in shares if k not in capped]
        left = 1.0 - max_share * len(capped)
        free_total = sum(shares[k] for k in free)
        for k in capped:
            shares[k] = max_share
        for k in free:
            shares[k] = left * shares[k] / free_total if free_total > 0 else left / len(free)


class ContributionWeightedAggregator(ModelAggregator):
    """NVFlare ``ModelAggregator`` that averages the round's updates with ``contribution_weights``.

    It keeps the round's updates until the round ends (the weights need every site's ratio), so the
    server holds one model per site in memory, unlike FedAvg's in-time sum.
    """

    def __init__(self, alpha: float = _DEFAULTS.contribution_alpha, max_share: float = _DEFAULTS.max_site_share) -> None:
        super().__init__()
        self.alpha = alpha
        self.max_share = max_share
        self._updates: list[FLModel] = []

    def reset_stats(self) -> None:
        self._updates = []

    def accept_model(self, model: FLModel) -> None:
        self._updates.append(model)

    def aggregate_model(self) -> FLModel:
        if not self._updates:
            raise RuntimeError("no site update to aggregate in this round")
        rounds = {_site(m): _site_round(m) for m in self._updates}
        weights = contribution_weights(rounds, self.alpha, self.max_share)
        params, metrics = WeightedAggregationHelper(), WeightedAggregationHelper()
        for model in self._updates:
            site = _site(model)
            params.add(data=model.params, weight=weights[site], contributor_name=site, contribution_round=model.current_round)
            scalars = {k: v for k, v in (model.metrics or {}).items() if isinstance(v, (int, float))}
            if scalars:
                metrics.add(data=scalars, weight=weights[site], contributor_name=site, contribution_round=model.current_round)
        detail = {site: {**asdict(r), "cost_ratio": r.cost_ratio, "weight": weights[site]} for site, r in rounds.items()}
        self.info("contribution weights: " + ", ".join(f"{s} {w:.3f}" for s, w in sorted(weights.items())))
        result = FLModel(
            params=params.get_result(),
            params_type=self._updates[0].params_type,
            metrics=metrics.get_result() or None,
            meta={WEIGHTS_KEY: weights, CONTRIBUTION_KEY: detail},
        )
        self._updates = []
        return result


def _site(model: FLModel) -> str:
    return str((model.meta or {}).get("client_name", "unknown"))


def _site_round(model: FLModel) -> SiteRound:
    meta, metrics = model.meta or {}, model.metrics or {}
    return SiteRound(
        cases=float(meta.get(NUM_STEPS_KEY) or 0.0),
        loss_before=float(metrics.get("val_loss", math.nan)),
        loss_after=float(meta.get(LOSS_AFTER_KEY, math.nan)),
    )


class UpdateValidationLoss(Callback):
    """Site side: at the end of the round's training, the update's loss on the site's validation
    cases goes into the update's meta (``LOSS_AFTER_KEY``).

    It runs in ``on_train_end`` before NVFlare's FLCallback (which sends the update there): a
    second ``trainer.validate`` is impossible inside ``fit``, so the validation loop is written out,
    with the module's own sliding-window logits and loss, as ``validation_step`` computes them.
    """

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        import torch

        loader = trainer.datamodule.val_dataloader()
        was_training = pl_module.training
        pl_module.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for batch in loader:
                image = batch["image"].to(pl_module.device)
                label = batch["label"].to(pl_module.device)
                loss = pl_module.loss(pl_module.predict_logits(image), label)
                total += float(loss) * len(image)
                count += len(image)
        pl_module.train(was_training)
        meta = dict(getattr(pl_module, "__fl_meta__", {}) or {})
        meta[LOSS_AFTER_KEY] = total / count if count else math.nan
        pl_module.__fl_meta__ = meta
