"""NVFlare's privacy filters made safe for fedseg's site updates, and the statistics that show their effect.

``TorchPercentilePrivacy`` and ``TorchSVTPrivacy`` are NVFlare's ``PercentilePrivacy`` and
``SVTPrivacy`` (nvflare/app_common/filters/) with the same arguments and the same algorithm; the
subclasses only adapt what goes in and out, because as shipped (NVFlare 2.9.0):

- both filters treat ``dxo.data`` as a weight DIFF whatever its data kind: on FULL weights
  (``DataKind.WEIGHTS``, their default ``data_kinds`` includes it) they would zero most weights and
  clip the rest to +-gamma, i.e. destroy the model. fedseg therefore sends diffs
  (``params_transfer_type=DIFF``, see ``fedseg.jobs.addons``) and these subclasses refuse anything
  but ``WEIGHT_DIFF`` (fail closed: the site's result becomes a filter error, never raw weights);
- ``SVTPrivacy`` returns numpy arrays (``np.zeros(value.shape, dtype=value.dtype)``) even for torch
  input, while our sites and server exchange torch tensors (``server_expected_format=PYTORCH``);
  ``PercentilePrivacy`` turns integer tensors into floats. The filtered values are converted back
  to torch tensors of the original dtype, so keys, shapes and dtypes reach the server unchanged;
- a filter that returns ``None`` leaves the update UNFILTERED (nvflare/apis/dxo_filter.py,
  ``_apply_filter``), which ``PercentilePrivacy`` does for gamma <= 0 or a percentile outside
  [0, 100]: the subclasses raise instead (the arguments are also checked when the job is built);
- integer tensors (e.g. BatchNorm's ``num_batches_tracked``) are counters, not weights: both
  filters would noise/clip them in float and truncate back; they are passed on unchanged.

Both filters divide the diff by the update's ``NUM_STEPS_CURRENT_ROUND`` before clipping and
multiply back after (NVFlare's "invariant to local steps"); fedseg's sites put their number of
training cases there (``fedseg.app.protocol``), so ``gamma`` bounds the diff per training case.

``UpdateStatsRecorder`` is a filter that passes every update on unchanged and appends one JSON
line of statistics per update (share of non-zero entries, largest magnitude, L2 norm) to
``<run dir>/metrics/update_stats.jsonl``: on the server it shows what the privacy filter let
through, site by site and round by round.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import numpy as np
import torch
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.filters.percentile_privacy import PercentilePrivacy
from nvflare.app_common.filters.svt_privacy import SVTPrivacy

#: torch dtypes numpy cannot hold: filtered in float32 and cast back
_NOT_IN_NUMPY = (torch.bfloat16,)


def _kind_name(kind: Any) -> str:
    """``"WEIGHT_DIFF"`` for ``DataKind.WEIGHT_DIFF`` (a str Enum, whose ``str()`` is ``"DataKind.WEIGHT_DIFF"``)."""
    return str(getattr(kind, "value", kind))


def _is_weight(value: Any) -> bool:
    """A floating-point tensor or array: what the privacy filters act on."""
    if isinstance(value, torch.Tensor):
        return value.is_floating_point()
    return np.issubdtype(np.asarray(value).dtype, np.floating)


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return (value.float() if value.dtype in _NOT_IN_NUMPY else value).numpy()
    return np.asarray(value)


def _like(filtered: Any, original: Any) -> Any:
    """``filtered`` as the same kind of object (torch tensor or numpy array) and dtype as ``original``."""
    if isinstance(original, torch.Tensor):
        tensor = filtered if isinstance(filtered, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(filtered))
        return tensor.to(dtype=original.dtype)
    return np.asarray(filtered, dtype=np.asarray(original).dtype)


class _WeightDiffAdapter:
    """Mixin for a ``DXOFilter`` subclass: diff-only input, numpy inside, the original types outside."""

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO:
        name = type(self).__name__
        if dxo.data_kind != DataKind.WEIGHT_DIFF:
            raise RuntimeError(
                f"{name} filters weight differences, but this update is {_kind_name(dxo.data_kind)}: "
                "the site must send DIFF (params_transfer_type=DIFF, set by fedseg.jobs.addons)"
            )
        original = dict(dxo.data or {})
        weights = {k: _to_numpy(v) for k, v in original.items() if _is_weight(v)}
        if not weights:  # counters only (NVFlare itself passes an update without entries on): nothing to protect
            return dxo
        dxo.data = weights
        result = super().process_dxo(dxo, shareable, fl_ctx)  # type: ignore[misc]
        if result is None:  # NVFlare's "declined" (bad settings) would send the update unfiltered
            raise RuntimeError(f"{name} declined to filter the update (check its arguments)")
        result.data = {k: _like(result.data[k], v) if k in weights else v for k, v in original.items()}
        return result


class TorchPercentilePrivacy(_WeightDiffAdapter, PercentilePrivacy):
    """NVFlare's ``PercentilePrivacy`` (Shokri & Shmatikov): of the diff, only entries whose magnitude
    is above the ``percentile``-th percentile are sent, each clipped to +-``gamma`` (per step)."""


class TorchSVTPrivacy(_WeightDiffAdapter, SVTPrivacy):
    """NVFlare's ``SVTPrivacy`` (sparse vector technique): a ``fraction`` of the diff's entries is
    released, chosen by noisy thresholding, each clipped to +-``gamma`` (per step) plus Laplace noise."""


def update_stats(data: dict[str, Any], steps: float = 1.0) -> dict[str, Any]:
    """Statistics of one update's floating-point entries (integer counters are left out)."""
    entries = nonzero = 0
    max_abs = sum_sq = 0.0
    for value in data.values():
        if not _is_weight(value):
            continue
        array = _to_numpy(value).astype(np.float64, copy=False)
        entries += array.size
        nonzero += int(np.count_nonzero(array))
        if array.size:
            max_abs = max(max_abs, float(np.max(np.abs(array))))
            sum_sq += float(np.sum(array * array))
    return {
        "entries": entries,
        "nonzero_fraction": nonzero / entries if entries else 0.0,
        "max_abs": max_abs,
        "max_abs_per_step": max_abs / steps if steps else max_abs,
        "l2_norm": math.sqrt(sum_sq),
    }


