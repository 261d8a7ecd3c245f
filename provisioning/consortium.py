"""The consortium description a project lead edits, and its mapping to NVFlare's ``project.yml``.

A consortium file names the server (the host name hospitals connect to, and one port), the
hospitals with their organisations, and the people who administer the study with their roles::

    name: brats_consortium
    server: {host: fl.example.org, port: 8002, org: consortium}
    hospitals:
      - {name: hospital-a, org: hospital_a}
    admins:
      - {email: lead@example.org, org: consortium, role: lead}

``load_consortium`` reads and validates it (every problem is reported at once, naming the file);
``Consortium.project_config`` turns it into NVFlare's ``project.yml`` (api_version 3), which
``nvflare provision`` turns into startup kits (see ``fedseg.provisioning.kits``).

Names follow NVFlare's own rules (``nvflare/apis/utils/format_check.py``, checked by
``nvflare/lighter/entity.py`` at provisioning time): a server is a host name, a hospital
letters/digits/``-``/``_``, an admin an e-mail address, an organisation letters/digits/``_``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

#: NVFlare's admin roles (nvflare/lighter/constants.py, AdminRole). Their rights are in every kit's
#: local/authorization.json.default: ``lead`` may submit jobs and bring custom code (``byoc``),
#: which every fedseg job needs (its app/custom/site_entry.py); ``org_admin`` may do neither.
ROLES = ("project_admin", "org_admin", "lead", "member")
#: Roles that can submit a job with custom code under the default authorization policy.
SUBMITTING_ROLES = ("project_admin", "lead")
#: Folder names inside a consortium folder that are not kits (fedseg.provisioning.kits).
RESERVED_NAMES = ("ca", "consortium.yml", "project.yml")

_PROJECT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
_TOP_KEYS = {"name", "description", "server", "hospitals", "admins", "root_ca_valid_days"}
_SERVER_KEYS = {"host", "port", "org", "storage"}
#: where a server keeps its jobs and snapshots unless the consortium file names a folder: the one
#: default, for the kits made at provisioning and for `fedseg provision server-storage` alike
DEFAULT_SERVER_STORAGE = "/var/lib/fedseg/{name}"
_HOSPITAL_KEYS = {"name", "org"}
_ADMIN_KEYS = {"email", "org", "role"}


class ConsortiumError(ValueError):
    """A consortium description is unreadable or invalid; the message names the file and every problem."""


@dataclass(frozen=True)
class ServerSpec:
    """The FL server: ``host`` is the name hospitals connect to and the CN of the server's certificate;
    ``storage`` is the absolute folder on the server machine for its jobs and snapshots ("" = the default)."""

    host: str
    port: int
    org: str
    storage: str = ""


@dataclass(frozen=True)
class HospitalSpec:
    """One hospital (an NVFlare client site); ``name`` is its site name in jobs and logs."""

    name: str
    org: str


@dataclass(frozen=True)
class AdminSpec:
    """One person with an admin startup kit (``nvflare job submit --startup-kit``)."""

    email: str
    org: str
    role: str


@dataclass(frozen=True)
class Consortium:
    """A validated consortium description."""

    name: str
    server: ServerSpec
    hospitals: tuple[HospitalSpec, ...]
    admins: tuple[AdminSpec, ...]
    description: str = ""
    root_ca_valid_days: int | None = None  # None: NVFlare's default (360 days, nvflare/lighter/impl/cert.py)
    source: Path | None = None  # the file it was read from, for messages

    @property
    def server_storage(self) -> str:
        """The server's folder for jobs and snapshots (absolute, on the server machine)."""
        return self.server.storage or default_server_storage(self.name)

    @property
    def hospital_names(self) -> tuple[str, ...]:
        return tuple(h.name for h in self.hospitals)

    @property
    def leads(self) -> tuple[AdminSpec, ...]:
        """Admins whose kits can submit fedseg jobs (custom code needs the ``byoc`` right)."""
        return tuple(a for a in self.admins if a.role in SUBMITTING_ROLES)

    def participant_names(self) -> tuple[str, ...]:
        """Every kit's folder name: the server host, the hospitals, the admins' e-mails."""
        return (self.server.host, *self.hospital_names, *(a.email for a in self.admins))

    def with_hospital(self, hospital: HospitalSpec) -> Consortium:
        """This consortium plus one hospital, validated like a file (``ConsortiumError`` if it clashes)."""
        doc = self.to_dict()
        doc["hospitals"].append({"name": hospital.name, "org": hospital.org})
        return parse_consortium(doc, self.source)

    def to_dict(self) -> dict[str, Any]:
        """The consortium file's content (what ``parse_consortium`` reads)."""
        doc: dict[str, Any] = {"name": self.name}
        if self.description:
            doc["description"] = self.description
        doc["server"] = {"host": self.server.host, "port": self.server.port, "org": self.server.org}
        if self.server.storage:
            doc["server"]["storage"] = self.server.storage
        doc["hospitals"] = [{"name": h.name, "org": h.org} for h in self.hospitals]
        doc["admins"] = [{"email": a.email, "org": a.org, "role": a.role} for a in self.admins]
        if self.root_ca_valid_days is not None:
            doc["root_ca_valid_days"] = self.root_ca_valid_days
        return doc

    def project_config(self, *, hospitals: bool = True) -> dict[str, Any]:
        """NVFlare's ``project.yml`` (api_version 3) for this consortium (``fedseg.provisioning.project``).

        ``hospitals=False`` leaves the hospitals out: in a consortium whose hospitals make their own
        keys (``fedseg.provisioning.distributed``), ``nvflare provision`` must never make a key or a
        certificate for a hospital's name.
        """
        from fedseg.provisioning.project import Participant, project_config

        server = self.server
        return project_config(
            self.name,
            Participant(server.host, "server", server.org),
            server.port,
            [*(Participant(h.name, "client", h.org) for h in (self.hospitals if hospitals else ())),
             *(Participant(a.email, "admin", a.org, a.role) for a in self.admins)],
            description=self.description or f"fedseg consortium {self.name}",
            root_ca_valid_days=self.root_ca_valid_days,
        )


