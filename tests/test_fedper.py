"""FedPer: encoder-only server, heads that never leave their site, a personal model store that outlives jobs."""

from __future__ import annotations

import json

import pytest
import torch

from fedseg.app.fedper import personalize, shared_state
from fedseg.app.global_model import SharedEncoder, personal_keys
from fedseg.app.personal_store import PersonalModelStore
from conftest import TEST_DATA, tiny_job
from fedseg.lightning_modules.module import SegmentationModule
from fedseg.lightning_modules.networks import partition_keys

TINY = dict(network="unet", in_channels=4, features=4, roi_size=(16, 16, 16), hd95=False)


def test_server_model_holds_exactly_the_shared_keys():
    module = SegmentationModule(**TINY)
    parts = partition_keys(module.network)
    head = {f"network.{k}" for k in parts.head}
    assert set(personal_keys(module)) == head
    assert set(SharedEncoder(**TINY).state_dict()) == set(module.state_dict()) - head
    fedbn = SharedEncoder(keep_norm_local=True, **TINY).state_dict()
    norm = {f"network.{k}" for k in parts.norm}
    assert norm and not (set(fedbn) & (head | norm))
    assert set(shared_state(module)) == set(module.state_dict()) - head


def test_personal_model_store_round_trip_is_atomic_and_refuses_another_network(tmp_path):
    module = SegmentationModule(**TINY)
    keys = personal_keys(module)
    store = PersonalModelStore(tmp_path / "heads", "study-1")
    assert store.record() is None and store.load_into(module, keys) is None  # new site: fresh head
    store.save(module, keys, global_round=3, job_id="job-a")
    assert [p.name for p in (tmp_path / "heads").iterdir()] == ["study-1.pt"]  # no temporary left
    other = SegmentationModule(**TINY)
    conv = next(k for k in keys if module.state_dict()[k].ndim > 1)  # randomly initialized
    assert not torch.equal(other.state_dict()[conv], module.state_dict()[conv])
    record = store.load_into(other, keys)
    assert record.global_round == 3 and record.job_id == "job-a"
    assert all(torch.equal(other.state_dict()[k], module.state_dict()[k]) for k in keys)
    wider = SegmentationModule(**{**TINY, "features": 8})
    with pytest.raises(ValueError, match="shapes differ"):
        store.load_into(wider, personal_keys(wider))
    with pytest.raises(ValueError, match="study name"):
        PersonalModelStore(tmp_path, "../escape")


def test_fedper_job_filters_head_keys_on_the_site_side(tmp_path):
    from fedseg.jobs.base import RESULT_TASKS, export

    job = tiny_job("fedper", name="fp")
    folder = export(job, tmp_path)
    client = json.loads((folder / "app" / "config" / "config_fed_client.json").read_text())
    server = json.loads((folder / "app" / "config" / "config_fed_server.json").read_text())

    excluded = {
        task: f["args"]["exclude_vars"]
        for group in client["task_result_filters"]
        for task in group["tasks"]
        for f in group["filters"]
        if f["path"].endswith("ExcludeVars")
    }
    assert set(excluded) == set(RESULT_TASKS)  # exact task names: NVFlare has no wildcard here
    assert all(sorted(keys) == sorted(job.personal_keys()) for keys in excluded.values())
    assert client["executors"][0]["executor"]["args"]["job"]["algorithm"] == "fedper"
    persistor = next(c for c in server["components"] if c["id"] == "persistor")
    assert "SharedEncoder" in json.dumps(persistor)


def _site_log(run, site, job="fedper"):
    return (run / "nvflare" / job / site / "log.txt").read_text()


#: the personal head of the tiny FedPer job (UNet, 8 features, the whole decoder), written out by hand
#: from MONAI's UNet layout, not derived from the code under test: the up-blocks model.2 (the output
#: layer), model.1.submodule.2 and model.1.submodule.1.submodule.2 with their conv, norm and PReLU
EXPECTED_HEAD = {
    "network.net.model.2.conv.weight", "network.net.model.2.conv.bias",
    "network.net.model.1.submodule.2.conv.weight", "network.net.model.1.submodule.2.conv.bias",
    "network.net.model.1.submodule.2.adn.N.weight", "network.net.model.1.submodule.2.adn.N.bias",
    "network.net.model.1.submodule.2.adn.A.weight",
    "network.net.model.1.submodule.1.submodule.2.conv.weight", "network.net.model.1.submodule.1.submodule.2.conv.bias",
    "network.net.model.1.submodule.1.submodule.2.adn.N.weight", "network.net.model.1.submodule.1.submodule.2.adn.N.bias",
    "network.net.model.1.submodule.1.submodule.2.adn.A.weight",
}  # fmt: skip


def _audited(server) -> list[dict]:
    """The server's payload audit: one record per result it received (site, task, parameter names)."""
    return [json.loads(line) for line in (server / "metrics" / "payload_keys.jsonl").read_text().splitlines()]


