"""POC mode: a real NVFlare deployment (server + named sites as processes) on a free port.

The POC FedAvg run with the `nvflare` CLI is the resilience deployment's (``test_poc_resilience.py``);
here: the project file, site names, the isolated HOME, and the leftover-process killer.
"""

from __future__ import annotations

from conftest import TEST_DATA

import json
import time
from pathlib import Path

import pytest
import yaml

from fedseg.run.poc import (
    ADMIN,
    PocDeployment,
    check_site_names,
    free_port,
    port_in_use,
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
    assert main(["poc", "--out", str(tmp_path / "run"), "--site-names", *SITES, "--datalists", str(one)]) == 2
    assert "one file per site: 2 sites, 1 files" in capsys.readouterr().err
    assert main(["poc", "--out", str(tmp_path / "run"), "--site-names", "server"]) == 2
    assert "bad site name 'server'" in capsys.readouterr().err
    # --sites is a number of synthetic sites in every other command: poc points to --site-names
    assert main(["poc", "--out", str(tmp_path / "run"), "--sites", *SITES]) == 2
    assert f"--site-names {' '.join(SITES)}" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.mark.e2e
def test_prepare_provisions_named_kits_in_an_isolated_home(tmp_path):
    from fedseg.app.site_config import find_site_config, load_site_config
    from fedseg.lightning_modules.data.synth import SynthConfig, generate

    before = _user_nvflare_config()
    datalist = generate(SynthConfig(**TEST_DATA, n_sites=1, cases_per_site=1, shape=(16, 16, 16)), tmp_path / "synth").datalists["site-1"]
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


def test_leftover_processes_are_found_by_their_folder_and_ended_start_loops_first(tmp_path):
    """What ``LocalDeployment`` does when a stop does not finish: every process whose command line
    names the deployment's folder is ended, the kit's start loop first (it would restart the others)."""
    import subprocess
    import sys

    from fedseg.run.deployment import end_processes, processes_matching

    marker = str(tmp_path / "workspace" / "prod_00")
    # a kit's start loop that restarts its "server" whenever that exits, and the "server" itself
    loop = subprocess.Popen(["bash", "-c", f'while true; do {sys.executable} -c "import time; time.sleep(60)" '
                             f'{marker}/server; sleep 0.2; done', "sub_start.sh", marker], start_new_session=True)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", f"{marker}/hospital-a"],
                             start_new_session=True)
    try:
        find = lambda: processes_matching([marker])  # noqa: E731
        deadline = time.monotonic() + 10
        while len(find()) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        found = find()
        assert len(found) >= 3 and any("sub_start.sh" in cmd for _, cmd in found)
        assert end_processes(find, grace=2.0) == len(found)
        time.sleep(0.5)  # a start loop still alive would have restarted its server by now
        assert find() == []
        assert end_processes(find) == 0  # nothing left: nothing to do
    finally:
        for proc in (loop, other):
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)


def _small_copy_of_study_job(name: str, dst: Path) -> Path:
    """The checked-in ``jobs/<name>`` folder with only its compute settings made tiny (2 rounds,
    32^3 crops, 8 features): everything else — filters, server model, components — is as shipped."""
    import shutil

    from fedseg.jobs.catalog import JOBS_DIR

    job = dst / name
    shutil.copytree(JOBS_DIR / name, job)
    client = job / "app" / "config" / "config_fed_client.json"
    doc = json.loads(client.read_text())
    executor = doc["executors"][0]["executor"]
    assert executor["path"] == "fedseg.app.site_executor.SiteExecutor"  # settings only, no code
    study = executor["args"]["job"]["study"]
    assert (study["data"]["roi"], study["model"]["features"], study["federation"]["rounds"]) == ([128] * 3, 16, 50)
    study["data"]["roi"], study["model"]["features"], study["federation"]["rounds"] = [32] * 3, 8, 2
    study["model"]["hd95"], study["federation"]["site_threads"] = False, 1
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
