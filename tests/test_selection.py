"""Per-site model selection: the inner split, the local-only candidate and the choice, at one site.

The job's run in the simulator, with ``fedseg compare`` reporting the choices, is in
tests/test_compare.py (the same deployment as Ditto's)."""

from __future__ import annotations

import json
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from conftest import tiny_job, tiny_synth


def _cases(n: int):
    from fedseg.lightning_modules.data.datalist import Case

    return [Case(case_id=f"case-{i:03d}", images=(f"img{i}.nii.gz",), modalities=("t1",), label=f"lab{i}.nii.gz",
                 convention="brats2021") for i in range(n)]


def test_the_inner_split_holds_out_a_share_of_the_training_cases_the_same_every_time():
    from fedseg.app.model_selection import inner_split

    for n, held in ((2, 1), (3, 1), (6, 1), (18, 4), (40, 8)):
        cases = _cases(n)
        kept, inner = inner_split(cases, 0.2)
        assert len(inner) == held and len(kept) == n - held, n
        assert not set(c.case_id for c in kept) & set(c.case_id for c in inner)
        assert [c for c in cases if c in kept] == kept  # the datalist's order
        assert inner_split(list(reversed(cases)), 0.2)[1] == sorted(inner, key=lambda c: -cases.index(c))  # ids, not order
    assert len(inner_split(_cases(3), 0.9)[0]) == 1  # always one left to train on
    with pytest.raises(ValueError, match="at least 2 training cases"):
        inner_split(_cases(1), 0.2)


def test_select_options_are_checked_and_reach_the_site_plugin():
    from fedseg.jobs.base import algorithm
    from fedseg.jobs.selection import SelectOptions

    with pytest.raises(ValueError, match=r"select_fraction must be in \(0, 1\)"):
        SelectOptions(select_fraction=1.0)
    with pytest.raises(ValueError, match="ditto_lambda and personal_epochs must be >= 0"):
        SelectOptions(ditto_lambda=-1.0)
    with pytest.raises(ValueError, match="select_on must be one of inner, validation"):
        SelectOptions(select_on="test")
    assert algorithm("select").selects_on_validation(SelectOptions(select_on="validation"))
    assert not algorithm("select").selects_on_validation(SelectOptions())
    assert not any(algorithm(name).selects_on_validation(algorithm(name).default_options())
                   for name in ("fedavg", "ditto", "apfl"))
    plugin = algorithm("select").make_site_plugin({"select_fraction": 0.5, "ditto_lambda": 0.1})
    assert (plugin.select_fraction, plugin.ditto_lambda, plugin.store_kind) == (0.5, 0.1, "select-personal")


