"""Resilient rounds, site failures, atomic global checkpoints and resume (simulator and units).

The POC scenarios (a killed site, a restarted site, a stop below the minimum) are in
``test_poc_resilience.py``.
"""

from __future__ import annotations

import json
import re
import os
from pathlib import Path

import pytest
import torch

from fedseg.app.fault_drill import FaultDrill
from conftest import TEST_DATA, tiny_job
from fedseg.jobs.addons import Addons
from fedseg.jobs.base import export
from fedseg.jobs.resume import ResumeError, find_resume_point
from offline_validation import validate_checkpoint


def test_fault_drill_is_read_from_the_site_config_and_checked():
    assert FaultDrill.from_site_config({}) is None
    drill = FaultDrill.from_site_config({"fault_drill": {"raise_in_rounds": [2, 3]}})
    assert drill is not None and drill.raise_in_rounds == {2, 3}
    hang = FaultDrill.from_site_config({"fault_drill": {"hang_in_rounds": [3], "hang_seconds": 5}})
    assert hang is not None and hang.hang_in_rounds == {3} and hang.raise_in_rounds == set() and hang.hang_seconds == 5
    with pytest.raises(ValueError, match=r"/site/fedseg_site.json: fault_drill 'raise_in_rounds' must be a list"):
        FaultDrill.from_site_config({"fault_drill": {"raise_in_rounds": [0]}}, "/site/fedseg_site.json")
    with pytest.raises(ValueError, match="fault_drill takes"):
        FaultDrill.from_site_config({"fault_drill": {"crash": [1]}}, "x.json")
    with pytest.raises(ValueError, match="needs 'raise_in_rounds' or 'hang_in_rounds'"):
        FaultDrill.from_site_config({"fault_drill": {"hang_seconds": 3}}, "x.json")
    # seconds per round: slow in one round, hung for good in another
    per_round = FaultDrill.from_site_config({"fault_drill": {"hang_in_rounds": [3, 5], "hang_seconds": {"3": 40, "5": 600}}})
    assert per_round is not None and (per_round.seconds_in(3), per_round.seconds_in(5)) == (40, 600)
    with pytest.raises(ValueError, match=r"names no seconds for hang round\(s\) \[5\]"):
        FaultDrill.from_site_config({"fault_drill": {"hang_in_rounds": [3, 5], "hang_seconds": {"3": 40}}}, "x.json")
    with pytest.raises(ValueError, match="x.json: fault_drill 'hang_seconds' must be a positive number"):
        FaultDrill.from_site_config({"fault_drill": {"hang_in_rounds": [3], "hang_seconds": {"3": -1}}}, "x.json")


def test_round_settings_are_checked_and_exported_into_the_server_workflow(tmp_path):
    with pytest.raises(ValueError, match="exceeds min_clients"):
        tiny_job(min_clients=2, min_sites_per_round=3)
    with pytest.raises(ValueError, match=">= 0"):
        tiny_job(round_timeout=-1)
    folder = export(tiny_job(name="r", min_clients=3, min_sites_per_round=2, round_timeout=90), tmp_path)
    server = json.loads((folder / "app" / "config" / "config_fed_server.json").read_text())
    controller = next(w for w in server["workflows"] if w["id"] == "controller")
    assert controller["path"] == "fedseg.app.resilient_fedavg.ResilientFedAvg"
    assert controller["args"]["round_timeout"] == 90 and controller["args"]["min_sites"] == 2
    evaluation = next(w for w in server["workflows"] if "CrossSiteModelEval" in w["path"])
    assert evaluation["args"]["submit_model_timeout"] == 90  # a vanished site cannot hold it up either
    # the global model is written by NVFlare's PTFileModelPersistor, whose atomic write is pinned below
    persistor = next(c for c in server["components"] if c["id"] == "persistor")
    assert persistor["path"] == "nvflare.app_opt.pt.file_model_persistor.PTFileModelPersistor"


