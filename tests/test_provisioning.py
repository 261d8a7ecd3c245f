"""Provisioning a consortium: description -> project.yml -> kits, adding a hospital, a real deployment.

The kit tests run the real `nvflare provision` (about a second each). The e2e test starts a
server and two hospitals from their kits on localhost (mutual TLS), runs the checked-in FedPer job
through the lead's kit, and shows a site of another consortium (another root CA) being refused.
"""

from __future__ import annotations

from conftest import TEST_DATA

import hashlib
import json
import math
import stat
import time
from pathlib import Path

import pytest
import yaml

from fedseg.provisioning.consortium import (
    ConsortiumError,
    HospitalSpec,
    load_consortium,
    parse_consortium,
)
from fedseg.provisioning.kits import (
    DEFAULT_OUT,
    KitsError,
    add_hospital,
    check_output_folder,
    open_kits,
    provision,
)

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "provisioning" / "consortium.example.yml"
HOSPITALS = ("hospital-a", "hospital-b")
LEAD = "lead@study.example.org"


def _consortium_doc(port: int = 8002, name: str = "study", hospitals=HOSPITALS, lead: str = LEAD) -> dict:
    return {
        "name": name,
        "server": {"host": "localhost", "port": port, "org": "consortium"},
        "hospitals": [{"name": h, "org": h.replace("-", "_")} for h in hospitals],
        "admins": [{"email": lead, "org": "consortium", "role": "lead"},
                   *([{"email": "it@hospital-a.example.org", "org": "hospital_a", "role": "org_admin"}]
                     if "hospital-a" in hospitals else [])],
    }


def _write(path: Path, doc) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False) if not isinstance(doc, str) else doc)
    return path


def _user_nvflare_config() -> tuple[bool, float | None]:
    path = Path.home() / ".nvflare" / "config.conf"
    return path.exists(), path.stat().st_mtime if path.exists() else None


