"""Run a fedseg job in NVFlare's simulator on given site datalists, into a run folder.

Each simulated site gets a site-local configuration file exactly as a hospital would
(``RUN/site_configs/<site>.json``, found through ``$FEDSEG_SITE_CONFIG``), so the job itself is
the same one that POC mode and real sites run.

Run folder::

    RUN/job.json                 the job's arguments
    RUN/site_configs/<site>.json
    RUN/heads/<site>/<study>.pt  FedPer heads (site-local; in a real study they stay at the site)
    RUN/nvflare/<job>/...        NVFlare's simulator workspace (server and site logs)
    RUN/wandb/offline-run-*      one W&B run per site, with ``job.wandb != "off"`` (server-side receiver)
    RUN/results.json, results.csv, rounds.csv, val_dice_per_round.png, checkpoints/  (fedseg.run.results)
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

from fedseg.config import OFF
from fedseg.app.site_config import ENV_VAR, write_site_config
from fedseg.run.progress import FederatedProgress, simulator_logs
from fedseg.jobs.base import Job, build_recipe, execute
from fedseg.provisioning.site_control import allow_fedseg_classes_in_simulator
from fedseg.run.results import FederatedResults, collect_results


def simulate(
    job: Job,
    site_datalists: dict[str, Path],
    run_dir: Path,
    *,
    data_roots: dict[str, Path] | None = None,
    threads: int | None = None,
    personal_stores: Path | None = None,
    site_settings: dict[str, dict[str, Any]] | None = None,
    console: Any = None,
    round_lines: bool = True,
) -> FederatedResults:
    """Run ``job`` in the simulator with one site per datalist; returns the collected results.

    ``personal_stores``: folder of the sites' personal model stores (``<folder>/<site>/``: FedPer's and
    FedRep's heads, Ditto's and the fine-tuned models), default ``RUN/heads``; pass the same folder
    to a later job of the study to go on with them.
    ``site_settings``: more entries of a site's own config (e.g. ``{"site-2": {"fault_drill": ...}}``).
    ``console``: where to show the run's progress (``fedseg.run.console.Console``; None: nothing),
    with one line per finished round unless ``round_lines`` is False.
    """
    from nvflare.recipe import SimEnv

    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "job.json").write_text(json.dumps(job.to_json(), indent=2) + "\n")
    configs = run_dir / "site_configs"
    for site, datalist in site_datalists.items():
        root = (data_roots or {}).get(site)
        heads = Path(personal_stores or run_dir / "heads").resolve() / site
        extra = (site_settings or {}).get(site, {})
        write_site_config(configs / f"{site}.json", datalist, root, cache_dir=run_dir / "cache" / site, head_store=heads, **extra)

    recipe = build_recipe(job)
    allow_fedseg_classes_in_simulator(run_dir / "nvflare" / job.name)
    env = SimEnv(
        clients=list(site_datalists),
        num_threads=threads or len(site_datalists),
        workspace_root=str(run_dir / "nvflare"),
    )
    # the simulated sites inherit the site configs; the server's W&B receiver writes RUN/wandb
    overrides = {ENV_VAR: str(configs), **({"WANDB_DIR": str(run_dir)} if job.addons.wandb != OFF else {})}
    previous = {name: os.environ.get(name) for name in overrides}
    os.environ.update(overrides)
    started = time.time()
    server_dir = run_dir / "nvflare" / job.name / "server" / "simulate_job"
    progress: Any = contextlib.nullcontext()
    if console is not None:
        site_logs, server_log = simulator_logs(run_dir / "nvflare", job.name, list(site_datalists))
        progress = FederatedProgress(console, list(site_datalists), site_logs, server_log, title=job.name,
                                     round_lines=round_lines)
    try:
        with progress:
            execute(recipe, env)
    except RuntimeError as err:
        # A study that stopped below its minimum of sites ends the simulation with an error status;
        # its rounds, checkpoint and participation report are results like any other.
        reason = _stop_reason(server_dir)
        if reason is None:
            raise
        (console.print if console is not None else print)(f"the job stopped: {reason} ({err})")
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    job_info: dict[str, Any] = {**job.to_json(), "environment": "simulator", "seconds": round(time.time() - started, 1)}
    return collect_results(
        server_dir, run_dir, job=job_info, hyper_parameters=job.checkpoint_hparams(), encoder_only=bool(job.personal_keys())
    )


def _stop_reason(server_dir: Path) -> str | None:
    """Why the job stopped, if the resilient workflow stopped it (``participation_summary.json``)."""
    summary = server_dir / "metrics" / "participation_summary.json"
    if not summary.is_file():
        return None
    doc = json.loads(summary.read_text())
    return doc.get("reason") if doc.get("status") == "stopped" else None
