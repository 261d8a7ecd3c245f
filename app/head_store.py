"""`FedPerHeadStore`: the site-local file that keeps a site's personal head across rounds,
process restarts and later jobs of the same study. It never leaves the site.

One file per study (``<store dir>/<study>.pt``), written atomically (temporary file + rename), with
the head's state dict and a small record: which encoder round it was last trained with, which job,
and when. The store folder comes from the site's configuration (``head_store`` in
``fedseg_site.json``), outside any job's run folder, so a new job of the same study finds it.
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


@dataclass
class HeadRecord:
    """What the store knows about a saved head."""

    encoder_round: int
    job_id: str | None
    saved_at: float
    keys: list[str]


class FedPerHeadStore:
    """Load and save one site's personal parameters for one study."""

    def __init__(self, folder: Path | str, study: str) -> None:
        if not re.fullmatch(r"[A-Za-z0-9._-]+", study):
            raise ValueError(f"study name {study!r}: use letters, digits, '.', '_' or '-'")
        self.folder = Path(folder)
        self.study = study
        self.path = self.folder / f"{study}.pt"

    def exists(self) -> bool:
        return self.path.is_file()

    def record(self) -> HeadRecord | None:
        """The saved head's record, or None for a site new to the study."""
        if not self.exists():
            return None
        saved = torch.load(self.path, map_location="cpu", weights_only=False)
        return HeadRecord(**saved["record"])

    def load_into(self, module: torch.nn.Module, keys: list[str]) -> HeadRecord | None:
        """Copy the saved head into ``module``; None (module untouched) when there is none yet.

        A saved head whose keys or shapes differ from ``keys`` (another network) is an error, not
        silently replaced: the store belongs to the study's network.
        """
        if not self.exists():
            return None
        saved = torch.load(self.path, map_location="cpu", weights_only=False)
        state = saved["state"]
        current = module.state_dict()
        if sorted(state) != sorted(keys):
            raise ValueError(f"{self.path}: the stored head does not fit this network (keys differ); move it away to start fresh")
        bad = [k for k in keys if state[k].shape != current[k].shape]
        if bad:
            raise ValueError(f"{self.path}: stored head shapes differ for {bad[:3]}; move it away to start fresh")
        module.load_state_dict(state, strict=False)
        return HeadRecord(**saved["record"])

    def save(self, module: torch.nn.Module, keys: list[str], *, encoder_round: int, job_id: str | None = None) -> Path:
        """Atomically write ``module``'s ``keys`` with the encoder round they were trained with."""
        current = module.state_dict()
        state = {k: current[k].detach().cpu().clone() for k in keys}
        record = {"encoder_round": int(encoder_round), "job_id": job_id, "saved_at": time.time(), "keys": list(keys)}
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.folder)
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
