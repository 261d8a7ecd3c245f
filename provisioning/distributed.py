"""A real study's kits: each hospital makes its own private key, which never leaves the hospital.

``fedseg provision create`` (``fedseg.provisioning.kits``) makes every kit, private keys included,
on the lead's machine: right for POC and labs, but then every hospital's key travels. This module
is the path of a real study, on NVFlare 2.9's distributed provisioning (``nvflare cert init``,
``cert request``, ``cert approve``, ``package``; nvflare/tool/cert, nvflare/tool/package):

1. **Lead** (``prepare``, ``fedseg provision ca``): the consortium folder as ``provision`` makes it,
   but with the server's and admins' kits only (NVFlare never makes a key or certificate for a
   hospital's name), plus ``ca/signing/`` (the root CA as ``nvflare cert approve`` reads it:
   ``rootCA.pem``, ``rootCA.key``, ``ca.json``) and ``ca/profile.yml`` (NVFlare's project profile:
   the server's host, port, scheme, mutual TLS). The root CA's fingerprint is told to each
   hospital over a second channel (phone, letter), so it can check the certificate it gets back.
2. **Hospital** (``request``, ``fedseg provision request``): ``nvflare cert request`` writes
   ``OUT/<hospital>/``: the private key (0600, stays), the signing request and
   ``<hospital>.request.zip`` (the request, its metadata and the participant file; no key).
3. **Lead** (``approve``, ``fedseg provision approve``): checks the zip names this consortium and
   one of its hospitals with its organisation and holds no private key, then ``nvflare cert
   approve`` signs it: ``approved/<hospital>.signed.zip`` (certificate, root CA, server endpoint)
   goes back to the hospital. The request is kept in ``requests/``.
4. **Hospital** (``assemble``, ``fedseg provision assemble``): ``nvflare package`` checks the root
   CA's fingerprint and that the certificate matches the local key, and builds the kit; then the
   same finishing steps a centrally made kit gets (``finish_site_kit``): log streaming off, no
   custom code and the class allow list (``site_control.lock_down_kit``), the site guide,
   owner-only permissions. The kit equals a centrally made one but for its key.

NVFlare's kit assembly ignores the project-level ``allow_log_streaming: false`` that
``fedseg.provisioning.project`` relies on (``nvflare package`` rebuilds the project from the signed
zip with only its connection security, nvflare/tool/package/package_commands.py), and a
participant's ``false`` is ignored too (``Entity.get_prop_fb``), so ``finish_site_kit`` writes
it into the kit's ``local/resources.json.default`` after assembly.

Every ``nvflare`` call runs under umask 077 with a throw-away ``HOME`` (``cert request`` and
``approve`` write audit records to ``~/.nvflare``; the request folder is always passed explicitly).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedseg.lightning_modules.owner_only import owner_only_dir
from fedseg.provisioning.consortium import Consortium, ConsortiumError, HospitalSpec, write_consortium, write_project_yml
from fedseg.provisioning.kits import (
    DEFAULT_OUT,
    SIGNING_CA_DIR,
    ConsortiumKits,
    KitsError,
    check_output_folder,
    open_kits,
    provision,
    restrict_permissions,
    write_kit_site_guide,
)

PROFILE_FILE = "profile.yml"  # ca/profile.yml: NVFlare's project profile for `nvflare cert approve`
GUIDES_DIR = "guides"  # guides/<hospital>.md: the first steps, sent to each hospital before it has a kit
REQUESTS_DIR = "requests"  # the request zips the lead received (no key in any of them)
APPROVED_DIR = "approved"  # the signed zips the lead sent back
#: Validity of a hospital's certificate, in days (NVFlare's default for `cert approve`); never past the root CA's.
DEFAULT_CERT_DAYS = 1095
_PRIVATE_KEY_MARKERS = (b"PRIVATE KEY-----",)


@dataclass(frozen=True)
class SiteRequest:
    """What ``request`` made at the hospital: ``folder`` keeps the private key; ``zip`` is sent to the lead."""

    name: str
    folder: Path
    zip: Path

    @property
    def key(self) -> Path:
        return self.folder / f"{self.name}.key"


# ------------------------------------------------------------------------------------------ lead


def signing_ca(kits: ConsortiumKits) -> Path:
    """``ca/signing/``: the consortium's root CA in the layout ``nvflare cert approve --ca-dir`` reads."""
    return kits.ca_workspace / SIGNING_CA_DIR


