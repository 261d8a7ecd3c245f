"""Differential-privacy filters as an option of every FedAvg-family job (``FedAvgJob.privacy``).

``privacy="percentile"`` or ``"svt"`` puts NVFlare's ``PercentilePrivacy`` or ``SVTPrivacy``
(torch-ready subclasses in ``fedseg.app.privacy_filters``) on every update a site sends for the
``train`` task; ``privacy_args`` are the filter's constructor arguments (NVFlare's defaults
otherwise). The sites then send weight DIFFs instead of full weights: both filters compute on
diffs (clip, sparsify, noise) and would wreck full weights. The server records what it received
per site and round in ``metrics/update_stats.jsonl`` (``UpdateStatsRecorder``).

What stays unprotected: only the ``train`` task's updates are filtered. With cross-site evaluation,
a site answers ``submit_model`` with its own final model (app/client.py): full weights, unfiltered.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

#: the task whose results are filtered (NVFlare matches task filters by exact name)
TRAIN_TASK = "train"


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
    """``["gamma=0.01", "percentile=90"]`` (the CLI's repeated ``--privacy-arg KEY=VALUE``) as a dict of strings.

    The values are converted and checked by ``validate_privacy_args`` when the job is built.
    """
    parsed: dict[str, Any] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"privacy argument {item!r}: expected KEY=VALUE")
        parsed[name.strip()] = value.strip()
    return parsed


def build_privacy_filter(privacy: str, args: dict[str, Any]) -> Any:
    """The site-side filter for ``privacy`` ("percentile" or "svt") with the checked ``args``."""
    from fedseg.app.privacy_filters import TorchPercentilePrivacy, TorchSVTPrivacy

    checked = validate_privacy_args(privacy, args)
    return TorchPercentilePrivacy(**checked) if privacy == "percentile" else TorchSVTPrivacy(**checked)


def add_privacy_filters(recipe: Any, job: Any) -> None:
    """Filter every ``train`` update of ``job``'s sites with ``job.privacy`` and make the sites send diffs.

    Also records the received updates' statistics on the server (``metrics/update_stats.jsonl``).
    """
    from fedseg.app.privacy_filters import UpdateStatsRecorder

    if job.algorithm == "fedavg-he":
        # The HE recipe's encryption filter comes first in the site's output filters: the privacy
        # filter would get ciphertext. Clip/noise before encryption needs its own ordering.
        raise ValueError("privacy filters are not supported with fedavg-he (the update is encrypted before them)")
    privacy_filter = build_privacy_filter(job.privacy, job.privacy_args)
    # One registration per task name ("*" matches nothing: nvflare/apis/utils/task_utils.py).
    recipe.add_client_output_filter(privacy_filter, tasks=[TRAIN_TASK])
    recipe.add_server_input_filter(UpdateStatsRecorder(), tasks=[TRAIN_TASK])
    _send_weight_diffs(recipe)  # after the filter: the client app (and its executor) exists now
    if job.cross_site_eval:
        warnings.warn("privacy filters cover the train task only: with cross_site_eval a site still sends its "
                      "final local model (submit_model) unfiltered", stacklevel=2)


def _send_weight_diffs(recipe: Any) -> None:
    """Make every site send ``params_transfer_type=DIFF`` (NVFlare computes new - received weights).

    Called once the client app exists (the recipes build it at the first client filter added,
    nvflare/recipe/fedavg.py ``_create_client_runner``): its ``ClientAPIExecutor`` keeps the setting in
    ``_params_transfer_type`` (nvflare/app_common/executors/client_api_executor.py), which the job
    export writes (nvflare/job_config/fed_job_config.py ``_get_args``). The recipe's own attribute is
    set too, for anything it builds later. FedOpt's recipe sends DIFF already.
    """
    from nvflare.app_common.executors.client_api_executor import ClientAPIExecutor
    from nvflare.client.config import TransferType

    executors = [
        item.executor
        for app in recipe._job._deploy_map.values()  # the recipe's FedJob (nvflare/recipe/spec.py)
        for item in getattr(getattr(app, "app_config", None), "executors", [])
        if isinstance(item.executor, ClientAPIExecutor)
    ]
    if not executors:
        raise RuntimeError("no client API executor found in the recipe: cannot make the sites send weight diffs")
    for executor in executors:
        executor._params_transfer_type = TransferType.DIFF
    if hasattr(recipe, "params_transfer_type"):
        recipe.params_transfer_type = TransferType.DIFF


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
