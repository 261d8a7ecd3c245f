"""Command-line options made from the configuration's fields (``fedseg.config``), so a default
lives in one place: the option ``--features`` is the field ``ModelSettings.features``, its help
is the field's, and its default is the chosen ``--profile``'s value.

Options left out on the command line take the profile's value; ``study_from_args`` returns the
profile with the given options applied. Also the options of the algorithms and add-ons, made
the same way from their dataclasses (``add_dataclass_options``).
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path
from typing import Any

from fedseg.config import PROFILES, SECTIONS, StudyConfig, profile

_MISSING = None  # argparse default of a generated option: "not given, take the profile's"
#: ``--job`` when none is given
DEFAULT_ALGORITHM = "fedavg"


def option_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def add_field_option(parser: argparse.ArgumentParser | Any, f: dataclasses.Field, shown_default: Any,
                     prefix: str = "") -> None:
    """One ``--<prefix><name>`` option for dataclass field ``f``; ``shown_default`` goes into its help."""
    meta = dict(f.metadata)
    help_text = meta.pop("help", "")
    kind = _field_type(f)
    kwargs: dict[str, Any] = {"default": _MISSING, "dest": prefix.replace("-", "_") + f.name}
    if kind is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    else:
        kwargs["type"] = int if kind is int else float if kind is float else str
        if "nargs" in meta:
            kwargs["nargs"] = meta.pop("nargs")
            kwargs["type"] = int if "int" in str(f.type) else str
        if "choices" in meta:
            kwargs["choices"] = meta.pop("choices")
    if isinstance(shown_default, (tuple, list)):
        shown = " ".join(map(str, shown_default))
    else:
        shown = shown_default
    kwargs["help"] = f"{help_text} (default: {shown})"
    parser.add_argument(option_name(prefix + f.name), **kwargs, **meta)


def add_study_options(parser: argparse.ArgumentParser, default_profile: str, *,
                      sections: tuple[str, ...] = tuple(SECTIONS), skip: tuple[str, ...] = ()) -> None:
    """``--profile`` and one option per setting of ``sections`` (defaults from ``default_profile``)."""
    base = profile(default_profile)
    parser.add_argument("--profile", choices=list(PROFILES), default=default_profile,
                        help=f"named settings every option below starts from (default: {default_profile})")
    group = parser.add_argument_group(f"study settings (defaults: profile {default_profile!r})")
    names = []
    for section in sections:
        for f in dataclasses.fields(SECTIONS[section]):
            if f.name not in skip:
                add_field_option(group, f, getattr(getattr(base, section), f.name))
                names.append(f.name)
    parser.set_defaults(_study_options=tuple(names))
    group.add_argument("--seed", type=int, default=_MISSING,
                       help=f"seed of the initial weights, data order and augmentation (default: {base.seed})")


def study_from_args(args: argparse.Namespace) -> StudyConfig:
    """The chosen profile with every option the user gave applied (``ValueError`` on a bad value)."""
    given = {name: getattr(args, name) for name in [*args._study_options, "seed"]
             if getattr(args, name, _MISSING) is not _MISSING}
    return profile(args.profile).override(**given)


def add_dataclass_options(parser: argparse.ArgumentParser | Any, cls: type, *, prefix: str = "",
                          seen: set[str] | None = None) -> None:
    """One option per field of ``cls`` (a settings dataclass with ``setting`` fields), default its default.

    ``seen``: field names already made options (by another algorithm's options with the same field,
    e.g. FedPer's and FedRep's ``personal_head``): they are one option, read by both."""
    for f in dataclasses.fields(cls):
        if seen is not None:
            if f.name in seen:
                continue
            seen.add(f.name)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        add_field_option(parser, f, default, prefix=prefix)


def dataclass_from_args(args: argparse.Namespace, cls: type, *, prefix: str = "", **fixed: Any) -> Any:
    """``cls`` with the options ``add_dataclass_options`` made (those not given keep their defaults)."""
    dest = prefix.replace("-", "_")
    given = {f.name: getattr(args, dest + f.name) for f in dataclasses.fields(cls)
             if getattr(args, dest + f.name, _MISSING) is not _MISSING}
    return cls(**{**given, **fixed})


def _field_type(f: dataclasses.Field) -> type:
    text = str(f.type)
    if text.startswith("bool"):
        return bool
    if text.startswith("int"):
        return int
    if text.startswith("float"):
        return float
    return str if "str" in text or "tuple" in text else typing.cast(type, str)


# ------------------------------------------------------------------------------ jobs

def add_job_options(parser: argparse.ArgumentParser) -> None:
    """``--job`` (the algorithm), each algorithm's own options, and the add-ons (``fedseg.jobs.addons``)."""
    from fedseg.jobs.addons import PRIVACY_FILTERS, WANDB_MODES, ContributionWeights, SiteGroups
    from fedseg.jobs.base import algorithms, describe_algorithms

    group = parser.add_argument_group("federated job")
    group.add_argument("--job", choices=list(algorithms()), default=DEFAULT_ALGORITHM,
                       help=f"the algorithm: {describe_algorithms()} (default: {DEFAULT_ALGORITHM})")
    seen: set[str] = set()
    for algo in algorithms().values():
        if algo.options is not None:
            add_dataclass_options(group, algo.options, seen=seen)
    addons = parser.add_argument_group("job add-ons")
    addons.add_argument("--wandb", choices=list(WANDB_MODES), default="off",
                        help="Weights & Biases tracking on the server, one run per site (sites need no credentials): "
                        "offline writes W&B runs for `wandb sync`; online needs WANDB_API_KEY on the server")
    addons.add_argument("--resume-from", type=Path, default=None,
                        help="continue a study from its last global checkpoint: FL_global_model.pt, a run folder or a "
                        "downloaded job; the rounds it holds are counted (--rounds is the study's total)")
    addons.add_argument("--aggregation", choices=["cases", "contribution"], default="cases",
                        help="site weights: training cases (FedAvg) or contribution (cases and how much the site's "
                        "update lowered its own validation loss, FedCostWAvg-style, capped by --max-site-share)")
    add_dataclass_options(addons, ContributionWeights)
    addons.add_argument("--privacy", choices=["off", *PRIVACY_FILTERS], default="off",
                        help="NVFlare privacy filter on every update a site sends (sites then send weight diffs)")
    addons.add_argument("--privacy-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="privacy filter argument, repeatable (percentile: percentile, gamma; svt: fraction, "
                        "epsilon, noise_var, gamma, tau, replace, epsilon_threshold, epsilon_query, epsilon_release)")
    addons.add_argument("--quantize", choices=["off", "fp16", "int8"], default="off",
                        help="the model exchange of every round, both directions: float32 (off), fp16 (half the "
                        "bytes) or int8 (about a quarter: one int8 scale per channel, small tensors in float32, the sites "
                        "send their update)")
    addons.add_argument("--grouped", action="store_true",
                        help="one global model per site group (each site declares its 'group' in its site config)")
    add_dataclass_options(addons, SiteGroups)


def algorithm_options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """``{algorithm: its options}`` for every algorithm with options, from the generated flags."""
    from fedseg.jobs.base import algorithms

    return {name: dataclass_from_args(args, algo.options) for name, algo in algorithms().items()
            if algo.options is not None}


def job_from_args(args: argparse.Namespace, study: StudyConfig, *, min_clients: int, name: str | None = None) -> Any:
    """The ``Job`` the options describe (``ValueError`` on a bad combination or value)."""
    from fedseg.jobs.addons import Addons, ContributionWeights, PrivacyFilter, SiteGroups, parse_privacy_args
    from fedseg.jobs.base import Job

    if args.share_encoder and not args.grouped:
        raise ValueError("--share-encoder needs --grouped")
    if args.privacy_arg and args.privacy == "off":
        raise ValueError("--privacy-arg given without a privacy filter (--privacy svt or percentile)")
    addons = Addons(
        privacy=PrivacyFilter(args.privacy, parse_privacy_args(args.privacy_arg)) if args.privacy != "off" else None,
        contribution=dataclass_from_args(args, ContributionWeights) if args.aggregation == "contribution" else None,
        groups=dataclass_from_args(args, SiteGroups) if args.grouped else None,
        wandb=args.wandb,
        resume_from=str(args.resume_from.resolve()) if args.resume_from else "",
        quantize=args.quantize,
    )
    options = algorithm_options_from_args(args).get(args.job)
    return Job(algorithm=args.job, study=study, name=name or args.job, min_clients=min_clients, options=options,
               addons=addons)


def add_verbose_option(parser: argparse.ArgumentParser) -> None:
    """``--verbose``: stream NVFlare's and Lightning's logs instead of keeping them in the run's log file."""
    parser.add_argument("--verbose", action="store_true",
                        help="stream NVFlare's and Lightning's own logs to the terminal (default: OUT/logs/, "
                        "with one live progress display here)")
