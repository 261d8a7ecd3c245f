"""``fedseg provision``: a consortium description -> NVFlare startup kits (made centrally, or each hospital's
from its own key: ca, request, approve, assemble); adding a hospital; a site's data; the server's storage."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedseg.cli import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    provision = subparsers.add_parser(
        "provision",
        help="startup kits for a real study: server, hospitals and admins (NVFlare provisioning)",
        description="Turns a consortium description (YAML: server host and port, hospitals with their "
        "organisations, admins with their roles; see provisioning/consortium.example.yml) into NVFlare's "
        "project.yml and NVFlare's provisioning: one startup kit per hospital, one for the server and one "
        "per admin, all signed by one root CA. Kits hold private keys: they are written owner-only. "
        "A real study: the lead runs `ca`, each hospital `request` (its key stays there), the lead `approve`, "
        "the hospital `assemble`. POC and labs: `create` makes every kit, keys included, in one place.",
    )
    sub = provision.add_subparsers(dest="provision_command", metavar="PROVISION_COMMAND", required=True)

    check = sub.add_parser("check", help="validate a consortium file and print the NVFlare project.yml it makes",
                           description="Writes nothing; exit status 2 and every problem listed if the file is invalid.")
    check.add_argument("consortium", type=Path, help="consortium YAML file")
    check.set_defaults(func=_check)

    create = sub.add_parser(
        "create",
        help="POC and labs: OUT/<name>/ with one startup kit per participant, hospitals' keys included",
        description="Writes OUT/<name>/: consortium.yml and project.yml (what the kits were made from), ca/ "
        "(NVFlare's provisioning state with the root CA's private key: keep it, never ship it) and one kit "
        "folder per participant; each hospital's kit has a SITE_GUIDE.md. Refuses an existing consortium "
        "folder (a new root CA would invalidate every kit handed out) and a folder inside a git work tree "
        "that git does not ignore.",
    )
    create.add_argument("consortium", type=Path, help="consortium YAML file")
    create.add_argument("--out", type=Path, default=None, help="output folder (default kits/, git-ignored in this repository)")
    create.set_defaults(func=_create)

    add = sub.add_parser(
        "add-hospital",
        help="add a hospital to a provisioned consortium: its kit, signed by the same root CA",
        description="Runs `nvflare provision --add-client` on the consortium folder's CA state and copies out "
        "only the new hospital's kit; no other kit is re-issued or changed. consortium.yml and project.yml "
        "in the folder then include the hospital.",
    )
    add.add_argument("folder", type=Path, help="the consortium folder (OUT/<name> of `fedseg provision create`)")
    add.add_argument("name", help="the hospital's site name (letters, digits, '-' or '_')")
    add.add_argument("--org", required=True, help="the hospital's organisation (letters, digits or '_')")
    add.set_defaults(func=_add_hospital)

    site = sub.add_parser(
        "site-config",
        help="a hospital's step: point its startup kit at its data and set its study policy (KIT/local/fedseg_site.json)",
        description="Writes KIT/local/fedseg_site.json, where fedseg's jobs read this site's datalist and "
        "folders (jobs themselves never contain paths), with the site's study policy: the algorithms, "
        "networks, rounds, epochs and modalities it accepts, whether it requires a privacy filter, allows "
        "W&B or runs approved jobs only. An existing policy is kept; edit the file to change it.",
    )
    site.add_argument("kit", type=Path, help="this hospital's startup kit folder")
    site.add_argument("--datalist", type=Path, required=True, help="this site's datalist (.json)")
    site.add_argument("--data-root", type=Path, default=None, help="folder the datalist's paths are under")
    site.add_argument("--cache-dir", type=Path, default=None, help="where preprocessed cases may be cached")
    # --head-store: its earlier name (it holds whole personal models too, not only FedPer's heads)
    site.add_argument("--personal-store", "--head-store", dest="head_store", type=Path, default=None, metavar="FOLDER",
                      help="where the personalized jobs (" + ", ".join(_personal_algorithms()) + ") keep this site's "
                      "personal models (the site config's head_store; --head-store is its earlier name)")
    site.add_argument("--gpus", type=int, default=None,
                      help="GPUs this site trains on (0: CPU only): NVFlare's resource manager in KIT/local/resources.json "
                      "holds a job until that many are free, and fedseg_site.json's 'devices' is set to it (at least 1)")
    site.add_argument("--require-approval", action="store_true",
                      help="run only jobs approved at this site with `fedseg site approve JOB_FOLDER`")
    site.set_defaults(func=_site_config)

    ca = sub.add_parser(
        "ca",
        help="a real study, the lead's step: root CA, server and admin kits; hospitals make their own keys",
        description="Like `create`, but no hospital kit is made here: each hospital makes its own private key "
        "(`fedseg provision request`) and sends only a signing request, which you sign with `fedseg provision "
        "approve`. Writes OUT/<name>/ with the server's and admins' kits, ca/ (the root CA; never ship it), "
        "requests/ and approved/, and prints the root CA fingerprint to tell each hospital over a second channel.",
    )
    ca.add_argument("consortium", type=Path, help="consortium YAML file (its hospitals are the ones you will approve)")
    ca.add_argument("--out", type=Path, default=None, help="output folder (default kits/, git-ignored in this repository)")
    ca.set_defaults(func=_ca)

    request = sub.add_parser(
        "request",
        help="a real study, the hospital's first step: make this site's private key and a signing request",
        description="Runs `nvflare cert request`: OUT/<name>/ holds this site's private key (it never leaves this "
        "machine) and OUT/<name>/<name>.request.zip, the only file to send to the study lead.",
    )
    request.add_argument("--consortium", required=True, help="the consortium's name, as the study lead gives it")
    request.add_argument("--name", required=True, help="this hospital's site name (letters, digits, '-' or '_')")
    request.add_argument("--org", required=True, help="this hospital's organisation (letters, digits or '_')")
    request.add_argument("--out", type=Path, default=Path("."), help="folder for the request folder (default: here)")
    request.set_defaults(func=_request)

    approve = sub.add_parser(
        "approve",
        help="a real study, the lead's step: sign a hospital's request zip; send back the signed zip",
        description="Checks the request (this consortium, a hospital of it with its organisation, no private key "
        "inside) and runs `nvflare cert approve` with the consortium's root CA: FOLDER/approved/<name>.signed.zip.",
    )
    approve.add_argument("folder", type=Path, help="the consortium folder (OUT/<name> of `fedseg provision ca`)")
    approve.add_argument("request_zip", type=Path, help="the hospital's <name>.request.zip")
    approve.add_argument("--add", action="store_true", help="the hospital is not in consortium.yml yet: add it")
    approve.set_defaults(func=_approve)

    assemble = sub.add_parser(
        "assemble",
        help="a real study, the hospital's last step: build this site's startup kit from the signed zip",
        description="Runs `nvflare package` (it checks the root CA fingerprint and that the certificate matches "
        "this site's key), then what fedseg adds to every site kit: log streaming off, SITE_GUIDE.md, owner-only.",
    )
    assemble.add_argument("signed_zip", type=Path, help="<name>.signed.zip from the study lead")
    assemble.add_argument("--request-dir", type=Path, required=True,
                          help="this site's request folder (OUT/<name> of `fedseg provision request`, with its key)")
    assemble.add_argument("--fingerprint", required=True,
                          help="the root CA fingerprint the study lead told you over another channel (SHA256:AB:CD:...)")
    assemble.add_argument("--out", type=Path, required=True, help="the kit folder to make, e.g. /opt/fedseg/<name>")
    assemble.set_defaults(func=_assemble)

    storage = sub.add_parser(
        "server-storage",
        help="the server admin's step: keep the server's jobs and snapshots in a persistent folder",
        description="Writes KIT/local/resources.json so the server stores every job (models, results, metrics) "
        "and its snapshots in STORAGE (default /var/lib/fedseg/<consortium>, the consortium file's default) "
        "instead of NVFlare's /tmp/nvflare, and creates "
        "the folders owner-only. Run it after copying the server kit to the server machine.",
    )
    storage.add_argument("kit", type=Path, help="the server's startup kit folder")
    storage.add_argument("--storage", type=Path, default=None,
                         help="absolute folder (default: /var/lib/fedseg/<consortium>)")
    storage.set_defaults(func=_server_storage)


def _load(path: Path):
    from fedseg.provisioning.consortium import ConsortiumError, load_consortium

    try:
        return load_consortium(path)
    except ConsortiumError as err:
        raise UserError(str(err)) from None


def _check(args: argparse.Namespace) -> int:
    import yaml

    consortium = _load(args.consortium)
    print(yaml.safe_dump(consortium.project_config(), sort_keys=False), end="")
    print(f"# {args.consortium}: valid; {len(consortium.hospitals)} hospitals, {len(consortium.admins)} admins, "
          f"server {consortium.server.host}:{consortium.server.port}")
    return 0


def _create(args: argparse.Namespace) -> int:
    from fedseg.provisioning.kits import DEFAULT_OUT, KitsError, provision

    consortium = _load(args.consortium)
    try:
        kits = provision(consortium, args.out or DEFAULT_OUT)
    except KitsError as err:
        raise UserError(str(err)) from None
    print(f"consortium {consortium.name}: kits in {kits.folder} (owner-only; they hold private keys)")
    print(f"  server  {kits.server_kit}   -> the FL server ({consortium.server.host}:{consortium.server.port})")
    for name in consortium.hospital_names:
        print(f"  site    {kits.hospital_kit(name)}   -> {name}'s IT admin (see its SITE_GUIDE.md)")
    for admin in consortium.admins:
        print(f"  admin   {kits.admin_kit(admin.email)}   -> {admin.email} ({admin.role})")
    print(f"  keep    {kits.ca_workspace}   (root CA private key: stays with you, needed to add hospitals)")
    print("Send each kit to its owner over a secure channel, one kit per recipient.")
    return 0


def _ca(args: argparse.Namespace) -> int:
    from fedseg.provisioning.distributed import prepare, root_ca_fingerprint
    from fedseg.provisioning.kits import DEFAULT_OUT, KitsError

    consortium = _load(args.consortium)
    try:
        kits = prepare(consortium, args.out or DEFAULT_OUT)
    except KitsError as err:
        raise UserError(str(err)) from None
    print(f"consortium {consortium.name}: root CA and kits in {kits.folder} (owner-only; no hospital key is made here)")
    print(f"  server  {kits.server_kit}   -> the FL server ({consortium.server.host}:{consortium.server.port})")
    for admin in consortium.admins:
        print(f"  admin   {kits.admin_kit(admin.email)}   -> {admin.email} ({admin.role})")
    print(f"  keep    {kits.ca_workspace}   (root CA private key: stays with you, signs the hospitals' requests)")
    print(f"root CA fingerprint: {root_ca_fingerprint(kits)}")
    print(f"  send    {kits.folder / 'guides'}/<hospital>.md   -> each hospital's IT admin: its steps (no secret)")
    print(f"Each hospital ({', '.join(consortium.hospital_names)}) runs `fedseg provision request --consortium "
          f"{consortium.name} --name NAME --org ORG` and sends you NAME.request.zip; tell each the fingerprint above "
          "over another channel (phone, letter), not with the zips.")
    return 0


def _request(args: argparse.Namespace) -> int:
    from fedseg.provisioning.consortium import HospitalSpec
    from fedseg.provisioning.distributed import request
    from fedseg.provisioning.kits import KitsError

    try:
        made = request(args.consortium, HospitalSpec(args.name, args.org), args.out)
    except KitsError as err:
        raise UserError(str(err)) from None
    print(f"{args.name}: private key {made.key} (0600; it never leaves this machine)")
    print(f"send to the study lead: {made.zip} (the signing request only, no key)")
    return 0


def _approve(args: argparse.Namespace) -> int:
    from fedseg.provisioning.distributed import approve, open_distributed, read_request, root_ca_fingerprint
    from fedseg.provisioning.kits import KitsError

    try:
        signed = approve(args.folder, args.request_zip, add=args.add)
        fingerprint = root_ca_fingerprint(open_distributed(args.folder))
        name = read_request(args.request_zip)["name"]
    except KitsError as err:
        raise UserError(str(err)) from None
    print(f"{name}: approved; send back {signed} (certificate and root CA, no private key)")
    print(f"root CA fingerprint, to tell {name} over another channel: {fingerprint}")
    return 0


def _assemble(args: argparse.Namespace) -> int:
    from fedseg.provisioning.distributed import assemble
    from fedseg.provisioning.kits import KitsError

    try:
        kit = assemble(args.signed_zip, args.request_dir, args.fingerprint, args.out)
    except KitsError as err:
        raise UserError(str(err)) from None
    print(f"startup kit {kit} (owner-only); next: its SITE_GUIDE.md (site-config, data check, start)")
    print(f"{args.request_dir} still holds a copy of the key; delete it once the site has connected")
    return 0


def _add_hospital(args: argparse.Namespace) -> int:
    from fedseg.provisioning.consortium import HospitalSpec
    from fedseg.provisioning.kits import KitsError, add_hospital

    try:
        kit = add_hospital(args.folder, HospitalSpec(args.name, args.org))
    except KitsError as err:
        raise UserError(str(err)) from None
    print(f"hospital {args.name}: kit {kit} (same root CA as the other kits; see its SITE_GUIDE.md)")
    print("No other kit changed. Submit jobs as before; once the site is connected it takes part in new jobs.")
    return 0


def _personal_algorithms() -> tuple[str, ...]:
    from fedseg.jobs.base import personal_algorithms

    return personal_algorithms()


def _site_config(args: argparse.Namespace) -> int:
    from fedseg.app.site_config import LOCAL_FILE, write_site_config

    kit = args.kit
    if not (kit / "startup" / "fed_client.json").is_file():
        raise UserError(f"{kit}: not a hospital's startup kit (no startup/fed_client.json)")
    if not args.datalist.is_file():
        raise UserError(f"{args.datalist}: datalist not found")
    if args.data_root is not None and not args.data_root.is_dir():
        raise UserError(f"{args.data_root}: data root not found")
    extra = {key: value for key, value in (("cache_dir", args.cache_dir), ("head_store", args.head_store)) if value}
    target = kit / "local" / LOCAL_FILE
    extra["policy"] = site_policy_for(target, args.require_approval)
    if args.gpus is not None:
        from fedseg.provisioning.site_control import KitControlError, set_site_gpus

        if args.gpus < 0:
            raise UserError(f"--gpus must be >= 0, got {args.gpus}")
        try:
            resources = set_site_gpus(kit, args.gpus)
        except KitControlError as err:
            raise UserError(str(err)) from None
        # one training process per GPU; a CPU-only site trains in one process unless its admin sets more
        extra["devices"] = max(1, args.gpus)
        print(f"wrote {resources}: {args.gpus} GPU(s) for NVFlare's resource manager")
    path = write_site_config(target, args.datalist, args.data_root, **extra)
    print(f"wrote {path} (its 'policy' says which studies this site joins: see SITE_GUIDE.md)")
    return 0


def site_policy_for(config: Path, require_approval: bool) -> dict:
    """The policy an existing site config holds (an admin's edits survive), else fedseg's default."""
    import json

    from fedseg.provisioning.site_control import default_site_policy

    policy = None
    if config.is_file():
        try:
            policy = json.loads(config.read_text(encoding="utf-8")).get("policy")
        except (OSError, ValueError, AttributeError):
            policy = None
    policy = policy or default_site_policy().to_json()
    if require_approval:
        policy["require_approval"] = True
    return policy


def _server_storage(args: argparse.Namespace) -> int:
    from fedseg.provisioning.kits import KitsError, set_server_storage

    if not (args.kit / "startup" / "fed_server.json").is_file():
        raise UserError(f"{args.kit}: not a server startup kit (no startup/fed_server.json)")
    try:
        storage = set_server_storage(args.kit, args.storage)
    except KitsError as err:
        raise UserError(str(err)) from None
    print(f"wrote {args.kit / 'local' / 'resources.json'}: jobs and snapshots in {storage} (owner-only)")
    return 0