def profile_path(kits: ConsortiumKits) -> Path:
    return kits.ca_workspace / PROFILE_FILE


def prepare(consortium: Consortium, out: Path = DEFAULT_OUT) -> ConsortiumKits:
    """The lead's side: server and admin kits, the signing CA and the project profile; no hospital key.

    The consortium file's hospitals are the ones ``approve`` will sign. Refuses what ``provision``
    refuses (a folder git could commit, an existing consortium folder).
    """
    kits = provision(consortium, out, hospital_kits=False)
    try:
        _write_signing_ca(kits)
        _write_profile(kits)
        owner_only_dir(kits.folder / REQUESTS_DIR)
        owner_only_dir(kits.folder / APPROVED_DIR)
        for hospital in consortium.hospitals:
            write_request_guide(kits, hospital)
        restrict_permissions(kits.folder)
    except BaseException:
        shutil.rmtree(kits.folder, ignore_errors=True)
        raise
    return kits


def write_request_guide(kits: ConsortiumKits, hospital: HospitalSpec) -> Path:
    """``guides/<hospital>.md``: the hospital IT admin's steps up to a running site (no secret in it).

    The kit's own ``SITE_GUIDE.md`` exists only once the kit is assembled; this guide gets the
    hospital there. The root CA fingerprint is deliberately not in it: it travels by another channel.
    """
    from fedseg import __version__

    server = kits.consortium.server
    text = _REQUEST_GUIDE.format(hospital=hospital.name, org=hospital.org, consortium=kits.consortium.name,
                                 host=server.host, port=server.port, version=__version__,
                                 python=f"{sys.version_info.major}.{sys.version_info.minor}")
    path = owner_only_dir(kits.folder / GUIDES_DIR) / f"{hospital.name}.md"
    path.write_text(text)
    path.chmod(0o600)
    return path


def open_distributed(folder: Path) -> ConsortiumKits:
    """A consortium folder made by ``prepare``; ``KitsError`` naming the folder if it is not one."""
    kits = open_kits(folder)
    for path in (signing_ca(kits) / "rootCA.key", signing_ca(kits) / "ca.json", profile_path(kits)):
        if not path.is_file():
            raise KitsError(f"{kits.folder}: not a consortium whose hospitals make their own keys (no {path}); "
                            "it was made by `fedseg provision create`, whose hospital kits come from "
                            "`fedseg provision create` or `add-hospital`")
    return kits


def root_ca_fingerprint(kits_or_pem: ConsortiumKits | bytes) -> str:
    """The root CA certificate's SHA-256 fingerprint as NVFlare writes it (``SHA256:AB:CD:...``)."""
    from cryptography import x509
    from nvflare.tool.cert.fingerprint import cert_fingerprint_sha256

    pem = kits_or_pem.root_ca_pem() if isinstance(kits_or_pem, ConsortiumKits) else kits_or_pem
    return cert_fingerprint_sha256(x509.load_pem_x509_certificate(pem))


