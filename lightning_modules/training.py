"""Centralized and local-only training: datalist(s) in, a run folder with checkpoints out.

A run folder has the same shape for every kind of run, so that ``fedseg compare`` and a reader
without the tool can open it::

    RUN/config.json              what was run (TrainConfig)
    RUN/checkpoints/last.ckpt    resumes an interrupted run (written atomically by Lightning)
    RUN/checkpoints/best.ckpt    best by val_dice
    RUN/metrics.csv              one row per epoch, kept across resumes (history.MetricsHistory)
    RUN/curves.png               loss and Dice curves
    RUN/results.json             best val_dice, epochs done, checkpoint paths
    RUN/wandb/offline-run-*      W&B run, with ``wandb="offline"`` (``lightning_modules.tracking``)
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from fedseg.config import MODALITIES, StudyConfig, TrainSettings
from fedseg.lightning_modules.data.datalist import Datalist, merge_datalists, read_datalist, write_json_atomic
from fedseg.lightning_modules.owner_only import owner_only_dir, owner_only_files
from fedseg.lightning_modules.history import EpochLines, MetricsHistory, plot_curves, read_rows
from fedseg.lightning_modules.tracking import make_wandb_logger


#: ``fedseg train``'s options when none is given: the one place of their defaults and help
_TRAIN_DEFAULTS = TrainSettings()


@dataclass
class TrainConfig:
    """A centralized or local-only run: which datalists, where to, the study settings
    (``fedseg.config.StudyConfig``) and the run's own settings (``fedseg.config.TrainSettings``,
    where their defaults and meaning are written); saved as ``config.json`` in the run folder."""

    datalists: list[Path]
    out: Path
    study: StudyConfig = field(default_factory=StudyConfig)
    #: None: the study's budget, rounds x local epochs
    epochs: int | None = _TRAIN_DEFAULTS.epochs
    data_root: Path | None = _TRAIN_DEFAULTS.data_root
    accelerator: str = _TRAIN_DEFAULTS.accelerator
    cache_dir: Path | None = _TRAIN_DEFAULTS.cache_dir
    check_data: bool = True
    progress: bool = True
    #: W&B tracking: "off", "offline" (RUN/wandb, upload later with `wandb sync`) or "online"
    wandb: str = _TRAIN_DEFAULTS.wandb
    #: start from this checkpoint's weights (fine-tuning), not the seeded initial model
    init_from: Path | None = _TRAIN_DEFAULTS.init_from

    @classmethod
    def from_settings(cls, datalists: Sequence[Path], out: Path, study: StudyConfig,
                      settings: TrainSettings) -> TrainConfig:
        """The run ``fedseg train`` describes: its datalists, run folder, study and own settings."""
        return cls(datalists=list(datalists), out=out, study=study, **dataclasses.asdict(settings))

    def __post_init__(self) -> None:
        if self.epochs is None:
            self.epochs = self.study.epochs
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")

    def to_json(self) -> dict[str, Any]:
        doc = {k: v for k, v in dataclasses.asdict(self).items() if k != "study"}
        return json.loads(json.dumps({**doc, "study": self.study.to_json()}, default=str))


def load_training_data(cfg: TrainConfig) -> Datalist:
    """One site's datalist, or the union of several (centralized training)."""
    datalists = [read_datalist(p, cfg.data_root) for p in cfg.datalists]
    return datalists[0] if len(datalists) == 1 else merge_datalists(datalists)


def make_trainer(
    out: Path,
    max_epochs: int,
    *,
    accelerator: str = "auto",
    callbacks: list[pl.Callback] | None = None,
    logger: Any = None,
    progress: bool = True,
    ranks: Any = None,
    **kwargs: Any,
) -> pl.Trainer:
    """A Trainer with fedseg's defaults: mixed precision only where a GPU is present.

    ``ranks``: one rank of a site that trains on several devices (``fedseg.app.multi_device.RankEnvironment``,
    its processes started by the site, not by Lightning): Lightning's DDP over ``ranks.world_size()``
    devices, gloo on CPUs, NCCL on GPUs. None: one device.
    """
    on_gpu = torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda")
    devices: Any = 1
    if ranks is not None and ranks.world_size() > 1:
        from pytorch_lightning.strategies import DDPStrategy

        accelerator = "gpu" if on_gpu else "cpu"
        devices = ranks.world_size()
        # find_unused_parameters: FedRep freezes the head or the encoder within a fit
        kwargs["strategy"] = DDPStrategy(cluster_environment=ranks, process_group_backend="nccl" if on_gpu else "gloo",
                                         find_unused_parameters=True)
    return pl.Trainer(
        default_root_dir=out,
        max_epochs=max_epochs,
        accelerator=accelerator,
        devices=devices,
        precision="16-mixed" if on_gpu else "32-true",
        callbacks=callbacks or [],
        logger=logger if logger is not None else False,
        enable_progress_bar=progress,
        enable_model_summary=False,
        log_every_n_steps=1,
        **kwargs,
    )


