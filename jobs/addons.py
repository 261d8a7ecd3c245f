"""The options every algorithm may add to its job, each in one place: privacy filter, contribution
weights, site groups, W&B tracking, resume and quantized exchange.

``AddonSettings`` is the add-ons as the command line chooses them (the CLI's add-on options are
made from its fields, their defaults written there once); ``Addons.from_settings`` makes of them
the ``Addons`` value that lists the ones a job uses. Each add-on checks its own arguments when it
is made, ``Addons`` refuses the few combinations that cannot work, ``fedseg.jobs.base.Job`` refuses
an add-on the job's algorithm does not declare (``Algorithm.addons``), and
``fedseg.jobs.base.build_recipe`` applies them. The round's timeout and minimum of sites are study
settings (``FederationSettings``), applied here too.

- ``PrivacyFilter``: NVFlare's ``PercentilePrivacy`` or ``SVTPrivacy`` (torch-ready subclasses in
  ``fedseg.app.privacy_filters``) on every ``train`` update a site sends; the sites then send weight
  DIFFs (both filters clip, sparsify and noise diffs and would wreck full weights), and the server
  records what it received in ``metrics/update_stats.jsonl``. Only the ``train`` task is filtered,
  so a privacy job scores only the global models in its final evaluation (no site's local model
  leaves it, ``fedseg.jobs.base``). The epsilon SVT reports covers one filter call.
- ``ContributionWeights``: the server weighs a site by its cases and by how much its update lowered
  its own validation loss (``fedseg.app.contribution``, FedCostWAvg-style, capped share); its
  options dataclass is ``fedseg.config.ContributionWeights``, where its defaults are written.
- ``SiteGroups``: one global model per site group declared in each site's own config
  (``fedseg.app.grouped_fedavg``), optionally sharing the encoder across groups.
- ``wandb``: "offline" / "online" W&B runs on the server, one per site (``fedseg.app.wandb_receiver``).
- ``resume_from``: continue a study from its last global checkpoint (``fedseg.jobs.resume``).
- ``quantize``: "fp16" or "int8" model exchange in both directions (``fedseg.app.quantization``);
  under int8 the sites send weight differences (not with site groups).

Every job's server also records the bytes of each model it sends and receives
(``metrics/exchange_bytes.jsonl``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedseg.config import OFF, WANDB_MODES, ContributionWeights, setting

#: the model exchange: float32 (off), half precision, or int8 with one scale per channel
QUANTIZATIONS: tuple[str, ...] = (OFF, "fp16", "int8")
#: how the server weighs the sites' updates: by training cases (FedAvg) or by contribution
AGGREGATIONS: tuple[str, ...] = ("cases", "contribution")
#: the task whose results the privacy filter covers (NVFlare matches task filters by exact name)
TRAIN_TASK = "train"


# ------------------------------------------------------------------------------ privacy


@dataclass(frozen=True)
class PrivacyArg:
    """One argument of a privacy filter: its type, the values allowed and how to say so."""

    kind: type
    check: Callable[[Any], bool]
    allowed: str


def _number(check: Callable[[float], bool], allowed: str) -> PrivacyArg:
    return PrivacyArg(float, lambda v: math.isfinite(v) and check(v), allowed)


_POSITIVE = _number(lambda v: v > 0, "a number > 0")
_OPTIONAL_POSITIVE = PrivacyArg(float, lambda v: v is None or (math.isfinite(v) and v > 0), "a number > 0 or none")

#: the arguments of each filter (nvflare/app_common/filters/percentile_privacy.py, svt_privacy.py);
#: data_kinds is not one of them: the filters act on weight diffs only
FILTER_ARGS: dict[str, dict[str, PrivacyArg]] = {
    "percentile": {
        "percentile": _number(lambda v: 0 <= v <= 100, "a number in [0, 100]"),
        "gamma": _POSITIVE,
    },
    "svt": {
        "fraction": _number(lambda v: 0 < v <= 1, "a number in (0, 1]"),
        "epsilon": _POSITIVE,
        "noise_var": _POSITIVE,
        "gamma": _POSITIVE,
        "tau": _number(lambda v: True, "a number"),
        "replace": PrivacyArg(bool, lambda v: True, "true or false"),
        "epsilon_threshold": _OPTIONAL_POSITIVE,
        "epsilon_query": _OPTIONAL_POSITIVE,
        "epsilon_release": _OPTIONAL_POSITIVE,
    },
}
PRIVACY_FILTERS = tuple(FILTER_ARGS)


@dataclass(frozen=True)
class PrivacyFilter:
    """A privacy filter on every site update: ``kind`` "svt" or "percentile", NVFlare's arguments."""

    kind: str
    args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "args", validate_privacy_args(self.kind, self.args))

    def build(self) -> Any:
        """The site-side filter."""
        from fedseg.app.privacy_filters import TorchPercentilePrivacy, TorchSVTPrivacy

        return TorchPercentilePrivacy(**self.args) if self.kind == "percentile" else TorchSVTPrivacy(**self.args)

    def apply(self, recipe: Any) -> None:
        """Filter every ``train`` update, record what the server receives, make the sites send diffs."""
        from fedseg import nvflare_internals
        from fedseg.app.privacy_filters import UpdateStatsRecorder

        # One registration per task name ("*" matches nothing: nvflare/apis/utils/task_utils.py).
        recipe.add_client_output_filter(self.build(), tasks=[TRAIN_TASK])
        recipe.add_server_input_filter(UpdateStatsRecorder(), tasks=[TRAIN_TASK])
        nvflare_internals.send_weight_diffs(recipe)  # after the filter: the client app exists now


