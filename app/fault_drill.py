"""A site's fault drill: make this site's training fail or hang on purpose in chosen rounds.

A consortium checks before a real study that one hospital's crash costs that hospital its round
and nothing more. A site admin turns the drill on in the site's own configuration
(``fedseg_site.json``), never in the job::

    {"datalist": "...", "fault_drill": {"raise_in_rounds": [2], "hang_in_rounds": [4], "hang_seconds": 600}}

In each ``raise_in_rounds`` round (1-based, as the progress lines count) the site's Lightning
training raises ``FaultDrillError`` after its first training batch: the same path as a real crash
mid-round (a corrupt case, an out-of-memory), which the site script reports to the server as its
failure. In each ``hang_in_rounds`` round it stops for ``hang_seconds`` (default 3600) after its
first batch instead: a site that hangs, which only the server's round timeout ends.
``hang_seconds`` is one number for every hang round, or a number per round
(``{"3": 40, "5": 600}``): a site that is slow in one round (a short hang holds the round open)
and hangs for good in another.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from pytorch_lightning import Callback


class FaultDrillError(RuntimeError):
    """The failure a fault drill injects."""


class FaultDrill(Callback):
    """Raises ``FaultDrillError`` in the rounds ``raise_in_rounds``, hangs in ``hang_in_rounds`` (1-based)."""

    def __init__(self, raise_in_rounds: list[int], hang_in_rounds: list[int] | None = None,
                 hang_seconds: float | Mapping[int, float] = 3600.0) -> None:
        self.raise_in_rounds = {int(r) for r in raise_in_rounds}
        self.hang_in_rounds = {int(r) for r in hang_in_rounds or []}
        self.hang_seconds = ({int(r): float(s) for r, s in hang_seconds.items()} if isinstance(hang_seconds, Mapping)
                             else float(hang_seconds))
        self.current_round = 0  # 1-based; the site script sets it before each round's fit

    @classmethod
    def from_site_config(cls, extra: Mapping[str, Any], source: object = "site config") -> FaultDrill | None:
        """The drill ``extra["fault_drill"]`` asks for, or None; ``ValueError`` naming ``source`` if malformed."""
        spec = extra.get("fault_drill")
        if not spec:
            return None
        if not isinstance(spec, Mapping) or not set(spec) <= {"raise_in_rounds", "hang_in_rounds", "hang_seconds"}:
            raise ValueError(f"{source}: fault_drill takes 'raise_in_rounds', 'hang_in_rounds' and 'hang_seconds', got {spec!r}")
        rounds = {key: spec.get(key, []) for key in ("raise_in_rounds", "hang_in_rounds")}
        for key, value in rounds.items():
            if not isinstance(value, list) or not all(isinstance(r, int) and r >= 1 for r in value):
                raise ValueError(f"{source}: fault_drill '{key}' must be a list of round numbers >= 1, got {value!r}")
        if not any(rounds.values()):
            raise ValueError(f"{source}: fault_drill needs 'raise_in_rounds' or 'hang_in_rounds', got {spec!r}")
        seconds = spec.get("hang_seconds", 3600)
        per_round = seconds if isinstance(seconds, Mapping) else {r: seconds for r in rounds["hang_in_rounds"]}
        for rnd, value in per_round.items():
            if not str(rnd).isdigit() or isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"{source}: fault_drill 'hang_seconds' must be a positive number or a positive number "
                                 f"per round ({{\"3\": 40}}), got {seconds!r}")
        if isinstance(seconds, Mapping):
            unset = sorted(set(rounds["hang_in_rounds"]) - {int(r) for r in seconds})
            if unset:
                raise ValueError(f"{source}: fault_drill 'hang_seconds' names no seconds for hang round(s) {unset}")
            seconds = {int(r): v for r, v in seconds.items()}
        return cls(rounds["raise_in_rounds"], rounds["hang_in_rounds"], seconds)

    def seconds_in(self, rnd: int) -> float:
        """How long training hangs in round ``rnd`` (a hang round)."""
        return self.hang_seconds[rnd] if isinstance(self.hang_seconds, dict) else self.hang_seconds

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.current_round in self.raise_in_rounds:
            raise FaultDrillError(f"fault drill: training fails in round {self.current_round}")
        if self.current_round in self.hang_in_rounds:
            seconds = self.seconds_in(self.current_round)
            print(f"[fedseg] fault drill: training hangs for {seconds:g} s in round {self.current_round}", flush=True)
            self.hang_in_rounds.discard(self.current_round)  # once per round, not once per batch
            time.sleep(seconds)