def approve(folder: Path, request_zip: Path, *, add: bool = False, valid_days: int = DEFAULT_CERT_DAYS) -> Path:
    """Sign a hospital's request zip with the consortium's root CA; the signed zip to send back.

    The zip must name this consortium and one of its hospitals with that hospital's organisation
    (``add=True`` adds a hospital the consortium file does not list yet), and must hold no private
    key. A hospital that was approved already is refused: its kit would be a second identity.
    """
    kits = open_distributed(folder)
    request_zip = Path(request_zip)
    meta = read_request(request_zip)
    consortium = kits.consortium
    if meta["project"] != consortium.name:
        raise KitsError(f"{request_zip}: a request for consortium {meta['project']!r}, not {consortium.name!r}; "
                        f"the hospital runs `fedseg provision request --consortium {consortium.name}`")
    if meta["kind"] != "site" or meta["cert_type"] != "client":
        raise KitsError(f"{request_zip}: a request for a {meta['kind']} ({meta['cert_type']}) certificate; "
                        "only hospitals (sites) make their own keys here")
    name, org = meta["name"], meta["org"]
    listed = {h.name: h for h in consortium.hospitals}
    if name not in listed:
        if not add:
            raise KitsError(f"{request_zip}: hospital {name!r} is not in {kits.folder / 'consortium.yml'} "
                            f"({', '.join(listed)}); check who sent it, then approve with --add to add it")
        try:
            consortium = consortium.with_hospital(HospitalSpec(name, org))
        except ConsortiumError as err:
            raise KitsError(f"{request_zip}: cannot add hospital {name!r}: {err}") from None
    elif listed[name].org != org:
        raise KitsError(f"{request_zip}: hospital {name!r} asks for organisation {org!r}, but "
                        f"{kits.folder / 'consortium.yml'} gives it {listed[name].org!r}")
    signed = kits.folder / APPROVED_DIR / f"{name}.signed.zip"
    if signed.exists():
        raise KitsError(f"hospital {name!r} was approved already ({signed}); a second certificate would be a second "
                        f"identity for it. To replace a lost key, move {signed} away first and approve the new request")
    days = min(valid_days, _days_left(kits.root_ca_pem()))
    kept = owner_only_dir(kits.folder / REQUESTS_DIR) / f"{name}.request.zip"
    shutil.copyfile(request_zip, kept)
    kept.chmod(0o600)
    owner_only_dir(signed.parent)
    run_nvflare(["cert", "approve", str(kept.resolve()), "--ca-dir", str(signing_ca(kits)), "--profile",
                 str(profile_path(kits)), "--out", str(signed.resolve()), "--valid-days", str(days)],
                cwd=kits.ca_workspace, log=kits.ca_workspace / "approve.log", what=f"approving {request_zip}")
    signed.chmod(0o600)
    if consortium is not kits.consortium:
        write_consortium(consortium, kits.folder / "consortium.yml")
        write_project_yml(consortium, kits.project_yml, hospitals=False)
        for path in (kits.folder / "consortium.yml", kits.project_yml):
            path.chmod(0o600)
    return signed


def read_request(request_zip: Path) -> dict[str, Any]:
    """``request.json`` of a request zip (project, name, org, kind, cert_type); ``KitsError`` naming the zip.

    Refuses a zip that holds private key material: a request carries only the signing request.
    """
    request_zip = Path(request_zip)
    try:
        with zipfile.ZipFile(request_zip) as zf:
            contents = {info.filename: zf.read(info) for info in zf.infolist() if not info.is_dir()}
    except FileNotFoundError:
        raise KitsError(f"{request_zip}: request zip not found") from None
    except (OSError, zipfile.BadZipFile) as err:
        raise KitsError(f"{request_zip}: not a request zip from `fedseg provision request` ({err})") from None
    for member, data in contents.items():
        if any(marker in data for marker in _PRIVATE_KEY_MARKERS):
            raise KitsError(f"{request_zip}: {member} holds a private key. A request carries only the signing "
                            "request; the key must stay at the hospital. Refused; the hospital should make a new key")
    try:
        meta = json.loads(contents["request.json"])
        if meta.get("artifact_type") != "nvflare.cert.request":
            raise ValueError(f"artifact_type {meta.get('artifact_type')!r}")
        return {key: meta[key] for key in ("project", "name", "org", "kind", "cert_type")}
    except (KeyError, ValueError, TypeError) as err:
        raise KitsError(f"{request_zip}: not a request zip from `fedseg provision request` "
                        f"(request.json missing or unreadable: {err})") from None


def _write_signing_ca(kits: ConsortiumKits) -> Path:
    """``ca/signing/``: the root certificate and key from NVFlare's CA state, and ``ca.json``."""
    from nvflare.lighter.constants import CtxKey

    state = json.loads(kits.ca_state.read_text())
    pem, key = state.get(CtxKey.ROOT_CERT), state.get(CtxKey.ROOT_PRI_KEY)
    if not pem or not key:
        raise KitsError(f"{kits.ca_state}: no root certificate and key in NVFlare's CA state")
    folder = owner_only_dir(signing_ca(kits))
    for name, text in (("rootCA.pem", pem), ("rootCA.key", key)):
        (folder / name).write_text(text)
        (folder / name).chmod(0o600)
    if pem.encode() != kits.root_ca_pem():
        raise KitsError(f"{kits.ca_state}: its root certificate differs from the server kit's {kits.server_kit}")
    meta = {"project": kits.consortium.name, "provision_version": "00",
            "rootCA_fingerprint": root_ca_fingerprint(kits), "made_by": "fedseg provision ca"}
    (folder / "ca.json").write_text(json.dumps(meta, indent=2) + "\n")
    (folder / "ca.json").chmod(0o600)
    return folder


