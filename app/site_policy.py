"""What a hospital accepts: its study policy, approved jobs and the audit log of every decision.

The policy is the ``policy`` section of the site's own configuration (``fedseg_site.json`` in the
kit's ``local/`` folder, ``fedseg.app.site_config``), written by ``fedseg provision site-config``
and edited by the site's admin. A job never carries it. ``fedseg.app.site_executor.SiteExecutor``
checks every job against it before the job reads a single case::

    "policy": {
      "algorithms": ["fedavg", "fedper", "ditto"],  # any other algorithm is refused
      "networks": ["unet"],
      "max_rounds": 100, "max_local_epochs": 5,
      "modalities": ["t1", "t1ce", "t2", "flair"],  # the sequences this site will read
      "require_privacy_filter": false,             # a job must filter every update it sends
      "allow_wandb": false,                        # may the server send this site's metrics to W&B
      "require_approval": true                      # run only jobs approved with `fedseg site approve`
    }

A missing key allows anything for that rule; a site config without ``policy`` accepts every job
(the simulator and POC mode). The approve list (``<config>.approved.json`` beside the config)
holds job fingerprints: SHA-256 of the job's ``config_fed_client.json`` and
``config_fed_server.json``, everything the job runs at this site and on the server. The rules are
checked against what will run: the site document as the site parses it, the filters of the client
config and the tasks they cover, the server config's rounds and W&B receiver (a site with a policy
refuses a job whose server runs another app than the site was given). Every decision, accepted or refused, is one JSON line of the audit log
(``<config>.audit.jsonl``, owner-only): time, job id, job name, fingerprint, submitter, decision,
reason. Neither file leaves the site; a refusal's reason (the rule, never a path) goes to the
server, so that the lead learns which site refused and why.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from fedseg.config import OFF

#: the client config inside a job's app folder: what runs at a site
CLIENT_CONFIG = "config_fed_client.json"
SERVER_CONFIG = "config_fed_server.json"
#: class paths of the filters that count as a privacy filter (fedseg.jobs.addons.PrivacyFilter)
PRIVACY_FILTER_PREFIX = "fedseg.app.privacy_filters."
#: what filters the statistics job's results (NVFlare's cleansers run inside it)
STATISTICS_PRIVACY_FILTER = "nvflare.app_common.filters.statistics_privacy_filter.StatisticsPrivacyFilter"


class PolicyError(ValueError):
    """A site policy or approve list that cannot be read (the message names the file)."""


@dataclass(frozen=True)
class SitePolicy:
    """The studies a site joins; ``None`` (or a missing key) allows anything for that rule."""

    algorithms: tuple[str, ...] | None = None
    networks: tuple[str, ...] | None = None
    max_rounds: int | None = None
    max_local_epochs: int | None = None
    modalities: tuple[str, ...] | None = None
    require_privacy_filter: bool = False
    allow_wandb: bool = True
    require_approval: bool = False

    @classmethod
    def from_json(cls, doc: Any, source: object = "policy") -> SitePolicy:
        """The policy in ``doc``; ``PolicyError`` naming ``source`` and the key for anything malformed."""
        if not isinstance(doc, Mapping):
            raise PolicyError(f"{source}: 'policy' must be an object, got {type(doc).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(doc) - known)
        if unknown:
            raise PolicyError(f"{source}: unknown policy key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        values: dict[str, Any] = {}
        for key, value in doc.items():
            if value is None:
                continue
            if key in ("algorithms", "networks", "modalities"):
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise PolicyError(f"{source}: policy '{key}' must be a list of names, got {value!r}")
                values[key] = tuple(value)
            elif key in ("max_rounds", "max_local_epochs"):
                if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                    raise PolicyError(f"{source}: policy '{key}' must be a whole number >= 1, got {value!r}")
                values[key] = value
            elif not isinstance(value, bool):
                raise PolicyError(f"{source}: policy '{key}' must be true or false, got {value!r}")
            else:
                values[key] = value
        return cls(**values)

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def refusals(self, job: JobFacts) -> list[str]:
        """Every rule ``job`` breaks, as the lead reads it ("accepts at most 100 rounds; the job asks 200")."""
        out: list[str] = []
        if self.algorithms is not None and job.algorithm not in self.algorithms:
            out.append(f"accepts the algorithms {', '.join(self.algorithms)}; the job runs {job.algorithm}")
        if self.networks is not None and job.network not in self.networks and job.algorithm != "stats":
            out.append(f"accepts the networks {', '.join(self.networks)}; the job trains {job.network}")
        if self.max_rounds is not None and job.rounds > self.max_rounds:
            out.append(f"accepts at most {self.max_rounds} rounds; the job asks {job.rounds}")
        if self.max_local_epochs is not None and job.local_epochs > self.max_local_epochs:
            out.append(f"accepts at most {self.max_local_epochs} local epochs; the job asks {job.local_epochs}")
        if self.modalities is not None:
            extra = [m for m in job.modalities if m not in self.modalities]
            if extra:
                out.append(f"reads only {', '.join(self.modalities)}; the job asks for {', '.join(extra)} too")
        if self.require_privacy_filter and not job.privacy_filter:
            out.append("requires a privacy filter on every update it sends; the job has none")
        if not self.allow_wandb and job.wandb != OFF:
            out.append(f"does not allow its metrics in Weights & Biases; the job tracks to W&B ({job.wandb})")
        return out


@dataclass(frozen=True)
class JobFacts:
    """What a site checks of a job, read from what will run: the site document as the site parses
    it (defaults filled in), the client config's filters, and the server config the site was
    deployed with (its rounds and W&B receiver)."""

    name: str
    algorithm: str
    network: str
    #: the most rounds the job may run: the rounds it tells the sites, or its server's, if more
    rounds: int
    local_epochs: int
    modalities: tuple[str, ...]
    wandb: str
    privacy_filter: bool
    fingerprint: str
    #: the rounds the job tells the sites (a site refuses training rounds past them)
    declared_rounds: int = 0
    #: why the job's configs cannot be checked ('' when they can)
    unreadable: str = ""
    #: the site was deployed with the server's own configuration (one app for the server and the sites)
    server_seen: bool = False

    @classmethod
    def from_job(cls, document: Mapping[str, Any], client_config: Mapping[str, Any],
                 server_config: Mapping[str, Any] | None = None) -> JobFacts:
        """The facts of a job from its site document (``fedseg.jobs.base.Job.site_document``) and
        the configs the site deployed. ``server_config`` None: the site did not get the server's."""
        fingerprint = config_fingerprint(client_config, server_config)
        try:
            if document.get("algorithm") == "stats":  # the statistics job: no study document to parse
                study = None
                modalities = tuple((document.get("study") or {}).get("data", {}).get("modalities") or ())
            else:
                from fedseg.app.site_runner import SiteJob

                study = SiteJob.from_document(dict(document)).study  # the parse the site trains with
                modalities = tuple(study.data.modalities)
            declared = study.federation.rounds if study is not None else 0
            server_rounds = _server_rounds(server_config or {})
            # W&B: what the server will run decides, when the site sees it; else what the job says
            receivers = [c for c in (server_config or {}).get("components", [])
                         if "wandb" in str(c.get("path", "")).lower()]
            wandb = str(document.get("wandb", OFF))
            if receivers:
                wandb = str(receivers[0].get("args", {}).get("mode") or "on")
            elif server_config is not None:
                wandb = OFF
            return cls(
                name=str(document.get("study_name") or ""),
                algorithm=str(document.get("algorithm", "")),
                network=study.model.network if study is not None else "",
                rounds=max(declared, server_rounds),
                local_epochs=study.federation.local_epochs if study is not None else 0,
                modalities=modalities,
                wandb=wandb,
                server_seen=server_config is not None,
                privacy_filter=_filters_updates(client_config, document.get("algorithm") == "stats"),
                fingerprint=fingerprint,
                declared_rounds=declared,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            return cls(name=str(document.get("study_name") or ""), algorithm=str(document.get("algorithm", "")),
                       network="", rounds=0, local_epochs=0, modalities=(), wandb=OFF, privacy_filter=False,
                       fingerprint=fingerprint, unreadable=f"{type(err).__name__}: {err}")


def _server_rounds(server_config: Mapping[str, Any]) -> int:
    """The last round any workflow of the server config runs (its start round plus its rounds)."""
    rounds = 0
    for workflow in server_config.get("workflows", []):
        args = workflow.get("args", {}) if isinstance(workflow, Mapping) else {}
        if "num_rounds" in args:
            rounds = max(rounds, int(args.get("start_round") or 0) + int(args["num_rounds"]))
    return rounds


def _filters_updates(client_config: Mapping[str, Any], statistics: bool) -> bool:
    """Whether a privacy filter covers every update the site sends: a fedseg privacy filter on the
    train task (a training job), NVFlare's statistics privacy filter on ``fed_stats`` (the statistics
    job). NVFlare applies a filter to the tasks listed with it only."""
    task = "fed_stats" if statistics else "train"
    for entry in client_config.get("task_result_filters", []):
        if task not in entry.get("tasks", []) and "*" not in entry.get("tasks", []):
            continue
        for f in entry.get("filters", []):
            path = str(f.get("path", ""))
            if path.startswith(PRIVACY_FILTER_PREFIX) or (statistics and path == STATISTICS_PRIVACY_FILTER):
                return True
    return False


def policy_of(site_config: Any) -> SitePolicy | None:
    """The ``policy`` of a ``fedseg.app.site_config.SiteConfig`` (None: the site accepts every job)."""
    doc = (site_config.extra or {}).get("policy")
    return None if doc is None else SitePolicy.from_json(doc, site_config.source)


def config_fingerprint(client_config: Mapping[str, Any], server_config: Mapping[str, Any] | None = None) -> str:
    """SHA-256 of a job app's configs: what runs at the site and on the server (key order and
    layout do not matter)."""
    doc = {"client": client_config, "server": server_config}
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_client_config(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise PolicyError(f"{path}: not a readable job config ({err})") from None
    if not isinstance(doc, dict):
        raise PolicyError(f"{path}: not a job config (a JSON object)")
    return doc


def job_client_configs(job_folder: Path) -> dict[str, Path]:
    """``app name -> config_fed_client.json`` of an exported job folder (``PolicyError`` if it has none)."""
    job_folder = Path(job_folder)
    found = {p.parent.parent.name: p for p in sorted(job_folder.glob(f"*/config/{CLIENT_CONFIG}"))}
    if not found:
        raise PolicyError(f"{job_folder}: not a job folder (no */config/{CLIENT_CONFIG})")
    return found


# ------------------------------------------------------------------------------ site-local files


def approvals_path(site_config: Path) -> Path:
    """The approve list beside the site config (``fedseg_site.approved.json`` in a kit's local/)."""
    return Path(site_config).with_name(f"{Path(site_config).stem}.approved.json")


def audit_path(site_config: Path) -> Path:
    """The audit log beside the site config (``fedseg_site.audit.jsonl`` in a kit's local/)."""
    return Path(site_config).with_name(f"{Path(site_config).stem}.audit.jsonl")


def approved_fingerprints(site_config: Path) -> dict[str, dict[str, Any]]:
    """``fingerprint -> {name, approved_at}`` of the approve list ({} when there is none)."""
    path = approvals_path(site_config)
    if not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise PolicyError(f"{path}: not a readable approve list ({err})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("approved"), dict):
        raise PolicyError(f"{path}: an approve list is {{\"approved\": {{fingerprint: {{...}}}}}}")
    return doc["approved"]


def approve(site_config: Path, job_folder: Path) -> list[tuple[str, str]]:
    """Add every app of ``job_folder`` to the site's approve list; ``[(app, fingerprint)]``."""
    approved = approved_fingerprints(site_config)
    added = []
    for app, config_path in job_client_configs(job_folder).items():
        server_path = config_path.with_name(SERVER_CONFIG)
        server = read_client_config(server_path) if server_path.is_file() else None
        fingerprint = config_fingerprint(read_client_config(config_path), server)
        approved[fingerprint] = {"job": Path(job_folder).name, "app": app,
                                 "approved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        added.append((app, fingerprint))
    _write_owner_only(approvals_path(site_config), json.dumps({"approved": approved}, indent=2) + "\n")
    return added


def append_audit(site_config: Path, record: Mapping[str, Any]) -> Path:
    """Append one decision to the site's audit log (created owner-only)."""
    path = audit_path(site_config)
    line = json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **record}, sort_keys=False)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a", encoding="utf-8") as out:
        out.write(line + "\n")
    return path


def read_audit(site_config: Path) -> list[dict[str, Any]]:
    path = audit_path(site_config)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _write_owner_only(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` (0600) through a temporary file, so a crash never leaves half a list."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------ the decision


@dataclass(frozen=True)
class Decision:
    accepted: bool
    reasons: tuple[str, ...] = ()

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)


def decide(policy: SitePolicy | None, job: JobFacts, approved: Sequence[str] | Mapping[str, Any] = (),
           *, job_version: str, site_version: str) -> Decision:
    """Whether the site runs ``job``: the same fedseg version, the policy's rules, the approve list."""
    reasons: list[str] = []
    if job.unreadable:
        reasons.append(f"cannot read the job's settings ({job.unreadable})")
    if job.declared_rounds and job.rounds > job.declared_rounds:
        reasons.append(f"the job's server runs {job.rounds} rounds but the job tells the sites {job.declared_rounds}")
    if job_version != site_version:
        reasons.append(f"runs fedseg {site_version}; the job was built for fedseg {job_version}")
    if policy is not None:
        reasons += policy.refusals(job)
        if not job.server_seen:
            reasons.append("checks the server's configuration of every job; this job deploys another app to the "
                           "server than to this site (a fedseg job deploys one app to @ALL)")
        if policy.require_approval and job.fingerprint not in approved:
            reasons.append(f"runs only approved jobs; this job (fingerprint {job.fingerprint[:12]}) is not approved "
                           "(`fedseg site approve JOB_FOLDER` at the site)")
    return Decision(not reasons, tuple(reasons))
