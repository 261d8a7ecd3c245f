"""Evaluate a checkpoint on a datalist: per-case, per-region scores, a summary and box plots.

Each case goes through the ``"val"`` transforms of the checkpoint's ``PreprocessConfig`` (the whole
RAS, brain-cropped, normalised volume, as in training's validation), sliding-window inference and
``RegionMetrics`` (Dice, IoU, precision, recall, VS, HD95 in mm from the RAS voxel spacing; BraTS
conventions for empty regions, see ``metrics.py``). Scores therefore match the ``val_*`` values
training logs. ``evaluate_checkpoint`` writes to ``out``:

    per_case.csv / per_case.json   one row per case and region (ET, TC, WT, overall):
                                   case_id, region, dice, iou, precision, recall, vs, hd95
    summary.json                   per region and metric: mean, median, worst value and its case
    boxplot_<region>.png           per region: overlap scores (0-1) and HD95 (mm) across cases

all owner-only (``out`` 0700, files 0600): per-case scores are patient data.

"overall" is the mean of the three regions of a case (``RegionMetrics``' ``dice``, ``hd95``, ...).
The worst case is the lowest score, or the highest HD95.
"""

from __future__ import annotations

import csv
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedseg.lightning_modules.data.datalist import Case, Datalist, json_safe, read_datalist, write_json_atomic
from fedseg.lightning_modules.data.transforms import build_transforms, case_to_item
from fedseg.lightning_modules.inference import (
    InferenceError,
    LoadedModel,
    load_model,
    refuse_output_inside_inputs,
    root_cause,
)
from fedseg.lightning_modules.labels import REGIONS
from fedseg.lightning_modules.metrics import BRATS_EMPTY_HD95, METRICS, RegionMetrics
from fedseg.lightning_modules.owner_only import owner_only_dir, owner_only_files

SPLITS: tuple[str, ...] = ("validation", "training", "all")
OVERALL = "overall"
#: row regions of the tables: the three scoring regions, then their per-case mean
TABLE_REGIONS: tuple[str, ...] = (*REGIONS, OVERALL)
#: metrics where a larger value is worse
LOWER_IS_BETTER: frozenset[str] = frozenset({"hd95"})


class EvaluationError(ValueError):
    """A datalist, split or output folder that cannot be evaluated (the message names it)."""


@dataclass
class EvaluationResult:
    """Scores of one checkpoint on one datalist split, and the files written."""

    checkpoint: Path
    datalist: Path
    split: str
    metrics: tuple[str, ...]
    rows: list[dict[str, Any]]  # long format: case_id, region, one column per metric
    summary: dict[str, Any]
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def case_ids(self) -> list[str]:
        return list(dict.fromkeys(r["case_id"] for r in self.rows))

    def format(self) -> str:
        """The summary as a text table: a line per region and metric (mean, median, worst)."""
        stats = self.summary["regions"]
        lines = [f"{'region':<8} {'metric':<10} {'mean':>9} {'median':>9} {'worst':>9}  worst case"]
        for region in TABLE_REGIONS:
            for metric in self.metrics:
                s = stats[region][metric]
                lines.append(
                    f"{region:<8} {metric:<10} {s['mean']:>9.4f} {s['median']:>9.4f} "
                    f"{s['worst']:>9.4f}  {s['worst_case']}"
                )
        return "\n".join(lines)


def select_cases(datalist: Datalist, split: str, source: Path | str) -> list[Case]:
    """The cases of ``split`` (``validation``, ``training`` or ``all``); each must have a label."""
    if split not in SPLITS:
        raise EvaluationError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    cases = {"validation": datalist.validation, "training": datalist.training, "all": datalist.cases}[split]
    if not cases:
        raise EvaluationError(f"{source}: no {split} cases to evaluate")
    unlabelled = [c.case_id for c in cases if c.label is None]
    if unlabelled:
        raise EvaluationError(
            f"{source}: {len(unlabelled)} {split} case(s) have no label to score against: "
            f"{unlabelled[:10]} (use fedseg predict for unlabelled cases)"
        )
    return list(cases)


def long_rows(
    case_ids: Sequence[str], per_case: Sequence[dict[str, float]], metrics: Sequence[str]
) -> list[dict[str, Any]]:
    """``RegionMetrics.per_case()`` rows (``dice_et``, ..., ``dice``) -> one row per case and region."""
    rows = []
    for case_id, scores in zip(case_ids, per_case):
        for region in TABLE_REGIONS:
            suffix = "" if region == OVERALL else f"_{region.lower()}"
            rows.append({"case_id": case_id, "region": region, **{m: scores[m + suffix] for m in metrics}})
    return rows


