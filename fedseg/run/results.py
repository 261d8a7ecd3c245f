"""Turn what an NVFlare server wrote for a job into fedseg's run-folder results.

Reads (paths inside the server's job folder: the simulator's ``server/simulate_job`` or a POC/real
download's ``workspace``):

- ``metrics/round_metrics.jsonl``: per round, each site's validation of the received global model;
- ``metrics/site_metrics.jsonl``: every scalar the sites streamed (our ``JsonlMetricsReceiver``);
- ``cross_site_val/cross_val_results.json``: every model scored on every site;
- ``metrics/participation_summary.json``: which site answered, failed or was missing in which round
  (``fedseg.app.resilient_fedavg``);
- ``metrics/personal_scores.json``: personalized methods: each site's personal model on its own
  validation cases;
- ``app_server/best_FL_global_model.pt`` and ``FL_global_model.pt``.

Writes to the run folder::

    RUN/results.json          final per-site x region table, cross-site matrix, per-round curve
    RUN/results.csv           model, site, region, dice, iou, hd95 (one row each)
    RUN/rounds.csv            round, site, every validation metric of the global model
    RUN/val_dice_per_round.png
    RUN/checkpoints/{best,final}_global.ckpt   Lightning checkpoints of the global models
    RUN/checkpoints/final_global_group-<g>.ckpt  grouped jobs: each site group's final model
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedseg.lightning_modules.history import write_rows
from fedseg.lightning_modules.labels import REGIONS
from fedseg.lightning_modules.owner_only import owner_only_dir, owner_only_files

FINAL_MODEL = "SRV_FL_global_model.pt"
BEST_MODEL = "SRV_best_FL_global_model.pt"
#: the table of the personalized methods' personal models (one per site)
PERSONAL = "personal"


class ResultsError(RuntimeError):
    """A server folder without the files a finished job leaves."""


@dataclass
class FederatedResults:
    """The numbers of one federated job, as written to ``results.json``."""

    rounds: list[dict[str, Any]]  # {"round", "site", <metric>: value} (site "mean" = weighted mean)
    cross_site: dict[str, dict[str, dict[str, float]]]  # model -> site -> metrics
    sites: list[str]
    job: dict[str, Any] = field(default_factory=dict)
    checkpoints: dict[str, str] = field(default_factory=dict)
    participation: dict[str, Any] = field(default_factory=dict)  # participation_summary.json, if any
    last_val_dice: dict[str, float] = field(default_factory=dict)  # site -> last val_dice it streamed
    personal: dict[str, dict[str, float]] = field(default_factory=dict)  # site -> its personal model's scores

    def missed_rounds(self) -> dict[str, dict[str, str]]:
        """``site -> {round: why}`` for every site that missed a round (empty when none did)."""
        sites = self.participation.get("sites", {})
        return {site: entry["why"] for site, entry in sites.items() if entry.get("rounds_missed")}

    def final_table(self, model: str = FINAL_MODEL) -> list[dict[str, Any]]:
        """Rows ``{site, region, dice, iou, hd95}`` of ``model`` on every site, plus mean and worst
        (``model`` "personal": each site's personal model)."""
        rows = []
        scores = self.personal if model == PERSONAL else self.cross_site.get(model, {})
        for site in self.sites:
            metrics = scores.get(site, {})
            for region in (*REGIONS, "mean"):
                suffix = "" if region == "mean" else f"_{region.lower()}"
                rows.append(
                    {
                        "site": site,
                        "region": region,
                        "dice": metrics.get(f"val_dice{suffix}", math.nan),
                        "iou": metrics.get(f"val_iou{suffix}", math.nan),
                        "hd95": metrics.get(f"val_hd95{suffix}", math.nan),
                    }
                )
        per_site = list(rows)
        for region in (*REGIONS, "mean"):
            of_region = [r for r in per_site if r["region"] == region]
            if of_region:
                rows.append({"site": "MEAN", "region": region, **_mean(of_region)})
        for region in (*REGIONS, "mean"):
            of_region = [r for r in per_site if r["region"] == region]
            if of_region:
                worst = min(of_region, key=lambda r: _nan_low(r["dice"]))
                rows.append({"site": f"WORST ({worst['site']})", "region": region, **{k: worst[k] for k in ("dice", "iou", "hd95")}})
        return rows

    def to_json(self) -> dict[str, Any]:
        return {
            "job": self.job,
            "sites": self.sites,
            "final_global_model": self.final_table(FINAL_MODEL),
            "best_global_model": self.final_table(BEST_MODEL),
            "personal_models": self.final_table(PERSONAL) if self.personal else [],
            "cross_site_val_dice": {m: {s: v.get("val_dice") for s, v in by_site.items()} for m, by_site in self.cross_site.items()},
            "rounds": self.rounds,
            "checkpoints": self.checkpoints,
            "participation": self.participation,
        }


def _mean(rows: list[dict[str, Any]]) -> dict[str, float]:
    out = {}
    for key in ("dice", "iou", "hd95"):
        values = [r[key] for r in rows if not math.isnan(r[key])]
        out[key] = sum(values) / len(values) if values else math.nan
    return out


def _nan_low(x: float) -> float:
    return -math.inf if math.isnan(x) else x


def read_round_metrics(server_dir: Path) -> list[dict[str, Any]]:
    """Per-round rows from ``metrics/round_metrics.jsonl`` (one per site, plus the weighted mean)."""
    path = server_dir / "metrics" / "round_metrics.jsonl"
    rows: list[dict[str, Any]] = []
    if not path.exists():
        return rows
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        rnd = record.get("round")
        for site in record.get("sites", []):
            row = {"round": rnd, "site": site["name"], "weight": site.get("weight")}
            row.update({m["name"]: m["value"] for m in site.get("metrics", [])})
            rows.append(row)
        mean = {m["name"]: m["value"] for m in record.get("aggregated_metrics", [])}
        if mean:
            rows.append({"round": rnd, "site": "mean", **mean})
    return rows


def read_cross_site(server_dir: Path) -> dict[str, dict[str, dict[str, float]]]:
    """``model -> site -> metrics`` from cross-site evaluation (NVFlare stores it site-first)."""
    path = server_dir / "cross_site_val" / "cross_val_results.json"
    if not path.exists():
        return {}
    by_site = json.loads(path.read_text(encoding="utf-8"))
    by_model: dict[str, dict[str, dict[str, float]]] = {}
    for site, models in by_site.items():
        for model, metrics in (models or {}).items():
            by_model.setdefault(model, {})[site] = metrics or {}
    return by_model


def global_checkpoint(pt_file: Path, hyper_parameters: dict[str, Any], out: Path) -> Path:
    """Save NVFlare's global model file as a Lightning checkpoint that
    ``SegmentationModule.load_from_checkpoint`` (and ``fedseg evaluate/predict``) read."""
    import pytorch_lightning as pl
    import torch

    from fedseg.lightning_modules.safe_load import load_checkpoint

    saved = load_checkpoint(pt_file)
    state = saved.get("model", saved)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    torch.save({"state_dict": state, "hyper_parameters": hyper_parameters, "pytorch-lightning_version": pl.__version__}, tmp)
    tmp.replace(out)
    return out


def collect_results(
    server_dir: Path,
    out: Path,
    *,
    job: dict[str, Any] | None = None,
    hyper_parameters: dict[str, Any] | None = None,
    encoder_only: bool = False,
) -> FederatedResults:
    """Read a finished job's server folder and write the run folder's results files.

    With ``encoder_only`` (FedPer) the global checkpoints are named ``*_global_encoder.ckpt``: they
    load with ``SharedEncoder``; ``fedseg personalize`` adds a site's head to make a full model.
    """
    server_dir, out = Path(server_dir), Path(out)
    if not (server_dir / "app_server").exists() and not (server_dir / "metrics").exists():
        raise ResultsError(f"{server_dir}: not a server job folder (no app_server/ or metrics/)")
    rounds = read_round_metrics(server_dir)
    cross = read_cross_site(server_dir)
    personal_file = server_dir / "metrics" / "personal_scores.json"
    personal_sites = (set(json.loads(personal_file.read_text(encoding="utf-8")).get("scores", {}))
                      if personal_file.is_file() else set())
    sites = sorted({r["site"] for r in rounds if r["site"] != "mean"} | {s for m in cross.values() for s in m}
                   | personal_sites)
    results = FederatedResults(rounds=rounds, cross_site=cross, sites=sites, job=job or {})
    summary = server_dir / "metrics" / "participation_summary.json"
    if summary.is_file():
        results.participation = json.loads(summary.read_text(encoding="utf-8"))
    personal = server_dir / "metrics" / "personal_scores.json"
    if personal.is_file():
        results.personal = json.loads(personal.read_text(encoding="utf-8")).get("scores", {})
    streamed = server_dir / "metrics" / "site_metrics.jsonl"
    if streamed.is_file():
        for line in streamed.read_text(encoding="utf-8").splitlines():
            record = json.loads(line) if line.strip() else {}
            if record.get("key") == "val_dice":
                results.last_val_dice[record["site"]] = float(record["value"])

    # global checkpoints and per-site scores come from the sites' patients: owner-only, like
    # fedseg train's run folder (folder 0700, files 0600, also the ones matplotlib writes)
    owner_only_dir(out)
    with owner_only_files():
        _write_results(results, server_dir, out, rounds, cross, hyper_parameters, encoder_only)
    return results


def _write_results(results: FederatedResults, server_dir: Path, out: Path, rounds: list[dict[str, Any]],
                   cross: dict[str, Any], hyper_parameters: dict[str, Any] | None, encoder_only: bool) -> None:
    if hyper_parameters is not None:
        for name, file in (("best", "best_FL_global_model.pt"), ("final", "FL_global_model.pt")):
            pt = server_dir / "app_server" / file
            if pt.exists():
                suffix = "_encoder" if encoder_only else ""
                ckpt = global_checkpoint(pt, hyper_parameters, out / "checkpoints" / f"{name}_global{suffix}.ckpt")
                results.checkpoints[name] = str(ckpt)
        # grouped jobs (fedseg.app.grouped_fedavg): one final model per site group
        for pt in sorted((server_dir / "app_server" / "groups").glob("*/FL_global_model.pt")):
            group = pt.parent.name
            ckpt = global_checkpoint(pt, hyper_parameters, out / "checkpoints" / f"final_global_group-{group}.ckpt")
            results.checkpoints[f"final_group-{group}"] = str(ckpt)

    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results.to_json(), indent=2, default=str) + "\n", encoding="utf-8")
    table = [{"model": "final", **r} for r in results.final_table(FINAL_MODEL)]
    table += [{"model": "best", **r} for r in results.final_table(BEST_MODEL)]
    if results.personal:
        table += [{"model": "personal", **r} for r in results.final_table(PERSONAL)]
    write_rows(out / "results.csv", table, first=("model", "site", "region", "dice", "iou", "hd95"))
    if rounds:
        write_rows(out / "rounds.csv", rounds, first=("round", "site", "val_dice"))
        plot_rounds(results, out / "val_dice_per_round.png")
    if len(cross) > 1:
        plot_cross_site(results, out / "cross_site.png")


