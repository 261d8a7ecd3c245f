"""Where a stopped federated study continues: its last global checkpoint and the rounds it holds.

Every round, the server's persistor writes the global model to ``FL_global_model.pt``
atomically (NVFlare 2.9's ``PTFileModelPersistor.save_model_file``: a temporary file in the same
folder, fsync, ``os.replace``), with the round in its ``meta_props``. A new job that starts from
that file with ``start_round`` = rounds done continues the study: nothing is retrained, the
rounds are counted, and the sites of a personalized study reload their personal models from their
stores (``fedseg.app.personal_store``).

``find_resume_point`` accepts what a user has at hand: the checkpoint itself, a ``fedseg
simulate`` run folder, a downloaded POC/production job (``<job id>/workspace/...``) or a server
run folder.

It sits in ``jobs`` because a job that resumes reads it when it is built (``fedseg.jobs.base.resume_start``);
the runners above (``fedseg.run``, ``fedseg.cli``) read it from here too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

GLOBAL_MODEL_FILE = "FL_global_model.pt"
#: where the global checkpoint lies below the folders a user may pass, most specific first
_CANDIDATES = (
    GLOBAL_MODEL_FILE,
    f"app_server/{GLOBAL_MODEL_FILE}",
    f"workspace/app_server/{GLOBAL_MODEL_FILE}",
)


class ResumeError(ValueError):
    """No usable checkpoint to resume from (the message names the path and the problem)."""


@dataclass(frozen=True)
class ResumePoint:
    """A global checkpoint and the number of rounds it has seen (1-based count)."""

    checkpoint: Path
    rounds_done: int


def find_resume_point(path: Path) -> ResumePoint:
    """The checkpoint at or below ``path`` and its rounds; ``ResumeError`` if there is none."""
    path = Path(path).resolve()
    checkpoint = path if path.is_file() else _find_checkpoint(path)
    rounds_done = _rounds_done(checkpoint)
    return ResumePoint(checkpoint, rounds_done)


def _find_checkpoint(folder: Path) -> Path:
    if not folder.is_dir():
        raise ResumeError(f"{folder}: no such checkpoint file or run folder")
    for candidate in _CANDIDATES:
        if (folder / candidate).is_file():
            return folder / candidate
    # a fedseg run folder: RUN/nvflare/<job>/server/<job id>/app_server/...; the newest one
    found = sorted(folder.glob(f"nvflare/*/server/*/app_server/{GLOBAL_MODEL_FILE}"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise ResumeError(f"{folder}: no {GLOBAL_MODEL_FILE} found (looked for {', '.join(_CANDIDATES)} and "
                          f"nvflare/*/server/*/app_server/{GLOBAL_MODEL_FILE})")
    return found[-1]

def _rounds_done(checkpoint: Path) -> int:
    from fedseg.lightning_modules.safe_load import CheckpointError, load_checkpoint

    try:
        doc = load_checkpoint(checkpoint)
    except CheckpointError as err:
        raise ResumeError(str(err)) from None
    meta = doc.get("meta_props") if isinstance(doc, dict) else None
    current = meta.get("current_round") if isinstance(meta, dict) else None
    if not isinstance(current, int) or isinstance(current, bool) or current < 0:
        raise ResumeError(f"{checkpoint}: the checkpoint does not say which round it is from "
                          "(no meta_props.current_round); is it a global model written by a fedseg job?")
    return current + 1
