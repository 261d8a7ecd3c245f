"""NVFlare's ``project.yml`` (api_version 3), built in one place for provisioned consortia
(``fedseg.provisioning.consortium``) and for POC deployments (``fedseg.run.poc``).

One server whose FL and admin services share one port (``admin_port`` = ``fed_learn_port``, as
NVFlare's own POC does, nvflare/lighter/ctx.py), so a site's firewall needs one outbound rule;
NVFlare's standard builders (nvflare/lighter/dummy_project.yml); optionally NVFlare's ``HEBuilder``
(TenSEAL CKKS contexts in every kit, for ``fedavg-he``).

Site log streaming is off in every client kit (``allow_log_streaming: false``). NVFlare's default
streams a site's ``error_log.txt`` to the server (``SiteLogStreamer`` -> ``JobLogReceiver``, stored
as ``ERRORLOG_<site>`` in the server's job storage), and a job may ask for any of the site's job
logs; those hold tracebacks, data paths and case ids. A site that disallows it refuses every job's
log streamer, whatever the job says. The key must be top-level: NVFlare 2.9 ignores a participant's
``false`` (``Entity.get_prop_fb`` falls back to the project's value, nvflare/lighter/entity.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Participant:
    """One kit: ``type`` is "server", "client" or "admin"; admins have a ``role``."""

    name: str
    type: str
    org: str
    role: str = ""


def project_config(
    name: str,
    server: Participant,
    port: int,
    participants: Sequence[Participant],
    *,
    description: str = "",
    he: bool = False,
    root_ca_valid_days: int | None = None,
    server_host: str | None = None,
) -> dict[str, Any]:
    """The ``project.yml`` document: ``server`` on ``port``, then ``participants`` in order.

    ``server_host``: the host the sites connect to when it differs from the server's name (POC:
    the server is called "server" and runs on localhost). ``he`` adds NVFlare's ``HEBuilder`` before
    the ``SignatureBuilder``, as `nvflare poc prepare -he` puts it (add_he_builder in
    nvflare/tool/poc/poc_commands.py): the context files must be signed, a secure-mode site or
    server refuses an unsigned one (nvflare/app_opt/he/homomorphic_encrypt.py).
    """
    if not 0 < int(port) < 65536:
        raise ValueError(f"bad port {port}")
    cert_builder: dict[str, Any] = {"path": "nvflare.lighter.impl.cert.CertBuilder"}
    if root_ca_valid_days is not None:
        cert_builder["args"] = {"root_valid_days": root_ca_valid_days}
    builders: list[dict[str, Any]] = [
        {"path": "nvflare.lighter.impl.workspace.WorkspaceBuilder",
         "args": {"template_file": ["master_template.yml", "aws_template.yml", "azure_template.yml"]}},
        {"path": "nvflare.lighter.impl.static_file.StaticFileBuilder", "args": {"config_folder": "config"}},
        cert_builder,
        {"path": "nvflare.lighter.impl.signature.SignatureBuilder"},
    ]
    if he:
        builders.insert(-1, {"path": "nvflare.lighter.impl.he.HEBuilder", "args": {}})
    server_entry: dict[str, Any] = {"name": server.name, "type": "server", "org": server.org,
                                    "fed_learn_port": int(port), "admin_port": int(port)}
    if server_host:
        server_entry["default_host"] = server_host
    entries = [server_entry]
    for p in participants:
        entry: dict[str, Any] = {"name": p.name, "type": p.type, "org": p.org}
        if p.role:
            entry["role"] = p.role
        entries.append(entry)
    return {
        "api_version": 3,
        "name": name,
        "description": description or f"fedseg project {name}",
        "allow_log_streaming": False,  # see the module docstring: nothing a site logs reaches the server
        "participants": entries,
        "builders": builders,
    }


def write_yaml(doc: dict[str, Any], path: Path, header: str = "") -> Path:
    """Write ``doc`` as YAML (PyYAML: an NVFlare dependency) to ``path``."""
    import yaml

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + yaml.safe_dump(doc, sort_keys=False))
    return path
