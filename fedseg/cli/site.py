"""``fedseg site``: a hospital admin's commands: approve a job, read the site's decisions."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedseg.cli import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    site = subparsers.add_parser(
        "site",
        help="a hospital's own controls: approve a study's job, read the site's audit log",
        description="Run at the hospital, on its startup kit. The site's policy (KIT/local/fedseg_site.json, "
        "'policy') says which studies the site joins; with \"require_approval\": true it runs only jobs "
        "approved here. Every decision is in the site's audit log.",
    )
    sub = site.add_subparsers(dest="site_command", metavar="SITE_COMMAND", required=True)

    approve = sub.add_parser(
        "approve",
        help="approve a job folder: its fingerprint goes on this site's approve list",
        description="Records the SHA-256 of the job's config_fed_client.json (everything the job runs at this "
        "site) in KIT/local/fedseg_site.approved.json. Review the job folder first: the executor's 'job' "
        "settings and the filters are what this site will run with.",
    )
    approve.add_argument("job", type=Path, help="the job folder the lead will submit (as `nvflare job submit -j`)")
    _kit_option(approve)
    approve.set_defaults(func=_approve)

    audit = sub.add_parser("audit", help="print this site's decisions: accepted and refused jobs, with the reason")
    _kit_option(audit)
    audit.set_defaults(func=_audit)


def _kit_option(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--kit", type=Path, help="this hospital's startup kit folder")
    where.add_argument("--site-config", type=Path, help="the site config file itself (simulator or POC setups)")


def _site_config(args: argparse.Namespace) -> Path:
    from fedseg.app.site_config import LOCAL_FILE

    path = args.site_config or args.kit / "local" / LOCAL_FILE
    if not path.is_file():
        raise UserError(f"{path}: no site config; write it with `fedseg provision site-config KIT --datalist ...`")
    return path


def _approve(args: argparse.Namespace) -> int:
    from fedseg.app.site_policy import PolicyError, approvals_path, approve

    config = _site_config(args)
    try:
        added = approve(config, args.job)
    except PolicyError as err:
        raise UserError(str(err)) from None
    for app, fingerprint in added:
        print(f"approved {args.job.name} ({app}): {fingerprint}")
    print(f"approve list: {approvals_path(config)}")
    return 0


def _audit(args: argparse.Namespace) -> int:
    from fedseg.app.site_policy import audit_path, read_audit

    config = _site_config(args)
    records = read_audit(config)
    if not records:
        print(f"no decisions yet ({audit_path(config)})")
        return 0
    for r in records:
        line = f"{r['time']}  {r['decision']:<8}  job {r.get('job_id', '')} ({r.get('job', '')}, {r.get('algorithm', '')})"
        line += f"  by {r.get('submitter') or '?'}  fingerprint {r.get('fingerprint', '')[:12]}"
        print(line + (f"\n    {r['reason']}" if r.get("reason") else ""))
    return 0