def test_a_site_trains_three_candidates_and_keeps_the_best_on_cases_none_trained_on(tmp_path, monkeypatch):
    from fedseg.app.model_selection import SelectionPlugin
    from fedseg.app.personal_store import PersonalModelStore
    from fedseg.app.protocol import SELECT_CANDIDATES, SELECT_CHOICE_KEY
    from fedseg.app.site_runner import SiteJob
    from fedseg.jobs.selection import SelectOptions
    from fedseg.lightning_modules.data.datalist import read_datalist
    from fedseg.lightning_modules.module import SegmentationModule
    from fedseg.lightning_modules.training import build_datamodule

    monkeypatch.chdir(tmp_path)  # the candidates' trainer folders
    synth = tiny_synth(tmp_path / "synth", sites=1, cases=4, size=24)
    job = tiny_job("select", lr=0.03, rounds=2, local_epochs=2)
    site_job = SiteJob(algorithm="select", options=job.options_json(), study=job.study, study_name="study")
    full = read_datalist(synth.datalists["site-1"])
    plugin = SelectionPlugin(SelectOptions(select_fraction=0.2))
    runner = SimpleNamespace(job=site_job, site="site-1", job_id="job-1", model=SegmentationModule(**job.study.module_args()),
                             config=SimpleNamespace(head_store=tmp_path / "store", cache_dir=None))
    runner.datalist = plugin.datalist(runner, full)
    runner.datamodule = build_datamodule(job.study, runner.datalist, None)
    held = {c.case_id for c in plugin.inner}
    assert len(held) == 1 and held <= {c.case_id for c in full.training}
    assert not held & {c.case_id for c in runner.datalist.cases}  # no candidate trains (or validates) on it
    plugin.setup(runner)

    untrained = {k: v.clone() for k, v in runner.model.state_dict().items()}
    plugin.after_round(runner, SimpleNamespace(params=untrained, current_round=0))
    local_state = {k: v.clone() for k, v in plugin.local.state_dict().items()}
    assert any(not torch.equal(local_state[k], untrained[k]) for k in untrained if untrained[k].is_floating_point())
    assert all(torch.equal(runner.model.state_dict()[k], untrained[k]) for k in untrained)  # what the site sends: untouched
    local = PersonalModelStore(tmp_path / "store", "study", kind="select-local")
    assert local.record().global_round == 0 and local.path.stat().st_mode & 0o077 == 0
    assert PersonalModelStore(tmp_path / "store", "study", kind="select-personal").exists()

    # the choice: the untrained global model against the trained personal and local ones, on the held-out case
    chosen = plugin.personal_model(runner, SimpleNamespace(params=untrained, current_round=1))
    record = json.loads((tmp_path / "store" / "study.select.json").read_text())
    scores = record["inner_dice"]
    assert set(scores) == set(SELECT_CANDIDATES) and record["inner_cases"] == 1
    assert record["choice"] == max(SELECT_CANDIDATES, key=lambda n: (scores[n], -SELECT_CANDIDATES.index(n)))
    assert record["choice"] != "global" and scores["global"] < max(scores.values())  # trained beats untrained
    assert chosen is {"personal": plugin.model, "local": plugin.local}[record["choice"]]
    assert (tmp_path / "store" / "study.select.json").stat().st_mode & 0o077 == 0
    kept = torch.load(PersonalModelStore(tmp_path / "store", "study", kind="select-chosen").path, weights_only=True)["state"]
    assert all(torch.equal(kept[k], v) for k, v in chosen.state_dict().items())
    # what leaves the site about the choice: its index only
    assert plugin.personal_metrics() == {SELECT_CHOICE_KEY: float(SELECT_CANDIDATES.index(record["choice"]))}

    # the study's split is kept: a later job (here with another fraction) holds out the same case
    split = json.loads((tmp_path / "store" / "study.select-split.json").read_text())
    assert split["held_out"] == sorted(held) and (tmp_path / "store" / "study.select-split.json").stat().st_mode & 0o077 == 0
    later = SelectionPlugin(SelectOptions(select_fraction=0.6))
    assert {c.case_id for c in later.datalist(runner, full).training} == {c.case_id for c in runner.datalist.training}
    shrunk = replace(full, training=[c for c in full.training if c.case_id not in held])
    with pytest.raises(ValueError, match="study.select-split.json: 1 case.s. held out earlier in this study are no longer"):
        later.datalist(runner, shrunk)

    # choosing on the validation cases instead: nothing is held out from training, no split is stored
    on_validation = SelectionPlugin(SelectOptions(select_on="validation"))
    other = SimpleNamespace(**{**vars(runner), "config": SimpleNamespace(head_store=tmp_path / "other", cache_dir=None)})
    assert on_validation.datalist(other, full) is full and on_validation.inner == full.validation
    assert not (tmp_path / "other").exists()

    # a failed round drops what it half-changed: back to the stored local model
    with torch.no_grad():
        next(plugin.local.parameters()).add_(1.0)
    plugin.after_failure(runner)
    assert all(torch.equal(plugin.local.state_dict()[k], v) for k, v in local_state.items())
