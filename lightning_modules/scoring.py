"""Score predicted label files against reference label files, per case and per region.

``score_files(pred, ref)`` takes two label files, or two folders whose files are paired by case id
(``case_key``: the longest run of numeric name tokens, so ``pred/00132-000.nii.gz`` pairs with
``ref/BraTS-MET-00132-000-seg.nii.gz``). Each file may use any label convention of
``fedseg.lightning_modules.labels`` ("auto" guesses it from the values); both are mapped onto the
internal scheme, turned into the ET/TC/WT regions and scored by ``RegionMetrics`` with the voxel
spacing of the **reference** header. The result is a ``ScoreTable`` that writes ``scores.json`` and
``scores.csv`` (one row per case, then the mean).
"""

from __future__ import annotations

import csv
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from fedseg.lightning_modules.data.datalist import write_json_atomic
from fedseg.lightning_modules.labels import (
    CONVENTIONS,
    REGION_LABELS,
    REGIONS,
    check_convention,
    guess_convention,
)
from fedseg.lightning_modules.metrics import BRATS_EMPTY_HD95, METRICS, RegionMetrics, check_metrics
from fedseg.lightning_modules.owner_only import owner_only_dir

LABEL_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii")
#: every value that some convention defines (0..4)
_KNOWN_VALUES: tuple[int, ...] = tuple(sorted(set().union(*CONVENTIONS.values())))
_ROLE_SUFFIX = re.compile(r"[-_.](seg|label|labels|gt|mask|pred|prediction)$", re.IGNORECASE)


class ScoringError(ValueError):
    """Label files that cannot be scored (the message names the file(s) and the problem)."""


@dataclass(frozen=True)
class ScorePair:
    """One prediction file and the reference file it is scored against."""

    case_id: str
    pred: Path
    ref: Path


@dataclass(frozen=True)
class CaseScore:
    """The scores of one case, and how its files were read."""

    case_id: str
    pred: Path
    ref: Path
    pred_convention: str
    ref_convention: str
    spacing: tuple[float, ...]
    shape: tuple[int, ...]
    scores: dict[str, float]

    def to_json(self) -> dict[str, Any]:
        return {
            "case_id": self.case_id,
            "pred": str(self.pred),
            "ref": str(self.ref),
            "pred_convention": self.pred_convention,
            "ref_convention": self.ref_convention,
            "spacing_mm": list(self.spacing),
            "shape": list(self.shape),
            "scores": self.scores,
        }


@dataclass
class ScoreTable:
    """Per-case, per-region scores of a set of label files, and their mean."""

    cases: list[CaseScore]
    names: list[str]
    empty_hd95: float = BRATS_EMPTY_HD95
    unpaired_pred: list[Path] = field(default_factory=list)
    unpaired_ref: list[Path] = field(default_factory=list)

    def mean(self) -> dict[str, float]:
        """Mean over cases of every score (NaN with no cases)."""
        values = np.array([[c.scores[n] for n in self.names] for c in self.cases], dtype=np.float64)
        if not len(values):
            return {n: float("nan") for n in self.names}
        return dict(zip(self.names, values.mean(axis=0).tolist()))

    def to_json(self) -> dict[str, Any]:
        return {
            "metrics": self.names,
            "conventions": {
                "regions": "ET = enhancing; TC = ET + necrotic core; WT = TC + oedema",
                "hd95": "mm (spacing of the reference header); max of directed 95th percentiles",
                "empty": "both empty: overlap scores 1, hd95 0; one empty: 0 and empty_hd95",
                "empty_hd95": self.empty_hd95,
            },
            "cases": [c.to_json() for c in self.cases],
            "mean": self.mean(),
            "unpaired_pred": [str(p) for p in self.unpaired_pred],
            "unpaired_ref": [str(p) for p in self.unpaired_ref],
        }

    def write(self, out_dir: Path | str) -> tuple[Path, Path]:
        """Write ``scores.json`` and ``scores.csv`` (cases, then a ``mean`` row) to ``out_dir``,
        owner-only (folder 0700, files 0600 through ``mkstemp``): per-case scores are patient data."""
        out_dir = owner_only_dir(out_dir)
        json_path = write_json_atomic(out_dir / "scores.json", self.to_json())
        csv_path = out_dir / "scores.csv"
        fd, tmp = tempfile.mkstemp(prefix=".scores.csv.", dir=out_dir)
        try:
            with os.fdopen(fd, "w", newline="", encoding="utf-8") as f:
                writer = csv.writer(f)
                writer.writerow(["case_id", *self.names])
                for case in self.cases:
                    writer.writerow([case.case_id, *(_fmt(case.scores[n]) for n in self.names)])
                mean = self.mean()
                writer.writerow(["mean", *(_fmt(mean[n]) for n in self.names)])
            os.replace(tmp, csv_path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return json_path, csv_path

    def format(self, metrics: Sequence[str] = ("dice", "hd95")) -> str:
        """A compact text table: a line per case and the mean; per-region columns of ``metrics``."""
        cols = [n for n in self.names if n.rsplit("_", 1)[0] in metrics and "_" in n]
        rows = [(c.case_id, c.scores) for c in self.cases] + [("mean", self.mean())]
        width = max(len(r[0]) for r in rows)
        lines = [f"{'case':<{width}}  " + "  ".join(f"{n:>9}" for n in cols)]
        for case_id, scores in rows:
            lines.append(f"{case_id:<{width}}  " + "  ".join(f"{scores[n]:>9.4f}" for n in cols))
        return "\n".join(lines)


def _fmt(value: float) -> str:
    return format(value, ".10g")


def label_stem(path: Path) -> str:
    """File name without ``.nii.gz`` / ``.nii``."""
    name = path.name
    for suffix in LABEL_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def case_key(path: Path) -> tuple[int | str, ...]:
    """Pairing key of a label file: its longest run of numeric name tokens, as integers.

    ``00132-000``, ``BraTS-MET-00132-000-seg``, ``SEG-00132-000`` and ``BraTS-MET_00132-000`` all
    give ``(132, 0)``; ``BraTS2021_00006_seg`` gives ``(6,)``. A name without numeric tokens is
    keyed by its lower-cased stem without a role suffix such as ``_seg``.
    """
    stem = label_stem(path)
    runs: list[list[int]] = [[]]
    for token in re.split(r"[-_.\s]+", stem):
        if token.isdigit():
            runs[-1].append(int(token))
        elif runs[-1]:
            runs.append([])
    longest = max(runs, key=len)  # the first of the longest runs
    return tuple(longest) if longest else (_ROLE_SUFFIX.sub("", stem).lower(),)


def case_id_of(ref: Path) -> str:
    """Case id shown in tables: the reference file's stem without a role suffix (``-seg``)."""
    return _ROLE_SUFFIX.sub("", label_stem(ref))


def _label_files(folder: Path) -> list[Path]:
    files = sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.name.lower().endswith(LABEL_SUFFIXES)
    )
    if not files:
        raise ScoringError(f"{folder}: no label files (*.nii.gz, *.nii) in this folder")
    return files


