"""POC mode: a real NVFlare deployment (server + 2 named sites as processes) on a free port.

The slow tests start real POC systems with the `nvflare` CLI (about 100 s and 25 s on 2 cores);
every one checks that no process of its deployment is left afterwards.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from fedseg.run.poc import (
    ADMIN,
    COMPLETED,
    PocDeployment,
    check_site_names,
    free_port,
    port_in_use,
    run_poc,
    write_project_yml,
)

SITES = ("hospital-a", "hospital-b")


def _user_nvflare_config() -> tuple[bool, float | None]:
    path = Path.home() / ".nvflare" / "config.conf"
    return path.exists(), path.stat().st_mtime if path.exists() else None


def test_free_port_is_bindable_and_project_yml_uses_it_for_fl_and_admin(tmp_path):
    port = free_port()
    assert 1024 <= port < 65536 and not port_in_use(port)
    path = write_project_yml(tmp_path / "project.yml", "study_1", SITES, port)
    doc = yaml.safe_load(path.read_text())
    assert doc["name"] == "study_1" and doc["api_version"] == 3
    by_type: dict[str, list[dict]] = {}
    for p in doc["participants"]:
        by_type.setdefault(p["type"], []).append(p)
    (server,) = by_type["server"]
    assert server["fed_learn_port"] == port and server["admin_port"] == port  # one port for both
    assert [c["name"] for c in by_type["client"]] == list(SITES)
    assert [(a["name"], a["role"]) for a in by_type["admin"]] == [(ADMIN, "project_admin")]


@pytest.mark.parametrize(
    ("sites", "problem"),
    [((), "at least one"), (("a", "a"), "unique"), (("server",), "bad site name"), (("../x",), "bad site name")],
)
def test_bad_site_names_are_refused(sites, problem):
    with pytest.raises(ValueError, match=problem):
        check_site_names(sites)


def test_cli_refuses_mismatched_datalists_and_bad_site_names(tmp_path, capsys):
    from fedseg.cli import main

    one = tmp_path / "a.json"
    one.write_text("{}")
    assert main(["poc", "--out", str(tmp_path / "run"), "--sites", *SITES, "--datalists", str(one)]) == 2
    assert "one file per site: 2 sites, 1 files" in capsys.readouterr().err
    assert main(["poc", "--out", str(tmp_path / "run"), "--sites", "server"]) == 2
    assert "bad site name 'server'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.mark.e2e
def test_prepare_provisions_named_kits_in_an_isolated_home(tmp_path):
    from fedseg.app.site_config import find_site_config, load_site_config
    from fedseg.lightning_modules.data.synth import SynthConfig, generate

    before = _user_nvflare_config()
    datalist = generate(SynthConfig(n_sites=1, cases_per_site=1, shape=(16, 16, 16)), tmp_path / "synth").datalists["site-1"]
    port = free_port()
    with PocDeployment(tmp_path / "poc", SITES, port=port) as poc:
        poc.prepare()
        written = poc.install_site_config("hospital-b", datalist)
        assert not poc.running_processes()  # prepared, not started
    server_conf = json.loads((poc.prod_dir / "server" / "startup" / "fed_server.json").read_text())
    assert server_conf["servers"][0]["admin_port"] == port
    assert f"localhost:{port}" in (poc.site_kit("hospital-a") / "startup" / "fed_client.json").read_text()
    assert (poc.admin_kit / "startup").is_dir()
    # A POC site runs its job script from <kit>/<job id>/app_<site>/custom/ with the kit as cwd:
    # the config the hospital admin installed is what it finds.
    script = poc.site_kit("hospital-b") / "job-1" / "app_hospital-b" / "custom" / "site_entry.py"
    assert find_site_config("hospital-b", script) == written
    assert load_site_config("hospital-b", script).datalist == datalist.resolve()
    # nvflare poc prepare registered the kits in the deployment's own HOME, not the user's.
    assert str(poc.workspace) in (poc.home / ".nvflare" / "config.conf").read_text()
    assert _user_nvflare_config() == before


@pytest.mark.e2e
@pytest.mark.slow
def test_poc_fedavg_two_named_sites_with_the_nvflare_job_submit_cli(tmp_path):
    import torch

    from conftest import tiny_job
    from fedseg.jobs.base import export
    from fedseg.lightning_modules.data.synth import SynthConfig, generate
    from fedseg.lightning_modules.module import SegmentationModule

    before = _user_nvflare_config()
    synth = generate(SynthConfig(n_sites=2, cases_per_site=3, shape=(32, 32, 32)), tmp_path / "synth")
    datalists = dict(zip(SITES, (synth.datalists["site-1"], synth.datalists["site-2"])))
    n_train = {h: int(synth.site_stats[s]["n_train"]) for h, s in zip(SITES, ("site-1", "site-2"))}
    job = tiny_job(rounds=2, features=8, roi=(32, 32, 32))
    job_dir = export(job, tmp_path / "jobs")

    port = free_port()
    lines: list[str] = []
    listening: list[bool] = []

    def log(line: str) -> None:
        lines.append(line)
        print(line, flush=True)
        if line.startswith("[deploy] submit:") and "submitting" in line:  # right after start
            listening.append(port_in_use(port))

    result = run_poc(job_dir, datalists, port=port, workspace=tmp_path / "poc", timeout=400, log=log)
    print("POC timings (s):", result.timings)

    assert result.status == COMPLETED and result.ok, result
    assert result.job_id and result.port == port and listening == [True]
    assert {"prepare", "start", "submit", "wait", "download", "stop", "total"} <= set(result.timings)
    assert all(t > 0 for t in result.timings.values())
    assert any("start: done" in line for line in lines) and any(COMPLETED in line for line in lines)
    server = result.server_workspace
    assert server == result.download_dir / "workspace" and server.is_dir()

    # Per-round metrics from every site; each update weighed by that site's training cases.
    rounds = [json.loads(line) for line in (server / "metrics" / "round_metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1]
    for r in rounds:
        weights = {s["name"]: s["weight"] for s in r["sites"]}
        assert weights == {site: float(n) for site, n in n_train.items()}
        for s in r["sites"]:
            dice = {m["name"]: m["value"] for m in s["metrics"]}["val_dice"]
            assert 0.0 <= dice <= 1.0

    # Every scalar the sites streamed, written by our JsonlMetricsReceiver on the server.
    streamed = [json.loads(line) for line in (server / "metrics" / "site_metrics.jsonl").read_text().splitlines()]
    assert {r["site"] for r in streamed} == set(SITES)
    assert {"val_dice", "train_loss"} <= {r["key"] for r in streamed}
    assert all(math.isfinite(r["value"]) for r in streamed)

    # Cross-site evaluation: both global models and both local models scored on both sites.
    cross = json.loads((server / "cross_site_val" / "cross_val_results.json").read_text())
    assert set(cross) == set(SITES)
    for scores in cross.values():
        assert {"SRV_FL_global_model.pt", "SRV_best_FL_global_model.pt", *SITES} <= set(scores)
        assert all(0.0 <= m["val_dice"] <= 1.0 for m in scores.values())

    # The best global model is a SegmentationModule state dict, key for key.
    best = torch.load(server / "app_server" / "best_FL_global_model.pt", map_location="cpu", weights_only=False)
    final = torch.load(server / "app_server" / "FL_global_model.pt", map_location="cpu", weights_only=False)
    module = SegmentationModule(**job.study.module_args())
    module.load_state_dict(best["model"], strict=True)
    assert any(not torch.equal(best["model"][k], final["model"][k]) for k in best["model"])  # rounds changed it

    # Each site read its data from the config installed in its own kit.
    for site in SITES:
        log_text = result.site_logs[site].read_text()
        assert f"[fedseg] {site}: {n_train[site]} training / 1 validation cases" in log_text

    # Nothing is left running, the port is free, and the user's NVFlare config was never touched.
    assert result.leftovers_killed == 0
    assert not PocDeployment(tmp_path / "poc", SITES, port=port).running_processes()
    assert not port_in_use(port)
    assert _user_nvflare_config() == before


@pytest.mark.e2e
@pytest.mark.slow
def test_a_failure_after_start_still_ends_every_poc_process(tmp_path):
    """An error inside the deployment, and a `nvflare poc stop` that does not finish: the processes
    are found by their workspace path and killed."""
    port = free_port()
    poc = PocDeployment(tmp_path / "poc", SITES, port=port)
    with pytest.raises(RuntimeError, match="the study failed"):
        with poc:
            poc.prepare()
            poc.start()
            running = poc.running_processes()
            assert port_in_use(port)
            original_stop = poc.stop
            poc.stop = lambda timeout=180: original_stop(timeout=1)  # the CLI is cut off: no clean stop
            raise RuntimeError("the study failed")
    assert len(running) >= 3  # server and both sites (each a start loop and a Python process)
    assert poc.leftovers_killed >= 3
    assert poc.running_processes() == []
    assert not port_in_use(port)


def _small_copy_of_study_job(name: str, dst: Path) -> Path:
    """The checked-in ``jobs/<name>`` folder with only its compute settings made tiny (2 rounds,
    32^3 crops, 8 features): everything else — filters, server model, components — is as shipped."""
    import shutil

    from fedseg.jobs.catalog import JOBS_DIR

    job = dst / name
    shutil.copytree(JOBS_DIR / name, job)
    client = job / "app" / "config" / "config_fed_client.json"
    doc = json.loads(client.read_text())
    args = doc["executors"][0]["executor"]["args"]
    flag, site_document = args["task_script_args"].split(" ")
    site = json.loads(site_document)
    study = site["study"]
    assert (study["data"]["roi"], study["model"]["features"], study["federation"]["rounds"]) == ([128] * 3, 16, 50)
    study["data"]["roi"], study["model"]["features"], study["federation"]["rounds"] = [32] * 3, 8, 2
    study["model"]["hd95"], study["federation"]["site_threads"] = False, 1
    args["task_script_args"] = f"{flag} {json.dumps(site, separators=(',', ':'), sort_keys=True)}"
    client.write_text(json.dumps(doc, indent=4))
    server = job / "app" / "config" / "config_fed_server.json"
    doc = json.loads(server.read_text())

    def shrink(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "num_rounds":
                    node[key] = 2
                elif key == "features":
                    node[key] = 8
                elif key == "roi_size":
                    node[key] = [32, 32, 32]
                else:
                    shrink(value)
        elif isinstance(node, list):
            for value in node:
                shrink(value)

    shrink(doc)
    server.write_text(json.dumps(doc, indent=4))
    return job
