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
holds job fingerprints: SHA-256 of the job's ``config_fed_client.json``, which is everything the
job runs at this site. Every decision, accepted or refused, is one JSON line of the audit log
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

#: the client config inside a job's app folder: what runs at a site
CLIENT_CONFIG = "config_fed_client.json"
#: class paths of the filters that count as a privacy filter (fedseg.jobs.addons.PrivacyFilter)
PRIVACY_FILTER_PREFIX = "fedseg.app.privacy_filters."


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
        if self.networks is not None and job.network and job.network not in self.networks:
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
        if not self.allow_wandb and job.wandb != "off":
            out.append(f"does not allow its metrics in Weights & Biases; the job tracks to W&B ({job.wandb})")
        return out


@dataclass(frozen=True)
class JobFacts:
    """What a site checks of a job: its settings (the site document) and its client config's filters."""

    name: str
    algorithm: str
    network: str
    rounds: int
    local_epochs: int
    modalities: tuple[str, ...]
    wandb: str
    privacy_filter: bool
    fingerprint: str

    @classmethod
    def from_job(cls, document: Mapping[str, Any], client_config: Mapping[str, Any]) -> JobFacts:
        """The facts of a job from its site document (``fedseg.jobs.base.Job.site_document``) and
        the ``config_fed_client.json`` the site deployed (the filters are read from what will run)."""
        study = document.get("study") or {}
        model, data, fed = study.get("model") or {}, study.get("data") or {}, study.get("federation") or {}
        filters = [f.get("path", "") for entry in client_config.get("task_result_filters", [])
                   for f in entry.get("filters", [])]
        return cls(
            name=str(document.get("study_name") or ""),
            algorithm=str(document.get("algorithm", "")),
            network=str(model.get("network", "")),
            rounds=int(fed.get("rounds", 0)),
            local_epochs=int(fed.get("local_epochs", 0)),
            modalities=tuple(data.get("modalities") or ()),
            wandb=str(document.get("wandb", "off")),
            privacy_filter=any(p.startswith(PRIVACY_FILTER_PREFIX) for p in filters),
            fingerprint=config_fingerprint(client_config),
        )


def policy_of(site_config: Any) -> SitePolicy | None:
    """The ``policy`` of a ``fedseg.app.site_config.SiteConfig`` (None: the site accepts every job)."""
    doc = (site_config.extra or {}).get("policy")
    return None if doc is None else SitePolicy.from_json(doc, site_config.source)


def config_fingerprint(client_config: Mapping[str, Any]) -> str:
    """SHA-256 of a client config's content (key order and layout do not matter)."""
    text = json.dumps(client_config, sort_keys=True, separators=(",", ":"))
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
        fingerprint = config_fingerprint(read_client_config(config_path))
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
    if job_version != site_version:
        reasons.append(f"runs fedseg {site_version}; the job was built for fedseg {job_version}")
    if policy is not None:
        reasons += policy.refusals(job)
        if policy.require_approval and job.fingerprint not in approved:
            reasons.append(f"runs only approved jobs; this job (fingerprint {job.fingerprint[:12]}) is not approved "
                           "(`fedseg site approve JOB_FOLDER` at the site)")
    return Decision(not reasons, tuple(reasons))
