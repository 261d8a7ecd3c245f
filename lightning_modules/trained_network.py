"""A trained fedseg checkpoint as a plain network, for inference without PyTorch Lightning.

``fedseg predict``, ``evaluate`` and ``export`` only run the network: ``TrainedNetwork`` reads a
``SegmentationModule`` checkpoint (safely: ``safe_load``), rebuilds the network from its
hyperparameters and segments whole volumes with the same sliding windows as the module's
validation (``sliding_window_logits``). Importing Lightning costs a CPU process 2-3 s (it pulls in
``torch._dynamo``), as much as a U-Net needs for a whole case's windows; this module avoids it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from monai.inferers import sliding_window_inference
from torch import nn

from fedseg.config import DataSettings, ModelSettings
from fedseg.lightning_modules.networks import SegmentationNetwork, seeded_network

#: sliding-window inference settings of ``SegmentationModule`` (written here once, without Lightning)
SW_BATCH_SIZE = 1
SW_OVERLAP = 0.25
#: sigmoid probability above which a voxel is in a region
THRESHOLD = 0.5

_MODEL, _DATA = ModelSettings(), DataSettings()
#: what ``SegmentationModule`` takes when a checkpoint's hyperparameters leave an argument out
_DEFAULTS: dict[str, Any] = {
    "network": _MODEL.network, "in_channels": len(_DATA.modalities), "features": _MODEL.features,
    "network_kwargs": None, "roi_size": _DATA.roi, "sw_batch_size": SW_BATCH_SIZE, "sw_overlap": SW_OVERLAP,
    "threshold": THRESHOLD,
}  # fmt: skip


def sliding_window_logits(network: nn.Module, image: torch.Tensor, roi_size: Sequence[int],
                          sw_batch_size: int = SW_BATCH_SIZE, overlap: float = SW_OVERLAP) -> torch.Tensor:
    """Logits ``(B, 3, *S)`` of ``network`` over a whole volume ``(B, C, *S)`` of any size:
    Gaussian-weighted windows of ``roi_size`` (MONAI's ``sliding_window_inference``)."""
    return sliding_window_inference(image, roi_size=tuple(roi_size), sw_batch_size=sw_batch_size, predictor=network,
                                    overlap=overlap, mode="gaussian")


class WholeVolumeSegmentation:
    """``forward``, ``predict_logits`` and ``segment`` for a module with a ``network`` and ``hparams``
    (``roi_size``, ``sw_batch_size``, ``sw_overlap``, ``threshold``): ``SegmentationModule`` for
    validation, ``TrainedNetwork`` for inference."""

    network: nn.Module
    hparams: Any

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, 3, *S)`` for an image ``(B, C, *S)`` the size of a window."""
        return self.network(image)

    def predict_logits(self, image: torch.Tensor) -> torch.Tensor:
        """Sliding-window logits over a whole volume of any size ``(B, C, *S)`` -> ``(B, 3, *S)``."""
        h = self.hparams
        return sliding_window_logits(self.network, image, h.roi_size, h.sw_batch_size, h.sw_overlap)

    def segment(self, image: torch.Tensor) -> torch.Tensor:
        """Boolean regions ``(B, 3, *S)`` for an image ``(B, C, *S)``."""
        return torch.sigmoid(self.predict_logits(image)) > self.hparams.threshold


class Hyperparameters(dict):
    """A checkpoint's hyperparameters, readable as attributes (``hparams.roi_size``) like Lightning's."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class CheckpointMismatch(ValueError):
    """A checkpoint that is not a whole fedseg ``SegmentationModule`` (the message says why)."""


class TrainedNetwork(WholeVolumeSegmentation, nn.Module):
    """The network of a trained ``SegmentationModule`` and the hyperparameters it was trained with.

    Args:
        network: the study network with its trained weights.
        hparams: the module's hyperparameters (``roi_size``, ``threshold``, ``preprocess``, ...).
    """

    def __init__(self, network: SegmentationNetwork, hparams: dict[str, Any]) -> None:
        super().__init__()
        self.network = network
        self.hparams = Hyperparameters({**_DEFAULTS, **hparams})

    @classmethod
    def from_checkpoint(cls, path: Path | str) -> TrainedNetwork:
        """Read a ``SegmentationModule`` checkpoint on the CPU without running code from it."""
        from fedseg.lightning_modules.safe_load import load_checkpoint

        doc = load_checkpoint(path)
        if not isinstance(doc, dict) or not isinstance(doc.get("state_dict"), dict):
            raise CheckpointMismatch("no state_dict in it")
        h = {**_DEFAULTS, **dict(doc.get("hyper_parameters") or {})}
        network = seeded_network(h["network"], h["in_channels"], h["features"], h["network_kwargs"], init_seed=None)
        state = {k.removeprefix("network."): v for k, v in doc["state_dict"].items() if k.startswith("network.")}
        missing, unexpected = network.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise CheckpointMismatch(f"its weights do not fit a {h['network']} network with {h['features']} features "
                                     f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
        return cls(network, h)
