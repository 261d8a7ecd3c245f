"""Server component: every metric a site streams (NVFlare client logger) as one JSON line.

NVFlare ships TensorBoard, MLflow and W&B receivers; this one needs none of those packages and
writes ``<run dir>/metrics/site_metrics.jsonl`` (site, key, value, step), which ``fedseg``
reads back into its results table and plots. Only scalars arrive here: the site script logs
nothing else.
"""

from __future__ import annotations

import json
import os
import time

from nvflare.apis.dxo import from_shareable
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.widgets.streaming import AnalyticsReceiver


class JsonlMetricsReceiver(AnalyticsReceiver):
    """Appends ``{"time", "site", "key", "value", "step"}`` per streamed scalar."""

    def __init__(self, results_dir: str = "metrics", file_name: str = "site_metrics.jsonl", events=None):
        super().__init__(events=events)
        self.results_dir = results_dir
        self.file_name = file_name
        self._path: str | None = None

    def initialize(self, fl_ctx: FLContext) -> None:
        run_dir = fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id())
        os.makedirs(os.path.join(run_dir, self.results_dir), exist_ok=True)
        self._path = os.path.join(run_dir, self.results_dir, self.file_name)

    def save(self, fl_ctx: FLContext, shareable: Shareable, record_origin: str) -> None:
        data = from_shareable(shareable).data or {}
        value = data.get("track_value")
        # The Lightning client logger sends all metrics of a step as one dict (an MLflow-style
        # METRICS record); other writers send one scalar under track_key.
        pairs = value.items() if isinstance(value, dict) else [(data.get("track_key"), value)]
        records = [
            {"time": time.time(), "site": record_origin, "key": key, "value": float(v), "step": data.get("global_step")}
            for key, v in pairs
            if isinstance(v, (int, float)) and not isinstance(v, bool)  # scalars only leave a site
        ]
        if records:
            with open(self._path, "a") as f:  # type: ignore[arg-type]
                f.writelines(json.dumps(r) + "\n" for r in records)

    def finalize(self, fl_ctx: FLContext) -> None:
        pass
