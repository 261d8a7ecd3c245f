"""Every private NVFlare name fedseg uses, behind a named function, for NVFlare 2.9.0 only.

NVFlare's recipes and controllers keep some of what fedseg needs in private attributes and
helpers (the recipe's ``FedJob``, the server app's component table, the executor's transfer type,
FedAvg's per-round aggregation state, ...). Reaching them from one module means that an NVFlare
upgrade breaks here, loudly, and nowhere else: importing this module on another NVFlare version
raises ``UnsupportedNVFlareVersion``. ``tests/test_nvflare_internals.py`` scans every other module
for any private NVFlare name (any underscore name in NVFlare's sources, listed here or not) and
fails on each one, except: the hooks fedseg overrides (``OVERRIDDEN_HOOKS``, whose signatures it
pins) and the export conventions fedseg follows (``EXPORT_CONVENTIONS``,
``PRIVATE_ARGUMENT_ATTRIBUTES``, which it shows NVFlare's job export still reads). ``PRIVATE_NAMES``
is exactly what this module reaches.

Nothing here changes NVFlare's behaviour except ``patch_job_export`` and the task-timing functions
(``wrap_task_requests``, ``set_in_process_result_poll``, ``set_task_monitor_period``; see their
docstrings and ``fedseg.app.task_timing``).
"""

from __future__ import annotations

import inspect
from typing import Any

import nvflare

#: the NVFlare version whose private names this module was written against
SUPPORTED_VERSION = "2.9.0"


class UnsupportedNVFlareVersion(RuntimeError):
    """fedseg reaches into NVFlare internals that are checked for one version only."""


def require_supported_version(version: str | None = None) -> None:
    """``UnsupportedNVFlareVersion`` unless NVFlare is ``SUPPORTED_VERSION``."""
    version = version or nvflare.__version__
    if version != SUPPORTED_VERSION:
        raise UnsupportedNVFlareVersion(
            f"fedseg {_fedseg_version()} works with NVFlare {SUPPORTED_VERSION}, but NVFlare {version} is installed: "
            f"pip install 'nvflare=={SUPPORTED_VERSION}' (fedseg.nvflare_internals lists what would need re-checking)"
        )


def _fedseg_version() -> str:
    from fedseg import __version__

    return __version__


require_supported_version()

# Imports of NVFlare modules come after the version check, so another version fails with the message above.
from nvflare.app_common.abstract.fl_model import FLModel  # noqa: E402
from nvflare.app_common.aggregators.weighted_aggregation_helper import WeightedAggregationHelper  # noqa: E402
from nvflare.app_common.workflows import base_fedavg  # noqa: E402
from nvflare.app_common.workflows.fedavg import FedAvg  # noqa: E402

#: private NVFlare attributes and functions read, written or called here; no other module may name them
PRIVATE_NAMES: tuple[str, ...] = (
    "_job", "_deploy_map", "_params_transfer_type", "_cse_added", "_get_client_name", "_get_num_steps_weight",
    "_get_job_id_tag", "_persistor_id", "_aggr_helper", "_aggr_metrics_helper", "_all_metrics", "_received_count",
    "_expected_count", "_params_type", "_site_metric_weights", "_maybe_cleanup_memory", "_get_aggregated_result",
    "_get_custom_file", "_aggregate_one_result", "_RESULT_POLL_INTERVAL", "_task_check_period", "_get_args",
    "_ensure_client_apps_prepared", "_process_queue_tasks", "_params_exchange_format", "_server_expected_format",
)  # fmt: skip

#: NVFlare's extension hooks fedseg overrides in subclasses (``class -> hook -> its parameters``);
#: an override may name only its own hook, and the test pins these signatures
OVERRIDDEN_HOOKS: dict[str, dict[str, tuple[str, ...]]] = {
    "nvflare.recipe.fedavg.FedAvgRecipe": {"_create_controller": ("self", "persistor_id", "model_params", "model_aggregator")},
    "nvflare.app_common.workflows.base_model_controller.BaseModelController": {
        "_accept_train_result": ("self", "client_name", "result", "fl_ctx", "is_unknown_task"),
    },
    "nvflare.app_opt.lightning.api.FLCallback": {"_send_model": ("self", "output_model")},
    "nvflare.app_common.workflows.cross_site_model_eval.CrossSiteModelEval": {
        "_load_validation_content": ("self", "name", "load_dir", "fl_ctx"),
    },
}


