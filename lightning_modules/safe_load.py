"""Loading a checkpoint without running code from it.

A pickle can run any code when loaded, and fedseg reads files that another party wrote: global
models the server sent, checkpoints a study lead shares, a personal model store on a shared disk.
Every such file is read with ``torch.load(weights_only=True)``: tensors, numbers, strings and
plain containers only (plus the few classes a caller names, e.g. TenSEAL ciphertexts). A file that
holds anything else is refused with ``UnsafeCheckpointError`` naming it, before any of its code runs.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


class CheckpointError(ValueError):
    """A checkpoint file that is missing or not readable (the message names it)."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint whose pickle holds more than weights: it could run code, so it is not loaded."""


def load_checkpoint(path: Path | str, *, extra_globals: Sequence[Any] = ()) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, with ``extra_globals`` allowed too."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        with torch.serialization.safe_globals(list(extra_globals)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch names the class it refused in a line "... GLOBAL <module>.<name> ..."
        refused = next((line.strip() for line in str(err).splitlines() if "GLOBAL" in line), "")
        if not refused:
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(err).__name__})") from None
        raise UnsafeCheckpointError(
            f"{path}: refused: the file holds Python objects that could run code when loaded, not only "
            f"weights ({refused}). Load only checkpoints written by fedseg or NVFlare."
        ) from None
    except (RuntimeError, OSError, EOFError) as err:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(err).__name__}: {err})") from None
