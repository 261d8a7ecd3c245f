"""APFL: a local model and a learned mixing weight per site, mixed with the global model's outputs.

Unit tests of the mixture and of one site's personal phase on tiny volumes, and one simulator run
(2 sites, 2 rounds) showing that the sites report personal scores and that no part of a local model
or mixing weight reaches the server."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from conftest import tiny_job, tiny_synth

TINY = dict(features=4, roi_size=(16, 16, 16), hd95=False)


def _mixed(alpha: float = 0.5, alpha_lr: float = 0.01, **args):
    from fedseg.app.apfl import MixedSegmentation

    return MixedSegmentation(apfl_alpha=alpha, apfl_alpha_lr=alpha_lr, **{**TINY, **args})


def test_the_mixture_mixes_the_outputs_and_freezes_the_global_model():
    module = _mixed(alpha=0.25)
    with torch.no_grad():  # the two networks differ
        for p in module.network.local.parameters():
            p.add_(0.1 * torch.randn_like(p))
    image = torch.randn(1, 4, 16, 16, 16)
    module.eval()
    v, w = module.network.local(image), module.network.global_model(image)
    assert not torch.allclose(v, w)
    assert torch.allclose(module(image), 0.25 * v + 0.75 * w, atol=1e-6)
    module.train()
    assert module.network.local.training and not module.network.global_model.training
    assert not any(p.requires_grad for p in module.network.global_model.parameters())
    # what stays at the site: the local network and alpha, not the global copy
    keys = module.personal_keys()
    assert "network.alpha" in keys and all(k.startswith(("network.local.", "network.alpha")) for k in keys)
    assert len(keys) == 1 + len(module.network.local.state_dict())


def test_alpha_takes_its_own_clipped_step_and_adamw_leaves_it_alone():
    module = _mixed(alpha=0.5, alpha_lr=0.1)
    alpha = module.network.alpha
    alpha.grad = torch.tensor(2.0)
    module.on_before_optimizer_step(None)
    assert module.alpha == pytest.approx(0.3) and alpha.grad is None  # 0.5 - 0.1 * 2
    alpha.grad = torch.tensor(-100.0)
    module.on_before_optimizer_step(None)
    assert module.alpha == 1.0  # clipped
    alpha.grad = torch.tensor(float("inf"))  # an AMP overflow: no step
    module.on_before_optimizer_step(None)
    assert module.alpha == 1.0


def test_apfl_options_are_checked_and_reach_the_site_plugin():
    from fedseg.jobs.apfl import ApflOptions
    from fedseg.jobs.base import algorithm

    with pytest.raises(ValueError, match=r"apfl_alpha must be in \[0, 1\]"):
        ApflOptions(apfl_alpha=1.5)
    with pytest.raises(ValueError, match="apfl_alpha_lr and personal_epochs must be >= 0"):
        ApflOptions(apfl_alpha_lr=-0.1)
    plugin = algorithm("apfl").make_site_plugin({"apfl_alpha": 0.8, "personal_epochs": 3})
    assert (plugin.apfl_alpha, plugin.apfl_alpha_lr, plugin.personal_epochs) == (0.8, 0.01, 3)
    assert algorithm("apfl").personal and algorithm("apfl").personal_keys(tiny_job("apfl")) == []


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A fake site runner on 3 synthetic 24^3 cases: what ``ApflPlugin`` reads from a ``SiteRunner``."""
    from fedseg.app.site_runner import SiteJob
    from fedseg.lightning_modules.data.datalist import read_datalist
    from fedseg.lightning_modules.module import SegmentationModule
    from fedseg.lightning_modules.training import build_datamodule

    root = tmp_path_factory.mktemp("apfl")
    synth = tiny_synth(root / "synth", sites=1, cases=3, size=24)
    job = tiny_job("apfl", lr=0.03)
    study = job.study
    datamodule = build_datamodule(study, read_datalist(synth.datalists["site-1"]), None)
    site_job = SiteJob(algorithm="apfl", options=job.options_json(), study=study, study_name="study")

    def runner(store):
        return SimpleNamespace(job=site_job, site="site-1", job_id="job-1", datamodule=datamodule,
                               model=SegmentationModule(**study.module_args()),
                               config=SimpleNamespace(head_store=store), test_datalist=synth.test_datalists["site-1"])
    return runner


