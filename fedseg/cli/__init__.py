"""The ``fedseg`` command line.

Each module in this package is one command group and defines ``register(subparsers)``, which adds
its sub-command(s) and sets ``func`` on the parser. Modules are discovered, so adding a command
means adding a module here. Keep them thin: parse arguments, call library functions, print.
Heavy imports (torch, monai, nvflare) belong inside the handlers so ``fedseg --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence

from fedseg import __version__


class UserError(Exception):
    """A problem the user can fix (bad path, bad dataset, bad option): printed without a traceback."""


def three_ints(values: Sequence[int], option: str) -> tuple[int, int, int]:
    """An option that takes one number (a cube) or three (x y z), e.g. ``--roi 128``."""
    if len(values) == 1:
        return (int(values[0]),) * 3
    if len(values) != 3:
        raise UserError(f"{option} takes one or three numbers")
    return tuple(int(v) for v in values)  # type: ignore[return-value]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedseg",
        description="Federated 3D brain-tumour segmentation: data, training, NVFlare jobs.",
    )
    parser.add_argument("--version", action="version", version=f"fedseg {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except UserError as err:
        print(f"fedseg {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
