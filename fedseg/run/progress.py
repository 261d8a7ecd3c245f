"""The live view of a federated run: rounds done, each site's state in the current round, an ETA,
and one line per finished round with each site's val_dice.

``FederatedProgress`` reads what the run already writes, from a thread, while NVFlare runs: the
sites' ``[fedseg] round r/N site: ...`` lines (``fedseg.app.site_runner``) and the server's
``Round r: k/n sites answered`` line (``fedseg.app.resilient_fedavg``), in the log files a
``LogSource`` names (the simulator's workspace, or the POC kits' job folders). On a terminal the
current round is a live ``rich`` display; elsewhere (CI, a log) only the finished-round lines print.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

#: site name -> its log file of this job (it may not exist yet)
LogSource = Callable[[], dict[str, Path]]

_SITE_ROUND = re.compile(r"\[fedseg\] round (\d+)/(\d+) (\S+): (.*)$")
#: what a site says besides its rounds; "personal model" starts the last task of every personalized
#: algorithm (``SiteRunner.personalize``), whatever the algorithm makes there
_SITE_EVENT = re.compile(r"\[fedseg\] (\S+): (could not start|cross-site validation|personal model)(.*)$")
_SERVER_ROUND = re.compile(r"Round (\d+): (\d+)/(\d+) sites answered(?:; (.*))?$")
_VAL_DICE = re.compile(r"val_dice=([0-9.]+|nan)")
#: seconds a closed round's line waits for a site's own line of it
LATE_LINE_GRACE = 3.0


@dataclass
class SiteState:
    state: str = "waiting"  # waiting, training, done, failed, missing, evaluating
    val_dice: float | None = None
    detail: str = ""


@dataclass
class RunState:
    """What the logs say so far."""

    total_rounds: int = 0
    round: int = 0  # the round the sites are in (1-based)
    sites: dict[str, SiteState] = field(default_factory=dict)
    finished: list[tuple[int, dict[str, SiteState], float]] = field(default_factory=list)  # round, sites, seconds
    phase: str = "starting"  # starting, training, evaluating, done

    def site(self, name: str) -> SiteState:
        return self.sites.setdefault(name, SiteState())


class FederatedProgress:
    """Follow a federated run's logs and show its progress on ``console`` (a ``fedseg.run.console.Console``)."""

    def __init__(self, console: object, sites: list[str], site_logs: LogSource, server_log: Callable[[], Path | None],
                 *, title: str = "", round_lines: bool = True, poll: float = 0.5) -> None:
        self.console = console
        self.site_names = list(sites)
        self.site_logs = site_logs
        self.server_log = server_log
        self.title = title
        self.round_lines = round_lines
        self.poll = poll
        self.state = RunState(sites={s: SiteState() for s in sites})
        self._offsets: dict[Path, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fedseg-progress", daemon=True)
        self._started = time.monotonic()
        self._round_started = time.monotonic()
        self._live = None
        self._by_round: dict[int, dict[str, SiteState]] = {}  # round -> site -> its reported state
        self._closed = 0  # the last round the server closed
        self._pending: list[tuple[int, float]] = []  # closed rounds whose line is not printed yet

    # -------------------------------------------------------------- thread

    def __enter__(self) -> FederatedProgress:
        if getattr(self.console, "is_terminal", False):
            from rich.live import Live

            self._live = Live(self._render(), console=self.console.rich(), refresh_per_second=4, transient=True)
            self._live.start()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._read()  # the last lines written before the run ended
        self._flush(force=True)
        if self._live is not None:
            self._live.stop()

    def _run(self) -> None:
        while not self._stop.wait(self.poll):
            try:
                self._read()
            except OSError:  # a log file being rotated or removed: try again on the next tick
                continue
            if self._live is not None:
                self._live.update(self._render())

    # -------------------------------------------------------------- reading the logs

    def _new_lines(self, path: Path) -> list[str]:
        if not path.is_file():
            return []
        offset = self._offsets.get(path, 0)
        with path.open("rb") as f:
            f.seek(offset)
            data = f.read()
        end = data.rfind(b"\n") + 1  # complete lines only
        self._offsets[path] = offset + end
        return data[:end].decode("utf-8", errors="replace").splitlines()

    def _read(self) -> None:
        # The server's lines first, then the sites': a site line written in between is then read in
        # this pass too. A site writes its round line just after NVFlare sent its update, so it can
        # still come after the server closed the round: ``_flush`` waits for it.
        server = self.server_log()
        server_lines = self._new_lines(server) if server is not None else []
        for site, path in self.site_logs().items():
            for line in self._new_lines(path):
                self._site_line(site, line)
        for line in server_lines:
            self._server_line(line)
        self._flush()

    def _site_line(self, site: str, line: str) -> None:
        if m := _SITE_ROUND.search(line):
            number, total, what = int(m.group(1)), int(m.group(2)), m.group(4)
            self.state.total_rounds = max(self.state.total_rounds, total)
            record = None
            if what.startswith("FAILED"):
                record = SiteState("failed", None, what.split("(", 1)[1].split(",", 1)[0] if "(" in what else "")
            elif not what.startswith("started") and (v := _VAL_DICE.search(what)) is not None:
                record = SiteState("done", float(v.group(1)))
            if record is not None:
                self._by_round.setdefault(number, {})[site] = record
            if number <= self._closed:  # a late line of a round the server already closed
                return
            self.state.round = max(self.state.round, number)
            self.state.phase = "training"
            entry = self.state.site(site)
            if record is None and what.startswith("started"):
                entry.state, entry.val_dice, entry.detail = "training", None, ""
            elif record is not None:
                entry.state, entry.val_dice, entry.detail = record.state, record.val_dice, record.detail
        elif m := _SITE_EVENT.search(line):
            entry = self.state.site(m.group(1))
            if m.group(2) == "could not start":
                entry.state, entry.detail = "failed", m.group(3).strip(" (").split(":", 1)[0]
            else:
                self.state.phase = "evaluating"
                entry.state = "evaluating"

    def _server_line(self, line: str) -> None:
        if m := _SERVER_ROUND.search(line):
            number = int(m.group(1))
            if any(number == r for r, _, _ in self.state.finished):
                return
            now = time.monotonic()
            problems = m.group(4) or ""
            reported = self._by_round.setdefault(number, {})
            for name in self.site_names:  # sites the server names as failed or missing report no line
                entry = self.state.site(name)
                if name not in reported and name in problems:
                    reported[name] = SiteState("failed" if entry.state == "failed" else "missing", None, entry.detail)
            self.state.finished.append((number, reported, now - self._round_started))
            self._round_started = now
            self._closed = max(self._closed, number)
            self._pending.append((number, now))
            for entry in self.state.sites.values():
                entry.state, entry.val_dice, entry.detail = "waiting", None, ""

    def _flush(self, force: bool = False) -> None:
        """Print the closed rounds' lines, each once every site's line of it is in (a site writes its
        line just after NVFlare sent its update, so it may come after the server's), or after
        ``LATE_LINE_GRACE`` seconds."""
        now = time.monotonic()
        while self._pending:
            number, closed_at = self._pending[0]
            reported = self._by_round.get(number, {})
            if not (force or len(reported) >= len(self.site_names) or now - closed_at > LATE_LINE_GRACE):
                return
            self._pending.pop(0)
            sites = {name: reported.get(name, SiteState("no report")) for name in self.site_names}
            seconds = next(s for r, _, s in self.state.finished if r == number)
            if self.round_lines and self._worth_a_line(number, sites):
                self.console.print(self._round_line(number, sites, seconds))

    # -------------------------------------------------------------- showing it

    def _worth_a_line(self, number: int, sites: dict[str, SiteState]) -> bool:
        """Every round of a short run; of a long one about ten, the last, and any round a site missed."""
        total = self.state.total_rounds or number
        every = -(-total // 10)
        return number % every == 0 or number in (1, total) or any(s.state in ("failed", "missing") for s in sites.values())

    def eta(self) -> float | None:
        """Seconds left, from the pace of the finished rounds after the first (which also pays the
        start-up); None before a second round has finished."""
        done, total = len(self.state.finished), self.state.total_rounds
        if done < 2 or not total:
            return None
        steady = sorted(s for _, _, s in self.state.finished[1:])
        return steady[len(steady) // 2] * (total - done)

    def _round_line(self, number: int, sites: dict[str, SiteState], seconds: float) -> str:
        cells = []
        for name, entry in sites.items():
            if entry.state == "done" and entry.val_dice is not None:
                cells.append(f"{name} {entry.val_dice:.3f}")
            else:
                cells.append(f"{name} {entry.state}" + (f" ({entry.detail})" if entry.detail else ""))
        eta = self.eta()
        total = self.state.total_rounds or "?"
        tail = f"  {seconds:.1f} s" + (f", about {_duration(eta)} left" if eta is not None and eta > 0 else "")
        return f"round {number}/{total}  val_dice of the global model: " + "  ".join(cells) + tail

    def _render(self) -> object:
        from rich.table import Table

        done, total = len(self.state.finished), self.state.total_rounds or 0
        eta = self.eta()
        head = f"{self.title}  " if self.title else ""
        bar = _bar(done, total)
        status = (f"{head}{self.state.phase}: round {min(done + 1, total) if total else '?'}/{total or '?'} {bar}"
                  + (f"  about {_duration(eta)} left" if eta else ""))
        table = Table(title=status, show_header=False, box=None, title_justify="left")
        for name in self.site_names:
            entry = self.state.site(name)
            value = f"{entry.val_dice:.3f}" if entry.val_dice is not None else ""
            table.add_row(f"  {name}", entry.state + (f" ({entry.detail})" if entry.detail else ""), value)
        return table


def _bar(done: int, total: int, width: int = 20) -> str:
    if not total:
        return ""
    filled = round(width * done / total)
    return "[" + "#" * filled + "." * (width - filled) + "]"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def simulator_logs(workspace: Path, job: str, sites: list[str]) -> tuple[LogSource, Callable[[], Path | None]]:
    """The log sources of a simulator run: ``<workspace>/<job>/<site>/log.txt`` and the server's."""
    root = Path(workspace) / job
    return (lambda: {s: root / s / "log.txt" for s in sites}), (lambda: root / "server" / "log.txt")
