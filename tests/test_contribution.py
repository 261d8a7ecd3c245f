"""Contribution-weighted aggregation: the definition, the aggregator, and a simulator run."""

from __future__ import annotations

from conftest import TEST_DATA

import json
import math

import pytest
import torch
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

from fedseg.app.contribution import (
    LOSS_AFTER_KEY,
    WEIGHTS_KEY,
    ContributionWeightedAggregator,
    SiteRound,
    cap_shares,
    contribution_weights,
)


def test_weights_follow_cases_and_cost_ratio_as_defined():
    sites = {"a": SiteRound(cases=6, loss_before=1.0, loss_after=0.5), "b": SiteRound(cases=2, loss_before=1.0, loss_after=1.0)}
    w = contribution_weights(sites, alpha=0.5, max_share=1.0)
    # a: 0.5 * 6/8 + 0.5 * 2/3 ; b: 0.5 * 2/8 + 0.5 * 1/3
    assert w["a"] == pytest.approx(0.5 * 0.75 + 0.5 * 2 / 3) and w["b"] == pytest.approx(0.5 * 0.25 + 0.5 / 3)
    assert contribution_weights(sites, alpha=1.0, max_share=1.0) == pytest.approx({"a": 0.75, "b": 0.25})  # FedAvg
    assert sum(w.values()) == pytest.approx(1.0)


def test_a_missing_or_broken_loss_counts_as_neutral():
    assert SiteRound(3, math.nan, 1.0).cost_ratio == 1.0
    assert SiteRound(3, 1.0, 0.0).cost_ratio == 1.0
    assert SiteRound(3, 2.0, 1.0).cost_ratio == 2.0


def test_no_site_exceeds_the_cap_and_the_excess_is_shared_in_proportion():
    shares = cap_shares({"a": 8.0, "b": 1.0, "c": 1.0}, max_share=0.5)
    assert shares == pytest.approx({"a": 0.5, "b": 0.25, "c": 0.25})
    shares = cap_shares({"a": 6.0, "b": 3.0, "c": 1.0}, max_share=0.4)  # b goes over once a is capped
    assert max(shares.values()) <= 0.4 + 1e-9 and sum(shares.values()) == pytest.approx(1.0)
    assert shares["a"] == pytest.approx(0.4) and shares["b"] == pytest.approx(0.4) and shares["c"] == pytest.approx(0.2)
    # a cap below 1/n is impossible: contribution_weights raises it to 1/n (equal weights)
    equal = contribution_weights({k: SiteRound(1 + i, 1.0, 0.5) for i, k in enumerate("abc")}, max_share=0.1)
    assert equal == pytest.approx({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3})


def _update(site: str, value: float, cases: int, before: float, after: float) -> FLModel:
    return FLModel(
        params={"w": torch.full((2, 2), value)},
        params_type=ParamsType.FULL,
        metrics={"val_loss": before, "val_dice": value},
        meta={"client_name": site, "NUM_STEPS_CURRENT_ROUND": cases, LOSS_AFTER_KEY: after},
        current_round=0,
    )


def test_aggregator_averages_the_updates_with_the_contribution_weights():
    aggregator = ContributionWeightedAggregator(alpha=0.5, max_share=0.9)
    aggregator.reset_stats()
    aggregator.accept_model(_update("a", 1.0, cases=3, before=1.0, after=0.5))
    aggregator.accept_model(_update("b", 4.0, cases=1, before=1.0, after=1.0))
    result = aggregator.aggregate_model()
    expected = contribution_weights(
        {"a": SiteRound(3, 1.0, 0.5), "b": SiteRound(1, 1.0, 1.0)}, alpha=0.5, max_share=0.9
    )
    assert result.meta[WEIGHTS_KEY] == pytest.approx(expected)
    want = expected["a"] * 1.0 + expected["b"] * 4.0
    assert torch.allclose(result.params["w"], torch.full((2, 2), want))
    assert result.metrics["val_dice"] == pytest.approx(want)
    assert expected["a"] != pytest.approx(0.75)  # not the case share: the contribution moved it


@pytest.mark.e2e
@pytest.mark.slow
def test_simulator_contribution_weights_are_the_defined_function_of_what_the_sites_reported(tmp_path):
    from conftest import tiny_job
    from fedseg.jobs.addons import Addons, ContributionWeights
    from fedseg.lightning_modules.data.synth import SynthConfig, generate
    from fedseg.run.simulate import simulate

    synth = generate(SynthConfig(**TEST_DATA, n_sites=3, cases_per_site=3, shape=(24, 24, 24)), tmp_path / "synth")
    job = tiny_job(name="contrib", rounds=2, min_clients=3, features=8, roi=(24, 24, 24), cross_site_eval=False,
                   addons=Addons(contribution=ContributionWeights(contribution_alpha=0.3, max_site_share=0.5)))
    simulate(job, synth.datalists, tmp_path / "run")
    server = tmp_path / "run" / "nvflare" / "contrib" / "server" / "simulate_job"
    rounds = [json.loads(l) for l in (server / "metrics" / "participation.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    for record in rounds:
        reported = record["contribution"]
        assert set(reported) == {"site-1", "site-2", "site-3"}
        for site, entry in reported.items():
            assert entry["cases"] == 2.0  # 2 training cases each
            assert entry["loss_before"] > 0 and entry["loss_after"] > 0  # both measured at the site
        inputs = {s: SiteRound(e["cases"], e["loss_before"], e["loss_after"]) for s, e in reported.items()}
        assert record["weights"] == pytest.approx(contribution_weights(inputs, alpha=0.3, max_share=0.5), abs=1e-6)
        # the update's own loss is what the site measured after training, not the received model's
        assert any(e["loss_after"] != e["loss_before"] for e in reported.values())
