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

Layout of a deployment folder ``root``::

    root/project.yml            root/home/ (HOME)        root/logs/<step>.log (CLI output)
    root/workspace/<project>/prod_00/{server,admin@nvidia.com,<site>...}   (the kits)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

DEFAULT_SITES = ("hospital-a", "hospital-b")
DEFAULT_PROJECT = "fedseg_poc"
ADMIN = "admin@nvidia.com"
ORG = "fedseg"
COMPLETED = "FINISHED:COMPLETED"
SITE_CONFIG_FILE = "fedseg_site.json"  # what fedseg.app.site_config looks for in <kit>/local/
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_RESERVED = {"server", ADMIN}


class PocError(RuntimeError):
    """A POC step failed; the message names the step, the command and where its output is."""


def free_port(host: str = "") -> int:
    """A TCP port nothing listens on now (the OS picks it: bind to port 0).

    Another program may take it before the server binds it; that window is seconds long.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_in_use(port: int, host: str = "") -> bool:
    """True when a server could not bind ``port`` now (something listens on it).

    SO_REUSEADDR, as servers (gRPC) set it: connections of a stopped server that linger in
    TIME_WAIT do not count, a listening socket does.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


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
    """The ``project.yml`` of a POC deployment (NVFlare provisioning, API version 3).

    One server on ``localhost:port`` (FL and admin share the port), one project admin (whose kit
    submits the jobs) and one client per site. Builders as ``nvflare poc prepare`` writes them;
    ``he`` adds NVFlare's ``HEBuilder`` (TenSEAL CKKS contexts in every kit, for ``fedavg-he``).
    """
    sites = check_site_names(sites)
    if not _NAME.match(project):
        raise ValueError(f"bad project name {project!r}")
    if not 0 < int(port) < 65536:
        raise ValueError(f"bad port {port}")
    builders: list[dict[str, Any]] = [
        {"path": "nvflare.lighter.impl.workspace.WorkspaceBuilder",
         "args": {"template_file": ["master_template.yml", "aws_template.yml", "azure_template.yml"]}},
        {"path": "nvflare.lighter.impl.static_file.StaticFileBuilder", "args": {"config_folder": "config"}},
        {"path": "nvflare.lighter.impl.cert.CertBuilder"},
        {"path": "nvflare.lighter.impl.signature.SignatureBuilder"},
    ]
    if he:
        # Before the SignatureBuilder, as `nvflare poc prepare -he` puts it (add_he_builder in
        # nvflare/tool/poc/poc_commands.py; -he is ignored with -i): the context files must be signed,
        # a secure-mode site or server refuses an unsigned one (nvflare/app_opt/he/homomorphic_encrypt.py).
        builders.insert(-1, {"path": "nvflare.lighter.impl.he.HEBuilder", "args": {}})
    return {
        "api_version": 3,
        "name": project,
        "description": "fedseg POC deployment",
        "participants": [
            {"name": "server", "type": "server", "org": ORG, "default_host": "localhost",
             "fed_learn_port": int(port), "admin_port": int(port)},
            {"name": ADMIN, "type": "admin", "org": ORG, "role": "project_admin"},
            *({"name": site, "type": "client", "org": ORG} for site in sites),
        ],
        "builders": builders,
    }


def write_project_yml(path: Path, project: str, sites: Sequence[str], port: int, *, he: bool = False) -> Path:
    """Write ``project_config(...)`` as YAML to ``path``."""
    import yaml  # PyYAML: an NVFlare dependency

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(project_config(project, sites, port, he=he), sort_keys=False))
    return path


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


