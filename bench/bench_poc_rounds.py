"""The fixed cost of a round in POC mode, and of ``nvflare job submit``: fedseg's exported job
settings against NVFlare's stock timing, both measured in one run.

One run generates tiny synthetic sites, exports one FedAvg job with the settings every exported
job has (``fedseg jobs export``: adaptive task waits up to ``poll_interval`` = 2 s, the quick
trainer hand-off, a 0.05 s round check; ``fedseg.app.task_timing``) and a copy with NVFlare's
stock timing (every reply tells a site to wait the fixed 2 s, the in-process hand-off polls every
0.5 s, FedAvg's 0.5 s round check). Each runs a whole POC cycle (``nvflare poc prepare/start``,
``nvflare job submit``, wait, download, stop) with the same data and seed.

Reported per variant:

* **per-round overhead**: a round's wall time (server log, from "Round k: sending the global model"
  to round k+1's) minus the slowest site's train+validate time that round (printed by each site
  itself, ``[fedseg] round r/R site: ... <s>s``); median over rounds 2..R (round 1 pays the site
  processes' start-up);
* **task requests** per site and round (``AdaptiveTaskWait`` counts them; the stock copy keeps it
  with a fixed 2 s wait, which is what NVFlare itself sends), and, from them, what the polling of
  20 idle sites costs the server at the CPU per request given with ``--request-cpu-ms``;
* **submit**: the seconds ``nvflare job submit -j`` took (it imports every class the job names),
  and, without a server, the seconds the CLI spends before it looks at the startup kit, for the
  job as exported and for a copy whose server model is the Lightning ``SegmentationModule`` (what
  the jobs named before ``fedseg.app.global_model``): the cost of indexing the job's classes.

    .venv/bin/python bench/bench_poc_rounds.py                 # ~3 min on 2 CPU cores
    .venv/bin/python bench/bench_poc_rounds.py --rounds 12 --sites 3
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_fl import parse_server_log  # noqa: E402  (bench/ is not a package)

_SITE_ROUND = re.compile(r"\[fedseg\] round (\d+)/(\d+) (\S+): .* (\d+(?:\.\d+)?)s\s*$")
_REQUESTS = re.compile(r"task requests: (.*)$")
_REQUEST = re.compile(r"(\S+) (\d+) \((\d+) try again\)")


def stock_timing(job_dir: Path) -> None:
    """Rewrite an exported job folder to NVFlare's stock timing (see the module docstring)."""
    server_cfg = job_dir / "app" / "config" / "config_fed_server.json"
    client_cfg = job_dir / "app" / "config" / "config_fed_client.json"
    server = json.loads(server_cfg.read_text())
    for component in server["components"]:
        if component["id"] == "fedseg_task_wait":
            component["args"] = {"longest_wait": 2.0, "first_wait": 2.0}
    for workflow in server["workflows"]:
        if "task_check_period" in workflow.get("args", {}):
            workflow["args"]["task_check_period"] = 0.5
    server.get("server", {}).pop("task_request_interval", None)
    server_cfg.write_text(json.dumps(server, indent=2))
    client = json.loads(client_cfg.read_text())
    client["components"] = [c for c in client["components"] if c["id"] != "fedseg_result_handoff"]
    client_cfg.write_text(json.dumps(client, indent=2))


def site_compute(logs: dict[str, Path]) -> dict[int, dict[str, float]]:
    """Per round (0-based) and site, the seconds the site printed for validate + train."""
    compute: dict[int, dict[str, float]] = {}
    for site, log in logs.items():
        for line in log.read_text(errors="replace").splitlines():
            if m := _SITE_ROUND.search(line):
                compute.setdefault(int(m.group(1)) - 1, {})[site] = float(m.group(4))
    return compute


def task_requests(server_log: Path) -> dict[str, tuple[int, int]]:
    for line in server_log.read_text(errors="replace").splitlines():
        if m := _REQUESTS.search(line):
            return {s: (int(n), int(again)) for s, n, again in _REQUEST.findall(m.group(1))}
    raise RuntimeError(f"{server_log}: no 'task requests:' line (AdaptiveTaskWait missing?)")


def server_log_of(workspace: Path) -> Path:
    for candidate in (workspace / "log.txt", *sorted(workspace.glob("**/log.txt"))):
        if candidate.is_file() and "sending the global model" in candidate.read_text(errors="replace"):
            return candidate
    raise FileNotFoundError(f"{workspace}: no server log with rounds")


def measure(name: str, job_dir: Path, datalists: dict[str, Path], root: Path, rounds: int) -> dict:
    from fedseg.run.poc import run_poc

    result = run_poc(job_dir, datalists, workspace=root / f"poc-{name}", timeout=900)
    if not result.ok:
        raise RuntimeError(f"{name}: the POC job ended {result.status}; see {root / f'poc-{name}'}")
    server_log = server_log_of(result.server_workspace)
    starts, finished = parse_server_log(server_log)
    bounds = [starts[k] for k in range(rounds)] + [finished]
    walls = [b - a for a, b in zip(bounds, bounds[1:])]
    compute = site_compute(result.site_logs)
    slowest = [max(compute[k].values()) for k in range(rounds)]
    overhead = [w - c for w, c in zip(walls, slowest)]
    requests = task_requests(server_log)
    return {
        "variant": name,
        "round_s": statistics.median(walls[1:]),
        "compute_s": statistics.median(slowest[1:]),
        "overhead_s": statistics.median(overhead[1:]),
        "overhead_max_s": max(overhead[1:]),
        "requests_per_site_round": statistics.mean(n for n, _ in requests.values()) / rounds,
        "try_again_per_site_round": statistics.mean(a for _, a in requests.values()) / rounds,
        "submit_s": result.timings.get("submit"),
        "job_s": finished - starts[0],
    }


