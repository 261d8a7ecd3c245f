"""Issue 21, item 2: every file fedseg derives from patient data is owner-only (folders 0700, files
0600), under a permissive umask too: checkpoints of ``fedseg train``, predictions, evaluation and
score tables, ``fedseg personalize`` outputs and the results of a federated run."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch

from fedseg.cli import main
from conftest import tiny_synth, tiny_train_config


def modes(folder: Path) -> dict[str, int]:
    """``{relative path: mode}`` of ``folder`` and everything under it."""
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in [folder, *folder.rglob("*")]}


def assert_owner_only(folder: Path) -> None:
    found = modes(folder)
    assert len(found) > 1, f"{folder} is empty"
    wrong = {p: oct(m) for p, m in found.items() if m != (0o700 if (folder / p).is_dir() else 0o600)}
    assert not wrong, f"not owner-only under {folder}: {wrong}"


@pytest.fixture(scope="module")
def permissive_umask():
    """A umask that would make every file world-readable, as on many shared servers."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, permissive_umask):
    """``fedseg train``'s library call on one tiny synthetic site (24^3, 1 epoch)."""
    from fedseg.lightning_modules.training import train

    root = tmp_path_factory.mktemp("owner")
    synth = tiny_synth(root / "synth", sites=1, cases=3)
    run = root / "shared" / "run"  # "shared" exists with the umask's 0755, like a group scratch disk
    run.parent.mkdir()
    train(tiny_train_config([synth.datalists["site-1"]], run, epochs=1))
    return synth, run


def test_a_training_run_folder_is_owner_only(trained):
    _, run = trained
    assert (run / "checkpoints" / "best.ckpt").is_file() and (run / "metrics.csv").is_file()
    assert_owner_only(run)  # checkpoints, metrics, curves, config, cache
    assert stat.S_IMODE(run.parent.stat().st_mode) == 0o755  # a folder it did not make is left alone


def test_predictions_and_evaluation_tables_are_owner_only(trained, tmp_path, permissive_umask):
    from fedseg.lightning_modules.data.datalist import read_datalist
    from fedseg.lightning_modules.evaluation import evaluate_checkpoint
    from fedseg.lightning_modules.inference import load_model, predict_cases

    synth, run = trained
    data = read_datalist(synth.datalists["site-1"])
    checkpoint = run / "checkpoints" / "best.ckpt"
    written = predict_cases(load_model(checkpoint, device="cpu"), data.cases[:1], data.data_root, tmp_path / "pred")
    assert [p.path.parent for p in written] == [tmp_path / "pred"]
    assert_owner_only(tmp_path / "pred")

    result = evaluate_checkpoint(checkpoint, synth.datalists["site-1"], out=tmp_path / "eval", split="all",
                                 device="cpu")
    assert {"per_case_csv", "summary_json", "boxplot_et"} <= set(result.files)
    assert_owner_only(tmp_path / "eval")  # tables and matplotlib's box plots

    reference = data.data_root / data.cases[0].label
    assert main(["score", str(written[0].path), str(reference), "--out", str(tmp_path / "scores")]) == 0
    assert_owner_only(tmp_path / "scores")


def test_a_personalized_checkpoint_is_owner_only(tmp_path, permissive_umask):
    from fedseg.app.fedper import shared_state
    from fedseg.app.global_model import personal_keys
    from fedseg.app.personal_store import PersonalModelStore
    from fedseg.lightning_modules.module import SegmentationModule

    tiny = dict(network="unet", in_channels=4, features=4, roi_size=(16, 16, 16), hd95=False)
    module = SegmentationModule(**tiny)
    encoder = tmp_path / "encoder.ckpt"
    torch.save({"state_dict": shared_state(module), "hyper_parameters": dict(module.hparams)}, encoder)
    head = PersonalModelStore(tmp_path / "heads", "study").save(module, personal_keys(module), global_round=1)
    out = tmp_path / "models" / "site-1"
    assert main(["personalize", str(encoder), str(head), "--out", str(out / "personal.ckpt")]) == 0
    assert_owner_only(out)
    assert stat.S_IMODE((tmp_path / "models").stat().st_mode) == 0o700  # made for it: 0700 too


def test_federated_results_are_owner_only(tmp_path, permissive_umask):
    """The run folder's global checkpoints, tables and plots that ``collect_results`` writes from a
    server's job folder (its files as NVFlare and fedseg's server components write them)."""
    from fedseg.lightning_modules.module import SegmentationModule
    from fedseg.run.results import collect_results

    server = tmp_path / "server"
    (server / "metrics").mkdir(parents=True)
    (server / "app_server").mkdir()
    record = {"round": 0, "sites": [{"name": "site-1", "weight": 1.0, "metrics": [{"name": "val_dice", "value": 0.5}]}],
              "aggregated_metrics": [{"name": "val_dice", "value": 0.5}]}
    (server / "metrics" / "round_metrics.jsonl").write_text(json.dumps(record) + "\n")
    tiny = dict(network="unet", in_channels=4, features=4, roi_size=(16, 16, 16), hd95=False)
    torch.save({"model": SegmentationModule(**tiny).state_dict()}, server / "app_server" / "FL_global_model.pt")

    results = collect_results(server, tmp_path / "run", hyper_parameters=tiny)
    assert set(results.checkpoints) == {"final"}
    assert {"results.json", "results.csv", "rounds.csv", "val_dice_per_round.png"} <= set(modes(tmp_path / "run"))
    assert_owner_only(tmp_path / "run")


def test_split_datalists_are_owner_only(tmp_path, permissive_umask):
    """A split's datalists name every case and carry per-case tumour volumes (from the labels)."""
    synth = tiny_synth(tmp_path / "synth", sites=1, cases=4)
    out = tmp_path / "splits"
    data = next(iter(synth.datalists.values())).parent.parent / "data"
    assert main(["data", "split", str(data), "--sites", "2", "--mode", "dirichlet", "--out", str(out)]) == 0
    assert {"site-1.json", "site-2.json", "all.json", "summary.csv"} <= set(modes(out))
    assert "wt_volume_ml" in json.loads((out / "site-1.json").read_text())["meta"]
    assert_owner_only(out)
