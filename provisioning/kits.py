"""Startup kits for a consortium: ``nvflare provision``, adding a hospital later, permissions, site guides.

``provision(consortium, out)`` writes one consortium folder, ``out/<consortium name>/``::

    consortium.yml        the description the kits were made from (hospitals added later included)
    project.yml           NVFlare's project file made from it (api_version 3)
    ca/                   NVFlare's provisioning workspace: ca/<name>/state/cert.json holds the root
                          CA's private key (and every kit's). Stays with the project lead; never shipped.
    <server host>/        the server's startup kit, with SERVER_GUIDE.md and local/resources.json
                          (its job and snapshot storage: see ``set_server_storage``)
    <hospital>/           one kit per hospital, with SITE_GUIDE.md for its IT admin
    <admin e-mail>/       one kit per admin (the lead's submits jobs: --startup-kit)

Kits hold private keys: everything is written owner-only (folders 0700, files 0600 or 0700).
NVFlare itself writes the *.key files 0600 but leaves ca/<name>/state/cert.json, which holds every
private key including the root CA's, at the umask default (0644 here; nvflare/lighter/impl/cert.py,
_CertState.persist), so ``nvflare provision`` runs under umask 077 and the folder is tightened after.

Provisioning again would make a new root CA and silently invalidate every kit already handed
out, so an existing consortium folder is never provisioned over; ``add_hospital`` extends it with
the same root CA instead (``nvflare provision --add-client``, which rebuilds every kit into a new
``prod_NN``: only the new hospital's kit is taken from it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fedseg.lightning_modules.owner_only import owner_only_dir
from fedseg.provisioning.site_control import lock_down_kit
from fedseg.provisioning.consortium import (
    Consortium,
    ConsortiumError,
    HospitalSpec,
    load_consortium,
    write_consortium,
    write_project_yml,
)

DEFAULT_OUT = Path("kits")  # git-ignored in this repository (.gitignore: /kits/)
CONSORTIUM_FILE = "consortium.yml"
PROJECT_FILE = "project.yml"
CA_DIR = "ca"
SIGNING_CA_DIR = "signing"  # ca/signing/: the root CA as `nvflare cert approve` reads it (fedseg.provisioning.distributed)
SITE_GUIDE = "SITE_GUIDE.md"
SERVER_GUIDE = "SERVER_GUIDE.md"
SITE_CONFIG = "fedseg_site.json"  # read by fedseg.app.site_config from <kit>/local/


class KitsError(RuntimeError):
    """Provisioning could not be done; the message names the folder or file and what to do."""


@dataclass(frozen=True)
class ConsortiumKits:
    """A provisioned consortium folder and the description its kits were made from."""

    folder: Path
    consortium: Consortium

    @property
    def ca_workspace(self) -> Path:
        """NVFlare's provisioning workspace (``nvflare provision -w``): the CA state lives here."""
        return self.folder / CA_DIR

    @property
    def ca_state(self) -> Path:
        """NVFlare's CA state: the root certificate and private key, and every participant's key."""
        return self.ca_workspace / self.consortium.name / "state" / "cert.json"

    @property
    def project_yml(self) -> Path:
        return self.folder / PROJECT_FILE

    @property
    def server_kit(self) -> Path:
        return self.folder / self.consortium.server.host

    @property
    def lead_kit(self) -> Path:
        """The first lead's admin kit (the one ``nvflare job submit --startup-kit`` takes)."""
        return self.folder / self.consortium.leads[0].email

    def hospital_kit(self, name: str) -> Path:
        if name not in self.consortium.hospital_names:
            raise KeyError(f"{name!r} is not a hospital of {self.consortium.name} ({', '.join(self.consortium.hospital_names)})")
        return self.folder / name

    def admin_kit(self, email: str) -> Path:
        if email not in {a.email for a in self.consortium.admins}:
            raise KeyError(f"{email!r} is not an admin of {self.consortium.name}")
        return self.folder / email

    def kits(self) -> dict[str, Path]:
        """Every participant's kit folder by participant name."""
        return {name: self.folder / name for name in self.consortium.participant_names()}

    def root_ca_pem(self) -> bytes:
        """The root CA certificate every kit of this consortium trusts."""
        return (self.server_kit / "startup" / "rootCA.pem").read_bytes()


