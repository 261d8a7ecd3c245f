"""Held-out test sets: a site's test cases, which nobody trains, validates or tunes on, and their scores.

A test datalist (``datalists/<site>.test.json``, written by the synthetic generator) is a datalist
whose cases are under ``"test"``; its ``training`` and ``validation`` lists are empty, so a command
that is handed it by mistake finds nothing to train or validate on (``fedseg train`` and
``fedseg compare`` refuse it)::

    {"data_root": "../data", "training": [], "validation": [],
     "test": [ENTRY, ...], "meta": {"role": "test", "site": "site-1", ...}}

``score_test_set(model, test_datalist)`` scores a model on those cases exactly as
``fedseg evaluate`` scores a split (the ``"val"`` transforms of the model's own preprocessing,
sliding windows, ``RegionMetrics``; ``evaluation.score_case``) and returns per region (ET, TC,
WT and their per-case mean, "overall") the mean over cases and its standard error sd/sqrt(n), the
spread that tells whether two methods' scores on one site differ by more than the test cases'
sampling noise.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedseg.lightning_modules.data.datalist import (
    MODALITIES,
    Case,
    DatalistError,
    confinement_problems,
    read_datalist,
    write_json_atomic,
)

if TYPE_CHECKING:  # torch is imported only when scoring
    import torch

    from fedseg.lightning_modules.inference import LoadedModel

#: file name ending of a test datalist: ``site-1.test.json`` holds site-1's test cases
TEST_SUFFIX = ".test.json"
#: ``meta.role`` of a test datalist
TEST_ROLE = "test"


class TestSetError(ValueError):
    """A test datalist that cannot be read or scored, or a test case that is also trained on."""

    __test__ = False  # not a pytest test class


@dataclass
class TestSet:
    """One site's held-out test cases and the root their paths are under."""

    __test__ = False

    path: Path
    cases: list[Case]
    data_root: Path
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def site(self) -> str:
        """The site named in ``meta.site``, else the file name without ``.test.json``."""
        return str(self.meta.get("site") or self.path.name.removesuffix(TEST_SUFFIX))


def test_datalist_path(datalist_dir: Path | str, site: str) -> Path:
    """``<datalist_dir>/<site>.test.json``."""
    return Path(datalist_dir) / f"{site}{TEST_SUFFIX}"


def write_test_datalist(path: Path | str, cases: Sequence[Case], data_root: Path | str,
                        meta: dict[str, Any] | None = None) -> Path:
    """Write ``cases`` as a test datalist at ``path`` (atomically; ``data_root`` stored relative to it)."""
    import os

    path = Path(path)
    rel = os.path.relpath(Path(data_root).resolve(), path.resolve().parent)
    modalities = sorted({m for c in cases for m in c.modalities}, key=MODALITIES.index)
    document = {
        "data_root": rel,
        "modalities": modalities,
        "training": [],
        "validation": [],
        "test": [c.to_entry() for c in cases],
        "meta": {**(meta or {}), "role": TEST_ROLE},
    }
    return write_json_atomic(path, document)


def read_test_set(path: Path | str, data_root: Path | str | None = None) -> TestSet:
    """Read a test datalist (``data_root`` overrides the stored root, as for ``read_datalist``).

    Refused, naming the file: no ``"test"`` list, a malformed entry, a case without a label, a
    case id listed twice, an entry outside the data root, or training/validation cases in the file.
    """
    path = Path(path)
    read_datalist(path, data_root)  # its checks: readable JSON, confined training/validation entries
    document = json.loads(path.read_text(encoding="utf-8"))
    listed = document.get("test")
    if not isinstance(listed, list) or not listed:
        raise TestSetError(f"{path}: not a test datalist: it needs a non-empty 'test' list of case entries")
    if document.get("training") or document.get("validation"):
        raise TestSetError(f"{path}: a test datalist must have no training or validation cases "
                           f"(it has {len(document.get('training') or [])} and {len(document.get('validation') or [])})")
    if data_root is None:
        stored = document.get("data_root")
        data_root = path.parent / stored if stored else path.parent
    root = Path(data_root).resolve()
    cases = []
    for i, entry in enumerate(listed):
        try:
            if not isinstance(entry, dict):
                raise TypeError("not an object")
            cases.append(Case.from_entry(entry))
        except (KeyError, TypeError, ValueError) as err:
            raise TestSetError(f"{path}: test[{i}]: malformed case entry ({err})") from None
    problems = confinement_problems([(f"test[{i}]", c) for i, c in enumerate(cases)], root)
    if problems:
        raise TestSetError(f"{path}: refused, unsafe entries:\n  " + "\n  ".join(p.format() for p in problems))
    unlabelled = [c.case_id for c in cases if c.label is None]
    if unlabelled:
        raise TestSetError(f"{path}: test case(s) without a label to score against: {unlabelled[:10]}")
    ids = [c.case_id for c in cases]
    twice = sorted({i for i in ids if ids.count(i) > 1})
    if twice:
        raise TestSetError(f"{path}: test case(s) listed twice: {twice[:10]}")
    return TestSet(path, cases, root, document.get("meta", {}))


def check_held_out(test_set: TestSet | Path | str, datalists: Iterable[Path | str]) -> None:
    """Raise ``TestSetError`` when a test case (by case id, or by its label file) is in the training
    or validation part of any of ``datalists``, naming the case and the datalist."""
    tests = test_set if isinstance(test_set, TestSet) else read_test_set(test_set)
    test_ids = {c.case_id for c in tests.cases}
    test_labels = {(tests.data_root / c.label).resolve() for c in tests.cases if c.label}
    clashes = []
    for path in datalists:
        try:
            dl = read_datalist(path)
        except DatalistError as err:
            raise TestSetError(str(err)) from None
        for split, cases in (("training", dl.training), ("validation", dl.validation)):
            for c in cases:
                if c.case_id in test_ids or (c.label and (dl.data_root / c.label).resolve() in test_labels):
                    clashes.append(f"{c.case_id} ({path}: {split})")
    if clashes:
        raise TestSetError(f"{tests.path}: {len(clashes)} test case(s) are also trained or validated on: "
                           + ", ".join(clashes[:10]))


