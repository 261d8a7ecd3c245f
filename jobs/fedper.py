"""FedPer: a shared encoder averaged on the server, a personal segmentation head kept at each site.

A FedAvg recipe over the shared keys only: the server model is ``SharedEncoder`` (no head),
each site keeps its head in a site-local store and sends only shared keys (``fedseg.app.fedper``),
and a site-side ``ExcludeVars`` output filter strips the personal keys again on every result a site
returns. The server's ``PayloadKeyAudit`` records the names of every payload it receives.
``personal_head`` is how much of the decoder stays at the site (``fedseg.config.HEAD_DEPTHS``: the
output layer, the last decoder level and the output layer, or the whole decoder);
``keep_norm_local`` keeps the normalization layers local too (FedBN). The job ends with each site
scoring its personal model (the final encoder with its own head) on its own validation cases.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedseg.config import DEFAULT_HEAD_DEPTH, HEAD_DEPTHS, setting
from fedseg.jobs.base import RESULT_TASKS, Algorithm, Job


@dataclass(frozen=True)
class FedPerOptions:
    personal_head: str = setting(DEFAULT_HEAD_DEPTH, "fedper/fedrep: the personal head: the output layer, the last decoder "
                                 "level and the output layer, or the whole decoder", choices=HEAD_DEPTHS)
    keep_norm_local: bool = setting(False, "fedper/fedrep: keep normalization layers local too (FedBN)")

    def __post_init__(self) -> None:
        if self.personal_head not in HEAD_DEPTHS:
            raise ValueError(f"unknown personal_head {self.personal_head!r}; known: {', '.join(HEAD_DEPTHS)}")


class FedPer(Algorithm):
    """Federated learning with personalization layers (Arivazhagan et al. 2019)."""

    name = "fedper"
    description = "each site keeps a personal head (the decoder by default), the encoder is averaged"
    options = FedPerOptions
    personal = True
    site_plugin = "fedseg.app.personalization:FedPerPlugin"
    #: smaller personal heads
    compare_variants = {"fedper-output": {"personal_head": "output"}, "fedper-last": {"personal_head": "last"}}
    # the server averages the encoder only: per-group full models make no sense here
    addons = frozenset({"privacy", "contribution", "wandb", "resume", "quantize"})

    def server_model(self, job: Job) -> dict[str, Any]:
        args = {**job.study.module_args(), "keep_norm_local": job.options.keep_norm_local,
                "personal_head": job.options.personal_head}
        return {"class_path": "fedseg.app.global_model.SharedEncoder", "args": args}

    def personal_keys(self, job: Job) -> list[str]:
        from fedseg.app.fedper import personal_keys
        from fedseg.lightning_modules.module import SegmentationModule

        module = SegmentationModule(**job.study.module_args())
        return personal_keys(module, job.options.keep_norm_local, job.options.personal_head)

    def finish(self, recipe: Any, job: Job) -> None:
        """The second line of defence for the head, and the audit that shows it held."""
        from nvflare.app_common.filters.exclude_vars import ExcludeVars

        from fedseg.app.payload_audit import PayloadKeyAudit

        # An explicit key list: a regex string would export a compiled re.Pattern. One registration
        # per task: NVFlare matches filters by exact task name ("*" matches nothing,
        # nvflare/apis/utils/task_utils.py) and keeps a task list as a set, which would make the
        # exported order vary. Results without weights (validate metrics) pass ExcludeVars unchanged.
        for task in RESULT_TASKS:
            recipe.add_client_output_filter(ExcludeVars(self.personal_keys(job)), tasks=[task])
            recipe.add_server_input_filter(PayloadKeyAudit(), tasks=[task])


ALGORITHM = FedPer
