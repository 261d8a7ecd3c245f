"""What a kit lets a job do: no custom code for anyone, and only listed classes.

NVFlare 2.9 treats a job with an ``app/custom`` folder as one that brings its own code (BYOC) and
lets any ``lead`` submit one by default (``authorization.json.default``); such a job skips the
site's class allow list (nvflare/app_common/widgets/component_path_authorizer.py). fedseg's jobs
carry no code (``fedseg.app.site_executor``), so every kit fedseg makes (``fedseg provision``,
``fedseg poc``) is locked down:

- ``local/authorization.json``: NVFlare's default permissions with ``byoc`` "none" for every
  role, so a job with custom code is refused at submission (the server) and at deployment (each
  site);
- ``local/resources.json``: ``class_list_enforcement_mode`` "enforce" and a ``class_allow_list``:
  on the server NVFlare's default list plus exactly the classes fedseg's jobs name
  (``FEDSEG_JOB_CLASSES`` and the few NVFlare and torch classes beyond the default list,
  ``EXTRA_JOB_CLASSES``); at a hospital exactly the classes fedseg's site configs name
  (``SITE_JOB_CLASSES``) and the kit's own components, so that every job a hospital runs is judged
  by its policy (``fedseg.app.site_executor``). A job that names any other class fails to start
  where that class would be built.

A site's admin may edit both files; ``fedseg provision site-config`` writes the site's own study
policy (``fedseg.app.site_policy``) into ``local/fedseg_site.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: every fedseg class a fedseg job names (a test exports every algorithm and add-on and compares)
FEDSEG_JOB_CLASSES: tuple[str, ...] = (
    "fedseg.app.contribution.ContributionWeightedAggregator",
    "fedseg.app.global_model.GlobalModel",
    "fedseg.app.global_model.SharedEncoder",
    "fedseg.app.grouped_fedavg.GroupedFedAvg",
    "fedseg.app.he.HECrossSiteEval",
    "fedseg.app.metrics_receiver.JsonlMetricsReceiver",
    "fedseg.app.payload_audit.PayloadKeyAudit",
    "fedseg.app.privacy_filters.TorchPercentilePrivacy",
    "fedseg.app.privacy_filters.TorchSVTPrivacy",
    "fedseg.app.privacy_filters.UpdateStatsRecorder",
    "fedseg.app.quantization.DequantizeWeights",
    "fedseg.app.quantization.ExchangeBytesRecorder",
    "fedseg.app.quantization.QuantizeWeights",
    "fedseg.app.resilient_fedavg.ResilientFedAvg",
    "fedseg.app.resilient_fedopt.ResilientFedOpt",
    "fedseg.app.site_executor.SiteExecutor",
    "fedseg.app.site_statistics.SiteImageStatistics",
    "fedseg.app.task_timing.AdaptiveTaskWait",
    "fedseg.app.task_timing.QuickResultHandoff",
    "fedseg.app.wandb_receiver.FedsegWandBReceiver",
)
#: classes of NVFlare and torch that fedseg's jobs name beyond NVFlare's default allow list: the
#: PyTorch persistor of every recipe, and FedOpt's server optimizers and schedule
EXTRA_JOB_CLASSES: tuple[str, ...] = (
    "nvflare.app_opt.pt.file_model_persistor.PTFileModelPersistor",
    "torch.optim.SGD",
    "torch.optim.Adam",
    "torch.optim.lr_scheduler.ConstantLR",
)
#: every class a fedseg job names in its site (client) config: a hospital's kit allows exactly these
#: (and the components of its own local/resources.json); NVFlare's default list is the server's.
#: A narrower list than NVFlare's default: its other executors (PSI, XGBoost, the swarm and cyclic
#: controllers, ...) would run at the site without the site's policy ever judging the job.
SITE_JOB_CLASSES: tuple[str, ...] = (
    "fedseg.app.privacy_filters.TorchPercentilePrivacy",
    "fedseg.app.privacy_filters.TorchSVTPrivacy",
    "fedseg.app.quantization.DequantizeWeights",
    "fedseg.app.quantization.QuantizeWeights",
    "fedseg.app.site_executor.SiteExecutor",
    "fedseg.app.site_statistics.SiteImageStatistics",
    "fedseg.app.task_timing.QuickResultHandoff",
    "nvflare.app_common.executors.statistics.statistics_executor.StatisticsExecutor",
    "nvflare.app_common.filters.exclude_vars.ExcludeVars",
    "nvflare.app_common.filters.statistics_privacy_filter.StatisticsPrivacyFilter",
    "nvflare.app_common.statistics.histogram_bins_cleanser.HistogramBinsCleanser",
    "nvflare.app_common.statistics.min_count_cleanser.MinCountCleanser",
    "nvflare.app_common.statistics.min_max_cleanser.AddNoiseToMinMax",
    "nvflare.app_common.widgets.convert_to_fed_event.ConvertToFedEvent",
    "nvflare.app_opt.he.model_decryptor.HEModelDecryptor",
    "nvflare.app_opt.he.model_encryptor.HEModelEncryptor",
)
AUTHORIZATION = "authorization.json"
RESOURCES = "resources.json"


class KitControlError(RuntimeError):
    """A kit that is not laid out as NVFlare 2.9 writes it (the message names the file)."""


def class_allow_list() -> list[str]:
    """The server's (and the simulator's): NVFlare's default class allow list plus the classes
    fedseg's jobs name."""
    from nvflare.app_common.default_component_policy import DEFAULT_CLASS_ALLOW_LIST

    return sorted({*DEFAULT_CLASS_ALLOW_LIST, *FEDSEG_JOB_CLASSES, *EXTRA_JOB_CLASSES})


