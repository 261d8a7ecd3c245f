"""fedseg compare --seeds: one comparison per seed, summarized as mean ± sd and paired differences."""

from __future__ import annotations

from conftest import TEST_DATA

import csv
import json
import statistics

import pytest

from fedseg.cli import main
from fedseg.experiments.compare import ComparisonError, ComparisonResults, MethodScores, compare
from fedseg.experiments.seed_sweep import SeedSweep, mean_sd, sweep_seeds
from test_compare import _scores, tiny_settings


def _run(tmp_path, seed: int, fedavg: dict[str, float], fedper: dict[str, float],
         local: dict[str, float] | None = None) -> ComparisonResults:
    methods = {"fedavg": MethodScores("fedavg", _scores(fedavg), 1.0, "test"),
               "fedper": MethodScores("fedper", _scores(fedper), 1.0, "test")}
    if local is not None:  # and a method 0.02 above FedPer on every site
        methods["local"] = MethodScores("local", _scores(local), 1.0, "test")
        methods["ditto"] = MethodScores("ditto", _scores({s: v + 0.02 for s, v in fedper.items()}), 1.0, "test")
    return ComparisonResults(tmp_path / f"seed-{seed}", ["site-1", "site-2"], methods, tiny_settings(seed=seed))


def test_summary_over_seeds_and_differences_paired_by_seed(tmp_path):
    runs = [_run(tmp_path, 0, {"site-1": 0.50, "site-2": 0.40}, {"site-1": 0.55, "site-2": 0.50}),
            _run(tmp_path, 1, {"site-1": 0.60, "site-2": 0.50}, {"site-1": 0.58, "site-2": 0.50}),
            _run(tmp_path, 2, {"site-1": 0.40, "site-2": 0.30}, {"site-1": 0.47, "site-2": 0.31})]
    sweep = SeedSweep(tmp_path, [0, 1, 2], runs)

    assert sweep.dice("fedavg", "site-1") == pytest.approx([0.50, 0.60, 0.40])
    assert sweep.dice("fedavg", "MEAN") == pytest.approx([0.45, 0.55, 0.35])
    # FedPer - FedAvg per seed, over sites: the seeds differ a lot, the paired difference little
    assert sweep.difference("fedper") == pytest.approx([0.075, -0.01, 0.04])
    rows = {(r["method"], r["site"]): r for r in sweep.rows()}
    assert rows[("fedavg", "MEAN")]["dice_mean"] == pytest.approx(0.45)
    assert rows[("fedavg", "MEAN")]["dice_sd"] == pytest.approx(statistics.stdev([0.45, 0.55, 0.35]))
    assert rows[("fedper", "site-2")]["seed_1"] == pytest.approx(0.50) and rows[("fedper", "site-2")]["n_seeds"] == 3

    table = sweep.format_table()
    assert "mean Dice over 3 seeds (0, 1, 2): mean ± sd" in table
    assert "0.4500 ± 0.1000" in table  # fedavg, mean over sites
    assert "difference to fedavg, paired by seed: mean ± sd (seeds better of 3)" in table
    assert "+0.0350 ± 0.0427 (2)" in table.splitlines()[-1]  # fedper's paired difference on the mean
    assert "difference to local" not in table and "goal" not in table  # no local-only run here

    files = sweep.write()
    with files["csv"].open() as f:
        assert len(list(csv.DictReader(f))) == 2 * 3  # methods x (sites + MEAN)
    doc = json.loads(files["json"].read_text())
    assert doc["seeds"] == [0, 1, 2] and doc["difference_to_fedavg"]["fedper"] == pytest.approx([0.075, -0.01, 0.04])
    assert files["txt"].read_text().strip() == table

    assert doc["differences"]["fedavg"]["fedper"]["site-1"] == pytest.approx([0.05, -0.02, 0.07])

    assert mean_sd([0.5])[0] == 0.5 and mean_sd([0.5])[1] != mean_sd([0.5])[1]  # one seed: no sd (nan)
    with pytest.raises(ComparisonError, match="at least 2 different seeds"):
        sweep_seeds({}, tmp_path / "x", tiny_settings(), [3, 3])



