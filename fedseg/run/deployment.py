"""An NVFlare deployment whose server and sites run as processes on this machine, driven with the
``nvflare`` CLI exactly as a study lead and the hospital admins would drive a real one.

``LocalDeployment`` holds what every local deployment shares: an isolated ``HOME`` (the ``nvflare``
CLI rewrites ``~/.nvflare/config.conf``), each site's ``fedseg_site.json``, ``nvflare job submit /
wait / download`` with an admin kit, the CLI's output in ``logs/<step>.log``, and an exit that
always ends every process of the deployment (found by its folder in their command lines). Two
kinds build on it: ``fedseg.run.poc.PocDeployment`` (kits from ``nvflare poc prepare``) and
``fedseg.run.kit_deployment.LocalKitDeployment`` (kits from ``fedseg provision``).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

# the nvflare CLI of this environment, shared with provisioning, which sits below the runners
from fedseg.provisioning.nvflare_cli import DeploymentError, last_json_object, nvflare_executable

ADMIN = "admin@nvidia.com"
COMPLETED = "FINISHED:COMPLETED"
SITE_CONFIG_FILE = "fedseg_site.json"  # what fedseg.app.site_config looks for in <kit>/local/
#: How long the server holds a finished job for the outcome of a site that vanished (NVFlare 2.9's
#: ``client_outcome_wait_timeout``, default 900 s: nvflare/private/fed/server/job_runner.py). The
#: server's job runner reads it from its environment (``NVFLARE_`` + the name in capitals) when it
#: starts; a site that is still there reports its outcome within seconds of the job's end.
CLIENT_OUTCOME_WAIT_ENV = "NVFLARE_CLIENT_OUTCOME_WAIT_TIMEOUT"
CLIENT_OUTCOME_WAIT_S = 60


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


def processes_matching(needles: Sequence[str]) -> list[tuple[int, str]]:
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


def end_processes(find: Callable[[], list[tuple[int, str]]], grace: float = 5.0) -> int:
    """SIGTERM, then SIGKILL, every process ``find`` lists (start loops first); how many there were.

    The kits' start loops (``sub_start.sh``) go first: they would restart a server or site whose
    process disappears. ``DeploymentError`` if any is still there after the SIGKILL.
    """
    found = find()
    if not found:
        return 0
    ordered = sorted(found, key=lambda p: "sub_start.sh" not in p[1])
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid, _ in ordered:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:  # it ended on its own meanwhile
                pass
        if not _wait_until_gone(find, time.monotonic() + grace):
            break
    left = find()
    if left:
        raise DeploymentError("could not end these processes: " + "; ".join(f"{p} {c[:120]}" for p, c in left))
    return len(found)


def _wait_until_gone(find: Callable[[], list[tuple[int, str]]], deadline: float) -> list[tuple[int, str]]:
    while True:
        left = find()
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.5)


class LocalDeployment:
    """A local NVFlare deployment in folder ``root``; a context manager that always ends it.

    Subclasses say where the kits are (``prod_dir``, ``admin_kit``, ``site_kit``), how to start and
    stop them, and which processes are theirs (``running_processes``). ``timings`` holds the
    seconds of every step.
    """

    def __init__(self, root: Path, sites: Sequence[str], *, port: int, log: Callable[[str], None] | None = None) -> None:
        self.root = Path(root).resolve()
        self.sites = tuple(sites)
        self.port = int(port)
        self.log = log or (lambda line: print(line, flush=True))
        self.home = self.root / "home"
        self.logs = self.root / "logs"
        self.timings: dict[str, float] = {}
        self.leftovers_killed = 0
        self._started = False
        self._cli = nvflare_executable()

    # ---------------------------------------------------------------- what subclasses define

    @property
    def prod_dir(self) -> Path:
        raise NotImplementedError

    @property
    def admin_kit(self) -> Path:
        """The startup kit that submits, waits for and downloads jobs."""
        raise NotImplementedError

    def site_kit(self, site: str) -> Path:
        raise NotImplementedError

    @property
    def server_kit(self) -> Path:
        raise NotImplementedError

    def running_processes(self) -> list[tuple[int, str]]:
        """``(pid, command line)`` of every process of this deployment."""
        raise NotImplementedError

    def start(self, timeout: int = 240) -> None:
        raise NotImplementedError

    def stop(self, timeout: int = 180) -> int:
        raise NotImplementedError

    # ---------------------------------------------------------------- environment

    def env(self) -> dict[str, str]:
        """Environment of every NVFlare command (and so of the server and site processes)."""
        env = dict(os.environ)
        env["HOME"] = str(self.home)
        # The kits' start scripts run `python3`: the one of this environment, where fedseg is.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        # Sites must find their config in their own kit (as in production), not a shared override.
        env.pop("FEDSEG_SITE_CONFIG", None)
        env.pop("NVFLARE_STARTUP_KIT_DIR", None)
        env["PYTHONUNBUFFERED"] = "1"
        # a finished job whose site vanished ends a minute later, not 15 (CLIENT_OUTCOME_WAIT_S)
        env.setdefault(CLIENT_OUTCOME_WAIT_ENV, str(CLIENT_OUTCOME_WAIT_S))
        return env

    # ---------------------------------------------------------------- the steps every deployment shares

    def install_site_config(self, site: str, datalist: Path, data_root: Path | None = None, **extra: Any) -> Path:
        """The hospital admin's step: ``<site kit>/local/fedseg_site.json`` naming the site's data."""
        from fedseg.app.site_config import write_site_config

        datalist = Path(datalist)
        if not datalist.is_file():
            raise DeploymentError(f"{datalist}: datalist of site {site!r} not found")
        path = write_site_config(self.site_kit(site) / "local" / SITE_CONFIG_FILE, datalist, data_root, **extra)
        self.log(f"[deploy] {site}: site config {path} -> {datalist}")
        return path

    def submit(self, job_dir: Path) -> str:
        """``nvflare job submit -j job_dir`` with the admin kit; the job id."""
        job_dir = Path(job_dir).resolve()
        if not (job_dir / "meta.json").is_file():
            raise DeploymentError(f"{job_dir}: not an NVFlare job folder (no meta.json)")
        with self.step("submit", f"submitting {job_dir}"):
            data = self.nvflare_json("submit", ["job", "submit", "-j", str(job_dir), *self.kit_args()], timeout=300)
            job_id = str(data.get("job_id") or "")
            if not job_id:
                raise DeploymentError(f"nvflare job submit returned no job id ({data}); see {self.logs / 'submit.log'}")
        self.log(f"[deploy] job id {job_id}")
        return job_id

    def wait(self, job_id: str, timeout: int = 900) -> str:
        """Poll until the job has finished (``nvflare job wait``); its status, e.g. FINISHED:COMPLETED.

        A job that ends badly (FINISHED:EXECUTION_EXCEPTION, ABORTED, ...) returns its status; one
        that is still running after ``timeout`` seconds raises ``DeploymentError``.
        """
        with self.step("wait", f"waiting for job {job_id} (at most {timeout} s)"):
            args = ["job", "wait", job_id, "--timeout", str(timeout), "--interval", "2", *self.kit_args()]
            doc = self.nvflare("wait", args, timeout=timeout + 120)
            status = (doc.get("data") or {}).get("status")
            if not status:  # no terminal status: timeout (exit 3), connection or auth errors
                raise DeploymentError(f"job {job_id}: {doc.get('message') or doc}; see {self.logs / 'wait.log'}")
        self.log(f"[deploy] job {job_id}: {status}")
        return str(status)

    def download(self, job_id: str, out: Path) -> Path:
        """``nvflare job download``: the job's results into ``out/<job_id>`` (returned)."""
        out = Path(out).resolve()
        out.mkdir(parents=True, exist_ok=True)
        with self.step("download", f"downloading job {job_id} to {out}"):
            args = ["job", "download", job_id, "-o", str(out), "--force", *self.kit_args()]
            data = self.nvflare_json("download", args, timeout=300)
        path = Path(data.get("download_path") or out / job_id)
        if not (path / "workspace").is_dir():
            raise DeploymentError(f"the download of job {job_id} has no server workspace: {path}")
        return path

    def site_job_logs(self, job_id: str) -> dict[str, Path]:
        """Each site's log of one job. They stay at the site (not part of the download)."""
        logs = {site: self.site_kit(site) / job_id / "log.txt" for site in self.sites}
        return {site: path for site, path in logs.items() if path.is_file()}

    def watch(self, job_id: str, console: Any, *, title: str = "") -> Any:
        """A ``FederatedProgress`` that follows ``job_id`` in the site and server kits' job logs."""
        from fedseg.run.progress import FederatedProgress

        return FederatedProgress(console, list(self.sites),
                                 lambda: {site: self.site_kit(site) / job_id / "log.txt" for site in self.sites},
                                 lambda: self.server_kit / job_id / "log.txt", title=title or job_id)

    def kill_leftovers(self, grace: float = 5.0) -> int:
        """SIGTERM, then SIGKILL, every process of this deployment; how many there were."""
        return end_processes(self.running_processes, grace)

    # ---------------------------------------------------------------- context manager

    def __enter__(self) -> LocalDeployment:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._started or self.running_processes():
            try:
                self.stop()
            except Exception as err:  # never hide the error that brought us here
                if exc is None:
                    raise
                self.log(f"[deploy] cleanup after the error failed too: {err}")

    # ---------------------------------------------------------------- helpers for subclasses

    @contextmanager
    def step(self, name: str, what: str) -> Iterator[None]:
        """Log a step's start and end and add its seconds to ``timings[name]``."""
        self.log(f"[deploy] {name}: {what}")
        started = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(self.timings.get(name, 0.0) + time.perf_counter() - started, 2)
        self.log(f"[deploy] {name}: done in {self.timings[name]:.1f} s")

    def kit_args(self) -> list[str]:
        return ["--startup-kit", str(self.admin_kit)]

    def nvflare(self, step: str, args: Sequence[str], timeout: float, new_session: bool = False) -> dict[str, Any]:
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
                raise DeploymentError(f"`nvflare {' '.join(args[:2])}` did not return within {timeout:.0f} s; "
                                      f"see {log_path}") from None
        doc = last_json_object(log_path.read_text())
        if doc is None:
            raise DeploymentError(f"`nvflare {' '.join(args[:2])}` exited {proc.returncode} without a JSON result; "
                                  f"see {log_path}")
        doc["_returncode"] = proc.returncode
        return doc

    def nvflare_json(self, step: str, args: Sequence[str], timeout: float, new_session: bool = False) -> dict[str, Any]:
        """``nvflare`` that must succeed: its ``data``, or ``DeploymentError`` with NVFlare's message."""
        doc = self.nvflare(step, args, timeout, new_session)
        if doc.get("status") != "ok" or doc["_returncode"] != 0:
            message = doc.get("message") or doc.get("error_code") or "failed"
            hint = f" ({doc['hint']})" if doc.get("hint") else ""
            raise DeploymentError(f"`nvflare {' '.join(args[:2])}` failed: {message}{hint}; "
                                  f"see {self.logs / (step + '.log')}")
        return doc.get("data") or {}

    def wait_port_free(self, deadline: float) -> None:
        """Wait until the server's port can be bound again, so a next ``start`` does not collide.

        A killed process leaves ``ps`` (its command line is gone with its memory) a moment before the
        kernel closes its sockets: a gRPC server with many threads holds the listening socket until
        its last thread has exited, which on a busy 2-core machine took longer than our check.
        """
        while port_in_use(self.port):
            if time.monotonic() >= deadline:
                holders = subprocess.run(["ss", "-Htanp", f"sport = :{self.port}"], capture_output=True,
                                         text=True, check=False).stdout.strip() if shutil.which("ss") else ""
                self.log(f"[deploy] warning: port {self.port} is still in use after the stop"
                         + (f":\n{holders}" if holders else ""))
                return
            time.sleep(0.2)

    def wait_gone(self, deadline: float) -> list[tuple[int, str]]:
        """Until no process of the deployment is left, or ``deadline``; those still there."""
        return _wait_until_gone(self.running_processes, deadline)


__all__ = [
    "ADMIN",
    "CLIENT_OUTCOME_WAIT_ENV",
    "CLIENT_OUTCOME_WAIT_S",
    "COMPLETED",
    "SITE_CONFIG_FILE",
    "DeploymentError",
    "LocalDeployment",
    "end_processes",
    "free_port",
    "last_json_object",
    "nvflare_executable",
    "port_in_use",
    "processes_matching",
]
