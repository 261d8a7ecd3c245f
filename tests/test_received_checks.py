"""Issue 21, item 3 (site side): a model a site receives is checked against what the job expects, and
a refusal or a crash while sending the site's model for cross-site evaluation is a failed answer,
after which the site takes the next task. The models are built by hand as ``FLModel``s; no NVFlare
process is started."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

from fedseg.app.protocol import SITE_FAILURE_KEY, ReceivedModelError, check_received_params, failure_of
from fedseg.app.site_runner import SitePlugin, SiteRunner
from fedseg.lightning_modules.module import SegmentationModule

TINY = dict(network="unet", in_channels=4, features=4, roi_size=(16, 16, 16), hd95=False)


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return SegmentationModule(**TINY).state_dict()


def with_(state: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """``state`` with the first key's value replaced by each change (``value=...``), or a key dropped
    (``drop=True``) or added (``extra=tensor``)."""
    params = dict(state)
    first = next(iter(params))
    if changes.get("drop"):
        del params[first]
    if "value" in changes:
        params[first] = changes["value"]
    if "extra" in changes:
        params["network.extra.weight"] = changes["extra"]
    return params


@pytest.mark.parametrize("params, message", [
    (None, "holds no parameters"),
    ({}, "holds no parameters"),
    ([1.0, 2.0], "is a list, not a mapping"),
    ("drop", r"missing \[network\.[^]]+\], unexpected none"),
    ("extra", r"missing none, unexpected \[network\.extra\.weight\]"),
    ("int", "has dtype torch.int64; this parameter is floating point"),
    ("bool", "has dtype torch.bool; this parameter is floating point"),
    ("complex", "has dtype torch.complex64, not a real number type"),
    ("object", "has dtype object, not a real number type"),
    ("list", "is a list, not a tensor"),
    ("size", "values, not"),
])
def test_each_refusal_names_what_differs(state, params, message):
    first = next(iter(state))
    shape = state[first].shape
    params = {
        "drop": lambda: with_(state, drop=True),
        "extra": lambda: with_(state, extra=torch.zeros(3)),
        "int": lambda: with_(state, value=torch.zeros(shape, dtype=torch.int64)),
        "bool": lambda: with_(state, value=torch.zeros(shape, dtype=torch.bool)),
        "complex": lambda: with_(state, value=torch.zeros(shape, dtype=torch.complex64)),
        "object": lambda: with_(state, value=np.empty(shape, dtype=object)),
        "list": lambda: with_(state, value=state[first].tolist()),
        "size": lambda: with_(state, value=torch.zeros(state[first].numel() + 1)),
    }[params]() if isinstance(params, str) else params
    with pytest.raises(ReceivedModelError, match=message):
        check_received_params(params, state, what="the model of the train task")


def test_what_a_job_may_legitimately_send_is_accepted(state):
    check_received_params({k: v.clone() for k, v in state.items()}, state)
    # numpy on the wire (HE jobs, server_expected_format NUMPY) and another float width (fp16 exchange)
    check_received_params({k: v.numpy().astype(np.float64) for k, v in state.items()}, state)
    check_received_params({k: v.half() for k, v in state.items()}, state)
    counter = {"count": torch.tensor(3, dtype=torch.int64)}  # an integer buffer (BatchNorm's counter)
    check_received_params({"count": torch.tensor(3.0)}, counter)  # averaged by the server: still a count


class SubmitCrashOnce(SitePlugin):
    """The first ``submit_model`` crashes (say, out of memory while copying the model)."""

    def __init__(self) -> None:
        self.crashed = False
        self.sending = False

    def shareable(self, state: dict[str, Any]) -> dict[str, Any]:
        if self.sending and not self.crashed:
            self.crashed = True
            raise MemoryError("out of memory while copying the model")
        return state


def runner_with(plugins: list[SitePlugin], tmp_path: Path) -> SiteRunner:
    """A ``SiteRunner`` past ``setup``: a real model and Trainer; no data (the tasks below need none)."""
    from fedseg.lightning_modules.training import make_trainer

    runner = SiteRunner(job=None, site="site-1")  # type: ignore[arg-type] - the job is only read in setup
    runner.model = SegmentationModule(**TINY)
    runner.plugins = plugins
    runner.trainer = make_trainer(tmp_path, 1, progress=False, enable_checkpointing=False)
    return runner


def test_a_personalized_site_expects_exactly_its_shared_keys(state, tmp_path):
    """FedPer's plug-in shares the encoder only: what the site expects is that part, whatever the server sends."""
    from fedseg.app.global_model import personal_keys
    from fedseg.app.personalization import FedPerPlugin
    from fedseg.jobs.fedper import FedPerOptions

    plugin = FedPerPlugin(FedPerOptions())
    runner = runner_with([plugin], tmp_path)
    plugin.personal = personal_keys(runner.model)  # what FedPerPlugin.setup finds, without a site config
    shared = {k: v for k, v in state.items() if k not in set(plugin.personal)}
    assert plugin.personal and shared
    runner.check_received(FLModel(params=shared), "train")
    with pytest.raises(ReceivedModelError, match=rf"the model of the validate task has {len(state)} parameters, "
                                                 rf"not the {len(shared)} this job expects"):
        runner.check_received(FLModel(params=dict(state)), "validate")


