"""Per-region segmentation metrics (Dice, IoU, precision, recall, volume similarity, HD95 in mm).

Scores are computed per case and per region in ``REGIONS`` order (ET, TC, WT) from binary masks;
``RegionMetrics`` is a torchmetrics ``Metric`` that keeps every case's scores (a ``cat`` list
state), so the same object gives the dataset means (``compute``) and the rows of a score table
(``per_case``). Thresholding probabilities is the caller's job: inputs must already be 0/1.

Definitions (``P`` predicted voxels, ``R`` reference voxels, per region; "full-volume" scores, as
the BraTS "legacy" Dice/HD95 of the BraTS 2023 evaluation, ``rachitsaluja/BraTS-2023-Metrics``,
``brats_metrics.py``, and the ``global_bin_*`` scores of the official ``BraTS/BraTS_evaluation``
package, built on panoptica):

=========  ===========================  ==============  ============  ============
metric     formula                      both empty      P empty only  R empty only
=========  ===========================  ==============  ============  ============
dice       2|P∩R| / (|P|+|R|)           1               0             0
iou        |P∩R| / |P∪R|                1               0             0
precision  |P∩R| / |P|                  1               0 (0/0)       0
recall     |P∩R| / |R|                  1               0             0 (0/0)
vs         1 - ||P|-|R|| / (|P|+|R|)    1               0             0
hd95       see below, in mm             0               empty_hd95    empty_hd95
=========  ===========================  ==============  ============  ============

Both-empty Dice 1 / HD95 0 and one-empty Dice 0 are the BraTS conventions (BraTS 2023 code above:
``full_dice = 1.0`` and ``full_hd95 = 0.0`` when both are empty; recall ("sensitivity") 1 when
both are empty, 0 when only the reference is). Precision and recall of 0/0 with the other mask
non-empty are 0: the region was missed or hallucinated, which must not score as perfect. VS is the
volume similarity of Taha & Hanbury (2015).

HD95 is MONAI's ``compute_hausdorff_distance(percentile=95, spacing=...)``: the larger of the two
directed 95th percentiles of edge-voxel distances, in mm from the voxel spacing. Definitions
differ between evaluators: BraTS 2023 (Google's ``surface_distance``) also takes the larger
directed percentile but weights surface elements by area; panoptica takes one percentile of both
directions pooled (33.53 instead of 34.19 mm on the ET of the official sample case 00132) and its
``global_bin_hd95`` ignores the spacing. When exactly one mask is empty the distance is infinite
and BraTS reports a fixed penalty: ``BRATS_EMPTY_HD95`` = 373.12866 mm, the diagonal of the
240x240x155 mm BraTS volume, as in the BraTS 2017-2021 results and nnU-Net's re-implementation of
that evaluation (``nnunet/dataset_conversion/Task082_BraTS_2020.py``). The BraTS 2023 code
replaces ``inf`` by 374 (pass ``empty_hd95=374`` to reproduce it); panoptica reports NaN.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import compute_hausdorff_distance
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from fedseg.lightning_modules.labels import REGIONS

#: Names of the available metrics, in the column order of every table.
METRICS: tuple[str, ...] = ("dice", "iou", "precision", "recall", "vs", "hd95")

#: HD95 (mm) when exactly one of prediction and reference is empty: the 240x240x155 mm diagonal.
BRATS_EMPTY_HD95: float = 373.12866

Spacing = Sequence[float] | Sequence[Sequence[float]] | np.ndarray | torch.Tensor | None


def metric_names(metrics: Sequence[str] = METRICS) -> list[str]:
    """Flat names in output order: ``dice_et, dice_tc, dice_wt, dice, iou_et, ...``."""
    names = []
    for m in metrics:
        names += [f"{m}_{r.lower()}" for r in REGIONS] + [m]
    return names


def check_metrics(metrics: Sequence[str]) -> tuple[str, ...]:
    """``metrics`` as a tuple; a ``ValueError`` naming the known ones if any is unknown."""
    metrics = tuple(metrics)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        given = unknown or "(none given)"
        raise ValueError(f"unknown metrics {given}; known: {', '.join(METRICS)}")
    return metrics


def _as_binary(x: torch.Tensor | np.ndarray, what: str) -> np.ndarray:
    """A boolean numpy view/copy of a 0/1 mask; a ``ValueError`` for anything else.

    Scores are computed with numpy on the CPU: counting a bool torch tensor goes through int64
    and is ~20x slower than ``np.count_nonzero`` on a 512x512x176 volume.
    """
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.dtype == bool:
        return x
    if not np.isin(x, (0, 1)).all():
        raise ValueError(
            f"{what} must be binary (bool or 0/1); threshold probabilities first, "
            "e.g. torch.sigmoid(logits) > 0.5"
        )
    return x.astype(bool)


def _spacing_rows(spacing: Spacing, batch: int, ndim: int) -> np.ndarray:
    """Spacing as a ``(batch, ndim)`` float64 array (1 mm when ``None``)."""
    if spacing is None:
        return np.ones((batch, ndim))
    if isinstance(spacing, torch.Tensor):
        spacing = spacing.detach().cpu().numpy()
    rows = np.asarray(spacing, dtype=np.float64)
    if rows.ndim == 1:
        rows = np.broadcast_to(rows, (batch, rows.shape[0]))
    if rows.shape != (batch, ndim):
        raise ValueError(
            f"spacing must have shape ({ndim},) or ({batch}, {ndim}); got {rows.shape}"
        )
    if not (np.isfinite(rows).all() and (rows > 0).all()):
        raise ValueError(f"spacing must be positive and finite; got {rows.tolist()}")
    return rows


def _crop_to_union(pred: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both masks cropped to the bounding box of their union, plus a 1-voxel margin.

    MONAI crops the same way inside ``get_mask_edges`` (so distances do not change), but only after
    converting the whole volume to float; cropping first keeps a 512x512x176 case at seconds.
    """
    union = pred | target
    box = []
    for axis in range(union.ndim):
        other = tuple(a for a in range(union.ndim) if a != axis)
        idx = np.flatnonzero(union.any(axis=other))
        box.append(slice(max(idx[0] - 1, 0), min(idx[-1] + 2, union.shape[axis])))
    return pred[tuple(box)], target[tuple(box)]


