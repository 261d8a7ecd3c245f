"""What a site and the server tell each other besides weights: metadata keys, failure answers and
model fingerprints. Both sides import this module, and nothing else of each other.

A site's update (an ``FLModel``) carries in its ``meta``:

====================  =======================================================================
NUM_STEPS_KEY         the site's number of training cases: FedAvg's weight of the update
N_TRAIN_CASES_KEY     the same number under a readable name (W&B, reports)
RECEIVED_KEY          fingerprint of the global model the site trained on this round
GROUP_KEY             the site group it declared in its own site config (grouped jobs)
LOSS_AFTER_KEY        its validation loss after training (contribution-weighted aggregation)
SITE_FAILURE_KEY      "this site failed this round": the error's class name, never its message
SITE_STAGE_KEY        with a failure: "startup" (the site could not start: config, data), "round", or
                      "policy" (the site refuses the job; the failure is then the rule it breaks)
====================  =======================================================================

The server's aggregate carries ``WEIGHTS_KEY`` (each site's share of the round's model) and
``CONTRIBUTION_KEY`` (the contribution weights' inputs). Only scalars and names cross here.

A site checks every model it receives against what the job expects before using it
(``check_received_params``): not empty, exactly the expected keys, each value a tensor of the
expected size whose dtype is floating point where the site's own parameter is. A refusal is a
``ReceivedModelError``, answered like any failed task.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np

#: FedAvg weighs an update by this meta key (nvflare FLMetaKey.NUM_STEPS_CURRENT_ROUND)
NUM_STEPS_KEY = "NUM_STEPS_CURRENT_ROUND"
N_TRAIN_CASES_KEY = "n_train_cases"
RECEIVED_KEY = "fedseg_received_model"
GROUP_KEY = "fedseg_group"
LOSS_AFTER_KEY = "fedseg_val_loss_after"
SITE_FAILURE_KEY = "fedseg_site_failure"
SITE_STAGE_KEY = "fedseg_site_stage"
#: the stage of a site's refusal of the job by its policy (``refusal_answer``)
POLICY_STAGE = "policy"
#: errors of a site's own data or configuration: the site "refused its data"
DATA_ERRORS = frozenset({"DatasetCheckError", "DatalistError", "SiteConfigError"})
WEIGHTS_KEY = "fedseg_weights"
CONTRIBUTION_KEY = "fedseg_contribution"
#: the task that ends a personalized job: each site scores its personal model on its own validation
#: cases and answers with the scores only (``fedseg.app.resilient_fedavg``, ``fedseg.app.site_runner``)
PERSONALIZE_TASK = "personalize"
#: prefix of a site's scores on its own held-out test cases (``test_datalist`` in its site config), sent
#: with the personal scores: ``test_dice`` (the regions' mean), ``test_dice_et`` ..., each with a
#: ``_sem`` (standard error over the cases), and ``test_cases``
TEST_PREFIX = "test_"
#: per-site model selection (``fedseg.jobs.selection``): the candidates a site chooses among, and the
#: scalar of the personal scores that names its choice (the index into ``SELECT_CANDIDATES``): the only
#: thing about the choice that leaves the site
SELECT_CANDIDATES: tuple[str, ...] = ("global", "personal", "local")
SELECT_CHOICE_KEY = "select_choice"


def test_set_metrics(mean: dict[str, dict[str, float]], sem: dict[str, dict[str, float]], n_cases: int) -> dict[str, float]:
    """A site's test-set scores (``lightning_modules.test_sets.TestSetScores``'s region -> metric
    tables) as the flat scalars it sends: only numbers leave the site, never a case id."""
    out: dict[str, float] = {f"{TEST_PREFIX}cases": float(n_cases)}
    for region, metrics in mean.items():
        suffix = "" if region in ("mean", "overall") else f"_{region.lower()}"
        for metric, value in metrics.items():
            out[f"{TEST_PREFIX}{metric}{suffix}"] = float(value)
            out[f"{TEST_PREFIX}{metric}{suffix}_sem"] = float(sem[region][metric])
    return out


def update_meta(n_train_cases: int) -> dict[str, Any]:
    """The meta every update of a site starts with: its case count, as FedAvg's weight."""
    return {NUM_STEPS_KEY: n_train_cases, N_TRAIN_CASES_KEY: n_train_cases}


def failure_answer(err: BaseException, *, evaluate: bool, stage: str = "round") -> Any:
    """The answer of a site whose round (or start-up) failed: no weights, the error's class only.

    An evaluate task gets empty metrics; a train task an empty DIFF (NVFlare would try to diff an
    empty FULL answer against the received model when the job sends weight diffs and fail there,
    nvflare/client/in_process/api.py). The server's workflow leaves the site out of the round.
    """
    from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

    meta = {SITE_FAILURE_KEY: type(err).__name__, SITE_STAGE_KEY: stage, NUM_STEPS_KEY: 0}
    if evaluate:
        return FLModel(metrics={}, meta=meta)
    return FLModel(params={}, params_type=ParamsType.DIFF, meta=meta)


