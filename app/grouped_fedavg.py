"""Server workflow: one global model per site group (modality or protocol), after FLAMES.

When some hospitals image with one protocol (or modality) and others with another, one averaged
model serves neither group well. ``GroupedFedAvg`` keeps one model per group and averages only
within a group:

- every site declares its group in its own site config (``"group": "mri-3t"``); the site script
  sends it with each update (``GROUP_KEY``), so nothing site-specific is in the job;
- round 1 sends the initial model to every site (all groups start from it) and learns the groups
  from the answers; from then on each site gets its group's model (a site whose group is not
  known yet gets the initial model and joins its group with its first answer);
- each group's model is the case-weighted average of its own sites' updates;
- with ``shared_keys`` (the encoder, when the job sets ``share_encoder``) those parameters are
  then averaged across all groups, weighted by the groups' cases, and written into every group's
  model: the groups share what an image encoder learns and keep their own decoders;
- rounds end as in ``ResilientFedAvg`` (timeout, minimum of sites, report); the report adds each
  group's sites and the fingerprint of the model sent to each group and received by each site;
- each group's model is saved after every round, atomically, to
  ``<run dir>/app_server/groups/<group>/FL_global_model.pt`` (the persistor's format, with the
  round and group in ``meta_props``).

Cross-site evaluation and best-model selection compare one global model across sites, so grouped
jobs run without them (``fedseg.jobs.base``).
"""

from __future__ import annotations

import os
import re
import time
from typing import Any

import torch
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.aggregators.weighted_aggregation_helper import WeightedAggregationHelper
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.fuel.utils.log_utils import center_message

from fedseg import nvflare_internals
from fedseg.app.protocol import GROUP_KEY, RECEIVED_KEY, model_fingerprint
from fedseg.app.resilient_fedavg import ResilientFedAvg

DEFAULT_GROUP = "default"
GROUPS_DIR = "groups"


class GroupedFedAvg(ResilientFedAvg):
    """``ResilientFedAvg`` with one model per site group.

    Args:
        shared_keys: parameters averaged across all groups (empty: the groups share nothing).
        *args, **kwargs: ``ResilientFedAvg`` arguments.
    """

    def __init__(self, *args: Any, shared_keys: list[str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.shared_keys = list(shared_keys or [])
        self._group_of: dict[str, str] = {}
        self._group_models: dict[str, FLModel] = {}
        self._sums: dict[str, WeightedAggregationHelper] = {}
        self._weights: dict[str, dict[str, float]] = {}
        self._received: dict[str, str] = {}

    def run(self) -> None:
        self.info(center_message("Start grouped FedAvg (fedseg: one model per site group)."))
        last_round = self.start_round + self.num_rounds
        self.fl_ctx.set_prop(AppConstants.NUM_ROUNDS, last_round, private=True, sticky=False)
        initial = self._initial_model()
        if initial is None:
            return
        status, reason = "completed", ""
        for self.current_round in range(self.start_round, last_round):
            self.fl_ctx.set_prop(AppConstants.CURRENT_ROUND, self.current_round, private=True, sticky=False)
            self.event(AppEventType.ROUND_STARTED)
            targets = self._live_sites()
            self._sums, self._weights, self._received = {}, {}, {}
            started = time.monotonic()
            sent: dict[str, str] = {}
            if len(targets) >= self.min_sites:
                sent = self._send_group_models(initial, targets, last_round)
            if self.abort_signal.triggered:
                status, reason = "aborted", "the job was aborted"
                break
            record = self._round_record(targets, time.monotonic() - started)
            record["groups"] = {g: sorted(s for s in self._answered if self._group_of.get(s) == g) for g in sorted(self._sums)}
            record["sent"] = sent
            record["received"] = dict(sorted(self._received.items()))
            if len(self._answered) < self.min_sites:
                self._write_round(record)
                status, reason = "stopped", self._too_few(record)
                break
            self._aggregate_groups()
            record["weights"] = {
                g: {s: round(w / sum(ws.values()), 6) for s, w in sorted(ws.items())} for g, ws in sorted(self._weights.items())
            }
            self._write_round(record)
            self._save_group_models()
        self._write_summary(status, reason)
        if status == "stopped":
            self.error(reason)
            self.panic(reason)
            return
        self.info(center_message("Finished grouped FedAvg."))

    # ------------------------------------------------------------------ one round

    def _send_group_models(self, initial: FLModel, targets: list[str], last_round: int) -> dict[str, str]:
        """Send each site its group's model (the initial one while its group is unknown)."""
        by_group: dict[str, list[str]] = {}
        for site in targets:
            group = self._group_of.get(site)
            by_group.setdefault(group if group in self._group_models else "", []).append(site)
        sent = {}
        for group, sites in sorted(by_group.items()):
            source = self._group_models.get(group, initial)
            model = FLModel(params=source.params, params_type=source.params_type, meta=dict(source.meta or {}),
                            current_round=self.current_round, total_rounds=last_round, start_round=self.start_round)
            sent[group or "initial"] = model_fingerprint(model.params)
            self.info(f"Round {self.current_round + 1}: model of group {group or '(initial)'} to {', '.join(sites)}"
                      + (f" (timeout {self.round_timeout} s)" if self.round_timeout else ""))
            self.send_model(task_name=self.task_name, targets=sites, data=model, timeout=self.round_timeout,
                            callback=self._accept_group_update)
        self._wait_for_round()
        return sent

    def _accept_group_update(self, result: FLModel) -> bool:
        if self._site_failed(result):
            return False
        site, meta = nvflare_internals.client_name(result), result.meta or {}
        group = str(meta.get(GROUP_KEY) or DEFAULT_GROUP)
        if self._group_of.get(site, group) != group:
            self.warning(f"{site} moved from group {self._group_of[site]} to {group}")
        self._group_of[site] = group
        weight = nvflare_internals.num_steps_weight(result)
        self._sums.setdefault(group, WeightedAggregationHelper()).add(
            data=result.params, weight=weight, contributor_name=site, contribution_round=self.current_round
        )
        self._weights.setdefault(group, {})[site] = weight
        if meta.get(RECEIVED_KEY):
            self._received[site] = str(meta[RECEIVED_KEY])
        self._answered.append(site)
        return True

    def _aggregate_groups(self) -> None:
        self.event(AppEventType.BEFORE_AGGREGATION)
        for group, helper in self._sums.items():
            self._group_models[group] = FLModel(params=helper.get_result(), meta={"current_round": self.current_round,
                                                                                 "group": group})
        if self.shared_keys and len(self._group_models) > 1:
            totals = {g: sum(ws.values()) for g, ws in self._weights.items()}
            total = sum(totals.values())
            for key in self.shared_keys:
                mean = sum(self._group_models[g].params[key] * (totals[g] / total) for g in totals)
                for g in self._group_models:
                    self._group_models[g].params[key] = mean.clone() if hasattr(mean, "clone") else mean
        self.event(AppEventType.AFTER_AGGREGATION)

    def _save_group_models(self) -> None:
        """Each group's model, atomically, in NVFlare's persistor format (``model`` + ``meta_props``)."""
        for group, model in self._group_models.items():
            # the name comes from a site: never let it leave the groups folder
            folder = os.path.join(self.get_app_dir(), GROUPS_DIR, re.sub(r"[^A-Za-z0-9._-]|^\.+", "_", group))
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, "FL_global_model.pt")
            tmp = f"{path}.tmp"
            torch.save({"model": model.params, "meta_props": dict(model.meta or {})}, tmp)
            os.replace(tmp, path)