def build_module(cfg: TrainConfig) -> Any:
    """The run's ``SegmentationModule``: the study's, with the cosine schedule over ``cfg.epochs``."""
    from fedseg.lightning_modules.module import SegmentationModule

    module = SegmentationModule(**{**cfg.study.module_args(), "max_epochs": cfg.epochs})
    if cfg.init_from is not None:
        from fedseg.lightning_modules.safe_load import load_checkpoint

        saved = load_checkpoint(cfg.init_from)
        module.load_state_dict(saved.get("state_dict", saved), strict=True)
    return module


def build_datamodule(study: StudyConfig, datalist: Datalist, cache_dir: Path | None) -> Any:
    """The ``SegDataModule`` of ``datalist`` with the study's preprocessing and loader settings
    (every site and every centralized or local run build it this way)."""
    from fedseg.lightning_modules.data.datamodule import DataConfig, SegDataModule
    from fedseg.lightning_modules.data.transforms import PreprocessConfig

    d = study.data
    preprocess = PreprocessConfig(modalities=d.modalities, roi_size=d.roi, normalization=d.normalization)
    return SegDataModule(datalist, DataConfig(preprocess=preprocess, batch_size=d.batch_size,
                                              num_workers=d.num_workers, cache_dir=cache_dir))


def train(cfg: TrainConfig, loggers: list[Any] | None = None, console: Any = None) -> dict[str, Any]:
    """Train (or resume from ``checkpoints/last.ckpt``) a run; returns ``results.json``'s contents.

    ``loggers`` are extra Lightning loggers (e.g. W&B); the run folder's own files need none.
    ``console``: where one progress line per epoch goes (``fedseg.run.console.Console``) instead of
    Lightning's progress bar.
    """
    # Checkpoints, metrics and curves come from patients' images: the run folder is owner-only
    # (0700) and everything written in it, by Lightning and W&B too, 0600 / 0700.
    owner_only_dir(cfg.out)
    with owner_only_files():
        return _train(cfg, loggers, console)


def _train(cfg: TrainConfig, loggers: list[Any] | None, console: Any) -> dict[str, Any]:
    pl.seed_everything(cfg.study.seed, workers=True)
    datalist = load_training_data(cfg)
    if not datalist.training:
        raise ValueError(f"no training cases in {', '.join(map(str, cfg.datalists))}")
    if cfg.check_data:
        refuse_unchecked_data(datalist, cfg.datalists[0], cfg.study.data.modalities)
    write_json_atomic(cfg.out / "config.json", cfg.to_json())
    wandb_logger = make_wandb_logger(cfg)
    loggers = [*(loggers or []), *([wandb_logger] if wandb_logger is not None else [])]

    ckpt_dir = cfg.out / "checkpoints"
    best = ModelCheckpoint(
        dirpath=ckpt_dir, filename="best", monitor="val_dice", mode="max", save_last=True, save_top_k=1
    )
    callbacks: list[Any] = [best, MetricsHistory(cfg.out / "metrics.csv")]
    if console is not None:
        callbacks.append(EpochLines(console.print, every=max(1, cfg.epochs // 10)))
    trainer = make_trainer(
        cfg.out,
        cfg.epochs,
        accelerator=cfg.accelerator,
        callbacks=callbacks,
        logger=loggers or False,
        progress=cfg.progress and console is None,
    )
    last = ckpt_dir / "last.ckpt"
    if wandb_logger is not None:  # the case count a federated site's W&B run carries per round
        wandb_logger.log_metrics({"n_train_cases": len(datalist.training)}, step=0)
    try:
        datamodule = build_datamodule(cfg.study, datalist, cfg.cache_dir or cfg.out / "cache")
        trainer.fit(build_module(cfg), datamodule=datamodule, ckpt_path=last if last.exists() else None)
    finally:
        if wandb_logger is not None:
            # WandbLogger leaves its run open (a later WandbLogger in this process would reuse it)
            wandb_logger.experiment.finish()
    results = {
        "kind": "centralized" if len(cfg.datalists) > 1 else "local",
        "epochs_done": trainer.current_epoch,
        "best_val_dice": float(best.best_model_score) if best.best_model_score is not None else None,
        "best_checkpoint": str(best.best_model_path) if best.best_model_path else None,
        "last_checkpoint": str(last) if last.exists() else None,
        "n_train_cases": len(datalist.training),
        "n_val_cases": len(datalist.validation),
    }
    write_json_atomic(cfg.out / "results.json", results)
    plot_curves(read_rows(cfg.out / "metrics.csv"), cfg.out / "curves.png", title=f"{results['kind']} training")
    return results


def refuse_unchecked_data(datalist: Datalist, source: Path, modalities: Sequence[str] = MODALITIES) -> None:
    """Raise ``DatasetCheckError`` (the full report) when the cases fail ``fedseg data check``
    for ``modalities`` (the ones the run uses)."""
    from fedseg.lightning_modules.data.check import DatasetCheckError, check_cases

    report = check_cases(datalist.cases, datalist.data_root, source=source, modalities=modalities)
    if not report.ok:
        raise DatasetCheckError(report)
