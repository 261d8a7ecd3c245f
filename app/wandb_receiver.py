"""Server component: the sites' streamed metrics as W&B runs, one per site and job, grouped by job.

Built on NVFlare's ``WandBReceiver`` (nvflare/app_opt/tracking/wandb/wandb_receiver.py): one
``wandb`` process per site, named ``"{site}-{job_id}-{name}"`` in group ``"{name}-{job_id}"``.
Sites need neither W&B credentials nor internet: their ``flare.logger()`` metrics reach the server
through NVFlare, and only the server talks to W&B. What this subclass changes:

- offline unless asked for ``online``; ``online`` without ``WANDB_API_KEY`` on the server is
  refused, never quietly logged offline; the key is never part of the job;
- a receiver that cannot start stops the job (``system_panic``, NVFlare's fatal-error event: the
  server aborts the run and names the reason in its log). NVFlare's ``AnalyticsReceiver`` catches
  every exception of ``initialize`` and lets the job run on untracked with one log line
  (nvflare/app_common/widgets/streaming.py, ``_handle_start_run_event``); a study lead who asked for
  W&B runs would find none at the end;
- runs are written under ``$WANDB_DIR`` (W&B's own variable; ``fedseg simulate`` sets it to the run
  folder) or else the server's job folder, as ``<dir>/wandb/offline-run-*``;
- each site's number of training cases (``n_train_cases``, from the meta of its accepted update,
  see ``fedseg.app.protocol``) is logged with its round's metrics;
- only scalars are forwarded (no text, images or parameters that could name a case or a file),
  the config is stripped of anything path-like, and W&B's system metadata is off
  (``fedseg.lightning_modules.tracking.PRIVATE_SETTINGS``).
"""

from __future__ import annotations

import copy
import os
import time
from multiprocessing import Process, Queue
from typing import Any

from nvflare.apis.analytix import AnalyticsData, AnalyticsDataType, LogWriterName
from nvflare.apis.dxo import from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import ProcessType, ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.app_common.utils.fl_model_utils import FLModelUtils
from nvflare.app_opt.tracking.wandb.wandb_receiver import WandBReceiver, WandBTask

from fedseg import nvflare_internals
from fedseg.app.protocol import N_TRAIN_CASES_KEY
from fedseg.lightning_modules.tracking import API_KEY_ENV, PRIVATE_SETTINGS, PROJECT, online_allowed, sanitize_config

_SCALAR_TYPES = (AnalyticsDataType.METRIC, AnalyticsDataType.METRICS, AnalyticsDataType.PARAMETER, AnalyticsDataType.PARAMETERS)


