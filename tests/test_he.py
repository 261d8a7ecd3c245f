"""FedAvg with homomorphic encryption (``fedseg.jobs.fedavg_he``, runtime parts in ``fedseg.app.he``).

The fast tests check the exported job (HE aggregator, shareable generator and serialize filter on
the server, HE encryptor/decryptor filters at the sites, NumPy on the wire) and the HE builder of
the POC project. The slow one runs the job in a real POC deployment with HE kits (2 sites,
``nvflare job submit``, about 110 s on 2 busy cores) and checks that the weights were encrypted
end to end: every update the server received was CKKS ciphertext, the global model the server
stored is ciphertext it cannot decrypt, and with a site's key it decrypts into a trained
``SegmentationModule`` whose scores equal the ones the sites computed in cross-site evaluation.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest

from conftest import TEST_DATA, LEARNING, assert_learned, tiny_job
from fedseg.jobs.base import Job
from fedseg.run.poc import COMPLETED, PocDeployment, free_port, port_in_use, project_config

SITES = ("hospital-a", "hospital-b")
#: the test's audit module (tests/he_audit.py) and the folder it is imported from
AUDIT_MODULE = "he_audit"
TESTS_DIR = Path(__file__).resolve().parent
HE_BUILDER = "nvflare.lighter.impl.he.HEBuilder"


@pytest.fixture
def tenseal() -> Any:
    """TenSEAL, which the ``he`` extra installs (part of ``dev``): a failure in CI, a skip elsewhere."""
    try:
        import tenseal as ts
    except ImportError as err:
        message = f"TenSEAL is not installed ({err}); pip install 'fedseg[he]'"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return ts


def tiny_he_job(**kw: Any) -> Job:
    return tiny_job("fedavg-he", **{"name": "fedavg_he", "rounds": 2, "features": 8, "roi": (24, 24, 24), **kw})


def export_he_job(job: Job, out: Path, audit: bool = True) -> Path:
    """Export ``job``; with ``audit`` the server also records how every update arrived (the test's
    ``he_audit.CiphertextAudit``: an installed package to the job, so the job carries no code; the
    deployment must let the server import it, ``audit_importable``)."""
    from he_audit import add_ciphertext_audit

    from fedseg import nvflare_internals
    from fedseg.jobs.base import build_recipe, in_app_dir

    recipe = build_recipe(job)
    if audit:
        add_ciphertext_audit(recipe)
        nvflare_internals.fed_job(recipe).set_app_packages(["fedseg", AUDIT_MODULE])
    with in_app_dir():
        recipe.export(str(out))
    return out / job.name


def _by_path(items: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {item["path"]: item for item in items}


# ------------------------------------------------------------------------------------------ fast


def test_he_recipe_exports_the_encrypted_fedavg_workflow(tmp_path, tenseal):
    job_dir = export_he_job(tiny_he_job(), tmp_path, audit=False)
    config = job_dir / "app" / "config"
    server = json.loads((config / "config_fed_server.json").read_text())
    client = json.loads((config / "config_fed_client.json").read_text())

    workflows = [w["path"].rsplit(".", 1)[1] for w in server["workflows"]]
    assert workflows == ["ScatterAndGather", "HECrossSiteEval"]
    components = {c["id"]: c for c in server["components"]}
    aggregator = "nvflare.app_opt.he.intime_accumulate_model_aggregator.HEInTimeAccumulateWeightedAggregator"
    assert components["aggregator"]["path"] == aggregator
    assert components["shareable_generator"]["path"].endswith("he.model_shareable_generator.HEModelShareableGenerator")
    assert components["persistor"]["args"]["filter_id"] == "model_serialize_filter"
    assert components["model_serialize_filter"]["path"].endswith("HEModelSerializeFilter")
    # fedseg's server parts are there too: val_dice selection weighed by cases, the metrics receiver.
    assert components["model_selector"]["args"]["key_metric"] == "val_dice"
    assert components["model_selector"]["args"]["weigh_by_local_iter"] is True
    assert "fedseg_metrics_receiver" in components

    # Sites: decrypt what arrives (train, validate), encrypt what leaves (train weighed by cases).
    # (The recipe registers the decryptor for a task set: its order in the file varies between exports.)
    data_filters = {frozenset(f["tasks"]): [x["path"] for x in f["filters"]] for f in client["task_data_filters"]}
    assert data_filters == {frozenset({"train", "validate"}): ["nvflare.app_opt.he.model_decryptor.HEModelDecryptor"]}
    result_filters = {frozenset(f["tasks"]): f["filters"] for f in client["task_result_filters"]}
    (train,) = result_filters[frozenset({"train"})]
    (submit,) = result_filters[frozenset({"submit_model"})]
    assert train["path"] == submit["path"] == "nvflare.app_opt.he.model_encryptor.HEModelEncryptor"
    assert train["args"].get("weigh_by_local_iter", True) is True and submit["args"]["weigh_by_local_iter"] is False
    # NumPy on the wire (the executor's default; "pytorch" would break the HE filters).
    (executor,) = client["executors"]
    assert executor["executor"]["args"].get("server_expected_format", "numpy") == "numpy"
    assert executor["executor"]["args"]["params_exchange_format"] == "pytorch"


def test_he_recipe_refuses_the_simulator(tenseal):
    from nvflare.recipe.sim_env import SimEnv

    from fedseg.jobs.base import build_recipe

    recipe = build_recipe(tiny_he_job(cross_site_eval=False))
    with pytest.raises(ValueError, match="does not support SimEnv"):
        recipe.process_env(SimEnv(num_clients=2))


def test_he_recipe_without_tenseal_names_the_install_command(monkeypatch):
    import sys

    from fedseg.jobs.base import build_recipe

    job = tiny_he_job()
    monkeypatch.setitem(sys.modules, "tenseal", None)  # `import tenseal` raises ImportError
    with pytest.raises(RuntimeError, match=r"pip install 'fedseg\[he\]'") as info:
        build_recipe(job)
    assert "import of tenseal halted" in str(info.value)  # the import error itself is named
    assert isinstance(info.value.__cause__, ImportError)


def test_poc_project_adds_the_he_builder_before_signing_only_when_asked():
    plain = [b["path"] for b in project_config("p", SITES, 9000)["builders"]]
    he = [b["path"] for b in project_config("p", SITES, 9000, he=True)["builders"]]
    assert HE_BUILDER not in plain
    assert he == [*plain[:-1], HE_BUILDER, plain[-1]] and plain[-1].endswith("SignatureBuilder")


# ------------------------------------------------------------------------------------------ POC


def _validate(state: dict[str, Any], job: Job, datalist: Path, out: Path) -> dict[str, float]:
    """Validate a global model on one site's validation cases, as the site script does."""
    from fedseg.lightning_modules.data.datalist import read_datalist
    from fedseg.lightning_modules.module import SegmentationModule
    from fedseg.lightning_modules.training import build_datamodule, make_trainer

    module = SegmentationModule(**job.study.module_args())
    module.load_state_dict(state, strict=True)
    data = build_datamodule(job.study, read_datalist(datalist), cache_dir=out / "cache")
    trainer = make_trainer(out, 1, progress=False, enable_checkpointing=False, logger=False)
    (metrics,) = trainer.validate(module, datamodule=data, verbose=False)
    return {k: float(v) for k, v in metrics.items()}


