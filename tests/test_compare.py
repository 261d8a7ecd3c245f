"""fedseg compare: every method on the same sites and budget, scored on each site's own cases."""

from __future__ import annotations

import csv
import json
import math

import pytest

from fedseg.config import profile
from fedseg.experiments.compare import (
    FL_METHODS,
    TABLE_REGIONS,
    CompareSettings,
    ComparisonError,
    ComparisonResults,
    MethodScores,
    compare,
)


def tiny_settings(**settings) -> CompareSettings:
    return CompareSettings(study=profile("tiny").override(**settings))


def _scores(per_site_mean: dict[str, float]) -> dict:
    """Scores whose regions are mean +- 0.1 (ET low, WT high), so the mean region is the given value."""
    out = {}
    for site, mean in per_site_mean.items():
        regions = {"ET": mean - 0.1, "TC": mean, "WT": mean + 0.1}
        out[site] = {r: {"dice": d, "iou": d / (2 - d), "hd95": math.nan} for r, d in regions.items()}
        out[site]["mean"] = {"dice": mean, "iou": sum(d / (2 - d) for d in regions.values()) / 3, "hd95": math.nan}
    return out


def test_tables_and_verdict_from_scores(tmp_path):
    methods = {
        "local": MethodScores("local", _scores({"site-1": 0.50, "site-2": 0.40}), 1.0, "test"),
        "fedavg": MethodScores("fedavg", _scores({"site-1": 0.60, "site-2": 0.55}), 1.0, "test"),
        "fedper": MethodScores("fedper", _scores({"site-1": 0.58, "site-2": 0.65}), 1.0, "test"),
    }
    results = ComparisonResults(tmp_path, ["site-1", "site-2"], methods, tiny_settings(rounds=3, local_epochs=2))
    assert results.winner("site-1") == "fedavg" and results.winner("site-2") == "fedper"

    rows = results.rows()
    mean = {r["method"]: r["dice"] for r in rows if r["site"] == "MEAN" and r["region"] == "mean"}
    assert mean == pytest.approx({"local": 0.45, "fedavg": 0.575, "fedper": 0.615})
    worst = {r["method"]: (r["site"], r["dice"]) for r in rows if r["site"].startswith("WORST") and r["region"] == "mean"}
    assert worst == {"local": ("WORST (site-2)", pytest.approx(0.40)), "fedavg": ("WORST (site-2)", pytest.approx(0.55)),
                     "fedper": ("WORST (site-1)", pytest.approx(0.58))}

    verdict = results.verdict()
    assert "every training case seen 6 times" in verdict
    assert "site-1: fedavg wins with 0.6000" in verdict and "site-2: fedper wins with 0.6500" in verdict
    assert "fedper - fedavg: mean +0.0400, better on 1 of 2 sites (site-1 -0.0200; site-2 +0.1000)." in verdict
    assert "fedper - local: mean +0.1650, better on 2 of 2 sites (site-1 +0.0800; site-2 +0.2500)." in verdict
    assert "fedper has the best mean (0.6150), fedper the best worst site (0.5800)" in verdict
    assert "fedper - fedavg Dice per region: site-1 ET -0.0200 TC -0.0200 WT -0.0200; site-2 ET +0.1000" in verdict

    files = results.write()
    with files["csv"].open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == 3 * (2 + 2) * 4  # methods x (sites + MEAN + WORST) x regions
    assert {(r["method"], r["site"], r["region"]) for r in table} >= {
        (m, s, reg) for m in methods for s in ("site-1", "site-2") for reg in TABLE_REGIONS
    }
    assert files["png"].stat().st_size > 5000
    assert files["verdict"].read_text().strip() == verdict


