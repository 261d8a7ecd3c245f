"""What federation costs: a FedAvg job in NVFlare's simulator vs centralized training of the same data.

One run generates synthetic sites (``fedseg.lightning_modules.data.synth``) and trains the same tiny
network (same batch size, lr, cosine schedule over the same total epochs) twice:

* **federated**: ``fedseg.run.simulate.simulate`` with ``N`` rounds x ``E`` local epochs, sites running
  concurrently (one simulator process each, ``--site-threads`` torch threads each);
* **centralized**: ``training.train`` for ``N x E`` epochs on the union of the sites' datalists, in
  a fresh Python process (as ``fedseg train`` runs), with as many torch threads as the sites use
  together, so both sides pay their imports and get the same cores.

Reported:

1. **Wall time**, FL / centralized, end to end (process start to results) and for the steady part
   (one FL round against ``E`` centralized epochs).
2. **Per-round overhead**, the time of a round not spent on site compute. The measure:

   * a round's wall time comes from the server log: from "Round k: sending the global model" to round k+1's
     (the last round ends at "Finished FedAvg");
   * a site's compute in a round is what the site script itself prints
     (``[fedseg] round r/R site: ... <s>s``, 0.01 s resolution): from ``flare.receive()`` returning to
     the end of ``trainer.fit``, i.e. the validation of the received global model plus ``E`` local
     epochs (each with its own validation, as in centralized training). It is measured inside the
     site process, so no guess about log latency enters; it includes the hand-over of the update
     to the in-process executor (small), so the overhead derived from it is a lower bound;
   * the sites run at the same time, so a round's compute on the critical path is the **slowest
     site's**, not the sum over sites (a sum would count overlapping seconds twice);
   * overhead = round wall - slowest site's compute, also as a fraction of the round.

   The one-off start-up cost is separated from the steady per-round cost in two independent ways:
   from the logs (steady round = median of rounds 2..N, whose sites are warm; fixed = job wall -
   N x steady round: simulator start, site process imports, data check and cache build in round 1,
   shutdown), and, with ``--slope-rounds N1``, from a second, shorter job: per round = (T(N) -
   T(N1)) / (N - N1), fixed = T(N) - N x per round.
3. **Bytes per round**: the ``SegmentationModule`` state dict (sum of numel x element_size) that
   the server sends to every site and every site sends back (sites x 2 per round), next to what
   NVFlare's logs say it moved (tensor streams plus task headers), as MB and as a ratio to one
   training case's files on disk (and to the case as a float32 tensor).

On a CPU only the ratios and relative numbers are claims; absolute times mean something on a GPU
(``--accelerator`` is Lightning's, "auto" uses one when present). The machine's load average is
printed before and after: other processes on the machine skew the ratios.

    .venv/bin/python bench/bench_fl.py                      # ~2 min on 2 CPU cores (3 jobs)
    .venv/bin/python bench/bench_fl.py --sites 3 --cases 8 --size 48 --roi 48 --rounds 8 --local-epochs 2
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

MB = 1e6
_TIMESTAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) - ")
_ROUND_STARTED = re.compile(r"Round (\d+): sending the global model")  # ResilientFedAvg, 1-based
_FINISHED = re.compile(r"Finished FedAvg\.")
_SITE_ROUND = re.compile(r"\[fedseg\] round (\d+)/(\d+) (\S+): .* (\d+(?:\.\d+)?)s\s*$")
_POLL_INTERVAL = re.compile(r"Finished one task run for client: \S+ interval: ([\d.]+)")
# NVFlare 2.9's transfer lines, as written in a site's log:
_MODEL_DOWN = re.compile(r"\[client\] download ref=\S+ done: .*\(([\d,]+) bytes\)")  # global model to the site
_MODEL_UP = re.compile(r"\[server\] download tx \S+ done: .*\(([\d,]+) bytes\)")  # site's update to the server
_HEADER_DOWN = re.compile(r"getTask: train size: .*\(([\d,]+) Bytes\)")
_HEADER_UP = re.compile(r"SubmitUpdate to: server\. size: .*\(([\d,]+) Bytes\)")


# ---------------------------------------------------------------------------------------------
# measurements


@dataclass
class FederatedTiming:
    """One simulator job: its wall time and what its logs say about each round."""

    rounds: int
    wall_s: float
    pre_s: float  # simulate() called -> server starts round 1
    round_wall_s: list[float]  # per round, from the server log
    post_s: float  # "Finished FedAvg" -> simulate() returned
    site_compute_s: dict[int, dict[str, float]]  # round (0-based) -> site -> seconds
    poll_interval_s: float | None  # how long a site waits after a task before asking for the next
    bytes_down: int = 0  # logged: global models + task headers received by all sites
    bytes_up: int = 0  # logged: updates + headers sent by all sites

    def critical_compute(self, k: int) -> float:
        return max(self.site_compute_s.get(k, {}).values(), default=float("nan"))

    def steady_rounds(self) -> list[int]:
        """Rounds after the first (the first one also waits for the sites' imports and cache build)."""
        return list(range(1, self.rounds)) if self.rounds > 1 else [0]


@dataclass
class CentralizedTiming:
    """One centralized run in its own process."""

    wall_s: float  # process start -> exit
    import_s: float  # child: torch / Lightning / fedseg imports
    train_s: float  # child: the train() call
    epoch_end_s: list[float] = field(default_factory=list)  # child: perf_counter at each val_dice

    def epoch_s(self) -> float:
        """Median time of one epoch (training + validation), from consecutive epoch ends."""
        gaps = [b - a for a, b in zip(self.epoch_end_s, self.epoch_end_s[1:])]
        return statistics.median(gaps) if gaps else self.train_s


def log_time(stamp: str) -> float:
    """An NVFlare log timestamp (local time, ms) as seconds since the epoch, like ``time.time()``."""
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def parse_server_log(path: Path) -> tuple[dict[int, float], float | None]:
    """Start time of every round, and the time FedAvg finished (the banners follow a timed line)."""
    starts: dict[int, float] = {}
    finished = None
    last = None
    for line in path.read_text(errors="replace").splitlines():
        m = _TIMESTAMP.match(line)
        if m:
            last = log_time(m.group(1))
        if (r := _ROUND_STARTED.search(line)) and last is not None:
            starts[int(r.group(1)) - 1] = last  # 0-based, as the sites' rounds below
        elif _FINISHED.search(line) and last is not None and finished is None:
            finished = last
    return starts, finished


def parse_site_logs(job_dir: Path) -> tuple[dict[int, dict[str, float]], float | None, int, int]:
    """Per round and site, the compute seconds the site printed; poll interval; bytes down and up."""
    compute: dict[int, dict[str, float]] = {}
    intervals: list[float] = []
    down = up = 0
    logs = sorted(job_dir.glob("site-*/log.txt"))
    if not logs:
        raise FileNotFoundError(f"{job_dir}: no site-*/log.txt (did the simulator run?)")
    for log in logs:
        for line in log.read_text(errors="replace").splitlines():
            if m := _SITE_ROUND.search(line):
                compute.setdefault(int(m.group(1)) - 1, {})[m.group(3)] = float(m.group(4))
            elif m := _POLL_INTERVAL.search(line):
                intervals.append(float(m.group(1)))
            elif m := (_MODEL_DOWN.search(line) or _HEADER_DOWN.search(line)):
                down += int(m.group(1).replace(",", ""))
            elif m := (_MODEL_UP.search(line) or _HEADER_UP.search(line)):
                up += int(m.group(1).replace(",", ""))
    return compute, (statistics.median(intervals) if intervals else None), down, up


def run_federated(args: argparse.Namespace, datalists: dict[str, Path], rounds: int, run_dir: Path) -> FederatedTiming:
    """A FedAvg job of ``rounds`` rounds in the simulator, timed by the caller's clock and its logs."""
    from fedseg.run.console import quiet_console
    from fedseg.run.simulate import simulate

    job = make_job(args, len(datalists), rounds)
    console = run_dir.parent / f"{run_dir.name}.console.txt"
    with quiet_console(console):  # the simulator is chatty: its output to the file
        started = time.time()
        simulate(job, datalists, run_dir)
        ended = time.time()

    job_dir = run_dir / "nvflare" / job.name
    starts, finished = parse_server_log(job_dir / "server" / "log.txt")
    if sorted(starts) != list(range(rounds)) or finished is None:
        raise RuntimeError(f"{job_dir}/server/log.txt: expected rounds 0..{rounds - 1} and 'Finished FedAvg', found {sorted(starts)}")
    bounds = [starts[k] for k in range(rounds)] + [finished]
    compute, interval, down, up = parse_site_logs(job_dir)
    missing = [k for k in range(rounds) if len(compute.get(k, {})) != len(datalists)]
    if missing:
        raise RuntimeError(f"{job_dir}: no '[fedseg] round' progress line from every site in rounds {missing}")
    return FederatedTiming(
        rounds=rounds,
        wall_s=ended - started,
        pre_s=starts[0] - started,
        round_wall_s=[b - a for a, b in zip(bounds, bounds[1:])],
        post_s=ended - finished,
        site_compute_s=compute,
        poll_interval_s=interval,
        bytes_down=down,
        bytes_up=up,
    )


def bench_study(args: argparse.Namespace, rounds: int) -> Any:
    """The benchmark's study settings: the tiny profile with the command line's sizes."""
    from fedseg.config import profile

    return profile("tiny").override(rounds=rounds, local_epochs=args.local_epochs, features=args.features,
                                    roi=(args.roi,) * 3, lr=args.lr, batch_size=args.batch_size, hd95=False,
                                    site_threads=args.site_threads, round_timeout=0, poll_interval=2.0)


def make_job(args: argparse.Namespace, n_sites: int, rounds: int) -> Any:
    from fedseg.jobs.base import Job

    return Job(algorithm="fedavg", study=bench_study(args, rounds), min_clients=n_sites,
               cross_site_eval=args.cross_site_eval)


def run_centralized(args: argparse.Namespace, datalists: list[Path], epochs: int, threads: int, out: Path) -> CentralizedTiming:
    """``train()`` in a fresh process (it pays its imports, as the simulator's sites do)."""
    spec = {
        "datalists": [str(p) for p in datalists],
        "out": str(out),
        "study": bench_study(args, args.rounds).to_json(),
        "epochs": epochs,
        "accelerator": args.accelerator,
        "threads": threads,
    }
    report = out.parent / f"{out.name}.timing.json"
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--centralized-child", json.dumps(spec), str(report)],
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"centralized run failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    child = json.loads(report.read_text())
    return CentralizedTiming(wall_s=wall, import_s=child["import_s"], train_s=child["train_s"], epoch_end_s=child["epoch_end_s"])


def centralized_child(spec_json: str, report: Path) -> None:
    """The centralized process: import, train, write the timings as JSON."""
    started = time.perf_counter()
    import torch
    from pytorch_lightning.loggers import Logger

    from fedseg.config import StudyConfig
    from fedseg.lightning_modules.module import SegmentationModule  # noqa: F401  (timed with the imports)
    from fedseg.lightning_modules.training import TrainConfig, train

    spec = json.loads(spec_json)
    torch.set_num_threads(spec["threads"])

    class EpochClock(Logger):
        """Records when each epoch's validation metrics arrive (train() takes loggers, not callbacks)."""

        def __init__(self) -> None:
            super().__init__()
            self.epoch_ends: list[float] = []

        @property
        def name(self) -> str:
            return "epoch_clock"

        @property
        def version(self) -> str:
            return "0"

        def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
            pass

        def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
            if "val_dice" in metrics:
                self.epoch_ends.append(time.perf_counter())

    imported = time.perf_counter()
    cfg = TrainConfig(
        datalists=[Path(p) for p in spec["datalists"]],
        out=Path(spec["out"]),
        study=StudyConfig.from_json(spec["study"]),  # the federated job's own settings
        epochs=spec["epochs"],
        accelerator=spec["accelerator"],
        progress=False,
    )
    clock = EpochClock()
    train(cfg, loggers=[clock])
    done = time.perf_counter()
    report.write_text(
        json.dumps(
            {"import_s": imported - started, "train_s": done - imported, "epoch_end_s": clock.epoch_ends}
        )
    )


def state_dict_bytes(args: argparse.Namespace, n_sites: int) -> int:
    """Bytes of the model a site sends: every tensor of the SegmentationModule's state dict."""
    from fedseg.lightning_modules.module import SegmentationModule

    hparams = make_job(args, n_sites, 1).study.module_args()
    return sum(t.numel() * t.element_size() for t in SegmentationModule(**hparams).state_dict().values())


def case_bytes(datalists: list[Path]) -> tuple[float, float]:
    """Mean bytes of one training case: its files on disk, and its image as a float32 tensor."""
    import nibabel as nib

    from fedseg.lightning_modules.data.datalist import read_datalist

    on_disk, tensor = [], []
    for path in datalists:
        dl = read_datalist(path)
        for case in dl.training:
            files = case.paths(dl.data_root)
            on_disk.append(sum(f.stat().st_size for f in files))
            shape = nib.load(str(case.image_path(case.modalities[0], dl.data_root))).shape[:3]
            tensor.append(4.0 * len(case.modalities) * shape[0] * shape[1] * shape[2])
    return statistics.mean(on_disk), statistics.mean(tensor)


# ---------------------------------------------------------------------------------------------
# report


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} cores"