def summarize(rows: Sequence[dict[str, Any]], metrics: Sequence[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per region and metric: ``mean``, ``median``, ``worst`` and ``worst_case`` (its case id)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for region in TABLE_REGIONS:
        region_rows = [r for r in rows if r["region"] == region]
        out[region] = {}
        for metric in metrics:
            values = np.array([r[metric] for r in region_rows], dtype=np.float64)
            worst = int(np.argmax(values) if metric in LOWER_IS_BETTER else np.argmin(values))
            out[region][metric] = {
                "mean": float(values.mean()),
                "median": float(np.median(values)),
                "worst": float(values[worst]),
                "worst_case": region_rows[worst]["case_id"],
            }
    return out


def write_rows_csv(rows: Sequence[dict[str, Any]], path: Path, columns: Sequence[str]) -> Path:
    """Write ``rows`` as CSV (``columns`` in order) through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(columns))
            writer.writeheader()
            for row in rows:
                writer.writerow({k: format(v, ".10g") if isinstance(v, float) else v for k, v in row.items()})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def plot_region_boxes(rows: Sequence[dict[str, Any]], metrics: Sequence[str], out: Path, title: str = "") -> list[Path]:
    """``boxplot_<region>.png`` per region: overlap scores on [0, 1] and HD95 in mm, one box each."""
    # The object-oriented API with an Agg canvas: no pyplot global state, no backend switching.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    overlap = [m for m in metrics if m != "hd95"]
    paths = []
    for region in TABLE_REGIONS:
        region_rows = [r for r in rows if r["region"] == region]
        panels = [p for p in (overlap, [m for m in metrics if m == "hd95"]) if p]
        fig = Figure(figsize=(3 + 1.1 * len(overlap), 4), layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(1, len(panels), squeeze=False, width_ratios=[len(p) for p in panels])[0]
        for ax, panel in zip(axes, panels):
            ax.boxplot([[r[m] for r in region_rows] for m in panel], tick_labels=panel, showmeans=True)
            if panel == ["hd95"]:
                ax.set_ylabel("HD95 (mm)")
            else:
                ax.set_ylim(-0.02, 1.02)
                ax.set_ylabel("score")
            ax.grid(axis="y", alpha=0.3)
        fig.suptitle(f"{region} ({len(region_rows)} cases){' - ' + title if title else ''}")
        path = out / f"boxplot_{region.lower()}.png"
        fig.savefig(path, dpi=100)
        paths.append(path)
    return paths


def score_case(model: LoadedModel, item: dict[str, Any], metrics: Sequence[str], empty_hd95: float) -> dict[str, float]:
    """Scores of one ``"val"`` item (``image`` (C, *S), ``label`` regions (3, *S), ``spacing``)."""
    pred = model.segment(item["image"])
    metric = RegionMetrics(metrics, empty_hd95=empty_hd95)
    metric.update(pred[None], item["label"][None] > 0.5, spacing=item["spacing"][None])
    return metric.per_case()[0]


def evaluate_checkpoint(
    checkpoint: Path | str,
    datalist: Path | str,
    *,
    out: Path | str,
    split: str = "validation",
    data_root: Path | str | None = None,
    device: str | torch.device | None = None,
    metrics: Sequence[str] = METRICS,
    empty_hd95: float = BRATS_EMPTY_HD95,
    progress: Callable[[int, int, str, dict[str, float]], None] | None = None,
) -> EvaluationResult:
    """Score ``checkpoint`` on the ``split`` cases of ``datalist`` and write the tables and plots.

    ``progress(i, n, case_id, scores)`` is called after each case with ``RegionMetrics`` names
    (``dice_et``, ..., ``hd95``). ``out`` must not be inside the data. See the module docstring.
    """
    checkpoint, datalist_path, out = Path(checkpoint), Path(datalist), Path(out)
    data = read_datalist(datalist_path, data_root)
    cases = select_cases(data, split, datalist_path)
    try:
        refuse_output_inside_inputs(out, cases, data.data_root)
    except InferenceError as err:
        raise EvaluationError(str(err)) from None
    model = load_model(checkpoint, device=device)
    transforms = build_transforms(model.preprocess, "val")
    metrics = tuple(metrics)

    per_case = []
    for i, case in enumerate(cases):
        item = case_to_item(case, data.data_root, model.modalities, with_label=True)
        try:
            item = transforms(item)
        except Exception as err:  # MONAI nests the reader's / LabelError's message
            raise EvaluationError(f"case {case.case_id}: preprocessing failed: {root_cause(err)}") from err
        scores = score_case(model, item, metrics, empty_hd95)
        per_case.append(scores)
        if progress is not None:
            progress(i, len(cases), case.case_id, scores)

    rows = long_rows([c.case_id for c in cases], per_case, metrics)
    summary = {
        "checkpoint": str(checkpoint.resolve()),
        "datalist": str(datalist_path.resolve()),
        "data_root": str(data.data_root),
        "split": split,
        "n_cases": len(cases),
        "metrics": list(metrics),
        "regions": summarize(rows, metrics),
        "conventions": {
            "regions": "ET = enhancing; TC = ET + necrotic core; WT = TC + oedema; overall = mean of the three",
            "grid": "RAS, brain-cropped volume of the 'val' transforms (as training's validation)",
            "hd95": "mm; max of the directed 95th percentiles (MONAI)",
            "empty": "both empty: overlap scores 1, hd95 0; one empty: 0 and empty_hd95",
            "empty_hd95": float(empty_hd95),
            "worst": "lowest score, highest hd95",
        },
        "modalities": list(model.modalities),
        "device": str(model.device),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    result = EvaluationResult(checkpoint, datalist_path, split, metrics, rows, summary)
    # per-case scores of patients: owner-only, like the predictions (folder 0700, files 0600)
    owner_only_dir(out)
    columns = ["case_id", "region", *metrics]
    with owner_only_files():  # matplotlib's PNGs would otherwise follow the umask
        result.files["per_case_csv"] = write_rows_csv(rows, out / "per_case.csv", columns)
        result.files["per_case_json"] = write_json_atomic(out / "per_case.json", json_safe(rows))
        result.files["summary_json"] = write_json_atomic(out / "summary.json", json_safe(summary))
        for path in plot_region_boxes(rows, metrics, out, title=f"{datalist_path.name} {split}"):
            result.files[path.stem] = path
    return result