class ScriptedServer:
    """The tasks a site receives, in order, and the answers it sends: NVFlare's client API functions
    the runner's loop calls (``nvflare.client`` / ``nvflare.client.lightning``), served from a list."""

    def __init__(self, tasks: list[tuple[str, FLModel]]) -> None:
        self.tasks = list(tasks)
        self.current: str | None = None
        self.sent: list[tuple[str, FLModel]] = []

    def install(self, monkeypatch: pytest.MonkeyPatch, runner: SiteRunner, crash: SubmitCrashOnce) -> None:
        import nvflare.client as flapi
        import nvflare.client.lightning as flare

        def receive():
            self.current, model = self.tasks.pop(0)
            crash.sending = self.current == "submit_model"
            return model

        monkeypatch.setattr(flare, "is_running", lambda: bool(self.tasks))
        monkeypatch.setattr(flare, "receive", receive)
        monkeypatch.setattr(flapi, "get_task_name", lambda: self.current)
        monkeypatch.setattr(flapi, "is_submit_model", lambda: self.current == "submit_model")
        monkeypatch.setattr(flapi, "is_train", lambda: self.current == "train")
        monkeypatch.setattr(flapi, "is_evaluate", lambda: self.current == "validate")
        monkeypatch.setattr(flapi, "send", lambda model, *a, **k: self.sent.append((self.current, model)))


def test_refusals_and_a_crashed_submit_model_are_failed_answers_and_the_site_goes_on(state, tmp_path, monkeypatch,
                                                                                     capsys):
    crash = SubmitCrashOnce()
    runner = runner_with([crash], tmp_path)
    round_1 = dict(current_round=0, total_rounds=2)
    ints = {k: torch.zeros(v.shape, dtype=torch.int32) for k, v in state.items()}
    server = ScriptedServer([
        ("submit_model", FLModel(params={})),                      # crashes while sending
        ("train", FLModel(params={}, **round_1)),                   # an empty payload
        ("train", FLModel(params=ints, **round_1)),                 # integer weights
        ("validate", FLModel(params=with_(state, drop=True))),      # a key missing
        ("submit_model", FLModel(params={})),                      # the site is still there: it answers
    ])
    server.install(monkeypatch, runner, crash)
    runner.run()

    assert [task for task, _ in server.sent] == ["submit_model", "train", "train", "validate", "submit_model"]
    failures = [failure_of(model.meta) for _, model in server.sent]
    assert failures == ["MemoryError", "ReceivedModelError", "ReceivedModelError", "ReceivedModelError", None]
    assert server.sent[0][1].params == {} and server.sent[0][1].params_type == ParamsType.DIFF  # no weights
    assert server.sent[3][1].metrics == {} and SITE_FAILURE_KEY in server.sent[3][1].meta
    last = server.sent[-1][1]
    assert set(last.params) == set(state) and all(v.dtype == torch.float32 for v in last.params.values())
    log = capsys.readouterr().out
    assert "cross-site evaluation site-1: sending this site's model FAILED (MemoryError" in log
    assert "the model of the train task holds no parameters (an empty payload)" in log
    assert "the model of the train task: network." in log and "has dtype torch.int32" in log
    assert "the model of the validate task has" in log