def validate_privacy_args(privacy: str, args: dict[str, Any]) -> dict[str, Any]:
    """``args`` checked against the filter's arguments, values converted (``ValueError`` naming the bad one)."""
    if privacy not in FILTER_ARGS:
        raise ValueError(f"unknown privacy filter {privacy!r}; known: {', '.join(FILTER_ARGS)}")
    spec = FILTER_ARGS[privacy]
    checked: dict[str, Any] = {}
    for name, value in args.items():
        if name not in spec:
            raise ValueError(f"unknown {privacy} privacy argument {name!r}; allowed: {', '.join(spec)}")
        rule = spec[name]
        try:
            converted = _convert(value, rule.kind)
            ok = rule.check(converted)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"{privacy} privacy argument {name}={value!r}: must be {rule.allowed} "
                             f"(allowed arguments: {', '.join(spec)})")
        checked[name] = converted
    if privacy == "svt":
        _check_svt_budget(checked)
    return checked


def parse_privacy_args(items: Iterable[str]) -> dict[str, Any]:
    """``["gamma=0.01", "percentile=90"]`` (the CLI's repeated ``--privacy-arg KEY=VALUE``) as a dict of strings."""
    parsed: dict[str, Any] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"privacy argument {item!r}: expected KEY=VALUE")
        parsed[name.strip()] = value.strip()
    return parsed


def _convert(value: Any, kind: type) -> Any:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "")):
        return None
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.strip().lower() in ("true", "1", "yes")
        raise ValueError(f"not a boolean: {value!r}")
    if isinstance(value, bool):  # True is an int to Python, not a number to the filter
        raise ValueError(f"not a number: {value!r}")
    return float(value)


def _check_svt_budget(args: dict[str, Any]) -> None:
    # SVTPrivacy checks these only when it filters the first update (svt_privacy.py, _compute_epsilon_split):
    # checked here so a bad split fails when the job is built, not at the sites in round 1.
    epsilon = args.get("epsilon", 0.1)
    threshold, query = args.get("epsilon_threshold"), args.get("epsilon_query")
    if threshold is not None and query is not None and not math.isclose(threshold + query, epsilon):
        raise ValueError("svt privacy arguments epsilon_threshold + epsilon_query must equal epsilon "
                         f"(allowed arguments: {', '.join(FILTER_ARGS['svt'])})")
    for name, part in (("epsilon_threshold", threshold), ("epsilon_query", query)):
        if part is not None and part >= epsilon and (threshold is None or query is None):
            raise ValueError(f"svt privacy argument {name}={part}: must be < epsilon ({epsilon}), "
                             "the rest of epsilon goes to the other part")


# ------------------------------------------------------------------------------ contribution and groups


