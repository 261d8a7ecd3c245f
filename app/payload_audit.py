"""Server-side audit: the parameter names of every payload the server receives from a site.

A server input filter that passes every result on unchanged and appends one JSON line per result
to ``<run dir>/metrics/payload_keys.jsonl``: the site, the task, the kind of data and the names
(never the values) of what arrived. It is how a FedPer run shows that no head key ever reached
the server.
"""

from __future__ import annotations

import json
import os
import time

from nvflare.apis.dxo import from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable


class PayloadKeyAudit(Filter):
    """Records ``{"site", "task", "kind", "keys"}`` for each incoming result."""

    def __init__(self, file_name: str = "payload_keys.jsonl") -> None:
        super().__init__()
        self.file_name = file_name

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        try:
            dxo = from_shareable(shareable)
            kind, keys = str(dxo.data_kind), sorted((dxo.data or {}).keys())
        except Exception:  # not a DXO (e.g. an error reply): nothing to audit
            kind, keys = "none", []
        run_dir = fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id())
        os.makedirs(os.path.join(run_dir, "metrics"), exist_ok=True)
        record = {
            "time": time.time(),
            "site": shareable.get_peer_prop(ReservedKey.IDENTITY_NAME, ""),
            "task": shareable.get_header(ReservedKey.TASK_NAME, ""),
            "kind": kind,
            "keys": keys,
        }
        with open(os.path.join(run_dir, "metrics", self.file_name), "a") as f:
            f.write(json.dumps(record) + "\n")
        return shareable
