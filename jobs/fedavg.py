"""The FedAvg job (with FedProx and FedOpt as options), built with NVFlare's recipes.

One ``FedAvgJob`` describes the study (network, modalities, rounds, ...); ``build_recipe`` turns it
into an NVFlare recipe that runs unchanged in the simulator, in POC mode and on real sites
(only the environment differs), and ``export`` writes the job folder that
``nvflare job submit -j`` takes. Nothing site-specific is in the job: each site reads its data
location from its own configuration (``fedseg.app.site_config``).

What the server runs:
- fedavg: NVFlare's ``FedAvgRecipe`` (in-time weighted averaging; sites weigh their update by their
  number of training cases);
- fedprox: ``FedProxRecipe``: the same, plus the proximal term ``mu/2 ||w - w_global||^2`` that
  NVFlare's Lightning patch adds to the site's gradients;
- fedopt: ``FedAvgRecipe`` with NVFlare's ``FedOpt`` controller made resilient
  (``fedseg.app.resilient_fedopt``): the averaged update is applied by a server optimizer (SGD with
  momentum by default, as in the FedOpt paper's FedAvgM; ``server_optimizer="adam"`` for FedAdam);
- fedper: ``FedAvgRecipe`` over the shared encoder only: the server model is
  ``SegmentationEncoder`` (no head), each site keeps its head in a site-local store and sends only
  shared keys, and a site-side ``ExcludeVars`` output filter strips the personal keys again
  (``fedseg.app.fedper``); ``keep_norm_local`` keeps normalization layers local too (FedBN).
Every variant ends with cross-site evaluation and keeps the best global model by ``val_dice``.

Resilience (fedavg, fedprox, fedper): the server controller is ``ResilientFedAvg``
(``fedseg.app.resilient_fedavg``): a round ends when every site answered or ``round_timeout``
passed, a failed or silent site is left out of that round and named in
``metrics/participation.jsonl``, and fewer than ``min_sites_per_round`` answers stop the job with
the reason. ``resume_from`` continues a study from its last global checkpoint with the rounds
already done counted (``fedseg.jobs.resume``). FedOpt keeps NVFlare's own controller.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedseg.jobs import nvflare_compat

ALGORITHMS = ("fedavg", "fedprox", "fedopt", "fedper", "fedavg-he")
PRIVACY_FILTERS = ("off", "svt", "percentile")
AGGREGATIONS = ("cases", "contribution")
APP_DIR = Path(__file__).resolve().parents[1] / "app"
SITE_SCRIPT = "site_entry.py"
#: every task whose results a site returns: FedPer filters and audits each of them
FEDPER_TASKS = ("train", "validate", "submit_model")


@dataclass
class FedAvgJob:
    """Arguments of a FedAvg-family job. Every field is a job argument (``fedseg jobs export``)."""

    name: str = "fedavg"
    algorithm: str = "fedavg"
    min_clients: int = 2
    rounds: int = 5
    local_epochs: int = 1
    network: str = "unet"
    features: int = 16
    norm: str = "instance"
    modalities: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")
    roi: tuple[int, int, int] = (128, 128, 128)
    normalization: str = "zscore"
    lr: float = 1e-3
    batch_size: int = 2
    num_workers: int = 0
    hd95: bool = True
    fedprox_mu: float = 0.01
    server_optimizer: str = "sgd"
    server_lr: float = 1.0
    server_momentum: float = 0.6
    cross_site_eval: bool = True
    keep_norm_local: bool = False
    study: str = ""
    #: seconds a site waits before asking for its next task (NVFlare's server.task_request_interval,
    #: default 2); a short job on a laptop spends most of each round in this wait
    task_poll_interval: float = 2.0
    site_threads: int = 0
    #: W&B tracking on the server: "off", "offline" or "online" (fedseg.app.wandb_receiver)
    wandb: str = "off"
    #: seconds a round waits for the sites (0: for ever); set it above the slowest site's round
    round_timeout: int = 7200
    #: fewest sites whose results a round may average (0: min_clients); fewer stop the job
    min_sites_per_round: int = 0
    #: continue a study from this global checkpoint or run folder (fedseg.jobs.resume)
    resume_from: str = ""
    #: NVFlare privacy filter on every update a site sends: "off", "svt" or "percentile"
    #: (fedseg.jobs.privacy); privacy_args are the filter's arguments (NVFlare's defaults otherwise)
    privacy: str = "off"
    privacy_args: dict[str, Any] = field(default_factory=dict)
    #: how the server weighs the sites' updates: "cases" (FedAvg) or "contribution"
    #: (fedseg.app.contribution: cases and the drop of the site's validation loss, bounded)
    aggregation: str = "cases"
    contribution_alpha: float = 0.5
    max_site_share: float = 0.5
    #: one global model per site group (the group each site declares in its site config);
    #: with share_encoder the encoder is averaged across all groups (fedseg.app.grouped_fedavg)
    grouped: bool = False
    share_encoder: bool = False
    #: seed of the global model's initial weights (server) and of each site's data order, crops and
    #: augmentation (seed + a fixed per-site offset, fedseg.app.client.site_seed): same seed, same start
    seed: int = 0
    extra_script_args: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {self.algorithm!r}; known: {', '.join(ALGORITHMS)}")
        self.modalities = tuple(self.modalities)
        self.roi = tuple(int(r) for r in self.roi)  # type: ignore[assignment]
        if self.wandb not in ("off", "offline", "online"):
            raise ValueError(f"unknown W&B mode {self.wandb!r}; known: off, offline, online")
        if self.round_timeout < 0 or self.min_sites_per_round < 0:
            raise ValueError("round_timeout and min_sites_per_round must be >= 0")
        if self.privacy not in PRIVACY_FILTERS:
            raise ValueError(f"unknown privacy filter {self.privacy!r}; known: {', '.join(PRIVACY_FILTERS)}")
        if self.privacy != "off":
            from fedseg.jobs.privacy import validate_privacy_args

            validate_privacy_args(self.privacy, self.privacy_args)  # a bad value fails here, naming itself
        elif self.privacy_args:
            raise ValueError("privacy_args given without a privacy filter (privacy='svt' or 'percentile')")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"unknown aggregation {self.aggregation!r}; known: {', '.join(AGGREGATIONS)}")
        if not 0.0 <= self.contribution_alpha <= 1.0 or not 0.0 < self.max_site_share <= 1.0:
            raise ValueError("contribution_alpha must be in [0, 1] and max_site_share in (0, 1]")
        if self.algorithm in ("fedopt", "fedavg-he") and (self.aggregation != "cases" or self.grouped):
            raise ValueError(f"{self.algorithm} keeps NVFlare's own server workflow: no contribution weights or groups")
        if self.algorithm == "fedavg-he" and self.privacy != "off":
            raise ValueError("fedavg-he encrypts the updates; a privacy filter would run on ciphertext: use one or the other")
        if self.grouped and (self.algorithm == "fedper" or self.aggregation != "cases" or self.resume_from
                             or self.privacy != "off"):
            # GroupedFedAvg averages full weights: the weight diffs a privacy filter needs are not handled
            raise ValueError("grouped models work with fedavg/fedprox and case weights, without resume_from "
                             "or privacy filters")
        if self.share_encoder and not self.grouped:
            raise ValueError("share_encoder needs grouped=True")
        if self.min_sites_per_round > self.min_clients:
            raise ValueError(f"min_sites_per_round ({self.min_sites_per_round}) exceeds min_clients ({self.min_clients}): "
                             "a round could never have enough sites")

    @property
    def min_sites(self) -> int:
        """Fewest answering sites a round may average."""
        return self.min_sites_per_round or self.min_clients

    def script_args(self) -> str:
        """Command-line arguments of the site script (``fedseg.app.client``)."""
        args = [
            f"--network {self.network}",
            f"--features {self.features}",
            f"--norm {self.norm}",
            f"--modalities {' '.join(self.modalities)}",
            f"--roi {' '.join(map(str, self.roi))}",
            f"--normalization {self.normalization}",
            f"--lr {self.lr}",
            f"--local-epochs {self.local_epochs}",
            f"--rounds {self.rounds}",
            f"--batch-size {self.batch_size}",
            f"--num-workers {self.num_workers}",
            f"--seed {self.seed}",
        ]
        if not self.hd95:
            args.append("--no-hd95")
        if self.site_threads:
            args.append(f"--threads {self.site_threads}")
        if self.aggregation == "contribution":
            args.append("--contribution")
        if self.algorithm == "fedper":
            args.append(f"--fedper --study {self.study or self.name}")
            if self.keep_norm_local:
                args.append("--keep-norm-local")
        return " ".join(args + list(self.extra_script_args))

    def module_hparams(self) -> dict[str, Any]:
        """``SegmentationModule`` arguments of the sites' model (also the server's global model)."""
        return {
            "network": self.network,
            "in_channels": len(self.modalities),
            "features": self.features,
            "network_kwargs": {"norm": self.norm},
            "lr": self.lr,
            "max_epochs": self.rounds * self.local_epochs,
            "roi_size": list(self.roi),
            "hd95": self.hd95,
            "preprocess": {"modalities": list(self.modalities), "roi_size": list(self.roi), "normalization": self.normalization},
            "init_seed": self.seed,
        }

    def server_model(self) -> dict[str, Any]:
        """The global model as a class path + arguments: its keys equal the sites' LightningModule's
        (for FedPer: the shared keys only)."""
        if self.algorithm == "fedper":
            args = {**self.module_hparams(), "keep_norm_local": self.keep_norm_local}
            return {"class_path": "fedseg.app.fedper.SegmentationEncoder", "args": args}
        return {"class_path": "fedseg.lightning_modules.module.SegmentationModule", "args": self.module_hparams()}

    def checkpoint_hparams(self) -> dict[str, Any]:
        """Arguments of the global checkpoint's class (``server_model``'s)."""
        return self.server_model()["args"]

    def site_module(self) -> Any:
        """A fresh ``SegmentationModule`` as the sites build it (for its parameter names)."""
        from fedseg.lightning_modules.module import SegmentationModule

        return SegmentationModule(**{k: v for k, v in self.module_hparams().items() if k != "preprocess"})

    def encoder_keys(self) -> list[str]:
        """Keys of the sites' model outside the segmentation head (the groups' shared part)."""
        from fedseg.app.fedper import personal_keys

        module = self.site_module()
        head = set(personal_keys(module, keep_norm_local=False))
        return [k for k in module.state_dict() if k not in head]

    def personal_keys(self) -> list[str]:
        """Keys that never leave a site (empty unless FedPer)."""
        if self.algorithm != "fedper":
            return []
        from fedseg.app.fedper import personal_keys

        return personal_keys(self.site_module(), self.keep_norm_local)

    def wandb_config(self) -> dict[str, Any]:
        """The W&B run config: the job's arguments, with the keys centralized runs share
        (``fedseg.lightning_modules.tracking.SHARED_CONFIG_KEYS``)."""
        from fedseg.lightning_modules.tracking import sanitize_config

        doc = {k: v for k, v in self.to_json().items() if k not in ("wandb", "extra_script_args")}
        return sanitize_config({**doc, "kind": self.algorithm, "epochs": self.rounds * self.local_epochs})

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["modalities"], doc["roi"] = list(self.modalities), list(self.roi)
        return doc


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


def build_recipe(job: FedAvgJob) -> Any:
    """The NVFlare recipe for ``job`` (run it with ``recipe.execute(env)`` or export it)."""
    nvflare_compat.apply()
    from nvflare.app_common.widgets.intime_model_selector import IntimeModelSelector
    from nvflare.client.config import ExchangeFormat
    from nvflare.recipe.utils import add_cross_site_evaluation, add_final_global_evaluation

    from fedseg.app.metrics_receiver import JsonlMetricsReceiver

    common: dict[str, Any] = dict(
        name=job.name,
        model=job.server_model(),
        min_clients=job.min_clients,
        num_rounds=job.rounds,
        train_script=SITE_SCRIPT,
        train_args=job.script_args(),
        server_expected_format=ExchangeFormat.PYTORCH,
    )
    start_round = 0
    if job.resume_from:
        start_round, common["initial_ckpt"] = resume_start(job)
        common["num_rounds"] = job.rounds - start_round
    with in_app_dir():  # adding filters re-assembles the client app, which reads the script too
        recipe = _base_recipe(job, common, start_round)
        # Best model: the recipe's selector averages the sites' val_dice unweighted; weigh it by the
        # same case counts as the aggregation (NUM_STEPS_CURRENT_ROUND carries them, see app/client.py).
        if job.grouped:  # one model per group: no single global model to select (app/grouped_fedavg.py)
            _remove_server_component(recipe, "model_selector")
        else:
            _replace_server_component(
                recipe, "model_selector", IntimeModelSelector(key_metric="val_dice", weigh_by_local_iter=True)
            )
        _fed_job(recipe).to_server(JsonlMetricsReceiver(), id="fedseg_metrics_receiver")
        if job.wandb != "off":
            from fedseg.app.wandb_receiver import FedsegWandBReceiver

            receiver = FedsegWandBReceiver(run_name=job.name, run_config=job.wandb_config(), mode=job.wandb)
            _fed_job(recipe).to_server(receiver, id="fedseg_wandb_receiver")
        # fedseg is installed at every site and on the server: never copy its modules into custom/.
        _fed_job(recipe).set_app_packages(["fedseg"])
        if job.algorithm == "fedper":
            _add_fedper_guards(recipe, job)
        if job.privacy != "off":
            from fedseg.jobs.privacy import add_privacy_filters

            add_privacy_filters(recipe, job)
        if job.task_poll_interval != 2.0:
            recipe.add_server_config({"server": {"task_request_interval": job.task_poll_interval}})
        if job.cross_site_eval and not job.grouped:
            # A vanished site must not hold up the evaluation either: its tasks time out like a round.
            timeout = job.round_timeout or None
            evaluation = dict(submit_model_timeout=timeout or 600, validation_timeout=timeout or 6000)
            if job.algorithm == "fedavg-he":  # NVFlare's own evaluation cannot copy encrypted models
                from fedseg.jobs.he import add_he_cross_site_evaluation

                add_he_cross_site_evaluation(recipe, **evaluation)
            elif job.privacy != "off":
                # A site's local model is its training's result before any filter: under a privacy
                # filter it must not leave the site, so only the global models are scored, on every site.
                add_final_global_evaluation(recipe, validation_timeout=evaluation["validation_timeout"])
            else:
                add_cross_site_evaluation(recipe, **evaluation)
    return recipe


def resume_start(job: FedAvgJob) -> tuple[int, str]:
    """Rounds done and the checkpoint path for the recipe's ``initial_ckpt`` (``ValueError`` if unusable).

    A path relative to the working directory (``app/`` while a recipe is built) makes NVFlare
    bundle the file into the server app's custom/ folder (nvflare/recipe/utils.py,
    ``prepare_initial_ckpt``), so the job carries its starting point to POC and real servers.
    """
    from fedseg.jobs.resume import find_resume_point

    point = find_resume_point(Path(job.resume_from))
    if point.rounds_done >= job.rounds:
        raise ValueError(f"{point.checkpoint} already holds {point.rounds_done} rounds; the job has {job.rounds}: "
                         "nothing left to resume (raise rounds to train more)")
    return point.rounds_done, os.path.relpath(point.checkpoint, APP_DIR)


def _base_recipe(job: FedAvgJob, common: dict[str, Any], start_round: int = 0) -> Any:
    resilience: dict[str, Any] = dict(round_timeout=job.round_timeout, min_sites=job.min_sites, start_round=start_round)
    if job.grouped:
        resilience.update(grouped=True, shared_keys=job.encoder_keys() if job.share_encoder else [])
    if job.aggregation == "contribution":
        from fedseg.app.contribution import ContributionWeightedAggregator

        common = {**common, "aggregator": ContributionWeightedAggregator(job.contribution_alpha, job.max_site_share)}
    if job.algorithm in ("fedavg", "fedper"):
        from fedseg.jobs.resilient_recipes import ResilientFedAvgRecipe

        return ResilientFedAvgRecipe(key_metric="val_dice", key_metric_mode="max", **resilience, **common)
    if job.algorithm == "fedopt":
        return _fedopt_recipe(job, common, resilience)
    if job.algorithm == "fedprox":
        from fedseg.jobs.resilient_recipes import ResilientFedProxRecipe

        return ResilientFedProxRecipe(
            key_metric="val_dice", key_metric_mode="max", fedprox_mu=job.fedprox_mu, **resilience, **common
        )
    if start_round:
        raise ValueError("resume_from is supported for fedavg, fedprox, fedopt and fedper (fedavg-he keeps "
                         "NVFlare's own server workflow)")
    from fedseg.jobs.he import he_recipe

    return he_recipe(job, common)


def _add_fedper_guards(recipe: Any, job: FedAvgJob) -> None:
    """The second line of defence for the head, and the audit that shows it held."""
    from nvflare.app_common.filters.exclude_vars import ExcludeVars

    from fedseg.app.payload_audit import PayloadKeyAudit

    # An explicit key list: a regex string would export a compiled re.Pattern (see the NVFlare notes).
    # One registration per task: NVFlare matches filters by exact task name ("*" matches nothing,
    # nvflare/apis/utils/task_utils.py) and keeps a task list as a set, which would make the
    # exported order vary. Results without weights (validate metrics) pass ExcludeVars unchanged.
    for task in FEDPER_TASKS:
        recipe.add_client_output_filter(ExcludeVars(job.personal_keys()), tasks=[task])
        recipe.add_server_input_filter(PayloadKeyAudit(), tasks=[task])


def _fedopt_recipe(job: FedAvgJob, common: dict[str, Any], resilience: dict[str, Any]) -> Any:
    """FedOpt as a FedAvg recipe whose controller is ``ResilientFedOpt`` (fedseg.app.resilient_fedopt).

    NVFlare's ``FedOptRecipe`` runs ScatterAndGather, which has no round timeout or minimum of
    sites; its ModelController form, ``FedOpt``, takes fedseg's resilient round. The sites send
    weight differences (the server optimizer's gradient) and the optimizer steps the component
    ``FEDOPT_MODEL_ID``, a ``SegmentationModule`` built from the job's arguments.
    """
    from nvflare.client.config import TransferType

    from fedseg.jobs.resilient_recipes import FEDOPT_MODEL_ID, ResilientFedAvgRecipe
    from fedseg.lightning_modules.module import SegmentationModule

    if job.server_optimizer == "adam":
        optimizer = {"path": "torch.optim.Adam", "args": {"lr": job.server_lr, "betas": [0.9, 0.99]}}
    else:
        optimizer = {"path": "torch.optim.SGD", "args": {"lr": job.server_lr, "momentum": job.server_momentum}}
    recipe = ResilientFedAvgRecipe(key_metric="val_dice", key_metric_mode="max", server_optimizer=optimizer,
                                   params_transfer_type=TransferType.DIFF, **resilience, **common)
    model = SegmentationModule(**common["model"]["args"])
    # The job exporter writes a component's arguments from its attributes `<name>` or `_<name>`
    # (nvflare/job_config/fed_job_config.py, _get_args); a LightningModule keeps them in hparams, so
    # without these the exported server would build a default SegmentationModule, not the job's.
    for key, value in common["model"]["args"].items():
        setattr(model, f"_{key}", value)
    _fed_job(recipe).to_server(model, id=FEDOPT_MODEL_ID)
    return recipe


def _fed_job(recipe: Any) -> Any:
    # A recipe keeps its FedJob in the private ``_job`` (nvflare/recipe/spec.py); NVFlare's own
    # recipe utilities reach it the same way. Server components can only be added through it.
    return recipe._job


def _server_components(recipe: Any, comp_id: str) -> dict[str, Any]:
    """The server app's component table holding ``comp_id``.

    Recipes expose no setter for the components BaseFedJob adds; the server app keeps them by id.
    """
    for app in _fed_job(recipe)._deploy_map.values():
        config = getattr(app, "app_config", None)
        if config is not None and hasattr(config, "workflows") and comp_id in getattr(config, "components", {}):
            return config.components
    raise RuntimeError(f"server component {comp_id!r} not found in the recipe")


def _replace_server_component(recipe: Any, comp_id: str, component: Any) -> None:
    _server_components(recipe, comp_id)[comp_id] = component


def _remove_server_component(recipe: Any, comp_id: str) -> None:
    del _server_components(recipe, comp_id)[comp_id]


def export(job: FedAvgJob, out_dir: Path) -> Path:
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
