"""``fedseg jobs``: regenerate or check the exported job folders under jobs/."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    jobs = subparsers.add_parser("jobs", help="export the study job folders (jobs/<name>) or check they are up to date")
    sub = jobs.add_subparsers(dest="jobs_command", metavar="JOBS_COMMAND", required=True)
    export = sub.add_parser("export", help="write jobs/<name> for every study job (nvflare job submit -j takes them)")
    export.add_argument("--out", type=Path, default=None, help="folder (default: the repository's jobs/)")
    export.set_defaults(func=_export)
    check = sub.add_parser("check", help="non-zero exit when a checked-in job folder differs from a fresh export")
    check.set_defaults(func=_check)


def _export(args: argparse.Namespace) -> int:
    from fedseg.jobs.catalog import JOBS_DIR, export_all

    for folder in export_all(args.out or JOBS_DIR):
        print(f"exported {folder}")
    return 0


def _check(args: argparse.Namespace) -> int:
    from fedseg.jobs.catalog import stale_jobs

    stale = stale_jobs()
    if stale:
        print(f"out of date: {', '.join(stale)}; run `fedseg jobs export`")
        return 1
    print("job folders are up to date")
    return 0