def hd95_mm(pred: np.ndarray, target: np.ndarray, spacing: Sequence[float]) -> float:
    """HD95 in mm between two non-empty boolean masks of shape ``S`` (MONAI's definition)."""
    pred, target = _crop_to_union(pred, target)
    with warnings.catch_warnings():
        # MONAI 1.6 passes its own deprecated ``always_return_as_numpy`` argument internally.
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*")
        hd = compute_hausdorff_distance(
            pred[None, None],
            target[None, None],
            include_background=True,
            percentile=95,
            spacing=[float(s) for s in spacing],
        )
    return float(hd[0, 0])


def region_scores(
    pred: torch.Tensor | np.ndarray,
    target: torch.Tensor | np.ndarray,
    spacing: Spacing = None,
    *,
    metrics: Sequence[str] = METRICS,
    empty_hd95: float = BRATS_EMPTY_HD95,
) -> torch.Tensor:
    """Scores of binary masks ``(B, 3, *S)`` (regions in ``REGIONS`` order) -> ``(B, M, 3)``.

    The result is float64; masks may be torch tensors (the result goes to their device) or numpy
    arrays. ``M`` follows
    ``metrics``; ``spacing`` is ``(B, len(S))``, one ``len(S)`` row for all cases, or ``None``
    (1 mm). See the module docstring for formulas and empty-mask conventions.
    """
    metrics = check_metrics(metrics)
    device = pred.device if isinstance(pred, torch.Tensor) else torch.device("cpu")
    pred, target = _as_binary(pred, "pred"), _as_binary(target, "target")
    if pred.shape != target.shape:
        raise ValueError(
            f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}"
        )
    if pred.ndim < 3 or pred.shape[1] != len(REGIONS):
        raise ValueError(
            f"expected masks of shape (B, {len(REGIONS)}, *spatial) with regions {REGIONS}; "
            f"got {tuple(pred.shape)}"
        )
    batch, spatial = pred.shape[0], pred.shape[2:]
    rows = _spacing_rows(spacing, batch, len(spatial))

    def count(mask: np.ndarray) -> np.ndarray:
        # per (case, region), without reshaping: that would copy volumes that are not C-ordered
        counts = [[np.count_nonzero(mask[b, c]) for c in range(len(REGIONS))] for b in range(batch)]
        return np.array(counts, dtype=np.float64).reshape(batch, len(REGIONS))

    inter, n_pred, n_ref = count(pred & target), count(pred), count(target)
    both_empty = (n_pred == 0) & (n_ref == 0)

    def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
        # 0/0 happens only when one mask is empty (-> 0) or both are (-> 1).
        out = np.divide(num, den, out=np.zeros_like(num), where=den > 0)
        return np.where(both_empty, 1.0, out)

    overlap = {
        "dice": lambda: ratio(2 * inter, n_pred + n_ref),
        "iou": lambda: ratio(inter, n_pred + n_ref - inter),
        "precision": lambda: ratio(inter, n_pred),
        "recall": lambda: ratio(inter, n_ref),
        "vs": lambda: ratio(n_pred + n_ref - np.abs(n_pred - n_ref), n_pred + n_ref),
    }
    out = np.empty((batch, len(metrics), len(REGIONS)), dtype=np.float64)
    for i, m in enumerate(metrics):
        if m != "hd95":
            out[:, i] = overlap[m]()
            continue
        for b, c in np.ndindex(batch, len(REGIONS)):
            if both_empty[b, c]:
                out[b, i, c] = 0.0
            elif n_pred[b, c] == 0 or n_ref[b, c] == 0:
                out[b, i, c] = empty_hd95
            else:
                out[b, i, c] = hd95_mm(pred[b, c], target[b, c], rows[b])
    return torch.from_numpy(out).to(device)


