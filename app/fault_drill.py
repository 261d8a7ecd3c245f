"""A site's fault drill: make this site's training fail on purpose in chosen rounds.

A consortium checks before a real study that one hospital's crash costs that hospital its round
and nothing more. A site admin turns the drill on in the site's own configuration
(``fedseg_site.json``), never in the job::

    {"datalist": "...", "fault_drill": {"raise_in_rounds": [2]}}

In each listed round (1-based, as the progress lines count) the site's Lightning training raises
``FaultDrillError`` after its first training batch: the same path as a real crash mid-round (a
corrupt case, an out-of-memory), which the site script reports to the server as its failure.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pytorch_lightning import Callback


class FaultDrillError(RuntimeError):
    """The failure a fault drill injects."""


class FaultDrill(Callback):
    """Raises ``FaultDrillError`` in the training of the rounds in ``raise_in_rounds`` (1-based)."""

    def __init__(self, raise_in_rounds: list[int]) -> None:
        self.raise_in_rounds = {int(r) for r in raise_in_rounds}
        self.current_round = 0  # 1-based; the site script sets it before each round's fit

    @classmethod
    def from_site_config(cls, extra: Mapping[str, Any], source: object = "site config") -> FaultDrill | None:
        """The drill ``extra["fault_drill"]`` asks for, or None; ``ValueError`` naming ``source`` if malformed."""
        spec = extra.get("fault_drill")
        if not spec:
            return None
        rounds = spec.get("raise_in_rounds") if isinstance(spec, Mapping) else None
        if not isinstance(rounds, list) or not all(isinstance(r, int) and r >= 1 for r in rounds):
            raise ValueError(f"{source}: fault_drill needs 'raise_in_rounds': a list of round numbers >= 1, got {spec!r}")
        return cls(rounds)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.current_round in self.raise_in_rounds:
            raise FaultDrillError(f"fault drill: training fails in round {self.current_round}")