def contribution_aggregator(weights: ContributionWeights) -> Any:
    """The server's aggregator of the contribution-weights add-on (``fedseg.app.contribution``)."""
    from fedseg.app.contribution import ContributionWeightedAggregator

    return ContributionWeightedAggregator(weights.contribution_alpha, weights.max_site_share)


@dataclass(frozen=True)
class SiteGroups:
    """One global model per site group (each site names its group in its own site config)."""

    share_encoder: bool = setting(False, "grouped: average the encoder across the groups")


# ------------------------------------------------------------------------------ all of them


@dataclass(frozen=True)
class AddonSettings:
    """The add-ons as the command line chooses them, one option per field (``fedseg.cli._options``):
    the one place of their defaults, all "none". ``Addons.from_settings`` makes the job's add-ons;
    the options of two of them are their own dataclasses, ``ContributionWeights`` and ``SiteGroups``."""

    wandb: str = setting(OFF, "Weights & Biases tracking on the server, one run per site (sites need no credentials): "
                              "offline writes W&B runs for `wandb sync`; online needs WANDB_API_KEY on the server",
                         choices=WANDB_MODES)
    resume_from: Path | None = setting(None, "continue a study from its last global checkpoint: FL_global_model.pt, a "
                                             "run folder or a downloaded job; the rounds it holds are counted (--rounds "
                                             "is the study's total)")
    aggregation: str = setting("cases", "site weights: training cases (FedAvg) or contribution (cases and how much the "
                                        "site's update lowered its own validation loss, FedCostWAvg-style, capped by "
                                        "--max-site-share)", choices=AGGREGATIONS)
    privacy: str = setting(OFF, "NVFlare privacy filter on every update a site sends (sites then send weight diffs)",
                           choices=(OFF, *PRIVACY_FILTERS))
    privacy_arg: tuple[str, ...] = setting((), "privacy filter argument, repeatable (percentile: percentile, gamma; "
                                               "svt: fraction, epsilon, noise_var, gamma, tau, replace, "
                                               "epsilon_threshold, epsilon_query, epsilon_release)",
                                           action="append", metavar="KEY=VALUE")
    quantize: str = setting(OFF, "the model exchange of every round, both directions: float32 (off), fp16 (half the "
                                 "bytes) or int8 (about a quarter: one int8 scale per channel, small tensors in float32, "
                                 "the sites send their update)", choices=QUANTIZATIONS)
    grouped: bool = setting(False, "one global model per site group (each site declares its 'group' in its site config)",
                            action="store_true")

    def __post_init__(self) -> None:
        object.__setattr__(self, "privacy_arg", tuple(self.privacy_arg))


#: the add-ons a job has when none is chosen
_CHOSEN_BY_DEFAULT = AddonSettings()


