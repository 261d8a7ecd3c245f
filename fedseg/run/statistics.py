"""Federated statistics of the sites' images, in the simulator or POC, into a run folder.

``simulate_stats`` runs the statistics job (``fedseg.jobs.stats``) in NVFlare's simulator with one
site per datalist (each site reads its data through its own site config, as in training);
``collect_stats`` turns the server's ``statistics/image_statistics.json`` (NVFlare's format:
``{feature: {statistic: {site | "Global": {dataset: value}}}}``) into the run folder::

    RUN/stats.json                 NVFlare's output, as the server wrote it
    RUN/stats_intensity.png        per modality, each site's brain-voxel intensity histogram (overlaid)
    RUN/stats_cases.png            per site: cases, spacing, size and tumour volumes (mean and sd)
    RUN/stats.txt                  the table ``format_stats`` prints

Only what NVFlare's cleansers let through is there: a site with too few cases for a feature shows
its count and nothing else.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedseg.jobs.stats import NAME, OUTPUT, StatsSettings

GLOBAL = "Global"


@dataclass
class StatsReport:
    """The federated statistics of a run: NVFlare's document and the files made from it."""

    doc: dict[str, Any]
    sites: list[str]
    files: dict[str, Path] = field(default_factory=dict)

    def value(self, feature: str, statistic: str, site: str, dataset: str) -> Any:
        return self.doc.get(feature, {}).get(statistic, {}).get(site, {}).get(dataset)


def simulate_stats(site_datalists: dict[str, Path], run_dir: Path, settings: StatsSettings = StatsSettings(), *,
                   data_roots: dict[str, Path] | None = None) -> StatsReport:
    """The statistics job in the simulator, one site per datalist; the report in ``run_dir``."""
    from nvflare.recipe import SimEnv

    from fedseg.app.site_config import ENV_VAR, write_site_config
    from fedseg.jobs.base import execute
    from fedseg.jobs.stats import build_stats_recipe

    run_dir = Path(run_dir).resolve()
    configs = run_dir / "site_configs"
    for site, datalist in site_datalists.items():
        write_site_config(configs / f"{site}.json", datalist, (data_roots or {}).get(site))
    recipe = build_stats_recipe(settings)
    from fedseg.provisioning.site_control import allow_fedseg_classes_in_simulator

    allow_fedseg_classes_in_simulator(run_dir / "nvflare" / NAME)
    env = SimEnv(clients=list(site_datalists), num_threads=len(site_datalists), workspace_root=str(run_dir / "nvflare"))
    previous = os.environ.get(ENV_VAR)
    os.environ[ENV_VAR] = str(configs)
    try:
        execute(recipe, env)
    finally:
        if previous is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = previous
    return collect_stats(run_dir / "nvflare" / NAME / "server" / "simulate_job", run_dir)


def collect_stats(server_dir: Path, run_dir: Path) -> StatsReport:
    """The run folder's statistics files from the server's job folder (the simulator's or a download's)."""
    source = Path(server_dir) / OUTPUT
    if not source.is_file():
        raise FileNotFoundError(f"{source}: the statistics job wrote no result (see its server log, {server_dir}/..)")
    doc = json.loads(source.read_text())
    from fedseg.lightning_modules.owner_only import owner_only_dir

    owner_only_dir(run_dir)  # the sites' image statistics, like every other fedseg output: owner-only
    shutil.copyfile(source, run_dir / "stats.json")
    sites = sorted({site for stats in doc.values() for by_site in stats.values() for site in by_site} - {GLOBAL})
    report = StatsReport(doc, sites, {"json": run_dir / "stats.json"})
    report.files["intensity_png"] = plot_intensities(report, run_dir / "stats_intensity.png")
    report.files["cases_png"] = plot_cases(report, run_dir / "stats_cases.png")
    (run_dir / "stats.txt").write_text(format_stats(report) + "\n")
    report.files["txt"] = run_dir / "stats.txt"
    return report


