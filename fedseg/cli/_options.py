"""Command-line options made from the configuration's fields (``fedseg.config``), so a default
lives in one place: the option ``--features`` is the field ``ModelSettings.features``, its help
is the field's, and its default is the chosen ``--profile``'s value.

Options left out on the command line take the profile's value; ``study_from_args`` returns the
profile with the given options applied. Also the options of the algorithms, the add-ons
(``fedseg.jobs.addons.AddonSettings``), ``fedseg train`` (``TrainSettings``) and ``fedseg data
split`` (``SplitSettings``), made the same way from their dataclasses (``add_dataclass_options``):
no option of these is written by hand.
"""

from __future__ import annotations

import argparse
import dataclasses
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
    """One ``--<prefix><name>`` option for dataclass field ``f``; ``shown_default`` goes into its help.

    The field's metadata past its help are argparse's (``choices``, ``nargs``, ``metavar``,
    ``action="append"``; ``action="store_true"`` for a bool flag with no ``--no-`` form, which a
    bool otherwise gets). A default of None, nothing or an absent flag is not shown."""
    meta = dict(f.metadata)
    help_text = meta.pop("help", "")
    kind = _field_type(f)
    kwargs: dict[str, Any] = {"default": _MISSING, "dest": prefix.replace("-", "_") + f.name}
    if kind is bool:
        kwargs["action"] = meta.pop("action", argparse.BooleanOptionalAction)
    else:
        kwargs["type"] = kind
    nothing = shown_default is None or (isinstance(shown_default, (tuple, list)) and not shown_default)
    if nothing or kwargs.get("action") == "store_true":
        kwargs["help"] = help_text
    else:
        shown = " ".join(map(str, shown_default)) if isinstance(shown_default, (tuple, list)) else shown_default
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


#: the annotations an option parses its values to (any other: str)
_OPTION_TYPES: dict[str, type] = {"bool": bool, "int": int, "float": float, "str": str, "Path": Path}


def _field_type(f: dataclasses.Field) -> type:
    """The type of the option's values: the field's, or its items' (``tuple[int, ...]``: int), "| None" aside.

    The annotations are read as written (``from __future__ import annotations`` keeps them text)."""
    text = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    kinds = [part.strip() for part in text.split("|") if part.strip() not in ("None", "")]
    kind = kinds[0] if kinds else "str"
    if "[" in kind:  # tuple[int, ...], list[str]: the items' type
        kind = kind[kind.index("[") + 1:].split(",")[0].rstrip("]").strip()
    return _OPTION_TYPES.get(kind, str)


# ------------------------------------------------------------------------------ jobs

def add_job_options(parser: argparse.ArgumentParser) -> None:
    """``--job`` (the algorithm), each algorithm's own options, and the add-ons (``fedseg.jobs.addons``:
    ``AddonSettings``, then the options of contribution weights and site groups)."""
    from fedseg.jobs.addons import AddonSettings, ContributionWeights, SiteGroups
    from fedseg.jobs.base import algorithms, describe_algorithms

    group = parser.add_argument_group("federated job")
    group.add_argument("--job", choices=list(algorithms()), default=DEFAULT_ALGORITHM,
                       help=f"the algorithm: {describe_algorithms()} (default: {DEFAULT_ALGORITHM})")
    seen: set[str] = set()
    for algo in algorithms().values():
        if algo.options is not None:
            add_dataclass_options(group, algo.options, seen=seen)
    addons = parser.add_argument_group("job add-ons")
    for settings in (AddonSettings, ContributionWeights, SiteGroups):
        add_dataclass_options(addons, settings)


def algorithm_options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """``{algorithm: its options}`` for every algorithm with options, from the generated flags."""
    from fedseg.jobs.base import algorithms

    return {name: dataclass_from_args(args, algo.options) for name, algo in algorithms().items()
            if algo.options is not None}


def job_from_args(args: argparse.Namespace, study: StudyConfig, *, min_clients: int, name: str | None = None) -> Any:
    """The ``Job`` the options describe (``ValueError`` on a bad combination or value)."""
    from fedseg.jobs.addons import Addons, AddonSettings, ContributionWeights, SiteGroups
    from fedseg.jobs.base import Job

    addons = Addons.from_settings(dataclass_from_args(args, AddonSettings),
                                  contribution=dataclass_from_args(args, ContributionWeights),
                                  groups=dataclass_from_args(args, SiteGroups))
    options = algorithm_options_from_args(args).get(args.job)
    return Job(algorithm=args.job, study=study, name=name or args.job, min_clients=min_clients, options=options,
               addons=addons)


def add_verbose_option(parser: argparse.ArgumentParser) -> None:
    """``--verbose``: stream NVFlare's and Lightning's logs instead of keeping them in the run's log file."""
    parser.add_argument("--verbose", action="store_true",
                        help="stream NVFlare's and Lightning's own logs to the terminal (default: OUT/logs/, "
                        "with one live progress display here)")
