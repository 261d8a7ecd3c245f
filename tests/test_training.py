"""Centralized / local training: it learns, it resumes, it refuses bad data."""

from __future__ import annotations

import json

import pytest
import torch

from fedseg.cli import main
from fedseg.lightning_modules.data.synth import SynthConfig, generate
from fedseg.lightning_modules.history import read_rows
from fedseg.lightning_modules.module import SegmentationModule
from conftest import TEST_DATA, tiny_train_config
from fedseg.lightning_modules.training import train


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return generate(SynthConfig(**TEST_DATA, n_sites=2, cases_per_site=4, shape=(32, 32, 32)), tmp_path_factory.mktemp("s") / "synth")


def _cfg(synth, out, epochs=2, **kw):
    return tiny_train_config([synth.datalists["site-1"], synth.datalists["site-2"]], out, epochs=epochs,
                             **{"features": 8, "roi": (32, 32, 32), **kw})


@pytest.mark.slow
def test_training_learns_well_above_an_untrained_network(synth, tmp_path):
    results = train(_cfg(synth, tmp_path / "run", epochs=12))
    rows = read_rows(tmp_path / "run" / "metrics.csv")
    untrained = rows[0]["val_dice"]  # after one epoch: barely trained
    assert len(rows) == 12 and results["epochs_done"] == 12
    assert results["best_val_dice"] > 0.4, rows
    assert results["best_val_dice"] > untrained + 0.25
    # every region learns, not only the large whole tumour
    best = max(rows, key=lambda r: r["val_dice"])
    assert min(best["val_dice_et"], best["val_dice_tc"], best["val_dice_wt"]) > 0.2, best
    assert (tmp_path / "run" / "curves.png").stat().st_size > 1000


def test_resume_continues_from_last_checkpoint_and_keeps_history(synth, tmp_path):
    out = tmp_path / "run"
    train(_cfg(synth, out, epochs=2))
    first = read_rows(out / "metrics.csv")
    assert [r["epoch"] for r in first] == [0, 1]
    # "crash" after epoch 2, then run again with more epochs: it resumes, nothing is retrained
    results = train(_cfg(synth, out, epochs=3))
    rows = read_rows(out / "metrics.csv")
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert rows[:2] == first
    assert results["epochs_done"] == 3
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 3 * rows[0]["step"]  # 3 epochs of steps in all, not 2 + 3

    model = SegmentationModule.load_from_checkpoint(out / "checkpoints" / "best.ckpt", map_location="cpu")
    assert tuple(model.hparams.preprocess["modalities"]) == ("t1", "t1ce", "t2", "flair")
    assert json.loads((out / "results.json").read_text())["best_checkpoint"].endswith("best.ckpt")


def test_train_cli_refuses_data_that_fails_the_check(synth, tmp_path, capsys):
    data = tmp_path / "copy"
    import shutil

    shutil.copytree(synth.out, data)
    seg = sorted((data / "data").glob("site1*/*_seg.nii.gz"))[0]
    seg.write_bytes(seg.read_bytes()[:200])
    rc = main(["train", str(data / "datalists" / "site-1.json"), "--out", str(tmp_path / "run"), "--epochs", "1",
               "--profile", "tiny", "--features", "8", "--roi", "32"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "fails the dataset check" in err and seg.name in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_schedule_offset_continues_the_cosine_schedule_where_earlier_epochs_left_it():
    """A resumed federated study: the module starts at epoch 4 of a 10-epoch cosine schedule, with the
    learning rate an uninterrupted schedule has there, and goes on from it."""
    import math
    import warnings

    module = SegmentationModule(features=4, lr=1e-3, max_epochs=10, roi_size=(16, 16, 16), hd95=False)
    fresh = module.configure_optimizers()
    assert fresh["optimizer"].param_groups[0]["lr"] == pytest.approx(1e-3)

    parameter = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.AdamW([parameter], lr=1e-3)
    reference = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10)
    for _ in range(4):
        optimizer.step()
        reference.step()

    module.schedule_offset = 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the intended step-before-optimizer warning is silenced, nothing else
        resumed = module.configure_optimizers()
    optimizer, scheduler = resumed["optimizer"], resumed["lr_scheduler"]["scheduler"]
    assert scheduler.last_epoch == 4
    assert optimizer.param_groups[0]["lr"] == pytest.approx(reference.get_last_lr()[0], rel=1e-9)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * (1 + math.cos(math.pi * 4 / 10)) / 2, rel=1e-9)
    optimizer.step()
    scheduler.step()
    reference.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(reference.get_last_lr()[0], rel=1e-9)


def test_init_seed_fixes_the_initial_weights_and_leaves_the_global_generator_alone():
    from fedseg.app.site_runner import site_seed

    build = lambda seed: SegmentationModule(features=4, roi_size=(16, 16, 16), hd95=False, init_seed=seed).state_dict()  # noqa: E731
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    first, second, other = build(7), build(7), build(8)
    assert torch.equal(torch.rand(3), expected_draw)  # building seeded modules drew nothing from it
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first if first[k].is_floating_point())
    # sites get distinct, stable seeds from the job's seed
    assert site_seed(0, "site-1") == site_seed(0, "site-1") != site_seed(0, "site-2")
    assert site_seed(5, "site-1") == site_seed(0, "site-1") + 5