def test_a_round_trains_v_and_alpha_keeps_them_in_the_store_and_leaves_the_global_model_alone(site, tmp_path,
                                                                                              monkeypatch):
    from fedseg.app.apfl import ApflPlugin
    from fedseg.app.personal_store import PersonalModelStore
    from fedseg.jobs.apfl import ApflOptions

    monkeypatch.chdir(tmp_path)  # the personal phase's trainer folder
    runner = site(tmp_path / "store")
    plugin = ApflPlugin(ApflOptions(apfl_alpha=0.5, apfl_alpha_lr=0.5, personal_epochs=2))
    plugin.setup(runner)
    site_model = {k: v.clone() for k, v in runner.model.state_dict().items()}
    received = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v.clone() for k, v in site_model.items()}
    plugin.after_round(runner, SimpleNamespace(params=received, current_round=0))

    mixed = plugin.model
    alpha = mixed.alpha
    assert alpha != 0.5 and 0.0 <= alpha <= 1.0, alpha  # alpha moved, and stays a weight
    # the global model is untouched: the site's own copy (what it sends) and the frozen copy in the mixture
    assert all(torch.equal(runner.model.state_dict()[k], site_model[k]) for k in site_model)
    global_copy = mixed.network.global_model.state_dict()
    assert all(torch.equal(global_copy[k.removeprefix("network.")], received[k]) for k in received)
    # v started from the received global model and trained
    local = mixed.network.local.state_dict()
    assert any(not torch.equal(local[k.removeprefix("network.")], received[k]) for k in received
               if received[k].is_floating_point())
    # the store holds exactly v and alpha (owner-only, like every personal model)
    store = PersonalModelStore(tmp_path / "store", "study", kind="apfl")
    saved = torch.load(store.path, weights_only=True)
    assert sorted(saved["state"]) == sorted(mixed.personal_keys())
    assert float(saved["state"]["network.alpha"]) == pytest.approx(alpha)
    assert store.path.stat().st_mode & 0o077 == 0 and saved["record"]["global_round"] == 0
    # a failed round drops what it half-changed: back to the stored v and alpha
    with torch.no_grad():
        mixed.network.alpha.fill_(0.0)
    plugin.after_failure(runner)
    assert mixed.alpha == pytest.approx(alpha)

    # a new process of the same study picks v and alpha up again; its personal model is the
    # mixture with the final global model, scored like any model
    again = ApflPlugin(ApflOptions(apfl_alpha=0.5))
    again.setup(site(tmp_path / "store"))
    assert again.started and again.model.alpha == pytest.approx(alpha)
    personal = again.personal_model(runner, SimpleNamespace(params=site_model, current_round=1))
    assert personal is again.model
    assert all(torch.equal(personal.network.global_model.state_dict()[k.removeprefix("network.")], site_model[k])
               for k in site_model)
    from fedseg.lightning_modules.training import make_trainer

    trainer = make_trainer(tmp_path / "personal", 1, logger=False, progress=False, enable_checkpointing=False)
    (metrics,) = trainer.validate(personal, datamodule=runner.datamodule, verbose=False)
    assert 0.0 <= metrics["val_dice"] <= 1.0
    # and on the site's held-out test cases, as the personalize task scores it (the mixture segments)
    from fedseg.lightning_modules.test_sets import score_test_set

    scores = score_test_set(personal, runner.test_datalist, metrics=("dice",))
    assert scores.n_cases == 2 and 0.0 <= scores.mean["overall"]["dice"] <= 1.0


def _audited(server) -> list[dict]:
    return [json.loads(line) for line in (server / "metrics" / "payload_keys.jsonl").read_text().splitlines()]


@pytest.mark.e2e
@pytest.mark.slow
def test_simulator_apfl_sites_report_personal_scores_and_keep_v_and_alpha(tmp_path):
    from fedseg.app.personal_store import PersonalModelStore
    from fedseg.jobs.apfl import ApflOptions
    from fedseg.run.simulate import simulate

    synth = tiny_synth(tmp_path / "synth", sites=2, cases=3)
    job = tiny_job("apfl", rounds=2, options=ApflOptions(apfl_alpha_lr=0.5), cross_site_eval=False)
    results = simulate(job, synth.datalists, tmp_path / "run")

    assert set(results.personal) == {"site-1", "site-2"}
    assert all(0.0 <= results.personal[s]["val_dice"] <= 1.0 for s in results.personal)
    server = tmp_path / "run" / "nvflare" / "apfl" / "server" / "simulate_job"
    payloads = _audited(server)
    trained = [p for p in payloads if p["task"] == "train"]
    assert len(trained) == 4 and all(p["keys"] for p in trained)  # 2 rounds x 2 sites, with the weights' names
    assert all(p["kind"] == "DataKind.METRICS" and all(k.startswith("val_") for k in p["keys"])
               for p in payloads if p["task"] == "personalize")
    assert {p["site"] for p in payloads if p["task"] == "personalize"} == {"site-1", "site-2"}
    for site in ("site-1", "site-2"):
        store = PersonalModelStore(tmp_path / "run" / "heads" / site, "apfl", kind="apfl")
        state = torch.load(store.path, weights_only=True)["state"]
        assert "network.alpha" in state and 0.0 <= float(state["network.alpha"]) <= 1.0
        personal = set(state)
        assert not any(personal & set(p["keys"]) for p in payloads), "a part of v or alpha reached the server"
        assert not any(k.startswith(("network.local.", "network.alpha")) for p in payloads for k in p["keys"])
        assert store.record().global_round == 1
        log = (tmp_path / "run" / "nvflare" / "apfl" / site / "log.txt").read_text()
        assert "APFL mixing weight alpha=" in log
    saved = torch.load(server / "app_server" / "FL_global_model.pt", weights_only=False)["model"]
    assert saved and not any(k.startswith(("network.local.", "network.alpha")) for k in saved)


def test_fedseg_personalize_refuses_an_apfl_store_file(tmp_path):
    """APFL's personal model is two networks and a weight, not one checkpoint (docs/training.md)."""
    from fedseg.app.fedper import personalize
    from fedseg.app.personal_store import PersonalModelStore
    from fedseg.lightning_modules.module import SegmentationModule

    final = SegmentationModule(**TINY)
    torch.save({"state_dict": final.state_dict(), "hyper_parameters": dict(final.hparams)}, tmp_path / "final.ckpt")
    mixed = _mixed()
    store = PersonalModelStore(tmp_path / "store", "study", kind="apfl")
    store.save(mixed, mixed.personal_keys(), global_round=1)
    with pytest.raises(ValueError, match="unexpected .'network.alpha'"):
        personalize(tmp_path / "final.ckpt", store.path, tmp_path / "out.ckpt")
    assert not (tmp_path / "out.ckpt").exists()
