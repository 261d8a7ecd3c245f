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
SITE_STAGE_KEY        with a failure: "startup" (the site could not start: config, data) or "round"
====================  =======================================================================

The server's aggregate carries ``WEIGHTS_KEY`` (each site's share of the round's model) and
``CONTRIBUTION_KEY`` (the contribution weights' inputs). Only scalars and names cross here.
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
#: errors of a site's own data or configuration: the site "refused its data"
DATA_ERRORS = frozenset({"DatasetCheckError", "DatalistError", "SiteConfigError"})
WEIGHTS_KEY = "fedseg_weights"
CONTRIBUTION_KEY = "fedseg_contribution"
#: the task that ends a personalized job: each site scores its personal model on its own validation
#: cases and answers with the scores only (``fedseg.app.resilient_fedavg``, ``fedseg.app.site_runner``)
PERSONALIZE_TASK = "personalize"


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


def failure_of(meta: Mapping[str, Any] | None) -> str | None:
    """The error class a site reported in ``meta``, or None."""
    value = (meta or {}).get(SITE_FAILURE_KEY)
    return str(value) if value else None


def describe_failure(site: str, error: str, stage: str = "round") -> str:
    """What the study lead reads: "hospital-b refused its data (DatasetCheckError); see that site's log"."""
    if stage == "startup":
        what = "refused its data" if error in DATA_ERRORS else "could not start"
        return f"{site} {what} ({error}); see that site's log"
    return f"{site} failed ({error})"


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
