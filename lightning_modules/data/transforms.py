"""MONAI preprocessing for fedseg: from a datalist ``Case`` to network-ready tensors.

One ``Compose`` per stage, built by :func:`build_transforms`. Every stage runs the same
deterministic steps first (load, pick modalities, RAS, brain crop, labels -> regions, normalise,
pad); ``"train"`` then adds random crops and augmentation. Random transforms come strictly after
the deterministic ones so that ``monai.data.PersistentDataset`` can cache everything before them on
disk (see ``datamodule.py``).

Output of ``"train"`` / ``"val"`` (one item, before batching)::

    image    float32 (C, *S)   C = len(cfg.modalities), in cfg.modalities order, RAS
    label    float32 (3, *S)   regions ET/TC/WT (fedseg.lightning_modules.labels.REGIONS)
    spacing  float32 (3,)      voxel size in mm along the RAS axes (for HD95)
    case_id, convention        str

``"train"`` gives ``S == cfg.roi_size`` (a list of ``samples_per_volume`` crops per case);
``"val"`` gives the whole foreground-cropped volume padded to a multiple of ``cfg.pad_multiple``
(for sliding-window inference). ``"predict"`` loads no label and keeps ``image`` a ``MetaTensor``
so that :func:`build_inverse` can map a prediction back onto the source file's grid.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from monai.data import MetaTensor
from monai.data.utils import affine_to_spacing
from monai.transforms import (
    Compose,
    CropForegroundd,
    DeleteItemsd,
    DivisiblePadd,
    EnsureChannelFirstd,
    Invertd,
    LoadImaged,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropSamplesd,
    ScaleIntensityd,
    SpatialPadd,
)

from fedseg.config import NORMALIZATIONS, DataSettings
from fedseg.lightning_modules.data.datalist import MODALITIES, Case, DatalistError
from fedseg.lightning_modules.labels import LabelError, regions_from_internal, to_internal

Stage = Literal["train", "val", "predict"]
STAGES: tuple[str, ...] = ("train", "val", "predict")
_DATA = DataSettings()  # the study defaults (fedseg.config) of the fields it shares
CROP_SAMPLERS: tuple[str, ...] = ("posneg", "random")

#: Part of every item, hence of every disk-cache key: bump it when the code of the deterministic
#: steps changes in a way their settings do not show (settings are hashed by PersistentDataset).
PIPELINE_VERSION = 1
#: keys of the input item that only feed the cache key or the modality pick; dropped after use
_INPUT_ONLY_KEYS = ("modalities", "source_stamp", "pipeline_version")


@dataclass(frozen=True)
class PreprocessConfig:
    """Settings of the preprocessing pipeline (all of them enter the disk-cache key).

    ``modalities`` are the input channels, in this order (a subset of ``MODALITIES``).
    ``normalization``: ``"zscore"`` per channel over non-zero (brain) voxels, or ``"minmax"`` per
    channel to [0, 1]. ``crop_sampler``: ``"posneg"`` centres half of the training crops on tumour
    (``RandCropByPosNegLabeld``, pos = neg = 1), ``"random"`` crops uniformly.
    """

    modalities: tuple[str, ...] = _DATA.modalities
    roi_size: tuple[int, int, int] = _DATA.roi
    normalization: Literal["zscore", "minmax"] = _DATA.normalization  # type: ignore[assignment]
    crop_foreground: bool = True
    pad_multiple: int = 16
    crop_sampler: Literal["posneg", "random"] = "posneg"
    flip_prob: float = 0.5
    intensity_scale_prob: float = 1.0
    intensity_scale_factor: float = 0.1
    intensity_shift_prob: float = 1.0
    intensity_shift_offset: float = 0.1

    def __post_init__(self) -> None:
        # accept lists (from JSON / YAML configs) but store tuples, so the config stays hashable
        object.__setattr__(self, "modalities", tuple(self.modalities))
        object.__setattr__(self, "roi_size", tuple(int(s) for s in self.roi_size))
        if not self.modalities:
            raise ValueError("PreprocessConfig.modalities is empty")
        unknown = [m for m in self.modalities if m not in MODALITIES]
        if unknown:
            raise ValueError(f"PreprocessConfig.modalities: unknown {unknown}; known: {MODALITIES}")
        if len(set(self.modalities)) != len(self.modalities):
            raise ValueError(f"PreprocessConfig.modalities has duplicates: {self.modalities}")
        if len(self.roi_size) != 3 or min(self.roi_size) < 1:
            raise ValueError(f"PreprocessConfig.roi_size must be 3 positive ints, got {self.roi_size}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"PreprocessConfig.normalization {self.normalization!r}; known: {NORMALIZATIONS}")
        if self.crop_sampler not in CROP_SAMPLERS:
            raise ValueError(f"PreprocessConfig.crop_sampler {self.crop_sampler!r}; known: {CROP_SAMPLERS}")
        if self.pad_multiple < 1:
            raise ValueError(f"PreprocessConfig.pad_multiple must be >= 1, got {self.pad_multiple}")
        for name in ("flip_prob", "intensity_scale_prob", "intensity_shift_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"PreprocessConfig.{name} must be in [0, 1], got {getattr(self, name)}")

    @property
    def in_channels(self) -> int:
        return len(self.modalities)


def source_stamp(paths: Sequence[Path]) -> str:
    """``size:mtime_ns`` of each file, joined: part of the item so a changed source re-caches.

    Raises ``FileNotFoundError`` naming a missing file.
    """
    parts = []
    for path in paths:
        try:
            st = Path(path).stat()
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: file not found") from None
        parts.append(f"{st.st_size}:{st.st_mtime_ns}")
    return ";".join(parts)


def case_to_item(
    case: Case, root: Path | str, modalities: Sequence[str] | None = None, *, with_label: bool = True
) -> dict[str, Any]:
    """The MONAI data dict of ``case``: absolute paths plus what the transforms need.

    With ``modalities`` (and one file per modality) only those files are listed, in that order,
    so unused modalities are never decoded; a 4-D file is always listed whole. The ``source_stamp``
    (size and mtime of every listed file) makes ``PersistentDataset``'s item hash change when a
    source file does. ``with_label=False`` (prediction) leaves the label out.
    """
    root = Path(root)
    if case.is_4d:
        image: str | list[str] = str((root / case.images[0]).absolute())
        listed = list(case.modalities)
    else:
        wanted = list(modalities) if modalities is not None else list(case.modalities)
        missing = [m for m in wanted if m not in case.modalities]
        if missing:
            raise DatalistError(f"case {case.case_id}: has no {missing} (it has {list(case.modalities)})")
        image = [str(case.image_path(m, root).absolute()) for m in wanted]
        listed = wanted
    item: dict[str, Any] = {
        "image": image,
        "case_id": case.case_id,
        "convention": case.convention,
        "modalities": listed,
    }
    files = [Path(p) for p in ([image] if isinstance(image, str) else image)]
    if with_label:
        if case.label is None:
            raise DatalistError(f"case {case.case_id}: no label file (needed for training/validation)")
        item["label"] = str((root / case.label).absolute())
        files.append(Path(item["label"]))
    item["source_stamp"] = source_stamp(files)
    item["pipeline_version"] = PIPELINE_VERSION
    return item


def _filename(x: Any) -> str:
    meta = getattr(x, "meta", {})
    name = meta.get("filename_or_obj", "?")
    return str(name[0] if isinstance(name, (list, tuple)) and name else name)


class SelectModalitiesd(MapTransform):
    """Keep the channels of ``image`` named by ``modalities``, in that order.

    ``item["modalities"]`` names the loaded channels (``case_to_item`` sets it).
    """

    def __init__(self, modalities: Sequence[str], keys: str = "image", modalities_key: str = "modalities"):
        super().__init__(keys)
        self.modalities = tuple(modalities)
        self.modalities_key = modalities_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        have = list(d[self.modalities_key])
        for key in self.key_iterator(d):
            img = d[key]
            if img.shape[0] != len(have):
                raise DatalistError(
                    f"{_filename(img)}: {img.shape[0]} channels loaded but the datalist names "
                    f"{len(have)} modalities {have}"
                )
            missing = [m for m in self.modalities if m not in have]
            if missing:
                raise DatalistError(f"{_filename(img)}: case {d.get('case_id')} has no {missing} (has {have})")
            if have != list(self.modalities):
                d[key] = img[[have.index(m) for m in self.modalities]]
        return d


class CheckSameGridd(MapTransform):
    """Raise ``LabelError`` naming the files when the label is not on the image's voxel grid
    (shape, or affine beyond 0.01 mm): everything after this treats them as one grid."""

    def __init__(self, keys: str = "label", image_key: str = "image"):
        super().__init__(keys)
        self.image_key = image_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image = d[self.image_key]
        for key in self.key_iterator(d):
            label = d[key]
            if label.shape[0] != 1:
                raise LabelError(f"{_filename(label)}: label has {label.shape[0]} channels, expected one")
            if tuple(label.shape[1:]) != tuple(image.shape[1:]):
                raise LabelError(
                    f"{_filename(label)}: label grid {tuple(label.shape[1:])} differs from image grid "
                    f"{tuple(image.shape[1:])} ({_filename(image)})"
                )
            if not torch.allclose(label.affine.double(), image.affine.double(), atol=1e-2):
                raise LabelError(
                    f"{_filename(label)}: label affine differs from the image's ({_filename(image)}):\n"
                    f"{label.affine.numpy()}\nvs\n{image.affine.numpy()}"
                )
        return d


class LabelToRegionsd(MapTransform):
    """Label file values -> internal scheme (strict) -> regions ET/TC/WT, uint8 ``(3, *S)``.

    The label's convention comes from ``item["convention"]``; a value outside it raises
    ``LabelError`` naming the file. Stored as uint8 (a quarter of float32 in the disk cache);
    ``_FinalizeForNetwork`` widens it to float32. Runs after the brain crop, on half the voxels
    (so a stray value outside the brain's bounding box goes unreported; it would be cropped anyway).
    """

    def __init__(self, keys: str = "label", convention_key: str = "convention"):
        super().__init__(keys)
        self.convention_key = convention_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            label = d[key]
            try:
                internal = to_internal(label.as_tensor(), d[self.convention_key], strict=True)
            except LabelError as err:
                raise LabelError(f"{_filename(label)}: {err}") from None
            regions = MetaTensor(regions_from_internal(internal).to(torch.uint8))
            regions.copy_meta_from(label)
            d[key] = regions
        return d


class AddSpacingd(MapTransform):
    """``item["spacing"]``: float32 (3,) voxel size in mm of ``image`` along its current axes."""

    def __init__(self, keys: str = "image", spacing_key: str = "spacing"):
        super().__init__(keys)
        self.spacing_key = spacing_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            spacing = affine_to_spacing(d[key].affine, r=3)
            d[self.spacing_key] = torch.as_tensor(np.asarray(spacing), dtype=torch.float32)
        return d


class CompactStoraged(MapTransform):
    """Give views a storage of their own. ``torch.save`` writes a view's *whole* storage: a
    brain-cropped view of the 240x240x155 volume would otherwise double the disk-cache entry."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            t = d[key]
            if not t.is_contiguous() or t.untyped_storage().nbytes() > t.numel() * t.element_size():
                d[key] = t.clone(memory_format=torch.contiguous_format)
        return d


class _FinalizeForNetwork:
    """Widen the uint8 regions to float32 (the dtype losses and metrics expect) and drop the
    ``MetaTensor`` wrapping (train/val consumers need plain tensors; ``spacing`` carries the geometry).

    Deliberately *not* a ``monai.transforms.Transform``: ``PersistentDataset`` caches up to the
    first random transform or the first callable that is not a MONAI ``Transform``, so this step
    always runs after the cache and the cache keeps the 4x smaller uint8 label.
    """

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in ("image", "label"):
            if isinstance(d.get(key), MetaTensor):
                d[key] = d[key].as_tensor()
        if "label" in d:
            d["label"] = d["label"].to(torch.float32)
        return d


def deterministic_transforms(cfg: PreprocessConfig, stage: Stage) -> list:
    """The cacheable part of the pipeline for ``stage`` (no random transform)."""
    with_label = stage != "predict"
    keys = ["image", "label"] if with_label else ["image"]
    steps: list = [
        LoadImaged(keys=keys, image_only=True, dtype=np.float32),
        EnsureChannelFirstd(keys=keys),
        SelectModalitiesd(cfg.modalities),
    ]
    if with_label:
        steps.append(CheckSameGridd())
    steps += [Orientationd(keys=keys, axcodes="RAS", labels=None), AddSpacingd()]
    if cfg.crop_foreground:  # the brain's bounding box: any channel > 0
        steps.append(CropForegroundd(keys=keys, source_key="image", start_coord_key=None, end_coord_key=None))
    if with_label:
        steps.append(LabelToRegionsd())
    if cfg.normalization == "zscore":
        steps.append(NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True))
    else:
        steps.append(ScaleIntensityd(keys="image", minv=0.0, maxv=1.0, channel_wise=True))
    if stage == "train":  # random crops of roi_size need at least roi_size
        steps.append(SpatialPadd(keys=keys, spatial_size=cfg.roi_size))
    elif cfg.pad_multiple > 1:  # whole volume, divisible by the network's total stride
        steps.append(DivisiblePadd(keys=keys, k=cfg.pad_multiple))
    steps += [CompactStoraged(keys=keys), DeleteItemsd(keys=list(_INPUT_ONLY_KEYS))]
    return steps