def _write_profile(kits: ConsortiumKits) -> Path:
    """``ca/profile.yml``: NVFlare's project profile with the server kit's own endpoint and scheme."""
    from fedseg.provisioning.project import write_yaml

    server = json.loads((kits.server_kit / "startup" / "fed_server.json").read_text())["servers"][0]
    port = kits.consortium.server.port
    profile = {"name": kits.consortium.name, "scheme": server["service"]["scheme"],
               "connection_security": server.get("connection_security", "mtls"),
               "server": {"host": kits.consortium.server.host, "fed_learn_port": port, "admin_port": port}}
    path = write_yaml(profile, profile_path(kits), "# NVFlare project profile for `nvflare cert approve` (made by fedseg)\n")
    path.chmod(0o600)
    return path


def _days_left(root_pem: bytes) -> int:
    """Whole days until the root CA expires (a certificate may not outlive it)."""
    import datetime

    from cryptography import x509

    cert = x509.load_pem_x509_certificate(root_pem)
    left = cert.not_valid_after_utc - datetime.datetime.now(datetime.timezone.utc)
    return max(1, left.days)


# ------------------------------------------------------------------------------------------ hospital


def request(consortium: str, hospital: HospitalSpec, out: Path) -> SiteRequest:
    """The hospital's first step: a private key and a signing request in ``out/<hospital>/``.

    ``out/<hospital>/<hospital>.request.zip`` goes to the lead; the key (0600) never leaves.
    Refuses a folder git could commit and an existing request folder (its key may be in use).
    """
    from fedseg.provisioning.consortium import hospital_problems
    from fedseg.provisioning.project import write_yaml

    problems = hospital_problems(consortium, hospital)
    if problems:
        raise KitsError("cannot make this request: " + "; ".join(problems))
    folder = Path(out).resolve() / hospital.name
    check_output_folder(folder)
    if folder.exists():
        raise KitsError(f"{folder} exists: it may hold this site's key from an earlier request. Use it "
                        "(its request zip is still valid), or move it away to make a new key")
    owner_only_dir(folder.parent)
    with tempfile.TemporaryDirectory(prefix="fedseg-request-") as tmp:
        participant = Path(tmp) / "site.yml"
        write_yaml({"name": consortium, "description": f"fedseg site {hospital.name}",
                    "participants": [{"name": hospital.name, "type": "client", "org": hospital.org}],
                    "builders": _kit_builders()}, participant)
        try:
            run_nvflare(["cert", "request", "--participant", str(participant), "--out", str(folder)],
                        cwd=Path(tmp), log=Path(tmp) / "request.log", what="making the key and signing request")
        except KitsError:
            shutil.rmtree(folder, ignore_errors=True)
            raise
    restrict_permissions(folder)
    made = SiteRequest(hospital.name, folder, folder / f"{hospital.name}.request.zip")
    if not made.zip.is_file() or not made.key.is_file():
        raise KitsError(f"`nvflare cert request` did not write {made.zip} and {made.key}")
    return made


def _kit_builders() -> list[dict[str, Any]]:
    """The builders of the ``project.yml`` that ``fedseg provision create`` runs (``fedseg.provisioning.project``).

    ``nvflare cert request`` keeps them in the request folder's ``site.yaml`` and ``nvflare package``
    builds the kit with them (its own certificate step in place of the ``CertBuilder``); without them
    the kit's start script would differ from a centrally made one (``config_folder=`` left empty).
    """
    from fedseg.provisioning.project import Participant, project_config

    return project_config("fedseg", Participant("fl.invalid", "server", "fedseg"), 8002, [])["builders"]


