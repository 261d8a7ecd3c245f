"""The ``nvflare`` command line of this environment, as provisioning and the local deployments run it.

Here, below both, because provisioning (``fedseg.provisioning.kits``, ``distributed``) runs
``nvflare provision`` / ``cert`` / ``package`` and the local deployments above it
(``fedseg.run.deployment``) run ``nvflare job submit`` / ``wait`` / ``download`` the same way.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any


class DeploymentError(RuntimeError):
    """A deployment step failed; the message names the step, the command and where its output is."""


def nvflare_executable() -> str:
    """The ``nvflare`` CLI of this Python environment (the one fedseg is installed in)."""
    beside = Path(sys.executable).parent / "nvflare"
    found = str(beside) if beside.is_file() else shutil.which("nvflare")
    if not found:
        raise DeploymentError("the `nvflare` command is not installed in this environment (pip install nvflare)")
    return found


def last_json_object(text: str) -> dict[str, Any] | None:
    """The last line of ``text`` that is a JSON object (the CLI's result in ``--format json``)."""
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                doc = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(doc, dict):
                return doc
    return None
