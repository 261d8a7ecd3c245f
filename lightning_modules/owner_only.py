"""Folders and files that only their owner can read: for anything derived from patients' images
(the preprocessed-volume cache, personal model parts, predictions, scores, checkpoints) and for
private keys (startup kits).

Two tools: ``owner_only_dir`` makes a folder (and the parents it creates) 0700, and
``owner_only_files`` narrows the process umask to 077 while a block writes, so that files made by
libraries we do not control (Lightning's checkpoints, matplotlib's PNGs, nibabel) are 0600 and
folders 0700 from the moment they exist, not after a later ``chmod``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
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


@contextmanager
def owner_only_files() -> Iterator[None]:
    """Within the block, new files are created 0600 and new folders 0700 (umask 077).

    The umask belongs to the whole process: a thread writing elsewhere meanwhile also gets
    owner-only files, which is the safe side. The previous umask is restored on exit.
    """
    previous = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(previous)