#: names fedseg defines for NVFlare to read by name (``name -> where NVFlare reads it``): a fedseg
#: class may define them; the test shows that NVFlare's job export still reads them
EXPORT_CONVENTIONS: dict[str, str] = {
    "_always_serialize_args": "nvflare.job_config.fed_job_config.FedJobConfig._get_args",
}

#: components that keep a constructor argument ``<name>`` in the attribute ``_<name>``, because
#: ``<name>`` is taken (NVFlare's job export reads an argument back from ``<name>`` or ``_<name>``,
#: ``FedJobConfig._get_args``): ``class path -> argument names``
PRIVATE_ARGUMENT_ATTRIBUTES: dict[str, tuple[str, ...]] = {"fedseg.app.global_model.GlobalModel": ("network",)}


def exported_arguments(component: Any) -> dict[str, Any]:
    """The constructor arguments NVFlare's job export writes for ``component`` (``FedJobConfig._get_args``)."""
    import tempfile

    from nvflare.job_config.fed_job_config import FedJobConfig

    with tempfile.TemporaryDirectory() as custom_dir:
        return FedJobConfig(job_name="fedseg", min_clients=1)._get_args(component, custom_dir)


def hook_signature(class_path: str, hook: str) -> tuple[str, ...]:
    """The parameter names of ``class_path.hook`` in the installed NVFlare (for the pinning test)."""
    import importlib

    module, _, name = class_path.rpartition(".")
    return tuple(inspect.signature(getattr(getattr(importlib.import_module(module), name), hook)).parameters)


# ------------------------------------------------------------------------------ recipes and jobs


def fed_job(recipe: Any) -> Any:
    """The ``FedJob`` a recipe assembles (``recipe._job``, nvflare/recipe/spec.py); server components
    and app packages can only be added through it, as NVFlare's own recipe utilities do."""
    return recipe._job


def server_components(recipe: Any, comp_id: str) -> dict[str, Any]:
    """The server app's component table that holds ``comp_id`` (recipes expose no setter for the
    components BaseFedJob adds; the app config keeps them by id)."""
    for app in fed_job(recipe)._deploy_map.values():
        config = getattr(app, "app_config", None)
        if config is not None and hasattr(config, "workflows") and comp_id in getattr(config, "components", {}):
            return config.components
    raise RuntimeError(f"server component {comp_id!r} not found in the recipe")


def replace_server_component(recipe: Any, comp_id: str, component: Any) -> None:
    server_components(recipe, comp_id)[comp_id] = component


def remove_server_component(recipe: Any, comp_id: str) -> None:
    del server_components(recipe, comp_id)[comp_id]


def client_api_executors(recipe: Any) -> list[Any]:
    """Every ``ClientAPIExecutor`` of the recipe's client apps (built at the first client filter)."""
    from nvflare.app_common.executors.client_api_executor import ClientAPIExecutor

    return [
        item.executor
        for app in fed_job(recipe)._deploy_map.values()
        for item in getattr(getattr(app, "app_config", None), "executors", [])
        if isinstance(item.executor, ClientAPIExecutor)
    ]


def send_weight_diffs(recipe: Any) -> None:
    """Make every site send ``params_transfer_type=DIFF``: the executor keeps it in
    ``_params_transfer_type`` (nvflare/app_common/executors/client_api_executor.py), which the job
    export writes; the recipe's own attribute is set too, for anything it builds later."""
    from nvflare.client.config import TransferType

    executors = client_api_executors(recipe)
    if not executors:
        raise RuntimeError("no client API executor found in the recipe: cannot make the sites send weight diffs")
    for executor in executors:
        executor._params_transfer_type = TransferType.DIFF
    if hasattr(recipe, "params_transfer_type"):
        recipe.params_transfer_type = TransferType.DIFF


def cross_site_evaluation_added(recipe: Any) -> bool:
    """Whether cross-site evaluation was added (the flag NVFlare's ``add_cross_site_evaluation`` sets)."""
    return bool(getattr(recipe, "_cse_added", False))


def mark_cross_site_evaluation_added(recipe: Any) -> None:
    recipe._cse_added = True


