"""``fedseg study``: start, follow and continue a federated study on real (or POC) kits (docs/study.md)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

#: NVFlare's admin-API log of ``fedseg study run``, in the study's folder
ADMIN_LOG = "nvflare_admin.log"


def register(subparsers: argparse._SubParsersAction) -> None:
    study = subparsers.add_parser(
        "study", help="run a federated study that continues by itself after faults (docs/study.md)")
    sub = study.add_subparsers(dest="study_command", metavar="STUDY_COMMAND", required=True)
    run = sub.add_parser(
        "run", help="start a study, or pick it up where it was (run the same command again)",
        description="Submits JOB (a job folder, e.g. jobs/fedavg) with the lead's admin kit, follows it, and "
        "submits a continuation from the last completed round whenever a job ends short of the study's rounds "
        "(server restart, too few sites, abort, a stuck job, a site back after a reboot). The study's state is "
        "DIR/study.json; running the same command again continues it.")
    run.add_argument("job", nargs="?", type=Path, default=None,
                     help="job folder (nvflare job submit -j takes it); not needed to continue a study")
    run.add_argument("--dir", type=Path, required=True, help="the study's folder on the lead's machine")
    kit = run.add_mutually_exclusive_group()
    kit.add_argument("--startup-kit", type=Path, default=None, help="the lead's admin startup kit")
    kit.add_argument("--consortium", type=Path, default=None,
                     help="the consortium file: its first lead's kit in --kits/<consortium name>/")
    run.add_argument("--kits", type=Path, default=Path("kits"), help="where `fedseg provision create` put the kits")
    run.add_argument("--username", default="", help="the admin's name (default: the kit folder's name)")
    run.add_argument("--rounds", type=int, default=None, help="the study's total rounds (default: the job's)")
    run.add_argument("--poll", type=float, default=5.0, help="seconds between looks at the server")
    run.add_argument("--stall-limit", type=float, default=0.0,
                     help="seconds without a completed round before a running job is ended and continued "
                          "(default 0: 3 round timeouts, at least 600 s)")
    run.add_argument("--max-retries", type=int, default=5, help="jobs in a row that add no round before the study stops")
    run.add_argument("--rejoin-rounds-left", type=int, default=2,
                     help="end a running job for a site that is back when at least this many rounds are left")
    run.add_argument("--dead-grace", type=float, default=30.0,
                     help="seconds a job may be RUNNING in the job store while the server does not run it "
                          "(a server restart) before it is ended and continued")
    run.add_argument("--server-down-limit", type=float, default=3600.0,
                     help="seconds the server may not answer before the study stops (run again to continue)")
    run.add_argument("--verbose", action="store_true",
                     help="stream NVFlare's admin-API log to the terminal instead of DIR/nvflare_admin.log")
    run.set_defaults(func=_run)
    status = sub.add_parser("status", help="rounds done, segments, each site's participation, the last error")
    status.add_argument("--dir", type=Path, required=True, help="the study's folder")
    status.set_defaults(func=_status)


def _kit(args: argparse.Namespace) -> Path:
    from fedseg.cli import UserError

    if args.startup_kit:
        return args.startup_kit
    if args.consortium:
        from fedseg.provisioning.consortium import load_consortium

        consortium = load_consortium(args.consortium)
        return args.kits / consortium.name / consortium.leads[0].email
    raise UserError("give the lead's kit: --startup-kit KIT or --consortium consortium.yml")


def _run(args: argparse.Namespace) -> int:
    from fedseg.cli import UserError
    from fedseg.run.study import STATE_FILE, FlareSession, Policy, StudyError, Supervisor

    try:
        if not (args.dir / STATE_FILE).is_file():
            if args.job is None:
                raise UserError(f"{args.dir} holds no study yet: give the job folder to start one")
            state = Supervisor.create(args.dir, args.job, rounds=args.rounds)
            print(f"[study] new study {state.study_id}: {state.total_rounds} rounds of {args.job} in {args.dir}")
        policy = Policy(poll=args.poll, stall_limit=args.stall_limit, max_retries=args.max_retries,
                        rejoin_rounds_left=args.rejoin_rounds_left, server_down_limit=args.server_down_limit,
                        dead_grace=args.dead_grace)
        state = _follow(args, policy)
    except StudyError as err:
        raise UserError(str(err)) from None
    print(f"[study] {state.status}: {state.reason}")
    return 0 if state.status == "completed" else 1


def _follow(args: argparse.Namespace, policy: Any) -> Any:
    """Run the supervisor with the live display; NVFlare's admin-API chatter goes to a log file."""
    from fedseg.run.console import quiet_console
    from fedseg.run.study import FlareSession, StudyState, Supervisor
    from fedseg.run.study_progress import StudyProgress

    kit = _kit(args)
    known = StudyState.load(args.dir)
    with quiet_console(args.dir / ADMIN_LOG, verbose=args.verbose) as console:
        session = FlareSession(kit, args.username)
        display = StudyProgress(console, title=f"study {known.study_id}", total_rounds=known.total_rounds,
                                rounds_done=known.rounds_done)
        try:
            with display:
                return Supervisor(args.dir, session, policy=policy, log=console.print, display=display).run()
        finally:
            session.close()


def _status(args: argparse.Namespace) -> int:
    from fedseg.cli import UserError
    from fedseg.run.study import STATE_FILE, StudyState, status_text

    if not (args.dir / STATE_FILE).is_file():
        raise UserError(f"{args.dir}: no study here ({STATE_FILE})")
    print(status_text(StudyState.load(args.dir)))
    return 0