def site_class_allow_list(resources: dict[str, Any]) -> list[str]:
    """A hospital's: the classes fedseg's site configs name, and the site's own components."""
    own = {c.get("path") for c in resources.get("components", []) if isinstance(c, dict) and c.get("path")}
    return sorted({*SITE_JOB_CLASSES, *own})


def _is_site_kit(kit: Path) -> bool:
    return (Path(kit) / "startup" / "fed_client.json").is_file()


def refuse_custom_code(authorization: dict[str, Any]) -> dict[str, Any]:
    """``authorization`` with the ``byoc`` right "none" for every role (``project_admin`` included)."""
    permissions = authorization.setdefault("permissions", {})
    for role, rights in list(permissions.items()):
        if rights == "any":  # NVFlare's shorthand for every right: spelled out, then byoc taken away
            rights = {right: "any" for right in _every_right()}
        if isinstance(rights, dict):
            permissions[role] = {**rights, "byoc": "none"}
    return authorization


def _every_right() -> list[str]:
    """Every right NVFlare 2.9 checks: the command categories and every command outside them
    (nvflare/security/security.py); "any" in a policy means all of these."""
    from nvflare.security import security

    commands = {v for k, v in vars(security.AC).items() if not k.startswith("_") and isinstance(v, str)}
    return sorted({*security.COMMAND_CATEGORIES.values(), *(commands - set(security.COMMAND_CATEGORIES))})


def default_site_policy() -> Any:
    """The policy ``fedseg provision site-config`` writes: every fedseg algorithm (and the statistics
    job) and network, every modality, at most 200 rounds of at most 10 local epochs, no W&B, no
    approval needed; the site's admin tightens it in ``local/fedseg_site.json``."""
    from fedseg.app.site_policy import SitePolicy
    from fedseg.config import MODALITIES, NETWORK_NAMES
    from fedseg.jobs.base import algorithms
    from fedseg.jobs.stats import NAME as STATISTICS_JOB

    return SitePolicy(algorithms=(*algorithms(), STATISTICS_JOB), networks=NETWORK_NAMES, max_rounds=200, max_local_epochs=10,
                      modalities=MODALITIES, require_privacy_filter=False, allow_wandb=False, require_approval=False)


def lock_down_kit(kit: Path) -> None:
    """Refuse custom code and enforce the class allow list in ``kit`` (a server or site kit).

    Writes ``local/authorization.json`` and ``local/resources.json`` (which NVFlare reads instead
    of their ``.default``), keeping whatever else is in them (a server's storage, say).
    """
    local = Path(kit) / "local"
    auth = _read(local, AUTHORIZATION)
    _write(local / AUTHORIZATION, refuse_custom_code(auth))
    resources = _read(local, RESOURCES)
    resources["class_list_enforcement_mode"] = "enforce"
    resources["class_allow_list"] = site_class_allow_list(resources) if _is_site_kit(kit) else class_allow_list()
    _write(local / RESOURCES, resources)


