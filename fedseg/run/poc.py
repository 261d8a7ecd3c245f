"""POC mode: a real NVFlare deployment (server + named sites) on this machine, driven by the CLI.

``nvflare poc`` provisions a project into startup kits (one per participant) and runs the server
and every site as separate local processes, exactly as on real hospitals, only all on localhost.
``PocDeployment`` wraps the commands a study admin and the hospital admins would type::

    nvflare poc prepare -i project.yml           # kits for server, admin and the named sites
    <site kit>/local/fedseg_site.json            # each hospital: where its data is
    nvflare poc start                            # server + sites, waits until all sites are ready
    nvflare job submit -j <job folder>           # with the admin kit
    nvflare job wait <job id>                    # until FINISHED:...
    nvflare job download <job id>                # the server's run folder: models, metrics
    nvflare poc stop                             # and: no process of the deployment is left

Isolation (NVFlare 2.9): ``nvflare poc prepare`` rewrites ``~/.nvflare/config.conf`` (the active
startup kit and ``poc.workspace``, nvflare/tool/kit/kit_config.py) and the POC workspace defaults
to ``/tmp/nvflare/poc``; every command here therefore runs with ``HOME`` and
``NVFLARE_POC_WORKSPACE`` inside the deployment folder, so the user's own NVFlare setup is never
touched and two deployments never share a workspace. ``nvflare poc prepare`` has no port option:
the port is set in ``project.yml`` (``fed_learn_port``; the admin service shares it,
``admin_port`` = ``fed_learn_port``, nvflare/lighter/ctx.py), so one free port is enough.

What every local deployment does (isolated HOME, site configs, submit / wait / download, the
cleanup) is ``fedseg.run.deployment.LocalDeployment``; the ``project.yml`` is
``fedseg.provisioning.project``'s, as for a real consortium.

Layout of a deployment folder ``root``::

    root/project.yml            root/home/ (HOME)        root/logs/<step>.log (CLI output)
    root/workspace/<project>/prod_00/{server,admin@nvidia.com,<site>...}   (the kits)
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedseg.provisioning.project import Participant, project_config as _project_config, write_yaml
from fedseg.run.deployment import (
    ADMIN,
    COMPLETED,
    DeploymentError,
    LocalDeployment,
    free_port,
    port_in_use,
    processes_matching,
)

DEFAULT_SITES = ("hospital-a", "hospital-b")
DEFAULT_PROJECT = "fedseg_poc"
ORG = "fedseg"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_RESERVED = {"server", ADMIN}


class PocError(DeploymentError):
    """A POC step failed; the message names the step, the command and where its output is."""


def check_site_names(sites: Sequence[str]) -> tuple[str, ...]:
    """The site names, validated: unique, not a reserved participant, usable as a folder name."""
    sites = tuple(sites)
    if not sites:
        raise ValueError("a POC deployment needs at least one site")
    for name in sites:
        if not _NAME.match(name) or name in _RESERVED:
            raise ValueError(f"bad site name {name!r}: use letters, digits, '.', '_' or '-' (not 'server')")
    duplicates = sorted({s for s in sites if sites.count(s) > 1})
    if duplicates:
        raise ValueError(f"site names must be unique, repeated: {', '.join(duplicates)}")
    return sites


def project_config(project: str, sites: Sequence[str], port: int, *, he: bool = False) -> dict[str, Any]:
    """The ``project.yml`` of a POC deployment: one server "server" on ``localhost:port``, one project
    admin (whose kit submits the jobs) and one client per site; ``he`` adds HE contexts."""
    sites = check_site_names(sites)
    if not _NAME.match(project):
        raise ValueError(f"bad project name {project!r}")
    participants = [Participant(ADMIN, "admin", ORG, "project_admin"), *(Participant(s, "client", ORG) for s in sites)]
    return _project_config(project, Participant("server", "server", ORG), port, participants,
                           description="fedseg POC deployment", he=he, server_host="localhost")


def write_project_yml(path: Path, project: str, sites: Sequence[str], port: int, *, he: bool = False) -> Path:
    """Write ``project_config(...)`` as YAML to ``path``."""
    return write_yaml(project_config(project, sites, port, he=he), path)


@dataclass
class PocResult:
    """What one job's POC cycle produced."""

    job_id: str
    status: str  # e.g. "FINISHED:COMPLETED"
    download_dir: Path  # <out>/<job_id>: workspace/ (server run folder), job/, meta.json
    server_workspace: Path  # download_dir/workspace: app_server/*.pt, metrics/, cross_site_val/
    site_logs: dict[str, Path] = field(default_factory=dict)  # site -> its job log (site-local)
    timings: dict[str, float] = field(default_factory=dict)  # step -> seconds
    port: int = 0
    leftovers_killed: int = 0  # processes that `nvflare poc stop` left and we killed

    @property
    def ok(self) -> bool:
        return self.status == COMPLETED

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc.update(download_dir=str(self.download_dir), server_workspace=str(self.server_workspace),
                   site_logs={k: str(v) for k, v in self.site_logs.items()})
        return doc