@dataclass(frozen=True)
class Addons:
    """The add-ons of one job (none by default)."""

    privacy: PrivacyFilter | None = None
    contribution: ContributionWeights | None = None
    groups: SiteGroups | None = None
    #: W&B tracking on the server: one of ``WANDB_MODES``
    wandb: str = _CHOSEN_BY_DEFAULT.wandb
    #: continue a study from this global checkpoint or run folder ("": start afresh)
    resume_from: str = ""
    #: the model exchange of every train task: one of ``QUANTIZATIONS``
    quantize: str = _CHOSEN_BY_DEFAULT.quantize

    def __post_init__(self) -> None:
        if self.wandb not in WANDB_MODES:
            raise ValueError(f"unknown W&B mode {self.wandb!r}; known: {', '.join(WANDB_MODES)}")
        if self.quantize not in QUANTIZATIONS:
            raise ValueError(f"unknown quantization {self.quantize!r}; known: {', '.join(QUANTIZATIONS)}")
        if self.groups is not None and (self.privacy or self.contribution or self.resume_from):
            # GroupedFedAvg averages full weights per group: no diffs for a privacy filter, no
            # contribution aggregator, no single global checkpoint to resume from
            raise ValueError("grouped models work with case weights, without privacy filters, contribution "
                             "weights or resume_from")

    @classmethod
    def from_settings(cls, chosen: AddonSettings, contribution: ContributionWeights | None = None,
                      groups: SiteGroups | None = None) -> Addons:
        """The add-ons ``chosen`` names, with the options of contribution weights and site groups
        (their defaults when None; options given for an add-on not chosen are an error where they
        would be lost silently)."""
        groups = groups or SiteGroups()
        if groups.share_encoder and not chosen.grouped:
            raise ValueError("--share-encoder needs --grouped")
        if chosen.privacy_arg and chosen.privacy == OFF:
            raise ValueError("--privacy-arg given without a privacy filter (--privacy svt or percentile)")
        return cls(
            privacy=(PrivacyFilter(chosen.privacy, parse_privacy_args(chosen.privacy_arg))
                     if chosen.privacy != OFF else None),
            contribution=(contribution or ContributionWeights()) if chosen.aggregation == "contribution" else None,
            groups=groups if chosen.grouped else None,
            wandb=chosen.wandb,
            resume_from=str(Path(chosen.resume_from).resolve()) if chosen.resume_from else "",
            quantize=chosen.quantize,
        )

    def names(self) -> list[str]:
        """The add-ons in use: "privacy", "contribution", "groups", "wandb", "resume", "quantize"."""
        used = {"privacy": self.privacy, "contribution": self.contribution, "groups": self.groups,
                "wandb": self.wandb != OFF, "resume": self.resume_from, "quantize": self.quantize != OFF}
        return [name for name, on in used.items() if on]

    def to_json(self) -> dict[str, Any]:
        return {
            "privacy": {"kind": self.privacy.kind, "args": self.privacy.args} if self.privacy else None,
            "contribution": vars(self.contribution) if self.contribution else None,
            "groups": vars(self.groups) if self.groups else None,
            "wandb": self.wandb,
            "resume_from": self.resume_from,
            "quantize": self.quantize,
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Addons:
        return cls(
            # ``is not None``: an empty document is the add-on with its defaults (compare's ``grouped``
            # and ``contribution`` are ``{}``), not the add-on left out
            privacy=PrivacyFilter(**doc["privacy"]) if doc.get("privacy") is not None else None,
            contribution=ContributionWeights(**doc["contribution"]) if doc.get("contribution") is not None else None,
            groups=SiteGroups(**doc["groups"]) if doc.get("groups") is not None else None,
            wandb=doc.get("wandb", _CHOSEN_BY_DEFAULT.wandb),
            resume_from=doc.get("resume_from", ""),
            quantize=doc.get("quantize", _CHOSEN_BY_DEFAULT.quantize),
        )

    def apply_receiving(self, recipe: Any) -> None:
        """Where models arrive, before every other filter there: the server counts the bytes that
        came, then restores quantized tensors (so audits and statistics see the real values); the
        sites restore what the server sent."""
        from fedseg.app.quantization import DequantizeWeights, ExchangeBytesRecorder

        recipe.add_server_input_filter(ExchangeBytesRecorder("received"), tasks=[TRAIN_TASK])
        if self.quantize != OFF:
            recipe.add_server_input_filter(DequantizeWeights(), tasks=[TRAIN_TASK])
            recipe.add_client_input_filter(DequantizeWeights(), tasks=[TRAIN_TASK])

    def apply_sending(self, recipe: Any) -> None:
        """Where models leave, after every other filter there (a FedPer head is stripped and a
        privacy filter has run before the update is quantized); the server counts what it sends.
        Under int8 the sites send weight differences (a far smaller range to quantize than the
        weights; the server adds them to its full-precision model), except with site groups, whose
        aggregator averages full weights."""
        from fedseg import nvflare_internals
        from fedseg.app.quantization import ExchangeBytesRecorder, QuantizeWeights

        if self.quantize != OFF:
            recipe.add_client_output_filter(QuantizeWeights(self.quantize), tasks=[TRAIN_TASK])
            recipe.add_server_output_filter(QuantizeWeights(self.quantize), tasks=[TRAIN_TASK])
            if self.quantize == "int8" and self.groups is None:
                nvflare_internals.send_weight_diffs(recipe)
        recipe.add_server_output_filter(ExchangeBytesRecorder("sent"), tasks=[TRAIN_TASK])