class RegionMetrics(Metric):
    """Dice, IoU, precision, recall, VS and HD95 (mm) per region (ET, TC, WT) and their mean.

    ``update(pred, target, spacing=None)`` takes binary masks ``(B, 3, *S)`` (bool or 0/1 float;
    threshold probabilities first) and the voxel spacing of each case in mm (``(B, len(S))`` or one
    row for all; ``None`` = 1 mm). ``compute()`` gives the mean over all cases seen as a dict of
    scalar tensors named ``dice_et, dice_tc, dice_wt, dice`` (mean of the regions), ``iou_*``, ...;
    ``per_case()`` gives one dict of floats with the same names per case, in update order.
    Formulas and empty-region conventions: see this module's docstring.
    """

    is_differentiable = False
    higher_is_better = None  # mixed: higher is better except for hd95
    full_state_update = False

    def __init__(
        self,
        metrics: Sequence[str] = METRICS,
        *,
        empty_hd95: float = BRATS_EMPTY_HD95,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.metrics = check_metrics(metrics)
        self.empty_hd95 = float(empty_hd95)
        self.add_state("scores", default=[], dist_reduce_fx="cat")

    @property
    def names(self) -> list[str]:
        """Flat result names, in output order."""
        return metric_names(self.metrics)

    def update(self, pred: torch.Tensor, target: torch.Tensor, spacing: Spacing = None) -> None:
        """Score a batch of cases; see the class docstring for shapes."""
        self.scores.append(
            region_scores(pred, target, spacing, metrics=self.metrics, empty_hd95=self.empty_hd95)
        )

    def _flat(self) -> torch.Tensor:
        """``(N, len(names))``: per case, each metric's three regions then their mean."""
        if isinstance(self.scores, list) and not self.scores:
            return torch.empty((0, len(self.names)), dtype=torch.float64)
        scores = dim_zero_cat(self.scores)  # (N, M, 3)
        with_mean = torch.cat([scores, scores.mean(dim=-1, keepdim=True)], dim=-1)
        return with_mean.flatten(1)

    def compute(self) -> dict[str, torch.Tensor]:
        """Mean over cases of every score (NaN before any update)."""
        flat = self._flat()
        if not len(flat):
            flat = torch.full((1, len(self.names)), float("nan"), dtype=torch.float64)
        means = flat.mean(dim=0)
        return {name: means[i] for i, name in enumerate(self.names)}

    def per_case(self) -> list[dict[str, float]]:
        """One row of floats per case (update order), with the same names as ``compute``.

        Under torch.distributed the rows of all processes are gathered first, like ``compute``.
        """
        with self.sync_context(dist_sync_fn=self.dist_sync_fn):
            flat = self._flat()
        return [dict(zip(self.names, row)) for row in flat.tolist()]