def default_server_storage(consortium: str) -> str:
    """The server's job and snapshot folder of consortium ``consortium`` when no folder is named."""
    return DEFAULT_SERVER_STORAGE.format(name=consortium)


def hospital_problems(consortium: str, hospital: HospitalSpec) -> list[str]:
    """What is wrong with a hospital's own description of itself (``fedseg provision request``): the
    consortium file's rules for the consortium's name, the hospital's name and its organisation."""
    problems = []
    if not isinstance(consortium, str) or not _PROJECT_NAME.match(consortium):
        problems.append(f"consortium: {consortium!r} is not a consortium name (letters, digits, '_' or '-', at most 63)")
    for what, value, kind in (("name", hospital.name, "client"), ("org", hospital.org, "org")):
        if problem := _name_problem(value, kind):
            problems.append(f"{what}: {problem}")
    return problems


def load_consortium(path: Path) -> Consortium:
    """Read and validate a consortium YAML file; ``ConsortiumError`` names the file and the problems."""
    import yaml  # PyYAML: an NVFlare dependency

    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConsortiumError(f"{path}: consortium file not found") from None
    except (OSError, yaml.YAMLError) as err:
        raise ConsortiumError(f"{path}: not a readable YAML file ({err})") from None
    return parse_consortium(doc, path)


def write_consortium(consortium: Consortium, path: Path) -> Path:
    """Write ``consortium`` as a consortium YAML file (what ``load_consortium`` reads back)."""
    from fedseg.provisioning.project import write_yaml

    header = "# fedseg consortium: the description these kits were provisioned from (hospitals added later included)\n"
    return write_yaml(consortium.to_dict(), path, header)


def write_project_yml(consortium: Consortium, path: Path, *, hospitals: bool = True) -> Path:
    """Write ``consortium.project_config(hospitals=...)`` as NVFlare's ``project.yml``."""
    from fedseg.provisioning.project import write_yaml

    return write_yaml(consortium.project_config(hospitals=hospitals), path)


def parse_consortium(doc: Any, source: Path | None = None) -> Consortium:
    """Validate a parsed consortium document; all problems at once in one ``ConsortiumError``."""
    where = str(source) if source else "consortium"
    if not isinstance(doc, Mapping):
        raise ConsortiumError(f"{where}: a consortium file is a YAML mapping with name, server, hospitals and admins")
    problems: list[str] = []
    problems += _unknown_keys(doc, _TOP_KEYS, "top level")

    name = doc.get("name")
    if not isinstance(name, str) or not _PROJECT_NAME.match(name):
        problems.append(f"name: {name!r} is not a consortium name (letters, digits, '_' or '-', at most 63)")
    description = doc.get("description") or ""
    if not isinstance(description, str):
        problems.append("description: must be text")
        description = ""
    days = doc.get("root_ca_valid_days")
    if days is not None and (isinstance(days, bool) or not isinstance(days, int) or days <= 0):
        problems.append(f"root_ca_valid_days: {days!r} is not a positive whole number of days")

    server = _parse_server(doc.get("server"), problems)
    hospitals = _parse_entries(doc.get("hospitals"), "hospitals", _HOSPITAL_KEYS, problems, _parse_hospital)
    admins = _parse_entries(doc.get("admins"), "admins", _ADMIN_KEYS, problems, _parse_admin)
    if "hospitals" in doc and isinstance(doc.get("hospitals"), list) and not doc["hospitals"]:
        problems.append("hospitals: the list is empty; a consortium needs at least one hospital")
    raw_admins = doc.get("admins")
    all_admins_read = isinstance(raw_admins, list) and len(admins) == len(raw_admins)
    if all_admins_read and not any(a.role in SUBMITTING_ROLES for a in admins):
        problems.append("admins: no lead; at least one admin needs role 'lead' (or 'project_admin') to submit "
                        "jobs, which carry custom code (NVFlare's 'byoc' right)")

    names = [n for n in ((server.host,) if server else ()) + tuple(h.name for h in hospitals)
             + tuple(a.email for a in admins)]
    for duplicate in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"{duplicate!r} is used more than once (server host, hospital names and admin e-mails "
                        "must all differ: each is one startup kit)")
    for reserved in sorted(set(names) & set(RESERVED_NAMES)):
        problems.append(f"{reserved!r} is reserved in a consortium folder; choose another name")
    orgs_with_sites = {h.org for h in hospitals} | ({server.org} if server else set())
    for admin in admins:
        if admin.role == "org_admin" and admin.org not in orgs_with_sites:
            problems.append(f"admins: {admin.email} is org_admin of org {admin.org!r}, which has no hospital")

    if problems:
        listed = "\n".join(f"  - {p}" for p in problems)
        raise ConsortiumError(f"{where}: {len(problems)} problem(s) in the consortium description:\n{listed}")
    assert server is not None and isinstance(name, str)
    return Consortium(name=name, server=server, hospitals=tuple(hospitals), admins=tuple(admins),
                      description=description, root_ca_valid_days=days, source=Path(source) if source else None)


