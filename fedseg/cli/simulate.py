"""``fedseg simulate``: a federated job in NVFlare's simulator, on synthetic sites or given datalists."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fedseg.cli import UserError
from fedseg.cli._options import add_job_options, add_study_options, add_verbose_option, job_from_args, study_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    sim = subparsers.add_parser(
        "simulate",
        help="run a federated job in NVFlare's simulator (synthetic sites by default)",
        description="Runs the job in NVFlare's simulator, one site per datalist (default: synthetic "
        "heterogeneous sites generated in OUT/synth), then writes OUT/results.json|csv, rounds.csv, "
        "val_dice_per_round.png and checkpoints/{best,final}_global.ckpt and prints the per-site table.",
    )
    sim.add_argument("--out", type=Path, required=True, help="run folder")
    add_verbose_option(sim)
    add_site_options(sim)
    add_study_options(sim, "demo")
    add_job_options(sim)
    sim.set_defaults(func=run_simulate)


def add_site_options(parser: argparse.ArgumentParser) -> None:
    """Where the sites' data is: datalists (one per site) or the profile's synthetic sites."""
    parser.add_argument("--datalists", type=Path, nargs="+", default=None, help="one datalist per site (site-N.json -> site-N)")
    parser.add_argument("--data-root", type=Path, default=None, help="override the datalists' data root")
    parser.add_argument("--site-group", action="append", default=[], metavar="SITE=GROUP",
                        help="declare a site's group in its site config (repeatable; with --datalists)")
    add_site_devices_option(parser)


def add_site_devices_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--site-devices", action="append", default=[], metavar="SITE=N",
                        help="a site trains on N devices (its site config's 'devices': Lightning DDP, one process "
                        "per device; CPU processes without a GPU; repeatable)")


def named_datalists(paths: list[Path]) -> dict[str, Path]:
    """``{site: datalist}`` with each file's stem as its site's name (site-1.json -> site-1)."""
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise UserError(f"datalist(s) not found: {', '.join(missing)}")
    names = [p.stem for p in paths]
    if len(set(names)) != len(names):
        raise UserError("datalist file names must differ: each file's stem names its site")
    return dict(zip(names, paths))


def site_datalists(args: argparse.Namespace, study: Any, folder: Path | None = None) -> dict[str, Path]:
    """Given datalists keyed by file stem, or the study's synthetic sites in ``folder`` (OUT/synth),
    reused when the folder already holds sites made with the same settings."""
    if args.datalists:
        return named_datalists(args.datalists)
    from fedseg.lightning_modules.data.synth import (
        SynthConfig,
        SynthError,
        generate,
        is_synth_output,
        load_synth_config,
    )

    s = study.synth
    folder = folder or args.out / "synth"
    try:
        config = SynthConfig.from_settings(s)
    except SynthError as err:
        raise UserError(str(err)) from None
    if is_synth_output(folder) and (folder / "datalists" / "all.json").exists():
        # a resumed run must use the same data: reuse it, never regenerate under finished runs
        if load_synth_config(folder) != config:
            raise UserError(f"{folder} holds synthetic sites made with other settings; use a new --out")
        result = None
        datalists = {f"site-{k + 1}": folder / "datalists" / f"site-{k + 1}.json" for k in range(config.n_sites)}
        print(f"synthetic sites: reusing {folder}")
    else:
        result = generate(config, folder)
        datalists = dict(result.datalists)
        print(result.summary())
    if s.synth_groups > 1 and result is not None:  # what each hospital would write in its own site config
        args.site_group = [f"{site}={g}" for site, g in result.site_groups.items()] + list(args.site_group)
    return datalists


def site_group_settings(pairs: list[str], devices: list[str] = ()) -> dict[str, dict[str, Any]]:
    """``["site-1=a", ...]`` and ``["site-1=2", ...]`` -> ``{"site-1": {"group": "a", "devices": 2}}``
    (site config entries)."""
    settings: dict[str, dict[str, Any]] = {}
    for pair in pairs:
        site, sep, group = pair.partition("=")
        if not sep or not site or not group:
            raise UserError(f"--site-group takes SITE=GROUP, got {pair!r}")
        settings.setdefault(site, {})["group"] = group
    for pair in devices:
        site, sep, count = pair.partition("=")
        if not sep or not site or not count.isdigit() or int(count) < 1:
            raise UserError(f"--site-devices takes SITE=N with N >= 1, got {pair!r}")
        settings.setdefault(site, {})["devices"] = int(count)
    return settings


def build_job(args: argparse.Namespace, study: Any, min_clients: int) -> Any:
    """The job of the command line, with a clear error for bad values and a note when resuming."""
    from fedseg.jobs.base import resume_start

    try:
        job = job_from_args(args, study, min_clients=min_clients)
        if job.addons.wandb == "online":
            from fedseg.lightning_modules.tracking import API_KEY_ENV, online_allowed

            if not online_allowed():
                raise ValueError(f"--wandb online needs {API_KEY_ENV} in the environment; use --wandb offline "
                                 "and `wandb sync` later")
        if job.addons.resume_from:
            done, _ = resume_start(job)
            print(f"resuming the study at round {done + 1} of {study.federation.rounds} from {job.addons.resume_from}")
    except ValueError as err:
        raise UserError(str(err)) from None
    return job


def study_or_error(args: argparse.Namespace) -> Any:
    try:
        return study_from_args(args)
    except ValueError as err:
        raise UserError(str(err)) from None


def run_simulate(args: argparse.Namespace) -> int:
    from fedseg.run.console import quiet_console
    from fedseg.run.results import format_table
    from fedseg.run.simulate import simulate

    from fedseg.jobs.base import algorithm

    if not algorithm(args.job).simulator:
        raise UserError(f"{args.job} runs in POC and on real sites only: {algorithm(args.job).description}. "
                        f"Try: fedseg poc --job {args.job}")
    study = study_or_error(args)
    datalists = site_datalists(args, study)
    job = build_job(args, study, min_clients=len(datalists))
    roots = {site: args.data_root for site in datalists} if args.data_root else None
    fed = study.federation
    print(f"simulating {job.algorithm}: {len(datalists)} sites x {fed.rounds} rounds x {fed.local_epochs} local epochs "
          f"-> {args.out}")
    heads = _earlier_heads(job, args.out)
    if heads is not None:
        print(f"personal models: the sites go on with theirs in {heads}")
    log_file = args.out / "logs" / "simulate.log"
    with quiet_console(log_file, verbose=args.verbose) as console:
        if not args.verbose:
            console.print(f"NVFlare's and Lightning's logs: {log_file}")
        results = simulate(job, datalists, args.out, data_roots=roots, site_settings=site_group_settings(args.site_group, args.site_devices),
                           personal_stores=heads, console=console)
    print(format_table(results))
    print(f"results: {args.out.resolve()}/results.json, val_dice_per_round.png, checkpoints/")
    return 0


def _earlier_heads(job: Any, out: Path) -> Path | None:
    """A resumed study's personal models: the ``heads/`` of the run it resumes, when that is another run.

    Without them a personalized job resumed into a new folder would start every site's head afresh.
    """
    if not job.addons.resume_from:
        return None
    from fedseg.jobs.resume import find_resume_point

    checkpoint = find_resume_point(Path(job.addons.resume_from)).checkpoint
    for folder in checkpoint.parents:
        if (folder / "heads").is_dir():
            return None if folder.resolve() == Path(out).resolve() else folder / "heads"
    return None
