"""What every fedseg job shares: the job description (``Job``), the algorithm interface
(``Algorithm``), the table of algorithms (``ALGORITHM_MODULES``) and the assembly of an NVFlare
recipe (``build_recipe``).

A ``Job`` is an algorithm with its own options, the study settings (``fedseg.config.StudyConfig``)
and the add-ons (``fedseg.jobs.addons``). Each algorithm is declared once, by its ``Algorithm``
subclass in its own module ``jobs/<name>.py`` (as NVFlare keeps its recipes): its name, a one-line
description, its options, whether it is personal, its site plug-in, its server model and recipe.
``algorithms()`` reads them from the modules ``ALGORITHM_MODULES`` names, and everything else that
lists algorithms (the CLI's help and choices, ``fedseg compare``'s methods, the checked-in job
folders, the site's plug-in, a site's default policy) is derived from it. ``build_recipe(job)``
gives the recipe that runs unchanged in the simulator, in POC mode and on real sites (only the
environment differs); ``export`` writes the job folder that ``nvflare job submit -j`` takes.

What every recipe gets here:

- the server model as a class path + arguments, built with the same ``SegmentationModule``
  constructor the sites use (``StudyConfig.module_args``), so checkpoints load at both ends;
- the site script ``site_entry.py`` with ONE argument, ``--job-config <JSON>``: the site reads the
  study settings, the algorithm and its options from it (``fedseg.app.site_runner``); nothing
  site-specific is in the job: a site finds its data through its own configuration;
- the resilient round (``fedseg.app.resilient_fedavg``) through the recipes' ``_create_controller``
  hook (``fedseg.jobs.resilient_recipes``), with the study's round timeout and minimum of sites;
- best-model selection by ``val_dice`` weighted by the sites' case counts, the metrics receiver,
  cross-site evaluation, and the add-ons.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from fedseg.config import OFF, StudyConfig, profile
from fedseg.jobs.addons import Addons, contribution_aggregator

APP_DIR = Path(__file__).resolve().parents[1] / "app"
SITE_SCRIPT = "site_entry.py"
#: every task whose results a site returns ("personalize": the personalized methods' final step)
RESULT_TASKS = ("train", "validate", "submit_model", "personalize")
#: the table of algorithms: the modules ``jobs/<module>.py``, each declaring one ``Algorithm`` subclass
#: as its ``ALGORITHM``, in the order help texts and comparisons list them. A new algorithm is a new
#: module and its name here (docs/design.md, "How to add an algorithm").
ALGORITHM_MODULES: tuple[str, ...] = ("fedavg", "fedprox", "fedopt", "fedper", "fedrep", "ditto", "apfl", "selection", "finetune", "fedavg_he")


class Algorithm:
    """One federated algorithm, declared once: what it is, its options, add-ons, site plug-in, server
    model and recipe."""

    name: ClassVar[str]
    #: one line for the help texts and the docs: what the algorithm does
    description: ClassVar[str]
    #: the dataclass of this algorithm's own options (``setting`` fields: they become CLI options)
    options: ClassVar[type | None] = None
    #: the add-ons (``Addons.names()``) this algorithm's server workflow supports
    addons: ClassVar[frozenset[str]] = frozenset({"privacy", "contribution", "groups", "wandb", "resume", "quantize"})
    #: each site keeps a personal model: the job ends with every site scoring it on its own validation
    #: cases (the "personalize" task, ``ResilientFedAvg``), and only those scores leave the site
    personal: ClassVar[bool] = False
    #: weights travel in plain tensors (False: encrypted, and no other filter may touch them)
    plain_weights: ClassVar[bool] = True
    #: runs in NVFlare's simulator (``fedseg simulate``, ``fedseg compare``); False: POC and real sites only
    simulator: ClassVar[bool] = True
    #: what the algorithm adds at each site: ``"module:Class"`` of a ``fedseg.app.site_plugin.SitePlugin``
    #: made with the job's options (a path, so that this module never imports the site's torch code);
    #: "" for none
    site_plugin: ClassVar[str] = ""
    #: variants ``fedseg compare`` also runs: method name -> the options it changes
    compare_variants: ClassVar[Mapping[str, Mapping[str, Any]]] = {}

    def selects_on_validation(self, options: Any) -> bool:
        """True when these options make each site choose its model on its validation cases: its scores
        there are then biased, and ``fedseg compare`` runs the method only where it reports on test cases."""
        return False

    def default_options(self) -> Any:
        return self.options() if self.options else None

    def parse_options(self, doc: Mapping[str, Any] | None) -> Any:
        """The options dataclass from a job's untyped options (the site document's ``options``):
        fields left out take their defaults, an unknown one is an error (``ValueError``)."""
        if self.options is None:
            if doc:
                raise ValueError(f"{self.name} takes no options, got {sorted(doc)}")
            return None
        known = {f.name for f in dataclasses.fields(self.options)}
        unknown = sorted(set(doc or {}) - known)
        if unknown:
            raise ValueError(f"unknown {self.name} options {unknown}; known: {', '.join(sorted(known))}")
        return self.options(**(doc or {}))

    def make_site_plugin(self, options_doc: Mapping[str, Any] | None) -> Any:
        """The site plug-in of this algorithm with the job's options (None if it adds none)."""
        if not self.site_plugin:
            return None
        module, _, cls = self.site_plugin.partition(":")
        return getattr(importlib.import_module(module), cls)(self.parse_options(options_doc))

    def study_job(self) -> Job | None:
        """The checked-in job of this algorithm (``jobs/<name>/``, ``fedseg.jobs.catalog``): the
        ``study`` profile's settings; None for an algorithm that needs special kits (HE)."""
        return Job(algorithm=self.name, study=profile("study"), name=self.name) if self.plain_weights else None

    def check(self, job: Job) -> None:
        """Refuse options of this algorithm that cannot work together (its own options only)."""

    def server_model(self, job: Job) -> dict[str, Any]:
        """The global model as class path + arguments; its keys are what the server averages."""
        return {"class_path": "fedseg.app.global_model.GlobalModel", "args": job.study.module_args()}

    def personal_keys(self, job: Job) -> list[str]:
        """Parameter names that never leave a site (none unless the algorithm personalizes)."""
        return []

    def recipe(self, job: Job, common: dict[str, Any], round_args: dict[str, Any]) -> Any:
        """The NVFlare recipe of this algorithm from the common recipe arguments and the round's;
        by default fedseg's resilient FedAvg round (FedAvg, FedPer, Ditto, APFL and their kin)."""
        from fedseg.jobs.resilient_recipes import ResilientFedAvgRecipe

        return ResilientFedAvgRecipe(key_metric="val_dice", key_metric_mode="max", **round_args, **common)

    def finish(self, recipe: Any, job: Job) -> None:
        """Anything the algorithm adds to the assembled recipe (filters, audits)."""

    def add_evaluation(self, recipe: Any, job: Job, submit_model_timeout: int, validation_timeout: int) -> None:
        """The final evaluation: every model on every site; only the global models under a privacy
        filter (a site's local model is its training's result before any filter)."""
        from nvflare.recipe.utils import add_cross_site_evaluation, add_final_global_evaluation

        if job.addons.privacy is not None:
            add_final_global_evaluation(recipe, validation_timeout=validation_timeout)
        else:
            add_cross_site_evaluation(recipe, submit_model_timeout=submit_model_timeout,
                                      validation_timeout=validation_timeout)


