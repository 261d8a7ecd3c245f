"""The executor every fedseg training job names at its sites: ``SiteExecutor``.

A job names this class and gives it settings only (the site document of
``fedseg.jobs.base.Job.site_document`` and the fedseg version the job was built for); the code it
runs is the site's installed fedseg (``fedseg.app.site_runner``, through NVFlare's in-process
Client API executor). So a job folder has no ``app/custom``, and a site's kit can refuse custom
code and allow only listed classes (``fedseg.provisioning.site_control``).

Before the site reads a single case, the executor decides whether the site runs the job
(``fedseg.app.site_policy``): the same fedseg version, the site's policy, its approve list. Every
decision goes to the site's audit log. A refused job never starts the site runner; every task is
answered as this site's refusal, with the rule, so the lead reads "hospital-b refused the job:
accepts at most 100 rounds; the job asks 200". A job that sends more training rounds than the
policy allows is refused from the first round past the limit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.executors.client_api_executor import ClientAPIExecutor

from fedseg import __version__
from fedseg.app import site_entry


class SiteExecutor(ClientAPIExecutor):
    """NVFlare's in-process Client API executor running the installed ``fedseg.app.site_entry``.

    ``job``: the site document (study settings, algorithm, options); ``fedseg_version``: the
    version of fedseg that built the job. The remaining arguments are the Client API executor's.
    """

    #: written into the exported job even when equal to the defaults: the job says how weights travel
    _always_serialize_args = ("params_transfer_type", "params_exchange_format", "server_expected_format")

    def __init__(self, job: dict[str, Any], fedseg_version: str, params_transfer_type: str = "FULL",
                 params_exchange_format: str = "pytorch", server_expected_format: str = "pytorch") -> None:
        text = json.dumps(job, separators=(",", ":"), sort_keys=True)
        if any(c.isspace() for c in text):  # NVFlare splits the script's arguments at whitespace
            raise ValueError(f"a job setting contains whitespace, which NVFlare would split: {text}")
        super().__init__(
            execution_mode="in_process",
            task_script_path=os.path.abspath(site_entry.__file__),
            task_script_args=f"--job-config {text}",
            params_exchange_format=params_exchange_format,
            server_expected_format=server_expected_format,
            params_transfer_type=params_transfer_type,
        )
        # NVFlare's job exporter writes back the constructor arguments it finds as attributes
        self.job = job
        self.fedseg_version = fedseg_version
        self.job_exchange_format = params_exchange_format
        self._refusal = ""
        self._train_tasks = 0
        self._max_rounds: int | None = None

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        if event_type == EventType.START_RUN:
            self._refusal = self._decide(fl_ctx)
            if self._refusal:  # the site runner never starts: nothing of the site's data is read
                self.log_warning(fl_ctx, f"this site refuses the job: {self._refusal}")
                # the tasks still arrive with tensors: without the backend, their decoders must be set here
                from nvflare.client.decomposers import register_framework_decomposers

                register_framework_decomposers(self.job_exchange_format, self.job_exchange_format, self.logger)
                return
        elif self._refusal and event_type in (EventType.END_RUN, EventType.ABORT_TASK):
            return
        super().handle_event(event_type, fl_ctx)

    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        if task_name == AppConstants.TASK_TRAIN and not self._refusal:
            self._train_tasks += 1
            if self._max_rounds is not None and self._train_tasks > self._max_rounds:
                reason = (f"accepts at most {self._max_rounds} training rounds of this job; the server sent "
                          f"round {self._train_tasks}")
                self.log_warning(fl_ctx, f"this site refuses the round: {reason}")
                return self._refusal_answer(task_name, reason)
        if self._refusal:
            return self._refusal_answer(task_name, self._refusal)
        return super().execute(task_name, shareable, fl_ctx, abort_signal)

    # ------------------------------------------------------------------ the decision

    def _decide(self, fl_ctx: FLContext) -> str:
        try:
            reason, policy, declared = judge_job(fl_ctx, self.job, self.fedseg_version)
        except Exception as err:  # noqa: BLE001 - whatever breaks the decision refuses the job, never runs it
            self.log_error(fl_ctx, f"the job could not be judged: {type(err).__name__}: {err}")
            return f"cannot judge the job ({type(err).__name__})"
        limits = [n for n in (policy.max_rounds if policy is not None else None, declared) if n]
        self._max_rounds = min(limits) if limits else None  # never more training rounds than allowed or declared
        return reason

    @staticmethod
    def _refusal_answer(task_name: str, reason: str) -> Shareable:
        """The task's answer of a site that refuses the job: no weights, the rule it broke."""
        from nvflare.app_common.utils.fl_model_utils import FLModelUtils

        from fedseg.app.protocol import refusal_answer

        if task_name == AppConstants.TASK_SUBMIT_MODEL:  # cross-site evaluation asks for a model: none is given
            return make_reply(ReturnCode.EXECUTION_EXCEPTION)
        return FLModelUtils.to_shareable(refusal_answer(reason, evaluate=task_name != AppConstants.TASK_TRAIN))


