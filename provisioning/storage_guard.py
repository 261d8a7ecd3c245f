"""The server refuses to start on job storage that other accounts can read.

The server's storage holds every job of the study: global and best models, the sites' metrics,
the participation report. ``fedseg.provisioning.kits.set_server_storage`` points the server kit's
``local/resources.json`` at it and adds one line to the kit's ``startup/start.sh``::

    python3 -m fedseg.provisioning.storage_guard "$DIR/.." || exit 1

so before NVFlare starts, ``check_storage`` runs: a storage folder that does not exist yet is
created owner-only (0700; NVFlare would create it with the umask's 0755), and one that exists but
is open to the group or others, or belongs to another account, stops the start with a message
naming the folder and the fix. The server itself is unchanged: the check is in the kit.

Only the standard library is imported: the check runs before every server start.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

#: the line ``install_guard`` adds to a server kit's ``startup/start.sh`` (after its DIR= line)
GUARD_LINE = 'python3 -m fedseg.provisioning.storage_guard "$DIR/.." || exit 1  # fedseg: owner-only job storage'


class StorageError(RuntimeError):
    """The server's storage is not owner-only; the message names the folder and the fix."""


def storage_folders(kit: Path) -> list[Path]:
    """The folders ``kit``'s ``local/resources.json`` stores jobs, snapshots and staged logs in,
    with their common parent (the storage folder itself) first."""
    resources = Path(kit) / "local" / "resources.json"
    try:
        config = json.loads(resources.read_text())
        components = {c.get("id"): c for c in config["components"]}
        folders = [config["snapshot_persistor"]["args"]["storage"]["args"]["root_dir"],
                   components["job_manager"]["args"]["uri_root"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise StorageError(f"{resources}: no job storage of fedseg's layout in it ({err}); "
                           "run `fedseg provision server-storage KIT`") from None
    staging = components.get("log_receiver", {}).get("args", {}).get("dest_dir")
    paths = [Path(f) for f in (*folders, staging) if f]
    common = Path(os.path.commonpath([str(p) for p in paths]))
    return ([common] if common not in paths and common != Path(common.anchor) else []) + paths


def check_storage(kit: Path) -> list[Path]:
    """Create missing storage folders owner-only; ``StorageError`` for one others can read. The folders."""
    folders = storage_folders(kit)
    for folder in folders:
        if not folder.exists():
            try:
                for path in reversed([p for p in (folder, *folder.parents) if not p.exists()]):
                    path.mkdir(mode=0o700)
                    path.chmod(0o700)
            except OSError as err:
                raise StorageError(f"cannot create the server's storage folder {folder} ({err.strerror}). Create it "
                                   f"owned by this account: `sudo install -d -m 0700 -o $USER {folder}`, or choose "
                                   "another one: `fedseg provision server-storage KIT --storage FOLDER`") from None
            continue
        info = folder.stat()
        if not stat.S_ISDIR(info.st_mode):
            raise StorageError(f"the server's storage {folder} is not a folder")
        if info.st_uid != os.getuid():
            raise StorageError(f"the server's storage folder {folder} belongs to another account (uid {info.st_uid}); "
                               "the study's models and metrics must be this account's alone: "
                               f"`sudo chown -R $USER {folder}`")
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o077:
            raise StorageError(f"the server's storage folder {folder} is open to other accounts (mode {mode:o}): they "
                               "could read the study's models and metrics. Refusing to start. Fix: "
                               f"`chmod -R go-rwx {folder}`, then start again")
    return folders


def install_guard(kit: Path) -> Path:
    """Add ``GUARD_LINE`` to ``kit/startup/start.sh`` (once), before it starts the server; the script."""
    script = Path(kit) / "startup" / "start.sh"
    lines = script.read_text().splitlines(keepends=True)
    if any(GUARD_LINE in line for line in lines):
        return script
    at = next((i + 1 for i, line in enumerate(lines) if line.startswith("DIR=")), None)
    if at is None:
        raise StorageError(f"{script}: not NVFlare's start script (no DIR= line)")
    lines.insert(at, GUARD_LINE + "\n")
    mode = stat.S_IMODE(script.stat().st_mode)
    script.write_text("".join(lines))
    script.chmod(mode)
    return script


def main(argv: list[str] | None = None) -> int:
    """``python -m fedseg.provisioning.storage_guard KIT``: exit 1 with the reason if the storage is not owner-only."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m fedseg.provisioning.storage_guard SERVER_KIT", file=sys.stderr)
        return 2
    try:
        check_storage(Path(args[0]))
    except StorageError as err:
        print(f"fedseg: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