# ------------------------------------------------------------------------------------------ parts


def _name_problem(value: Any, kind: str) -> str | None:
    """NVFlare's check of a participant name (nvflare/apis/utils/format_check.py); None when fine."""
    from nvflare.apis.utils.format_check import name_check

    if not isinstance(value, str) or not value:
        return "missing"
    bad, _ = name_check(value, kind)
    if bad:
        rules = {"host_name": "a host name (letters, digits, '-', dots between labels)",
                 "client": "letters, digits, '-' or '_'", "admin": "an e-mail address",
                 "org": "letters, digits or '_' (no '-')"}
        return f"{value!r} is not {rules.get(kind, 'a valid ' + kind)}"
    return None


def _unknown_keys(entry: Mapping[str, Any], known: set[str], where: str) -> list[str]:
    return [f"{where}: unknown key {key!r} (known: {', '.join(sorted(known))})" for key in entry if key not in known]


def _parse_server(entry: Any, problems: list[str]) -> ServerSpec | None:
    if entry is None:
        problems.append("server: missing (give host, port and org of the FL server)")
        return None
    if not isinstance(entry, Mapping):
        problems.append("server: must be a mapping with host, port and org")
        return None
    problems += _unknown_keys(entry, _SERVER_KEYS, "server")
    ok = True
    for key, kind in (("host", "host_name"), ("org", "org")):
        problem = _name_problem(entry.get(key), kind)
        if problem:
            problems.append(f"server.{key}: {problem}")
            ok = False
    port = entry.get("port")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        problems.append(f"server.port: {port!r} is not a port number (1-65535)")
        ok = False
    storage = entry.get("storage", "")
    if storage and (not isinstance(storage, str) or not storage.startswith("/")):
        problems.append(f"server.storage: {storage!r} must be an absolute folder on the server machine "
                        "(NVFlare's storage refuses relative paths)")
        ok = False
    return ServerSpec(entry["host"], port, entry["org"], storage or "") if ok else None


def _parse_entries(entries: Any, section: str, keys: set[str], problems: list[str], parse) -> list:
    if entries is None:
        problems.append(f"{section}: missing")
        return []
    if not isinstance(entries, Sequence) or isinstance(entries, str):
        problems.append(f"{section}: must be a list")
        return []
    parsed = []
    for i, entry in enumerate(entries):
        where = f"{section}[{i}]"
        if not isinstance(entry, Mapping):
            problems.append(f"{where}: must be a mapping with {', '.join(sorted(keys))}")
            continue
        problems += _unknown_keys(entry, keys, where)
        item = parse(entry, where, problems)
        if item is not None:
            parsed.append(item)
    return parsed


def _parse_hospital(entry: Mapping[str, Any], where: str, problems: list[str]) -> HospitalSpec | None:
    found = [f"{where}.{key}: {p}" for key, kind in (("name", "client"), ("org", "org"))
             if (p := _name_problem(entry.get(key), kind))]
    problems += found
    return None if found else HospitalSpec(entry["name"], entry["org"])


def _parse_admin(entry: Mapping[str, Any], where: str, problems: list[str]) -> AdminSpec | None:
    found = [f"{where}.{key}: {p}" for key, kind in (("email", "admin"), ("org", "org"))
             if (p := _name_problem(entry.get(key), kind))]
    role = entry.get("role")
    if role not in ROLES:
        found.append(f"{where}.role: unknown role {role!r} (one of {', '.join(ROLES)})")
    problems += found
    return None if found else AdminSpec(entry["email"], entry["org"], role)


__all__ = [
    "ROLES",
    "AdminSpec",
    "Consortium",
    "ConsortiumError",
    "HospitalSpec",
    "ServerSpec",
    "load_consortium",
    "parse_consortium",
    "default_server_storage",
    "hospital_problems",
    "write_consortium",
    "write_project_yml",
]
