"""The same comparison under several seeds: how much of a difference between methods is noise.

``fedseg compare --seeds 0 1 2`` runs ``compare`` once per seed, each in its own folder and each
resumable as usual, and summarizes them. A seed fixes a method's initial weights, data order and
augmentation (the study's ``seed``), so two methods under one seed start from the same weights,
and the difference between them can be paired by seed.

Run folder::

    OUT/seed-<s>/          a ``fedseg compare`` folder per seed
    OUT/seeds.csv, .json   method, site (and MEAN over sites), mean and sd over seeds, n, each seed
    OUT/seeds.txt          the table; each method's difference to FedAvg and to local-only training,
                           paired by seed, per site and on the mean; which methods meet the
                           personalization goal (``goal``)
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedseg.experiments.compare import (
    DEFAULT_METHODS,
    PERSONALIZED,
    CompareSettings,
    ComparisonError,
    ComparisonResults,
    compare,
)
from fedseg.lightning_modules.data.datalist import json_safe, write_json_atomic

#: the method every other one is compared with, paired by seed
REFERENCE = "fedavg"
#: the references of the paired differences: FedAvg, and each site training alone
REFERENCES = (REFERENCE, "local")
#: how far below its own local-only model a site may end for a method to meet the goal
LOCAL_TOLERANCE = 0.01


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (nan with fewer than 2 values) of the finite ``values``."""
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return math.nan, math.nan
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else math.nan


@dataclass
class SeedSweep:
    """One ``ComparisonResults`` per seed, same sites and methods; the summary over seeds."""

    out: Path
    seeds: list[int]
    runs: list[ComparisonResults]
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def sites(self) -> list[str]:
        return self.runs[0].sites

    @property
    def methods(self) -> list[str]:
        return list(self.runs[0].methods)

    def dice(self, method: str, site: str) -> list[float]:
        """Mean Dice (ET, TC, WT) of ``method`` on ``site``, one value per seed; site ``MEAN``: over sites."""
        if site == "MEAN":
            return [statistics.fmean(run.mean_dice(method, s) for s in self.sites) for run in self.runs]
        return [run.mean_dice(method, site) for run in self.runs]

    def difference(self, method: str, reference: str = REFERENCE, site: str = "MEAN") -> list[float]:
        """``method`` minus ``reference`` in mean Dice on ``site`` (``MEAN``: over sites), per seed
        (same seed, same start)."""
        return [a - b for a, b in zip(self.dice(method, site), self.dice(reference, site))]

    def choices(self, method: str) -> dict[str, list[str]]:
        """Per-site model selection: the model each site kept, one per seed (empty for other methods)."""
        if not any(run.methods[method].choices for run in self.runs):
            return {}
        return {site: [run.methods[method].choices.get(site, "?") for run in self.runs] for site in self.sites}

    def goal(self, method: str) -> tuple[bool, str]:
        """Whether ``method`` beats FedAvg and local-only training on the mean in every seed, with no
        site more than ``LOCAL_TOLERANCE`` below its own local-only model in any seed; and why not."""
        if not all(r in self.methods for r in REFERENCES):
            return False, f"needs the methods {' and '.join(REFERENCES)}"
        reasons = []
        for reference in REFERENCES:
            worse = [s for s, d in zip(self.seeds, self.difference(method, reference)) if not d > 0]
            if worse:
                reasons.append(f"not above {reference} on the mean in seed(s) {', '.join(map(str, worse))}")
        below = [f"{site} {d:+.4f} (seed {seed})" for site in self.sites
                 for seed, d in zip(self.seeds, self.difference(method, "local", site)) if d < -LOCAL_TOLERANCE - 1e-9]
        if below:
            reasons.append(f"below the site's local-only model: {', '.join(below)}")
        return not reasons, "; ".join(reasons)

    def rows(self) -> list[dict[str, Any]]:
        """``method, site, dice_mean, dice_sd, n_seeds`` and ``seed_<s>`` per seed; site MEAN last."""
        rows = []
        for method in self.methods:
            for site in (*self.sites, "MEAN"):
                values = self.dice(method, site)
                mean, sd = mean_sd(values)
                rows.append({"method": method, "site": site, "dice_mean": mean, "dice_sd": sd,
                             "n_seeds": len(values), **{f"seed_{s}": v for s, v in zip(self.seeds, values)}})
        return rows

    def format_table(self) -> str:
        width = max(17, *(len(s) + 2 for s in self.sites))
        head = f"{'method':<18}" + "".join(f"{s:>{width}}" for s in (*self.sites, "mean"))
        lines = [f"mean Dice over {len(self.seeds)} seeds ({', '.join(map(str, self.seeds))}): mean ± sd",
                 head, "-" * len(head)]
        for method in self.methods:
            cells = [mean_sd(self.dice(method, s)) for s in (*self.sites, "MEAN")]
            lines.append(f"{method:<18}" + "".join(f"{f'{m:.4f} ± {sd:.4f}':>{width}}" for m, sd in cells))
        width = max(width, 24)
        for reference in (r for r in REFERENCES if r in self.methods):
            lines += ["", f"difference to {reference}, paired by seed: mean ± sd (seeds better of {len(self.seeds)})",
                      f"{'method':<18}" + "".join(f"{s:>{width}}" for s in (*self.sites, "mean"))]
            for method in (m for m in self.methods if m != reference):
                cells = []
                for site in (*self.sites, "MEAN"):
                    diffs = self.difference(method, reference, site)
                    mean, sd = mean_sd(diffs)
                    cells.append(f"{mean:+.4f} ± {sd:.4f} ({sum(d > 0 for d in diffs)})")
                lines.append(f"{method:<18}" + "".join(f"{c:>{width}}" for c in cells))
        for method in self.methods:
            if chosen := self.choices(method):
                lines += ["", f"{method}: the model each site kept (chosen on cases it did not train on), seeds "
                          f"{', '.join(map(str, self.seeds))}: " + "; ".join(f"{s} {' '.join(c)}" for s, c in chosen.items())]
        if all(r in self.methods for r in REFERENCES):
            lines += ["", f"goal: above {' and '.join(REFERENCES)} on the mean in every seed, no site more than "
                      f"{LOCAL_TOLERANCE} below its local-only model"]
            for method in (m for m in self.methods if m in PERSONALIZED):
                met, why = self.goal(method)
                lines.append(f"{method:<18}" + ("met" if met else f"not met: {why}"))
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        paired = {m: self.difference(m) for m in self.methods if m != REFERENCE} if REFERENCE in self.methods else {}
        by_site = {reference: {m: {s: self.difference(m, reference, s) for s in (*self.sites, "MEAN")}
                               for m in self.methods if m != reference}
                   for reference in REFERENCES if reference in self.methods}
        goal = ({m: dict(zip(("met", "why"), self.goal(m))) for m in self.methods if m in PERSONALIZED}
                if all(r in self.methods for r in REFERENCES) else {})
        return json_safe({"seeds": self.seeds, "sites": self.sites, "methods": self.methods,
                          "settings": self.runs[0].settings.to_json(),
                          "rows": self.rows(), f"difference_to_{REFERENCE}": paired, "differences": by_site,
                          "goal": goal, "choices": {m: c for m in self.methods if (c := self.choices(m))},
                          "runs": [str(run.out) for run in self.runs]})

    def write(self) -> dict[str, Path]:
        """``seeds.json|csv|txt`` in ``out``."""
        from fedseg.lightning_modules.history import write_rows, write_text_atomic

        self.files["json"] = write_json_atomic(self.out / "seeds.json", self.to_json())
        self.files["csv"] = self.out / "seeds.csv"
        write_rows(self.files["csv"], self.rows(), first=("method", "site", "dice_mean", "dice_sd", "n_seeds"))
        self.files["txt"] = self.out / "seeds.txt"
        write_text_atomic(self.files["txt"], self.format_table() + "\n")
        self.files["png"] = plot_sweep(self, self.out / "seeds.png")
        return self.files


