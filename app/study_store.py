"""The server's durable study store: every completed round of a study, kept outside the job.

NVFlare 2.9 writes a job's global model into the server's *job workspace* (``<server kit>/<job
id>/app_server/``), which a server restart abandons and which only a finished job's download
returns. fedseg's round workflows (``fedseg.app.resilient_fedavg``) also copy every completed
round into this store, so that a crashed, stuck or aborted job loses at most the round in flight
and the next job of the same study (``fedseg study``) continues from the last completed round
without anyone downloading anything.

Where it is, on the server machine (first that applies):

1. ``$FEDSEG_SERVER_STORE`` in the server's environment;
2. ``<parent of the server's job storage>/fedseg-studies``: the job storage is the job manager's
   ``uri_root`` in the server kit's ``local/resources.json`` (``fedseg provision server-storage``
   puts it at ``<storage>/jobs``, so the store is ``<storage>/fedseg-studies``; POC:
   ``<poc workspace>/fedseg-studies``; NVFlare's default ``/tmp/nvflare/fedseg-studies``);
3. ``<server workspace>/fedseg-studies``.

Layout of one study (``<store>/<study id>/``)::

    round-0001/record.json             the round's participation record (+ job id, time)
    round-0003/FL_global_model.pt      the global model after round 3 (NVFlare's checkpoint format)
    round-0003/fedopt_optimizer.pt     FedOpt: the server optimizer's state after round 3
    round-0003/record.json

A round folder is written as ``.round-0003.tmp-<pid>``, its files fsynced, then renamed in one
``os.rename``: a folder named ``round-NNNN`` is always complete. The model files of all but the
last ``KEEP_MODELS`` rounds are removed; every round's ``record.json`` stays. A round written
twice (a completed round run again) keeps the newer copy, and the redo is noted in ``redone.jsonl``.

Nothing here imports torch or NVFlare: the supervisor and the tests read the store with it too.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

STORE_ENV = "FEDSEG_SERVER_STORE"
STORE_FOLDER = "fedseg-studies"
MODEL_FILE = "FL_global_model.pt"
RECORD_FILE = "record.json"
REDONE_FILE = "redone.jsonl"
KEEP_MODELS = 2
_ROUND = re.compile(r"^round-(\d{4,})$")


def store_root(workspace_root: str | os.PathLike | None) -> Path:
    """The store folder on this server (see the module docstring for the order)."""
    if os.environ.get(STORE_ENV):
        return Path(os.environ[STORE_ENV]).expanduser().absolute()
    if workspace_root:
        jobs = job_storage(Path(workspace_root))
        if jobs is not None:
            return jobs.parent / STORE_FOLDER
        return Path(workspace_root).absolute() / STORE_FOLDER
    return Path.cwd() / STORE_FOLDER


def job_storage(workspace_root: Path) -> Path | None:
    """The job manager's ``uri_root`` from the server kit's ``local/resources.json`` (or ``.default``)."""
    for name in ("resources.json", "resources.json.default"):
        path = Path(workspace_root) / "local" / name
        if not path.is_file():
            continue
        try:
            doc = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        for component in doc.get("components", []):
            if component.get("id") == "job_manager":
                root = (component.get("args") or {}).get("uri_root")
                if root:
                    return Path(root)
    return None


def round_dir(study: Path, rnd: int) -> Path:
    return Path(study) / f"round-{int(rnd):04d}"


def completed_rounds(study: Path) -> list[int]:
    """Round numbers (1-based) whose folder exists in the study's store, ascending."""
    study = Path(study)
    if not study.is_dir():
        return []
    found = []
    for entry in study.iterdir():
        match = _ROUND.match(entry.name)
        if match and entry.is_dir():
            found.append(int(match.group(1)))
    return sorted(found)


def latest_model(study: Path) -> tuple[int, Path] | None:
    """``(rounds done, round folder)`` of the newest round that holds a global model; None if none."""
    for rnd in reversed(completed_rounds(study)):
        folder = round_dir(study, rnd)
        if (folder / MODEL_FILE).is_file():
            return rnd, folder
    return None


def records(study: Path) -> list[dict[str, Any]]:
    """Every round's participation record, by round."""
    out = []
    for rnd in completed_rounds(study):
        path = round_dir(study, rnd) / RECORD_FILE
        if path.is_file():
            try:
                out.append(json.loads(path.read_text()))
            except (OSError, json.JSONDecodeError):
                continue
    return out


def redone(study: Path) -> list[dict[str, Any]]:
    path = Path(study) / REDONE_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


STUDY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def study_folder(root: Path, study_id: str) -> Path:
    """``root/<study_id>``, created owner-only; ``ValueError`` for an id that is not one plain folder
    name (the id comes from the job's settings: it must never lead out of the store)."""
    if not STUDY_ID.fullmatch(study_id or "") or ".." in study_id:
        raise ValueError(f"study id {study_id!r} is not a plain name (letters, digits, '.', '_' or '-')")
    folder = Path(root) / study_id
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    folder.chmod(0o700)  # global models of a study: the server account's only
    return folder


def save_round(study: Path, rnd: int, files: Mapping[str, str | os.PathLike], record: Mapping[str, Any],
               keep_models: int = KEEP_MODELS) -> Path:
    """Write round ``rnd`` (1-based) atomically: ``files`` (name -> source file, copied) and ``record``.

    Returns the round's folder. Older rounds keep their record but lose their model files (all but
    the newest ``keep_models``).
    """
    study = Path(study)
    study.mkdir(parents=True, exist_ok=True, mode=0o700)
    final = round_dir(study, rnd)
    tmp = study / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(mode=0o700)
    tmp.chmod(0o700)
    for name, source in files.items():
        shutil.copyfile(source, tmp / name)
        (tmp / name).chmod(0o600)
        _fsync_file(tmp / name)
    doc = {**dict(record), "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (tmp / RECORD_FILE).write_text(json.dumps(doc, indent=1))
    (tmp / RECORD_FILE).chmod(0o600)
    _fsync_file(tmp / RECORD_FILE)
    _fsync_dir(tmp)
    if final.exists():  # this round was completed before: the newer copy wins, the redo is noted
        with open(study / REDONE_FILE, "a") as f:
            f.write(json.dumps({"round": int(rnd), "job_id": record.get("job_id", ""), "at": doc["saved_at"]}) + "\n")
        old = study / f".{final.name}.old-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_dir(study)
    for older in completed_rounds(study)[:-keep_models] if keep_models > 0 else []:
        for name in files:
            try:
                (round_dir(study, older) / name).unlink()
            except FileNotFoundError:
                pass
    return final


__all__ = [
    "STUDY_ID",
    "study_folder",
    "KEEP_MODELS",
    "MODEL_FILE",
    "RECORD_FILE",
    "STORE_ENV",
    "STORE_FOLDER",
    "completed_rounds",
    "job_storage",
    "latest_model",
    "records",
    "redone",
    "round_dir",
    "save_round",
    "store_root",
]