def open_kits(folder: Path) -> ConsortiumKits:
    """A consortium folder written by ``provision``; ``KitsError`` if ``folder`` is not one."""
    folder = Path(folder).resolve()
    description = folder / CONSORTIUM_FILE
    if not description.is_file():
        raise KitsError(f"{folder}: not a consortium folder made by `fedseg provision create` (no {CONSORTIUM_FILE})")
    kits = ConsortiumKits(folder, load_consortium(description))
    if not kits.ca_state.is_file():
        raise KitsError(f"{folder}: the CA state {kits.ca_state} is missing; without it no kit can be added "
                        "that the others trust")
    return kits


def check_output_folder(folder: Path) -> None:
    """Refuse a kit folder that git could commit: one inside a git work tree and not ignored by it.

    Kits hold private keys. This repository ignores ``/kits/`` (the default) and ``/workspace/``.
    """
    folder = Path(folder).resolve()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    work_tree = next((p for p in (existing, *existing.parents) if (p / ".git").exists()), None)
    if work_tree is None:
        return
    refusal = (f"{folder} is inside the git work tree {work_tree} and not ignored by git; startup kits hold private "
               f"keys and must never be committed. Use the git-ignored default {DEFAULT_OUT}/ or a folder outside "
               "the repository.")
    git = shutil.which("git")
    if git is None:
        raise KitsError(refusal + " (git is not installed, so whether the folder is ignored cannot be checked)")
    # The trailing slash: a directory pattern such as "/kits/" matches only paths git knows are directories.
    probe = subprocess.run([git, "check-ignore", "-q", str(folder) + os.sep], cwd=work_tree,
                           stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if probe.returncode != 0:
        raise KitsError(refusal)


def provision(consortium: Consortium, out: Path = DEFAULT_OUT, *, hospital_kits: bool = True) -> ConsortiumKits:
    """Startup kits for every participant of ``consortium`` in ``out/<name>/`` (see the module doc).

    Refuses a folder git could commit, and an existing consortium folder (a new root CA would
    invalidate every kit already handed out). On failure, the folder it created is removed.
    ``hospital_kits=False``: the server's and admins' kits only; the hospitals make their own keys
    and send signing requests (``fedseg.provisioning.distributed``), so no hospital key exists here.
    """
    folder = Path(out).resolve() / consortium.name
    check_output_folder(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        if (folder / CONSORTIUM_FILE).is_file() or (folder / CA_DIR).exists():
            raise KitsError(
                f"{folder} already holds consortium {consortium.name!r} and its root CA ({folder / CA_DIR}). Provisioning "
                "again would make a new root CA and invalidate every kit already handed out. To add a hospital: "
                f"`fedseg provision add-hospital {folder} NAME --org ORG`; to start over, move or delete {folder} yourself.")
        raise KitsError(f"{folder} exists and is not empty; choose another --out")
    owner_only_dir(folder)
    kits = ConsortiumKits(folder, consortium)
    try:
        write_consortium(consortium, folder / CONSORTIUM_FILE)
        write_project_yml(consortium, kits.project_yml, hospitals=hospital_kits)
        prod = run_nvflare_provision(kits.project_yml, kits.ca_workspace, consortium.name)
        made = [n for n in consortium.participant_names() if hospital_kits or n not in consortium.hospital_names]
        for name in made:
            shutil.move(str(prod / name), str(folder / name))
        # The kits now live in the consortium folder; a second copy of every private key is only clutter.
        shutil.rmtree(prod)
        for hospital in consortium.hospitals if hospital_kits else ():
            write_site_guide(kits, hospital.name)
            lock_down_kit(kits.hospital_kit(hospital.name))
        lock_down_kit(kits.server_kit)  # no custom code for anyone, only listed classes
        set_server_storage(kits.server_kit, consortium.server_storage, create=False)
        write_server_guide(kits)
        restrict_permissions(folder)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return kits


def add_hospital(folder: Path, hospital: HospitalSpec) -> Path:
    """Add ``hospital`` to a provisioned consortium: its kit, signed by the same root CA; its path.

    No other kit is re-issued or touched. ``consortium.yml`` and ``project.yml`` in the folder
    then list the new hospital too, so later additions keep it.
    """
    kits = open_kits(folder)
    if (kits.ca_workspace / SIGNING_CA_DIR).exists():
        raise KitsError(f"{kits.folder}: this consortium's hospitals make their own keys (`fedseg provision ca`); "
                        f"a new hospital runs `fedseg provision request` and you approve its request: "
                        f"`fedseg provision approve {kits.folder} REQUEST.zip --add`")
    try:
        grown = kits.consortium.with_hospital(hospital)
    except ConsortiumError as err:
        raise KitsError(f"cannot add hospital {hospital.name!r} to {kits.folder}: {err}") from None
    target = kits.folder / hospital.name
    if target.exists():
        raise KitsError(f"{target} already exists")
    request = kits.ca_workspace / f"add-client-{hospital.name}.yml"
    request.write_text(f"name: {hospital.name}\norg: {hospital.org}\n")
    try:
        prod = run_nvflare_provision(kits.project_yml, kits.ca_workspace, grown.name, add_client=request)
        new_kit = prod / hospital.name
        if (new_kit / "startup" / "rootCA.pem").read_bytes() != kits.root_ca_pem():
            raise KitsError(f"nvflare provision made {new_kit} with a different root CA than {kits.server_kit}; "
                            f"is {kits.ca_state} the consortium's CA state?")
        shutil.move(str(new_kit), str(target))
    finally:
        request.unlink(missing_ok=True)
        # NVFlare rebuilt every kit into a new prod_NN; the others are copies of kits already handed out.
        for prod in (kits.ca_workspace / grown.name).glob("prod_*"):
            shutil.rmtree(prod, ignore_errors=True)
    grown_kits = ConsortiumKits(kits.folder, grown)
    write_consortium(grown, kits.folder / CONSORTIUM_FILE)
    write_project_yml(grown, kits.project_yml)
    write_site_guide(grown_kits, hospital.name)
    lock_down_kit(target)
    restrict_permissions(target)
    restrict_permissions(kits.ca_workspace)
    for path in (kits.folder / CONSORTIUM_FILE, kits.project_yml):
        path.chmod(0o600)
    return target


def run_nvflare_provision(project_yml: Path, workspace: Path, project: str, add_client: Path | None = None) -> Path:
    """``nvflare provision -p project_yml -w workspace [--add-client FILE]``; the new ``prod_NN`` folder.

    Runs under umask 077 (see the module doc) with a throw-away HOME: provisioning needs nothing
    from it, and NVFlare's CLI keeps its own settings in ``~/.nvflare``. Output goes to
    ``workspace/provision.log``.
    """
    from fedseg.provisioning.nvflare_cli import last_json_object, nvflare_executable

    workspace = Path(workspace).resolve()
    owner_only_dir(workspace)
    args = ["provision", "-p", str(Path(project_yml).resolve()), "-w", str(workspace)]
    if add_client is not None:
        # nvflare/lighter/provision.py: an existing workspace needs --force without a terminal.
        args += ["--add-client", str(Path(add_client).resolve()), "--force"]
    cmd = [nvflare_executable(), "--format", "json", *args]
    log_path = workspace / "provision.log"
    with tempfile.TemporaryDirectory(prefix="fedseg-provision-home-") as home, log_path.open("a") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        env = {**os.environ, "HOME": home, "PYTHONUNBUFFERED": "1"}
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        try:
            proc = subprocess.run(cmd, cwd=workspace, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                  stderr=subprocess.STDOUT, umask=0o077, timeout=300)
        except subprocess.TimeoutExpired:
            raise KitsError(f"`nvflare provision` did not finish within 300 s; see {log_path}") from None
    doc = last_json_object(log_path.read_text()) or {}
    if proc.returncode != 0 or doc.get("status") != "ok":
        message = doc.get("message") or f"exit status {proc.returncode}"
        raise KitsError(f"`nvflare provision` failed: {message}; see {log_path}")
    prods = sorted((workspace / project).glob("prod_*"), key=lambda p: int(p.name.split("_")[1]))
    if not prods:
        raise KitsError(f"`nvflare provision` wrote no kits under {workspace / project}; see {log_path}")
    return prods[-1]


def set_server_storage(kit: Path, storage: Path | str | None = None, *, create: bool = True) -> Path:
    """Keep the server's jobs and snapshots in ``storage``, not in /tmp; by default the consortium's
    one default, ``default_server_storage`` (``/var/lib/fedseg/<consortium>``).

    NVFlare's server kit stores every job (its models, results and metrics) and the run snapshots
    under ``/tmp/nvflare`` (``local/resources.json.default``): a reboot or a tmp cleaner loses the
    study, and two studies on one machine share it. There is no provisioning option for it, so this
    writes ``<kit>/local/resources.json``, which the server reads instead of the ``.default``
    (nvflare/apis/workspace.py), with the snapshot folder, the job store and the log receiver's
    staging folder under ``storage``. NVFlare refuses relative paths, so ``storage`` is made
    absolute. ``create`` makes the folders, owner-only (0700). The path written at provisioning is
    on the server machine: the kit's ``startup/start.sh`` then runs
    ``fedseg.provisioning.storage_guard`` first, which creates the folders owner-only there, and
    refuses to start the server on storage other accounts can read. Returns ``storage``.
    """
    import json

    from fedseg.provisioning.consortium import default_server_storage
    from fedseg.provisioning.storage_guard import StorageError, check_storage, install_guard

    kit = Path(kit)
    if storage is None:
        try:
            consortium = json.loads((kit / "startup" / "fed_server.json").read_text())["servers"][0]["name"]
        except (OSError, ValueError, KeyError, IndexError, TypeError) as err:
            raise KitsError(f"{kit}: not a server startup kit (startup/fed_server.json: {err})") from None
        storage = default_server_storage(consortium)
    storage = Path(storage).expanduser().absolute()
    local = kit / "local"
    source = local / "resources.json" if (local / "resources.json").is_file() else local / "resources.json.default"
    if not source.is_file():
        raise KitsError(f"{kit}: not a server startup kit (no local/resources.json.default)")
    config = json.loads(source.read_text())
    try:
        config["snapshot_persistor"]["args"]["storage"]["args"]["root_dir"] = str(storage / "snapshots")
        components = {c.get("id"): c for c in config["components"]}
        components["job_manager"]["args"]["uri_root"] = str(storage / "jobs")
    except (KeyError, TypeError) as err:
        raise KitsError(f"{source}: not the server resources NVFlare 2.9 writes (missing {err})") from None
    if "log_receiver" in components:
        components["log_receiver"].setdefault("args", {})["dest_dir"] = str(storage / "log-staging")
    target = local / "resources.json"
    target.write_text(json.dumps(config, indent=2) + "\n")
    target.chmod(0o600)
    try:
        install_guard(kit)
        if create:
            check_storage(kit)  # creates what is missing, 0700; refuses a folder others can read
    except StorageError as err:
        raise KitsError(str(err)) from None
    return storage


def write_server_guide(kits: ConsortiumKits) -> Path:
    """``<server kit>/SERVER_GUIDE.md``: what the server's admin does with the kit."""
    from fedseg import __version__

    server = kits.consortium.server
    text = _SERVER_GUIDE.format(consortium=kits.consortium.name, host=server.host, port=server.port,
                                version=__version__, storage=kits.consortium.server_storage, python=_python_version())
    path = kits.server_kit / SERVER_GUIDE
    path.write_text(text)
    path.chmod(0o600)
    return path


def restrict_permissions(root: Path) -> None:
    """Owner-only access under ``root``: folders 0700, files keep only their owner bits (keys 0600)."""
    root = Path(root)
    paths = [root, *root.rglob("*")] if root.is_dir() else [root]
    for path in paths:
        if path.is_symlink():
            continue
        if path.is_dir():
            path.chmod(0o700)
        elif path.suffix == ".key" or path.name == "cert.json":
            path.chmod(0o600)
        else:
            path.chmod(path.stat().st_mode & 0o700)


def write_site_guide(kits: ConsortiumKits, hospital: str) -> Path:
    """``<hospital kit>/SITE_GUIDE.md``: what the hospital's IT admin does with the kit the lead made."""
    server = kits.consortium.server
    return write_kit_site_guide(kits.hospital_kit(hospital), hospital, kits.consortium.name, server.host, server.port)


def write_kit_site_guide(kit: Path, hospital: str, consortium: str, host: str, port: int, *,
                         own_key: bool = False) -> Path:
    """``kit/SITE_GUIDE.md`` for site ``hospital`` of ``consortium`` (server ``host:port``).

    ``own_key``: the site assembled the kit itself from the key it made (``fedseg provision
    assemble``), so the guide does not tell it to copy the kit from elsewhere.
    """
    from fedseg import __version__

    origin, unpack = (_OWN_KEY_ORIGIN, _OWN_KEY_UNPACK) if own_key else (_SENT_ORIGIN, _SENT_UNPACK)
    values = dict(hospital=hospital, consortium=consortium, host=host, port=port, version=__version__,
                  site_config=SITE_CONFIG, python=_python_version())
    text = _SITE_GUIDE.format(origin=origin.format(**values), unpack=unpack.format(**values), **values)
    path = Path(kit) / SITE_GUIDE
    path.write_text(text)
    path.chmod(0o600)
    return path


def _python_version() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


_SERVER_GUIDE = """\
# Server guide ({consortium})

This folder is the startup kit of the FL server of the federated study **{consortium}**. It holds
the server's private key (`startup/server.key`): keep it on the server machine only, readable by
the account that runs the server (`chmod -R go-rwx` after copying).

Hospitals connect to `{host}:{port}` (TCP, mutual TLS with the certificates in `startup/`). Open
that port inbound; the lead's admin console uses the same port.

## 1. Install fedseg {version}

In a fresh virtual environment (Python {python} recommended), the **same fedseg version as every
site**: `pip install <the fedseg {version} wheel or source folder>`, then `fedseg --version`.

## 2. Job storage: a persistent, owner-only folder

The server keeps every job of the study (models, metrics, results) and its run snapshots in
**`{storage}`** (`local/resources.json`; NVFlare's own default, /tmp/nvflare, would be lost at the
next reboot or tmp clean-up). Create it, owned by the account that runs the server:

```bash
sudo install -d -m 0700 -o $USER {storage}
```

and let fedseg create the folders inside it owner-only, or keep the storage elsewhere; this rewrites
`local/resources.json` if needed and creates the folders owner-only:

```bash
fedseg provision server-storage KIT                          # {storage}
fedseg provision server-storage KIT --storage /srv/fl/{consortium}   # another absolute folder
```

`KIT/startup/start.sh` checks the storage before the server starts: a missing folder is created
owner-only, and the server refuses to start on a folder the group or others can read (fix:
`chmod -R go-rwx` on it). Back the folder up with the kit. Two studies on one machine need two folders.

## 3. Start the server

```bash
KIT/startup/start.sh        # runs in the background; its log: KIT/log.txt
```

Hospitals' logs never reach the server: log streaming is off in every site kit.
"""


_SENT_ORIGIN = """\
It holds this site's private key (`startup/client.key`): keep it on the training machine only,
readable by the account that runs the site (`chmod -R go-rwx` after copying), never in a shared
drive or a git repository. Lost or leaked? Tell the study lead; do not copy it elsewhere.
"""

_OWN_KEY_ORIGIN = """\
It was assembled on this machine (`fedseg provision assemble`) from the private key this site made
itself (`fedseg provision request`, `startup/client.key`) and the certificate the study lead signed:
the key never left this machine, and nobody else has a copy. Keep it here, readable only by the
account that runs the site, never in a shared drive or a git repository. Lost or leaked? Tell the
study lead, make a new request, and do not copy the key elsewhere.
"""

_SENT_UNPACK = """\
Copy this folder to the training machine, for example to `/opt/fedseg/{hospital}`, then:

```bash
chmod -R go-rwx /opt/fedseg/{hospital}
```

Below, `KIT` is that folder.
"""

_OWN_KEY_UNPACK = """\
This folder is already on the training machine and owner-only. Do not move it to another machine;
if it must move, make a new request there instead. Below, `KIT` is this folder.
"""

_SITE_GUIDE = """\
# {hospital}: site guide ({consortium})

This folder is the startup kit of site **{hospital}** in the federated study **{consortium}**.
{origin}
The site connects **out** to `{host}:{port}` (TCP, mutual TLS with the certificates in `startup/`).
It needs no inbound port. Imaging data never leaves this machine: only model weights and scalar
metrics are sent.

## 1. Install fedseg {version}

On the training machine (Linux, Python {python} recommended), in a fresh virtual environment,
install the **same fedseg version as the server ({version})**; it brings NVFlare:

```bash
python3 -m venv ~/fedseg-env && . ~/fedseg-env/bin/activate
pip install <the fedseg {version} wheel or source folder the study lead gives you>
fedseg --version && nvflare --version
```

Start the site from this environment (the kit's scripts run `python3` from `PATH`).

## 2. The kit's place

{unpack}
## 3. Point the site at its data

Jobs never contain paths: each site reads `KIT/local/{site_config}`. Write it with fedseg
(`datalist` is this site's train/validation list, `data_root` the folder its paths are under):

```bash
fedseg provision site-config KIT --datalist /data/brats/site.json --data-root /data/brats \\
    --cache-dir /scratch/fedseg-cache --personal-store /var/lib/fedseg/heads
```

or by hand (`KIT/local/{site_config}`):

```json
{{"datalist": "/data/brats/site.json", "data_root": "/data/brats",
 "cache_dir": "/scratch/fedseg-cache", "head_store": "/var/lib/fedseg/heads"}}
```

`head_store` is where this site keeps its personal models (FedPer/FedRep heads, Ditto and fine-tuned models); they
never leave the site.

## 4. Check the data

```bash
fedseg data check /data/brats/site.json --data-root /data/brats
```

It reads every image and label, writes nothing, and exits non-zero on any problem.

## 5. Check the kit and the connection

```bash
nvflare preflight-check -p KIT
```

It checks the kit and that the server `{host}:{port}` is reachable (the server must be running).

## 6. Start the site

```bash
KIT/startup/start.sh
```

It runs in the background and reconnects by itself; its log is `KIT/log.txt`, each job's in
`KIT/<job id>/log.txt`. The study lead sees the site in `nvflare system status` once it is
connected. To stop it, ask the study lead (a clean shutdown goes through the admin console), or as a
last resort run `KIT/startup/stop_fl.sh`.

## 7. What runs at this site, and what leaves it

- **Only the code you installed in step 1.** A fedseg job is settings only (algorithm, network,
  rounds, epochs, modalities): its folder has no code, and this kit refuses every job that brings
  code (`local/authorization.json`: `byoc` is "none" for every role) and every job that names a
  class outside `class_allow_list` in `local/resources.json` (exactly the classes fedseg's jobs
  use at a site, so every job this site runs is judged by its policy below). A job built by another fedseg version than yours is refused, naming both.
- **What leaves:** model weights (for FedPer and FedRep without the head this site keeps) and scalar
  metrics (Dice, loss, case counts). No image, label, path or case id; this site's log stays here
  too (log streaming to the server is off).

## 8. Which studies this site joins

`fedseg provision site-config` writes a `policy` into `KIT/local/{site_config}`. Edit it to say
what this site accepts; a job outside it is refused before it reads a single case, and the study
lead is told which rule (for example "{hospital} refused the job: accepts at most 100 rounds; the
job asks 200"):

```json
"policy": {{
  "algorithms": ["fedavg", "fedper", "ditto", "stats"], "networks": ["unet"],
  "max_rounds": 100, "max_local_epochs": 5, "modalities": ["t1", "t1ce", "t2", "flair"],
  "require_privacy_filter": false, "allow_wandb": false, "require_approval": true
}}
```

With `"require_approval": true` the site runs only jobs you approved: review the job folder the
lead sends you (its `app/config/config_fed_client.json` holds every setting this site will run
with, `config_fed_server.json` what the server runs), then

```bash
fedseg site approve JOB_FOLDER --kit KIT   # records the job's fingerprint (SHA-256 of both files)
```

A job changed by one setting after your approval has another fingerprint and is refused. Every
decision, accepted or refused, is appended to `KIT/local/fedseg_site.audit.jsonl` (time, job id,
fingerprint, submitter, decision, reason); `fedseg site audit --kit KIT` prints it.
"""


__all__ = [
    "CA_DIR",
    "CONSORTIUM_FILE",
    "DEFAULT_OUT",
    "PROJECT_FILE",
    "SERVER_GUIDE",
    "SITE_GUIDE",
    "ConsortiumKits",
    "KitsError",
    "add_hospital",
    "check_output_folder",
    "open_kits",
    "provision",
    "restrict_permissions",
    "run_nvflare_provision",
    "set_server_storage",
    "write_kit_site_guide",
    "write_site_guide",
]