def persistor_id(controller: Any) -> str:
    """The persistor component id of a recipe-built ``FedAvg`` controller."""
    return controller._persistor_id


def patch_job_export() -> None:
    """NVFlare 2.9's job export refuses fedseg's package map; move its check behind its own skip.

    fedseg maps its repository folders into one import namespace (``lightning_modules/`` is
    ``fedseg.lightning_modules``, pyproject.toml). ``FedJobConfig._get_custom_file`` first checks
    that a component's source file path ends with its module path and raises "Source path ... does
    not match module", and only afterwards skips packages listed in ``app_packages``, which are
    never copied into the job anyway (nvflare/job_config/fed_job_config.py). For app packages and
    NVFlare's own, nothing is checked or copied, as the library does after its check. Idempotent;
    ``tests/test_jobs.py`` pins the library behaviour and this fix.
    """
    from nvflare.job_config.fed_job_config import FL_PACKAGES, FedJobConfig

    if getattr(FedJobConfig._get_custom_file, "__fedseg__", False):
        return
    original = FedJobConfig._get_custom_file

    def _get_custom_file(self: FedJobConfig, custom_dir: str, module: str, source_file: str, *args: Any, **kwargs: Any):
        if module.split(".")[0] in FL_PACKAGES or module.split(".")[0] in self.app_packages:
            return None
        return original(self, custom_dir, module, source_file, *args, **kwargs)

    _get_custom_file.__fedseg__ = True  # type: ignore[attr-defined]
    _get_custom_file.original = original  # type: ignore[attr-defined]
    FedJobConfig._get_custom_file = _get_custom_file


def unpatched_get_custom_file() -> Any:
    """NVFlare's own ``FedJobConfig._get_custom_file`` (the test shows it still needs the patch)."""
    from nvflare.job_config.fed_job_config import FedJobConfig

    return getattr(FedJobConfig._get_custom_file, "original", FedJobConfig._get_custom_file)


# ------------------------------------------------------------------------------ FedAvg's round state


def client_name(result: FLModel) -> str:
    """The site that sent ``result`` (FedAvg reads it from the result's meta)."""
    return base_fedavg._get_client_name(result)


def num_steps_weight(result: FLModel) -> float:
    """FedAvg's weight of ``result`` (its ``NUM_STEPS_CURRENT_ROUND``, 1 when missing or bad)."""
    return base_fedavg._get_num_steps_weight(result)


def start_round_aggregation(controller: FedAvg, expected: int) -> None:
    """Reset ``FedAvg``'s in-time aggregation for a new round, as its own ``run()`` does."""
    if controller.aggregator:
        controller.aggregator.reset_stats()
    else:
        controller._aggr_helper = WeightedAggregationHelper(exclude_vars=controller.exclude_vars)
        controller._aggr_metrics_helper = WeightedAggregationHelper()
        controller._all_metrics = True
    controller._received_count, controller._expected_count = 0, expected
    controller._params_type, controller._site_metric_weights = None, {}


def aggregate_one_result(controller: FedAvg, result: FLModel) -> bool:
    """``FedAvg``'s own handling of one site's result (in-time weighted sum)."""
    return FedAvg._aggregate_one_result(controller, result)


def aggregated_result(controller: FedAvg) -> FLModel:
    """The round's aggregate from ``FedAvg``'s in-time sums (or its aggregator)."""
    return controller._get_aggregated_result()


def site_weights(controller: FedAvg) -> dict[str, float]:
    """Each averaged site's weight this round, as ``FedAvg`` recorded it (case counts)."""
    return {site: entry["weight"] for site, entry in controller._site_metric_weights.items()}


def cleanup_memory(controller: FedAvg) -> None:
    """``FedAvg``'s periodic garbage collection after a round."""
    controller._maybe_cleanup_memory()


# ------------------------------------------------------------------------------ tracking


def wandb_job_tag(fl_ctx: Any) -> str:
    """The job id NVFlare's W&B receiver puts in run names (a timestamp in the simulator)."""
    from nvflare.app_opt.tracking.wandb.wandb_receiver import _get_job_id_tag

    return _get_job_id_tag(fl_ctx)


def wandb_site_worker(receiver: Any) -> Any:
    """What NVFlare's ``WandBReceiver`` runs in each site's W&B process: its ``_process_queue_tasks``
    (nvflare/app_opt/tracking/wandb/wandb_receiver.py), a function of the site's task queue. The receiver
    starts these processes in its own ``initialize``; fedseg's starts them itself, with its settings."""
    return receiver._process_queue_tasks


