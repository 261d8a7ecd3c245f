"""``fedseg poc``: a federated job on a real local NVFlare deployment (POC mode), start to finish."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedseg.cli import UserError
from fedseg.cli._options import add_job_options, add_study_options, add_verbose_option
from fedseg.cli.simulate import add_site_devices_option


def register(subparsers: argparse._SubParsersAction) -> None:
    poc = subparsers.add_parser(
        "poc",
        help="run a federated job on a local NVFlare POC deployment (server + named sites as processes)",
        description="Provisions an NVFlare POC project with the named sites (OUT/poc: kits, logs, an "
        "isolated HOME), gives each site its data in its kit's local/fedseg_site.json, starts server "
        "and sites, submits the job with `nvflare job submit`, waits, downloads the server's results "
        "to OUT/download/<job id>/workspace, stops every POC process and writes OUT/results.json|csv, "
        "rounds.csv, val_dice_per_round.png, checkpoints/{best,final}_global.ckpt and OUT/poc.json "
        "(job id, status, timings). Without --datalists each site gets the profile's synthetic data "
        "(OUT/synth).",
    )
    poc.add_argument("--out", type=Path, default=Path("runs/poc"), help="run folder (default runs/poc)")
    poc.add_argument("--site-names", nargs="+", default=["hospital-a", "hospital-b"], metavar="NAME",
                     help="the sites' names (default hospital-a hospital-b); as many synthetic sites are made")
    # every other command's --sites is a number of synthetic sites: here it would be a list of names
    poc.add_argument("--sites", dest="sites_given", nargs="+", default=None, help=argparse.SUPPRESS)
    poc.add_argument("--port", type=int, default=0, help="server port (FL and admin); default: a free port")
    poc.add_argument("--datalists", type=Path, nargs="+", default=None, help="one datalist per site, in the order of --site-names")
    poc.add_argument("--data-root", type=Path, default=None, help="override the datalists' data root")
    poc.add_argument("--job-dir", type=Path, default=None, help="submit this exported job folder instead of exporting --job")
    poc.add_argument("--timeout", type=int, default=1800, help="seconds the job may run (default 1800)")
    poc.add_argument("--site-group", action="append", default=[], metavar="SITE=GROUP",
                     help="declare a site's group in its site config (repeatable; with --datalists)")
    add_site_devices_option(poc)
    add_verbose_option(poc)
    add_study_options(poc, "demo", skip=("sites",))  # --site-names names the hospitals, and so counts them
    add_job_options(poc)
    poc.set_defaults(func=run_poc_command)


def _site_datalists(args: argparse.Namespace, study) -> dict[str, Path]:
    """``site -> datalist``: the given files in --site-names order, or one synthetic site per name."""
    if args.datalists:
        if len(args.datalists) != len(args.site_names):
            raise UserError(f"--datalists takes one file per site: {len(args.site_names)} sites, {len(args.datalists)} files")
        missing = [str(p) for p in args.datalists if not p.is_file()]
        if missing:
            raise UserError(f"datalist(s) not found: {', '.join(missing)}")
        return dict(zip(args.site_names, args.datalists))
    from fedseg.lightning_modules.data.synth import SynthConfig, SynthError, generate

    s = study.synth
    try:
        cfg = SynthConfig.from_settings(s, n_sites=len(args.site_names))
        result = generate(cfg, args.out / "synth")
    except SynthError as err:
        raise UserError(str(err)) from None
    print(result.summary())
    # Synthetic sites are site-1, site-2, ... in profile order; the k-th named hospital gets the k-th.
    if s.synth_groups > 1:  # what each hospital would write in its own site config
        args.site_group = [f"{h}={p.group}" for h, p in zip(args.site_names, result.profiles)] + args.site_group
    return dict(zip(args.site_names, (result.datalists[p.name] for p in result.profiles)))


def run_poc_command(args: argparse.Namespace) -> int:
    from fedseg.cli.simulate import build_job, site_group_settings, study_or_error
    from fedseg.run.poc import PocError, check_site_names, run_poc

    if args.sites_given is not None:
        raise UserError("fedseg poc names its sites with --site-names (--sites is a number of synthetic sites in the "
                        f"other commands): --site-names {' '.join(args.sites_given)}")
    try:
        sites = check_site_names(args.site_names)
    except ValueError as err:
        raise UserError(str(err)) from None
    if args.port and not 0 < args.port < 65536:
        raise UserError(f"--port must be 1..65535, got {args.port}")
    study = study_or_error(args)
    out = args.out.resolve()
    args.out = out
    datalists = _site_datalists(args, study)

    job = None
    if args.job_dir:
        job_dir = args.job_dir.resolve()
        if not (job_dir / "meta.json").is_file():
            raise UserError(f"{job_dir}: not an exported NVFlare job folder (no meta.json)")
    else:
        from fedseg.jobs.base import export

        job = build_job(args, study, min_clients=len(sites))
        job_dir = export(job, out / "job")
        (out / "job.json").write_text(json.dumps(job.to_json(), indent=2) + "\n")
        print(f"exported {job.algorithm} ({study.federation.rounds} rounds, {len(sites)} sites) to {job_dir}")

    from fedseg.run.console import quiet_console

    data_roots = {site: args.data_root for site in sites} if args.data_root else None
    log_file = out / "logs" / "poc.log"
    try:
        with quiet_console(log_file, verbose=args.verbose) as console:
            if not args.verbose:
                console.print(f"the deployment's logs: {out / 'poc' / 'logs'}, the server's and sites' in their kits "
                              f"under {out / 'poc' / 'workspace'}; this process's: {log_file}")
            result = run_poc(job_dir, datalists, port=args.port or None, workspace=out / "poc", timeout=args.timeout,
                             download_to=out / "download", data_roots=data_roots,
                             site_settings=site_group_settings(args.site_group, args.site_devices),
                             he=bool(job and not job.spec.plain_weights), log=console.print, console=console)
    except PocError as err:
        raise UserError(f"POC run failed: {err}\n(deployment folder, logs and kits: {out / 'poc'})") from None
    (out / "poc.json").write_text(json.dumps(result.to_json(), indent=2) + "\n")

    print(f"job {result.job_id}: {result.status}")
    print("timings: " + ", ".join(f"{step} {s:.1f} s" for step, s in result.timings.items()))
    print(f"server results (downloaded): {result.server_workspace}")
    for site, log in result.site_logs.items():
        print(f"{site} log: {log}")
    if not result.ok and not _rounds_completed(result.server_workspace):
        print(f"the job did not complete; see {result.server_workspace / 'log.txt'} and the site logs above")
        return 1
    if not result.ok:  # a site that was lost mid-study (docs/federated.md, "When a hospital fails")
        print(f"NVFlare marked the job {result.status}, but every round and the evaluation ran "
              "(metrics/participation_summary.json); a site that was lost is named below")
    _collect(result.server_workspace, out, job, result)
    return 0


def _collect(server_dir: Path, out: Path, job, result) -> None:
    """The run folder's results table from the downloaded server workspace (fedseg.run.results)."""
    from fedseg.run.results import ResultsError, collect_results, format_table

    job_info = {**(job.to_json() if job else {}), "environment": "poc", "job_id": result.job_id,
                "status": result.status, "seconds": result.timings.get("total")}
    try:
        results = collect_results(
            server_dir,
            out,
            job=job_info,
            # encrypted weights (HE): the server's models are ciphertext; fedseg.app.he.decrypt_global_model with a
            # site kit reads them
            hyper_parameters=job.checkpoint_hparams() if job and job.spec.plain_weights else None,
            encoder_only=bool(job and job.personal_keys()),
        )
    except ResultsError as err:
        raise UserError(str(err)) from None
    print(format_table(results))
    print(f"results: {out}/results.json, results.csv, val_dice_per_round.png" + (", checkpoints/" if job else ""))


def _rounds_completed(server_dir: Path) -> bool:
    """True when fedseg's workflow ran all its rounds (``participation_summary.json`` says completed)."""
    summary = server_dir / "metrics" / "participation_summary.json"
    return summary.is_file() and json.loads(summary.read_text()).get("status") == "completed"