def random_transforms(cfg: PreprocessConfig, samples_per_volume: int = 1) -> list:
    """Training crops of ``roi_size`` (``samples_per_volume`` per case) and augmentation."""
    keys = ["image", "label"]
    if cfg.crop_sampler == "posneg":
        crop = RandCropByPosNegLabeld(
            keys=keys, label_key="label", spatial_size=cfg.roi_size, pos=1, neg=1, num_samples=samples_per_volume
        )
    else:
        crop = RandSpatialCropSamplesd(
            keys=keys, roi_size=cfg.roi_size, num_samples=samples_per_volume, random_size=False
        )
    return [
        crop,
        *(RandFlipd(keys=keys, prob=cfg.flip_prob, spatial_axis=axis) for axis in range(3)),
        RandScaleIntensityd(
            keys="image", factors=cfg.intensity_scale_factor, prob=cfg.intensity_scale_prob, channel_wise=True
        ),
        RandShiftIntensityd(
            keys="image", offsets=cfg.intensity_shift_offset, prob=cfg.intensity_shift_prob, channel_wise=True
        ),
    ]


def build_transforms(cfg: PreprocessConfig, stage: Stage, *, samples_per_volume: int = 1) -> Compose:
    """The MONAI pipeline for ``stage`` (``"train"``, ``"val"`` or ``"predict"``); see the module doc."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; known: {STAGES}")
    if samples_per_volume < 1:
        raise ValueError(f"samples_per_volume must be >= 1, got {samples_per_volume}")
    steps = deterministic_transforms(cfg, stage)
    if stage == "train":
        steps += random_transforms(cfg, samples_per_volume)
    if stage != "predict":
        steps.append(_FinalizeForNetwork())
    return Compose(steps)


def build_inverse(predict_transforms: Compose, keys: str | Sequence[str] = "pred") -> Invertd:
    """An ``Invertd`` mapping ``keys`` (network outputs on the preprocessed grid of ``image``) back
    onto the source image's grid: undoes padding, the brain crop and the RAS reorientation.

    Apply it to one *un-batched* item (``monai.data.decollate_batch``) that still holds the
    preprocessed ``image`` MetaTensor. Nearest-neighbour interpolation keeps labels discrete.
    """
    keys = [keys] if isinstance(keys, str) else list(keys)
    return Invertd(
        keys=keys,
        transform=predict_transforms,
        orig_keys=["image"] * len(keys),
        nearest_interp=True,
        to_tensor=True,
    )