def format_stats(report: StatsReport) -> str:
    """Per site: cases, mean spacing and size, tumour volume, and each modality's brain intensity."""
    from fedseg.app.site_statistics import CASES, VOXELS

    def mean_sd(feature: str, dataset: str, site: str, digits: int = 1) -> str:
        mean = report.value(feature, "mean", site, dataset)
        sd = report.value(feature, "stddev", site, dataset)
        if mean is None:
            return "withheld"
        return f"{mean:.{digits}f}" + (f" ± {sd:.{digits}f}" if sd is not None else "")

    modalities = [f for f, stats in report.doc.items() if VOXELS in stats.get("count", {}).get(GLOBAL, {})]
    width = max(12, *(len(s) + 2 for s in report.sites))
    lines = ["federated statistics of each site's images (mean ± sd over its cases; withheld: too few cases "
             "for NVFlare's minimum count)",
             f"{'site':<{width}}{'cases':>6}{'spacing mm':>14}{'size (x)':>12}{'WT ml':>16}"]
    for site in report.sites:
        cases = report.value("size_x", "count", site, CASES)
        lines.append(f"{site:<{width}}{cases if cases is not None else '?':>6}"
                     f"{mean_sd('spacing_x', CASES, site, 2):>14}{mean_sd('size_x', CASES, site, 0):>12}"
                     f"{mean_sd('wt_ml', CASES, site):>16}")
    lines += ["", "brain-voxel intensity (mean ± sd) per modality",
              f"{'site':<{width}}" + "".join(f"{m:>18}" for m in modalities)]
    for site in report.sites:
        lines.append(f"{site:<{width}}" + "".join(f"{mean_sd(m, VOXELS, site):>18}" for m in modalities))
    return "\n".join(lines)


def plot_intensities(report: StatsReport, out: Path) -> Path:
    """One panel per modality: each site's brain-voxel intensity histogram as a density, overlaid."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from fedseg.app.site_statistics import VOXELS

    modalities = [f for f, stats in report.doc.items() if VOXELS in stats.get("histogram", {}).get(GLOBAL, {})]
    fig = Figure(figsize=(4.2 * max(1, len(modalities)), 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(1, max(1, len(modalities))))
    for ax, modality in zip(axes, modalities):
        for site in report.sites:
            bins = report.value(modality, "histogram", site, VOXELS)
            if not bins:
                continue
            lows, highs, counts = (np.asarray(x, dtype=float) for x in zip(*bins))
            widths = highs - lows
            density = counts / max(counts.sum(), 1) / np.where(widths > 0, widths, 1)
            ax.step(lows, density, where="post", label=site, linewidth=1.5)
        ax.set(title=f"{modality}: brain-voxel intensity", xlabel="intensity (scanner units)", ylabel="density")
        ax.grid(alpha=0.3)
    if modalities:
        axes[0].legend(fontsize=8)
    fig.suptitle("How each site images: intensity histograms of the federated statistics (no case leaves a site)")
    fig.savefig(out, dpi=100)
    return out


def plot_cases(report: StatsReport, out: Path) -> Path:
    """Bars with sd: each site's mean voxel spacing, image size and tumour-region volumes."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from fedseg.app.site_statistics import CASES

    panels = [("spacing_x", "voxel spacing x (mm)"), ("size_x", "image size x (voxels)"),
              ("wt_ml", "whole tumour (ml)"), ("et_ml", "enhancing tumour (ml)")]
    fig = Figure(figsize=(4 * len(panels), 3.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels))
    x = np.arange(len(report.sites))
    for ax, (feature, label) in zip(axes, panels):
        means = [report.value(feature, "mean", s, CASES) for s in report.sites]
        sds = [report.value(feature, "stddev", s, CASES) for s in report.sites]
        ax.bar(x, [m if m is not None else math.nan for m in means],
               yerr=[sd if sd is not None else 0 for sd in sds], capsize=3)
        ax.set_xticks(x, report.sites, rotation=30, ha="right")
        ax.set(title=label, ylabel=label.split(" (")[-1].rstrip(")"))
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Each site's cases (mean ± sd); a missing bar: fewer cases than the minimum count")
    fig.savefig(out, dpi=100)
    return out
