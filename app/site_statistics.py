"""What a site tells the federated statistics job about its images, as NVFlare's ``Statistics``.

Run by ``StatisticsExecutor`` at every site of the stats job (``fedseg.jobs.stats``); the site
finds its data through its own configuration, as in training (``fedseg.app.site_config``). Two
datasets, only numbers, and NVFlare's privacy cleansers run on them before anything leaves:

- ``brain_voxels``: the intensity of the brain (non-zero) voxels of each modality, a feature per
  modality; up to ``voxels_per_case`` of them per case and modality (a seeded sample: a volume's
  millions of voxels add nothing to a histogram);
- ``cases``: per case, the voxel spacing (mm) and image size (voxels) along each axis, and the
  tumour regions' volumes (ml: ET, TC, WT) where a label exists.

The server receives counts, sums, means, standard deviations and histograms over each site's
cases, never one case's values (NVFlare's ``MinCountCleanser`` drops a site's feature with fewer
than ``min_count`` cases, ``HistogramBinsCleanser`` a histogram with too many bins for its count).
"""

from __future__ import annotations

import sys
import zlib
from typing import Any

import numpy as np
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.statistics_spec import Bin, DataType, Feature, Histogram, HistogramType, Statistics

from fedseg.config import MODALITIES

VOXELS = "brain_voxels"
CASES = "cases"
#: per-case features of the ``cases`` dataset
CASE_FEATURES = ("spacing_x", "spacing_y", "spacing_z", "size_x", "size_y", "size_z", "et_ml", "tc_ml", "wt_ml")


class JobRefused(RuntimeError):
    """This site's policy refuses the statistics job (the message is the rule, no path)."""


class SiteImageStatistics(Statistics):
    """Statistics of one site's images (see the module docstring); arguments are plain values, stored
    under their own names, as NVFlare's job export reads them back."""

    #: written into the exported job even when equal to the defaults: the job says what it computes
    _always_serialize_args = ("modalities", "voxels_per_case", "fedseg_version")

    def __init__(self, modalities: list[str] | None = None, voxels_per_case: int = 20000,
                 fedseg_version: str = "") -> None:
        super().__init__()
        self.modalities = list(modalities or MODALITIES)
        self.voxels_per_case = int(voxels_per_case)
        #: the fedseg that built the job; a site running another version refuses it
        self.fedseg_version = fedseg_version
        self.values: dict[str, dict[str, np.ndarray]] = {}

    def initialize(self, fl_ctx: FLContext) -> None:
        from fedseg.app.site_config import load_site_config
        from fedseg.app.site_executor import judge_job

        site = fl_ctx.get_identity_name()
        # the site's policy first, before any case is read (its privacy rule: NVFlare's statistics
        # privacy filter on the results, as the job's client config says)
        document = {"algorithm": "stats", "study_name": "stats", "wandb": "off",
                    "study": {"data": {"modalities": self.modalities}}}
        reason, _, _ = judge_job(fl_ctx, document, self.fedseg_version)
        if reason:
            raise JobRefused(f"{site} refused the job: {reason}")
        config = load_site_config(site, script_file=sys.argv[0] if sys.argv and sys.argv[0] else None)
        self.values = site_values(config.datalist, config.data_root, self.modalities, self.voxels_per_case)

    def features(self) -> dict[str, list[Feature]]:
        return {
            VOXELS: [Feature(m, DataType.FLOAT) for m in self.modalities],
            CASES: [Feature(name, DataType.FLOAT) for name in CASE_FEATURES],
        }

    def count(self, dataset_name: str, feature_name: str) -> int:
        return int(self.values[dataset_name][feature_name].size)

    def sum(self, dataset_name: str, feature_name: str) -> float:
        return float(self.values[dataset_name][feature_name].sum())

    def stddev(self, dataset_name: str, feature_name: str) -> float:
        values = self.values[dataset_name][feature_name]
        return float(values.std(ddof=1)) if values.size > 1 else 0.0

    def variance_with_mean(self, dataset_name: str, feature_name: str, global_mean: float, global_count: float) -> float:
        values = self.values[dataset_name][feature_name]
        return float(((values - global_mean) ** 2).sum() / (global_count - 1)) if global_count > 1 else 0.0

    def min_value(self, dataset_name: str, feature_name: str) -> float:
        values = self.values[dataset_name][feature_name]
        return float(values.min()) if values.size else 0.0

    def max_value(self, dataset_name: str, feature_name: str) -> float:
        values = self.values[dataset_name][feature_name]
        return float(values.max()) if values.size else 0.0

    def histogram(self, dataset_name: str, feature_name: str, num_of_bins: int, global_min_value: float,
                  global_max_value: float) -> Histogram:
        counts, edges = np.histogram(self.values[dataset_name][feature_name], bins=num_of_bins,
                                     range=(global_min_value, global_max_value))
        return Histogram(HistogramType.STANDARD, [Bin(float(edges[i]), float(edges[i + 1]), int(counts[i]))
                                                  for i in range(num_of_bins)])


def site_values(datalist: Any, data_root: Any, modalities: list[str], voxels_per_case: int) -> dict[str, dict[str, np.ndarray]]:
    """``{dataset: {feature: values}}`` of every case (training and validation) of a site's datalist."""
    import nibabel as nib

    from fedseg.lightning_modules.data.datalist import read_datalist
    from fedseg.lightning_modules.labels import regions_from_internal, to_internal

    cases = read_datalist(datalist, data_root)
    voxels: dict[str, list[np.ndarray]] = {m: [] for m in modalities}
    per_case: dict[str, list[float]] = {name: [] for name in CASE_FEATURES}
    for case in cases.cases:
        rng = np.random.default_rng(zlib.crc32(case.case_id.encode()))  # the same sample in every run
        shape, spacing = None, None
        for modality in modalities:
            if modality not in case.modalities:
                continue
            image = nib.load(str(case.image_path(modality, cases.data_root)))
            data = np.asanyarray(image.dataobj, dtype=np.float32)
            if case.is_4d:
                data = data[..., case.modalities.index(modality)]
            brain = data[data != 0]
            if brain.size > voxels_per_case:
                brain = rng.choice(brain, voxels_per_case, replace=False)
            voxels[modality].append(brain.astype(np.float64))
            shape, spacing = data.shape[:3], image.header.get_zooms()[:3]
        if shape is not None:
            for axis, (n, mm) in zip("xyz", zip(shape, spacing)):
                per_case[f"size_{axis}"].append(float(n))
                per_case[f"spacing_{axis}"].append(float(mm))
        if case.label is not None and spacing is not None:
            label = np.asanyarray(nib.load(str(cases.data_root / case.label)).dataobj)
            regions = regions_from_internal(to_internal(np.rint(label).astype(np.int64), case.convention))
            ml = float(np.prod(spacing)) / 1000.0
            for name, region in zip(("et_ml", "tc_ml", "wt_ml"), regions):
                per_case[name].append(float(region.sum()) * ml)
    return {
        VOXELS: {m: np.concatenate(v) if v else np.zeros(0) for m, v in voxels.items()},
        CASES: {name: np.asarray(v, dtype=np.float64) for name, v in per_case.items()},
    }
