"""What an algorithm or a site setting adds to a site's rounds (``SitePlugin``), and the site's
progress line.

Apart from ``fedseg.app.site_runner`` so that the plug-ins (``fedseg.app.personalization``, which an
algorithm's declaration names by class path) and the runner both import it, and neither imports
the other.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedseg.app.site_runner import SiteRunner
    from fedseg.lightning_modules.data.datalist import Datalist


def progress(line: str) -> None:
    """One line to the site log (NVFlare redirects ``print``) and to the process console."""
    print(line)
    if sys.__stdout__ is not None and sys.stdout is not sys.__stdout__:
        sys.__stdout__.write(line + "\n")
        sys.__stdout__.flush()


class SitePlugin:
    """What an algorithm or a site setting adds to the site's rounds; every hook is optional."""

    #: load the received global model strictly (every key) or keep local keys it lacks
    strict_load: bool = True

    def datalist(self, runner: SiteRunner, datalist: Datalist) -> Datalist:
        """The site's datalist as the job trains on it (e.g. with cases held out); once, before the data is loaded."""
        return datalist

    def setup(self, runner: SiteRunner) -> None:
        """Once, after the model and data exist and before the Trainer is made."""

    def callbacks(self) -> list[Any]:
        """Lightning callbacks for the site's Trainer (placed before NVFlare's own)."""
        return []

    def check_received(self, runner: SiteRunner, input_model: Any) -> None:
        """Before a train or validate task uses the model the server sent; raise to fail the task."""

    def before_fit(self, runner: SiteRunner, round_no: int) -> None:
        """Before the round's training (1-based round number)."""

    def after_round(self, runner: SiteRunner, input_model: Any) -> None:
        """After a round's update was sent."""

    def after_failure(self, runner: SiteRunner) -> None:
        """After a failed round was reported: drop what the failed round half-changed."""

    def shareable(self, state: dict[str, Any]) -> dict[str, Any]:
        """The part of the site's model that may leave it (cross-site ``submit_model``)."""
        return state

    def personal_model(self, runner: SiteRunner, input_model: Any) -> Any:
        """The site's personal model made from the final global model (``personalize`` task), or None."""
        return None

    def personal_metrics(self) -> dict[str, float]:
        """Scalars sent with the personal model's scores (after ``personal_model``), e.g. which model a site chose."""
        return {}
