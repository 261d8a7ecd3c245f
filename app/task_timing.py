"""How fast a round's task reaches the sites, and what waiting sites cost the server.

NVFlare 2.9 sites pull their tasks: after every reply, a task or "try again", a site sleeps the
one ``task_request_interval`` the server writes into it (2 s by default) before it asks again.
That sleep is the largest fixed cost of a round: the site that finishes a round last sleeps it
before it picks up the next one, and a short interval makes every idle site poll the server more
often. ``AdaptiveTaskWait`` (server) gives both: after a task a site comes back after
``first_wait``; each "try again" doubles its wait, up to ``longest_wait``.

Why the round stays short: a site that waited long for slower sites picks up the next task at
most about as late as it waited, and it finished its own work that much earlier, so the slowest
site (the round's critical path) is always a site that asks again after ``first_wait``. Why the
server's load does not grow: a site idle for longer than a few seconds polls every
``longest_wait``, as with NVFlare's fixed interval.

``QuickResultHandoff`` (sites) removes the other fixed cost, the in-process Client API's 0.5 s
hand-off polls between the site's trainer and NVFlare (``fedseg.nvflare_internals``).
"""

from __future__ import annotations

import threading

from nvflare.apis.event_type import EventType
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.private.defs import SpecialTaskName, TaskConstant

from fedseg import nvflare_internals

#: a site's first wait after a task (s); also the poll of a site that has just started to wait
FIRST_WAIT = 0.1
#: how often the in-process Client API checks for its trainer's result and next task (s)
HANDOFF_POLL = 0.05

class AdaptiveTaskWait(FLComponent):
    """Server component: each site's wait before its next task request, short after a task and
    doubling while it only hears "try again", up to ``longest_wait``.

    Args:
        longest_wait: the wait of a site that has been idle for a while (s); it sets the server's
            load from idle sites, as NVFlare's ``task_request_interval`` does.
        first_wait: the wait after a task and before the first "try again" (s).
    """

    def __init__(self, longest_wait: float, first_wait: float = FIRST_WAIT) -> None:
        super().__init__()
        if not 0 < float(first_wait) <= float(longest_wait):
            raise ValueError(f"need 0 < first_wait <= longest_wait, got {first_wait} and {longest_wait}")
        self.first_wait = float(first_wait)
        self.longest_wait = float(longest_wait)
        self._tries: dict[str, int] = {}
        #: every site's task requests and how many of them heard "try again" (logged at the end)
        self.requests: dict[str, list[int]] = {}
        self._lock = threading.Lock()

    def wait_after(self, site: str, task_name: str) -> float:
        """The wait to send ``site`` with a reply naming ``task_name``."""
        with self._lock:
            counts = self.requests.setdefault(site, [0, 0])
            counts[0] += 1
            if task_name != SpecialTaskName.TRY_AGAIN:
                self._tries[site] = 0
                return self.first_wait
            counts[1] += 1
            tries = self._tries.get(site, 0)
            self._tries[site] = tries + 1
        return min(self.longest_wait, self.first_wait * 2 ** min(tries, 32))

    def answer(self, site: str, task_name: str, data: Shareable | None) -> None:
        if isinstance(data, Shareable):  # END_RUN carries no data
            data.set_header(TaskConstant.WAIT_TIME, self.wait_after(site, task_name))

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        if event_type == EventType.START_RUN:
            runner = fl_ctx.get_prop(FLContextKey.RUNNER)
            if runner is None:
                self.log_warning(fl_ctx, "no server runner in the context: sites keep NVFlare's fixed task wait")
                return
            nvflare_internals.wrap_task_requests(runner, self.answer)
            self.log_info(fl_ctx, f"task waits: {self.first_wait} s after a task, doubling up to {self.longest_wait} s")
        elif event_type == EventType.END_RUN:
            with self._lock:
                counts = ", ".join(f"{site} {n} ({again} try again)" for site, (n, again) in sorted(self.requests.items()))
            self.log_info(fl_ctx, f"task requests: {counts}")


class QuickResultHandoff(FLComponent):
    """Site component: the in-process hand-offs between the trainer and NVFlare poll every
    ``poll`` seconds instead of 0.5 s (set when the site's app is built, before its executor
    starts the trainer)."""

    def __init__(self, poll: float = HANDOFF_POLL) -> None:
        super().__init__()
        if float(poll) <= 0:
            raise ValueError(f"poll must be > 0 seconds, got {poll}")
        self.poll = float(poll)
        nvflare_internals.set_in_process_result_poll(self.poll)