@pytest.mark.e2e
@pytest.mark.slow
def test_poc_fedavg_he_aggregates_ciphertexts_and_sites_decrypt_a_trained_model(tmp_path, tenseal, monkeypatch):
    import torch

    from he_audit import AUDIT_FILE

    from fedseg.app.he import decrypt_global_model, decrypt_state, load_context
    from fedseg.lightning_modules.data.synth import SynthConfig, generate
    from fedseg.lightning_modules.module import SegmentationModule

    # the deployment's processes inherit this environment: the server imports the test's audit from here
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")])))
    synth = generate(SynthConfig(**TEST_DATA, n_sites=2, cases_per_site=3, shape=(24, 24, 24)), tmp_path / "synth")
    datalists = dict(zip(SITES, (synth.datalists["site-1"], synth.datalists["site-2"])))
    n_train = {h: int(synth.site_stats[s]["n_train"]) for h, s in zip(SITES, ("site-1", "site-2"))}
    job = tiny_he_job(**LEARNING)  # learns in 2 rounds
    job_dir = export_he_job(job, tmp_path / "jobs")

    port = free_port()
    with PocDeployment(tmp_path / "poc", SITES, port=port, he=True) as poc:
        poc.prepare()
        # the test's own audit on the server: its admin allows that one class more (kits allow only
        # the classes fedseg's jobs name, fedseg.provisioning.site_control)
        resources = poc.server_kit / "local" / "resources.json"
        doc = json.loads(resources.read_text())
        doc["class_allow_list"].append(f"{AUDIT_MODULE}.CiphertextAudit")
        resources.write_text(json.dumps(doc))
        for site, datalist in datalists.items():
            poc.install_site_config(site, datalist)
        poc.start()
        job_id = poc.submit(job_dir)
        status = poc.wait(job_id, timeout=400)
        server = poc.download(job_id, tmp_path / "download") / "workspace"
        site_logs = {site: path.read_text(errors="replace") for site, path in poc.site_job_logs(job_id).items()}
        poc.stop()
    print("POC timings (s):", poc.timings)
    assert status == COMPLETED, (status, (server / "log.txt").read_text(errors="replace")[-3000:])
    assert poc.leftovers_killed == 0 and not poc.running_processes() and not port_in_use(port)

    # Kits: the sites share one CKKS key; the server's context holds no secret key.
    assert not load_context(poc.prod_dir / "server").has_secret_key()
    assert all(load_context(poc.site_kit(site)).has_secret_key() for site in SITES)

    # The server aggregated with the HE components, and each site encrypted (weighed by its cases)
    # every update it sent and decrypted the encrypted global model of round 2.
    server_log = (server / "log.txt").read_text(errors="replace")
    assert server_log.count("HEModelShareableGenerator - INFO") >= 2 and "shareable_to_learnable" in server_log
    assert "aggregating 2 update(s) at round 1" in server_log
    deployed = (server / "app_server" / "config" / "config_fed_server.json").read_text()
    assert "HEInTimeAccumulateWeightedAggregator" in deployed and "fedseg.app.he.HECrossSiteEval" in deployed
    for site, text in site_logs.items():
        assert text.count("Encryption time for") == 3, site  # 2 rounds + the cross-site submit_model
        assert f"weighting by local iter before encryption with {n_train[site]}" in text
        assert "Decryption time for" in text and "already decrypted" not in text

    # Every update the server received was ciphertext, every tensor of it: nothing in plain.
    reference = SegmentationModule(**job.study.module_args()).state_dict()  # keys, shapes and dtypes
    keys, n_params = set(reference), sum(v.numel() for v in reference.values())
    payloads = [json.loads(line) for line in (server / "metrics" / AUDIT_FILE).read_text().splitlines()]
    assert sorted((p["task"], p["site"]) for p in payloads) == sorted(
        [("train", s) for s in SITES] * 2 + [("submit_model", s) for s in SITES])
    for p in payloads:
        assert p["algorithm"] == "CKKS" and p["plain"] == [] and set(p["encrypted"]) == keys
        assert p["ciphertext_bytes"] > 4 * n_params  # larger than the float32 weights themselves
    print(f"HE payload per update: {payloads[0]['ciphertext_bytes'] / 1e6:.1f} MB for {n_params} weights "
          f"({4 * n_params / 1e6:.2f} MB in float32)")

    # The global model the server stored is ciphertext too (CKKS bytes, the keys marked processed).
    saved = torch.load(server / "app_server" / "FL_global_model.pt", map_location="cpu", weights_only=False)
    assert set(saved["model"]) == keys and all(isinstance(v, bytes) for v in saved["model"].values())
    assert saved["meta_props"]["PROCESSED_ALGORITHM"] == "CKKS" and all(saved["meta_props"]["PROCESSED_KEYS"].values())

    # Cross-site evaluation ran on decrypted models: every model scored at every site. The final
    # global model differs from the initial one: its loss at each site is not round 1's (which is
    # the site's validation of the initial global model).
    cross = json.loads((server / "cross_site_val" / "cross_val_results.json").read_text())
    assert set(cross) == set(SITES)
    rounds = [json.loads(line) for line in (server / "metrics" / "round_metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1]
    initial = {s["name"]: {m["name"]: m["value"] for m in s["metrics"]} for s in rounds[0]["sites"]}
    for site, scores in cross.items():
        assert {"SRV_FL_global_model.pt", "SRV_best_FL_global_model.pt", *SITES} <= set(scores)
        assert all(0.0 <= m["val_dice"] <= 1.0 for m in scores.values())
        assert scores["SRV_FL_global_model.pt"]["val_loss"] != pytest.approx(initial[site]["val_loss"], abs=1e-6)
    # and it learned: decrypted at the sites, the final global model scores well above the initial model
    assert_learned({site: initial[site]["val_dice"] for site in SITES},
                   {site: scores["SRV_FL_global_model.pt"]["val_dice"] for site, scores in cross.items()},
                   "encrypted FedAvg's final global model")

    # The aggregation is the case-weighted FedAvg: with a site's key, the final global model is the
    # weighted mean of the sites' last local models (which they submitted, encrypted, for cross-site
    # evaluation right after the last round), up to CKKS noise.
    from nvflare.apis.dxo import from_file
    from nvflare.app_opt.he import decomposers

    decomposers.register()  # FOBS: CKKSVector in the server's saved DXOs
    kit = poc.site_kit("hospital-a")
    final = decrypt_global_model(server / "app_server" / "FL_global_model.pt", kit, reference)
    shareables = server / "cross_site_val" / "model_shareables"
    local = {site: decrypt_state(from_file(str(shareables / site)).data, kit, reference) for site in SITES}
    total = sum(n_train.values())
    for key, value in final.items():
        if value.is_floating_point():
            mean = sum(n_train[site] * local[site][key].double() for site in SITES) / total
            assert torch.allclose(value.double(), mean, atol=1e-5), key
    assert any(not torch.allclose(local["hospital-a"][k], local["hospital-b"][k], atol=1e-4) for k in final)

    # With a site's key the final global model decrypts into a SegmentationModule that scores on
    # hospital-a exactly what hospital-a reported for it (up to CKKS noise).
    assert all(torch.isfinite(v).all() for v in final.values())
    metrics = _validate(final, job, datalists["hospital-a"], tmp_path / "validate")
    reported = cross["hospital-a"]["SRV_FL_global_model.pt"]
    assert math.isclose(metrics["val_loss"], reported["val_loss"], rel_tol=1e-4), (metrics, reported)
    assert math.isclose(metrics["val_dice"], reported["val_dice"], rel_tol=1e-3, abs_tol=1e-4), (metrics, reported)
