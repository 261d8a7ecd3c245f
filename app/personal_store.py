"""``PersonalModelStore``: the site-local file that keeps a site's personal model (or the personal
part of it) across rounds, process restarts and later jobs of the same study. It never leaves the site.

Every personalized method keeps its personal part here: FedPer's and FedRep's head, Ditto's
personal model, the fine-tuned model. One file per study and kind (``<store dir>/<study>.pt`` for a
FedPer or FedRep head; the others keep their own kind beside it, e.g. ``<study>.ditto.pt``),
written atomically (temporary file + rename) and owner-only (folder 0700, file 0600: on a shared
disk other users could read a model trained on the site's patients), with the parameters and a
small record: the round of the global model they were last trained with, which job, and when. The
store folder comes from the site's configuration (``head_store`` in ``fedseg_site.json``, the
key's historical name), outside any job's run folder, so a new job of the same study finds it.
Files are read without running code from them (``fedseg.lightning_modules.safe_load``).
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedseg.lightning_modules.owner_only import owner_only_dir
from fedseg.lightning_modules.safe_load import load_checkpoint


@dataclass
class PersonalRecord:
    """What the store knows about saved personal parameters."""

    #: the round of the global model they were last trained with (FedPer's encoder, Ditto's pull)
    global_round: int
    job_id: str | None
    saved_at: float
    keys: list[str]

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> PersonalRecord:
        """The record as saved; files written before the rename call the round ``encoder_round``."""
        doc = dict(doc)
        if "encoder_round" in doc:
            doc["global_round"] = doc.pop("encoder_round")
        return cls(**doc)


class PersonalModelStore:
    """Load and save one site's personal parameters for one study (one kind of personal model)."""

    def __init__(self, folder: Path | str, study: str, kind: str = "") -> None:
        for name, value in (("study", study), ("kind", kind)):
            if value and not re.fullmatch(r"[A-Za-z0-9._-]+", value):
                raise ValueError(f"{name} name {value!r}: use letters, digits, '.', '_' or '-'")
        if not study:
            raise ValueError("a personal model store needs a study name")
        self.folder = Path(folder)
        self.study = study
        self.path = self.folder / (f"{study}.{kind}.pt" if kind else f"{study}.pt")

    def exists(self) -> bool:
        return self.path.is_file()

    def _read(self) -> dict[str, Any]:
        saved = load_checkpoint(self.path)
        if not isinstance(saved, dict) or not {"state", "record"} <= set(saved):
            raise ValueError(f"{self.path}: not a fedseg personal model store file; move it away to start fresh")
        return saved

    def record(self) -> PersonalRecord | None:
        """The saved parameters' record, or None for a site new to the study."""
        return PersonalRecord.from_json(self._read()["record"]) if self.exists() else None

    def load_into(self, module: torch.nn.Module, keys: list[str]) -> PersonalRecord | None:
        """Copy the saved parameters into ``module``; None (module untouched) when there are none yet.

        Saved parameters whose keys or shapes differ from ``keys`` (another network or head depth)
        are an error, not silently replaced: the store belongs to the study's network.
        """
        if not self.exists():
            return None
        saved = self._read()
        state = saved["state"]
        current = module.state_dict()
        if sorted(state) != sorted(keys):
            raise ValueError(f"{self.path}: the stored parameters do not fit this network (keys differ); "
                             "move the file away to start fresh")
        bad = [k for k in keys if state[k].shape != current[k].shape]
        if bad:
            raise ValueError(f"{self.path}: stored shapes differ for {bad[:3]}; move the file away to start fresh")
        module.load_state_dict(state, strict=False)
        return PersonalRecord.from_json(saved["record"])

    def save(self, module: torch.nn.Module, keys: list[str], *, global_round: int, job_id: str | None = None) -> Path:
        """Atomically write ``module``'s ``keys`` (owner-only) with the global model's round they were trained with."""
        current = module.state_dict()
        state = {k: current[k].detach().cpu().clone() for k in keys}
        record = {"global_round": int(global_round), "job_id": job_id, "saved_at": time.time(), "keys": list(keys)}
        owner_only_dir(self.folder)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.folder)  # mkstemp: mode 0600
        os.close(fd)
        try:
            torch.save({"state": state, "record": record}, tmp)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return self.path

    def to_json(self) -> dict[str, Any]:
        record = self.record()
        return {"path": str(self.path), "record": record.__dict__ if record else None}