@pytest.mark.e2e
@pytest.mark.slow
def test_simulator_fedper_head_never_reaches_the_server_and_outlives_the_job(tmp_path):
    from fedseg.lightning_modules.data.synth import SynthConfig, generate
    from fedseg.run.simulate import simulate

    synth = generate(SynthConfig(**TEST_DATA, n_sites=2, cases_per_site=3, shape=(32, 32, 32)), tmp_path / "synth")
    job = tiny_job("fedper", rounds=2, features=8, roi=(32, 32, 32))
    head_keys = set(job.personal_keys())
    assert head_keys == EXPECTED_HEAD  # the code's split is the layout written out above
    heads = tmp_path / "heads"  # site-local, outside every job's run folder
    run1 = tmp_path / "run1"
    results = simulate(job, synth.datalists, run1, personal_stores=heads)

    server = run1 / "nvflare" / "fedper" / "server" / "simulate_job"
    payloads = _audited(server)
    # the audit saw every result it is there to check, with the weights' names: 2 rounds x 2 sites of
    # train, 2 submit_model (cross-site evaluation), and the personal scores (no weights) at the end
    by_task = {task: [p for p in payloads if p["task"] == task] for task in ("train", "submit_model", "personalize")}
    assert {(p["site"], len(by_task["train"])) for p in by_task["train"]} == {("site-1", 4), ("site-2", 4)}
    assert {p["site"] for p in by_task["submit_model"]} == {"site-1", "site-2"}
    assert all(p["keys"] for p in by_task["train"] + by_task["submit_model"])
    assert {p["site"] for p in by_task["personalize"]} == {"site-1", "site-2"}
    # scores only: a metrics payload whose keys are the validation scores, no weight
    assert all(p["kind"] == "DataKind.METRICS" and p["keys"] and all(k.startswith("val_") for k in p["keys"])
               for p in by_task["personalize"])
    assert not any(EXPECTED_HEAD & set(p["keys"]) for p in payloads), "a head key reached the server"
    for name in ("FL_global_model.pt", "best_FL_global_model.pt"):
        saved = torch.load(server / "app_server" / name, weights_only=False)["model"]
        assert saved and not (head_keys & set(saved))

    # personalized metrics: each site scored global encoder + its own head, every round
    per_site = [r for r in results.rounds if r["site"] != "mean"]
    assert {(r["round"], r["site"]) for r in per_site} == {(0, "site-1"), (0, "site-2"), (1, "site-1"), (1, "site-2")}
    assert all("val_dice_et" in r for r in per_site)
    final = results.cross_site["SRV_FL_global_model.pt"]
    assert set(final) == {"site-1", "site-2"}

    stores = {s: PersonalModelStore(heads / s, "fedper") for s in ("site-1", "site-2")}
    first = {s: st.record() for s, st in stores.items()}
    assert all(r.global_round == 1 and set(r.keys) == EXPECTED_HEAD for r in first.values())
    assert "personal head (decoder, 12 tensors) new" in _site_log(run1, "site-1")
    # the personal scores: each site's final encoder with its own head, as cross-site evaluation scored it
    final_on_own_site = results.cross_site["SRV_FL_global_model.pt"]
    for site in ("site-1", "site-2"):
        assert results.personal[site]["val_dice"] == pytest.approx(final_on_own_site[site]["val_dice"], abs=1e-6)

    # the site's personalized model = global encoder + its head, usable by evaluate/predict
    model_file = personalize(results.checkpoints["final"], stores["site-1"].path, tmp_path / "site-1.ckpt")
    model = SegmentationModule.load_from_checkpoint(model_file, map_location="cpu")
    head_state = torch.load(stores["site-1"].path, weights_only=False)["state"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in head_state.items())

    # a new job of the same study, new process, now FedRep (head first, then the encoder, each round):
    # each site picks its head up again, and the head still never reaches the server
    run2 = tmp_path / "run2"
    fedrep = tiny_job("fedrep", name="fedrep", study_name="fedper", rounds=1, local_epochs=2, features=8,
                      roi=(32, 32, 32), cross_site_eval=False)
    simulate(fedrep, synth.datalists, run2, personal_stores=heads)
    assert "personal head (decoder, 12 tensors) reused" in _site_log(run2, "site-2", "fedrep")
    second = stores["site-2"].record()
    # saved again by the new job (the simulator names every job "simulate_job"), at its round 0
    assert second.saved_at > first["site-2"].saved_at and second.global_round == 0
    payloads = _audited(run2 / "nvflare" / "fedrep" / "server" / "simulate_job")
    assert [p["task"] for p in payloads].count("train") == 2 and all(p["keys"] for p in payloads if p["task"] == "train")
    assert not any(EXPECTED_HEAD & set(p["keys"]) for p in payloads)