def assemble(signed_zip: Path, request_dir: Path, fingerprint: str, out: Path) -> Path:
    """The hospital's last step: its startup kit in ``out`` from the lead's signed zip and its own key.

    ``fingerprint`` is the root CA fingerprint the lead told the hospital over another channel;
    NVFlare refuses a signed zip whose root CA differs, or whose certificate does not match the
    key in ``request_dir``. The kit then gets the finishing steps of a centrally made kit
    (``finish_site_kit``). The key stays in ``request_dir`` too; delete that folder once the site runs.
    """
    from nvflare.tool.cert.fingerprint import normalize_sha256_fingerprint

    signed_zip, request_dir, out = Path(signed_zip).resolve(), Path(request_dir).resolve(), Path(out).resolve()
    if not normalize_sha256_fingerprint(fingerprint):
        raise KitsError(f"{fingerprint!r} is not a SHA-256 fingerprint (SHA256:AB:CD:... or 64 hex digits): "
                        "ask the study lead for the root CA fingerprint that `fedseg provision ca` printed")
    if not signed_zip.is_file():
        raise KitsError(f"{signed_zip}: signed zip not found")
    if not (request_dir / "request.json").is_file():
        raise KitsError(f"{request_dir}: not a request folder made by `fedseg provision request` (no request.json)")
    check_output_folder(out)
    if out.exists():
        raise KitsError(f"{out} exists; choose a new folder for the kit")
    with tempfile.TemporaryDirectory(prefix="fedseg-assemble-") as tmp:
        workspace = Path(tmp) / "workspace"
        run_nvflare(["package", str(signed_zip), "--request-dir", str(request_dir), "--fingerprint", fingerprint,
                     "-w", str(workspace)], cwd=Path(tmp), log=Path(tmp) / "package.log",
                    what=f"assembling the kit from {signed_zip}")
        kits = [p for p in workspace.glob("*/prod_*/*") if (p / "startup" / "fed_client.json").is_file()]
        if len(kits) != 1:
            raise KitsError(f"`nvflare package` made {len(kits)} site kits from {signed_zip}, not 1")
        owner_only_dir(out.parent)
        shutil.move(str(kits[0]), str(out))
    finish_site_kit(out, own_key=True)
    restrict_permissions(request_dir)  # `nvflare package` left the certificate and signed.json there, 0644
    return out


def finish_site_kit(kit: Path, *, own_key: bool = False) -> Path:
    """What fedseg adds to a hospital's NVFlare kit: log streaming off, the lock-down of
    ``fedseg.provisioning.site_control`` (as ``provision`` does), ``SITE_GUIDE.md``, owner-only.

    The names come from the kit itself (``startup/fed_client.json`` and its certificate), so an
    assembled kit and a centrally made one end up the same.
    """
    kit = Path(kit)
    client_json = kit / "startup" / "fed_client.json"
    try:
        client = json.loads(client_json.read_text())
        server = client["servers"][0]
        consortium, hospital = server["name"], client["client"]["fqsn"]
        host, port = server["service"]["target"].rsplit(":", 1)
    except (OSError, ValueError, KeyError, IndexError, TypeError) as err:
        raise KitsError(f"{client_json}: not a hospital's startup kit ({err})") from None
    resources = kit / "local" / "resources.json.default"
    try:
        config = json.loads(resources.read_text())
    except (OSError, ValueError) as err:
        raise KitsError(f"{resources}: not NVFlare's site resources ({err})") from None
    if config.get("allow_log_streaming") is not False:  # see the module doc: nothing a site logs goes to the server
        # In place, so the file stays byte for byte what NVFlare writes for `allow_log_streaming: false`.
        text, n = re.subn(r'("allow_log_streaming"\s*:\s*)true\b', r"\1false", resources.read_text())
        if n != 1:
            config["allow_log_streaming"] = False
            text = json.dumps(config, indent=2) + "\n"
        resources.write_text(text)
    # The same lock-down a centrally made kit gets (no custom code, the class allow list); after the
    # log streaming fix, since it copies resources.json.default into local/resources.json.
    from fedseg.provisioning.site_control import KitControlError, lock_down_kit

    try:
        lock_down_kit(kit)
    except KitControlError as err:
        raise KitsError(str(err)) from None
    write_kit_site_guide(kit, hospital, consortium, host, int(port), own_key=own_key)
    restrict_permissions(kit)
    return kit


