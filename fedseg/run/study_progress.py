"""The live view of a ``fedseg study``: the display of ``fedseg simulate`` and ``fedseg poc``, fed
from the server instead of log files.

The lead's machine has no site's log (a real study's sites are other hospitals), so
``StudyProgress`` takes what the supervisor reads from the server's round workflow over the admin
API (``show_stats``, ``fedseg.app.resilient_fedavg.STATS_GROUP``): the round in flight with the
sites sent the model and those that answered, and the last closed round's record (answered,
failed, missing, each site's ``val_dice`` of the global model). It fills the same ``RunState`` as
the log reader and prints the same finished-round lines, so a study looks like any other run:
a live table on a terminal, one line per round elsewhere.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from fedseg.run.progress import FederatedProgress, SiteState


class StudyProgress(FederatedProgress):
    """``FederatedProgress`` driven by ``update(progress)`` (the server's stats) instead of logs."""

    def __init__(self, console: object, *, title: str = "", total_rounds: int = 0, rounds_done: int = 0) -> None:
        super().__init__(console, [], site_logs=dict, server_log=lambda: None, title=title)
        self.state.total_rounds = total_rounds
        self._closed = rounds_done  # rounds done before this process looked: not shown again
        self._lock = threading.Lock()  # update() runs in the supervisor's thread, the display in its own

    def _read(self) -> None:  # the display thread's tick: no log to read, only the round lines due
        with self._lock:
            self._flush()

    def _render(self) -> object:
        with self._lock:
            return super()._render()

    def update(self, progress: dict[str, Any]) -> None:
        """One look at the server: the round in flight and the last closed round."""
        with self._lock:
            self.state.total_rounds = int(progress.get("total_rounds") or self.state.total_rounds)
            last = progress.get("last_round") or {}
            if last.get("round") and int(last["round"]) > self._closed:
                self._close_round(last)
            flight = progress.get("in_flight") or {}
            if flight.get("round") and int(flight["round"]) > self._closed:
                self.state.round, self.state.phase = int(flight["round"]), "training"
                answered = set(flight.get("answered") or [])
                for site in flight.get("targets") or []:
                    entry = self._site(site)
                    entry.state = "done" if site in answered else "training"
                    entry.val_dice = (flight.get("val_dice") or {}).get(site)
            self._flush()

    def _site(self, name: str) -> SiteState:
        if name not in self.site_names:
            self.site_names[:] = sorted([*self.site_names, name])
        return self.state.site(name)

    def eta(self) -> float | None:
        """The median pace of the rounds this process saw close (after the first) times the rounds left."""
        if len(self.state.finished) < 2 or not self.state.total_rounds:
            return None
        steady = sorted(s for _, _, s in self.state.finished[1:])
        return steady[len(steady) // 2] * max(self.state.total_rounds - self._closed, 0)

    def _close_round(self, record: dict[str, Any]) -> None:
        number = int(record["round"])
        dice = record.get("val_dice") or {}
        reported: dict[str, SiteState] = {}
        for site in record.get("answered") or []:
            reported[site] = SiteState("done", dice.get(site))
        for site, why in (record.get("failed") or {}).items():
            reported[site] = SiteState("failed", None, str(why))
        for site in record.get("missing") or []:
            reported[site] = SiteState("missing")
        for site in record.get("disconnected") or []:
            reported[site] = SiteState("missing", None, "not in the job")
        for site in reported:
            self._site(site)
        now = time.monotonic()
        self._by_round[number] = reported
        self.state.finished.append((number, reported, now - self._round_started))
        self._round_started, self._closed = now, number
        self._pending.append((number, now - 60))  # every site's state is in the record: no late line to wait for
        for entry in self.state.sites.values():
            entry.state, entry.val_dice, entry.detail = "waiting", None, ""