def test_with_test_sets_the_tables_report_test_scores_with_their_standard_error(tmp_path):
    sem = {s: {r: 0.02 for r in TABLE_REGIONS} for s in ("site-1", "site-2")}
    methods = {m: MethodScores(m, _scores(d), 1.0, "test", validation=_scores({"site-1": 0.9, "site-2": 0.9}), sem=sem,
                               test_cases={"site-1": 16, "site-2": 16})
               for m, d in (("local", {"site-1": 0.50, "site-2": 0.40}), ("fedavg", {"site-1": 0.60, "site-2": 0.55}))}
    results = ComparisonResults(tmp_path, ["site-1", "site-2"], methods, tiny_settings())
    assert results.on_test_sets and results.mean_dice("fedavg", "site-2") == pytest.approx(0.55)  # the test score
    table = results.format_table()
    assert "own held-out test cases (site-1 16, site-2 16 cases; ± standard error)" in table
    assert "0.6000 ± 0.0200" in table and "0.4000 ± 0.0200" in table
    assert "on each site's own held-out test cases" in results.verdict()
    files = results.write()
    with files["csv"].open() as f:
        rows = list(csv.DictReader(f))
    assert {r["dice_sem"] for r in rows if r["site"] == "site-1"} == {"0.02"}
    again = MethodScores.read(_write(tmp_path / "scores.json", methods["fedavg"]))
    assert again.validation == methods["fedavg"].validation and again.sem == sem and again.test_cases["site-2"] == 16
    # without test sets (real data): the validation cases, no standard error
    plain = ComparisonResults(tmp_path, ["site-1", "site-2"], {"fedavg": MethodScores("fedavg", _scores(
        {"site-1": 0.6, "site-2": 0.5}), 1.0, "test")}, tiny_settings())
    assert not plain.on_test_sets and "own validation cases" in plain.format_table() and "±" not in plain.format_table()


def _write(path, scores: MethodScores):
    from fedseg.lightning_modules.data.datalist import write_json_atomic

    return write_json_atomic(path, scores.to_json())


def test_test_sets_are_found_beside_the_datalists_and_must_be_held_out(tmp_path):
    import conftest

    from fedseg.experiments.compare import _test_sets

    synth = conftest.tiny_synth(tmp_path / "synth", cases=3, test_cases=2)
    sites = {k: v.resolve() for k, v in synth.datalists.items()}
    found = _test_sets(sites, None, None)
    assert found == {k: v.with_name(f"{k}.test.json") for k, v in sites.items()} and all(p.is_file() for p in found.values())
    assert _test_sets(sites, {}, None) == {}  # off: score on validation
    # a test datalist that lists one of site-1's training cases is refused, naming the case and the datalist
    leaky = json.loads(found["site-2"].read_text())
    train_case = json.loads(sites["site-1"].read_text())["training"][0]
    leaky["test"].append(train_case)
    leaky_path = tmp_path / "leaky.test.json"
    leaky_path.write_text(json.dumps({**leaky, "data_root": str(sites["site-1"].parent / json.loads(
        sites["site-1"].read_text())["data_root"])}))
    with pytest.raises(ComparisonError, match=f"site site-2: .*{train_case['case_id']} .*site-1.json: training"):
        _test_sets(sites, {"site-1": found["site-1"], "site-2": leaky_path}, None)
    with pytest.raises(ComparisonError, match="every site needs one"):
        _test_sets(sites, {"site-1": found["site-1"]}, None)


def test_bad_methods_and_settings_are_refused(tmp_path):
    from fedseg.jobs.base import algorithms

    # every federated method is a valid job (from the algorithms' declarations, fedseg.experiments.methods)
    jobs = {m: tiny_settings(local_epochs=2).job(m, n_sites=3) for m in FL_METHODS}  # FedRep splits its epochs
    assert {j.algorithm for j in jobs.values()} <= set(algorithms())
    assert set(algorithms()) - {j.algorithm for j in jobs.values()} == {"fedavg-he"}  # HE runs in POC only
    assert len({json.dumps(j.to_json(), sort_keys=True) for j in jobs.values()}) == len(FL_METHODS)
    # an add-on method runs with its add-on, never as plain FedAvg (an empty add-on document, as
    # grouped's and contribution's, is the add-on with its defaults: until 2026-12-07 it was dropped)
    from fedseg.experiments.methods import ADDON_METHOD_JOBS

    fedavg_addons = jobs["fedavg"].addons.to_json()
    for method, spec in ADDON_METHOD_JOBS.items():
        got = jobs[method].addons.to_json()
        assert all(got[name] not in (None, fedavg_addons[name]) for name in spec["addons"]), (method, got)
    with pytest.raises(ComparisonError, match="unknown methods.*'fedsgd'"):
        compare({"a": tmp_path / "a.json", "b": tmp_path / "b.json"}, tmp_path / "out", methods=["fedsgd"])
    with pytest.raises(ValueError, match="rounds must be > 0"):
        tiny_settings(rounds=0)
    with pytest.raises(ValueError, match="unknown setting 'epochs'"):
        compare({}, tmp_path / "out", epochs=3)  # not a setting: the budget is rounds x local_epochs
    # a method that chooses each site's model on its validation cases needs test sets to be scored on
    from conftest import tiny_synth

    plain = tiny_synth(tmp_path / "plain", sites=2, cases=3, size=16, test_cases=0)
    with pytest.raises(ComparisonError, match="select-val choose.s. each site's model on its validation cases"):
        compare(plain.datalists, tmp_path / "out", tiny_settings(), methods=["fedavg", "select-val"])


