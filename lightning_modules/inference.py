"""Segment cases with a trained checkpoint and write label files on the source images' grid.

:func:`load_model` rebuilds the network of a ``SegmentationModule`` checkpoint (``TrainedNetwork``,
without Lightning) and the ``PreprocessConfig`` it was trained with (kept in the checkpoint's
hyper-parameters as ``preprocess``). :func:`predict_cases` runs each
case through the ``"predict"`` transforms (RAS, brain crop, normalisation, padding), sliding-window
inference on the whole volume, regions -> internal labels, and MONAI's ``Invertd``
(``transforms.build_inverse``) back onto the grid of the input files; the labels are then written
in the case's own convention (BraTS 2021 cases get 0/1/2/4, BraTS 2023 0/1/2/3, MSD 0/1/2/3 in its
order) as uint8 NIfTI with the affine and header of the case's first image file.

Output naming is the BraTS submission format: ``OUT/<case_id>.nii.gz``, which the BraTS evaluation
and ``fedseg score`` pair with the reference ``<case_id>[-_]seg.nii.gz`` by case id.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor

from fedseg.lightning_modules.data.datalist import MODALITIES, Case, DatalistError, safe_case_name
from fedseg.lightning_modules.data.transforms import (
    PreprocessConfig,
    build_inverse,
    build_transforms,
    case_to_item,
)
from fedseg.lightning_modules.labels import from_internal, internal_from_regions
from fedseg.lightning_modules.owner_only import owner_only_dir
from fedseg.lightning_modules.trained_network import TrainedNetwork

PREDICTION_SUFFIX = ".nii.gz"


class InferenceError(ValueError):
    """A checkpoint, case or output folder that inference cannot use (the message names it)."""


@dataclass
class LoadedModel:
    """A trained network in eval mode on ``device``, with the preprocessing it was trained with."""

    module: TrainedNetwork
    preprocess: PreprocessConfig
    device: torch.device
    checkpoint: Path

    @property
    def modalities(self) -> tuple[str, ...]:
        return self.preprocess.modalities

    @torch.inference_mode()
    def segment(self, image: torch.Tensor) -> torch.Tensor:
        """Boolean regions ``(3, *S)`` on the CPU for one preprocessed image ``(C, *S)``.

        Sliding windows of the training ROI over the whole volume (``TrainedNetwork.segment``).
        """
        image = torch.as_tensor(image).to(self.device, torch.float32)
        return self.module.segment(image[None])[0].cpu()


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` as a ``torch.device``; ``None`` = CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise InferenceError(f"unknown device {device!r} (use cpu or cuda)") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InferenceError(
            f"device cuda requested but torch {torch.__version__} sees no CUDA GPU; use --device cpu"
        )
    return resolved


def preprocess_from_hparams(
    hparams: dict[str, Any], checkpoint: Path, modalities: Sequence[str] | None = None
) -> PreprocessConfig:
    """The ``PreprocessConfig`` a checkpoint was trained with.

    Checkpoints written before ``SegmentationModule`` stored ``preprocess`` have none: their
    modalities must then be given (default: all four, in ``MODALITIES`` order) and the other
    settings are the defaults. Given ``modalities`` that contradict the checkpoint's are an error.
    """
    in_channels = int(hparams.get("in_channels", len(MODALITIES)))
    stored = hparams.get("preprocess")
    if stored:
        known = {f.name for f in dataclasses.fields(PreprocessConfig)}
        cfg = PreprocessConfig(**{k: v for k, v in dict(stored).items() if k in known})
        if modalities is not None and tuple(modalities) != cfg.modalities:
            raise InferenceError(
                f"{checkpoint}: the model was trained on modalities {list(cfg.modalities)}; "
                f"--modalities {list(modalities)} contradicts it (leave it out)"
            )
    else:
        chosen = tuple(modalities) if modalities is not None else MODALITIES
        try:
            cfg = PreprocessConfig(modalities=chosen, roi_size=tuple(hparams.get("roi_size", (128,) * 3)))
        except ValueError as err:
            raise InferenceError(f"--modalities: {err}") from None
    if cfg.in_channels != in_channels:
        fix = (
            "the checkpoint is inconsistent" if stored
            else f"pass the {in_channels} modalities it was trained on with --modalities, in training order"
        )
        raise InferenceError(
            f"{checkpoint}: the network takes {in_channels} input channels but the modalities "
            f"{list(cfg.modalities)} give {cfg.in_channels}; {fix}"
        )
    return cfg


def load_model(
    checkpoint: Path | str,
    *,
    device: str | torch.device | None = None,
    modalities: Sequence[str] | None = None,
) -> LoadedModel:
    """Load a ``SegmentationModule`` checkpoint (``fedseg train``'s ``best.ckpt`` / ``last.ckpt``)."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise InferenceError(f"{checkpoint}: checkpoint not found")
    target = resolve_device(device)
    try:
        # weights only: a checkpoint from elsewhere must not run code (fedseg.lightning_modules.safe_load)
        module = TrainedNetwork.from_checkpoint(checkpoint)
    except Exception as err:  # torch.load raises many types for foreign files
        first_line = (str(err).strip().splitlines() or [""])[0]  # torch.load's messages run long
        raise InferenceError(
            f"{checkpoint}: not a fedseg SegmentationModule checkpoint ({type(err).__name__}: {first_line})"
        ) from None
    module.eval().to(target)
    cfg = preprocess_from_hparams(dict(module.hparams), checkpoint, modalities)
    return LoadedModel(module, cfg, target, checkpoint)


# --------------------------------------------------------------------------------------------
# prediction


@dataclass(frozen=True)
class Prediction:
    """One written prediction: where, its grid and the label values it holds."""

    case_id: str
    path: Path
    shape: tuple[int, ...]
    convention: str
    voxels: dict[int, int]  # label value in the case's convention -> voxel count
    seconds: float


def prediction_path(out: Path | str, case_id: str) -> Path:
    """``OUT/<case_id>.nii.gz`` (BraTS submission naming); ``InferenceError`` for a case id that is
    not a plain file name (``safe_case_name``), so a prediction never lands outside ``OUT``."""
    try:
        name = safe_case_name(case_id)
    except DatalistError as err:
        raise InferenceError(f"cannot name a prediction after it: {err}") from None
    return Path(out) / f"{name}{PREDICTION_SUFFIX}"


def refuse_output_inside_inputs(out: Path | str, cases: Sequence[Case], root: Path | str) -> None:
    """Raise ``InferenceError`` when ``out`` is (inside) the data root or a folder holding inputs."""
    target = Path(out).expanduser().resolve()
    sources = {Path(root).resolve()} | {p.parent.resolve() for c in cases for p in c.paths(root)}
    for source in sorted(sources):
        if source == Path(source.anchor):  # "/" of a merged datalist says nothing
            continue
        if target == source or source in target.parents:
            raise InferenceError(f"output folder {out} is inside the input folder {source}; write elsewhere")


def reference_image(case: Case, root: Path | str) -> nib.Nifti1Image:
    """The case's first image file (header only is read): the grid predictions are written on."""
    path = Path(root) / case.images[0]
    try:
        return nib.load(path)
    except Exception as err:
        raise InferenceError(f"{path}: cannot read as NIfTI ({err})") from None


def write_label(labels: np.ndarray, reference: nib.Nifti1Image, path: Path) -> Path:
    """Write a uint8 label volume with ``reference``'s affine and header, atomically.

    The header is copied (qform/sform codes, units, descriptions) so that viewers overlay the
    label exactly on the input; intensity scaling is reset, as labels are stored as is.
    """
    header = reference.header.copy()
    image = nib.Nifti1Image(np.asarray(labels, dtype=np.uint8), reference.affine, header=header)
    image.set_data_dtype(np.uint8)
    image.header.set_slope_inter(1.0, 0.0)
    image.header["intent_code"] = 1002  # NIFTI_INTENT_LABEL
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=PREDICTION_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        nib.save(image, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


class CasePredictor:
    """Preprocess -> segment -> invert onto the source grid, for one case at a time.

    The transforms and their inverse are built once per model (MONAI's ``Invertd`` replays the
    inverse of the operations each item's ``image`` MetaTensor recorded).
    """

    def __init__(self, model: LoadedModel) -> None:
        self.model = model
        self.transforms = build_transforms(model.preprocess, "predict")
        self.inverse = build_inverse(self.transforms, "pred")

    def preprocess(self, case: Case, root: Path | str) -> dict[str, Any]:
        """The ``"predict"`` item of ``case``: ``image`` a MetaTensor ``(C, *S')`` (RAS, cropped, padded)."""
        item = case_to_item(case, root, self.model.modalities, with_label=False)
        try:
            return self.transforms(item)
        except Exception as err:  # MONAI wraps reader errors in RuntimeError with the transform chain
            raise InferenceError(f"case {case.case_id}: preprocessing failed: {root_cause(err)}") from err

    def to_source_grid(self, item: dict[str, Any], labels: torch.Tensor) -> np.ndarray:
        """Internal labels ``S'`` on the preprocessed grid of ``item["image"]`` -> uint8 labels on the
        grid of the source files (undoes padding, brain crop and RAS reorientation)."""
        # Invertd skips (with only a warning) a plain tensor: it must be a MetaTensor.
        inverted = self.inverse({**item, "pred": MetaTensor(labels[None].to(torch.uint8))})["pred"]
        return np.asarray(torch.as_tensor(inverted)[0].cpu().numpy(), dtype=np.uint8)

    def predict(self, case: Case, root: Path | str) -> np.ndarray:
        """uint8 labels of ``case`` in its own convention, on the grid of its image files."""
        item = self.preprocess(case, root)
        regions = self.model.segment(item["image"].as_tensor())
        internal = self.to_source_grid(item, internal_from_regions(regions))
        return from_internal(internal, case.convention)


def predict_cases(
    model: LoadedModel,
    cases: Sequence[Case],
    root: Path | str,
    out: Path | str,
    *,
    progress: Callable[[int, int, Prediction], None] | None = None,
) -> list[Prediction]:
    """Segment ``cases`` (paths under ``root``; labels unused) and write ``OUT/<case_id>.nii.gz``,
    owner-only (``OUT`` 0700, files 0600).

    Every case must have the model's modalities (checked before any work). ``out`` must not be
    inside the input data. ``progress(i, n, prediction)`` is called after each case.
    """
    if not cases:
        raise InferenceError(f"{root}: no cases to predict")
    refuse_output_inside_inputs(out, cases, root)
    for case in cases:  # every output name is checked before any work
        prediction_path(out, case.case_id)
    lacking = {c.case_id: [m for m in model.modalities if m not in c.modalities] for c in cases}
    lacking = {k: v for k, v in lacking.items() if v}
    if lacking:
        listed = "; ".join(f"{k} lacks {v}" for k, v in sorted(lacking.items()))
        raise InferenceError(f"the model needs modalities {list(model.modalities)}: {listed}")
    predictor = CasePredictor(model)
    owner_only_dir(out)  # predictions are patient data: folder 0700, files 0600 (mkstemp in write_label)
    written = []
    for i, case in enumerate(cases):
        start = time.perf_counter()
        reference = reference_image(case, root)
        labels = predictor.predict(case, root)
        if labels.shape != tuple(reference.shape[:3]):
            raise InferenceError(
                f"case {case.case_id}: restored prediction grid {labels.shape} differs from the input "
                f"{Path(root) / case.images[0]} grid {tuple(reference.shape[:3])}"
            )
        path = write_label(labels, reference, prediction_path(out, case.case_id))
        values, counts = np.unique(labels, return_counts=True)
        prediction = Prediction(
            case.case_id,
            path,
            tuple(labels.shape),
            case.convention,
            {int(v): int(n) for v, n in zip(values, counts)},
            time.perf_counter() - start,
        )
        written.append(prediction)
        if progress is not None:
            progress(i, len(cases), prediction)
    return written


def root_cause(err: BaseException) -> str:
    """The innermost error's message (MONAI nests the reader's error in 'applying transform ...')."""
    while err.__cause__ is not None:
        err = err.__cause__
    return f"{type(err).__name__}: {err}"