def judge_job(fl_ctx: FLContext, document: dict[str, Any], fedseg_version: str) -> tuple[str, Any, int]:
    """Whether this site runs the job of ``document`` (a site document): ('' or the reasons, the
    policy, the rounds the job declares). The decision is appended to the site's audit log either way.

    The facts are read from what will run: the deployed client config, and the server config when
    the job deploys this site's app to the server too (as every fedseg job does: one app, ``@ALL``).
    """
    from fedseg.app.site_config import SiteConfigError, load_site_config
    from fedseg.app.site_policy import (
        JobFacts,
        PolicyError,
        append_audit,
        approved_fingerprints,
        decide,
        policy_of,
        read_client_config,
    )

    site = fl_ctx.get_identity_name()
    job_id = fl_ctx.get_job_id()
    meta = fl_ctx.get_prop(FLContextKey.JOB_META) or {}
    config_dir = Path(fl_ctx.get_engine().get_workspace().get_app_config_dir(job_id))
    try:
        client_config = read_client_config(config_dir / "config_fed_client.json")
    except PolicyError:
        client_config = {}
    server_config = None
    if _server_runs_this_app(meta, site) and (config_dir / "config_fed_server.json").is_file():
        try:
            server_config = read_client_config(config_dir / "config_fed_server.json")
        except PolicyError:
            server_config = None
    facts = JobFacts.from_job(document, client_config, server_config)
    try:
        config = load_site_config(site)
    except SiteConfigError:
        config = None  # the site's own code reports the missing configuration as this site's failure
    policy, decision = None, None
    try:
        policy = policy_of(config) if config is not None else None
        approved = approved_fingerprints(config.source) if config is not None and config.source else {}
        decision = decide(policy, facts, approved, job_version=fedseg_version, site_version=__version__)
    except PolicyError as err:  # a broken policy refuses everything; the file is named in the site's log only
        print(f"[fedseg] {site}: {err}")
    accepted = decision is not None and decision.accepted
    reason = "" if accepted else (decision.reason if decision is not None else "its study policy is unreadable")
    if config is not None and config.source is not None:
        append_audit(config.source, {
            "site": site, "job_id": job_id, "job": facts.name, "algorithm": facts.algorithm,
            "fingerprint": facts.fingerprint, "submitter": meta.get("submitter_name", ""),
            "decision": "accepted" if accepted else "refused", "reason": reason,
        })
    return reason, policy, facts.declared_rounds


def _server_runs_this_app(meta: dict[str, Any], site: str) -> bool:
    """Whether the job deploys the app this site got to the server too (then the server config in it
    is what the server runs): NVFlare's deploy map, app name -> targets (``@ALL``: the server and
    every site)."""
    for targets in (meta.get("deploy_map") or {}).values():
        if not isinstance(targets, list):
            continue
        names = {t for t in targets if isinstance(t, str)}
        for t in targets:
            if isinstance(t, dict):
                names.update(x for x in t.get("sites", []) if isinstance(x, str))
        if "@ALL" in names or site in names:
            return "@ALL" in names or "server" in names
    return False
