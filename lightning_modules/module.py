"""`SegmentationModule`: the one LightningModule every fedseg run trains, centralized or federated.

It wraps a registry network (``fedseg.lightning_modules.networks``), the Dice + BCE loss, AdamW
with a cosine schedule, sliding-window validation on whole volumes and the region metrics. The
site script under NVFlare trains exactly this module, so centralized and federated runs are
comparable metric for metric.

Batches are dicts from ``SegDataModule``: ``image`` (B, C, *S) float, ``label`` (B, 3, *S) regions
in ``REGIONS`` order (ET, TC, WT), ``spacing`` (B, 3) mm, ``case_id`` (list of str).
Logged names are stable, as W&B and NVFlare model selection key on them: ``train_loss``,
``val_loss``, ``val_dice`` (mean of the regions), ``val_dice_et|tc|wt``, ``val_iou_*``,
``val_hd95_*``, ...
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from monai.losses import DiceLoss
from torch import nn

from fedseg.config import DataSettings, ModelSettings
from fedseg.lightning_modules.metrics import RegionMetrics
from fedseg.lightning_modules.networks import seeded_network
from fedseg.lightning_modules.trained_network import SW_BATCH_SIZE, SW_OVERLAP, THRESHOLD, WholeVolumeSegmentation


#: the study defaults (``fedseg.config``): the constructor's defaults are read from there
_MODEL, _DATA = ModelSettings(), DataSettings()


class DiceBCELoss(nn.Module):
    """Dice + binary cross-entropy on sigmoid outputs, for overlapping (multi-label) regions.

    MONAI's ``DiceCELoss`` applies softmax cross-entropy whenever there is more than one channel,
    which is wrong for the nested ET/TC/WT regions; so the two MONAI/torch losses are summed here.
    """

    def __init__(self, lambda_dice: float = 1.0, lambda_bce: float = 1.0) -> None:
        super().__init__()
        self.dice = DiceLoss(sigmoid=True, smooth_nr=1e-5, smooth_dr=1e-5)
        self.bce = nn.BCEWithLogitsLoss()
        self.lambda_dice, self.lambda_bce = lambda_dice, lambda_bce

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.lambda_dice * self.dice(logits, target) + self.lambda_bce * self.bce(logits, target)


class SegmentationModule(WholeVolumeSegmentation, pl.LightningModule):
    """3-D multi-region tumour segmentation: network + loss + optimizer + validation metrics.

    Args:
        network: registry name (``unet``, ``resunet``, ``attention_unet``, ``segresnet``,
            ``unetplusplus``).
        in_channels: number of input modalities.
        features: base width of the network.
        network_kwargs: further ``SegmentationNetwork`` arguments (e.g. ``{"norm": "batch"}``).
        lr, weight_decay: AdamW settings.
        max_epochs: length of the cosine schedule in epochs; ``None`` takes the Trainer's
            ``max_epochs`` (federated jobs pass rounds x local epochs).
        roi_size: sliding-window size for validation/inference (the training crop size).
        sw_batch_size, sw_overlap: sliding-window settings.
        threshold: sigmoid probability above which a voxel is in a region.
        hd95: compute HD95 during validation (the slowest metric on CPU).
        preprocess: the ``PreprocessConfig`` fields the module was trained with (modalities,
            normalization, ...), kept in the checkpoint so ``fedseg predict`` and ``evaluate``
            rebuild the same input pipeline.
        init_seed: seed of the network's initial weights (``None``: torch's global generator).
            Federated jobs set it so that the server's global model starts the same in every run
            and every method of a comparison; the global generator is left as it was.
    """

    def __init__(
        self,
        network: str = _MODEL.network,
        in_channels: int = len(_DATA.modalities),
        features: int = _MODEL.features,
        network_kwargs: dict[str, Any] | None = None,
        lr: float = _MODEL.lr,
        weight_decay: float = _MODEL.weight_decay,
        max_epochs: int | None = None,
        roi_size: Sequence[int] = _DATA.roi,
        sw_batch_size: int = SW_BATCH_SIZE,
        sw_overlap: float = SW_OVERLAP,
        threshold: float = THRESHOLD,
        hd95: bool = _MODEL.hd95,
        preprocess: dict[str, Any] | None = None,
        init_seed: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.network = seeded_network(network, in_channels, features, network_kwargs, init_seed)
        self.loss = DiceBCELoss()
        #: epochs of the cosine schedule already spent before this process trained, e.g. the rounds a
        #: federated study did before it was resumed in a new job. Runtime state, not a hyperparameter.
        self.schedule_offset = 0
        metrics = ("dice", "iou", "precision", "recall", "vs") + (("hd95",) if hd95 else ())
        self.val_metrics = RegionMetrics(metrics=metrics)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        logits = self(batch["image"])
        loss = self.loss(logits, batch["label"])
        # sync_dist: a site on several devices logs its own loss, not rank 0's shard's (a no-op on one)
        self.log("train_loss", loss, prog_bar=True, on_step=False, on_epoch=True, batch_size=len(logits),
                 sync_dist=True)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        logits = self.predict_logits(batch["image"])
        target = batch["label"]
        self.log("val_loss", self.loss(logits, target), on_epoch=True, batch_size=len(logits), sync_dist=True)
        pred = torch.sigmoid(logits) > self.hparams.threshold
        self.val_metrics.update(pred, target > 0.5, spacing=batch.get("spacing"))

    def on_validation_epoch_end(self) -> None:
        if not self.val_metrics.update_called:  # no validation data (e.g. a site with none)
            return
        logged = {f"val_{name}": value for name, value in self.val_metrics.compute().items()}
        self.log("val_dice", logged.pop("val_dice"), prog_bar=True)
        self.log_dict(logged)
        self.val_metrics.reset()

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        t_max = self.hparams.max_epochs or (self.trainer.max_epochs if self.trainer else None) or 100
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(int(t_max), 1))
        if self.schedule_offset:
            # Continue the schedule where the earlier epochs left it instead of restarting at the full
            # rate. Stepping it reproduces CosineAnnealingLR's own (recursive) values exactly; no
            # optimizer step has happened yet, which torch warns about and which is intended here.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
                for _ in range(int(self.schedule_offset)):
                    scheduler.step()
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
