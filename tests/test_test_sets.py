"""Held-out test sets: reading a site's test datalist, refusing bad ones, and scoring a model on it
(per-region mean Dice and its standard error, equal to what fedseg evaluate scores per case)."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch

from conftest import tiny_train_config
from fedseg.lightning_modules.data.datalist import read_datalist, write_datalist
from fedseg.lightning_modules.data.synth import SynthConfig, generate
from fedseg.lightning_modules.evaluation import evaluate_checkpoint
from fedseg.lightning_modules.inference import load_model
from fedseg.lightning_modules.test_sets import (
    TestSetError,
    check_held_out,
    mean_and_sem,
    read_test_set,
    score_test_set,
    write_test_datalist,
)
from fedseg.lightning_modules.trained_network import TrainedNetwork
from fedseg.lightning_modules.training import train


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One site of 3 cases with 4 test cases (16^3) and a tiny network trained 2 epochs on it."""
    root = tmp_path_factory.mktemp("tests")
    synth = generate(SynthConfig(n_sites=1, cases_per_site=3, test_cases=4, shape=(16, 16, 16), seed=2), root / "synth")
    train(tiny_train_config([synth.datalists["site-1"]], root / "run"))
    return synth, root / "run" / "checkpoints" / "last.ckpt"


def test_mean_and_standard_error():
    mean, sem = mean_and_sem([0.5, 0.7, 0.9])
    assert mean == pytest.approx(0.7) and sem == pytest.approx(0.2 / math.sqrt(3))
    assert mean_and_sem([0.4])[0] == 0.4 and math.isnan(mean_and_sem([0.4])[1])


def test_scores_equal_evaluate_per_case_and_give_mean_and_standard_error(trained, tmp_path):
    synth, ckpt = trained
    scores = score_test_set(ckpt, synth.test_datalists["site-1"])
    assert scores.site == "site-1" and scores.n_cases == 4 and scores.metrics == ("dice",)
    # the same cases as a plain datalist's validation part, scored by fedseg evaluate
    tests = read_test_set(synth.test_datalists["site-1"])
    plain = tmp_path / "plain.json"
    write_datalist(plain, type(read_datalist(synth.datalists["site-1"]))([], tests.cases, tests.data_root))
    evaluated = evaluate_checkpoint(ckpt, plain, out=tmp_path / "eval", metrics=("dice",))
    expected = {(r["case_id"], r["region"]): r["dice"] for r in evaluated.rows}
    assert {(r["case_id"], r["region"]): r["dice"] for r in scores.rows} == pytest.approx(expected)
    for region in ("ET", "TC", "WT", "overall"):
        values = [d for (_, reg), d in expected.items() if reg == region]
        assert scores.mean[region]["dice"] == pytest.approx(statistics.fmean(values))
        assert scores.sem[region]["dice"] == pytest.approx(statistics.stdev(values) / math.sqrt(4))
    assert len({round(v, 6) for v in expected.values()}) > 1  # not a degenerate model scoring alike everywhere
    doc = json.loads(json.dumps(scores.to_json()))
    assert doc["n_cases"] == 4 and set(doc["mean"]) == {"ET", "TC", "WT", "overall"}
    assert "± " in scores.format()


def test_a_module_in_memory_scores_as_its_checkpoint(trained):
    synth, ckpt = trained
    from_file = score_test_set(ckpt, synth.test_datalists["site-1"])
    module = TrainedNetwork.from_checkpoint(ckpt).train()  # left in training mode by its owner
    in_memory = score_test_set(module, synth.test_datalists["site-1"], device="cpu")
    assert _dice(in_memory) == pytest.approx(_dice(from_file)) and module.training  # its mode restored
    assert _dice(score_test_set(load_model(ckpt, device="cpu"), synth.test_datalists["site-1"])) == pytest.approx(
        _dice(from_file))


def _dice(scores) -> dict[str, float]:
    return {r: m["dice"] for r, m in scores.mean.items()}


def test_a_model_that_finds_nothing_scores_zero_with_zero_spread(trained):
    """Every test case holds all three regions, so an empty prediction scores Dice 0 everywhere."""
    synth, ckpt = trained
    module = TrainedNetwork.from_checkpoint(ckpt)
    module.segment = lambda image: torch.zeros((image.shape[0], 3, *image.shape[2:]), dtype=torch.bool)
    scores = score_test_set(module, synth.test_datalists["site-1"], device="cpu")
    assert all(scores.mean[r]["dice"] == 0.0 and scores.sem[r]["dice"] == 0.0 for r in scores.mean)


def test_refuses_what_is_no_test_set_and_names_the_file(trained, tmp_path):
    synth, ckpt = trained
    with pytest.raises(TestSetError, match=r"site-1\.json: not a test datalist"):
        read_test_set(synth.datalists["site-1"])  # a training datalist
    tests = read_test_set(synth.test_datalists["site-1"])
    mixed = json.loads(synth.test_datalists["site-1"].read_text())
    mixed["training"] = mixed["test"][:1]
    (tmp_path / "mixed.test.json").write_text(json.dumps({**mixed, "data_root": str(tests.data_root)}))
    with pytest.raises(TestSetError, match=r"mixed\.test\.json: a test datalist must have no training"):
        read_test_set(tmp_path / "mixed.test.json")
    unlabelled = {**mixed, "training": [], "data_root": str(tests.data_root),
                  "test": [{**mixed["test"][0], "label": None}]}
    (tmp_path / "unlabelled.test.json").write_text(json.dumps(unlabelled))
    with pytest.raises(TestSetError, match=r"unlabelled\.test\.json: test case\(s\) without a label"):
        read_test_set(tmp_path / "unlabelled.test.json")
    outside = {**mixed, "training": [], "data_root": str(tmp_path)}
    (tmp_path / "outside.test.json").write_text(json.dumps({**outside, "test": [
        {**mixed["test"][0], "label": "../../elsewhere/seg.nii.gz"}]}))
    with pytest.raises(TestSetError, match=r"outside\.test\.json: refused, unsafe entries"):
        read_test_set(tmp_path / "outside.test.json")


def test_check_held_out_names_a_test_case_that_is_trained_on(trained, tmp_path):
    synth, _ = trained
    check_held_out(synth.test_datalists["site-1"], [synth.datalists["site-1"], synth.all_datalist])
    site = read_datalist(synth.datalists["site-1"])
    leaked_case = read_test_set(synth.test_datalists["site-1"]).cases[2]
    leaked = tmp_path / "leaked.json"
    write_datalist(leaked, type(site)([*site.training, leaked_case], site.validation, site.data_root.parent / "test"))
    # its paths now point to the test folder; what matters is the case it names
    with pytest.raises(TestSetError, match=r"1 test case\(s\) are also trained or validated on: site1_test003 \(.*leaked\.json: training\)"):
        check_held_out(synth.test_datalists["site-1"], [synth.datalists["site-1"], leaked])


def test_written_test_datalist_round_trips(trained, tmp_path):
    synth, _ = trained
    tests = read_test_set(synth.test_datalists["site-1"])
    path = write_test_datalist(tmp_path / "lists" / "h.test.json", tests.cases[:2], tests.data_root, {"site": "h"})
    again = read_test_set(path)
    assert [c.case_id for c in again.cases] == [c.case_id for c in tests.cases[:2]]
    assert again.site == "h" and again.meta["role"] == "test" and again.data_root == tests.data_root
