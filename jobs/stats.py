"""The federated statistics job: what each site's images look like, before anyone trains on them.

NVFlare's ``FedStatsRecipe`` (``StatisticsController`` on the server, ``StatisticsExecutor`` and
the privacy cleansers at each site) with fedseg's generator (``fedseg.app.site_statistics``): per
site and modality, histograms of brain-voxel intensities; per site, case counts, voxel spacing,
image size and tumour volumes (mean, sd). The cleansers run at the site before anything leaves it:
a feature of a site with fewer than ``min_count`` values is dropped (its count stays), min/max are
noised before they set the global histogram range, and a histogram with more bins than
``max_bins_percent`` of its values is dropped. The job is deployed to every site (``@ALL``), so one
exported folder serves any consortium. The result is the server's ``statistics/image_statistics.json``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedseg.config import MODALITIES, setting

OUTPUT = "statistics/image_statistics.json"
#: the checked-in stats job (``fedseg jobs export``)
NAME = "stats"


@dataclass(frozen=True)
class StatsSettings:
    """What the statistics job computes and how its privacy cleansers are set."""

    modalities: tuple[str, ...] = field(default=MODALITIES)
    bins: int = setting(40, "histogram bins of each modality's brain-voxel intensities")
    voxels_per_case: int = setting(20000, "brain voxels sampled per case and modality for the histograms")
    min_count: int = setting(10, "a site's feature with fewer values than this is withheld (NVFlare's MinCountCleanser)")
    min_noise_level: float = setting(0.1, "least relative noise on a site's min/max (NVFlare's AddNoiseToMinMax)")
    max_noise_level: float = setting(0.3, "most relative noise on a site's min/max")
    max_bins_percent: float = setting(10.0, "a histogram with more bins than this percent of its values is withheld")

    def __post_init__(self) -> None:
        object.__setattr__(self, "modalities", tuple(self.modalities))
        if self.bins < 2 or self.voxels_per_case < 1 or self.min_count < 1:
            raise ValueError("bins must be >= 2, voxels_per_case and min_count >= 1")

    def statistic_configs(self) -> dict[str, Any]:
        # count + sum + mean (mean needs sum: NVFlare computes it as sum / count), stddev; histograms of
        # the intensities only: a case feature has a site's case count of values, too few for any bins
        return {"count": {}, "sum": {}, "mean": {}, "stddev": {},
                "histogram": {m: {"bins": self.bins} for m in self.modalities}}


def build_stats_recipe(settings: StatsSettings = StatsSettings(), name: str = NAME) -> Any:
    """The federated statistics recipe for every site of the consortium (run it or export it)."""
    from nvflare.apis.job_def import ALL_SITES
    from nvflare.recipe.fedstats import FedStatsRecipe

    from fedseg import nvflare_internals
    from fedseg.jobs.base import in_app_dir

    from fedseg.app.site_statistics import SiteImageStatistics

    nvflare_internals.patch_job_export()
    with in_app_dir():
        # the installed fedseg's generator: the job names its class and carries no code
        from fedseg import __version__

        generator = SiteImageStatistics(list(settings.modalities), settings.voxels_per_case, __version__)
        recipe = FedStatsRecipe(name=name, stats_output_path=OUTPUT, sites=[ALL_SITES],
                                statistic_configs=settings.statistic_configs(), stats_generator=generator,
                                min_count=settings.min_count, min_noise_level=settings.min_noise_level,
                                max_noise_level=settings.max_noise_level, max_bins_percent=settings.max_bins_percent)
        nvflare_internals.fed_job(recipe).set_app_packages(["fedseg"])
    return recipe


def export_stats(out_dir: Path, settings: StatsSettings = StatsSettings(), name: str = NAME) -> Path:
    """Write the statistics job folder ``out_dir/<name>`` for ``nvflare job submit -j``."""
    from fedseg.jobs.base import in_app_dir

    recipe = build_stats_recipe(settings, name)
    out_dir = Path(out_dir).resolve()
    with in_app_dir():
        recipe.export(str(out_dir))
    return out_dir / name
