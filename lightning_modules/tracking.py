"""Weights & Biases tracking shared by centralized, local and federated runs.

Centralized and local runs log through Lightning's ``WandbLogger`` (``make_wandb_logger``); federated
runs through NVFlare's server-side W&B receiver (``fedseg.app.wandb_receiver``). Both use the same
project, the same metric names (whatever ``SegmentationModule`` logs: ``train_loss``, ``val_loss``,
``val_dice``, ``val_dice_et``, ``val_iou_wt``, ``val_hd95_tc``, ..., ``epoch``), the same config
keys (``SHARED_CONFIG_KEYS``) and the same privacy settings, so that the runs line up in one W&B
project.

Offline by default: runs are written to ``RUN/wandb/offline-run-*`` and can be uploaded later with
``wandb sync RUN/wandb/offline-run-*``. Online only when asked for and ``WANDB_API_KEY`` is set in
the environment of the process that logs; a key is never read from or written to a config.

Privacy: only scalars are logged; the run config carries no path, datalist or case identifier
(``sanitize_config``); W&B's system metadata (program path, command line, git, host, requirements,
console output) is switched off (``PRIVATE_SETTINGS``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import PurePath
from typing import Any

from fedseg.config import OFF, WANDB_MODES

PROJECT = "fedseg"
API_KEY_ENV = "WANDB_API_KEY"

#: wandb.Settings fields (as a plain dict: it also travels in an exported NVFlare job config)
#: that keep paths, the command line, host and console output out of a run. Checked against
#: wandb 0.31: with these the run file holds config, metrics and the wandb/Python versions only.
PRIVATE_SETTINGS: dict[str, Any] = {
    "x_disable_meta": True,  # wandb-metadata.json: program path, args, cwd, host, executable, git
    "x_disable_stats": True,  # system metrics (disk paths, process info)
    "x_disable_machine_info": True,
    "x_save_requirements": False,
    "disable_git": True,
    "disable_code": True,
    "save_code": False,
    "disable_job_creation": True,
    "console": "off",  # output.log would capture whatever the process prints (file names included)
    "silent": True,
}

#: config keys that every fedseg run carries, federated or not
SHARED_CONFIG_KEYS = (
    "kind",
    "network",
    "features",
    "norm",
    "modalities",
    "roi",
    "normalization",
    "lr",
    "batch_size",
    "epochs",
    "hd95",
)

#: config keys dropped whatever their value: they name files or data
PATH_KEYS = frozenset({"datalists", "datalist", "out", "data_root", "cache_dir", "head_store", "dir", "path"})


def check_mode(mode: str) -> str:
    """``mode`` if it is one of ``WANDB_MODES`` (else a ``ValueError`` saying which are)."""
    if mode not in WANDB_MODES:
        raise ValueError(f"unknown W&B mode {mode!r}; known: {', '.join(WANDB_MODES)}")
    return mode


def online_allowed() -> bool:
    """Online logging needs ``WANDB_API_KEY`` in this process's environment."""
    return bool(os.environ.get(API_KEY_ENV))


def _looks_like_path(value: str) -> bool:
    return os.sep in value or "\\" in value or value.endswith((".nii", ".nii.gz", ".json", ".pt", ".ckpt", ".png"))


def sanitize_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``config`` with everything path-like removed (keys in ``PATH_KEYS``, ``Path``
    values, strings with a path separator or a data-file suffix), recursively; tuples become lists."""

    def clean(value: Any) -> Any:
        if isinstance(value, PurePath) or (isinstance(value, str) and _looks_like_path(value)):
            return _DROP
        if isinstance(value, Mapping):
            return {str(k): c for k, v in value.items() if k not in PATH_KEYS and (c := clean(v)) is not _DROP}
        if isinstance(value, (list, tuple)):
            return [c for v in value if (c := clean(v)) is not _DROP]
        return value

    return clean(dict(config))


_DROP = object()


def train_run_config(cfg: Any) -> dict[str, Any]:
    """The W&B config of a centralized or local run (``TrainConfig``): the study's settings by name,
    minus paths, plus ``SHARED_CONFIG_KEYS`` named as in a federated job's config."""
    shared = {
        "kind": "centralized" if len(cfg.datalists) > 1 else "local",
        "epochs": cfg.epochs,
        "n_sites": len(cfg.datalists),
    }
    return sanitize_config({**cfg.study.flat(), "accelerator": cfg.accelerator, **shared})


def make_wandb_logger(cfg: Any, *, name: str | None = None) -> Any:
    """A Lightning ``WandbLogger`` for a ``TrainConfig`` run, or ``None`` when ``cfg.wandb == "off"``.

    Writes to ``cfg.out/wandb``. ``online`` without ``WANDB_API_KEY`` is refused (``ValueError``)
    rather than silently kept offline: the user asked for it where the run is.
    """
    mode = check_mode(getattr(cfg, "wandb", OFF))
    if mode == OFF:
        return None
    if mode == "online" and not online_allowed():
        raise ValueError(f"--wandb online needs {API_KEY_ENV} in the environment; use --wandb offline and `wandb sync` later")
    from pytorch_lightning.loggers import WandbLogger

    class _ConfigOnlyWandbLogger(WandbLogger):
        # Lightning would add the module's hyperparameters to the W&B config; the run config
        # already covers them, and keeping it to our keys keeps it comparable with federated runs.
        def log_hyperparams(self, params: Any) -> None:
            pass

    out = cfg.out
    out.mkdir(parents=True, exist_ok=True)
    config = train_run_config(cfg)
    return _ConfigOnlyWandbLogger(
        project=PROJECT,
        name=name or f"{config['kind']}-{out.name}",
        group=config["kind"],
        job_type=config["kind"],
        save_dir=str(out),  # wandb.init(dir=out) writes out/wandb/offline-run-*
        # mode goes straight to wandb.init: WandbLogger(offline=True) would set WANDB_MODE for the
        # whole process instead (pytorch_lightning/loggers/wandb.py, ``experiment``)
        mode=mode,
        config=config,
        settings=dict(PRIVATE_SETTINGS),
    )
