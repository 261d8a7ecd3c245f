"""NVFlare jobs: the export workaround, checked-in job folders, and a real simulator run."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import assert_learned, component_paths, tiny_job
from fedseg.jobs.base import export
from offline_validation import validate_state


def test_nvflare_export_check_still_rejects_mapped_packages_without_our_workaround(tmp_path):
    """Pins the library behaviour ``nvflare_internals.patch_job_export`` works around: if this starts
    failing, NVFlare fixed its check and the workaround can go."""
    from nvflare.job_config.fed_job_config import FedJobConfig

    from fedseg import nvflare_internals
    from fedseg.lightning_modules import networks

    original = nvflare_internals.unpatched_get_custom_file()
    config = FedJobConfig.__new__(FedJobConfig)
    config.app_packages = ["fedseg"]
    with pytest.raises(ValueError, match="does not match module"):
        original(config, str(tmp_path), "fedseg.lightning_modules.networks", networks.__file__)
    nvflare_internals.patch_job_export()
    assert FedJobConfig._get_custom_file(config, str(tmp_path), "fedseg.lightning_modules.networks", networks.__file__) is None
    assert not any(tmp_path.iterdir())  # nothing copied: fedseg is installed at every site


def test_checked_in_job_folders_are_up_to_date():
    from fedseg.jobs.catalog import JOBS_DIR, STUDY_JOBS, stale_jobs

    assert stale_jobs() == [], "run `fedseg jobs export` and commit jobs/<name>/"
    assert set(STUDY_JOBS) == {"fedavg", "fedprox", "fedopt", "fedper", "fedrep", "ditto", "apfl", "select", "finetune"}
    assert (JOBS_DIR / "stats" / "meta.json").is_file()  # and the federated statistics job


def test_submitting_a_job_folder_imports_no_lightning():
    """``nvflare job submit`` imports every class path a job's configs name (to index their
    defaults); none of ours may pull in PyTorch Lightning, which made a submit take 12-18 s."""
    import subprocess
    import sys

    from fedseg.jobs.catalog import JOBS_DIR

    named = sorted({p for config in JOBS_DIR.glob("*/app/config/*.json") for p in component_paths(json.loads(config.read_text()))})
    assert "fedseg.app.global_model.GlobalModel" in named
    script = (
        "import importlib, sys\n"
        f"for path in {named!r}:\n"
        "    module, _, name = path.rpartition('.')\n"
        "    getattr(importlib.import_module(module), name)  # every class a job names is installed\n"
        "print(sorted(m for m in ('pytorch_lightning', 'lightning', 'lightning_fabric') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_the_servers_global_model_is_the_sites_network_with_the_same_initial_weights():
    from fedseg.app.global_model import GlobalModel, SharedEncoder, personal_keys
    from fedseg.config import profile
    from fedseg.lightning_modules.module import SegmentationModule

    args = {**profile("tiny").module_args(), "init_seed": 7}
    site, server = SegmentationModule(**args).state_dict(), GlobalModel(**args).state_dict()
    assert list(site) == list(server)
    assert all(torch.equal(site[k], server[k]) for k in site)
    shared = SharedEncoder(personal_head="last", **args).state_dict()
    assert set(shared) == set(site) - set(personal_keys(SegmentationModule(**args), head_depth="last"))


def test_exported_job_carries_settings_only_no_code_and_no_site_paths(tmp_path):
    from fedseg import __version__

    folder = export(tiny_job(name="tiny", roi=(32, 32, 32), features=8), tmp_path)
    # no app/custom: the sites run their installed fedseg (a kit refuses a job that brings code)
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) == [
        "app/config/config_fed_client.json", "app/config/config_fed_server.json", "meta.json"]
    client = json.loads((folder / "app" / "config" / "config_fed_client.json").read_text())
    server = json.loads((folder / "app" / "config" / "config_fed_server.json").read_text())
    text = json.dumps(client) + json.dumps(server)
    assert str(tmp_path) not in text and "/data" not in text  # no site paths baked in
    executor = client["executors"][0]["executor"]
    assert executor["path"] == "fedseg.app.site_executor.SiteExecutor"
    assert executor["args"]["fedseg_version"] == __version__
    site = executor["args"]["job"]  # the site document: settings only
    assert site["algorithm"] == "fedavg" and site["wandb"] == "off"
    assert site["study"]["data"]["roi"] == [32, 32, 32] and site["study"]["model"]["features"] == 8
    components = {c["id"]: c for c in server["components"]}
    assert components["model_selector"]["args"]["key_metric"] == "val_dice"
    assert components["fedseg_metrics_receiver"]["path"] == "fedseg.app.metrics_receiver.JsonlMetricsReceiver"
    assert any("CrossSiteModelEval" in w["path"] for w in server["workflows"])


@pytest.mark.parametrize("algorithm", ["fedavg", "fedprox", "fedopt", "fedper"])
def test_the_server_builds_the_jobs_own_initial_model_from_the_exported_config(algorithm, tmp_path):
    """NVFlare builds the global model from the exported config: it must be the job's model (its
    width, modalities and seed), weight for weight, not a default one."""
    from nvflare.fuel.utils.class_utils import instantiate_class

    job = tiny_job(algorithm, roi=(32, 32, 32), features=8, modalities=("t1ce", "flair"), seed=3)
    server = json.loads((export(job, tmp_path) / "app" / "config" / "config_fed_server.json").read_text())
    components = {c["id"]: c for c in server["components"]}
    config = components["persistor"]["args"]["model"]
    config = components[config] if isinstance(config, str) else config  # FedOpt refers to component "model"
    built = instantiate_class(config["path"], config["args"]).state_dict()
    expected = instantiate_class(job.server_model()["class_path"], job.server_model()["args"]).state_dict()
    assert list(built) == list(expected)
    assert all(torch.equal(built[k], expected[k]) for k in expected)


@pytest.mark.parametrize("algorithm", ["fedprox", "fedopt"])
def test_fedprox_and_fedopt_have_their_own_recipes(algorithm, tmp_path):
    folder = export(tiny_job(algorithm, roi=(32, 32, 32)), tmp_path)
    server = (folder / "app" / "config" / "config_fed_server.json").read_text()
    if algorithm == "fedprox":
        assert '"fedprox_mu": 0.01' in server
    else:
        assert "torch.optim.SGD" in server and "CrossSiteModelEval" in server
    with pytest.raises(ValueError, match="unknown algorithm"):
        tiny_job("fedsgd")


@pytest.mark.e2e
@pytest.mark.slow
def test_simulator_fedavg_two_sites_two_rounds_then_each_site_fine_tunes(fedavg_run):
    from fedseg.lightning_modules.module import SegmentationModule

    job, synth, run, results = fedavg_run
    server = run / "nvflare" / "fedavg" / "server" / "simulate_job"
    # per-site metrics of the global model arrived for both rounds, with case-count weights
    per_site = [r for r in results.rounds if r["site"] != "mean"]
    assert {(r["round"], r["site"]) for r in per_site} == {(0, "site-1"), (0, "site-2"), (1, "site-1"), (1, "site-2")}
    assert all(r["weight"] == 2.0 for r in per_site)  # 2 training cases each (NUM_STEPS_CURRENT_ROUND)
    assert all(0.0 <= r["val_dice"] <= 1.0 and "val_hd95_wt" in r for r in per_site)
    streamed = [json.loads(l) for l in (server / "metrics" / "site_metrics.jsonl").read_text().splitlines()]
    assert {s["site"] for s in streamed} == {"site-1", "site-2"} and {"val_dice", "train_loss"} <= {s["key"] for s in streamed}

    # the job's seed fixes the initial global model: what each site validated in round 1 is exactly
    # the seeded model built here (a second build gives the same weights)
    initial, again = (SegmentationModule(**job.study.module_args()).state_dict() for _ in range(2))
    assert all(torch.equal(initial[k], again[k]) for k in initial)
    round1 = {r["site"]: r["val_dice"] for r in per_site if r["round"] == 0}
    assert round1["site-1"] == pytest.approx(validate_state(initial, job, synth.datalists["site-1"]), abs=1e-6)

    # the global model changed: the final model differs from the initial one
    final = torch.load(server / "app_server" / "FL_global_model.pt", weights_only=True)["model"]
    assert any(not torch.equal(initial[k], final[k]) for k in initial if initial[k].is_floating_point())
    # and it learned: the final global model's Dice on the sites' validation cases (cross-site evaluation)
    # is well above the initial model's, which each site scored in round 1; so are the fine-tuned models
    assert_learned(round1, {s: m["val_dice"] for s, m in results.cross_site["SRV_FL_global_model.pt"].items()},
                   "FedAvg's final global model")
    assert_learned(round1, {s: m["val_dice"] for s, m in results.personal.items()}, "the fine-tuned models")

    # the best model is kept and loads into SegmentationModule (strict)
    best = SegmentationModule.load_from_checkpoint(results.checkpoints["best"], map_location="cpu")
    assert best.hparams.network == "unet" and tuple(best.hparams.preprocess["modalities"]) == ("t1", "t1ce", "t2", "flair")

    # cross-site evaluation: every model on every site
    assert set(results.cross_site) == {"SRV_FL_global_model.pt", "SRV_best_FL_global_model.pt", "site-1", "site-2"}
    assert all(set(by_site) == {"site-1", "site-2"} for by_site in results.cross_site.values())
    table = {(r["site"], r["region"]): r for r in results.final_table()}
    assert {("site-1", "ET"), ("site-2", "WT"), ("MEAN", "mean")} <= set(table)
    for name in ("results.json", "results.csv", "rounds.csv", "val_dice_per_round.png"):
        assert (run / name).stat().st_size > 100

    # then each site fine-tuned the final global model on its own cases, kept it and sent only its scores
    assert set(results.personal) == {"site-1", "site-2"}
    for site in ("site-1", "site-2"):
        kept = run / "heads" / site / "fedavg.finetune.pt"
        assert kept.is_file() and "fine-tuned the final global model for 2 epochs" in (
            run / "nvflare" / "fedavg" / site / "log.txt").read_text()
        assert 0.0 <= results.personal[site]["val_dice"] <= 1.0 and "val_dice_wt" in results.personal[site]
        # the fine-tuned model is not the global one: its score differs from the global model's on that site
        assert results.personal[site]["val_dice"] != pytest.approx(results.cross_site["SRV_FL_global_model.pt"][site]["val_dice"], abs=1e-7)
    payloads = json.loads((server / "metrics" / "personal_scores.json").read_text())
    assert payloads["failed"] == {} and payloads["missing"] == []
