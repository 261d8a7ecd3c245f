"""The personalized methods' parts: head depth, FedRep's two phases, Ditto's proximal pull, the jobs.

Their simulator runs: FedPer then FedRep on the same heads (``test_fedper.py``), fine-tuning after
FedAvg (``test_jobs.py``), Ditto in a comparison (``test_compare.py``)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from conftest import tiny_job
from fedseg.app.global_model import SharedEncoder, personal_keys
from fedseg.app.personalization import HeadThenEncoder, ProximalTerm
from fedseg.jobs.base import export
from fedseg.lightning_modules.module import SegmentationModule

TINY = dict(features=4, roi_size=(16, 16, 16), hd95=False)


def test_head_depth_chooses_how_much_of_the_decoder_stays_at_the_site():
    module = SegmentationModule(**TINY)
    output, last, decoder = (set(personal_keys(module, head_depth=d)) for d in ("output", "last", "decoder"))
    assert output == {"network.net.model.2.conv.weight", "network.net.model.2.conv.bias"}
    assert output < last < decoder
    assert last - output == {f"network.net.model.1.submodule.2.{k}" for k in
                             ("conv.weight", "conv.bias", "adn.N.weight", "adn.N.bias", "adn.A.weight")}
    server = SharedEncoder(personal_head="output", **TINY).state_dict()
    assert set(server) == set(module.state_dict()) - output


def test_fedrep_trains_the_head_first_then_the_encoder():
    module = SegmentationModule(**TINY)
    head = personal_keys(module)
    phases = HeadThenEncoder(head, head_epochs=1)
    trainer = SimpleNamespace(current_epoch=4)  # the round's fit starts at epoch 4 (NVFlare extends the loop)
    phases.on_train_start(trainer, module)

    def trainable() -> set[str]:
        return {n for n, p in module.named_parameters() if p.requires_grad}

    phases.on_train_epoch_start(trainer, module)
    assert trainable() == set(head) & {n for n, _ in module.named_parameters()}
    trainer.current_epoch = 5
    phases.on_train_epoch_start(trainer, module)
    assert trainable() == {n for n, _ in module.named_parameters()} - set(head)
    phases.on_train_end(trainer, module)
    assert trainable() == {n for n, _ in module.named_parameters()}


def test_ditto_adds_the_gradient_of_its_proximal_term():
    layer = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -2.0]]))
    module = torch.nn.Module()
    module.layer = layer
    reference = {"layer.weight": torch.tensor([[0.5, 0.0]])}
    layer.weight.grad = torch.tensor([[0.1, 0.1]])
    ProximalTerm(reference, weight=0.5).on_before_optimizer_step(None, module, None)
    # d/dw lambda/2 ||w - w_ref||^2 = lambda (w - w_ref) = 0.5 * [0.5, -2]
    assert torch.allclose(layer.weight.grad, torch.tensor([[0.1 + 0.25, 0.1 - 1.0]]))


@pytest.mark.parametrize("algorithm", ["fedper", "fedrep", "ditto", "apfl", "select", "finetune"])
def test_personalized_jobs_end_with_the_personal_scores_and_tell_the_sites_their_options(algorithm, tmp_path):
    job = tiny_job(algorithm, local_epochs=2)
    folder = export(job, tmp_path)
    server = json.loads((folder / "app" / "config" / "config_fed_server.json").read_text())
    client = json.loads((folder / "app" / "config" / "config_fed_client.json").read_text())
    controller = next(w for w in server["workflows"] if w["id"] == "controller")
    assert controller["args"]["personalize"] is True
    site = client["executors"][0]["executor"]["args"]["job"]
    assert site["algorithm"] == algorithm and site["options"] == job.options_json()
    model = next(c for c in server["components"] if c["id"] == "persistor")["args"]["model"]
    encoder_only = algorithm in ("fedper", "fedrep")
    assert ("SharedEncoder" in json.dumps(model)) == encoder_only  # Ditto and fine-tuning average full models
    # and a plain FedAvg job has no final personal step
    plain = json.loads((export(tiny_job(name="plain"), tmp_path) / "app" / "config" / "config_fed_server.json").read_text())
    assert "personalize" not in next(w for w in plain["workflows"] if w["id"] == "controller")["args"]


def test_personalized_options_are_checked():
    from fedseg.jobs.ditto import DittoOptions
    from fedseg.jobs.fedper import FedPerOptions
    from fedseg.jobs.fedrep import FedRepOptions
    from fedseg.jobs.finetune import FineTuneOptions

    with pytest.raises(ValueError, match="head_epochs .* must be fewer than the round's local_epochs"):
        tiny_job("fedrep", local_epochs=1)
    with pytest.raises(ValueError, match="unknown personal_head 'half'"):
        FedPerOptions(personal_head="half")
    with pytest.raises(ValueError, match="head_epochs must be >= 1"):
        FedRepOptions(head_epochs=0)
    with pytest.raises(ValueError, match="ditto_lambda and personal_epochs must be >= 0"):
        DittoOptions(ditto_lambda=-1)
    with pytest.raises(ValueError, match="finetune_epochs must be >= 1"):
        FineTuneOptions(finetune_epochs=0)
    with pytest.raises(ValueError, match="ditto does not support groups"):
        from fedseg.jobs.addons import Addons, SiteGroups

        tiny_job("ditto", addons=Addons(groups=SiteGroups()))


def test_the_personal_model_store_reads_files_written_before_global_round_was_named(tmp_path):
    """A store file from before the rename (its record says ``encoder_round``) is still read, and a new
    save writes ``global_round``: the store holds Ditto's and fine-tuned whole models too, not only heads."""
    from fedseg.app.personal_store import PersonalModelStore

    module = SegmentationModule(**TINY)
    keys = list(module.state_dict())
    store = PersonalModelStore(tmp_path / "store", "study", kind="ditto")
    store.save(module, keys, global_round=4, job_id="job-1")
    saved = torch.load(store.path, weights_only=True)
    assert saved["record"]["global_round"] == 4 and "encoder_round" not in saved["record"]
    saved["record"]["encoder_round"] = saved["record"].pop("global_round")  # as an earlier fedseg wrote it
    torch.save(saved, store.path)
    record = store.load_into(SegmentationModule(**TINY), keys)
    assert (record.global_round, record.job_id) == (4, "job-1") and store.record().global_round == 4