def allow_fedseg_classes_in_simulator(workspace: Path) -> Path:
    """Let NVFlare's simulator build fedseg's classes: a job without custom code must pass the class
    allow list there too, and the simulator reads ``<workspace>/local/resources.json`` (it keeps that
    folder and copies it to every simulated site, nvflare/private/fed/app/simulator/simulator_runner.py)."""
    local = Path(workspace) / "local"
    local.mkdir(parents=True, exist_ok=True)
    path = local / RESOURCES
    doc = json.loads(path.read_text()) if path.is_file() else {"format_version": 2}
    doc.update(class_list_enforcement_mode="enforce", class_allow_list=class_allow_list())
    _write(path, doc)
    return path


def is_locked_down(kit: Path) -> bool:
    """Whether ``kit`` refuses custom code to every role and enforces fedseg's class allow list."""
    local = Path(kit) / "local"
    try:
        auth = json.loads((local / AUTHORIZATION).read_text())
        resources = json.loads((local / RESOURCES).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    rights = auth.get("permissions", {}).values()
    expected = site_class_allow_list(resources) if _is_site_kit(kit) else class_allow_list()
    return (all(isinstance(r, dict) and r.get("byoc") == "none" for r in rights)
            and resources.get("class_list_enforcement_mode") == "enforce"
            and sorted(resources.get("class_allow_list", [])) == expected)


GPU_RESOURCE_MANAGER = "nvflare.app_common.resource_managers.gpu_resource_manager.GPUResourceManager"


def set_site_gpus(kit: Path, gpus: int, mem_per_gpu_in_GiB: float = 0) -> Path:
    """Write the site's GPUs into ``kit``'s ``local/resources.json``: the ``num_of_gpus`` and
    ``mem_per_gpu_in_GiB`` of its ``resource_manager`` (NVFlare's ``GPUResourceManager``), keeping
    everything else in the file (the class allow list, a site's own edits). 0 GPUs: a CPU-only site.

    NVFlare's server asks this manager for the GPUs a job's ``meta.json`` ``resource_spec`` names
    (``fedseg.jobs.base.resource_spec``) and holds the job until the site has them; the manager checks
    at the site's start that the machine has that many GPUs and refuses to start otherwise.
    """
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 0:
        raise KitControlError(f"the number of GPUs must be an integer >= 0, got {gpus!r}")
    if mem_per_gpu_in_GiB < 0:
        raise KitControlError(f"GPU memory must be >= 0 GiB, got {mem_per_gpu_in_GiB!r}")
    local = Path(kit) / "local"
    resources = _read(local, RESOURCES)
    components = resources.setdefault("components", [])
    manager = next((c for c in components if isinstance(c, dict) and c.get("id") == "resource_manager"), None)
    if manager is None:
        manager = {"id": "resource_manager", "path": GPU_RESOURCE_MANAGER, "args": {"expiration_period": 300}}
        components.insert(0, manager)
    if manager.get("path") != GPU_RESOURCE_MANAGER:
        raise KitControlError(f"{local / RESOURCES}: its resource_manager is {manager.get('path')}, not NVFlare's "
                              "GPUResourceManager; set its GPUs by hand")
    manager.setdefault("args", {}).update(num_of_gpus=gpus, mem_per_gpu_in_GiB=mem_per_gpu_in_GiB)
    path = local / RESOURCES
    _write(path, resources)
    return path


def _read(local: Path, name: str) -> dict[str, Any]:
    """``local/<name>``, or its ``.default`` as NVFlare provisioned it."""
    for path in (local / name, local / f"{name}.default"):
        if path.is_file():
            try:
                return json.loads(path.read_text())
            except json.JSONDecodeError as err:
                raise KitControlError(f"{path}: not valid JSON ({err})") from None
    raise KitControlError(f"{local}: no {name} or {name}.default: not an NVFlare 2.9 startup kit")


def _write(path: Path, doc: dict[str, Any]) -> None:
    path.write_text(json.dumps(doc, indent=2) + "\n")
    path.chmod(0o600)
