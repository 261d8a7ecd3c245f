"""A real study's kits: each hospital makes its own key (``fedseg provision ca/request/approve/assemble``).

The flow runs the real ``nvflare cert`` and ``nvflare package`` (a few seconds). The checks: the
lead's folder never holds a hospital's private key, an assembled kit equals a centrally made one
but for its key, bad requests are refused with the file named. The e2e test starts the server and
a hospital whose kit was assembled that way on localhost and runs a tiny FedAvg job.
"""

from __future__ import annotations

import json
import stat
import zipfile
from pathlib import Path

import pytest
import yaml

from fedseg.provisioning.consortium import HospitalSpec, parse_consortium
from fedseg.provisioning.kits import KitsError, add_hospital, provision

HOSPITALS = ("hospital-a", "hospital-b")
LEAD = "lead@study.example.org"


def _consortium_doc(port: int = 8002, hospitals=HOSPITALS) -> dict:
    return {
        "name": "study",
        "server": {"host": "localhost", "port": port, "org": "consortium"},
        "hospitals": [{"name": h, "org": h.replace("-", "_")} for h in hospitals],
        "admins": [{"email": LEAD, "org": "consortium", "role": "lead"}],
    }


def _request_assemble(lead_folder: Path, hospital: str, site_root: Path, fingerprint: str) -> Path:
    """A hospital's whole path through the CLI; only the request zip and the signed zip cross over."""
    from fedseg.cli import main

    org = hospital.replace("-", "_")
    assert main(["provision", "request", "--consortium", "study", "--name", hospital, "--org", org,
                 "--out", str(site_root)]) == 0
    request_zip = site_root / hospital / f"{hospital}.request.zip"
    inbox = lead_folder.parent / "inbox"  # what the lead received: the zip alone
    inbox.mkdir(exist_ok=True)
    received = inbox / request_zip.name
    received.write_bytes(request_zip.read_bytes())
    assert main(["provision", "approve", str(lead_folder), str(received)]) == 0
    signed = lead_folder / "approved" / f"{hospital}.signed.zip"
    returned = site_root / signed.name
    returned.write_bytes(signed.read_bytes())
    kit = site_root / "kit"
    assert main(["provision", "assemble", str(returned), "--request-dir", str(site_root / hospital),
                 "--fingerprint", fingerprint, "--out", str(kit)]) == 0
    return kit


def _private_keys_under(folder: Path) -> dict[str, bytes]:
    """Every PEM private key block found in any file under ``folder`` (zips opened), by where it was."""
    found: dict[str, bytes] = {}
    for path in folder.rglob("*"):
        if not path.is_file():
            continue
        blobs = {str(path): path.read_bytes()}
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                blobs.update({f"{path}!{n}": zf.read(n) for n in zf.namelist()})
        for where, data in blobs.items():
            if b"PRIVATE KEY-----" in data:
                found[where] = data
    return found


def _key_body(pem: bytes) -> bytes:
    return b"".join(line for line in pem.splitlines() if line and not line.startswith(b"-----"))


def _assert_lead_never_held(lead_folder: Path, hospital_kits: dict[str, Path]) -> None:
    """No hospital's key bytes, no *.key named for it, no entry for it in NVFlare's CA state."""
    state = json.loads(next(lead_folder.glob("ca/*/state/cert.json")).read_text())
    held = _private_keys_under(lead_folder)
    for hospital, kit in hospital_kits.items():
        key = _key_body((kit / "startup" / "client.key").read_bytes())
        assert key and not any(key in _key_body(data) or key in data.replace(b"\\n", b"") for data in held.values()), hospital
        assert not [p for p in lead_folder.rglob("*.key") if hospital in str(p.relative_to(lead_folder))]
        assert hospital not in state and not (lead_folder / hospital).exists()
    # what the lead's folder does hold: the server's, the admins' and the root CA's keys only
    assert {Path(w.split("!")[0]).name for w in held} <= {"server.key", "client.key", "rootCA.key", "cert.json"}


def _doctored(request_zip: Path, out: Path, **changes) -> Path:
    """A copy of ``request_zip`` whose request.json says otherwise (what a wrong or forged request looks like)."""
    with zipfile.ZipFile(request_zip) as src, zipfile.ZipFile(out, "w") as dst:
        for name in src.namelist():
            data = src.read(name)
            if name == "request.json":
                data = json.dumps({**json.loads(data), **changes}).encode()
            dst.writestr(name, data)
    return out