def report(args: argparse.Namespace, fl: FederatedTiming, short: FederatedTiming | None, central: CentralizedTiming,
           model_bytes: int, case_disk: float, case_tensor: float, n_sites: int, threads: int) -> dict[str, Any]:
    n, e = fl.rounds, args.local_epochs
    steady = fl.steady_rounds()
    steady_wall = statistics.median(fl.round_wall_s[k] for k in steady)
    steady_compute = statistics.median(fl.critical_compute(k) for k in steady)
    steady_overhead = statistics.median(fl.round_wall_s[k] - fl.critical_compute(k) for k in steady)
    fixed_logs = fl.wall_s - n * steady_wall
    central_epochs = central.epoch_s() * e  # centralized time for one round's worth of epochs
    central_fixed = central.wall_s - n * central_epochs

    print("\nper round (server log; site compute = the site's own '[fedseg] round' line, 0.1 s resolution)")
    print(f"  {'round':>5} {'wall s':>8} {'slowest site s':>15} {'sum of sites s':>15} {'overhead s':>11} {'overhead %':>11}")
    for k in range(n):
        c = fl.critical_compute(k)
        total = sum(fl.site_compute_s[k].values())
        w = fl.round_wall_s[k]
        note = "  (includes the sites' imports, data check, cache build)" if k == 0 else ""
        print(f"  {k + 1:>5} {w:8.2f} {c:15.2f} {total:15.2f} {w - c:11.2f} {100 * (w - c) / w:10.0f}%{note}")

    rows: list[tuple[str, str]] = [
        ("FL job wall (simulate call)", f"{fl.wall_s:.1f} s  ({n} rounds x {e} local epochs, {n_sites} sites)"),
        ("centralized wall (process)", f"{central.wall_s:.1f} s  ({n * e} epochs; imports {central.import_s:.1f} s, train() {central.train_s:.1f} s)"),
        ("RATIO FL / centralized, end to end", f"{fl.wall_s / central.wall_s:.2f} x"),
        ("FL steady round wall (median, rounds 2..N)", f"{steady_wall:.2f} s"),
        ("  slowest site's compute in it", f"{steady_compute:.2f} s"),
        ("  overhead (wall - compute)", f"{steady_overhead:.2f} s = {100 * steady_overhead / steady_wall:.0f}% of the round"),
        ("centralized time of E epochs (median epoch x E)", f"{central_epochs:.2f} s"),
        ("RATIO FL steady round / centralized E epochs", f"{steady_wall / central_epochs:.2f} x"),
        ("RATIO slowest site's compute / centralized E epochs", f"{steady_compute / central_epochs:.2f} x"),
        ("FL fixed cost (wall - N x steady round)", f"{fixed_logs:.1f} s = {100 * fixed_logs / fl.wall_s:.0f}% of the job"),
        ("  before round 1 (simulator, processes)", f"{fl.pre_s:.1f} s"),
        ("  round 1 beyond a steady round", f"{fl.round_wall_s[0] - steady_wall:.1f} s"),
        ("  after the last round (shutdown" + (", cross-site eval)" if args.cross_site_eval else ")"), f"{fl.post_s:.1f} s"),
        ("centralized fixed cost (wall - N x E epochs)", f"{central_fixed:.1f} s"),
        ("RATIO FL fixed / centralized fixed", f"{fixed_logs / central_fixed:.2f} x" if central_fixed > 0 else "n/a"),
    ]
    slope = None
    if short is not None:
        per_round = (fl.wall_s - short.wall_s) / (fl.rounds - short.rounds)
        slope = {"rounds": [short.rounds, fl.rounds], "walls_s": [short.wall_s, fl.wall_s], "per_round_s": per_round,
                 "fixed_s": fl.wall_s - fl.rounds * per_round}
        short_fixed = short.wall_s - short.rounds * statistics.median(short.round_wall_s[k] for k in short.steady_rounds())
        rows += [
            (f"slope check: FL job of {short.rounds} rounds", f"{short.wall_s:.1f} s"),
            ("  per round = dT / dN", f"{per_round:.2f} s  (logs: {steady_wall:.2f} s)"),
            ("  fixed = T(N) - N x per round", f"{slope['fixed_s']:.1f} s  (logs: {fixed_logs:.1f} s)"),
            ("  logs' fixed cost of the short job", f"{short_fixed:.1f} s: the slope is off by the difference / (N - N1)"),
        ]
    if fl.poll_interval_s is not None:
        rows.append(("sites' wait before asking for the next task", f"{fl.poll_interval_s:g} s  (NVFlare server.task_request_interval)"))

    per_round_state = n_sites * 2 * model_bytes
    logged = (fl.bytes_down + fl.bytes_up) / n if (fl.bytes_down or fl.bytes_up) and not args.cross_site_eval else None
    rows += [
        ("model update per site (state dict)", f"{model_bytes / MB:.3f} MB = {model_bytes / case_disk:.2f} x one case on disk, "
                                               f"{model_bytes / case_tensor:.2f} x one case as float32"),
        ("per round, all sites x 2 directions", f"{per_round_state / MB:.3f} MB = {per_round_state / case_disk:.2f} x one case on disk"),
        ("  as logged by NVFlare (tensors + task headers)", f"{logged / MB:.3f} MB" if logged else "n/a (cross-site eval on)"),
        ("one training case on disk (mean, 4 modalities + label)", f"{case_disk / MB:.3f} MB  ({case_tensor / MB:.3f} MB as float32)"),
    ]
    width = max(len(k) for k, _ in rows)
    print()
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    print(
        f"\nThe centralized run used {threads} torch thread(s), as many as the {n_sites} concurrent sites x "
        f"{args.site_threads} together. On a CPU only the ratios and relative numbers are claims; absolute times "
        "mean something on a GPU. Every number here comes from this one run."
    )
    return {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "centralized_child"},
        "federated": fl.__dict__,
        "federated_short": short.__dict__ if short else None,
        "centralized": central.__dict__,
        "steady_round_s": steady_wall,
        "steady_compute_s": steady_compute,
        "steady_overhead_s": steady_overhead,
        "fixed_s": fixed_logs,
        "centralized_epoch_s": central.epoch_s(),
        "slope": slope,
        "ratio_end_to_end": fl.wall_s / central.wall_s,
        "ratio_steady": steady_wall / central_epochs,
        "model_bytes": model_bytes,
        "bytes_per_round_state_dict": per_round_state,
        "bytes_per_round_logged": logged,
        "case_bytes_on_disk": case_disk,
        "case_bytes_float32": case_tensor,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sites", type=int, default=2)
    p.add_argument("--cases", type=int, default=6, help="cases per site (a quarter of them for validation)")
    p.add_argument("--size", type=int, default=32, help="volume size in voxels a side")
    p.add_argument("--features", type=int, default=8)
    p.add_argument("--roi", type=int, default=32)
    p.add_argument("--rounds", type=int, default=8, help="N: FedAvg rounds (at least 2)")
    p.add_argument("--local-epochs", type=int, default=2, help="E: local epochs per round")
    p.add_argument("--slope-rounds", type=int, default=2, help="N1 < N: rounds of a second FL job for the slope check (0: skip)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--site-threads", type=int, default=1, help="torch threads per site")
    p.add_argument("--accelerator", default="auto", help="centralized run's Lightning accelerator (sites use 'auto')")
    p.add_argument("--cross-site-eval", action="store_true", help="end the FL jobs with cross-site evaluation (counted in the fixed cost)")
    p.add_argument("--work", type=Path, default=None, help="folder for data and runs (default: a temporary one, removed)")
    p.add_argument("--json", type=Path, default=None, help="also write every number to this JSON file")
    p.add_argument("--centralized-child", nargs=2, metavar=("SPEC", "REPORT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.centralized_child:
        if args.rounds < 2:
            p.error("--rounds must be at least 2 (round 1 holds the sites' start-up; steady rounds follow)")
        if args.slope_rounds and not 1 <= args.slope_rounds < args.rounds:
            p.error("--slope-rounds must be 0 or between 1 and --rounds - 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.centralized_child:
        centralized_child(args.centralized_child[0], Path(args.centralized_child[1]))
        return 0

    from fedseg.lightning_modules.data.synth import SynthConfig, generate

    work = args.work or Path(tempfile.mkdtemp(prefix="fedseg-bench-fl-"))
    work = work.resolve()
    print(f"before: {load()}")
    started = time.perf_counter()
    try:
        synth = generate(SynthConfig(n_sites=args.sites, cases_per_site=args.cases, shape=(args.size,) * 3), work / "synth")
        print(synth.summary())
        datalists = dict(synth.datalists)
        n_sites = len(datalists)
        threads = min(n_sites * args.site_threads, os.cpu_count() or 1)
        n, e = args.rounds, args.local_epochs

        print(f"\ncentralized: {n * e} epochs on the union of {n_sites} sites, {threads} torch thread(s) ...", flush=True)
        central = run_centralized(args, list(datalists.values()), n * e, threads, work / "centralized")
        print(f"federated: {n} rounds x {e} local epochs, {n_sites} sites ...", flush=True)
        fl = run_federated(args, datalists, n, work / f"fl_{n}")
        short = None
        if args.slope_rounds:
            print(f"federated: {args.slope_rounds} rounds (slope check) ...", flush=True)
            short = run_federated(args, datalists, args.slope_rounds, work / f"fl_{args.slope_rounds}")

        disk, tensor = case_bytes(list(datalists.values()))
        numbers = report(args, fl, short, central, state_dict_bytes(args, n_sites), disk, tensor, n_sites, threads)
        print(f"\nafter: {load()}; the benchmark took {time.perf_counter() - started:.0f} s")
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(numbers, indent=2, default=str) + "\n")
            print(f"numbers: {args.json}")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