def test_nvflare_persistor_never_leaves_a_half_written_global_checkpoint(tmp_path, monkeypatch):
    """Pins the library behaviour fedseg relies on (nvflare/app_opt/pt/file_model_persistor.py)."""
    from nvflare.app_opt.pt.file_model_persistor import PTFileModelPersistor
    from nvflare.app_opt.pt.model_persistence_format_manager import PTModelPersistenceFormatManager

    path = tmp_path / "FL_global_model.pt"
    persistor = PTFileModelPersistor()
    first = {"w": torch.ones(4)}
    persistor.persistence_manager = PTModelPersistenceFormatManager(dict(first))
    persistor.save_model_file(str(path))

    real_save = torch.save

    def crash_mid_write(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.truncate(10)  # a torn write ...
        raise OSError("disk full")  # ... and the process dies

    persistor.persistence_manager = PTModelPersistenceFormatManager({"w": torch.zeros(4)})
    monkeypatch.setattr(torch, "save", crash_mid_write)
    with pytest.raises(OSError, match="disk full"):
        persistor.save_model_file(str(path))
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.equal(torch.load(path, weights_only=True)["model"]["w"], first["w"])  # the old model, whole
    assert os.listdir(tmp_path) == ["FL_global_model.pt"]  # no temporary file left behind


def test_resume_point_errors_name_the_path_and_the_problem(tmp_path):
    with pytest.raises(ResumeError, match="no such checkpoint file or run folder"):
        find_resume_point(tmp_path / "missing")
    with pytest.raises(ResumeError, match="no FL_global_model.pt found"):
        find_resume_point(tmp_path)
    bad = tmp_path / "FL_global_model.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ResumeError, match="not a readable PyTorch checkpoint"):
        find_resume_point(bad)
    torch.save({"model": {"w": torch.ones(1)}}, bad)
    with pytest.raises(ResumeError, match="does not say which round"):
        find_resume_point(tmp_path)
    torch.save({"model": {"w": torch.ones(1)}, "meta_props": {"current_round": 4}}, bad)
    assert find_resume_point(tmp_path).rounds_done == 5
    with pytest.raises(ValueError, match="already holds 5 rounds"):
        export(tiny_job(name="done", rounds=5, addons=Addons(resume_from=str(tmp_path))), tmp_path / "out")


@pytest.mark.e2e
@pytest.mark.slow
def test_simulator_site_failures_stop_below_the_minimum_and_the_study_resumes_from_the_checkpoint(tmp_path):
    """FedOpt (FedAvgM: the resilient round with a server optimizer). Round 2: site-3 crashes
    (averaged without it); round 3: site-2 and site-3 crash, 1 < 2 answers: the job stops with the
    reason. The resumed job continues from the round-2 checkpoint and the optimizer's momentum."""
    from fedseg.lightning_modules.data.synth import SynthConfig, generate
    from fedseg.run.simulate import simulate

    synth = generate(SynthConfig(**TEST_DATA, n_sites=3, cases_per_site=3, shape=(24, 24, 24)), tmp_path / "synth")
    job = tiny_job("fedopt", name="study", rounds=3, min_clients=3, min_sites_per_round=2, round_timeout=120,
                   features=8, roi=(24, 24, 24), cross_site_eval=False)
    drills = {"site-2": {"fault_drill": {"raise_in_rounds": [3]}}, "site-3": {"fault_drill": {"raise_in_rounds": [2, 3]}}}
    first = tmp_path / "first"
    simulate(job, synth.datalists, first, site_settings=drills)

    server = first / "nvflare" / "study" / "server" / "simulate_job"
    summary = json.loads((server / "metrics" / "participation_summary.json").read_text())
    assert summary["status"] == "stopped" and summary["rounds_run"] == [1, 2, 3]
    assert summary["reason"].startswith("round 3: only 1 of the 2 sites needed answered")
    assert "site-2 failed (FaultDrillError)" in summary["reason"] and "site-3 failed (FaultDrillError)" in summary["reason"]
    assert summary["sites"]["site-3"]["rounds_missed"] == [2, 3] and summary["sites"]["site-2"]["rounds_missed"] == [3]
    assert summary["sites"]["site-1"]["rounds_missed"] == []
    rounds = [json.loads(l) for l in (server / "metrics" / "participation.jsonl").read_text().splitlines()]
    assert rounds[1]["answered"] == ["site-1", "site-2"] and rounds[1]["failed"] == {"site-3": "FaultDrillError"}
    # round 2 was averaged and saved; round 3 was not (too few answers): the checkpoint holds 2 rounds
    point = find_resume_point(first)
    assert point.rounds_done == 2
    checkpoint = tmp_path / "round2.pt"
    checkpoint.write_bytes(point.checkpoint.read_bytes())
    server_log = (first / "nvflare" / "study" / "server" / "log.txt").read_text()
    assert summary["reason"] in server_log
    # the server optimizer made both rounds' global models, on every trainable parameter
    from fedseg.app.resilient_fedopt import OPTIMIZER_STATE_FILE
    from fedseg.lightning_modules.module import SegmentationModule

    n_params = len(list(SegmentationModule(**job.study.module_args()).parameters()))
    for k in (0, 1):
        assert f"server model update round {k}, " in server_log and f"fedopt layers: {n_params}, fedavg layers: 0" in server_log
    assert (point.checkpoint.parent / OPTIMIZER_STATE_FILE).is_file()  # its momentum, beside the checkpoint

    # resume without the drills: only round 3 runs, starting from the round-2 global model
    second = tmp_path / "second"
    resumed = job.replace(addons=Addons(resume_from=str(first)))
    results = simulate(resumed, synth.datalists, second)
    server = second / "nvflare" / "study" / "server" / "simulate_job"
    summary = json.loads((server / "metrics" / "participation_summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds_run"] == [3]
    # read on the server from beside the checkpoint (a job carries no files)
    assert re.search(r"server optimizer state of round 2 restored from /\S*/fedopt_optimizer\.pt",
                     (second / "nvflare" / "study" / "server" / "log.txt").read_text())
    assert find_resume_point(second).rounds_done == 3
    # what each site validated at the start of round 3 is exactly the round-2 checkpoint (not a fresh model)
    received = {r["site"]: r["val_dice"] for r in results.rounds if r["site"] != "mean"}
    assert set(received) == {"site-1", "site-2", "site-3"} and {r["round"] for r in results.rounds} == {2}
    expected = validate_checkpoint(checkpoint, job, synth.datalists["site-1"])
    assert received["site-1"] == pytest.approx(expected, abs=1e-6)
    # and each site's cosine learning-rate schedule goes on from epoch 2 of 3 instead of restarting
    for site in ("site-1", "site-2", "site-3"):
        log = (second / "nvflare" / "study" / site / "log.txt").read_text()
        assert "round 3/3 " + site + ": learning-rate schedule continues at epoch 2 of 3" in log


def test_a_study_resumed_into_a_new_folder_goes_on_with_the_sites_personal_models(tmp_path):
    from types import SimpleNamespace

    from fedseg.cli.simulate import _earlier_heads

    first = tmp_path / "first"
    checkpoint = first / "nvflare" / "fedper" / "server" / "abc" / "app_server" / "FL_global_model.pt"
    checkpoint.parent.mkdir(parents=True)
    torch.save({"model": {"w": torch.ones(1)}, "meta_props": {"current_round": 2}}, checkpoint)
    job = SimpleNamespace(addons=Addons(resume_from=str(first)))
    assert _earlier_heads(job, tmp_path / "second") is None  # the first run kept no personal models
    (first / "heads" / "site-1").mkdir(parents=True)
    assert _earlier_heads(job, tmp_path / "second") == first / "heads"
    assert _earlier_heads(job, first) is None  # resumed in place: simulate's own default already is first/heads
    assert _earlier_heads(SimpleNamespace(addons=Addons()), tmp_path / "second") is None