@dataclass
class TestSetScores:
    """A model's scores on one site's test cases: per case, and per region their mean and its
    standard error (sd with n-1 over sqrt(n); NaN for a single case)."""

    __test__ = False

    site: str
    test_datalist: Path
    metrics: tuple[str, ...]
    rows: list[dict[str, Any]]  # long format, as evaluate's: case_id, region, one column per metric
    mean: dict[str, dict[str, float]]  # region -> metric -> mean over cases
    sem: dict[str, dict[str, float]]  # region -> metric -> standard error of that mean

    @property
    def n_cases(self) -> int:
        return len(dict.fromkeys(r["case_id"] for r in self.rows))

    def to_json(self) -> dict[str, Any]:
        from fedseg.lightning_modules.data.datalist import json_safe

        return json_safe({"site": self.site, "test_datalist": str(self.test_datalist), "n_cases": self.n_cases,
                          "metrics": list(self.metrics), "mean": self.mean, "sem": self.sem, "cases": self.rows})

    def format(self, metric: str = "dice") -> str:
        """One line per region: mean ± standard error of ``metric``."""
        return "\n".join(f"{region:<8} {self.mean[region][metric]:.4f} ± {self.sem[region][metric]:.4f}"
                         for region in self.mean) + f"\n({self.n_cases} test cases of {self.site})"


def mean_and_sem(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error sd/sqrt(n) (sd with n-1); NaN standard error for fewer than 2 values."""
    x = np.asarray(values, dtype=np.float64)
    if not len(x):
        return float("nan"), float("nan")
    sem = float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")
    return float(x.mean()), sem


def as_loaded_model(model: LoadedModel | torch.nn.Module | Path | str,
                    device: str | torch.device | None = None) -> LoadedModel:
    """A ``LoadedModel`` from a checkpoint path, a ``LoadedModel``, or a ``SegmentationModule`` /
    ``TrainedNetwork`` in memory (its hyper-parameters name the preprocessing it was trained with)."""
    import torch

    from fedseg.lightning_modules.inference import LoadedModel, load_model, preprocess_from_hparams, resolve_device

    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, (str, Path)):
        return load_model(model, device=device)
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "segment") or not hasattr(model, "hparams"):
        raise TestSetError(f"cannot score a {type(model).__name__}: give a checkpoint path, a LoadedModel, "
                           "or a SegmentationModule / TrainedNetwork")
    target = resolve_device(device) if device is not None else next(model.parameters()).device
    name = Path(f"<{type(model).__name__} in memory>")
    return LoadedModel(model.to(target), preprocess_from_hparams(dict(model.hparams), name), target, name)


def score_test_set(
    model: LoadedModel | torch.nn.Module | Path | str,
    test_datalist: TestSet | Path | str,
    *,
    data_root: Path | str | None = None,
    device: str | torch.device | None = None,
    metrics: Sequence[str] = ("dice",),
) -> TestSetScores:
    """Score ``model`` on the cases of one site's test datalist; see the module docstring.

    ``model``: a ``SegmentationModule`` checkpoint (``last.ckpt``), a ``LoadedModel``, or a
    ``SegmentationModule`` / ``TrainedNetwork`` in memory (scored in eval mode, its mode restored
    after). ``metrics``: ``RegionMetrics`` names (``"dice"``; ``"hd95"`` is slow on a CPU).
    """
    from fedseg.lightning_modules.data.transforms import build_transforms, case_to_item
    from fedseg.lightning_modules.evaluation import TABLE_REGIONS, long_rows, score_case
    from fedseg.lightning_modules.inference import root_cause
    from fedseg.lightning_modules.metrics import BRATS_EMPTY_HD95, check_metrics

    metrics = check_metrics(metrics)
    tests = test_datalist if isinstance(test_datalist, TestSet) else read_test_set(test_datalist, data_root)
    loaded = as_loaded_model(model, device)
    transforms = build_transforms(loaded.preprocess, "val")
    was_training = loaded.module.training
    loaded.module.eval()
    per_case = []
    try:
        for case in tests.cases:
            item = case_to_item(case, tests.data_root, loaded.modalities, with_label=True)
            try:
                item = transforms(item)
            except Exception as err:  # MONAI nests the reader's message
                raise TestSetError(f"{tests.path}: case {case.case_id}: preprocessing failed: {root_cause(err)}") from err
            per_case.append(score_case(loaded, item, metrics, BRATS_EMPTY_HD95))
    finally:
        loaded.module.train(was_training)
    rows = long_rows([c.case_id for c in tests.cases], per_case, metrics)
    mean: dict[str, dict[str, float]] = {}
    sem: dict[str, dict[str, float]] = {}
    for region in TABLE_REGIONS:
        region_rows = [r for r in rows if r["region"] == region]
        mean[region], sem[region] = {}, {}
        for metric in metrics:
            mean[region][metric], sem[region][metric] = mean_and_sem([r[metric] for r in region_rows])
    return TestSetScores(tests.site, tests.path, tuple(metrics), rows, mean, sem)


__all__ = [
    "TEST_SUFFIX",
    "TestSet",
    "TestSetError",
    "TestSetScores",
    "check_held_out",
    "mean_and_sem",
    "read_test_set",
    "score_test_set",
    "test_datalist_path",
    "write_test_datalist",
]