def plot_rounds(results: FederatedResults, out: Path) -> Path:
    """val_dice of the global model per round at each site (and their weighted mean), the final model last."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    n_rounds = max((r["round"] for r in results.rounds), default=0) + 1
    final = results.cross_site.get(FINAL_MODEL, {})
    for site in [*results.sites, "mean"]:
        pts = [(r["round"] + 1, r["val_dice"]) for r in results.rounds if r["site"] == site and "val_dice" in r]
        if site in final and "val_dice" in final[site]:
            pts.append((n_rounds + 1, final[site]["val_dice"]))  # the final model, scored in cross-site eval
        elif site == "mean" and final:
            scores = [m["val_dice"] for m in final.values() if "val_dice" in m]
            pts.append((n_rounds + 1, sum(scores) / len(scores)))  # unweighted: cross-site eval has no weights
        if pts:
            label = "mean (weighted by cases)" if site == "mean" else site
            ax.plot(*zip(*pts), marker="o", markersize=3, label=label, linewidth=2.5 if site == "mean" else 1.2,
                    color="black" if site == "mean" else None)
    ax.set(xlabel=f"round (the global model each site received; {n_rounds + 1}: the final model)",
           ylabel="mean Dice over ET, TC, WT (val_dice)", ylim=(0, 1),
           title="Global model on each site's own validation cases, per round")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.savefig(out, dpi=110)
    return out


def plot_cross_site(results: FederatedResults, out: Path) -> Path:
    """The cross-site matrix as a heat map: every model (rows) scored on every site's data (columns)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    models = sorted(results.cross_site, key=lambda m: (not m.startswith("SRV"), m))
    values = np.array([[results.cross_site[m].get(s, {}).get("val_dice", np.nan) for s in results.sites] for m in models])
    fig = Figure(figsize=(2.2 + 1.3 * len(results.sites), 1.4 + 0.55 * len(models)), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    image = ax.imshow(values, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    names = {"SRV_FL_global_model.pt": "final global model", "SRV_best_FL_global_model.pt": "best global model"}
    ax.set_xticks(range(len(results.sites)), results.sites)
    ax.set_yticks(range(len(models)), [names.get(m, f"{m}'s local model") for m in models])
    for (i, j), value in np.ndenumerate(values):
        if not np.isnan(value):
            ax.text(j, i, f"{value:.3f}", ha="center", va="center", color="white" if value < 0.6 else "black", fontsize=9)
    ax.set(xlabel="site whose validation cases scored the model", title="Cross-site evaluation: mean Dice (val_dice)")
    fig.colorbar(image, ax=ax, label="val_dice")
    fig.savefig(out, dpi=110)
    return out


def _region_table(results: FederatedResults, model: str, title: str) -> list[str]:
    """One row per site (and their mean): Dice per region, the mean region, HD95 of the mean region."""
    rows = {(r["site"], r["region"]): r for r in results.final_table(model)}
    width = max(10, *(len(s) + 2 for s in results.sites))
    lines = [title, f"{'site':<{width}}" + "".join(f"{r:>8}" for r in (*REGIONS, "mean")) + f"{'HD95 mm':>10}"]
    for site in (*results.sites, "MEAN"):
        if (site, "mean") not in rows:
            continue
        dice = "".join(f"{rows[(site, r)]['dice']:>8.4f}" for r in (*REGIONS, "mean"))
        lines.append(f"{site.lower() if site == 'MEAN' else site:<{width}}{dice}{rows[(site, 'mean')]['hd95']:>10.2f}")
    worst = next((r for (site, region), r in rows.items() if site.startswith("WORST") and region == "mean"), None)
    if worst is not None and len(results.sites) > 1:
        lines.append(f"worst site: {worst['site'][7:-1]} (mean Dice {worst['dice']:.4f})")
    return lines


def format_table(results: FederatedResults, model: str = FINAL_MODEL) -> str:
    """The final model's Dice per site and region, each site's personal model's (personalized
    methods), the cross-site val_dice matrix and who missed rounds, as text."""
    lines: list[str] = []
    if results.personal:  # a personalized method: each site's own model is what it uses
        lines += _region_table(results, PERSONAL, "personal models: each site's own, on its own validation cases (Dice)")
        lines.append("")
    if results.cross_site.get(model):
        name = "final global model" if model == FINAL_MODEL else model
        lines += _region_table(results, model, f"{name} on each site's own validation cases (Dice)")
    if len(results.cross_site) > 1:
        models = sorted(results.cross_site)
        lines += ["", "cross-site val_dice (rows: model, columns: site whose data scored it)"]
        lines.append(f"{'model':<30}" + "".join(f"{s:>12}" for s in results.sites))
        for m in models:
            cells = "".join(f"{results.cross_site[m].get(s, {}).get('val_dice', math.nan):>12.4f}" for s in results.sites)
            lines.append(f"{m:<30}{cells}")
    if not results.cross_site and results.last_val_dice:  # e.g. grouped jobs: no cross-site evaluation
        lines += ["", "no cross-site evaluation; the last val_dice each site streamed (the model it received last):"]
        lines += [f"  {site:<20}{dice:.4f}" for site, dice in sorted(results.last_val_dice.items())]
    missed = results.missed_rounds()
    if missed or results.participation.get("status", "completed") != "completed":
        lines += ["", f"participation: {results.participation.get('status')}"
                  + (f" ({results.participation['reason']})" if results.participation.get("reason") else "")]
        for site, why in missed.items():
            lines.append(f"  {site} missed round(s) " + ", ".join(f"{r} ({w})" for r, w in why.items()))
    return "\n".join(lines)
