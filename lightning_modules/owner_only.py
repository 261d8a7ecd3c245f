"""Folders that only their owner can enter: for anything derived from patients' images (the
preprocessed-volume cache, personal model parts) and for private keys (startup kits)."""

from __future__ import annotations

from pathlib import Path


def owner_only_dir(folder: Path | str) -> Path:
    """``mkdir -p folder`` where every folder it creates, and ``folder`` itself, is mode 0700."""
    folder = Path(folder)
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    for path in reversed(missing):
        path.mkdir(mode=0o700, exist_ok=True)
        path.chmod(0o700)  # mkdir's mode is masked by the umask
    folder.chmod(0o700)
    return folder