# ------------------------------------------------------------------------------------------ nvflare


def run_nvflare(args: Sequence[str], *, cwd: Path, log: Path, what: str, timeout: int = 120) -> dict[str, Any]:
    """``nvflare --format json ARGS`` under umask 077 and a throw-away HOME; its JSON result.

    ``KitsError`` with NVFlare's own message and hint on failure; its output is appended to ``log``.
    """
    from fedseg.provisioning.nvflare_cli import last_json_object, nvflare_executable

    cmd = [nvflare_executable(), "--format", "json", *args]
    with tempfile.TemporaryDirectory(prefix="fedseg-nvflare-home-") as home:
        env = {**os.environ, "HOME": home, "PYTHONUNBUFFERED": "1"}
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        try:
            proc = subprocess.run(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  umask=0o077, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise KitsError(f"{what}: `nvflare {' '.join(args[:2])}` did not finish within {timeout} s") from None
    with Path(log).open("a") as out:
        out.write("$ " + " ".join(cmd) + "\n" + proc.stdout + proc.stderr)
    Path(log).chmod(0o600)
    doc = last_json_object(proc.stdout) or last_json_object(proc.stderr) or {}
    if proc.returncode != 0 or doc.get("status") != "ok":
        detail = "; ".join(str(doc[k]) for k in ("message", "hint", "detail") if doc.get(k))
        data = doc.get("data") if isinstance(doc.get("data"), dict) else {}
        detail = detail or "; ".join(f"{k}: {v}" for k, v in data.items()) or (proc.stderr or proc.stdout).strip()[-500:]
        verb = " ".join(args[:2]) if args[0] == "cert" else args[0]
        raise KitsError(f"{what}: `nvflare {verb}` failed: {detail or f'exit status {proc.returncode}'}")
    return doc.get("data") or {}


_REQUEST_GUIDE = """\
# {hospital}: joining the federated study {consortium}

These are the steps of **{hospital}**'s IT admin, on the machine that will train (Linux, Python
{python} recommended). This site makes its own private key there; it never leaves that machine.
Only a signing request goes to the study lead, and a signed certificate comes back.

From the study lead you need: this guide, the fedseg {version} wheel or source folder and, **by
phone or in person, not by e-mail with the zips**, the root CA fingerprint (`SHA256:AB:CD:...`).

## 1. Install fedseg {version}

```bash
python3 -m venv ~/fedseg-env && . ~/fedseg-env/bin/activate
pip install <the fedseg {version} wheel or source folder>
fedseg --version
```

## 2. Make this site's key and a signing request

```bash
fedseg provision request --consortium {consortium} --name {hospital} --org {org} --out /opt/fedseg/request
```

`/opt/fedseg/request/{hospital}/{hospital}.key` is this site's private key (readable by you only).
Send the study lead **only** `/opt/fedseg/request/{hospital}/{hospital}.request.zip`.

## 3. Assemble the kit from the signed zip

The study lead sends back `{hospital}.signed.zip`. With the fingerprint you were told:

```bash
fedseg provision assemble {hospital}.signed.zip --request-dir /opt/fedseg/request/{hospital} \\
    --fingerprint SHA256:AB:CD:... --out /opt/fedseg/{hospital}
```

It refuses a zip whose root CA does not have that fingerprint: then the zip did not come from the
study lead; ask them. The kit `/opt/fedseg/{hospital}` connects out to `{host}:{port}` (no inbound
port), and its `SITE_GUIDE.md` has the next steps: point the site at its data, check the data,
start the site. Once the site has connected, delete `/opt/fedseg/request/{hospital}` (it holds a
second copy of the key).
"""


__all__ = [
    "APPROVED_DIR",
    "PROFILE_FILE",
    "REQUESTS_DIR",
    "GUIDES_DIR",
    "SiteRequest",
    "approve",
    "assemble",
    "finish_site_kit",
    "open_distributed",
    "prepare",
    "read_request",
    "request",
    "root_ca_fingerprint",
    "run_nvflare",
    "signing_ca",
    "write_request_guide",
]