def _snapshot(folder: Path) -> dict[str, tuple[int, int, str]]:
    """Every file under ``folder``: (mode, mtime_ns, sha256): any rewrite or chmod shows."""
    return {str(p.relative_to(folder)): (p.stat().st_mode, p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------ description


def test_the_example_consortium_maps_to_an_nvflare_project_yml():
    consortium = load_consortium(EXAMPLE)
    project = consortium.project_config()
    assert project["api_version"] == 3 and project["name"] == "brats_consortium"
    by_type: dict[str, list[dict]] = {}
    for p in project["participants"]:
        by_type.setdefault(p["type"], []).append(p)
    (server,) = by_type["server"]
    assert server == {"name": "fl.example-consortium.org", "type": "server", "org": "consortium",
                      "fed_learn_port": 8002, "admin_port": 8002}  # one port for FL and admin traffic
    assert [(c["name"], c["org"]) for c in by_type["client"]] == [("hospital-a", "hospital_a"), ("hospital-b", "hospital_b")]
    assert [(a["name"], a["role"]) for a in by_type["admin"]] == [
        ("lead@example-consortium.org", "lead"), ("it@hospital-a.example.org", "org_admin")]
    assert [b["path"].rsplit(".", 1)[1] for b in project["builders"]] == [
        "WorkspaceBuilder", "StaticFileBuilder", "CertBuilder", "SignatureBuilder"]
    assert [a.email for a in consortium.leads] == ["lead@example-consortium.org"]

    longer = parse_consortium({**consortium.to_dict(), "root_ca_valid_days": 1095})
    (cert,) = [b for b in longer.project_config()["builders"] if b["path"].endswith("CertBuilder")]
    assert cert["args"] == {"root_valid_days": 1095}
    assert parse_consortium(consortium.to_dict()).to_dict() == consortium.to_dict()  # round trip


def _without(doc: dict, key: str) -> dict:
    return {k: v for k, v in doc.items() if k != key}


def _changed(section: str, index: int | None = None, **values):
    def change(doc: dict) -> dict:
        doc = json.loads(json.dumps(doc))
        target = doc[section] if index is None else doc[section][index]
        target.update(values)
        return doc
    return change


@pytest.mark.parametrize(
    ("mutate", "problem"),
    [
        (lambda d: _without(d, "server"), "server: missing"),
        (_changed("server", port=0), "server.port: 0 is not a port number"),
        (_changed("server", port=70000), "server.port: 70000 is not a port number"),
        (_changed("server", port="8002"), "server.port: '8002' is not a port number"),
        (_changed("server", host="fl_server"), "server.host: 'fl_server' is not a host name"),
        (_changed("hospitals", 1, name="hospital-a"), "'hospital-a' is used more than once"),
        (_changed("hospitals", 0, name="hospital.a"), "hospitals[0].name: 'hospital.a'"),
        (_changed("hospitals", 0, org="hospital-a"), "hospitals[0].org: 'hospital-a' is not letters, digits or '_'"),
        (_changed("admins", 0, role="boss"), "admins[0].role: unknown role 'boss'"),
        (_changed("admins", 0, role="member"), "no lead"),
        (_changed("admins", 0, email="lead"), "admins[0].email: 'lead' is not an e-mail address"),
        (_changed("admins", 1, org="nobody"), "org_admin of org 'nobody', which has no hospital"),
        (lambda d: {**d, "hospitals": []}, "at least one hospital"),
        (lambda d: {**d, "hospital": d["hospitals"]}, "unknown key 'hospital'"),
        (lambda d: {**d, "name": "my study"}, "name: 'my study' is not a consortium name"),
    ],
)
def test_a_bad_consortium_file_names_the_file_and_the_problem(tmp_path, mutate, problem):
    path = _write(tmp_path / "consortium.yml", mutate(_consortium_doc()))
    with pytest.raises(ConsortiumError) as caught:
        load_consortium(path)
    assert str(path) in str(caught.value) and problem in str(caught.value)


def test_every_problem_is_reported_at_once_and_unreadable_files_are_named(tmp_path):
    doc = _consortium_doc()
    doc["server"]["port"] = -1
    doc["admins"][0]["role"] = "chief"
    with pytest.raises(ConsortiumError, match=r"2 problem\(s\)"):
        parse_consortium(doc, tmp_path / "c.yml")
    with pytest.raises(ConsortiumError, match="consortium file not found"):
        load_consortium(tmp_path / "missing.yml")
    with pytest.raises(ConsortiumError, match="not a readable YAML file"):
        load_consortium(_write(tmp_path / "broken.yml", "name: [unclosed"))
    with pytest.raises(ConsortiumError, match="is a YAML mapping"):
        load_consortium(_write(tmp_path / "list.yml", "- a\n- b\n"))


def test_cli_check_prints_project_yml_and_refuses_a_bad_file(tmp_path, capsys):
    from fedseg.cli import main

    assert main(["provision", "check", str(EXAMPLE)]) == 0
    out = capsys.readouterr().out
    assert yaml.safe_load(out)["api_version"] == 3 and "valid; 2 hospitals, 2 admins" in out
    bad = _write(tmp_path / "bad.yml", _without(_consortium_doc(), "server"))
    assert main(["provision", "create", str(bad), "--out", str(tmp_path / "kits")]) == 2
    assert f"{bad}: 1 problem(s)" in capsys.readouterr().err
    assert not (tmp_path / "kits").exists()  # refused before anything was written


# ------------------------------------------------------------------------------ kits


def test_provision_writes_owner_only_kits_a_site_guide_each_and_nobody_may_bring_code(tmp_path):
    before = _user_nvflare_config()
    consortium = parse_consortium(_consortium_doc(port=18999))
    kits = provision(consortium, tmp_path / "kits")
    assert kits.folder == (tmp_path / "kits" / "study").resolve()
    assert sorted(p.name for p in kits.folder.iterdir()) == sorted(
        ["ca", "consortium.yml", "project.yml", "localhost", *HOSPITALS, LEAD, "it@hospital-a.example.org"])
    assert not list(kits.ca_workspace.rglob("prod_*"))  # one copy of each kit: the one to ship
    assert kits.ca_state.is_file()

    # Owner-only everywhere: kits and the CA state hold private keys.
    for path in [kits.folder, *kits.folder.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o077 == 0, f"{path} is {oct(mode)}"
        if path.is_dir():
            assert mode == 0o700, path
    for key in [*kits.folder.rglob("*.key"), kits.ca_state]:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    assert stat.S_IMODE((tmp_path / "kits").stat().st_mode) == 0o700  # the output folder it created

    for hospital in HOSPITALS:
        kit = kits.hospital_kit(hospital)
        client = json.loads((kit / "startup" / "fed_client.json").read_text())
        assert client["servers"][0]["service"]["target"] == "localhost:18999"
        assert client["client"]["connection_security"] == "mtls" and client["client"]["fqsn"] == hospital
        assert (kit / "startup" / "rootCA.pem").read_bytes() == kits.root_ca_pem()
        guide = (kit / "SITE_GUIDE.md").read_text()
        for step in (f"# {hospital}: site guide (study)", "localhost:18999", "fedseg provision site-config KIT",
                     "local/fedseg_site.json", "fedseg data check", "nvflare preflight-check -p KIT",
                     "KIT/startup/start.sh"):
            assert step in guide, step
        # nothing a site logs is streamed to the server: NVFlare's log streaming is off in every site kit
        resources = json.loads((kit / "local" / "resources.json.default").read_text())
        assert resources["allow_log_streaming"] is False
    assert yaml.safe_load(kits.project_yml.read_text())["allow_log_streaming"] is False
    assert (kits.server_kit / "startup" / "server.key").is_file()
    assert (kits.lead_kit / "startup" / "fed_admin.json").is_file()

    # The server keeps jobs and snapshots in a persistent folder, not NVFlare's /tmp/nvflare.
    server = json.loads((kits.server_kit / "local" / "resources.json").read_text())
    assert server["snapshot_persistor"]["args"]["storage"]["args"]["root_dir"] == "/var/lib/fedseg/study/snapshots"
    job_manager = next(c for c in server["components"] if c["id"] == "job_manager")
    assert job_manager["args"]["uri_root"] == "/var/lib/fedseg/study/jobs"
    assert "/tmp" not in json.dumps(server)
    guide = (kits.server_kit / "SERVER_GUIDE.md").read_text()
    assert "/var/lib/fedseg/study" in guide and "fedseg provision server-storage KIT" in guide

    # NVFlare's default policy lets the lead submit jobs that carry custom code (byoc); fedseg's kits
    # let nobody (the lead still submits jobs: they carry settings only).
    default = json.loads((kits.server_kit / "local" / "authorization.json.default").read_text())["permissions"]
    assert default["lead"]["byoc"] == "any"
    policy = json.loads((kits.server_kit / "local" / "authorization.json").read_text())["permissions"]
    assert policy["lead"]["submit_job"] == "any" and policy["lead"]["byoc"] == "none"
    assert policy["org_admin"]["byoc"] == "none" and policy["project_admin"]["byoc"] == "none"
    assert json.loads((kits.lead_kit / "startup" / "fed_admin.json").read_text())["admin"]["username"] == LEAD

    assert open_kits(kits.folder).consortium.to_dict() == consortium.to_dict()
    assert _user_nvflare_config() == before  # nvflare ran with a throw-away HOME


def test_server_storage_moves_into_an_owner_only_folder_and_the_consortium_can_name_it(tmp_path, capsys):
    from fedseg.cli import main

    doc = _consortium_doc()
    doc["server"]["storage"] = "/srv/fl/study"
    kits = provision(parse_consortium(doc), tmp_path / "kits")
    resources = json.loads((kits.server_kit / "local" / "resources.json").read_text())
    assert next(c for c in resources["components"] if c["id"] == "job_manager")["args"]["uri_root"] == "/srv/fl/study/jobs"
    # the server admin's step after copying the kit: storage inside the kit, created owner-only
    storage = kits.server_kit / "storage"
    assert main(["provision", "server-storage", str(kits.server_kit), "--storage", str(storage)]) == 0
    resources = json.loads((kits.server_kit / "local" / "resources.json").read_text())
    assert resources["snapshot_persistor"]["args"]["storage"]["args"]["root_dir"] == str(storage / "snapshots")
    for folder in (storage, storage / "jobs", storage / "snapshots"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    assert stat.S_IMODE((kits.server_kit / "local" / "resources.json").stat().st_mode) == 0o600
    assert main(["provision", "server-storage", str(kits.hospital_kit("hospital-a"))]) == 2
    assert "not a server startup kit" in capsys.readouterr().err
    with pytest.raises(ConsortiumError, match="server.storage: 'rel/path' must be an absolute folder"):
        parse_consortium({**doc, "server": {**doc["server"], "storage": "rel/path"}})


def test_an_existing_consortium_is_never_provisioned_over_and_kits_stay_out_of_git(tmp_path):
    consortium = parse_consortium(_consortium_doc())
    kits = provision(consortium, tmp_path / "kits")
    state = kits.ca_state.read_bytes()
    with pytest.raises(KitsError, match="already holds consortium 'study' and its root CA") as caught:
        provision(consortium, tmp_path / "kits")
    assert str(kits.folder) in str(caught.value) and "add-hospital" in str(caught.value)
    assert kits.ca_state.read_bytes() == state

    (tmp_path / "other" / "study").mkdir(parents=True)
    (tmp_path / "other" / "study" / "notes.txt").write_text("mine")
    with pytest.raises(KitsError, match="exists and is not empty"):
        provision(consortium, tmp_path / "other")

    # Inside this repository only git-ignored folders are accepted (kits/ is the default).
    with pytest.raises(KitsError, match="inside the git work tree .* not ignored by git"):
        check_output_folder(REPO / "provisioning" / "kits-here" / "study")
    check_output_folder(REPO / DEFAULT_OUT / "study")
    check_output_folder(tmp_path / "elsewhere" / "study")
    with pytest.raises(KitsError, match="not ignored by git"):
        provision(consortium, REPO / "provisioning" / "kits-here")
    assert not (REPO / "provisioning" / "kits-here").exists()


def test_adding_a_hospital_signs_it_with_the_same_root_ca_and_touches_no_other_kit(tmp_path, capsys):
    from cryptography import x509

    from fedseg.cli import main

    kits = provision(parse_consortium(_consortium_doc()), tmp_path / "kits")
    root_ca = kits.root_ca_pem()
    others = _snapshot(kits.folder)
    time.sleep(0.01)  # a rewrite would get a new mtime

    assert main(["provision", "add-hospital", str(kits.folder), "hospital-c", "--org", "hospital_c"]) == 0
    assert "same root CA" in capsys.readouterr().out
    new_kit = kits.folder / "hospital-c"
    assert (new_kit / "startup" / "rootCA.pem").read_bytes() == root_ca
    cert = x509.load_pem_x509_certificate((new_kit / "startup" / "client.crt").read_bytes())
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(root_ca))
    assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == "hospital-c"
    assert (new_kit / "SITE_GUIDE.md").is_file()
    assert stat.S_IMODE((new_kit / "startup" / "client.key").stat().st_mode) == 0o600
    assert all(stat.S_IMODE(p.stat().st_mode) & 0o077 == 0 for p in [new_kit, *new_kit.rglob("*")])

    after = _snapshot(kits.folder)
    untouched = {k: v for k, v in after.items() if not k.startswith(("hospital-c/", "ca/", "consortium.yml", "project.yml"))}
    assert untouched == {k: v for k, v in others.items() if not k.startswith(("ca/", "consortium.yml", "project.yml"))}
    assert not list(kits.ca_workspace.rglob("prod_*"))

    grown = open_kits(kits.folder).consortium
    assert grown.hospital_names == (*HOSPITALS, "hospital-c")
    assert "hospital-c" in [p["name"] for p in yaml.safe_load(kits.project_yml.read_text())["participants"]]

    # Again: a clash is refused; a second addition keeps the first and the same root CA.
    with pytest.raises(KitsError, match="'hospital-c' is used more than once"):
        add_hospital(kits.folder, HospitalSpec("hospital-c", "hospital_c"))
    fourth = add_hospital(kits.folder, HospitalSpec("hospital-d", "hospital_d"))
    assert (fourth / "startup" / "rootCA.pem").read_bytes() == root_ca
    assert open_kits(kits.folder).consortium.hospital_names == (*HOSPITALS, "hospital-c", "hospital-d")
    with pytest.raises(KitsError, match="not a consortium folder"):
        add_hospital(tmp_path, HospitalSpec("hospital-e", "hospital_e"))


def test_site_config_cli_points_a_hospital_kit_at_its_data(tmp_path, capsys):
    from fedseg.app.site_config import load_site_config
    from fedseg.cli import main

    kits = provision(parse_consortium(_consortium_doc()), tmp_path / "kits")
    kit = kits.hospital_kit("hospital-a")
    datalist = _write(tmp_path / "site.json", "{}")
    assert main(["provision", "site-config", str(kit), "--datalist", str(datalist), "--data-root", str(tmp_path),
                 "--personal-store", str(tmp_path / "heads")]) == 0
    # A site runs its job's script from <kit>/<job id>/app_<site>/custom/ with the kit as working directory.
    config = load_site_config("hospital-a", kit / "job-1" / "app_hospital-a" / "custom" / "site_entry.py")
    assert config.source == kit / "local" / "fedseg_site.json"
    assert config.datalist == datalist.resolve() and config.head_store == (tmp_path / "heads").resolve()
    # --head-store, the option's earlier name, still sets it
    assert main(["provision", "site-config", str(kit), "--datalist", str(datalist), "--head-store",
                 str(tmp_path / "store")]) == 0
    assert load_site_config("hospital-a", kit / "local" / "x.py").head_store == (tmp_path / "store").resolve()
    assert main(["provision", "site-config", str(kits.lead_kit), "--datalist", str(datalist)]) == 2
    assert "not a hospital's startup kit" in capsys.readouterr().err


# ------------------------------------------------------------------------------ deployment


def _tiny_fedper_job(dst: Path) -> Path:
    """The checked-in jobs/fedper folder, shrunk by test_poc's helper, then to 1 round of 16^3 crops."""
    from test_poc import _small_copy_of_study_job

    job = _small_copy_of_study_job("fedper", dst)
    client = job / "app" / "config" / "config_fed_client.json"
    doc = json.loads(client.read_text())
    study = doc["executors"][0]["executor"]["args"]["job"]["study"]
    assert study["data"]["roi"] == [32, 32, 32] and study["federation"]["rounds"] == 2
    study["data"]["roi"], study["federation"]["rounds"] = [16, 16, 16], 1
    client.write_text(json.dumps(doc, indent=4))
    server = job / "app" / "config" / "config_fed_server.json"
    text = json.dumps(json.loads(server.read_text()))  # one line: the lists are easy to find
    assert '"num_rounds": 2' in text and '"roi_size": [32, 32, 32]' in text
    server.write_text(text.replace('"num_rounds": 2', '"num_rounds": 1').replace('"roi_size": [32, 32, 32]', '"roi_size": [16, 16, 16]'))
    return job


def _jobs_a_site_must_refuse(job_dir: Path, dst: Path) -> tuple[Path, Path, Path, list[Path]]:
    """Copies of ``job_dir``: 3 rounds (outside hospital-b's policy, and not approved at hospital-a);
    with an ``app/custom`` component that writes a marker file when it is built; naming a class outside
    the allow list (``logging.FileHandler``, which would create its marker file). The markers last."""
    import shutil

    markers = [dst / "custom-code-ran", dst / "unlisted-class-ran"]
    copies = []
    for name in ("too_long", "with_code", "unlisted"):
        copy = dst / name
        shutil.copytree(job_dir, copy)
        meta = json.loads((copy / "meta.json").read_text())
        (copy / "meta.json").write_text(json.dumps({**meta, "name": name}))
        copies.append(copy)
    too_long, with_code, unlisted = copies

    def edit(job: Path, config: str, change) -> None:
        path = job / "app" / "config" / config
        doc = json.loads(path.read_text())
        change(doc)
        path.write_text(json.dumps(doc, indent=2))

    def three_rounds(doc):
        doc["executors"][0]["executor"]["args"]["job"]["study"]["federation"]["rounds"] = 3

    def num_rounds(doc):
        for workflow in doc["workflows"]:
            if "num_rounds" in workflow.get("args", {}):
                workflow["args"]["num_rounds"] = 3

    edit(too_long, "config_fed_client.json", three_rounds)
    edit(too_long, "config_fed_server.json", num_rounds)
    (with_code / "app" / "custom").mkdir()
    (with_code / "app" / "custom" / "marker.py").write_text(
        "from pathlib import Path\nfrom nvflare.apis.fl_component import FLComponent\n\n\n"
        "class Marker(FLComponent):\n    def __init__(self, path):\n        super().__init__()\n"
        "        Path(path).write_text('ran')\n")
    for config in ("config_fed_client.json", "config_fed_server.json"):  # at the sites and on the server
        edit(with_code, config, lambda d: d["components"].append(
            {"id": "marker", "path": "marker.Marker", "args": {"path": str(markers[0])}}))
    edit(unlisted, "config_fed_client.json", lambda d: d["components"].append(
        {"id": "marker", "path": "logging.FileHandler", "args": {"filename": str(markers[1])}}))
    return too_long, with_code, unlisted, markers


def _wait_port_free(port: int, seconds: float = 15.0) -> bool:
    from fedseg.run.poc import port_in_use

    deadline = time.monotonic() + seconds
    while port_in_use(port):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_hospitals_run_fedper_from_their_kits_a_foreign_root_ca_is_refused_and_a_hospital_joins_later(tmp_path):
    from fedseg.run.poc import COMPLETED, free_port
    from fedseg.lightning_modules.data.synth import SynthConfig, generate
    from fedseg.run.kit_deployment import LocalKitDeployment

    before = _user_nvflare_config()
    started = time.perf_counter()
    port = free_port()
    kits = provision(parse_consortium(_consortium_doc(port=port)), tmp_path / "kits")
    # Another consortium (its own root CA) whose sites are pointed at the same server host and port:
    # "intruder" trusts only its own root CA; "insider" trusts the consortium's real root CA too (its
    # rootCA.pem holds both), so it accepts the server, but its own certificate is from the other CA.
    foreign = provision(parse_consortium(_consortium_doc(port=port, name="other_study", hospitals=("intruder", "insider"),
                                                         lead="lead@other.example.org")), tmp_path / "kits")
    assert foreign.root_ca_pem() != kits.root_ca_pem()
    insider_ca = foreign.hospital_kit("insider") / "startup" / "rootCA.pem"
    insider_ca.write_bytes(foreign.root_ca_pem() + kits.root_ca_pem())  # its own CA first: NVFlare checks its cert with it
    # the server admin's step: the study's jobs and snapshots in a persistent folder of the kit, not /tmp
    from fedseg.cli import main

    assert main(["provision", "server-storage", str(kits.server_kit), "--storage", str(kits.server_kit / "storage")]) == 0
    synth = generate(SynthConfig(**TEST_DATA, n_sites=2, cases_per_site=3, shape=(16, 16, 16)), tmp_path / "synth")
    job_dir = _tiny_fedper_job(tmp_path / "jobs")

    # What each hospital accepts: hospital-a runs only jobs its admin approved, hospital-b at most 1 round.
    policies = {"hospital-a": {"require_approval": True}, "hospital-b": {"max_rounds": 1}}
    too_long, with_code, unlisted, markers = _jobs_a_site_must_refuse(job_dir, tmp_path / "refused")
    deployment = LocalKitDeployment(kits, tmp_path / "run")
    with deployment:
        site_configs = {}
        for hospital, synth_site in zip(HOSPITALS, ("site-1", "site-2")):  # each hospital admin's step
            # Its own head store: on one machine all sites share HOME, and so the default store.
            site_configs[hospital] = deployment.install_site_config(
                hospital, synth.datalists[synth_site], head_store=tmp_path / "heads" / hospital, policy=policies[hospital])
        assert main(["site", "approve", str(job_dir), "--kit", str(kits.hospital_kit("hospital-a"))]) == 0
        deployment.start_kit(foreign.hospital_kit("intruder"))
        deployment.start_kit(foreign.hospital_kit("insider"))
        deployment.start(timeout=240)
        job_id = deployment.submit(job_dir)
        status = deployment.wait(job_id, timeout=420)
        download = deployment.download(job_id, tmp_path / "download")
        connected = deployment.connected_sites()
        # A job that brings code is refused at submission; one naming a class outside the allow list
        # never builds it; one outside the sites' policies is refused by both, each naming its rule.
        with_code_id = deployment.submit(with_code)
        with_code_status = deployment.wait(with_code_id, timeout=300)
        with_code_meta = deployment.nvflare_json("meta", ["job", "meta", with_code_id, *deployment.kit_args()], timeout=120)
        unlisted_id = deployment.submit(unlisted)
        unlisted_status = deployment.wait(unlisted_id, timeout=300)
        too_long_id = deployment.submit(too_long)
        too_long_status = deployment.wait(too_long_id, timeout=300)
        too_long_download = deployment.download(too_long_id, tmp_path / "download-refused")
        refused_logs = deployment.site_job_logs(too_long_id)
        unlisted_logs = deployment.site_job_logs(unlisted_id)
        # A hospital added to the running consortium joins without restarting the server.
        late_kit = add_hospital(kits.folder, HospitalSpec("hospital-c", "hospital_c"))
        deployment.start_kit(late_kit)
        deployment.wait_for_sites([*HOSPITALS, "hospital-c"], timeout=120)
        site_logs = deployment.site_job_logs(job_id)
        assert len(deployment.running_processes()) >= 10  # server, 3 hospitals, 2 outsiders: loops and processes
    print(f"e2e timings (s): {deployment.timings}, total {time.perf_counter() - started:.1f}")

    assert status == COMPLETED, f"job {job_id}: {status}"
    # --- a site runs only what its admin installed, and decides which studies it joins
    # the job with code is refused where it would be deployed, and the lead reads why in the job's meta
    assert with_code_status != COMPLETED and "BYOC not permitted" in json.dumps(with_code_meta), with_code_meta
    assert unlisted_status != COMPLETED
    assert any("not in allow_list" in log.read_text() for log in unlisted_logs.values())
    assert not [m for m in markers if m.exists()]  # neither the code nor the unlisted class ever ran anywhere
    assert too_long_status != COMPLETED
    summary = json.loads((too_long_download / "workspace" / "metrics" / "participation_summary.json").read_text())
    assert "hospital-b refused the job: accepts at most 1 rounds; the job asks 3" in summary["reason"]
    assert "hospital-a refused the job: runs only approved jobs" in summary["reason"]
    for hospital in HOSPITALS:  # refused before a single case was read: the site runner never started
        assert "training /" in site_logs[hospital].read_text()  # what a site that read its cases says
        assert "training /" not in refused_logs[hospital].read_text()
        assert "this site refuses the job" in refused_logs[hospital].read_text()
        audit = [json.loads(line) for line in site_configs[hospital].with_name("fedseg_site.audit.jsonl").read_text().splitlines()]
        decisions = {r["job_id"]: r for r in audit}
        assert decisions[job_id]["decision"] == "accepted" and decisions[job_id]["submitter"] == LEAD
        assert decisions[too_long_id]["decision"] == "refused" and decisions[too_long_id]["reason"]
        assert all(len(r["fingerprint"]) == 64 and r["time"] for r in audit)
    assert main(["site", "audit", "--kit", str(kits.hospital_kit("hospital-b"))]) == 0
    # Per-site metrics, streamed by the hospitals and written by JsonlMetricsReceiver on the server.
    server_run = download / "workspace"
    streamed = [json.loads(line) for line in (server_run / "metrics" / "site_metrics.jsonl").read_text().splitlines()]
    assert {r["site"] for r in streamed} == set(HOSPITALS)
    assert "val_dice" in {r["key"] for r in streamed} and all(math.isfinite(r["value"]) for r in streamed)
    for hospital in HOSPITALS:
        assert "personal head (decoder, 12 tensors) new" in site_logs[hospital].read_text()
        assert (tmp_path / "heads" / hospital).is_dir()
    # FedPer: no head parameter reached the server (PayloadKeyAudit records every incoming result's keys)
    import torch

    from fedseg.jobs.catalog import STUDY_JOBS

    from test_fedper import EXPECTED_HEAD

    head_keys = set(STUDY_JOBS["fedper"].personal_keys())
    assert head_keys == EXPECTED_HEAD  # the split of the shipped job is the layout written out by hand
    payloads = [json.loads(line) for line in (server_run / "metrics" / "payload_keys.jsonl").read_text().splitlines()]
    weighted = [p for p in payloads if p["task"] in ("train", "submit_model")]
    assert {(p["task"], p["site"]) for p in weighted} == {(t, h) for t in ("train", "submit_model") for h in HOSPITALS}
    assert all(p["keys"] for p in weighted)  # the audit saw the weights' names of every result it checked
    assert not any(head_keys & set(p["keys"]) for p in payloads)
    final = torch.load(server_run / "app_server" / "FL_global_model.pt", map_location="cpu", weights_only=False)["model"]
    assert final and not (head_keys & set(final))

    # Mutual TLS, both directions. The intruder refuses the server (the server's certificate is not from
    # its root CA); the server refuses the insider (its client certificate is not from the consortium's
    # CA): NVFlare drops the connection in the handshake, without a line in its own log, so the
    # insider sees its connection reset and never registers. Neither is ever listed; the study went on.
    intruder_log = (foreign.hospital_kit("intruder") / "log.txt").read_text()
    assert "CERTIFICATE_VERIFY_FAILED" in intruder_log
    insider_log = (foreign.hospital_kit("insider") / "log.txt").read_text()
    assert "Connection reset by peer" in insider_log or "ServerDisconnectedError" in insider_log, insider_log[-3000:]
    assert "Successfully registered" not in insider_log
    assert connected == sorted(HOSPITALS)
    server_log = (kits.server_kit / "log.txt").read_text()
    # the server names every client that gets through the handshake and joins (the control that lets the
    # next line fail: an intruder or insider that got in would be named the same way)
    assert all(f"New client {h}@" in server_log for h in HOSPITALS), server_log[-3000:]
    assert "intruder" not in server_log and "insider" not in server_log

    # The job and its snapshots were stored in the server kit's own storage, owner-only, not in /tmp.
    storage = kits.server_kit / "storage"
    assert (storage / "jobs" / job_id).is_dir() and (storage / "snapshots").is_dir()
    assert stat.S_IMODE(storage.stat().st_mode) == 0o700
    assert not Path(f"/tmp/nvflare/jobs-storage/{job_id}").exists()

    # Nothing is left running, the port is free, and the user's NVFlare config was never touched.
    assert deployment.running_processes() == []
    assert _wait_port_free(port)
    assert _user_nvflare_config() == before
