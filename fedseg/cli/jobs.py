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
    resume = sub.add_parser(
        "resume",
        help="export a study job that continues from a previous job's last global checkpoint",
        description="Writes OUT/<name>-resumed: the study job NAME starting from the global model in FROM "
        "(FL_global_model.pt, or a job downloaded with `nvflare job download`), with the rounds it holds "
        "counted. Submit it with `nvflare job submit -j`.",
    )
    resume.add_argument("name", help="the study job: " + ", ".join(_study_job_names()))
    resume.add_argument("--from", dest="source", type=Path, required=True, help="checkpoint or downloaded job")
    resume.add_argument("--out", type=Path, required=True, help="folder for the job folder")
    resume.add_argument("--rounds", type=int, default=None, help="the study's total rounds (default: the job's)")
    resume.set_defaults(func=_resume)


def _study_job_names() -> list[str]:
    """The checked-in study jobs (``fedseg.jobs.catalog``): each algorithm's ``study_job``."""
    from fedseg.jobs.base import algorithms

    return [name for name, algo in algorithms().items() if algo.study_job() is not None]


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


def _resume(args: argparse.Namespace) -> int:
    import dataclasses

    from fedseg.cli import UserError
    from fedseg.jobs.base import export, resume_start
    from fedseg.jobs.catalog import STUDY_JOBS

    if args.name not in STUDY_JOBS:
        raise UserError(f"unknown study job {args.name!r}; known: {', '.join(STUDY_JOBS)}")
    base = STUDY_JOBS[args.name]
    try:
        job = base.replace(name=f"{base.name}-resumed", study_name=base.study_name or base.name,
                           addons=dataclasses.replace(base.addons, resume_from=str(args.source.resolve())),
                           rounds=args.rounds or base.study.federation.rounds)
        done, _ = resume_start(job)
        folder = export(job, args.out)
    except ValueError as err:
        raise UserError(str(err)) from None
    print(f"exported {folder}: rounds {done + 1}..{job.study.federation.rounds} of the study, "
          f"from {job.addons.resume_from}")
    return 0