@pytest.mark.e2e
@pytest.mark.slow
def test_compare_all_methods_same_budget_scored_per_site_and_resumable(tmp_path, capsys):
    import torch

    from fedseg.cli import main
    from fedseg.run.results import FINAL_MODEL
    from fedseg.lightning_modules.data.synth import SynthConfig, generate
    from fedseg.lightning_modules.evaluation import evaluate_checkpoint

    synth = generate(SynthConfig(n_sites=2, cases_per_site=3, test_cases=2, shape=(32, 32, 32)), tmp_path / "synth")
    sites = dict(synth.datalists)
    out = tmp_path / "cmp"
    settings = tiny_settings(rounds=2, local_epochs=1, features=8, roi=(32, 32, 32))
    lines: list[str] = []
    # personalized methods: Ditto's personal models, and per-site model selection (which trains Ditto's too)
    methods = ("centralized", "local", "fedavg", "ditto", "select")
    results = compare(sites, out, settings, methods=methods, progress=lines.append)

    # every method x site x region, overlap scores in [0, 1]
    with (out / "comparison.csv").open() as f:
        table = list(csv.DictReader(f))
    got = {(r["method"], r["site"], r["region"]) for r in table}
    assert got >= {(m, s, reg) for m in methods for s in sites for reg in TABLE_REGIONS}
    for r in table:
        assert 0.0 <= float(r["dice"]) <= 1.0 and 0.0 <= float(r["iou"]) <= 1.0, r
        assert r["hd95"] == "nan"  # hd95 off
    verdict = (out / "verdict.txt").read_text()
    assert all(f"{s}: " in verdict for s in sites) and "ditto - fedavg: mean" in verdict
    assert json.loads((out / "comparison.json").read_text())["budget_epochs_per_case"] == 2
    assert (out / "comparison.png").stat().st_size > 5000

    # the same budget: centralized and local ran R x E epochs; the FL jobs R rounds of E epochs
    for run in (out / "centralized", out / "local" / "site-1", out / "local" / "site-2"):
        assert json.loads((run / "results.json").read_text())["epochs_done"] == 2
    for method in ("fedavg", "ditto"):
        job = json.loads((out / method / "job.json").read_text())
        fed = job["study"]["federation"]
        assert (job["algorithm"], fed["rounds"], fed["local_epochs"]) == (method, 2, 1)
    # local-only: site k's own model, scored on site k only
    assert sorted(p.name for p in (out / "local" / "site-1" / "eval").iterdir()) == ["site-1"]

    # the synthetic sites have held-out test sets: every table reports them, with standard errors; the
    # validation scores are kept beside them
    assert results.on_test_sets and "held-out test cases" in (out / "verdict.txt").read_text()
    for method in methods:
        ms = results.methods[method]
        assert ms.test_cases == {s: 2 for s in sites} and ms.validation is not None, method
        assert all(math.isfinite(ms.sem[s]["mean"]) for s in sites), (method, ms.sem)
    # a global model is scored here, by the same rule as fedseg evaluate: score_test_set reproduces it
    from fedseg.lightning_modules.test_sets import score_test_set

    final = out / "fedavg" / "checkpoints" / "final_global.ckpt"
    for site, datalist in sites.items():
        test = score_test_set(final, datalist.with_name(f"{site}.test.json"))
        assert results.methods["fedavg"].scores[site]["mean"]["dice"] == pytest.approx(test.mean["overall"]["dice"], abs=1e-6)

    # one metric definition: evaluate_checkpoint of FedAvg's final global model on a site's validation
    # cases reproduces the site's cross-site val_dice_* (what the FL rows come from)
    cross = json.loads((out / "fedavg" / "results.json").read_text())["final_global_model"]
    for site, datalist in sites.items():
        check = evaluate_checkpoint(final, datalist, out=tmp_path / "check" / site, metrics=("dice", "iou"))
        for region in TABLE_REGIONS:
            ours = check.summary["regions"]["overall" if region == "mean" else region]["dice"]["mean"]
            assert results.methods["fedavg"].validation[site][region]["dice"] == pytest.approx(ours, abs=1e-5)
            assert any(r["site"] == site and r["region"] == region and r["dice"] == pytest.approx(ours, abs=1e-5)
                       for r in cross)
    assert FINAL_MODEL in results.methods["fedavg"].source and "personal model" in results.methods["ditto"].source
    # Ditto: each site's personal model is in its store, and its scores are what the site reported: on its
    # validation cases and, in the same last task, on its own test cases (only the numbers left the site)
    personal = json.loads((out / "ditto" / "results.json").read_text())["personal_models"]
    sent = json.loads((out / "ditto" / "nvflare" / "ditto" / "server" / "simulate_job" / "metrics"
                       / "personal_scores.json").read_text())["scores"]
    for site in sites:
        assert (out / "ditto" / "heads" / site / "ditto.ditto.pt").is_file()
        assert any(r["site"] == site and r["region"] == "mean"
                   and r["dice"] == pytest.approx(results.methods["ditto"].validation[site]["mean"]["dice"]) for r in personal)
        assert sent[site]["test_dice"] == pytest.approx(results.methods["ditto"].scores[site]["mean"]["dice"])
        assert sent[site]["test_cases"] == 2 and not any(isinstance(v, str) for v in sent[site].values())
    assert results.methods["ditto"].scores != results.methods["fedavg"].scores  # its own models, not the global one
    # the personal models train on random streams of their own (SegDataModule.stream): Ditto's sites train
    # FedAvg's global model, draw for draw (the last digits may differ: NVFlare sums in arrival order)
    from fedseg.lightning_modules.safe_load import load_checkpoint

    fedavg_final, ditto_final = (load_checkpoint(out / m / "checkpoints" / "final_global.ckpt")["state_dict"]
                                 for m in ("fedavg", "ditto"))
    assert fedavg_final.keys() == ditto_final.keys()
    assert all(torch.allclose(fedavg_final[k].float(), ditto_final[k].float(), atol=1e-4) for k in fedavg_final)
    # per-site model selection: each site reports which model it kept, and nothing else about the choice;
    # its train results hold the global model's keys only, its last answer scalars only
    from fedseg.app.protocol import SELECT_CANDIDATES

    chose = results.methods["select"].choices
    assert set(chose) == set(sites)
    server = out / "select" / "nvflare" / "select" / "server" / "simulate_job"
    audited = [json.loads(line) for line in (server / "metrics" / "payload_keys.jsonl").read_text().splitlines()]
    global_keys = set(torch.load(server / "app_server" / "FL_global_model.pt", weights_only=False)["model"])
    assert {p["task"] for p in audited} >= {"train", "personalize"}
    assert all(set(p["keys"]) <= global_keys for p in audited if p["task"] == "train")
    # the last answer: exactly the scores a Ditto site sends, and the choice's index
    answers = [p for p in audited if p["task"] == "personalize"]
    assert {p["site"] for p in answers} == set(sites)
    assert all(p["kind"] == "DataKind.METRICS" and set(p["keys"]) == set(sent[p["site"]]) | {"select_choice"} for p in answers)
    for site in sites:
        site_dir = out / "select" / "heads" / site
        inner = json.loads((site_dir / "select.select.json").read_text())
        assert inner["choice"] == chose[site]
        site_log = (out / "select" / "nvflare" / "select" / site / "log.txt").read_text()
        assert f"chose its {chose[site]} model on 1 held-out training case" in site_log
        # the held-out case is out of every candidate's training: 1 of the site's 2 training cases is left
        assert f"{site}: 1 training / 1 validation cases" in site_log
        assert SELECT_CANDIDATES.index(chose[site]) == int(json.loads((server / "metrics" / "personal_scores.json")
                                                                  .read_text())["scores"][site]["select_choice"])

    # resumable: a second run (here through the CLI) trains nothing and reproduces the scores
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.name in ("scores.json", "last.ckpt", "ditto.ditto.pt")}
    assert len(stamps) == 5 + 3 + 2  # five methods' scores, three last.ckpt, the sites' Ditto models
    capsys.readouterr()
    argv = ["compare", "--out", str(out), "--datalists", *map(str, sites.values()), "--profile", "tiny",
            "--rounds", "2", "--local-epochs", "1", "--features", "8", "--roi", "32", "--methods", *methods]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count("not run again") == 5
    assert "mean Dice (ET, TC, WT averaged)" in printed and "ditto - local: mean" in printed
    assert "select: each site kept its " + ", ".join(f"{s} {chose[s]}" for s in sites) + " model" in printed
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    again = json.loads((out / "comparison.json").read_text())["rows"]
    assert again == json.loads(json.dumps(results.to_json()))["rows"]

    # other settings in the same folder are refused, naming what differs
    with pytest.raises(ComparisonError, match="differs in: rounds"):
        compare(sites, out, settings, methods=["centralized"], rounds=3)