class PocDeployment:
    """One POC deployment in folder ``root``; a context manager that always stops it.

    ``with PocDeployment(root, sites, port=p) as poc: poc.prepare(); ...; poc.start(); ...``.
    On exit (also after an error) it runs ``nvflare poc stop`` if anything was started, then
    checks with ``ps`` that no process of this deployment is left and kills leftovers (found by
    the workspace path in their command line). ``timings`` holds the seconds of every step.
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
        self.root = Path(root).resolve()
        self.sites = check_site_names(sites)
        self.port = int(port) if port else free_port()
        self.project = project
        self.he = he  # provision HE (TenSEAL) contexts into the kits: see project_config
        self.log = log or (lambda line: print(line, flush=True))
        self.project_yml = self.root / "project.yml"
        self.home = self.root / "home"
        self.workspace = self.root / "workspace"
        self.logs = self.root / "logs"
        self.timings: dict[str, float] = {}
        self.leftovers_killed = 0
        self._started = False
        self._cli = _nvflare_executable()

    # ---------------------------------------------------------------- paths and environment

    @property
    def prod_dir(self) -> Path:
        return self.workspace / self.project / "prod_00"

    @property
    def admin_kit(self) -> Path:
        """The project admin's startup kit: what ``nvflare job ... --startup-kit`` takes."""
        return self.prod_dir / ADMIN

    def site_kit(self, site: str) -> Path:
        """A site's startup kit; in POC its job processes run with this as working directory."""
        if site not in self.sites:
            raise KeyError(f"{site!r} is not a site of this deployment ({', '.join(self.sites)})")
        return self.prod_dir / site

    def env(self) -> dict[str, str]:
        """Environment of every NVFlare command (and so of the server and site processes)."""
        env = dict(os.environ)
        env["HOME"] = str(self.home)
        env["NVFLARE_POC_WORKSPACE"] = str(self.workspace)
        # The kits' start scripts run `python3`: the one of this environment, where fedseg is.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        # Sites must find their config in their own kit (as in production), not a shared override.
        env.pop("FEDSEG_SITE_CONFIG", None)
        env.pop("NVFLARE_STARTUP_KIT_DIR", None)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    # ---------------------------------------------------------------- steps

    def prepare(self) -> Path:
        """Write ``project.yml`` and provision the kits (``nvflare poc prepare -i``); the workspace."""
        if self.running_processes():
            raise PocError(f"a POC deployment in {self.workspace} is still running; stop it first")
        with self._step("prepare", f"provisioning {self.project} (server port {self.port}, sites "
                        f"{', '.join(self.sites)}) in {self.workspace}"):
            self.home.mkdir(parents=True, exist_ok=True)
            write_project_yml(self.project_yml, self.project, self.sites, self.port, he=self.he)
            self._nvflare_json("prepare", ["poc", "prepare", "-i", str(self.project_yml), "--force"], timeout=180)
            missing = [p for p in [self.admin_kit, *map(self.site_kit, self.sites)] if not (p / "startup").is_dir()]
            if missing:
                raise PocError(f"nvflare poc prepare made no startup kit at {', '.join(map(str, missing))}")
        return self.workspace

    def install_site_config(self, site: str, datalist: Path, data_root: Path | None = None, **extra: Any) -> Path:
        """The hospital admin's step: ``<site kit>/local/fedseg_site.json`` naming the site's data."""
        from fedseg.app.site_config import write_site_config

        datalist = Path(datalist)
        if not datalist.is_file():
            raise PocError(f"{datalist}: datalist of site {site!r} not found")
        path = write_site_config(self.site_kit(site) / "local" / SITE_CONFIG_FILE, datalist, data_root, **extra)
        self.log(f"[poc] {site}: site config {path} -> {datalist}")
        return path

    def start(self, timeout: int = 240) -> None:
        """``nvflare poc start``: server and sites, returns when every site has connected."""
        if not (self.prod_dir / "server" / "startup").is_dir():
            raise PocError(f"no POC kits in {self.prod_dir}: run prepare() first")
        with self._step("start", f"starting server and {len(self.sites)} sites on port {self.port}"):
            self._started = True  # from here on, __exit__ must stop whatever did start
            try:
                self._nvflare_json("start", ["poc", "start", "--timeout", str(timeout)], timeout=timeout + 60,
                                   new_session=True)
            except PocError as err:
                raise PocError(f"{err}\n{self._console_tails()}") from None

    def submit(self, job_dir: Path) -> str:
        """``nvflare job submit -j job_dir`` with the admin kit; the job id."""
        job_dir = Path(job_dir).resolve()
        if not (job_dir / "meta.json").is_file():
            raise PocError(f"{job_dir}: not an NVFlare job folder (no meta.json)")
        with self._step("submit", f"submitting {job_dir}"):
            data = self._nvflare_json("submit", ["job", "submit", "-j", str(job_dir), *self._kit_args()], timeout=300)
            job_id = str(data.get("job_id") or "")
            if not job_id:
                raise PocError(f"nvflare job submit returned no job id ({data}); see {self.logs / 'submit.log'}")
        self.log(f"[poc] job id {job_id}")
        return job_id

    def wait(self, job_id: str, timeout: int = 900) -> str:
        """Poll until the job has finished (``nvflare job wait``); its status, e.g. FINISHED:COMPLETED.

        A job that ends badly (FINISHED:EXECUTION_EXCEPTION, ABORTED, ...) returns its status; one
        that is still running after ``timeout`` seconds raises ``PocError``.
        """
        with self._step("wait", f"waiting for job {job_id} (at most {timeout} s)"):
            args = ["job", "wait", job_id, "--timeout", str(timeout), "--interval", "2", *self._kit_args()]
            doc = self._nvflare("wait", args, timeout=timeout + 120)
            status = (doc.get("data") or {}).get("status")
            if not status:  # no terminal status: timeout (exit 3), connection or auth errors
                raise PocError(f"job {job_id}: {doc.get('message') or doc}; see {self.logs / 'wait.log'}")
        self.log(f"[poc] job {job_id}: {status}")
        return str(status)

    def download(self, job_id: str, out: Path) -> Path:
        """``nvflare job download``: the job's results into ``out/<job_id>`` (returned)."""
        out = Path(out).resolve()
        out.mkdir(parents=True, exist_ok=True)
        with self._step("download", f"downloading job {job_id} to {out}"):
            args = ["job", "download", job_id, "-o", str(out), "--force", *self._kit_args()]
            data = self._nvflare_json("download", args, timeout=300)
        path = Path(data.get("download_path") or out / job_id)
        if not (path / "workspace").is_dir():
            raise PocError(f"the download of job {job_id} has no server workspace: {path}")
        return path

    def site_job_logs(self, job_id: str) -> dict[str, Path]:
        """Each site's log of one job. They stay at the site (not part of the download)."""
        logs = {site: self.site_kit(site) / job_id / "log.txt" for site in self.sites}
        return {site: path for site, path in logs.items() if path.is_file()}

    def stop(self, timeout: int = 180) -> int:
        """``nvflare poc stop``, then make sure no process of the deployment is left.

        Returns the number of leftover processes that had to be killed (0 when the stop was clean).
        """
        with self._step("stop", "stopping server and sites"):
            grace = 20.0  # the kits' start loops (sub_start.sh) exit within their 5 s poll after a shutdown
            try:
                if (self.prod_dir / "server" / "startup").is_dir():
                    self._nvflare_json("stop", ["poc", "stop"], timeout=timeout)
            except (PocError, subprocess.SubprocessError, OSError) as err:
                self.log(f"[poc] nvflare poc stop failed ({err}); killing the deployment's processes")
                grace = 0.0
            left = self._wait_gone(deadline=time.monotonic() + grace)
            killed = self.kill_leftovers() if left else 0
            self._started = False
            self._wait_port_free(deadline=time.monotonic() + 30.0)
        self.leftovers_killed += killed
        if killed:
            self.log(f"[poc] killed {killed} leftover process(es) of {self.workspace}")
        return killed

    # ---------------------------------------------------------------- processes

    def running_processes(self) -> list[tuple[int, str]]:
        """``(pid, command line)`` of every process whose command line names this workspace."""
        return _processes_matching([str(self.workspace), os.path.realpath(self.workspace)])

    def kill_leftovers(self, grace: float = 5.0) -> int:
        """SIGTERM, then SIGKILL, every process of this deployment; how many there were."""
        found = self.running_processes()
        if not found:
            return 0
        # The start loops first: they would restart a server or site whose process disappears.
        ordered = sorted(found, key=lambda p: "sub_start.sh" not in p[1])
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid, _ in ordered:
                with _suppress_lookup():
                    os.kill(pid, sig)
            if not self._wait_gone(deadline=time.monotonic() + grace):
                break
        left = self.running_processes()
        if left:
            raise PocError("could not end these POC processes: " + "; ".join(f"{p} {c[:120]}" for p, c in left))
        return len(found)

    def _wait_port_free(self, deadline: float) -> None:
        """Wait until the server's port can be bound again, so a next ``start`` does not collide.

        A killed process leaves ``ps`` (its command line is gone with its memory) a moment before the
        kernel closes its sockets: a gRPC server with many threads holds the listening socket until
        its last thread has exited, which on a busy 2-core machine took longer than our check.
        """
        while port_in_use(self.port):
            if time.monotonic() >= deadline:
                holders = subprocess.run(["ss", "-Htanp", f"sport = :{self.port}"], capture_output=True,
                                         text=True, check=False).stdout.strip() if shutil.which("ss") else ""
                self.log(f"[poc] warning: port {self.port} is still in use after the stop"
                         + (f":\n{holders}" if holders else ""))
                return
            time.sleep(0.2)

    def _wait_gone(self, deadline: float) -> list[tuple[int, str]]:
        while True:
            left = self.running_processes()
            if not left or time.monotonic() >= deadline:
                return left
            time.sleep(0.5)

    # ---------------------------------------------------------------- context manager

    def __enter__(self) -> PocDeployment:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._started or self.running_processes():
            try:
                self.stop()
            except Exception as err:  # never hide the error that brought us here
                if exc is None:
                    raise
                self.log(f"[poc] cleanup after the error failed too: {err}")

    # ---------------------------------------------------------------- internals

    @contextmanager
    def _step(self, name: str, what: str) -> Iterator[None]:
        self.log(f"[poc] {name}: {what}")
        started = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(self.timings.get(name, 0.0) + time.perf_counter() - started, 2)
        self.log(f"[poc] {name}: done in {self.timings[name]:.1f} s")

    def _kit_args(self) -> list[str]:
        return ["--startup-kit", str(self.admin_kit)]

    def _nvflare(self, step: str, args: Sequence[str], timeout: float, new_session: bool = False) -> dict[str, Any]:
        """Run ``nvflare --format json ARGS``; its JSON document. Output goes to ``logs/<step>.log``.

        Output goes to a file, not a pipe: ``nvflare poc start`` leaves the server and sites
        running, and nothing they inherit may keep this call waiting.
        """
        self.logs.mkdir(parents=True, exist_ok=True)
        log_path = self.logs / f"{step}.log"
        cmd = [self._cli, "--format", "json", *args]
        with log_path.open("w") as out:
            out.write("$ " + " ".join(cmd) + "\n")
            out.flush()
            try:
                proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                      env=self.env(), cwd=self.root, timeout=timeout, start_new_session=new_session)
            except subprocess.TimeoutExpired:
                raise PocError(f"`nvflare {' '.join(args[:2])}` did not return within {timeout:.0f} s; see {log_path}") from None
        doc = _last_json_object(log_path.read_text())
        if doc is None:
            raise PocError(f"`nvflare {' '.join(args[:2])}` exited {proc.returncode} without a JSON result; see {log_path}")
        doc["_returncode"] = proc.returncode
        return doc

    def _nvflare_json(self, step: str, args: Sequence[str], timeout: float, new_session: bool = False) -> dict[str, Any]:
        """``_nvflare`` that must succeed: its ``data``, or ``PocError`` with NVFlare's message."""
        doc = self._nvflare(step, args, timeout, new_session)
        if doc.get("status") != "ok" or doc["_returncode"] != 0:
            message = doc.get("message") or doc.get("error_code") or "failed"
            hint = f" ({doc['hint']})" if doc.get("hint") else ""
            raise PocError(f"`nvflare {' '.join(args[:2])}` failed: {message}{hint}; see {self.logs / (step + '.log')}")
        return doc.get("data") or {}

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
) -> PocResult:
    """One whole POC cycle for one job: prepare, site configs, start, submit, wait, download, stop.

    ``site_datalists`` maps each site name to its datalist (the sites are its keys); ``workspace``
    is the deployment folder (see ``PocDeployment``); results go to ``download_to`` (default
    ``workspace/download``); ``data_roots`` optionally overrides a site's datalist data root.
    ``port=None`` picks a free port. ``site_settings`` adds entries to a site's config (e.g. its
    ``group``); ``he`` provisions HE kits (``fedavg-he``). Every POC process is stopped before this
    returns or raises.
    The job's status is in the result (check ``result.ok``).
    """
    started = time.perf_counter()
    with PocDeployment(workspace, tuple(site_datalists), port=port, project=project, log=log, he=he) as poc:
        poc.prepare()
        for site, datalist in site_datalists.items():
            poc.install_site_config(site, datalist, (data_roots or {}).get(site), **(site_settings or {}).get(site, {}))
        poc.start()
        job_id = poc.submit(job_dir)
        status = poc.wait(job_id, timeout=timeout)
        download_dir = poc.download(job_id, download_to or poc.root / "download")
        site_logs = poc.site_job_logs(job_id)
        poc.stop()
    timings = dict(poc.timings)
    timings["total"] = round(time.perf_counter() - started, 2)
    return PocResult(job_id, status, download_dir, download_dir / "workspace", site_logs, timings, poc.port,
                     poc.leftovers_killed)


# -------------------------------------------------------------------- helpers


def _nvflare_executable() -> str:
    """The ``nvflare`` CLI of this Python environment (the one fedseg is installed in)."""
    beside = Path(sys.executable).parent / "nvflare"
    found = str(beside) if beside.is_file() else shutil.which("nvflare")
    if not found:
        raise PocError("the `nvflare` command is not installed in this environment (pip install nvflare)")
    return found


def _last_json_object(text: str) -> dict[str, Any] | None:
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


def _processes_matching(needles: Sequence[str]) -> list[tuple[int, str]]:
    """``(pid, args)`` from ``ps`` for processes whose command line contains one of ``needles``.

    ``-ww``: full command lines; without it ps cuts them at 80 columns when not on a terminal.
    """
    own = {os.getpid(), os.getppid()}
    out = subprocess.run(["ps", "-ww", "-eo", "pid=,args="], capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        pid_text, _, args = line.strip().partition(" ")
        if pid_text.isdigit() and int(pid_text) not in own and any(n in args for n in needles):
            found.append((int(pid_text), args.strip()))
    return found


@contextmanager
def _suppress_lookup() -> Iterator[None]:
    try:
        yield
    except ProcessLookupError:  # it ended on its own meanwhile
        pass


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
