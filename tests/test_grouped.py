"""Modality/protocol-grouped models: the synthetic groups, the site's declaration, a simulator run."""

from __future__ import annotations

from conftest import TEST_DATA

import json

import numpy as np
import nibabel as nib
import pytest
import torch

from fedseg.lightning_modules.data.synth import SynthConfig, SynthError, generate


def test_synthetic_groups_image_the_same_anatomy_differently(tmp_path):
    one = generate(SynthConfig(**TEST_DATA, n_sites=3, cases_per_site=1, shape=(24, 24, 24), groups=1), tmp_path / "one")
    two = generate(SynthConfig(**TEST_DATA, n_sites=3, cases_per_site=1, shape=(24, 24, 24), groups=2), tmp_path / "two")
    assert one.site_groups == {"site-1": "a", "site-2": "a", "site-3": "a"}
    assert two.site_groups == {"site-1": "a", "site-2": "a", "site-3": "b"}
    assert json.loads(two.datalists["site-3"].read_text())["meta"]["group"] == "b"

    def t1(result, site):
        case = json.loads(result.datalists[site].read_text())
        entry = (case["training"] or case["validation"])[0]
        path = result.data_root / entry["image"][0]
        return np.asarray(nib.load(path).dataobj, dtype=np.float32)

    # group a is unchanged by the option; group b's T1 slot has another contrast (same labels)
    assert np.array_equal(t1(one, "site-1"), t1(two, "site-1"))
    a, b = t1(one, "site-3"), t1(two, "site-3")
    brain = a > 0
    assert np.corrcoef(a[brain], b[brain])[0, 1] < 0.5
    with pytest.raises(SynthError, match="groups must be 1 or 2"):
        SynthConfig(groups=3)


def test_a_site_group_must_be_a_short_name():
    from fedseg.app.site_runner import site_group

    assert site_group({"group": "mri-3t"}, "x.json") == "mri-3t" and site_group({}, "x.json") == ""
    with pytest.raises(ValueError, match=r"x.json: 'group' must be a short name"):
        site_group({"group": "../etc"}, "x.json")


def test_grouped_jobs_are_checked_and_run_without_cross_site_evaluation(tmp_path):
    from conftest import tiny_job
    from fedseg.jobs.addons import Addons, SiteGroups
    from fedseg.jobs.base import _encoder_keys, export

    with pytest.raises(ValueError, match="fedper does not support groups"):
        tiny_job("fedper", addons=Addons(groups=SiteGroups()))
    with pytest.raises(ValueError, match="grouped models work with case weights"):
        Addons(groups=SiteGroups(), resume_from="x")
    job = tiny_job(name="g", addons=Addons(groups=SiteGroups(share_encoder=True)))
    server = json.loads((export(job, tmp_path) / "app" / "config" / "config_fed_server.json").read_text())
    controller = server["workflows"][0]
    assert controller["path"] == "fedseg.app.grouped_fedavg.GroupedFedAvg" and len(server["workflows"]) == 1
    assert set(controller["args"]["shared_keys"]) == set(_encoder_keys(job))
    head = set(tiny_job("fedper").personal_keys())
    assert head and not head & set(controller["args"]["shared_keys"])  # the groups' heads stay their own
    assert "model_selector" not in {c["id"] for c in server["components"]}


@pytest.mark.e2e
@pytest.mark.slow
def test_simulator_two_groups_keep_two_models_sites_of_a_group_share_one(tmp_path):
    from conftest import tiny_job
    from fedseg.jobs.addons import Addons, SiteGroups
    from fedseg.jobs.base import _encoder_keys
    from fedseg.run.simulate import simulate

    synth = generate(SynthConfig(**TEST_DATA, n_sites=3, cases_per_site=3, shape=(24, 24, 24), groups=2), tmp_path / "synth")
    job = tiny_job(name="grouped", rounds=2, min_clients=3, features=8, roi=(24, 24, 24),
                   addons=Addons(groups=SiteGroups(share_encoder=True)))
    settings = {site: {"group": group} for site, group in synth.site_groups.items()}
    results = simulate(job, synth.datalists, tmp_path / "run", site_settings=settings)

    server = tmp_path / "run" / "nvflare" / "grouped" / "server" / "simulate_job"
    rounds = [json.loads(l) for l in (server / "metrics" / "participation.jsonl").read_text().splitlines()]
    first, second = rounds
    # round 1: everyone starts from the initial model; the server learns the groups from the answers
    assert first["groups"] == {"a": ["site-1", "site-2"], "b": ["site-3"]}
    assert set(first["received"].values()) == {first["sent"]["initial"]}
    # round 2: one model per group; what each site received is its group's model
    sent = second["sent"]
    assert set(sent) == {"a", "b"} and sent["a"] != sent["b"]
    assert second["received"] == {"site-1": sent["a"], "site-2": sent["a"], "site-3": sent["b"]}
    assert second["weights"] == {"a": {"site-1": 0.5, "site-2": 0.5}, "b": {"site-3": 1.0}}

    # the final models: the encoder is shared across the groups, the heads are the groups' own
    models = {g: torch.load(server / "app_server" / "groups" / g / "FL_global_model.pt", weights_only=True) for g in "ab"}
    assert models["a"]["meta_props"]["group"] == "a" and models["b"]["meta_props"]["current_round"] == 1
    a, b = models["a"]["model"], models["b"]["model"]
    encoder = set(_encoder_keys(job))
    assert all(torch.equal(a[k], b[k]) for k in encoder)
    head = [k for k in a if k not in encoder and a[k].is_floating_point()]
    assert head and any(not torch.equal(a[k], b[k]) for k in head)
    assert {"final_group-a", "final_group-b"} <= set(results.checkpoints)
