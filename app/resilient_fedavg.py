"""Server workflow: FedAvg whose rounds end on time and survive a site that fails or vanishes.

NVFlare 2.9's ``FedAvg`` sends each round's training task without a timeout, and in its default
error mode a site's error result panics the job: one crashed hospital stopped the whole study
(``FINISHED:EXECUTION_EXCEPTION``) and one vanished hospital left it RUNNING for good.
``ResilientFedAvg`` keeps NVFlare's in-time weighted averaging, persistor, events and model
selection, and changes only how a round ends:

- the round's task goes to every site that is not known to be disconnected, with a timeout of
  ``round_timeout`` seconds (0: no timeout, NVFlare's behaviour);
- the round ends when every site answered or the timeout passed; a site that reported a failure
  (``SITE_FAILURE_KEY`` in its result's meta, ``fedseg.app.protocol``), returned an error, or
  did not answer in time is left out of that round's average and named in the report; it gets
  the next round's task like every other site, so it is back as soon as it answers again;
- with fewer than ``min_sites`` usable answers the job stops (a system panic naming the sites
  and the reason) instead of averaging too few sites or waiting for ever;
- ``start_round`` > 0 resumes a study: the persistor's initial checkpoint is the last global
  model, and the rounds already done are counted (``total_rounds`` stays the study's).

Every completed round also reaches the server's durable study store (``fedseg.app.study_store``:
the global model, FedOpt's optimizer state and the round's record, in one atomic rename), outside
the job's workspace, under the study id (``study_id``; default: the job id). A job with
``resume_from_store`` starts from the store's newest round of its study and runs only the rounds
left: that is how ``fedseg study`` continues a study after a crashed, stuck or aborted job.

Every round appends one line to ``<run dir>/metrics/participation.jsonl`` and the end of the run
writes ``metrics/participation_summary.json``: which sites answered, failed (with the exception
class the site reported, never its message, which may hold paths) or were missing, per round, and
each averaged site's share of the round's model (``weights``: case counts, or the contribution
weights of ``fedseg.app.contribution.ContributionWeightedAggregator``).

With ``personalize`` (the personalized methods: FedPer, FedRep, Ditto, fine-tuning), a completed
study ends with one more task, ``personalize``: every site gets the final global model, makes its
personal model from it (its own head, its Ditto model, a fine-tuned copy), scores it on its own
validation cases and answers with those scores only; they go to ``metrics/personal_scores.json``.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.app_common.utils.fedprox_utils import set_fedprox_metadata
from nvflare.app_common.workflows.fedavg import FedAvg
from nvflare.fuel.utils.log_utils import center_message

from fedseg import nvflare_internals
from fedseg.app import study_store
from fedseg.app.protocol import (
    CONTRIBUTION_KEY,
    PERSONALIZE_TASK,
    POLICY_STAGE,
    SITE_STAGE_KEY,
    WEIGHTS_KEY,
    describe_failure,
    failure_of,
)

REPORT_DIR = "metrics"
ROUND_REPORT = "participation.jsonl"
SUMMARY_REPORT = "participation_summary.json"
PERSONAL_SCORES = "personal_scores.json"
STUDY_REPORT = "study_participation.json"
#: the group of ``nvflare``'s ``show_stats JOB server`` answer that holds the study's progress
STATS_GROUP = "fedseg_study"


class ResilientFedAvg(FedAvg):
    """NVFlare's ``FedAvg`` with a round timeout, a minimum of answering sites and a report.

    Args:
        round_timeout: seconds a round waits for the sites' results (0: no limit).
        min_sites: fewest usable results a round may average; below it the job stops.
        *args, **kwargs: NVFlare ``FedAvg`` arguments (``num_rounds``, ``start_round``, ...).
    """

    def __init__(self, *args: Any, round_timeout: int = 0, min_sites: int = 1, task_check_period: float = 0.5,
                 ignore_result_error: bool = True, personalize: bool = False, study_id: str = "",
                 resume_from_store: bool = False, durable_store: bool = True, **kwargs: Any) -> None:
        # A site's error result is that site's failure for the round, never the job's: the round
        # decides with min_sites (BaseModelController would otherwise panic on the first error), so
        # the argument (which the job export writes back) is always True.
        del ignore_result_error
        super().__init__(*args, ignore_result_error=True, task_check_period=task_check_period, **kwargs)
        self.task_check_period = float(task_check_period)
        self.personalize = bool(personalize)
        if int(round_timeout) < 0:
            raise ValueError(f"round_timeout must be >= 0 seconds, got {round_timeout}")
        if int(min_sites) < 1:
            raise ValueError(f"min_sites must be >= 1, got {min_sites}")
        self.round_timeout = int(round_timeout)
        self.min_sites = int(min_sites)
        self._failed: dict[str, str] = {}
        self._at_startup: set[str] = set()  # sites out of the whole job: start-up failure or refusal
        self._stages: dict[str, str] = {}  # those sites' stage: "startup" (config, data) or "policy"
        self._answered: list[str] = []
        self._targets: list[str] = []  # the sites sent this round's model
        self._val_dice: dict[str, float] = {}  # site -> its val_dice of this round's global model (a scalar it sends)
        self._history: list[dict[str, Any]] = []
        #: the study's folder in the server's durable store (None: off); see fedseg.app.study_store
        self.study_id = str(study_id)
        self.resume_from_store = bool(resume_from_store)
        self.durable_store = bool(durable_store)
        self._study_dir: str | None = None
        self._store_resume: tuple[int, str] | None = None  # (rounds done, round folder) resumed from
        self._store_error = ""

    # ------------------------------------------------------------------ the workflow

    def run(self) -> None:
        self.info(center_message("Start FedAvg (fedseg: round timeout, minimum sites, report)."))
        # the server notices a finished round within task_check_period, not only NVFlare's fixed 0.2 s
        nvflare_internals.set_task_monitor_period(self, min(self.task_check_period, 0.2))
        self._open_study_store()
        last_round = self.start_round + self.num_rounds
        self.fl_ctx.set_prop(AppConstants.NUM_ROUNDS, last_round, private=True, sticky=False)
        model = self._initial_model()
        if model is None:  # the persistor panicked (e.g. the resume checkpoint is missing)
            return
        model.start_round, model.total_rounds = self.start_round, last_round
        if self.start_round:
            self.info(f"Resuming the study at round {self.start_round + 1} of {last_round}: "
                      f"{self.start_round} round(s) already done")
        status, reason = "completed", ""
        for self.current_round in range(self.start_round, last_round):
            model.current_round = self.current_round
            self.fl_ctx.set_prop(AppConstants.CURRENT_ROUND, self.current_round, private=True, sticky=False)
            self.event(AppEventType.ROUND_STARTED)
            targets = self._live_sites()
            started = time.monotonic()
            if len(targets) >= self.min_sites:
                self._run_round(model, targets)
            if self.abort_signal.triggered:
                self.info("Abort signal triggered. Finishing FedAvg.")
                status, reason = "aborted", "the job was aborted"
                break
            record = self._round_record(targets, time.monotonic() - started)
            if len(self._answered) < self.min_sites:
                self._write_round(record)
                status, reason = "stopped", self._too_few(record)
                break
            self.event(AppEventType.BEFORE_AGGREGATION)
            aggregate = nvflare_internals.aggregated_result(self)
            self.fire_event_with_data(
                AppEventType.AFTER_AGGREGATION, self.fl_ctx, AppConstants.AGGREGATION_RESULT, aggregate
            )
            record["weights"] = self._round_weights(aggregate)
            if (aggregate.meta or {}).get(CONTRIBUTION_KEY):
                record["contribution"] = aggregate.meta[CONTRIBUTION_KEY]
            self._write_round(record)
            model = self.update_model(model, aggregate)
            self.save_model(model)  # NVFlare's PTFileModelPersistor writes it atomically (temp + os.replace)
            self._save_durable_round(record)
            nvflare_internals.cleanup_memory(self)
        self._write_summary(status, reason)
        self._write_study_report()
        if status == "stopped":
            self.error(reason)
            self.panic(reason)  # ends the job with this reason instead of averaging too few sites
            return
        if status == "completed" and self.personalize:
            self._score_personal_models(model)
        self.info(center_message("Finished FedAvg."))

    def _score_personal_models(self, model: FLModel) -> None:
        """The ``personalize`` task: each site's personal model scored on its own validation cases."""
        targets = self._live_sites()
        scores: dict[str, dict[str, float]] = {}

        def take(result: FLModel) -> None:
            site = nvflare_internals.client_name(result)
            if self._site_failed(result, weights=False):
                return
            scores[site] = {k: float(v) for k, v in (result.metrics or {}).items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool)}

        self.info(f"Personal models: every site scores its own on its validation cases ({', '.join(targets)})")
        final = FLModel(params=model.params, params_type=model.params_type, meta=dict(model.meta or {}),
                        current_round=self.current_round, total_rounds=self.start_round + self.num_rounds)
        self.send_model(task_name=PERSONALIZE_TASK, targets=targets, data=final, timeout=self.round_timeout,
                        callback=take)
        self._wait_for_round()
        doc = {"scores": dict(sorted(scores.items())), "failed": {s: self._failed[s] for s in sorted(self._failed)},
               "missing": sorted(s for s in targets if s not in scores and s not in self._failed)}
        path = os.path.join(self._report_dir(), PERSONAL_SCORES)
        with open(f"{path}.tmp", "w") as f:
            json.dump(doc, f, indent=2)
        os.replace(f"{path}.tmp", path)
        self.info("Personal models scored: " + ", ".join(f"{s} val_dice={m.get('val_dice', float('nan')):.4f}"
                                                          for s, m in sorted(scores.items())))

    def _initial_model(self) -> FLModel | None:
        if self.model is not None:
            model = self.model if isinstance(self.model, FLModel) else FLModel(params=self.model)
        else:
            model = self.load_model()
        if model is not None and self._store_resume:
            self._load_stored_params(model, os.path.join(self._store_resume[1], study_store.MODEL_FILE))
        return model

    # ------------------------------------------------------------------ the durable study store

    def _open_study_store(self) -> None:
        """Find the study's folder in the durable store; with ``resume_from_store``, start after its last round."""
        if not self.durable_store:
            return
        try:
            root = study_store.store_root(self.engine.get_workspace().get_root_dir())
            study = self.study_id or self.fl_ctx.get_job_id()
            self._study_dir = str(study_store.study_folder(root, study))  # a plain name, owner-only
        except Exception as err:  # the store is an addition: a job without it still runs
            self._study_dir, self._store_error = None, f"{type(err).__name__}: {err}"
            self.warning(f"durable study store unavailable ({self._store_error}); rounds live only in the job workspace")
            return
        self.info(f"Durable study store: {self._study_dir}")
        if not self.resume_from_store:
            return
        latest = study_store.latest_model(self._study_dir)
        if latest is None or latest[0] <= self.start_round:
            self.info("Durable study store: no completed round to continue from; starting at round "
                      f"{self.start_round + 1}")
            return
        done, folder = latest
        total = self.start_round + self.num_rounds
        self._store_resume = (done, str(folder))
        self.start_round, self.num_rounds = min(done, total), max(0, total - done)
        self.info(f"Durable study store: continuing the study after round {done} of {total} ({folder})")

    def _load_stored_params(self, model: FLModel, path: str) -> None:
        """Replace ``model``'s weights by the stored global model's (same keys, same array kind)."""
        from fedseg.lightning_modules.safe_load import load_checkpoint

        doc = load_checkpoint(path)
        stored = doc.get("model") if isinstance(doc, dict) else None
        if not isinstance(stored, dict):
            raise RuntimeError(f"{path}: not a global model checkpoint")
        current = model.params or {}
        missing = sorted(set(current) - set(stored))
        if missing:
            raise RuntimeError(f"{path}: the stored model lacks {len(missing)} key(s) of this job's model, e.g. {missing[0]}")
        numpy_params = any(type(v).__module__ == "numpy" for v in current.values())
        model.params = {k: (stored[k].cpu().numpy() if numpy_params and hasattr(stored[k], "cpu") else stored[k])
                        for k in current}

    def _save_durable_round(self, record: dict[str, Any]) -> None:
        """Copy the round's global model (and FedOpt's optimizer state) and record into the durable store."""
        if not self._study_dir:
            return
        app_dir = self.get_app_dir()
        files = {name: os.path.join(app_dir, name) for name in self._durable_files()
                 if os.path.isfile(os.path.join(app_dir, name))}
        if study_store.MODEL_FILE not in files:
            self.warning(f"Round {record['round']}: no {study_store.MODEL_FILE} in {app_dir}; not in the durable store")
            return
        doc = {**record, "job_id": self.fl_ctx.get_job_id(), "total_rounds": self.start_round + self.num_rounds}
        try:
            study_store.save_round(self._study_dir, record["round"], files, doc)
        except OSError as err:
            self.error(f"Round {record['round']}: could not write the durable study store {self._study_dir}: {err}")

    def _durable_files(self) -> tuple[str, ...]:
        """Files of the app folder that make a round durable (FedOpt adds its optimizer state)."""
        return (study_store.MODEL_FILE,)

    def _write_study_report(self) -> None:
        """Every round of the whole study so far (all its jobs), from the store, into this job's metrics."""
        if not self._study_dir:
            return
        doc = {"study_id": os.path.basename(self._study_dir), "store": self._study_dir,
               "rounds": study_store.records(self._study_dir), "redone": study_store.redone(self._study_dir)}
        path = os.path.join(self._report_dir(), STUDY_REPORT)
        with open(f"{path}.tmp", "w") as f:
            json.dump(doc, f, indent=1)
        os.replace(f"{path}.tmp", path)

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        """``show_stats JOB server`` (``fedseg study``'s progress probe) gets the study's rounds."""
        super().handle_event(event_type, fl_ctx)
        from nvflare.widgets.info_collector import InfoCollector

        if event_type != InfoCollector.EVENT_TYPE_GET_STATS:
            return
        collector = fl_ctx.get_prop(InfoCollector.CTX_KEY_STATS_COLLECTOR, None)
        if collector is None:
            return
        done = [r["round"] for r in self._history if r.get("answered") and len(r["answered"]) >= self.min_sites]
        last = self._history[-1] if self._history else {}
        collector.add_info(group_name=STATS_GROUP, info={
            "current_round": int(getattr(self, "current_round", 0) or 0) + 1,
            "start_round": self.start_round,
            "total_rounds": self.start_round + self.num_rounds,
            "rounds_done": max(done) if done else self.start_round,
            "last_round": {k: last.get(k) for k in ("round", "answered", "failed", "missing", "disconnected", "val_dice")}
            if last else {},
            # the round in flight, for the study's live display (fedseg.run.study_progress)
            "in_flight": {"round": int(getattr(self, "current_round", 0) or 0) + 1, "targets": list(self._targets),
                          "answered": list(self._answered), "val_dice": dict(self._val_dice)},
            "study_dir": self._study_dir or "",
        })

    def _run_round(self, model: FLModel, targets: list[str]) -> None:
        nvflare_internals.start_round_aggregation(self, expected=len(targets))
        set_fedprox_metadata(model, self.fedprox_mu)
        self.info(f"Round {self.current_round + 1}: sending the global model to {', '.join(targets)}"
                  + (f" (timeout {self.round_timeout} s)" if self.round_timeout else ""))
        self.send_model(
            task_name=self.task_name,
            targets=targets,
            data=model,
            timeout=self.round_timeout,
            callback=self._take_result,
        )
        self._wait_for_round()

    def _wait_for_round(self) -> None:
        """Until every task of the round has ended: all answered, timed out, or the job aborted."""
        while self.get_num_standing_tasks():
            if self.abort_signal.triggered:
                self.cancel_all_tasks()
                return
            time.sleep(self.task_check_period)

    def _too_few(self, record: dict[str, Any]) -> str:
        """The reason the study stops after ``record``'s round."""
        return (f"round {record['round']}: only {len(record['answered'])} of the {self.min_sites} sites "
                f"needed answered ({self._describe(record)}); the study stops here")

    def _live_sites(self) -> list[str]:
        """The job's sites that NVFlare does not consider disconnected; reset this round's tallies."""
        self._failed, self._answered, self._at_startup, self._stages, self._val_dice = {}, [], set(), {}, {}
        sites = [client.name for client in self.engine.get_clients()]
        self._targets = [s for s in sites if not self.get_client_disconnect_time(s)]
        return list(self._targets)

    # ------------------------------------------------------------------ results of one site

    def _site_failed(self, result: FLModel, weights: bool = True) -> bool:
        """True (and noted) when a site answered "failed", or sent no weights where ``weights`` are due."""
        site = nvflare_internals.client_name(result)
        failure = failure_of(result.meta)
        if not failure and (result.params or not weights):
            return False
        self._failed[site] = str(failure or "sent no weights")
        if (result.meta or {}).get(SITE_STAGE_KEY) in ("startup", POLICY_STAGE):  # out of the whole job
            self._at_startup.add(site)
            self._stages[site] = (result.meta or {})[SITE_STAGE_KEY]
        stage = self._stages.get(site, "round")
        self.warning(f"Round {self.current_round + 1}: {describe_failure(site, self._failed[site], stage)}; "
                     "left out of the average")
        return True

    def _take_result(self, result: FLModel) -> bool:
        """One site's result: noted as a failure, or added to the round's in-time average."""
        if self._site_failed(result):
            return False
        site = nvflare_internals.client_name(result)
        accepted = nvflare_internals.aggregate_one_result(self, result)
        if accepted:
            self._answered.append(site)
            dice = (result.metrics or {}).get("val_dice")
            if isinstance(dice, (int, float)) and not isinstance(dice, bool) and math.isfinite(dice):
                self._val_dice[site] = round(float(dice), 4)
        return accepted

    def _accept_train_result(
        self, client_name: str, result: Shareable, fl_ctx: FLContext, is_unknown_task: bool = False
    ) -> bool:
        accepted = super()._accept_train_result(client_name, result, fl_ctx, is_unknown_task)
        rc = result.get_return_code()
        if not is_unknown_task and rc and rc != ReturnCode.OK:
            self._failed[client_name] = f"NVFlare error {rc}"
            self.warning(f"Round {self.current_round + 1}: {client_name} returned {rc}; left out of the average")
        elif is_unknown_task:
            self.warning(f"{client_name} answered after its round had ended; the result is not used")
        return accepted

    # ------------------------------------------------------------------ the report

    def _round_weights(self, aggregate: FLModel) -> dict[str, float]:
        """Each averaged site's share of the round's global model (they sum to 1)."""
        weights = (aggregate.meta or {}).get(WEIGHTS_KEY)  # a contribution-weighted aggregator's
        if not weights:  # NVFlare's in-time FedAvg: case counts (times any aggregation_weights)
            weights = nvflare_internals.site_weights(self)
        total = sum(weights.values())
        return {site: round(w / total, 6) for site, w in sorted(weights.items())} if total else {}

    def _round_record(self, targets: list[str], seconds: float) -> dict[str, Any]:
        all_sites = sorted({c.name for c in self.engine.get_clients()} | set(targets))
        answered = sorted(self._answered)
        failed = {s: self._failed[s] for s in sorted(self._failed) if s not in answered}
        missing = [s for s in targets if s not in answered and s not in failed]
        record = {
            "round": self.current_round + 1,
            "targets": sorted(targets),
            "answered": answered,
            "failed": failed,
            "failed_at_startup": sorted(s for s in failed if s in self._at_startup),
            "failed_stage": {s: self._stages.get(s, "round") for s in failed},
            "missing": sorted(missing),
            "disconnected": [s for s in all_sites if s not in targets],
            "seconds": round(seconds, 2),
            "timeout": self.round_timeout,
            "val_dice": {site: self._val_dice[site] for site in answered if site in self._val_dice},
        }
        left_out = len(targets) - len(answered)
        message = f"Round {record['round']}: {len(answered)}/{len(targets)} sites answered"
        if left_out or record["disconnected"]:
            self.warning(f"{message}; {self._describe(record)}")
        else:
            self.info(message)
        return record

    @staticmethod
    def _describe(record: dict[str, Any]) -> str:
        parts = [describe_failure(s, why, _stage(record, s)) for s, why in record["failed"].items()]
        if record["missing"]:
            waited = f"within {record['timeout']} s" if record["timeout"] else "before the round ended"
            parts.append(f"no answer {waited} from {', '.join(record['missing'])}")
        if record["disconnected"]:
            parts.append(f"disconnected: {', '.join(record['disconnected'])}")
        return "; ".join(parts) or "every site answered"

    def _write_summary(self, status: str, reason: str) -> None:
        sites: dict[str, dict[str, Any]] = {}
        for record in self._history:
            for site in {*record["targets"], *record["disconnected"]}:
                entry = sites.setdefault(site, {"rounds_answered": [], "rounds_missed": [], "why": {}})
                if site in record["answered"]:
                    entry["rounds_answered"].append(record["round"])
                    continue
                entry["rounds_missed"].append(record["round"])
                failure = record["failed"].get(site)
                if failure and _stage(record, site) != "round":
                    failure = describe_failure(site, failure, _stage(record, site)).removeprefix(f"{site} ")
                entry["why"][str(record["round"])] = failure or (
                    "no answer in time" if site in record["missing"] else "disconnected"
                )
        summary = {
            "status": status,
            "reason": reason,
            "rounds": [self.start_round + 1, self.start_round + self.num_rounds],
            "rounds_run": [r["round"] for r in self._history],
            "round_timeout": self.round_timeout,
            "min_sites": self.min_sites,
            "sites": dict(sorted(sites.items())),
        }
        path = os.path.join(self._report_dir(), SUMMARY_REPORT)
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(summary, f, indent=2)
        os.replace(tmp, path)

    def _write_round(self, record: dict[str, Any]) -> None:
        self._history.append(record)
        with open(os.path.join(self._report_dir(), ROUND_REPORT), "a") as f:
            f.write(json.dumps(record) + "\n")

    def _report_dir(self) -> str:
        path = os.path.join(self.get_run_dir(), REPORT_DIR)
        os.makedirs(path, exist_ok=True)
        return path


def _stage(record: dict[str, Any], site: str) -> str:
    """Where ``site``'s failure in ``record``'s round happened: "round", "startup" or "policy"."""
    stage = record.get("failed_stage", {}).get(site)
    return stage or ("startup" if site in record.get("failed_at_startup", []) else "round")