def test_the_goal_is_above_fedavg_and_local_in_every_seed_with_no_site_far_below_its_local_model(tmp_path):
    runs = [_run(tmp_path, 0, {"site-1": 0.50, "site-2": 0.40}, {"site-1": 0.55, "site-2": 0.50}, {"site-1": 0.52, "site-2": 0.45}),
            _run(tmp_path, 1, {"site-1": 0.60, "site-2": 0.50}, {"site-1": 0.58, "site-2": 0.50}, {"site-1": 0.55, "site-2": 0.49}),
            _run(tmp_path, 2, {"site-1": 0.40, "site-2": 0.30}, {"site-1": 0.47, "site-2": 0.31}, {"site-1": 0.49, "site-2": 0.32})]
    sweep = SeedSweep(tmp_path, [0, 1, 2], runs)
    assert sweep.difference("fedper", "local") == pytest.approx([0.04, 0.02, -0.015])
    assert sweep.goal("ditto") == (True, "")
    met, why = sweep.goal("fedper")
    assert not met and why == ("not above fedavg on the mean in seed(s) 1; not above local on the mean in seed(s) 2; "
                               "below the site's local-only model: site-1 -0.0200 (seed 2)")
    table = sweep.format_table()
    assert "difference to local, paired by seed" in table
    assert "ditto             met" in table and "fedper            not met: not above fedavg" in table
    assert json.loads(sweep.write()["json"].read_text())["goal"]["ditto"] == {"met": True, "why": ""}


@pytest.mark.slow
def test_a_seed_sweep_runs_one_comparison_per_seed_and_a_seed_reproduces_its_run(tmp_path, capsys):
    from fedseg.lightning_modules.data.synth import SynthConfig, generate

    sites = generate(SynthConfig(**TEST_DATA, n_sites=2, cases_per_site=3, shape=(24, 24, 24)), tmp_path / "synth").datalists
    settings = tiny_settings(rounds=1, local_epochs=1, features=8, roi=(24, 24, 24))
    argv = ["compare", "--out", str(tmp_path / "sweep"), "--datalists", *map(str, sites.values()), "--methods", "local",
            "--profile", "tiny", "--rounds", "1", "--local-epochs", "1", "--features", "8", "--roi", "24",
            "--seeds", "0", "1"]
    assert main(argv) == 0
    assert "mean Dice over 2 seeds (0, 1): mean ± sd" in capsys.readouterr().out
    # what the command wrote is what the sweep API gives on the same folder (both seeds done: nothing retrains)
    sweep = sweep_seeds(sites, tmp_path / "sweep", settings, [0, 1], methods=["local"], progress=lambda _: None)
    assert json.loads((tmp_path / "sweep" / "seeds.json").read_text())["rows"] == json.loads(json.dumps(sweep.to_json()))["rows"]
    assert [run.out.name for run in sweep.runs] == ["seed-0", "seed-1"]
    for seed, run in zip((0, 1), sweep.runs):
        assert json.loads((run.out / "comparison.json").read_text())["settings"]["seed"] == seed
    per_seed = [json.loads((tmp_path / "sweep" / f"seed-{s}" / "local" / "scores.json").read_text())["scores"] for s in (0, 1)]
    assert sweep.dice("local", "site-1") == [scores["site-1"]["mean"]["dice"] for scores in per_seed]
    assert sweep.dice("local", "site-1")[0] != sweep.dice("local", "site-1")[1]  # another seed, another start
    # the same seed in another folder: the same training, to the last digit
    again = compare(sites, tmp_path / "again", settings, methods=["local"], progress=lambda _: None)
    assert [again.mean_dice("local", s) for s in again.sites] == [sweep.dice("local", s)[0] for s in sweep.sites]


def test_the_summary_names_the_model_each_site_kept_in_each_seed(tmp_path):
    runs = []
    for seed, kept in enumerate((("global", "local"), ("global", "personal"), ("local", "local"))):
        run = _run(tmp_path, seed, {"site-1": 0.5, "site-2": 0.4}, {"site-1": 0.5, "site-2": 0.4})
        run.methods["select"] = MethodScores("select", _scores({"site-1": 0.5, "site-2": 0.45}), 1.0, "test",
                                             choices=dict(zip(("site-1", "site-2"), kept)))
        runs.append(run)
    sweep = SeedSweep(tmp_path, [0, 1, 2], runs)
    assert sweep.choices("select") == {"site-1": ["global", "global", "local"], "site-2": ["local", "personal", "local"]}
    assert sweep.choices("fedavg") == {}
    assert ("select: the model each site kept (chosen on cases it did not train on), seeds 0, 1, 2: "
            "site-1 global global local; site-2 local personal local") in sweep.format_table()
    assert sweep.to_json()["choices"] == {"select": sweep.choices("select")}
