"""Export the network of a checkpoint for deployment without fedseg: TorchScript, ONNX or torch.export.

The exported model is the bare network: image ``(B, C, X, Y, Z)`` float32 -> logits
``(B, 3, X, Y, Z)``, channels in ``REGIONS`` order (ET, TC, WT); a voxel is in a region where
``sigmoid(logit) > threshold``. ``C`` = the training modalities, in training order, preprocessed as
in training (RAS, brain crop, per-channel z-score over the brain, ...); spatial sizes must be
multiples of the network's ``size_divisor``. Sliding windows and the pre/post-processing are the
deployer's job. These facts travel with the file as ``fedseg.json`` metadata (TorchScript: an
extra file; ONNX: ``metadata_props``; torch.export: the archive's extra file).

=============  ==================================  ============================================
format         how                                 dynamic shapes
=============  ==================================  ============================================
torchscript    ``torch.jit.trace`` on (1, C, *roi)  any batch and spatial size (the convolutions
                                                   are shape-agnostic; the input checks of the
                                                   Python ``forward`` are not kept)
onnx           ``torch.onnx.export(dynamo=True)``  batch, and spatial sizes as multiples of
               (needs ``onnx`` and ``onnxscript``)  ``size_divisor``
pt2            ``torch.export.export`` + ``save``   as onnx
=============  ==================================  ============================================

``torch.jit`` is deprecated upstream (torch 2.13 warns on trace and load); ``pt2`` is its
successor and loads with ``torch.export.load(path).module()``. Every export is checked against
the PyTorch network on the example input and on a second, differently shaped one.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedseg.lightning_modules.inference import LoadedModel, load_model
from fedseg.lightning_modules.labels import REGIONS

FORMATS: tuple[str, ...] = ("torchscript", "onnx", "pt2")
METADATA_NAME = "fedseg.json"
#: what to install for each format's optional packages (module -> pip package)
ONNX_PACKAGES: dict[str, str] = {"onnx": "onnx", "onnxscript": "onnxscript"}


class ExportError(ValueError):
    """An export that cannot be done or does not reproduce the PyTorch network."""


@dataclass(frozen=True)
class ExportResult:
    """The exported file and how well it reproduces the PyTorch network."""

    path: Path
    format: str
    example_shape: tuple[int, ...]
    checked_shapes: tuple[tuple[int, ...], ...]
    max_abs_diff: float | None  # None: could not be run here (e.g. no onnxruntime)
    note: str = ""


def metadata(model: LoadedModel) -> dict[str, Any]:
    """What a deployer needs to feed the exported network and read its output."""
    h = model.module.hparams
    return {
        "producer": "fedseg",
        "checkpoint": str(model.checkpoint),
        "network": h.network,
        "in_channels": int(h.in_channels),
        "modalities": list(model.modalities),
        "preprocess": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(model.preprocess).items()},
        "outputs": list(REGIONS),
        "output_activation": "sigmoid",
        "threshold": float(h.threshold),
        "roi_size": [int(s) for s in h.roi_size],
        "size_divisor": int(model.module.network.size_divisor),
        "input": "float32 (B, C, X, Y, Z), X/Y/Z multiples of size_divisor; RAS, preprocessed as in training",
    }


def example_input(model: LoadedModel, batch: int = 1, spatial: tuple[int, ...] | None = None) -> torch.Tensor:
    """A fixed random image ``(batch, C, *spatial)`` (default: the training ROI) on the CPU."""
    spatial = tuple(spatial or model.module.hparams.roi_size)
    generator = torch.Generator().manual_seed(0)
    return torch.randn((batch, model.preprocess.in_channels, *spatial), generator=generator)


def check_shape(model: LoadedModel) -> tuple[int, ...]:
    """A second input shape, unlike the example's: batch 2, each spatial size plus ``size_divisor``
    (plus twice on the last axis), so a shape baked into the export shows up as a failure."""
    d = int(model.module.network.size_divisor)
    roi = [int(s) for s in model.module.hparams.roi_size]
    return (2, model.preprocess.in_channels, roi[0] + d, roi[1] + d, roi[2] + 2 * d)


def _dynamic_shapes(model: LoadedModel) -> dict[str, dict[int, Any]]:
    """torch.export shapes: any batch; spatial sizes ``size_divisor * k`` (the network's check
    ``size % divisor`` then holds symbolically, so export needs no guard on it). Traced on a batch
    of 2: torch.export specialises a size-1 dimension to a constant."""
    from torch.export import Dim

    d = int(model.module.network.size_divisor)
    spatial = {axis: d * Dim(f"{name}_blocks", min=1) for axis, name in zip((2, 3, 4), "xyz")}
    return {"x": {0: Dim("batch", min=1), **spatial}}


def _atomic_target(out: Path) -> tuple[Path, Callable[[], None]]:
    """A temporary path beside ``out`` and a function that moves it into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=out.suffix, dir=out.parent)
    os.close(fd)
    return Path(tmp), lambda: os.replace(tmp, out)