def plot_sweep(sweep: SeedSweep, out: Path) -> Path:
    """Grouped bars: each method's mean Dice per site and over sites, mean over seeds with its sd."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = [*sweep.sites, "MEAN"]
    methods = sweep.methods
    width = 0.8 / len(methods)
    fig = Figure(figsize=(2.5 + 1.9 * len(groups), 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    x = np.arange(len(groups))
    for i, method in enumerate(methods):
        stats = [mean_sd(sweep.dice(method, g)) for g in groups]
        ax.bar(x + (i - (len(methods) - 1) / 2) * width, [m for m, _ in stats], width,
               yerr=[0 if math.isnan(sd) else sd for _, sd in stats], capsize=2, label=method)
    ax.set_xticks(x, [g if g != "MEAN" else "mean over sites" for g in groups])
    low = min((min(sweep.dice(m, g)) for m in methods for g in groups), default=0.0)
    ax.set(ylabel="mean Dice over ET, TC, WT", ylim=(max(0.0, low - 0.1), 1.0),
           title=f"Final models on each site's own {sweep.runs[0].scored_on}: mean ± sd over {len(sweep.seeds)} seeds")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(ncols=min(len(methods), 5), fontsize=8, loc="upper center")
    fig.savefig(out, dpi=110)
    return out


def sweep_seeds(
    site_datalists: Mapping[str, Path | str],
    out: Path | str,
    settings: CompareSettings,
    seeds: Sequence[int],
    *,
    methods: Sequence[str] = DEFAULT_METHODS,
    data_root: Path | str | None = None,
    progress: Callable[[str], None] = print,
    console: Any = None,
) -> SeedSweep:
    """``compare`` under each seed into ``out/seed-<s>``, then the summary over seeds in ``out``."""
    seeds = list(dict.fromkeys(int(s) for s in seeds))
    if len(seeds) < 2:
        raise ComparisonError(f"a seed sweep needs at least 2 different seeds, got {seeds}")
    out = Path(out).resolve()
    runs = []
    for k, seed in enumerate(seeds, 1):
        progress(f"[seeds] {k}/{len(seeds)}: seed {seed} -> {out / f'seed-{seed}'}")
        runs.append(compare(site_datalists, out / f"seed-{seed}", settings.with_seed(seed),
                            methods=methods, data_root=data_root, progress=progress, console=console))
    sweep = SeedSweep(out, seeds, runs)
    sweep.write()
    return sweep
