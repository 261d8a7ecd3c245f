"""Task timing: a site's wait is short after a task and doubles while it only hears "try again"; the
in-process hand-off and the server's task monitor poll faster than NVFlare's fixed constants, which
still exist where fedseg sets them."""

from __future__ import annotations

import inspect
import json

import pytest
from nvflare.apis.impl.wf_comm_server import WFCommServer
from nvflare.apis.shareable import Shareable
from nvflare.app_common.executors.client_api import in_process_backend
from nvflare.private.defs import SpecialTaskName, TaskConstant

from fedseg import nvflare_internals
from fedseg.app.task_timing import FIRST_WAIT, AdaptiveTaskWait, QuickResultHandoff
from fedseg.jobs.base import export
from conftest import tiny_job


def test_a_site_comes_back_quickly_after_a_task_and_backs_off_while_it_waits():
    waits = AdaptiveTaskWait(longest_wait=2.0, first_wait=0.1)
    again = SpecialTaskName.TRY_AGAIN
    assert waits.wait_after("a", "train") == 0.1
    assert [waits.wait_after("a", again) for _ in range(7)] == [0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0]
    assert waits.wait_after("b", again) == 0.1  # each site has its own count
    assert waits.wait_after("a", "train") == 0.1  # a task resets it
    assert waits.wait_after("a", again) == 0.1
    assert waits.requests == {"a": [10, 8], "b": [1, 1]}  # requests, of which "try again"
    with pytest.raises(ValueError, match="first_wait <= longest_wait"):
        AdaptiveTaskWait(longest_wait=0.05, first_wait=0.1)


def test_the_wait_goes_into_every_reply_the_server_runner_gives():
    class Runner:  # NVFlare's ServerRunner.process_task_request contract: (name, id, data)
        def __init__(self):
            self.replies = [(SpecialTaskName.TRY_AGAIN, "", Shareable()), ("train", "t1", Shareable()),
                            (SpecialTaskName.END_RUN, "", None)]

        def process_task_request(self, client, fl_ctx):
            return self.replies.pop(0)

    class Client:
        name = "site-1"

    runner, waits = Runner(), AdaptiveTaskWait(longest_wait=1.0)
    nvflare_internals.wrap_task_requests(runner, waits.answer)
    _, _, first = runner.process_task_request(Client(), None)
    _, task_id, task = runner.process_task_request(Client(), None)
    assert first.get_header(TaskConstant.WAIT_TIME) == FIRST_WAIT
    assert task_id == "t1" and task.get_header(TaskConstant.WAIT_TIME) == FIRST_WAIT
    assert runner.process_task_request(Client(), None) == (SpecialTaskName.END_RUN, "", None)


def test_nvflare_still_has_the_constants_fedseg_shortens():
    # if one of these moves, the patch below would silently do nothing: fail here instead
    source = inspect.getsource(in_process_backend)
    assert "_RESULT_POLL_INTERVAL = 0.5" in source
    assert "result_check_interval=_RESULT_POLL_INTERVAL" in source  # the trainer's receive() poll
    assert "sleep_time = _RESULT_POLL_INTERVAL" in source  # the executor's wait for the result
    assert WFCommServer()._task_check_period == 0.2
    before = nvflare_internals.in_process_result_poll()
    try:
        QuickResultHandoff(poll=0.05)
        assert in_process_backend._RESULT_POLL_INTERVAL == 0.05
    finally:
        nvflare_internals.set_in_process_result_poll(before)


def test_every_exported_job_carries_the_task_timing(tmp_path):
    folder = export(tiny_job(name="timing"), tmp_path)
    server = json.loads((folder / "app" / "config" / "config_fed_server.json").read_text())
    client = json.loads((folder / "app" / "config" / "config_fed_client.json").read_text())
    task_wait = next(c for c in server["components"] if c["id"] == "fedseg_task_wait")
    assert task_wait["path"] == "fedseg.app.task_timing.AdaptiveTaskWait"
    assert task_wait["args"]["longest_wait"] == tiny_job().study.federation.poll_interval
    assert any(c["path"] == "fedseg.app.task_timing.QuickResultHandoff" for c in client["components"])