class UpdateStatsRecorder(Filter):
    """Passes every update on unchanged; appends its statistics to ``<run dir>/metrics/<file_name>``.

    One line per update with ``site``, ``task``, ``round``, ``kind``, ``steps``
    (``NUM_STEPS_CURRENT_ROUND``) and ``update_stats``; results without weights are skipped.
    """

    def __init__(self, file_name: str = "update_stats.jsonl") -> None:
        super().__init__()
        self.file_name = file_name

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        try:
            dxo = from_shareable(shareable)
        except Exception:  # not a DXO (an error reply): nothing to measure
            return shareable
        if dxo.data_kind not in (DataKind.WEIGHTS, DataKind.WEIGHT_DIFF) or not dxo.data:
            return shareable
        steps = float(dxo.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND, 1) or 1)
        current_round = shareable.get_header(AppConstants.CURRENT_ROUND, fl_ctx.get_prop(AppConstants.CURRENT_ROUND))
        record = {
            "time": time.time(),
            "site": shareable.get_peer_prop(ReservedKey.IDENTITY_NAME, ""),
            "task": shareable.get_header(ReservedKey.TASK_NAME, ""),
            "round": current_round,
            "kind": _kind_name(dxo.data_kind),
            "steps": steps,
            **update_stats(dxo.data, steps),
        }
        run_dir = fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id())
        os.makedirs(os.path.join(run_dir, "metrics"), exist_ok=True)
        with open(os.path.join(run_dir, "metrics", self.file_name), "a") as f:
            f.write(json.dumps(record) + "\n")
        return shareable