def export_torchscript(model: LoadedModel, out: Path) -> Path:
    """Trace the network on the example input and save it with its metadata."""
    network = model.module.network.eval()
    with warnings.catch_warnings(), torch.no_grad():
        # forward()'s input checks turn into constants when traced (TracerWarning): expected.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        traced = torch.jit.trace(network, example_input(model))
    tmp, commit = _atomic_target(out)
    try:
        torch.jit.save(traced, str(tmp), _extra_files={METADATA_NAME: json.dumps(metadata(model))})
        commit()
    finally:
        tmp.unlink(missing_ok=True)
    return out


def require_onnx() -> None:
    """Raise ``ExportError`` naming the packages to install when ONNX export cannot run."""
    import importlib.util

    missing = [pkg for module, pkg in ONNX_PACKAGES.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise ExportError(
            f"ONNX export needs the Python package(s) {', '.join(missing)}, which are not installed: "
            f"pip install {' '.join(missing)} (onnxruntime too, to check the exported model); "
            "or export --format torchscript / pt2"
        )


def export_onnx(model: LoadedModel, out: Path) -> Path:
    """Export with the torch.export-based ONNX exporter (dynamic batch and spatial sizes)."""
    require_onnx()
    import onnx

    network = model.module.network.eval()
    tmp, commit = _atomic_target(out)
    try:
        program = torch.onnx.export(
            network,
            (example_input(model, batch=2),),
            dynamo=True,
            dynamic_shapes=_dynamic_shapes(model),
            input_names=["image"],
            output_names=["logits"],
            verbose=False,
        )
        program.save(str(tmp))
        proto = onnx.load(str(tmp))
        entry = proto.metadata_props.add()
        entry.key, entry.value = METADATA_NAME, json.dumps(metadata(model))
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
        commit()
    finally:
        tmp.unlink(missing_ok=True)
    return out


def export_pt2(model: LoadedModel, out: Path) -> Path:
    """``torch.export`` program (dynamic batch and spatial sizes) saved as a ``.pt2`` archive."""
    network = model.module.network.eval()
    program = torch.export.export(network, (example_input(model, batch=2),), dynamic_shapes=_dynamic_shapes(model))
    tmp, commit = _atomic_target(out)
    try:
        torch.export.save(program, str(tmp), extra_files={METADATA_NAME: json.dumps(metadata(model))})
        commit()
    finally:
        tmp.unlink(missing_ok=True)
    return out


def load_exported(path: Path, fmt: str) -> Callable[[np.ndarray], np.ndarray] | None:
    """A numpy-in, numpy-out runner of an exported file; None when it cannot be run here."""
    if fmt == "torchscript":
        loaded = torch.jit.load(str(path), map_location="cpu")
    elif fmt == "pt2":
        loaded = torch.export.load(str(path)).module()
    elif fmt == "onnx":
        try:
            import onnxruntime
        except ImportError:
            return None
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: session.run(None, {name: x})[0]
    else:
        raise ExportError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return loaded(torch.from_numpy(x)).numpy()

    return run


def verify_export(
    model: LoadedModel, path: Path, fmt: str, *, atol: float = 1e-4
) -> tuple[float | None, tuple[tuple[int, ...], ...]]:
    """Largest |exported - PyTorch| logit difference over the example and the check input.

    Raises ``ExportError`` beyond ``atol``; returns ``(None, ())`` when the format cannot be run here.
    """
    runner = load_exported(path, fmt)
    if runner is None:
        return None, ()
    network = model.module.network.eval()
    inputs = [example_input(model), example_input(model, *_split(check_shape(model)))]
    worst = 0.0
    for x in inputs:
        with torch.no_grad():
            expected = network(x).numpy()
        got = runner(x.numpy())
        if got.shape != expected.shape:
            raise ExportError(f"{path}: output shape {got.shape} for input {tuple(x.shape)}, expected {expected.shape}")
        worst = max(worst, float(np.abs(got - expected).max()))
    if not worst <= atol:
        raise ExportError(f"{path}: exported {fmt} model differs from the PyTorch network by {worst:.3g} (> {atol})")
    return worst, tuple(tuple(x.shape) for x in inputs)


def _split(shape: tuple[int, ...]) -> tuple[int, tuple[int, ...]]:
    return shape[0], tuple(shape[2:])


def export_checkpoint(
    checkpoint: Path | str, fmt: str, out: Path | str, *, verify: bool = True, atol: float = 1e-4
) -> ExportResult:
    """Export the network of ``checkpoint`` to ``out`` in ``fmt`` (one of :data:`FORMATS`) and check it."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    if fmt == "onnx":
        require_onnx()  # before loading anything
    out = Path(out)
    if out.is_dir():
        raise ExportError(f"{out}: is a folder; give the file to write")
    model = load_model(checkpoint, device="cpu")  # a portable artefact: traced and checked on the CPU
    exporter = {"torchscript": export_torchscript, "onnx": export_onnx, "pt2": export_pt2}[fmt]
    exporter(model, out)
    diff, shapes, note = None, (), "not verified"
    if verify:
        diff, shapes = verify_export(model, out, fmt, atol=atol)
        if diff is None:
            note = "not verified: install onnxruntime to run the ONNX model"
        else:
            note = f"max |logit difference| vs PyTorch {diff:.2e} on inputs {', '.join(map(str, shapes))}"
    return ExportResult(out, fmt, tuple(example_input(model).shape), shapes, diff, note)
