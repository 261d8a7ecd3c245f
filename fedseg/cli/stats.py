"""``fedseg stats``: federated statistics of the sites' images before anyone trains on them."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedseg.cli import UserError
from fedseg.cli._options import add_dataclass_options, add_study_options, add_verbose_option


def register(subparsers: argparse._SubParsersAction) -> None:
    stats = subparsers.add_parser(
        "stats",
        help="federated statistics of the sites' images: intensity histograms per modality, spacing, sizes, tumour volumes",
        description="Runs NVFlare's federated statistics with fedseg's image statistics at every site (only "
        "counts, means, sds and histograms leave a site, through NVFlare's privacy cleansers), in the simulator "
        "(default) or a POC deployment, and writes OUT/stats.json, OUT/stats.txt, OUT/stats_intensity.png "
        "(each site's intensity histogram per modality, overlaid) and OUT/stats_cases.png. The same job for "
        "real sites: jobs/stats (nvflare job submit -j jobs/stats).",
    )
    stats.add_argument("--out", type=Path, required=True, help="run folder")
    stats.add_argument("--env", choices=["simulator", "poc"], default="simulator",
                       help="NVFlare's simulator, or a POC deployment (server and sites as processes)")
    stats.add_argument("--datalists", type=Path, nargs="+", default=None, help="one datalist per site (site-N.json -> site-N)")
    stats.add_argument("--data-root", type=Path, default=None, help="override the datalists' data root")
    add_verbose_option(stats)
    add_study_options(stats, "demo", sections=("data", "synth"),
                      skip=("roi", "normalization", "batch_size", "num_workers"))
    from fedseg.jobs.stats import StatsSettings

    add_dataclass_options(stats.add_argument_group("statistics and their privacy cleansers"), StatsSettings,
                          seen={"modalities"})  # the study's --modalities
    stats.set_defaults(func=run_stats, site_group=[])


def run_stats(args: argparse.Namespace) -> int:
    from fedseg.cli._options import dataclass_from_args
    from fedseg.cli.simulate import site_datalists, study_or_error
    from fedseg.jobs.stats import StatsSettings
    from fedseg.run.console import quiet_console
    from fedseg.run.statistics import format_stats

    study = study_or_error(args)
    datalists = site_datalists(args, study)
    try:
        settings = dataclass_from_args(args, StatsSettings, modalities=study.data.modalities)
    except ValueError as err:
        raise UserError(str(err)) from None
    roots = {site: args.data_root for site in datalists} if args.data_root else None
    log_file = args.out / "logs" / "stats.log"
    with quiet_console(log_file, verbose=args.verbose) as console:
        console.print(f"federated statistics of {len(datalists)} sites in {'POC' if args.env == 'poc' else 'the simulator'}"
                      + ("" if args.verbose else f" (NVFlare's logs: {log_file})"))
        report = _run(args, datalists, settings, roots, console)
    print(format_stats(report))
    print(f"\nfiles: {', '.join(str(p) for p in report.files.values())}")
    return 0


def _run(args: argparse.Namespace, datalists: dict[str, Path], settings, roots, console):
    from fedseg.run.statistics import collect_stats, simulate_stats

    if args.env == "simulator":
        return simulate_stats(datalists, args.out, settings, data_roots=roots)
    from fedseg.jobs.stats import export_stats
    from fedseg.run.poc import PocError, check_site_names, run_poc

    out = args.out.resolve()
    try:
        sites = check_site_names(list(datalists))
        job_dir = export_stats(out / "job", settings)
        result = run_poc(job_dir, {s: datalists[s] for s in sites}, workspace=out / "poc", download_to=out / "download",
                         data_roots=roots, log=console.print)
    except (PocError, ValueError) as err:
        raise UserError(f"POC run failed: {err}") from None
    if not result.ok:
        raise UserError(f"the statistics job ended {result.status}; see {result.server_workspace / 'log.txt'}")
    return collect_stats(result.server_workspace, out)
