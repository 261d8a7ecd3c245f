"""``fedseg simulate``: a federated job in NVFlare's simulator, on synthetic sites or given datalists."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedseg.cli import UserError, three_ints

ALGORITHMS = ("fedavg", "fedprox", "fedopt", "fedper", "fedavg-he")


def add_job_arguments(parser: argparse.ArgumentParser, *, rounds: int, features: int, roi: int) -> None:
    """Arguments of a FedAvg-family job (shared by simulate, poc and jobs export)."""
    parser.add_argument("--job", choices=ALGORITHMS, default="fedavg", help="fedavg, fedprox (client proximal term), fedopt (server optimizer), fedper (personal heads) or fedavg-he (CKKS-encrypted aggregation; POC and real sites only)")
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--network", default="unet")
    parser.add_argument("--features", type=int, default=features)
    parser.add_argument("--norm", choices=["instance", "batch"], default="instance")
    parser.add_argument("--modalities", nargs="+", default=["t1", "t1ce", "t2", "flair"])
    parser.add_argument("--roi", type=int, nargs="+", default=[roi], help="crop size: one or three numbers")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--no-hd95", action="store_true", help="skip HD95 in per-round validation")
    parser.add_argument("--fedprox-mu", type=float, default=0.01)
    parser.add_argument("--server-optimizer", choices=["sgd", "adam"], default="sgd", help="fedopt: server optimizer")
    parser.add_argument("--server-lr", type=float, default=1.0, help="fedopt: server learning rate")
    parser.add_argument("--keep-norm-local", action="store_true", help="fedper: keep normalization layers local too (FedBN)")
    parser.add_argument(
        "--wandb", choices=["off", "offline", "online"], default="off",
        help="Weights & Biases tracking on the server, one run per site (sites need no credentials): "
        "offline writes W&B runs for `wandb sync`; online needs WANDB_API_KEY on the server",
    )
    parser.add_argument(
        "--round-timeout", type=int, default=7200,
        help="seconds a round waits for the sites; a site that has not answered by then is left out of "
        "that round and named in the report (0: wait for ever)",
    )
    parser.add_argument(
        "--min-sites-per-round", type=int, default=0,
        help="fewest sites a round may average; fewer answers stop the job with the reason (0: all sites)",
    )
    parser.add_argument(
        "--resume-from", type=Path, default=None,
        help="continue a study from its last global checkpoint: FL_global_model.pt, a run folder or a "
        "downloaded job; the rounds it holds are counted (--rounds is the study's total)",
    )
    parser.add_argument(
        "--aggregation", choices=["cases", "contribution"], default="cases",
        help="site weights: training cases (FedAvg) or contribution (cases and how much the site's update "
        "lowered its own validation loss, FedCostWAvg-style, capped by --max-site-share)",
    )
    parser.add_argument("--contribution-alpha", type=float, default=0.5, help="contribution: weight of the case share (1 = FedAvg)")
    parser.add_argument("--max-site-share", type=float, default=0.5, help="contribution: most any site may weigh in a round")
    parser.add_argument(
        "--privacy", choices=["off", "svt", "percentile"], default="off",
        help="NVFlare privacy filter on every update a site sends (sites then send weight diffs)",
    )
    parser.add_argument(
        "--privacy-arg", action="append", default=[], metavar="KEY=VALUE",
        help="privacy filter argument, repeatable (percentile: percentile, gamma; svt: fraction, epsilon, "
        "noise_var, gamma, tau, replace, epsilon_threshold, epsilon_query, epsilon_release)",
    )
    parser.add_argument(
        "--grouped", action="store_true",
        help="one global model per site group (each site declares its 'group' in its site config)",
    )
    parser.add_argument("--share-encoder", action="store_true", help="grouped: average the encoder across groups")
    parser.add_argument(
        "--seed", type=int, default=0,
        help="seed of the initial global model and of each site's data order and augmentation",
    )
    parser.add_argument(
        "--poll-interval", type=float, default=0.5,
        help="seconds a site waits before asking for its next task (NVFlare's default 2 s dominates short local runs)",
    )


def job_from_args(args: argparse.Namespace, *, min_clients: int, name: str | None = None, site_threads: int = 0):
    from fedseg.jobs.fedavg import FedAvgJob

    from fedseg.jobs.privacy import parse_privacy_args

    roi = three_ints(args.roi, "--roi")
    try:
        job = FedAvgJob(
            name=name or args.job,
            algorithm=args.job,
            min_clients=min_clients,
            rounds=args.rounds,
            local_epochs=args.local_epochs,
            network=args.network,
            features=args.features,
            norm=args.norm,
            modalities=tuple(args.modalities),
            roi=tuple(roi),
            lr=args.lr,
            batch_size=args.batch_size,
            hd95=not args.no_hd95,
            fedprox_mu=args.fedprox_mu,
            server_optimizer=args.server_optimizer,
            server_lr=args.server_lr,
            site_threads=site_threads,
            keep_norm_local=args.keep_norm_local,
            task_poll_interval=args.poll_interval,
            wandb=getattr(args, "wandb", "off"),
            round_timeout=args.round_timeout,
            min_sites_per_round=args.min_sites_per_round,
            resume_from=str(args.resume_from.resolve()) if args.resume_from else "",
            aggregation=args.aggregation,
            contribution_alpha=args.contribution_alpha,
            max_site_share=args.max_site_share,
            grouped=args.grouped,
            share_encoder=args.share_encoder,
            privacy=args.privacy,
            privacy_args=parse_privacy_args(args.privacy_arg),
            seed=args.seed,
        )
    except ValueError as err:
        raise UserError(str(err)) from None
    if job.resume_from:
        from fedseg.jobs.fedavg import resume_start

        try:
            done, _ = resume_start(job)
        except ValueError as err:
            raise UserError(str(err)) from None
        print(f"resuming the study at round {done + 1} of {job.rounds} from {job.resume_from}")
    return job


def register(subparsers: argparse._SubParsersAction) -> None:
    sim = subparsers.add_parser(
        "simulate",
        help="run a federated job in NVFlare's simulator (synthetic sites by default)",
        description="Runs the job in NVFlare's simulator, one site per datalist (default: synthetic "
        "heterogeneous sites generated in OUT/synth), then writes OUT/results.json|csv, rounds.csv, "
        "val_dice_per_round.png and checkpoints/{best,final}_global.ckpt and prints the per-site table.",
    )
    sim.add_argument("--out", type=Path, required=True, help="run folder")
    sim.add_argument("--sites", type=int, default=3, help="number of synthetic sites (ignored with --datalists)")
    sim.add_argument("--cases", type=int, default=8, help="synthetic cases per site")
    sim.add_argument("--size", type=int, default=48, help="synthetic volume size")
    sim.add_argument("--datalists", type=Path, nargs="+", default=None, help="one datalist per site (site-N.json -> site-N)")
    sim.add_argument("--data-root", type=Path, default=None, help="override the datalists' data root")
    sim.add_argument("--synth-groups", type=int, choices=[1, 2], default=1,
                     help="synthetic sites in 2 imaging-protocol groups (the second half images differently); "
                     "each site's config declares its group")
    sim.add_argument("--site-group", action="append", default=[], metavar="SITE=GROUP",
                     help="declare a site's group in its site config (repeatable; with --datalists)")
    add_job_arguments(sim, rounds=5, features=8, roi=48)
    sim.set_defaults(func=run_simulate)


def named_datalists(paths: list[Path]) -> dict[str, Path]:
    """``{site: datalist}`` with each file's stem as its site's name (site-1.json -> site-1)."""
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise UserError(f"datalist(s) not found: {', '.join(missing)}")
    names = [p.stem for p in paths]
    if len(set(names)) != len(names):
        raise UserError("datalist file names must differ: each file's stem names its site")
    return dict(zip(names, paths))


def site_datalists(args: argparse.Namespace) -> dict[str, Path]:
    """Given datalists keyed by file stem, or fresh synthetic sites in OUT/synth."""
    if args.datalists:
        return named_datalists(args.datalists)
    from fedseg.lightning_modules.data.synth import SynthConfig, generate

    groups = getattr(args, "synth_groups", 1)
    config = SynthConfig(n_sites=args.sites, cases_per_site=args.cases, shape=(args.size,) * 3, groups=groups)
    result = generate(config, args.out / "synth")
    print(result.summary())
    if groups > 1:  # what each hospital would write in its own site config
        args.site_group = [f"{s}={g}" for s, g in result.site_groups.items()] + list(getattr(args, "site_group", []))
    return dict(result.datalists)


def site_group_settings(pairs: list[str]) -> dict[str, dict[str, str]]:
    """``["site-1=a", ...]`` -> ``{"site-1": {"group": "a"}}`` (site config entries)."""
    settings: dict[str, dict[str, str]] = {}
    for pair in pairs:
        site, sep, group = pair.partition("=")
        if not sep or not site or not group:
            raise UserError(f"--site-group takes SITE=GROUP, got {pair!r}")
        settings[site] = {"group": group}
    return settings


def run_simulate(args: argparse.Namespace) -> int:
    from fedseg.jobs.results import format_table
    from fedseg.jobs.simulate import simulate

    if args.job == "fedavg-he":
        raise UserError("fedavg-he runs in POC and on real sites only: NVFlare's HE recipe refuses the simulator "
                        "(it needs HE startup kits). Try: fedseg poc --job fedavg-he")
    datalists = site_datalists(args)
    job = job_from_args(args, min_clients=len(datalists), site_threads=1)
    roots = {site: args.data_root for site in datalists} if args.data_root else None
    print(f"simulating {job.algorithm}: {len(datalists)} sites x {job.rounds} rounds -> {args.out}")
    results = simulate(job, datalists, args.out, data_roots=roots, site_settings=site_group_settings(args.site_group))
    print(format_table(results))
    print(f"results: {args.out.resolve()}/results.json, val_dice_per_round.png, checkpoints/")
    return 0
