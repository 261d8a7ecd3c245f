"""Issue 21, item 3 (server side): ``--wandb online`` without ``WANDB_API_KEY`` at the server is refused
by the job itself, not only by the command that submits it: the receiver raises NVFlare's fatal-error
event and the server aborts the run, instead of running on untracked with one log line."""

from __future__ import annotations

from pathlib import Path

import pytest
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext, FLContextManager
from nvflare.apis.workspace import Workspace
from nvflare.private.fed.server.run_manager import RunManager

from fedseg.app.wandb_receiver import FedsegWandBReceiver

NO_KEY = "W&B online mode needs WANDB_API_KEY in the server's environment"


class FatalErrors(FLComponent):
    """Records NVFlare's fatal-error events with their reason, as the server runner reads them
    (nvflare/private/fed/server/server_runner.py: it aborts the run on this event)."""

    def __init__(self) -> None:
        super().__init__()
        self.reasons: list[str] = []

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        if event_type == EventType.FATAL_SYSTEM_ERROR:
            self.reasons.append(fl_ctx.get_prop(FLContextKey.EVENT_DATA))


def start_run(receiver: FedsegWandBReceiver, tmp_path: Path) -> tuple[FatalErrors, RunManager]:
    """Fire START_RUN through NVFlare's own run manager, with the receiver and a recorder as handlers."""
    for folder in ("startup", "local"):
        (tmp_path / "workspace" / folder).mkdir(parents=True, exist_ok=True)
    fatal = FatalErrors()
    manager = RunManager("server", engine=None, job_id=None, workspace=Workspace(str(tmp_path / "workspace")),
                         components={}, handlers=[receiver, fatal])
    # the run manager is the engine that delivers events to its handlers (ServerEngine delegates to it)
    manager.fl_ctx_mgr = FLContextManager(engine=manager, identity_name="site-1", job_id="job-1",
                                          public_stickers={}, private_stickers={})
    manager.fire_event(EventType.START_RUN, manager.new_context())
    return fatal, manager


def test_online_without_a_key_stops_the_job_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    receiver = FedsegWandBReceiver(mode="online")
    fatal, _ = start_run(receiver, tmp_path)
    assert len(fatal.reasons) == 1 and NO_KEY in fatal.reasons[0]
    assert fatal.reasons[0].startswith("W&B tracking could not start, the job is stopped")
    assert not receiver.processes  # no W&B process was started


def test_offline_starts_and_does_not_stop_the_job(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    receiver = FedsegWandBReceiver(mode="offline", process_timeout=5.0)
    fatal, manager = start_run(receiver, tmp_path)
    try:
        assert fatal.reasons == []
        assert set(receiver.processes) == {"site-1"} and receiver.start_error is None
    finally:
        manager.fire_event(EventType.END_RUN, manager.new_context())  # stops the W&B process
    assert not any(p.is_alive() for p in receiver.processes.values())


@pytest.mark.e2e
@pytest.mark.slow
def test_the_simulated_job_is_aborted_at_the_server(tmp_path, monkeypatch):
    """The whole job in NVFlare's simulator, submitted past the CLI's own check: the server stops it
    at its start, and its log says why."""
    from conftest import tiny_job, tiny_synth
    from fedseg.jobs.addons import Addons
    from fedseg.run.simulate import simulate

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    synth = tiny_synth(tmp_path / "synth", sites=2, cases=2)
    job = tiny_job("fedavg", rounds=2, cross_site_eval=False, addons=Addons(wandb="online"))
    with pytest.raises(RuntimeError):
        simulate(job, synth.datalists, tmp_path / "run")
    server_log = (tmp_path / "run" / "nvflare" / job.name / "server" / "log.txt").read_text()
    assert NO_KEY in server_log
    assert "Aborting current RUN due to FATAL_SYSTEM_ERROR received: W&B tracking could not start" in server_log
    # the workflow sees the abort as it starts: no round is answered, so none ran untracked
    assert "Abort signal triggered. Finishing FedAvg." in server_log and "sites answered" not in server_log
    assert not list((tmp_path / "run").glob("wandb/*run-*"))
