"""Site-local configuration: how a site finds its own data without paths baked into the job.

A job folder is the same at every hospital; what differs per site is read at the site from a
small JSON file (``SiteConfig``), found in this order:

1. ``$FEDSEG_SITE_CONFIG``: a JSON file, or a folder holding ``<site name>.json`` (one folder can
   serve several sites on one machine: the simulator, POC mode, tests);
2. ``<site workspace>/local/fedseg_site.json``: the ``local/`` folder of the site's startup kit
   (NVFlare runs the site with its kit root as working directory; the search also walks up from
   the running script).

Example ``fedseg_site.json``::

    {"datalist": "/data/brats/site.json", "data_root": "/data/brats", "cache_dir": "/scratch/fedseg",
     "head_store": "/var/lib/fedseg/heads"}

``head_store`` is where the personalized jobs (FedPer, FedRep, Ditto, fine-tuning) keep this site's
personal models (one file per study); default
``~/.local/share/fedseg/heads/<site name>``.

Relative paths are relative to the config file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_VAR = "FEDSEG_SITE_CONFIG"
LOCAL_FILE = "fedseg_site.json"


class SiteConfigError(RuntimeError):
    """The site's configuration is missing or malformed (the message says where it looked)."""


@dataclass
class SiteConfig:
    """What one site keeps to itself: where its data is and where it may write."""

    datalist: Path
    data_root: Path | None = None
    cache_dir: Path | None = None
    head_store: Path | None = None
    #: this site's own held-out test cases (a test datalist, ``lightning_modules.test_sets``): the
    #: personal model is scored on them at the end of a personalized job; only the scores leave
    test_datalist: Path | None = None
    source: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_file(cls, path: Path) -> SiteConfig:
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise SiteConfigError(f"{path}: not a readable site config ({err})") from None
        if not isinstance(doc, dict) or "datalist" not in doc:
            raise SiteConfigError(f"{path}: a site config needs at least a 'datalist' entry")

        def resolve(key: str) -> Path | None:
            value = doc.get(key)
            return (path.parent / value).resolve() if value else None

        known = {"datalist", "data_root", "cache_dir", "head_store", "test_datalist"}
        return cls(
            datalist=resolve("datalist"),  # type: ignore[arg-type]
            data_root=resolve("data_root"),
            cache_dir=resolve("cache_dir"),
            head_store=resolve("head_store"),
            test_datalist=resolve("test_datalist"),
            source=path,
            extra={k: v for k, v in doc.items() if k not in known},
        )


def default_head_store(site_name: str) -> Path:
    """Where personal models live when the site config names no ``head_store``.

    The site's name is part of the path: sites that share a home folder (POC, several sites on one
    machine) must never read each other's heads.
    """
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "fedseg" / "heads" / site_name


def _walk_up(start: Path) -> list[Path]:
    start = start.resolve()
    return [start, *start.parents]


def find_site_config(site_name: str, script_file: str | Path | None = None) -> Path:
    """Path of ``site_name``'s config file; ``SiteConfigError`` listing the places tried."""
    tried: list[str] = []
    env = os.environ.get(ENV_VAR)
    if env:
        candidate = Path(env) / f"{site_name}.json" if Path(env).is_dir() else Path(env)
        if candidate.is_file():
            return candidate
        tried.append(f"${ENV_VAR} -> {candidate}")
    starts = [Path(script_file).parent] if script_file else []
    starts.append(Path.cwd())
    for start in starts:
        for folder in _walk_up(start):
            candidate = folder / "local" / LOCAL_FILE
            if candidate.is_file():
                return candidate
            tried.append(str(candidate))
    shown = "\n  ".join(dict.fromkeys(tried[:8]))
    raise SiteConfigError(
        f"no fedseg site configuration for site {site_name!r}. Put a {LOCAL_FILE} in the site's "
        f"startup kit local/ folder or set {ENV_VAR}. Tried:\n  {shown}"
    )


def load_site_config(site_name: str, script_file: str | Path | None = None) -> SiteConfig:
    """Find and read ``site_name``'s configuration."""
    return SiteConfig.from_file(find_site_config(site_name, script_file))


def write_site_config(path: Path, datalist: Path, data_root: Path | None = None, **extra: Any) -> Path:
    """Write a site config (what a site admin does by hand; used by POC setup and tests)."""
    doc: dict[str, Any] = {"datalist": str(Path(datalist).resolve())}
    if data_root is not None:
        doc["data_root"] = str(Path(data_root).resolve())
    doc.update({k: str(v) if isinstance(v, Path) else v for k, v in extra.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path
