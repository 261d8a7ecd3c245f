"""POC mode, 3 sites: FedAvg with the real ``nvflare`` CLI, and a hospital that crashes, drops out or
refuses its data neither stops, hangs nor leaks anything to the server.

One POC deployment (real server and site processes, mutual TLS, ``nvflare job submit``) runs:

0. the federated statistics job (``jobs/stats``'s definition): per site, only aggregates arrive;
1. a 3-round FedAvg job in which hospital-b's training raises in round 2 (a fault drill in its own
   site config) and every process of hospital-c is killed with SIGKILL during round 3 (while a
   drill holds its training, so that the kill surely lands mid-round): the job
   completes, the report names both sites and the rounds they missed, and the round with
   hospital-c missing ends within the round timeout. Its round 1 (every site) is case-weighted, the sites' metrics are streamed, and every model is
   scored on the sites that ran the evaluation. (A restarted site is back in the next job: the
   study's fault matrix, ``tests/test_study.py``, covers that and a study resumed from the server's
   store; ``tests/test_resilience.py`` covers a job resumed from a checkpoint);
2. a job that needs all 3 sites per round, W&B on, with a truncated image in hospital-a's data: the
   site refuses its data at start-up, the study stops at once naming "hospital-a refused its data
   (DatasetCheckError)", and nothing on the server's side (its kit, job and snapshot storage, the
   downloaded job, the W&B runs) holds a case id, a data path or a site's error message, although
   hospital-a writes all of them into its ``error_log.txt``, the file NVFlare's site-log streaming
   would send to the server (off in every kit).
"""

from __future__ import annotations

from conftest import TEST_DATA

import json
import math
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

import conftest
from fedseg.jobs.addons import Addons
from fedseg.jobs.base import Job, export
from fedseg.lightning_modules.data.synth import SynthConfig, generate
from fedseg.run.deployment import processes_matching
from fedseg.run.poc import COMPLETED, PocDeployment

SITES = ("hospital-a", "hospital-b", "hospital-c")
ABNORMAL = "FINISHED:ABNORMAL"
ROUND_TIMEOUT = 25  # above a tiny round with the sites' start-up on 2 busy cores (~20 s)


def tiny_job(name: str, **kw) -> Job:
    settings = dict(features=8, roi=(24, 24, 24), min_clients=3, min_sites_per_round=2, round_timeout=ROUND_TIMEOUT)
    settings.update(kw)
    return conftest.tiny_job(name=name, **settings)


def wait_for_line(path_of, text: str, timeout: float) -> None:
    """Poll until the file ``path_of()`` returns contains ``text``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = path_of()
        if path and path.is_file() and text in path.read_text(errors="replace"):
            return
        time.sleep(0.5)
    raise AssertionError(f"{text!r} did not appear in {path_of()} within {timeout} s")


def kill_site_processes(poc: PocDeployment, site: str) -> list[int]:
    """SIGKILL the site's NVFlare processes (client parent and job process); its kit's start loop
    (``sub_start.sh``) stays and restarts the client, as a hospital's service manager would."""
    kit = str(poc.site_kit(site))
    victims = [pid for pid, cmd in processes_matching([kit]) if "python" in cmd and "sub_start.sh" not in cmd]
    assert victims, f"no running process of {site}"
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    return victims


def job_log(poc: PocDeployment, site: str, job_id: str):
    return lambda: poc.site_kit(site) / job_id / "log.txt"


def send_every_log_record_to_the_error_log(kit: Path) -> None:
    """From the next job on, the site writes every log record (its fedseg lines and tracebacks too) into
    its job's ``error_log.txt``: the file NVFlare's site-log streaming sends to the server."""
    local = kit / "local"
    config = json.loads((local / "log_config.json.default").read_text())
    config["handlers"]["errorFileHandler"]["level"] = "DEBUG"
    (local / "log_config.json").write_text(json.dumps(config, indent=2))


def server_storage(server_kit: Path) -> tuple[Path, Path]:
    """The server's job storage and snapshot storage, as its kit's resources name them."""
    local = server_kit / "local"
    resources = json.loads(next(p for p in (local / "resources.json", local / "resources.json.default")
                                if p.is_file()).read_text())
    components = {c["id"]: c for c in resources["components"]}
    jobs = components["job_manager"]["args"]["uri_root"]
    snapshots = resources["snapshot_persistor"]["args"]["storage"]["args"]["root_dir"]
    return Path(jobs), Path(snapshots)