def index_seconds(job_dir: Path, empty_kit: Path, repeats: int = 3) -> float:
    """Median seconds of ``nvflare job submit -j job_dir`` up to its refusal of an empty startup kit."""
    import subprocess
    import time

    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "nvflare.cli", "job", "submit", "-j", str(job_dir), "--startup-kit",
                        str(empty_kit)], capture_output=True, timeout=300)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--request-cpu-ms", type=float, default=6.0,
                        help="server CPU per task request (server parent + job process), for the 20-site figure")
    parser.add_argument("--out", type=Path, default=None, help="keep the run here (default: a temporary folder)")
    args = parser.parse_args(argv)

    from fedseg.config import FederationSettings, profile
    from fedseg.jobs.base import Job, export
    from fedseg.lightning_modules.data.synth import SynthConfig, generate

    root = args.out or Path(tempfile.mkdtemp(prefix="bench_poc_rounds_"))
    root.mkdir(parents=True, exist_ok=True)
    study = profile("tiny").override(rounds=args.rounds, sites=args.sites,
                                     poll_interval=FederationSettings().poll_interval)  # the exported jobs' wait
    s = study.synth
    synth = generate(SynthConfig(n_sites=s.sites, cases_per_site=s.cases, shape=(s.size,) * 3,
                                 heterogeneity=s.heterogeneity, seed=s.synth_seed), root / "synth")
    datalists = dict(synth.datalists)
    job = Job(algorithm="fedavg", study=study, name="fedavg", min_clients=len(datalists), cross_site_eval=False)
    ours = export(job, root / "jobs-fedseg")
    stock = root / "jobs-stock" / ours.name
    shutil.copytree(ours, stock)
    stock_timing(stock)
    print(f"POC, {len(datalists)} sites x {args.rounds} rounds, tiny profile; load {os.getloadavg()[0]:.1f}; {root}",
          flush=True)
    rows = [measure("nvflare-stock", stock, datalists, root, args.rounds),
            measure("fedseg", ours, datalists, root, args.rounds)]

    print(f"\n{'variant':<15}{'round s':>9}{'compute s':>11}{'overhead s':>12}{'max':>7}"
          f"{'requests/site/round':>22}{'submit s':>10}")
    for r in rows:
        print(f"{r['variant']:<15}{r['round_s']:>9.2f}{r['compute_s']:>11.2f}{r['overhead_s']:>12.2f}"
              f"{r['overhead_max_s']:>7.2f}{r['requests_per_site_round']:>22.1f}{r['submit_s'] or float('nan'):>10.1f}")
    stock_row, ours_row = rows
    print(f"\noverhead per round: fedseg / stock = {ours_row['overhead_s'] / stock_row['overhead_s']:.2f}"
          f" ({ours_row['overhead_s']:.2f} s vs {stock_row['overhead_s']:.2f} s)")
    # Idle polling: a site that waits W seconds for slower sites asks ~log2(W/0.1) + (W - 3.1)/2 times
    # with the adaptive wait, W/2 times with the stock one; at 20 sites idle for a whole minute:
    adaptive = 5 + (60 - 3.1) / 2
    stock_rate = 60 / 2
    for label, per_min in (("stock", stock_rate), ("fedseg", adaptive)):
        cpu = 20 * per_min / 60 * args.request_cpu_ms / 1000
        print(f"20 idle sites, {label}: {20 * per_min / 60:.1f} requests/s, ~{cpu:.2f} server cores "
              f"at {args.request_cpu_ms:g} ms per request")
    lightning = root / "jobs-lightning" / ours.name
    shutil.copytree(ours, lightning)
    config = lightning / "app" / "config" / "config_fed_server.json"
    config.write_text(config.read_text().replace('"fedseg.app.global_model.GlobalModel"',
                                                 '"fedseg.lightning_modules.module.SegmentationModule"'))
    (root / "empty-kit").mkdir(exist_ok=True)
    index = {name: index_seconds(folder, root / "empty-kit") for name, folder in (("ours", ours), ("lightning", lightning))}
    print(f"nvflare job submit, indexing the job (no server): {index['ours']:.1f} s as exported, "
          f"{index['lightning']:.1f} s with a Lightning server model (ratio {index['ours'] / index['lightning']:.2f})")
    rows.append({"variant": "submit-index", **index})
    (root / "bench_poc_rounds.json").write_text(json.dumps(rows, indent=2))
    print(f"machine load after: {os.getloadavg()[0]:.1f}; numbers: {root / 'bench_poc_rounds.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
