"""Tumour label conventions, the one internal scheme, and the three scoring regions.

Every dataset is mapped onto the **internal scheme** as soon as it is read, and mapped back only
when a prediction is written for a user:

==========  ==========================================  =========================
internal    meaning                                     BraTS 2017-21 / 2023+ / MSD
==========  ==========================================  =========================
0           background                                  0 / 0 / 0
1           necrotic + non-enhancing tumour core (NCR)  1 / 1 / 2
2           peritumoral oedema (ED)                     2 / 2 / 1
3           enhancing tumour (ET)                       4 / 3 / 3
==========  ==========================================  =========================

The internal values equal BraTS 2023's. The scoring **regions**, in the channel order of every
network output, metric and table in fedseg, are ``REGIONS = ("ET", "TC", "WT")``:
ET = enhancing; TC = ET + NCR; WT = TC + oedema.

MONAI's ``ConvertToMultiChannelBasedOnBratsClasses`` knows only labels 1/2/4 and silently drops the
BraTS 2023 enhancing label 3: fedseg never uses it; regions are built from the internal scheme here.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

REGIONS: tuple[str, ...] = ("ET", "TC", "WT")

NCR, ED, ET = 1, 2, 3
INTERNAL_LABELS: tuple[int, ...] = (0, NCR, ED, ET)

#: convention name -> {value in files: internal value}
CONVENTIONS: dict[str, dict[int, int]] = {
    "brats2021": {0: 0, 1: NCR, 2: ED, 4: ET},
    "brats2023": {0: 0, 1: NCR, 2: ED, 3: ET},
    "msd": {0: 0, 1: ED, 2: NCR, 3: ET},
}

#: internal labels that make up each region
REGION_LABELS: dict[str, tuple[int, ...]] = {"ET": (ET,), "TC": (NCR, ET), "WT": (NCR, ED, ET)}

Array = TypeVar("Array", np.ndarray, torch.Tensor)


class LabelError(ValueError):
    """A label volume holds values outside its convention."""


def check_convention(convention: str) -> dict[int, int]:
    """The value map of ``convention``; a ``LabelError`` naming the known ones if it is unknown."""
    try:
        return CONVENTIONS[convention]
    except KeyError:
        raise LabelError(
            f"unknown label convention {convention!r}; known: {', '.join(CONVENTIONS)}"
        ) from None


def unique_values(label: np.ndarray | torch.Tensor) -> list[int]:
    """Sorted distinct integer values of a label volume (float labels are rounded first)."""
    if isinstance(label, torch.Tensor):
        label = label.detach().cpu().numpy()
    values = np.unique(np.asarray(label))
    if values.dtype.kind == "f":
        values = np.unique(np.rint(values))
    return [int(v) for v in values]


def invalid_values(label: np.ndarray | torch.Tensor, convention: str) -> list[int]:
    """Values in ``label`` that ``convention`` does not define (empty when the label is valid)."""
    allowed = check_convention(convention)
    return [v for v in unique_values(label) if v not in allowed]


def guess_convention(values: list[int] | set[int]) -> str:
    """Best guess of a convention from the values a label holds.

    A 4 means BraTS 2017-21; otherwise BraTS 2023+ (MSD shares its values, so MSD is never guessed:
    only the MSD layout selects it).
    """
    return "brats2021" if 4 in set(values) else "brats2023"


def _remap(label: Array, mapping: dict[int, int]) -> tuple[Array, Array]:
    """(remapped uint8 volume, mask of voxels whose value ``mapping`` does not know).

    One comparison per known value: much faster than ``np.unique`` over a whole volume.
    """
    if isinstance(label, torch.Tensor):
        src = torch.round(label).long() if label.is_floating_point() else label.long()
        out = torch.zeros(src.shape, dtype=torch.uint8, device=src.device)
        known = torch.zeros(src.shape, dtype=torch.bool, device=src.device)
    else:
        arr = np.asarray(label)
        src = np.rint(arr).astype(np.int64) if arr.dtype.kind == "f" else arr
        out = np.zeros(src.shape, dtype=np.uint8)
        known = np.zeros(src.shape, dtype=bool)
    for old, new in mapping.items():
        hit = src == old
        known |= hit
        if new:
            out[hit] = new
    return out, ~known


def to_internal(label: Array, convention: str, *, strict: bool = True) -> Array:
    """Map a label volume from ``convention`` onto the internal scheme (uint8).

    With ``strict`` a value the convention does not define raises ``LabelError``; without, such
    voxels become background.
    """
    mapping = check_convention(convention)
    out, unknown = _remap(label, mapping)
    if strict and unknown.any():
        bad = unique_values(label[unknown])
        raise LabelError(
            f"label values {bad} are not part of the {convention} convention (allowed: {sorted(mapping)})"
        )
    return out


def from_internal(label: Array, convention: str) -> Array:
    """Map an internal label volume back to ``convention`` (uint8)."""
    mapping = check_convention(convention)
    return _remap(label, {internal: value for value, internal in mapping.items()})[0]


def regions_from_internal(label: Array) -> Array:
    """Internal labels of shape ``S`` -> boolean regions of shape ``(3, *S)`` in ``REGIONS`` order.

    A leading singleton channel (``(1, *S)``) is dropped first.
    """
    if label.shape[0] == 1 and label.ndim == 4:
        label = label[0]
    # Plain comparisons: ~100x faster than torch.isin / np.isin on a 240x240x155 volume.
    lab = label.long() if isinstance(label, torch.Tensor) else np.asarray(label)
    et = lab == ET
    tc = et | (lab == NCR)
    wt = tc | (lab == ED)
    return torch.stack([et, tc, wt]) if isinstance(lab, torch.Tensor) else np.stack([et, tc, wt])


def internal_from_regions(regions: Array) -> Array:
    """Boolean regions ``(3, *S)`` in ``REGIONS`` order -> internal labels ``S`` (uint8).

    Regions are nested by construction (ET in TC in WT); a prediction that breaks the nesting is
    resolved the BraTS way: WT paints oedema, TC paints NCR over it, ET paints enhancing last.
    """
    et, tc, wt = regions[0], regions[1], regions[2]
    if isinstance(regions, torch.Tensor):
        out = torch.zeros(regions.shape[1:], dtype=torch.uint8, device=regions.device)
    else:
        out = np.zeros(regions.shape[1:], dtype=np.uint8)
    out[wt.astype(bool) if isinstance(wt, np.ndarray) else wt.bool()] = ED
    out[tc.astype(bool) if isinstance(tc, np.ndarray) else tc.bool()] = NCR
    out[et.astype(bool) if isinstance(et, np.ndarray) else et.bool()] = ET
    return out