def _keyed(files: list[Path], what: str) -> dict[tuple, Path]:
    by_key: dict[tuple, list[Path]] = {}
    for f in files:
        by_key.setdefault(case_key(f), []).append(f)
    clashes = {k: v for k, v in by_key.items() if len(v) > 1}
    if clashes:
        listed = "; ".join(", ".join(p.name for p in v) for v in clashes.values())
        raise ScoringError(f"{what} files with the same case id cannot be told apart: {listed}")
    return {k: v[0] for k, v in by_key.items()}


def pair_label_files(
    pred: Path | str, ref: Path | str, *, allow_unpaired: bool = False
) -> tuple[list[ScorePair], list[Path], list[Path]]:
    """Pairs of (prediction, reference) files, and the unpaired predictions and references.

    Two files make one pair; two folders are paired by ``case_key``. Unpaired files are an error
    unless ``allow_unpaired`` (then a warning lists them and they are left out).
    """
    pred, ref = Path(pred), Path(ref)
    for path, what in ((pred, "prediction"), (ref, "reference")):
        if not path.exists():
            raise ScoringError(f"{path}: {what} path does not exist")
    if pred.is_file() and ref.is_file():
        if case_key(pred) != case_key(ref):
            warnings.warn(f"scoring {pred.name} against {ref.name}: case ids differ", stacklevel=2)
        return [ScorePair(case_id_of(ref), pred, ref)], [], []
    if not (pred.is_dir() and ref.is_dir()):
        kinds = ["folder" if p.is_dir() else "file" for p in (pred, ref)]
        raise ScoringError(
            f"give two label files or two folders; got {pred} ({kinds[0]}) and {ref} ({kinds[1]})"
        )
    preds = _keyed(_label_files(pred), "prediction")
    refs = _keyed(_label_files(ref), "reference")
    pairs = [ScorePair(case_id_of(refs[k]), preds[k], refs[k]) for k in refs if k in preds]
    unpaired_pred = sorted(preds[k] for k in preds if k not in refs)
    unpaired_ref = sorted(refs[k] for k in refs if k not in preds)
    if unpaired_pred or unpaired_ref:
        message = (
            f"{len(unpaired_ref)} reference file(s) without a prediction: "
            f"{[p.name for p in unpaired_ref]}; {len(unpaired_pred)} prediction file(s) without a "
            f"reference: {[p.name for p in unpaired_pred]} (files are paired by the numeric groups "
            "of their names, e.g. 00132-000)"
        )
        if not allow_unpaired:
            raise ScoringError(message)
        warnings.warn(message, stacklevel=2)
    if not pairs:
        raise ScoringError(f"no prediction in {pred} pairs with a reference in {ref}")
    return sorted(pairs, key=lambda p: p.case_id), unpaired_pred, unpaired_ref


@dataclass(frozen=True)
class LabelRegions:
    """A label file read as boolean regions ``(3, *S)`` in ``REGIONS`` order."""

    regions: np.ndarray
    convention: str
    spacing: tuple[float, ...]