class PocDeployment(LocalDeployment):
    """One POC deployment in folder ``root``; a context manager that always stops it.

    ``with PocDeployment(root, sites, port=p) as poc: poc.prepare(); ...; poc.start(); ...``.
    On exit (also after an error) it runs ``nvflare poc stop`` if anything was started, then
    checks with ``ps`` that no process of this deployment is left and kills leftovers (found by
    the workspace path in their command line).
    """

    def __init__(
        self,
        root: Path,
        sites: Sequence[str] = DEFAULT_SITES,
        *,
        port: int | None = None,
        project: str = DEFAULT_PROJECT,
        log: Callable[[str], None] | None = None,
        he: bool = False,
    ) -> None:
        super().__init__(root, check_site_names(sites), port=int(port) if port else free_port(), log=log)
        self.project = project
        self.he = he  # provision HE (TenSEAL) contexts into the kits: see project_config
        self.project_yml = self.root / "project.yml"
        self.workspace = self.root / "workspace"

    # ---------------------------------------------------------------- paths and environment

    @property
    def prod_dir(self) -> Path:
        return self.workspace / self.project / "prod_00"

    @property
    def admin_kit(self) -> Path:
        """The project admin's startup kit: what ``nvflare job ... --startup-kit`` takes."""
        return self.prod_dir / ADMIN

    @property
    def server_kit(self) -> Path:
        return self.prod_dir / "server"

    def site_kit(self, site: str) -> Path:
        """A site's startup kit; in POC its job processes run with this as working directory."""
        if site not in self.sites:
            raise KeyError(f"{site!r} is not a site of this deployment ({', '.join(self.sites)})")
        return self.prod_dir / site

    def env(self) -> dict[str, str]:
        env = super().env()
        env["NVFLARE_POC_WORKSPACE"] = str(self.workspace)
        return env

    # ---------------------------------------------------------------- steps

    def prepare(self) -> Path:
        """Write ``project.yml`` and provision the kits (``nvflare poc prepare -i``); the workspace."""
        if self.running_processes():
            raise PocError(f"a POC deployment in {self.workspace} is still running; stop it first")
        with self.step("prepare", f"provisioning {self.project} (server port {self.port}, sites "
                       f"{', '.join(self.sites)}) in {self.workspace}"):
            self.home.mkdir(parents=True, exist_ok=True)
            write_project_yml(self.project_yml, self.project, self.sites, self.port, he=self.he)
            self.nvflare_json("prepare", ["poc", "prepare", "-i", str(self.project_yml), "--force"], timeout=180)
            missing = [p for p in [self.admin_kit, *map(self.site_kit, self.sites)] if not (p / "startup").is_dir()]
            if missing:
                raise PocError(f"nvflare poc prepare made no startup kit at {', '.join(map(str, missing))}")
            from fedseg.provisioning.site_control import lock_down_kit

            for kit in (self.server_kit, *map(self.site_kit, self.sites)):  # as a real consortium's kits
                lock_down_kit(kit)
        return self.workspace

    def start(self, timeout: int = 240) -> None:
        """``nvflare poc start``: server and sites, returns when every site has connected.

        ``--no-wait``, then this waits itself, through the admin API: ``nvflare poc start``'s own
        readiness check allows each admin login 1 s (nvflare/tool/poc/poc_commands.py,
        ``_wait_for_poc_system_ready``), which a loaded machine misses every time, so it reported a
        running deployment as failed after ``timeout`` seconds.
        """
        if not (self.prod_dir / "server" / "startup").is_dir():
            raise PocError(f"no POC kits in {self.prod_dir}: run prepare() first")
        with self.step("start", f"starting server and {len(self.sites)} sites on port {self.port}"):
            self._started = True  # from here on, __exit__ must stop whatever did start
            deadline = time.monotonic() + timeout
            try:
                self.nvflare_json("start", ["poc", "start", "--no-wait"], timeout=timeout + 60, new_session=True)
            except DeploymentError as err:
                raise PocError(f"{err}\n{self._console_tails()}") from None
            missing = self.wait_for_sites(deadline)
            if missing:
                raise PocError(f"after {timeout} s the server lists no {', '.join(missing)}; see "
                               f"{self.logs / 'start.log'}\n{self._console_tails()}")

    def wait_for_sites(self, deadline: float, login_timeout: float = 20.0) -> list[str]:
        """Poll the server (admin API, the admin kit) until every site is connected; the sites still missing."""
        from nvflare.fuel.flare_api.flare_api import new_secure_session

        missing = list(self.sites)
        while time.monotonic() < deadline:
            session = None
            try:
                session = new_secure_session(ADMIN, str(self.admin_kit), timeout=login_timeout)
                connected = {str(c.name) for c in session.get_system_info().client_info or []}
                missing = [s for s in self.sites if s not in connected]
                if not missing:
                    return []
            except Exception:  # the server is not up yet, or too busy to answer: try again
                pass
            finally:
                if session is not None:
                    with contextlib.suppress(Exception):
                        session.close()
            time.sleep(2)
        return missing

    def stop(self, timeout: int = 180) -> int:
        """``nvflare poc stop``, then make sure no process of the deployment is left.

        Returns the number of leftover processes that had to be killed (0 when the stop was clean).
        """
        with self.step("stop", "stopping server and sites"):
            grace = 20.0  # the kits' start loops (sub_start.sh) exit within their 5 s poll after a shutdown
            try:
                if (self.prod_dir / "server" / "startup").is_dir():
                    self.nvflare_json("stop", ["poc", "stop"], timeout=timeout)
            except (DeploymentError, subprocess.SubprocessError, OSError) as err:
                self.log(f"[poc] nvflare poc stop failed ({err}); killing the deployment's processes")
                grace = 0.0
            left = self.wait_gone(deadline=time.monotonic() + grace)
            killed = self.kill_leftovers() if left else 0
            self._started = False
            self.wait_port_free(deadline=time.monotonic() + 30.0)
        self.leftovers_killed += killed
        if killed:
            self.log(f"[poc] killed {killed} leftover process(es) of {self.workspace}")
        return killed

    def running_processes(self) -> list[tuple[int, str]]:
        """``(pid, command line)`` of every process whose command line names this workspace."""
        import os

        return processes_matching([str(self.workspace), os.path.realpath(self.workspace)])

    def _console_tails(self, lines: int = 15) -> str:
        parts = []
        for name in ("server", *self.sites):
            path = self.prod_dir / name / "poc_console.log"
            if path.is_file():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {path} (last {len(tail)} lines)\n" + "\n".join(tail))
        return "\n".join(parts)