def read_report(download: Path) -> tuple[list[dict], dict]:
    metrics = download / "workspace" / "metrics"
    rounds = [json.loads(l) for l in (metrics / "participation.jsonl").read_text().splitlines()]
    return rounds, json.loads((metrics / "participation_summary.json").read_text())


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.faults  # a POC fault deployment: `make test-faults`, which CI runs after `make test`
@pytest.mark.timeout(900)
def test_poc_fedavg_survives_a_crash_a_killed_site_and_a_site_that_refuses_its_data(tmp_path):
    synth = generate(SynthConfig(**TEST_DATA, n_sites=3, cases_per_site=3, shape=(24, 24, 24)), tmp_path / "synth")
    datalists = dict(zip(SITES, synth.datalists.values()))
    n_train = {h: int(synth.site_stats[s]["n_train"]) for h, s in zip(SITES, synth.datalists)}
    home_config = _user_nvflare_config()
    jobs = tmp_path / "jobs"
    with PocDeployment(tmp_path / "poc", SITES) as poc:
        poc.prepare()
        for site, datalist in datalists.items():
            extra = {
                "hospital-b": {"fault_drill": {"raise_in_rounds": [2]}},
                "hospital-c": {"fault_drill": {"hang_in_rounds": [3], "hang_seconds": 600}},
            }.get(site, {})
            poc.install_site_config(site, datalist, cache_dir=tmp_path / "cache" / site, **extra)
        poc.start()

        # --- 0. federated statistics of the sites' images: aggregates per site, histograms per modality
        from fedseg.app.site_statistics import CASES, VOXELS
        from fedseg.jobs.stats import StatsSettings, export_stats
        from fedseg.run.statistics import collect_stats

        job_id = poc.submit(export_stats(jobs, StatsSettings(min_count=2)))  # 3 cases a site
        assert poc.wait(job_id, timeout=300) == COMPLETED
        stats = collect_stats(poc.download(job_id, tmp_path / "download") / "workspace", tmp_path / "stats")
        assert stats.sites == sorted(SITES)
        for site in SITES:
            assert stats.value("wt_ml", "count", site, CASES) == 3 and stats.value("wt_ml", "mean", site, CASES) > 0
            for modality in ("t1", "t1ce", "t2", "flair"):
                histogram = stats.value(modality, "histogram", site, VOXELS)
                assert len(histogram) == 40 and sum(count for _, _, count in histogram) > 1000
        assert (tmp_path / "stats" / "stats_intensity.png").stat().st_size > 10000

        # --- 1. a crash in hospital-b's round 2, hospital-c killed in round 3: the job completes
        job_id = poc.submit(export(tiny_job("resilient", rounds=3), jobs))
        wait_for_line(job_log(poc, "hospital-c", job_id), "training hangs for 600 s in round 3", timeout=240)
        killed = kill_site_processes(poc, "hospital-c")
        status = poc.wait(job_id, timeout=600)
        # Every round and the cross-site evaluation ran. NVFlare 2.9 may still label the job ABNORMAL:
        # once the server's job process has ended, the restarted hospital-c reports that it lacks the
        # job and the job runner fails the run for the missing client outcome
        # (nvflare/private/fed/server/fed_server.py, _resolve_missing_client_outcome).
        assert status in (COMPLETED, ABNORMAL), f"job 1 ended {status}"
        first = poc.download(job_id, tmp_path / "download")
        rounds, summary = read_report(first)
        assert summary["status"] == "completed" and summary["rounds_run"] == [1, 2, 3]
        assert (first / "workspace" / "cross_site_val" / "cross_val_results.json").is_file()
        # privacy: the server got the error's class only, never the site's message, traceback or data paths
        needles = (b"training fails in round", str(tmp_path / "synth").encode())
        leaked = [str(f) for f in first.rglob("*") if f.is_file() and any(n in f.read_bytes() for n in needles)]
        assert not leaked, leaked
        by_round = {r["round"]: r for r in rounds}
        assert by_round[1]["answered"] == list(SITES)
        assert by_round[2]["failed"] == {"hospital-b": "FaultDrillError"}  # reported by the site, class only
        assert "hospital-b" in by_round[3]["answered"]  # back in the round after its crash
        assert summary["sites"]["hospital-b"]["rounds_missed"] == [2]
        # hospital-c vanished in round 3: left out of it, and the round ended within the timeout
        assert summary["sites"]["hospital-c"] == {"rounds_answered": [1, 2], "rounds_missed": [3],
                                                  "why": {"3": "no answer in time"}}
        assert by_round[3]["answered"] == ["hospital-a", "hospital-b"] and by_round[3]["missing"] == ["hospital-c"]
        assert by_round[3]["seconds"] <= ROUND_TIMEOUT + 5, by_round[3]
        # the global model of every round was averaged and saved: 3 rounds in the checkpoint
        from fedseg.jobs.resume import find_resume_point

        assert find_resume_point(first).rounds_done == 3
        # the restarted hospital-c logged in again (its kit's start loop restarted it)
        assert not set(killed) & {pid for pid, _ in poc.running_processes()}

        # a POC FedAvg round with every site: each update weighed by its site's training cases, every scalar
        # the sites streamed on the server, every model scored on the sites that ran the evaluation (the
        # restarted hospital-c is not redeployed into the running job; that the next job takes it back is
        # the study's fault matrix, tests/test_study.py)
        server_run = first / "workspace"
        round1 = json.loads((server_run / "metrics" / "round_metrics.jsonl").read_text().splitlines()[0])
        assert {s["name"]: s["weight"] for s in round1["sites"]} == {site: float(n_train[site]) for site in SITES}
        streamed = [json.loads(l) for l in (server_run / "metrics" / "site_metrics.jsonl").read_text().splitlines()]
        assert {r["site"] for r in streamed} == set(SITES) and {"val_dice", "train_loss"} <= {r["key"] for r in streamed}
        assert all(math.isfinite(r["value"]) for r in streamed)
        cross = json.loads((server_run / "cross_site_val" / "cross_val_results.json").read_text())
        assert set(cross) == {"hospital-a", "hospital-b"}
        for scores in cross.values():
            assert {"SRV_FL_global_model.pt", "SRV_best_FL_global_model.pt", "hospital-a", "hospital-b"} <= set(scores)
        import torch

        from fedseg.lightning_modules.module import SegmentationModule

        job1 = tiny_job("resilient", rounds=3)
        best = torch.load(server_run / "app_server" / "best_FL_global_model.pt", map_location="cpu", weights_only=True)
        SegmentationModule(**job1.study.module_args()).load_state_dict(best["model"], strict=True)
        job1_id = first.name
        for site in SITES:  # each site read its data from the config installed in its own kit
            assert f"[fedseg] {site}: {n_train[site]} training / 1 validation cases" in (
                poc.site_kit(site) / job1_id / "log.txt").read_text()

        # --- 2. every site needed, W&B on, hospital-a's data has a truncated image: it refuses its data
        broken = tmp_path / "hospital-a-data"
        shutil.copytree(tmp_path / "synth", broken)
        first_case = json.loads((broken / "datalists" / "site-1.json").read_text())["training"][0]
        (broken / "data" / first_case["image"][0]).write_bytes(b"\x1f\x8b truncated")
        poc.install_site_config("hospital-a", broken / "datalists" / "site-1.json", cache_dir=tmp_path / "cache" / "a2")
        # the plant: hospital-a logs everything at the level NVFlare's site-log streaming carries (its
        # error_log.txt, stored on the server as ERRORLOG_<site> when streaming is on): the refusal's case
        # id and data path are in that file, so this job leaks them if streaming is ever switched back on
        send_every_log_record_to_the_error_log(poc.site_kit("hospital-a"))
        strict = tiny_job("strict", rounds=3, min_sites_per_round=3, addons=Addons(wandb="offline"))
        job_id = poc.submit(export(strict, jobs))
        status = poc.wait(job_id, timeout=ROUND_TIMEOUT + 120)
        assert status != COMPLETED
        third = poc.download(job_id, tmp_path / "download")
        rounds, summary = read_report(third)
        assert summary["status"] == "stopped" and rounds[0]["failed_at_startup"] == ["hospital-a"], summary
        assert "hospital-a refused its data (DatasetCheckError); see that site's log" in summary["reason"]
        assert "only 2 of the 3 sites needed answered" in summary["reason"]
        assert summary["reason"] in (third / "workspace" / "log.txt").read_text()
        site_log = (poc.site_kit("hospital-a") / job_id / "log.txt").read_text()
        assert "DatasetCheckError" in site_log and first_case["case_id"] in site_log  # the full story stays at the site
        site_errors = (poc.site_kit("hospital-a") / job_id / "error_log.txt").read_text(errors="replace")
        assert all(n in site_errors for n in (first_case["case_id"], str(broken), "could not start"))  # the plant worked

        # nothing identifying reached the server's side: no case id, data or datalist path, site config,
        # image file name or site error message in any file of its kit, its job and snapshot storage,
        # the downloaded jobs or the W&B runs the server wrote
        case_ids = {c["case_id"] for dl in (*datalists.values(), broken / "datalists" / "site-1.json")
                    for part in ("training", "validation") for c in json.loads(Path(dl).read_text())[part]}
        needles = {*case_ids, str(tmp_path / "synth"), str(broken), "fedseg_site.json", ".nii.gz",
                   "training fails in round", "could not start"}
        jobs_storage, snapshot_storage = server_storage(poc.prod_dir / "server")
        server_side = [poc.prod_dir / "server", jobs_storage, snapshot_storage, tmp_path / "download"]
        assert all(folder.is_dir() for folder in server_side), server_side  # a folder that is not there hides nothing
        assert (jobs_storage / job_id).is_dir()
        assert list((third / "workspace").rglob("offline-run-*"))
    # scanned once the deployment has stopped: a site's log upload at the end of a job (NVFlare's
    # SiteLogStreamer sends error_log.txt when the job completes at the site) may land after the job ended
    leaked = [(str(f), n) for folder in server_side for f in folder.rglob("*") if f.is_file()
              for n in needles if n.encode() in f.read_bytes()]
    assert not leaked, leaked[:10]
    # nothing of the deployment is left running, and the user's own NVFlare setup was never touched
    assert poc.leftovers_killed == 0 and not poc.running_processes()
    assert _user_nvflare_config() == home_config


def _user_nvflare_config() -> tuple[bool, float | None]:
    path = Path.home() / ".nvflare" / "config.conf"
    return path.exists(), path.stat().st_mtime if path.exists() else None