def test_hospitals_make_their_own_keys_get_a_kit_like_a_central_one_and_bad_requests_are_refused(tmp_path, capsys):
    from cryptography import x509

    from fedseg.cli import main
    from fedseg.provisioning.distributed import approve, assemble, request, root_ca_fingerprint
    from fedseg.provisioning.kits import open_kits
    from fedseg.provisioning.site_control import is_locked_down

    consortium_file = tmp_path / "consortium.yml"
    consortium_file.write_text(yaml.safe_dump(_consortium_doc(port=18998)))
    assert main(["provision", "ca", str(consortium_file), "--out", str(tmp_path / "lead")]) == 0
    out = capsys.readouterr().out
    lead = (tmp_path / "lead" / "study").resolve()
    kits = open_kits(lead)
    fingerprint = root_ca_fingerprint(kits)
    assert f"root CA fingerprint: {fingerprint}" in out
    assert sorted(p.name for p in lead.iterdir()) == sorted(
        ["approved", "ca", "consortium.yml", "guides", "project.yml", "requests", "localhost", LEAD])
    assert [p["name"] for p in yaml.safe_load(kits.project_yml.read_text())["participants"]] == ["localhost", LEAD]
    guide = (lead / "guides" / "hospital-b.md").read_text()  # what the lead sends each hospital first
    assert "fedseg provision request --consortium study --name hospital-b --org hospital_b" in guide
    assert "fedseg provision assemble hospital-b.signed.zip" in guide and fingerprint not in guide

    kit = _request_assemble(lead, "hospital-a", tmp_path / "hospital-a", fingerprint)
    _assert_lead_never_held(lead, {"hospital-a": kit})

    # The kit: signed by the consortium's root CA for this hospital, trusting that root CA, owner-only.
    root = x509.load_pem_x509_certificate(kits.root_ca_pem())
    cert = x509.load_pem_x509_certificate((kit / "startup" / "client.crt").read_bytes())
    cert.verify_directly_issued_by(root)
    assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == "hospital-a"
    assert cert.not_valid_after_utc <= root.not_valid_after_utc
    assert (kit / "startup" / "rootCA.pem").read_bytes() == kits.root_ca_pem()
    for path in [kit, *kit.rglob("*"), *(tmp_path / "hospital-a" / "hospital-a").rglob("*")]:
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path
    assert stat.S_IMODE((kit / "startup" / "client.key").stat().st_mode) == 0o600

    # ... and byte for byte the kit `fedseg provision create` makes for the same hospital, but for its
    # key, certificate and guide: the same files, start scripts, policies, server endpoint, log streaming off.
    central = provision(parse_consortium(_consortium_doc(port=18998)), tmp_path / "central")
    central_kit = central.hospital_kit("hospital-a")
    files = lambda k: sorted(str(p.relative_to(k)) for p in k.rglob("*"))  # noqa: E731
    assert files(kit) == files(central_kit)
    different = {"startup/client.key", "startup/client.crt", "startup/rootCA.pem", "SITE_GUIDE.md"}
    for name in set(files(kit)) - different:
        if (kit / name).is_file():
            assert (kit / name).read_bytes() == (central_kit / name).read_bytes(), name
    assert json.loads((kit / "local" / "resources.json.default").read_text())["allow_log_streaming"] is False
    assert json.loads((kit / "local" / "resources.json").read_text())["allow_log_streaming"] is False
    assert is_locked_down(kit)  # no custom code for any role, fedseg's class allow list
    guide = (kit / "SITE_GUIDE.md").read_text()
    for step in ("# hospital-a: site guide (study)", "localhost:18998", "the key never left this machine",
                 "fedseg provision site-config KIT", "KIT/startup/start.sh"):
        assert step in guide, step

    # --- what the lead refuses, naming the file: another consortium's request, the wrong organisation,
    # a hospital the consortium file does not list (unless --add), a second approval, a zip with a key.
    inbox = lead.parent / "inbox"  # _request_assemble's: the zips the lead received
    mine = lead / "requests" / "hospital-a.request.zip"
    other = _doctored(mine, inbox / "other.request.zip", project="other_study")
    with pytest.raises(KitsError, match=r"other.request.zip: a request for consortium 'other_study', not 'study'"):
        approve(lead, other)
    wrong_org = _doctored(mine, inbox / "org.request.zip", name="hospital-b", org="someone_else")
    with pytest.raises(KitsError, match=r"asks for organisation 'someone_else', but .* gives it 'hospital_b'"):
        approve(lead, wrong_org)
    assert main(["provision", "approve", str(lead), str(mine)]) == 2
    assert "hospital 'hospital-a' was approved already" in capsys.readouterr().err
    stranger = request("study", HospitalSpec("hospital-c", "hospital_c"), tmp_path / "c")
    with pytest.raises(KitsError, match=r"hospital 'hospital-c' is not in .*consortium.yml .*--add"):
        approve(lead, stranger.zip)
    leaky = tmp_path / "leaky.request.zip"
    with zipfile.ZipFile(stranger.zip) as src, zipfile.ZipFile(leaky, "w") as dst:
        for name in src.namelist():
            dst.writestr(name, src.read(name))
        dst.writestr("hospital-c.key", stranger.key.read_bytes())
    with pytest.raises(KitsError, match=r"leaky.request.zip: hospital-c.key holds a private key"):
        approve(lead, leaky)
    with pytest.raises(KitsError, match=r"request.json: not a request zip"):
        approve(lead, stranger.folder / "request.json")
    assert sorted(p.name for p in (lead / "approved").iterdir()) == ["hospital-a.signed.zip"]
    assert main(["provision", "approve", str(lead), str(stranger.zip), "--add"]) == 0
    assert open_kits(lead).consortium.hospital_names == (*HOSPITALS, "hospital-c")
    assert "hospital-c" not in (lead / "project.yml").read_text()  # nvflare provision never makes its key
    with pytest.raises(KitsError, match="may hold this site's key"):  # a new request would replace the key
        request("study", HospitalSpec("hospital-c", "hospital_c"), tmp_path / "c")
    with pytest.raises(KitsError, match=r"consortium: 'my study' is not .*name: 'hospital.c' is not .*org: 'a-b'"):
        request("my study", HospitalSpec("hospital.c", "a-b"), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()

    # --- what the hospital refuses: a signed zip whose root CA is not the one the lead announced
    signed = lead / "approved" / "hospital-c.signed.zip"
    wrong = "SHA256:" + ":".join(["AB"] * 32)
    with pytest.raises(KitsError, match=r"`nvflare package` failed: Root CA SHA256 fingerprint does not match"):
        assemble(signed, stranger.folder, wrong, tmp_path / "c" / "kit")
    assert not (tmp_path / "c" / "kit").exists()
    assert main(["provision", "assemble", str(signed), "--request-dir", str(stranger.folder), "--fingerprint",
                 "not-a-fingerprint", "--out", str(tmp_path / "c" / "kit")]) == 2
    assert "is not a SHA-256 fingerprint" in capsys.readouterr().err

    # --- the two paths do not mix: add-hospital refuses this consortium, approve refuses a central one
    with pytest.raises(KitsError, match="make their own keys"):
        add_hospital(lead, HospitalSpec("hospital-d", "hospital_d"))
    with pytest.raises(KitsError, match="not a consortium whose hospitals make their own keys"):
        approve(central.folder, stranger.zip)
    _assert_lead_never_held(lead, {"hospital-a": kit})

    _check_server_storage(kits, tmp_path)


def _check_server_storage(kits, tmp_path: Path) -> None:
    """One default for the server's storage; created owner-only; a server refuses to start on an open one."""
    import os
    import subprocess
    import sys

    from fedseg.cli import main
    from fedseg.provisioning.consortium import DEFAULT_SERVER_STORAGE, default_server_storage
    from fedseg.provisioning.kits import set_server_storage
    from fedseg.provisioning.storage_guard import GUARD_LINE, StorageError, check_storage

    # the kit made at provisioning and `server-storage` without --storage name the same folder
    def job_store(kit: Path) -> str:
        resources = json.loads((kit / "local" / "resources.json").read_text())
        return next(c for c in resources["components"] if c["id"] == "job_manager")["args"]["uri_root"]

    assert job_store(kits.server_kit) == f"{kits.consortium.server_storage}/jobs" == "/var/lib/fedseg/study/jobs"
    assert kits.consortium.server_storage == default_server_storage("study") == DEFAULT_SERVER_STORAGE.format(name="study")
    set_server_storage(kits.server_kit, create=False)
    assert job_store(kits.server_kit) == "/var/lib/fedseg/study/jobs"
    script = kits.server_kit / "startup" / "start.sh"
    assert script.read_text().count(GUARD_LINE) == 1  # installed at provisioning, once

    # `server-storage --storage`: the folders are created 0700
    storage = tmp_path / "server-storage"
    assert main(["provision", "server-storage", str(kits.server_kit), "--storage", str(storage)]) == 0
    for folder in (storage, storage / "jobs", storage / "snapshots"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    # a missing folder is created owner-only by the guard before the server starts
    (storage / "snapshots").rmdir()
    assert storage / "snapshots" in check_storage(kits.server_kit)
    assert stat.S_IMODE((storage / "snapshots").stat().st_mode) == 0o700

    # storage others can read: start.sh stops before NVFlare starts, naming the folder and the fix
    storage.chmod(0o755)
    with pytest.raises(StorageError, match=r"server-storage is open to other accounts \(mode 755\).*chmod -R go-rwx"):
        check_storage(kits.server_kit)
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    started = subprocess.run(["bash", str(script)], cwd=kits.server_kit, env=env, capture_output=True, text=True,
                             timeout=60)
    assert started.returncode == 1 and f"{storage} is open to other accounts" in started.stderr, started
    assert not (kits.server_kit / "log.txt").exists()  # the server never started
    with pytest.raises(KitsError, match="open to other accounts"):
        set_server_storage(kits.server_kit, storage)
    storage.chmod(0o700)


@pytest.mark.e2e
@pytest.mark.timeout(420)  # 240 s measured on 2 cores at load 9 (other test runs); far less on a quiet machine
def test_a_kit_assembled_from_the_hospitals_own_key_connects_and_runs_a_job(tmp_path):
    """One hospital (the job needs one site): its kit from its own key, the server's from `ca`."""
    import time

    from conftest import tiny_job, tiny_synth

    from fedseg.jobs.base import export
    from fedseg.run.kit_deployment import LocalKitDeployment
    from fedseg.provisioning.distributed import prepare, root_ca_fingerprint
    from fedseg.provisioning.kits import set_server_storage
    from fedseg.run.poc import COMPLETED, free_port

    started = time.perf_counter()
    port = free_port()
    kits = prepare(parse_consortium(_consortium_doc(port=port, hospitals=("hospital-a",))), tmp_path / "lead")
    site_kits = {"hospital-a": _request_assemble(kits.folder, "hospital-a", tmp_path / "hospital-a",
                                                 root_ca_fingerprint(kits))}
    _assert_lead_never_held(kits.folder, site_kits)
    set_server_storage(kits.server_kit, kits.server_kit / "storage")
    provisioned = time.perf_counter() - started

    synth = tiny_synth(tmp_path / "synth", sites=1, cases=3)
    job = tiny_job("fedavg", name="own-key", rounds=1, min_clients=1, cross_site_eval=False)
    job_dir = export(job, tmp_path / "jobs")

    deployment = LocalKitDeployment(kits, tmp_path / "run", site_kits=site_kits)
    with deployment:
        deployment.install_site_config("hospital-a", synth.datalists["site-1"])
        deployment.start(timeout=120)
        job_id = deployment.submit(job_dir)
        status = deployment.wait(job_id, timeout=180)
        tails = deployment._console_tails(40)
    print(f"e2e timings (s): provisioning {provisioned:.1f}, {deployment.timings}, "
          f"total {time.perf_counter() - started:.1f}")
    assert status == COMPLETED, f"job {job_id}: {status}\n{tails}"
    assert "Successfully registered" in (site_kits["hospital-a"] / "log.txt").read_text()
    assert (kits.server_kit / "storage" / "jobs" / job_id).is_dir()
    assert deployment.running_processes() == []
    _assert_lead_never_held(kits.folder, site_kits)  # the run left no hospital key at the lead's either