@functools.cache
def algorithms() -> dict[str, Algorithm]:
    """Every algorithm by name, in the table's order (``ALGORITHM_MODULES``)."""
    found: dict[str, Algorithm] = {}
    for module in ALGORITHM_MODULES:
        cls = importlib.import_module(f"fedseg.jobs.{module}").ALGORITHM
        if cls.name in found:
            raise RuntimeError(f"two algorithms are called {cls.name!r}")
        found[cls.name] = cls()
    return found


def personal_algorithms() -> tuple[str, ...]:
    """The names of the algorithms whose sites end with a personal model."""
    return tuple(name for name, algo in algorithms().items() if algo.personal)


def describe_algorithms(names: Iterable[str] | None = None) -> str:
    """``name: description; ...`` of every algorithm: the help texts' list (and which run in POC only)."""
    table = algorithms()
    return "; ".join(f"{name}: {table[name].description}" + ("" if table[name].simulator else " (POC and real sites only)")
                     for name in (names or table))


def algorithm(name: str) -> Algorithm:
    """The algorithm called ``name`` (``ValueError`` naming the known ones)."""
    table = algorithms()
    if name not in table:
        raise ValueError(f"unknown algorithm {name!r}; known: {', '.join(table)}")
    return table[name]


@dataclass(frozen=True)
class Job:
    """One federated job: an algorithm with its options, the study settings and the add-ons."""

    algorithm: str
    study: StudyConfig = field(default_factory=StudyConfig)
    name: str = ""
    min_clients: int = 2
    #: the algorithm's options dataclass (None: its defaults)
    options: Any = None
    addons: Addons = field(default_factory=Addons)
    cross_site_eval: bool = True
    #: the study this job belongs to: names a personalized site's store of personal models (default: the job's name)
    study_name: str = ""

    def __post_init__(self) -> None:
        algo = algorithm(self.algorithm)
        if not self.name:
            object.__setattr__(self, "name", self.algorithm)
        if self.options is None:
            object.__setattr__(self, "options", algo.default_options())
        elif algo.options is None or not isinstance(self.options, algo.options):
            raise ValueError(f"{self.algorithm} takes {algo.options.__name__ if algo.options else 'no'} options, "
                             f"got {type(self.options).__name__}")
        unsupported = [a for a in self.addons.names() if a not in algo.addons]
        if unsupported:
            raise ValueError(f"{self.algorithm} does not support {', '.join(unsupported)} "
                             f"(it supports {', '.join(sorted(algo.addons)) or 'no add-ons'})")
        if self.min_clients < 1:
            raise ValueError(f"min_clients must be >= 1, got {self.min_clients}")
        if self.study.federation.min_sites_per_round > self.min_clients:
            raise ValueError(f"min_sites_per_round ({self.study.federation.min_sites_per_round}) exceeds min_clients "
                             f"({self.min_clients}): a round could never have enough sites")
        algo.check(self)

    @property
    def spec(self) -> Algorithm:
        return algorithm(self.algorithm)

    @property
    def min_sites(self) -> int:
        """Fewest answering sites a round may average."""
        return self.study.federation.min_sites_per_round or self.min_clients

    def server_model(self) -> dict[str, Any]:
        return self.spec.server_model(self)

    def checkpoint_hparams(self) -> dict[str, Any]:
        """Arguments of the global checkpoint's class (``server_model``'s)."""
        return self.server_model()["args"]

    def personal_keys(self) -> list[str]:
        return self.spec.personal_keys(self)

    def options_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self.options))) if self.options is not None else {}

    def site_document(self) -> dict[str, Any]:
        """What every site is told (``--job-config``): the study, the algorithm and its options."""
        return {
            "algorithm": self.algorithm,
            "options": self.options_json(),
            # the synthetic-data settings only matter where the data is made, not at a site
            # (nor the GPUs a site holds for the job: its resource manager reads them from meta.json)
            "study": {k: ({f: x for f, x in v.items() if f != "gpus_per_site"} if k == "federation" else v)
                      for k, v in self.study.to_json().items() if k != "synth"},
            "study_name": self.study_name or self.name,
            "contribution": self.addons.contribution is not None,
            # what a site's policy checks besides the study (fedseg.app.site_policy)
            "wandb": self.addons.wandb,
        }

    def script_args(self) -> str:
        """The site script's arguments: the site document as one compact JSON argument.

        NVFlare splits ``train_args`` at whitespace (nvflare/app_common/executors/task_script_runner.py),
        so the document must have none: compact separators, and no value with a space.
        """
        text = json.dumps(self.site_document(), separators=(",", ":"), sort_keys=True)
        if any(c.isspace() for c in text):
            raise ValueError(f"a job setting contains whitespace, which NVFlare would split: {text}")
        return f"--job-config {text}"

    def wandb_config(self) -> dict[str, Any]:
        """The W&B run config: the study's settings, the algorithm and its options (no paths)."""
        from fedseg.lightning_modules.tracking import sanitize_config

        doc = {**self.study.flat(), **self.options_json(), "algorithm": self.algorithm, "name": self.name,
               "addons": self.addons.names(), "min_clients": self.min_clients}
        return sanitize_config({**doc, "kind": self.algorithm, "epochs": self.study.epochs})

    def to_json(self) -> dict[str, Any]:
        return {
            "algorithm": self.algorithm,
            "name": self.name,
            "min_clients": self.min_clients,
            "options": self.options_json(),
            "addons": self.addons.to_json(),
            "cross_site_eval": self.cross_site_eval,
            "study_name": self.study_name,
            "study": self.study.to_json(),
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Job:
        options = algorithm(doc["algorithm"]).parse_options(doc.get("options"))
        return cls(algorithm=doc["algorithm"], study=StudyConfig.from_json(doc["study"]), name=doc.get("name", ""),
                   min_clients=doc.get("min_clients", 2), options=options,
                   addons=Addons.from_json(doc.get("addons", {})), cross_site_eval=doc.get("cross_site_eval", True),
                   study_name=doc.get("study_name", ""))

    def replace(self, **changes: Any) -> Job:
        """A copy with job fields (``name``, ``addons``, ...) or study settings (``rounds``, ...) changed."""
        own = {k: v for k, v in changes.items() if k in {f.name for f in dataclasses.fields(self)}}
        study = {k: v for k, v in changes.items() if k not in own}
        if study:
            own["study"] = (own.get("study") or self.study).override(**study)
        return dataclasses.replace(self, **own)


@contextlib.contextmanager
def in_app_dir() -> Iterator[None]:
    """Work from inside ``app/`` while a recipe is built, exported or executed.

    The recipe writes ``train_script`` into the job config verbatim and copies the file from the
    working directory when the job is assembled (nvflare/job_config/script_runner.py, api.py): a
    relative name is what a site must run (its copy in ``custom/``), so the name is resolved here.
    """
    previous = os.getcwd()
    os.chdir(APP_DIR)
    try:
        yield
    finally:
        os.chdir(previous)


def build_recipe(job: Job) -> Any:
    """The NVFlare recipe for ``job`` (run it with ``execute(recipe, env)`` or ``export`` it)."""
    from fedseg import nvflare_internals

    nvflare_internals.patch_job_export()
    from nvflare.app_common.widgets.intime_model_selector import IntimeModelSelector
    from nvflare.client.config import ExchangeFormat

    from fedseg.app.metrics_receiver import JsonlMetricsReceiver

    fed = job.study.federation
    common: dict[str, Any] = dict(
        name=job.name,
        model=job.server_model(),
        min_clients=job.min_clients,
        num_rounds=fed.rounds,
        train_script=SITE_SCRIPT,
        train_args=job.script_args(),
        server_expected_format=ExchangeFormat.PYTORCH,
    )
    round_args: dict[str, Any] = dict(round_timeout=fed.round_timeout, min_sites=job.min_sites, start_round=0)
    if job.spec.personal:
        round_args["personalize"] = True
    if job.addons.resume_from:
        round_args["start_round"], common["initial_ckpt"] = resume_start(job)
        common["num_rounds"] = fed.rounds - round_args["start_round"]
    if job.addons.contribution is not None:
        common["aggregator"] = contribution_aggregator(job.addons.contribution)
    if job.addons.groups is not None:
        round_args.update(grouped=True, shared_keys=_encoder_keys(job) if job.addons.groups.share_encoder else [])
    with in_app_dir():  # adding filters re-assembles the client app, which reads the script too
        recipe = job.spec.recipe(job, common, round_args)
        # Best model: the recipe's selector averages the sites' val_dice unweighted; weigh it by the
        # same case counts as the aggregation (the sites' NUM_STEPS_CURRENT_ROUND, fedseg.app.protocol).
        if job.addons.groups is not None:  # one model per group: no single global model to select
            nvflare_internals.remove_server_component(recipe, "model_selector")
        else:
            nvflare_internals.replace_server_component(
                recipe, "model_selector", IntimeModelSelector(key_metric="val_dice", weigh_by_local_iter=True)
            )
        fed_job = nvflare_internals.fed_job(recipe)
        fed_job.to_server(JsonlMetricsReceiver(), id="fedseg_metrics_receiver")
        if job.addons.wandb != OFF:
            from fedseg.app.wandb_receiver import FedsegWandBReceiver

            receiver = FedsegWandBReceiver(run_name=job.name, run_config=job.wandb_config(), mode=job.addons.wandb)
            fed_job.to_server(receiver, id="fedseg_wandb_receiver")
        # fedseg is installed at every site and on the server: never copy its modules into custom/.
        fed_job.set_app_packages(["fedseg"])
        if job.spec.plain_weights:
            job.addons.apply_receiving(recipe)
        job.spec.finish(recipe, job)
        if job.addons.privacy is not None:
            job.addons.privacy.apply(recipe)
        if job.spec.plain_weights:
            job.addons.apply_sending(recipe)
        # A task reaches a site within ~0.1 s of the last result, while idle sites poll no more
        # often than poll_interval (fedseg.app.task_timing); NVFlare's own fixed interval stays
        # poll_interval for the replies before the job's server has started.
        if fed.poll_interval != 2.0:  # NVFlare's default
            recipe.add_server_config({"server": {"task_request_interval": fed.poll_interval}})
        add_task_timing(fed_job, fed.poll_interval)
        if job.cross_site_eval and job.addons.groups is None:
            # A vanished site must not hold up the evaluation either: its tasks time out like a round.
            timeout = fed.round_timeout or None
            job.spec.add_evaluation(recipe, job, submit_model_timeout=timeout or 600, validation_timeout=timeout or 6000)
        use_installed_site_code(recipe, job)
        if fed.gpus_per_site:
            from nvflare.apis.job_def import JobMetaKey
            from nvflare.recipe.utils import set_recipe_meta

            set_recipe_meta(recipe, JobMetaKey.RESOURCE_SPEC, resource_spec(job))
    return recipe


def resource_spec(job: Job) -> dict[str, Any]:
    """The job's ``meta.json`` ``resource_spec``: the study's GPUs per site, for every site.

    NVFlare 2.9 resolves a site's requirement as ``{**spec["@default"], **spec[site]}``
    (nvflare/utils/job_launcher_utils.py, ``get_resource_manager_spec``), so one ``@default`` entry
    serves any consortium; the server's scheduler asks each site's ``GPUResourceManager`` for that
    many free GPUs and holds the job until they are. No GPUs (``gpus_per_site`` 0): an empty spec,
    which NVFlare reads as "no requirement". ``@default`` may only hold NVFlare's portable keys
    (``num_of_gpus``, ``num_of_cpus``, ``memory``), so no ``mem_per_gpu_in_GiB`` is asked (0).
    """
    gpus = job.study.federation.gpus_per_site
    return {"@default": {"num_of_gpus": gpus}} if gpus else {}


def use_installed_site_code(recipe: Any, job: Job) -> None:
    """Every site runs ``fedseg.app.site_executor.SiteExecutor`` with the job's settings, and the job
    carries no code: NVFlare's script runner would copy ``site_entry.py`` into ``custom/``, which
    makes a job one that brings its own code (a kit that refuses code refuses it)."""
    from fedseg import __version__, nvflare_internals
    from fedseg.app.site_executor import SiteExecutor

    def site_executor(old: Any) -> SiteExecutor:
        params_format, server_format = nvflare_internals.exchange_formats(old)
        return SiteExecutor(job=job.site_document(), fedseg_version=__version__,
                            params_transfer_type=nvflare_internals.params_transfer_type(old),
                            params_exchange_format=params_format, server_expected_format=server_format)

    if not nvflare_internals.replace_client_executors(recipe, site_executor, SITE_SCRIPT):
        raise RuntimeError(f"{job.algorithm}: the recipe has no Client API executor to run the site code with")


def add_task_timing(fed_job: Any, longest_wait: float) -> None:
    """The server's adaptive task waits and the sites' quick trainer hand-off (``fedseg.app.task_timing``)."""
    from fedseg.app.task_timing import AdaptiveTaskWait, QuickResultHandoff

    fed_job.to_server(AdaptiveTaskWait(longest_wait=longest_wait), id="fedseg_task_wait")
    fed_job.to_clients(QuickResultHandoff(), id="fedseg_result_handoff")


def _encoder_keys(job: Job) -> list[str]:
    """Keys of the sites' model outside the segmentation head (what grouped models may share)."""
    from fedseg.lightning_modules.module import SegmentationModule
    from fedseg.lightning_modules.networks import partition_keys

    module = SegmentationModule(**job.study.module_args())
    return partition_keys(module.network, prefix="network.", keys=module.state_dict().keys()).encoder


def resume_start(job: Job) -> tuple[int, str]:
    """Rounds done and the checkpoint path for the recipe's ``initial_ckpt`` (``ValueError`` if unusable).

    The path is absolute: NVFlare then reads it on the server (nvflare/recipe/utils.py,
    ``prepare_initial_ckpt``). A relative one would bundle the file into the server app's
    ``custom/`` folder, which makes the job one that brings its own code, and kits that refuse
    code refuse it. So the checkpoint must be where the server can read it: on the machine of the
    simulator and of POC mode, in the server's storage for a real study (``fedseg study``).
    """
    from fedseg.jobs.resume import find_resume_point

    point = find_resume_point(Path(job.addons.resume_from))
    rounds = job.study.federation.rounds
    if point.rounds_done >= rounds:
        raise ValueError(f"{point.checkpoint} already holds {point.rounds_done} rounds; the job has {rounds}: "
                         "nothing left to resume (raise rounds to train more)")
    return point.rounds_done, str(Path(point.checkpoint).resolve())


def export(job: Job, out_dir: Path) -> Path:
    """Write the job folder ``out_dir/<job.name>`` for ``nvflare job submit -j``."""
    recipe = build_recipe(job)
    out_dir = Path(out_dir).resolve()
    with in_app_dir():
        recipe.export(str(out_dir))
    return out_dir / job.name


def execute(recipe: Any, env: Any) -> Any:
    """``recipe.execute(env)`` (SimEnv, PocEnv or ProdEnv), returning NVFlare's ``Run``."""
    with in_app_dir():
        return recipe.execute(env)