def _integer_labels(path: Path, data: np.ndarray) -> np.ndarray:
    """Label values as ``uint8``; float labels must hold whole numbers, all of them known values."""
    if data.dtype.kind == "f":
        if not np.isfinite(data).all() or (np.rint(data) != data).any():
            raise ScoringError(
                f"{path}: float labels with non-integer values; is this a probability map?"
            )
    elif data.dtype.kind not in "ui":
        raise ScoringError(f"{path}: label data of type {data.dtype} (expected integers)")
    top = max(_KNOWN_VALUES)
    if data.size and (data.min() < 0 or data.max() > top):
        extra = np.unique(data[(data < 0) | (data > top)])[:10].tolist()
        raise ScoringError(
            f"{path}: values {extra} are not labels of any convention ({', '.join(CONVENTIONS)})"
        )
    return data.astype(np.uint8, copy=False)


def read_label_regions(path: Path, convention: str = "auto") -> LabelRegions:
    """Read a 3-D label file, map it from ``convention`` ("auto": guessed) and build the regions.

    Same result as ``regions_from_internal(to_internal(data, convention))`` (a test checks it), but
    by comparing ``uint8`` values directly: ``np.unique``/``np.isin`` and the remap over a
    512x512x176 volume take ~10 s on two cores, these comparisons about one.
    """
    try:
        image = nib.load(path)
        data = np.asanyarray(image.dataobj)
    except Exception as err:  # nibabel raises several types for unreadable files
        raise ScoringError(f"{path}: cannot read as NIfTI ({err})") from err
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ScoringError(f"{path}: a label file must be 3-D; got shape {data.shape}")
    data = _integer_labels(path, data)
    values = [v for v in _KNOWN_VALUES if (data == v).any()]
    used = guess_convention(values) if convention == "auto" else convention
    mapping = check_convention(used)
    bad = [v for v in values if v not in mapping]
    if bad:
        raise ScoringError(
            f"{path}: label values {bad} are not part of the {used} convention "
            f"(allowed: {sorted(mapping)}); choose the right convention"
        )
    if data.flags.c_contiguous:
        regions = np.zeros((len(REGIONS), *data.shape), dtype=bool)
    else:  # NIfTI data is usually Fortran-ordered: give each region the same layout (no transposes)
        regions = np.zeros((len(REGIONS), *data.shape[::-1]), dtype=bool).transpose(0, 3, 2, 1)
    for c, region in enumerate(REGIONS):
        for value, internal in mapping.items():
            if internal in REGION_LABELS[region] and value in values:
                regions[c] |= data == value
    spacing = tuple(float(z) for z in image.header.get_zooms()[:3])
    return LabelRegions(regions, used, spacing)


def score_files(
    pred: Path | str,
    ref: Path | str,
    *,
    pred_convention: str = "auto",
    ref_convention: str = "auto",
    metrics: Sequence[str] = METRICS,
    empty_hd95: float = BRATS_EMPTY_HD95,
    allow_unpaired: bool = False,
    progress: Callable[[int, int, str], None] | None = None,
) -> ScoreTable:
    """Score prediction label file(s) against reference label file(s); see the module docstring.

    ``pred``/``ref`` are two files or two folders. ``progress(i, n, case_id)`` is called before
    each case. Spacing comes from the reference header (a differing prediction header only warns).
    """
    for convention in (pred_convention, ref_convention):
        if convention != "auto":
            check_convention(convention)
    metric = RegionMetrics(check_metrics(metrics), empty_hd95=empty_hd95)
    pairs, unpaired_pred, unpaired_ref = pair_label_files(pred, ref, allow_unpaired=allow_unpaired)
    read: list[dict[str, Any]] = []  # how each case was read (the volumes themselves are dropped)
    for i, pair in enumerate(pairs):
        if progress is not None:
            progress(i, len(pairs), pair.case_id)
        p = read_label_regions(pair.pred, pred_convention)
        r = read_label_regions(pair.ref, ref_convention)
        if p.regions.shape != r.regions.shape:
            raise ScoringError(
                f"shape mismatch: prediction {pair.pred} is {p.regions.shape[1:]}, "
                f"reference {pair.ref} is {r.regions.shape[1:]}"
            )
        if not np.allclose(p.spacing, r.spacing, rtol=1e-3, atol=1e-4):
            warnings.warn(
                f"voxel spacing differs: prediction {pair.pred} {p.spacing} mm, reference "
                f"{pair.ref} {r.spacing} mm; the reference spacing is used",
                stacklevel=2,
            )
        metric.update(p.regions[None], r.regions[None], spacing=[r.spacing])
        read.append(
            dict(
                case_id=pair.case_id,
                pred=pair.pred,
                ref=pair.ref,
                pred_convention=p.convention,
                ref_convention=r.convention,
                spacing=r.spacing,
                shape=tuple(r.regions.shape[1:]),
            )
        )
    cases = [CaseScore(**info, scores=scores) for info, scores in zip(read, metric.per_case())]
    return ScoreTable(cases, metric.names, float(empty_hd95), unpaired_pred, unpaired_ref)
