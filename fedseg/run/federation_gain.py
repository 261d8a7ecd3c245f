"""What federation buys a site: the final global model against the site's own model, on its test cases.

The demo's last table. Each site's held-out test cases (``<datalist>.test.json``, as the synthetic
generator writes them) score the final global model; the site with the fewest training cases also
trains a model on its own cases alone, with the same budget (``rounds x local_epochs`` epochs), and
is scored on the same cases. Only that site trains alone: it is the one a consortium is for, and
training every site alone would double the demo's time (``fedseg compare`` does that, over seeds).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedseg.config import StudyConfig


@dataclass(frozen=True)
class SiteGain:
    """One site's test Dice (mean over ET, TC, WT) of the global model and, if trained, of its own model."""

    site: str
    train_cases: int
    test_cases: int
    global_dice: float
    global_sem: float
    own_dice: float | None = None
    own_sem: float | None = None

    @property
    def gain(self) -> float | None:
        return None if self.own_dice is None else self.global_dice - self.own_dice


def federation_gain(final_checkpoint: Path | str, datalists: dict[str, Path], study: StudyConfig, out: Path) -> list[SiteGain]:
    """Score ``final_checkpoint`` on every site's test cases and train the smallest site alone
    (``out/local/<site>``, a ``fedseg train`` run folder, resumed if it is there); sites without a test
    datalist are left out (an empty list if none has one)."""
    from fedseg.lightning_modules.data.datalist import read_datalist
    from fedseg.lightning_modules.test_sets import TEST_SUFFIX, score_test_set
    from fedseg.lightning_modules.training import TrainConfig, train

    tests = {site: p.with_name(p.name.removesuffix(".json") + TEST_SUFFIX) for site, p in datalists.items()}
    tests = {site: p for site, p in tests.items() if p.is_file()}
    if not tests:
        return []
    train_cases = {site: len(read_datalist(datalists[site]).training) for site in tests}
    smallest = min(tests, key=lambda site: (train_cases[site], site))
    rows = []
    for site, test in tests.items():
        scores = score_test_set(final_checkpoint, test)
        own: Any = None
        if site == smallest:
            # the table is Dice only: no HD95 in the run's per-epoch validation (slow on a CPU)
            cfg = TrainConfig(datalists=[datalists[site]], out=out / "local" / site, study=study.override(hd95=False),
                              progress=False)
            saved = cfg.out / "config.json"
            if saved.is_file() and json.loads(saved.read_text()) != cfg.to_json():
                shutil.rmtree(cfg.out)  # a run of other settings (an earlier demo in this folder): not resumed
            run = train(cfg)
            own = score_test_set(run["last_checkpoint"], test)
        rows.append(SiteGain(site, train_cases[site], scores.n_cases, scores.mean["overall"]["dice"],
                             scores.sem["overall"]["dice"], own.mean["overall"]["dice"] if own else None,
                             own.sem["overall"]["dice"] if own else None))
    return rows


def format_gain(rows: list[SiteGain], epochs: int, method: str = "fedavg") -> str:
    """The table: per site, its training and test cases, the global model's and its own model's test Dice."""
    lines = ["what federation buys each site: mean Dice (ET, TC, WT) ± standard error on its held-out test cases",
             f"{'site':<10}{'train':>6}{'test':>6}{method + ' global':>18}{'alone':>18}{'federation buys':>17}"]
    for r in rows:
        alone = f"{r.own_dice:.3f} ± {r.own_sem:.3f}" if r.own_dice is not None else "(not trained)"
        gain = f"{r.gain:+.3f}" if r.gain is not None else ""
        lines.append(f"{r.site:<10}{r.train_cases:>6}{r.test_cases:>6}{f'{r.global_dice:.3f} ± {r.global_sem:.3f}':>18}"
                     f"{alone:>18}{gain:>17}".rstrip())
    lines.append(f"alone: trained on the site's own training cases only, {epochs} epochs (as many as in the federation)")
    return "\n".join(lines)


__all__ = ["SiteGain", "federation_gain", "format_gain"]