def run_poc(
    job_dir: Path,
    site_datalists: Mapping[str, Path],
    *,
    port: int | None = None,
    workspace: Path,
    timeout: int = 900,
    download_to: Path | None = None,
    data_roots: Mapping[str, Path] | None = None,
    project: str = DEFAULT_PROJECT,
    log: Callable[[str], None] | None = None,
    site_settings: Mapping[str, Mapping[str, Any]] | None = None,
    he: bool = False,
    console: Any = None,
) -> PocResult:
    """One whole POC cycle for one job: prepare, site configs, start, submit, wait, download, stop.

    ``site_datalists`` maps each site name to its datalist (the sites are its keys); ``workspace``
    is the deployment folder (see ``PocDeployment``); results go to ``download_to`` (default
    ``workspace/download``); ``data_roots`` optionally overrides a site's datalist data root.
    ``port=None`` picks a free port. ``site_settings`` adds entries to a site's config (e.g. its
    ``group``); ``he`` provisions HE kits (``fedavg-he``); ``console`` shows the job's progress while it
    runs (``fedseg.run.progress``). Every POC process is stopped before this returns or raises.
    The job's status is in the result (check ``result.ok``).
    """
    started = time.perf_counter()
    with PocDeployment(workspace, tuple(site_datalists), port=port, project=project, log=log, he=he) as poc:
        poc.prepare()
        for site, datalist in site_datalists.items():
            poc.install_site_config(site, datalist, (data_roots or {}).get(site), **(site_settings or {}).get(site, {}))
        poc.start()
        job_id = poc.submit(job_dir)
        with poc.watch(job_id, console) if console is not None else contextlib.nullcontext():
            status = poc.wait(job_id, timeout=timeout)
        download_dir = poc.download(job_id, download_to or poc.root / "download")
        site_logs = poc.site_job_logs(job_id)
        poc.stop()
    timings = dict(poc.timings)
    timings["total"] = round(time.perf_counter() - started, 2)
    return PocResult(job_id, status, download_dir, download_dir / "workspace", site_logs, timings, poc.port,
                     poc.leftovers_killed)


__all__ = [
    "COMPLETED",
    "DEFAULT_SITES",
    "PocDeployment",
    "PocError",
    "PocResult",
    "check_site_names",
    "free_port",
    "port_in_use",
    "project_config",
    "run_poc",
    "write_project_yml",
]