class FedsegWandBReceiver(WandBReceiver):
    """NVFlare's W&B receiver, offline by default, with fedseg's privacy settings.

    ``run_config``: the job's arguments (``Job.wandb_config()``); ``job_type``: the W&B job
    type (``"federated"``).
    """

    def __init__(
        self,
        run_name: str = "fedseg",
        project: str = PROJECT,
        run_config: dict[str, Any] | None = None,
        mode: str = "offline",
        job_type: str = "federated",
        process_timeout: float = 30.0,
    ):
        if mode not in ("offline", "online"):
            raise ValueError(f"W&B receiver mode must be 'offline' or 'online', got {mode!r}")
        self.run_name = run_name
        self.project = project
        self.run_config = sanitize_config(run_config or {})
        self.job_type = job_type
        wandb_args = {"project": project, "name": run_name, "job_type": job_type, "settings": dict(PRIVATE_SETTINGS)}
        previous = os.environ.get("WANDB_MODE")
        super().__init__(wandb_args=wandb_args, mode=mode, process_timeout=process_timeout)
        # The base class sets WANDB_MODE for the whole process; the mode is passed to wandb.init instead.
        if previous is None:
            os.environ.pop("WANDB_MODE", None)
        else:
            os.environ["WANDB_MODE"] = previous

    def initialize(self, fl_ctx: FLContext) -> None:
        """Start one W&B process per site; an error is kept for ``handle_event`` to stop the job with."""
        self.start_error: Exception | None = None
        try:
            self._start_runs(fl_ctx)
        except Exception as err:
            self.start_error = err
            raise  # the base class logs it, then carries on: handle_event stops the job

    def _start_runs(self, fl_ctx: FLContext) -> None:
        # Re-implements WandBReceiver.initialize: the base puts one shared, mutated dict on every
        # site's queue (pickled later by the queue's feeder thread, so a site can get another's
        # name) and calls wandb.login, which needs network; here each site gets its own copy.
        if fl_ctx.get_process_type() == ProcessType.SERVER_JOB:
            site_names = [c.name for c in fl_ctx.get_engine().get_clients()]
        else:
            site_names = [fl_ctx.get_identity_name()]
        if not site_names or not all(site_names):
            raise RuntimeError("W&B receiver: no site names in this job")
        self.fl_ctx = fl_ctx
        if self.mode == "online" and not online_allowed():
            # refused, not quietly logged offline: the study lead asked for runs in the W&B cloud
            raise RuntimeError(f"W&B online mode needs {API_KEY_ENV} in the server's environment; set it or "
                               "submit the job with wandb 'offline'")
        root = os.environ.get("WANDB_DIR") or fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id())
        os.makedirs(root, exist_ok=True)
        job_id = nvflare_internals.wandb_job_tag(fl_ctx)
        for site in site_names:
            args = {
                **copy.deepcopy(self.wandb_args),
                "name": f"{site}-{job_id}-{self.run_name}",
                "group": f"{self.run_name}-{job_id}",
                "mode": self.mode,
                "dir": root,
                "config": {**self.run_config, "job_id": job_id, "client": site, "run_name": self.run_name},
            }
            queue: Queue = Queue()
            queue.put(WandBTask(task_owner=site, task_type="init", task_data=args, step=0))
            self.queues[site] = queue
            self.processes[site] = Process(target=nvflare_internals.wandb_site_worker(self), args=(queue,))
            self.processes[site].start()
        self.log_info(fl_ctx, f"W&B ({self.mode}) runs for {', '.join(site_names)} under {root}/wandb")
        time.sleep(0.2)

    def save(self, fl_ctx: FLContext, shareable: Shareable, record_origin: str) -> None:
        """Forward the numeric scalars of a METRIC(S)/PARAMETER(S) record; drop everything else."""
        data = AnalyticsData.from_dxo(from_shareable(shareable), receiver=LogWriterName.WANDB)
        if not data or data.data_type not in _SCALAR_TYPES:
            return
        values = data.value if isinstance(data.value, dict) else {data.tag: data.value}
        scalars = {
            str(k): float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        queue = self.get_task_queue(record_origin)
        if scalars and queue is not None:
            queue.put(WandBTask(task_owner=record_origin, task_type="log", task_data=scalars, step=data.step))

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        super().handle_event(event_type, fl_ctx)
        if event_type == EventType.START_RUN and getattr(self, "start_error", None) is not None:
            # the job must not run on untracked: NVFlare's fatal-error event makes the server abort it
            reason = f"W&B tracking could not start, the job is stopped: {self.start_error}"
            self.log_error(fl_ctx, reason, fire_event=False)
            self.system_panic(reason, fl_ctx)
        if event_type == AppEventType.AFTER_CONTRIBUTION_ACCEPT:
            self._log_case_count(fl_ctx)

    def _log_case_count(self, fl_ctx: FLContext) -> None:
        # The update's meta is not streamed as a metric; the server sees it when it accepts the update.
        result = fl_ctx.get_prop(AppConstants.TRAINING_RESULT)
        if not isinstance(result, Shareable):
            return
        site = result.get_peer_prop(ReservedKey.IDENTITY_NAME, None)
        try:
            meta = FLModelUtils.from_shareable(result).meta or {}
        except Exception:  # not a model update (nothing to count)
            return
        n_cases = meta.get(N_TRAIN_CASES_KEY)
        queue = self.get_task_queue(site)
        if queue is not None and isinstance(n_cases, (int, float)):
            # no step: the receiver adds it to the site's current round (its latest streamed step)
            queue.put(WandBTask(task_owner=site, task_type="log", task_data={N_TRAIN_CASES_KEY: float(n_cases)}, step=None))
