"""The demo's last table: the final global model against the smallest site's own model, on test cases.

Reads the FedAvg-family run every e2e test of ``tests/test_jobs.py`` shares (``fedavg_run``:
2 sites x 3 cases, 2 held-out test cases each); only the smallest site's own training runs here."""

from __future__ import annotations

import json

import pytest


@pytest.mark.e2e
def test_the_global_model_and_the_smallest_site_alone_are_scored_on_each_site_s_test_cases(fedavg_run, tmp_path):
    from fedseg.lightning_modules.test_sets import score_test_set
    from fedseg.run.federation_gain import federation_gain, format_gain

    job, synth, _, results = fedavg_run
    final = results.checkpoints["final"]
    rows = federation_gain(final, dict(synth.datalists), job.study, tmp_path)

    assert [r.site for r in rows] == ["site-1", "site-2"]
    assert all(r.train_cases == 2 and r.test_cases == 2 for r in rows)
    # equal sizes: the first by name trains alone, for the study's budget, on its own cases only
    alone = [r for r in rows if r.own_dice is not None]
    assert [r.site for r in alone] == ["site-1"] and rows[1].gain is None
    run = json.loads((tmp_path / "local" / "site-1" / "results.json").read_text())
    assert run["epochs_done"] == job.study.epochs == 8
    assert json.loads((tmp_path / "local" / "site-1" / "config.json").read_text())["datalists"] == [str(synth.datalists["site-1"])]
    # the global model's cells are its test scores on each site's own test cases
    test = score_test_set(final, synth.test_datalists["site-2"])
    assert rows[1].global_dice == pytest.approx(test.mean["overall"]["dice"]) and rows[1].global_sem >= 0
    assert alone[0].gain == pytest.approx(alone[0].global_dice - alone[0].own_dice)
    assert alone[0].own_dice != alone[0].global_dice  # two different models
    table = format_gain(rows, job.study.epochs)
    assert f"{alone[0].gain:+.3f}" in table and "(not trained)" in table and "8 epochs" in table

    # sites without held-out test cases (real data): no table, nothing trained
    no_tests = {s: tmp_path / "plain" / p.name for s, p in synth.datalists.items()}
    for site, path in no_tests.items():
        path.parent.mkdir(exist_ok=True)
        path.write_text(synth.datalists[site].read_text())
    assert federation_gain(final, no_tests, job.study, tmp_path / "none") == []
    assert not (tmp_path / "none").exists()

    # a run of other settings in the folder (an earlier demo) is trained again, not resumed
    again = federation_gain(final, dict(synth.datalists), job.study.override(rounds=1), tmp_path)
    assert json.loads((tmp_path / "local" / "site-1" / "results.json").read_text())["epochs_done"] == 4
    assert again[0].global_dice == rows[0].global_dice
