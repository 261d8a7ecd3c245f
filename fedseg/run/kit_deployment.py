"""Provisioned startup kits run as local processes: a whole consortium on one machine.

What each site does on its own machine, done here on localhost: ``<kit>/startup/start.sh`` for
the server and every hospital (mutual TLS with the kits' certificates, exactly as in production),
then the lead submits, waits for and downloads a job with ``nvflare job ... --startup-kit <lead kit>``.
Used to try a consortium end to end before its kits are shipped, and by the tests (a server named
``localhost`` on a free port).

``LocalKitDeployment`` is a ``fedseg.run.deployment.LocalDeployment`` (as POC's deployment is)
whose kits come from ``fedseg.provisioning.kits.provision``: submit, wait, download, site configs,
the isolated ``HOME`` (``nvflare`` rewrites ``~/.nvflare/config.conf``) and the cleanup are shared. On exit, also after an error, every process whose command line names a
started kit's consortium folder is ended (the kits' start loops first, so none restarts).

It is a runner (``fedseg.run``), above provisioning, which only makes the kits.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from fedseg.provisioning.kits import ConsortiumKits
from fedseg.run.deployment import DeploymentError, LocalDeployment, processes_matching


class LocalKitDeployment(LocalDeployment):
    """The kits of ``kits`` started as local processes; ``root`` holds HOME and the CLI logs.

    ``with LocalKitDeployment(kits, root) as d: d.install_site_config(...); d.start(); d.submit(job)``.
    ``start_kit`` starts any other kit too (e.g. one from another consortium), and its processes
    are ended with the rest. ``site_kits`` names hospital kits kept outside the consortium folder
    (kits a hospital assembled itself from its own key: ``fedseg.provisioning.distributed``).
    """

    def __init__(self, kits: ConsortiumKits, root: Path, *, log: Callable[[str], None] | None = None,
                 site_kits: Mapping[str, Path] | None = None) -> None:
        consortium = kits.consortium
        super().__init__(root, consortium.hospital_names, port=consortium.server.port, log=log)
        self.project = consortium.name
        self.kits = kits
        self.site_kits = {name: Path(kit).resolve() for name, kit in (site_kits or {}).items()}
        self.started_kits: list[Path] = []

    # ---------------------------------------------------------------- where the kits are

    @property
    def prod_dir(self) -> Path:
        return self.kits.folder

    @property
    def admin_kit(self) -> Path:
        """The lead's admin kit: submits, waits for and downloads jobs."""
        return self.kits.lead_kit

    def site_kit(self, site: str) -> Path:
        return self.site_kits.get(site) or self.kits.hospital_kit(site)

    @property
    def server_kit(self) -> Path:
        return self.kits.server_kit

    # ---------------------------------------------------------------- start and status

    def start_kit(self, kit: Path) -> None:
        """``<kit>/startup/start.sh``, as the site's admin runs it; console output in ``logs/<kit>.console.log``.

        start.sh puts the kit's start loop (sub_start.sh) in the background and returns.
        """
        kit = Path(kit).resolve()
        script = kit / "startup" / "start.sh"
        if not script.is_file():
            raise DeploymentError(f"{kit}: not a server or site startup kit (no startup/start.sh)")
        self.home.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        self._started = True  # from here on, __exit__ must end whatever did start
        self.started_kits.append(kit)
        console = self.logs / f"{kit.name}.console.log"
        with console.open("a") as out:
            subprocess.run(["bash", str(script)], cwd=kit, env=self.env(), stdin=subprocess.DEVNULL, stdout=out,
                           stderr=subprocess.STDOUT, timeout=60, start_new_session=True, check=True)
        self.log(f"[kits] started {kit}")

    def start(self, timeout: int = 240) -> None:
        """Start the server and every hospital from their kits; return once all are connected."""
        with self.step("start", f"starting the server and {len(self.sites)} hospitals from their kits"):
            self.start_kit(self.kits.server_kit)
            for site in self.sites:
                self.start_kit(self.site_kit(site))
            self.wait_for_sites(self.sites, timeout)

    def connected_sites(self) -> list[str]:
        """The sites the server lists now (``nvflare system status`` with the lead's kit)."""
        doc = self.nvflare("status", ["system", "status", *self.kit_args()], timeout=120)
        clients = ((doc.get("data") or {}).get("clients") or []) if doc.get("status") == "ok" else []
        return sorted(str(c.get("client_name")) for c in clients)

    def wait_for_sites(self, sites: tuple[str, ...] | list[str], timeout: float) -> None:
        """Poll the server until every one of ``sites`` is connected; ``DeploymentError`` with log tails if not."""
        deadline = time.monotonic() + timeout
        connected: list[str] = []
        while time.monotonic() < deadline:
            connected = self.connected_sites()
            if set(sites) <= set(connected):
                return
            time.sleep(2)
        raise DeploymentError(f"after {timeout:.0f} s the server lists {connected or 'no sites'}, not all of "
                       f"{', '.join(sites)}\n{self._console_tails()}")

    # ---------------------------------------------------------------- stop

    def stop(self, timeout: int = 60) -> int:
        """End every process of the started kits; how many there were.

        A kit's own stop is ``startup/stop_fl.sh`` (interactive: it asks y/N, then its start loop
        kills the FL process with SIGKILL, nvflare's start script templates), so this ends them
        directly: the start loops first, then the server and site processes (SIGTERM, then SIGKILL).
        """
        with self.step("stop", "ending the server and site processes"):
            killed = self.kill_leftovers()
            self._started = False
        self.leftovers_killed += killed
        return killed

    def running_processes(self) -> list[tuple[int, str]]:
        """``(pid, command line)`` of every process that names a started kit's consortium folder."""
        folders = {self.kits.folder, *(kit.parent for kit in self.started_kits)}
        needles = {os.path.join(str(f), "") for f in folders} | {os.path.join(os.path.realpath(f), "") for f in folders}
        return processes_matching(sorted(needles))

    def _console_tails(self, lines: int = 15) -> str:
        parts = []
        for kit in self.started_kits:
            path = kit / "log.txt"
            if path.is_file():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {path} (last {len(tail)} lines)\n" + "\n".join(tail))
        return "\n".join(parts)


__all__ = ["LocalKitDeployment"]