def refusal_answer(reason: str, *, evaluate: bool) -> Any:
    """The answer of a site that refuses the job (``fedseg.app.site_policy``): no weights, the rule.

    The rule is the site's policy in words ("accepts at most 100 rounds; the job asks 200"), never a
    path or a case: it goes to the server so that the lead learns which site refused and why.
    """
    from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

    meta = {SITE_FAILURE_KEY: reason, SITE_STAGE_KEY: POLICY_STAGE, NUM_STEPS_KEY: 0}
    if evaluate:
        return FLModel(metrics={}, meta=meta)
    return FLModel(params={}, params_type=ParamsType.DIFF, meta=meta)


def failure_of(meta: Mapping[str, Any] | None) -> str | None:
    """The error class a site reported in ``meta``, or None."""
    value = (meta or {}).get(SITE_FAILURE_KEY)
    return str(value) if value else None


def describe_failure(site: str, error: str, stage: str = "round") -> str:
    """What the study lead reads: "hospital-b refused its data (DatasetCheckError); see that site's log"."""
    if stage == POLICY_STAGE:
        return f"{site} refused the job: {error}"
    if stage == "startup":
        what = "refused its data" if error in DATA_ERRORS else "could not start"
        return f"{site} {what} ({error}); see that site's log"
    return f"{site} failed ({error})"


class ReceivedModelError(ValueError):
    """A received model that does not fit what the job expects (the message says what differs)."""


def check_received_params(params: Any, expected: Mapping[str, Any], *, what: str = "the received model") -> None:
    """Raise ``ReceivedModelError`` unless ``params`` fits ``expected`` (the site's own tensors for
    the keys it shares: the server's model keys, or the shared keys of a personalized job).

    Refused: no parameters at all, a key missing or unexpected, a value that is no tensor or array,
    a non-numeric dtype, a non-floating dtype where the site's parameter is floating point, and
    another number of elements. The exact shape and the load itself are left to
    ``load_state_dict``, which names the key.
    """
    if params is None or (isinstance(params, Mapping) and not params):
        raise ReceivedModelError(f"{what} holds no parameters (an empty payload)")
    if not isinstance(params, Mapping):
        raise ReceivedModelError(f"{what} is a {type(params).__name__}, not a mapping of parameter names to tensors")
    received, wanted = set(params), set(expected)
    if received != wanted:
        missing, unexpected = sorted(wanted - received), sorted(received - wanted)
        raise ReceivedModelError(
            f"{what} has {len(received)} parameters, not the {len(wanted)} this job expects "
            f"(missing {_few(missing)}, unexpected {_few(unexpected)})")
    for key in sorted(expected):
        value, local = params[key], expected[key]
        found, own = _describe(value), _describe(local)
        if found is None:
            raise ReceivedModelError(f"{what}: {key} is a {type(value).__name__}, not a tensor")
        kind, dtype, numel = found
        if kind not in "fiub":
            raise ReceivedModelError(f"{what}: {key} has dtype {dtype}, not a real number type")
        if own is not None and own[0] == "f" and kind != "f":
            raise ReceivedModelError(f"{what}: {key} has dtype {dtype}; this parameter is floating point ({own[1]})")
        if own is not None and numel != own[2]:
            raise ReceivedModelError(f"{what}: {key} has {numel} values, not {own[2]}")


def _describe(value: Any) -> tuple[str, str, int] | None:
    """``(numpy dtype kind, dtype name, element count)`` of a torch tensor or numpy array, else None."""
    if isinstance(value, (np.ndarray, np.generic)):
        return value.dtype.kind, str(value.dtype), int(np.size(value))
    dtype = getattr(value, "dtype", None)
    if hasattr(value, "numel") and type(dtype).__name__ == "dtype" and hasattr(dtype, "is_floating_point"):
        # a torch tensor (torch is not imported here: the server side of this module needs no torch)
        kind = "f" if dtype.is_floating_point else "c" if dtype.is_complex else "b" if str(dtype) == "torch.bool" else "i"
        return kind, str(dtype), int(value.numel())
    return None


def _few(keys: list[str]) -> str:
    return "[" + ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "") + "]" if keys else "none"


def model_fingerprint(params: Mapping[str, Any]) -> str:
    """12 hex digits identifying ``params`` (torch tensors or numpy arrays) byte for byte.

    A SHA-256 over the sorted keys and each tensor's dtype and raw bytes: which global model a
    site received and which one the server sent can be compared without moving any weights.
    """
    digest = hashlib.sha256()
    for key in sorted(params):
        value = params[key]
        array = value.detach().cpu().contiguous().numpy() if hasattr(value, "detach") else np.ascontiguousarray(value)
        digest.update(key.encode())
        digest.update(str(array.dtype).encode())
        digest.update(array.tobytes())
    return digest.hexdigest()[:12]