# ------------------------------------------------------------------------------ task timing


def wrap_task_requests(runner: Any, answer: Any) -> None:
    """Route every answer of the server's ``ServerRunner.process_task_request`` through
    ``answer(site, task_name, task_data)``.

    NVFlare writes one fixed wait (``task_request_interval``) into every reply, a task or "try
    again" (nvflare/private/fed/server/server_runner.py); a site sleeps that long before its next
    request. The runner is the job's ``FLContextKey.RUNNER``; it has no hook for the reply, so its
    bound method is replaced on the instance.
    """
    original = runner.process_task_request

    def process_task_request(client: Any, fl_ctx: Any) -> tuple[str, str, Any]:
        name, task_id, data = original(client, fl_ctx)
        answer(client.name, name, data)
        return name, task_id, data

    runner.process_task_request = process_task_request


def set_in_process_result_poll(seconds: float) -> None:
    """How often an in-process site checks for its trainer's result and its next task.

    NVFlare 2.9's in-process Client API polls both on a module constant of 0.5 s
    (``_RESULT_POLL_INTERVAL`` in nvflare/app_common/executors/client_api/in_process_backend.py;
    its comment says the knob was dropped on purpose), which rounds every hand-off between the
    site's trainer and NVFlare up to the next half second, twice a round. The backend reads the
    constant when it starts the trainer and in every wait, so this must run before the executor
    initializes (a client component's constructor does).
    """
    from nvflare.app_common.executors.client_api import in_process_backend

    in_process_backend._RESULT_POLL_INTERVAL = float(seconds)


def in_process_result_poll() -> float:
    from nvflare.app_common.executors.client_api import in_process_backend

    return float(in_process_backend._RESULT_POLL_INTERVAL)


def set_task_monitor_period(controller: Any, seconds: float) -> None:
    """How often the server notices that a round's tasks are done.

    ``Controller.set_communicator`` copies the controller's ``task_check_period`` to a public
    attribute that ``WFCommServer`` never reads: its task monitor sleeps its private
    ``_task_check_period`` (0.2 s, nvflare/apis/impl/wf_comm_server.py), whatever the job sets.
    """
    controller.communicator._task_check_period = float(seconds)


# ------------------------------------------------------------------------------ jobs without code


def replace_client_executors(recipe: Any, make: Any, script: str) -> int:
    """Replace every ``ClientAPIExecutor`` of the recipe's client apps by ``make(old_executor)`` and
    drop ``script`` from the files the client apps carry into ``custom/``; the number replaced.

    NVFlare's ``ScriptRunner`` always adds its executor with the script as a resource, and the
    app config keeps both in plain lists (nvflare/job_config/script_runner.py, base_app_config.py);
    a fedseg job runs the installed site code instead (``fedseg.app.site_executor``).
    """
    import os

    from nvflare.app_common.executors.client_api_executor import ClientAPIExecutor

    recipe._ensure_client_apps_prepared()  # recipes add the site apps lazily (nvflare/recipe/spec.py)
    replaced = 0
    for app in fed_job(recipe)._deploy_map.values():
        config = getattr(app, "app_config", None)
        for item in getattr(config, "executors", []):
            if isinstance(item.executor, ClientAPIExecutor):
                item.executor = make(item.executor)
                replaced += 1
        if config is not None and hasattr(config, "ext_scripts"):
            config.ext_scripts = [s for s in config.ext_scripts if os.path.basename(s) != script]
    return replaced


def params_transfer_type(executor: Any) -> str:
    """A Client API executor's transfer type ("FULL" or "DIFF"), as ``send_weight_diffs`` sets it."""
    value = executor._params_transfer_type
    return getattr(value, "value", value)


def exchange_formats(executor: Any) -> tuple[str, str]:
    """A Client API executor's (params exchange format, server expected format): "pytorch" and
    "pytorch" for plain jobs, "pytorch" and "numpy" for encrypted ones (the HE filters take NumPy)."""
    formats = (executor._params_exchange_format, executor._server_expected_format)
    return tuple(str(getattr(f, "value", f)) for f in formats)  # type: ignore[return-value]
