"""One workaround for NVFlare 2.9's job export, applied before any fedseg job is built.

fedseg maps its repository folders into one import namespace (``lightning_modules/`` is
``fedseg.lightning_modules``, see pyproject.toml). NVFlare's ``FedJobConfig._get_custom_file``
first checks that a component's source file path ends with its module path
(``fedseg/lightning_modules/networks.py``) and raises "Source path ... does not match module"
otherwise, and only afterwards skips packages listed in ``app_packages``, which are never copied
into the job anyway (nvflare/job_config/fed_job_config.py, ``_derive_source_root`` /
``_get_custom_file``). So the check is moved behind the skip: for app packages and NVFlare's own
packages nothing is checked or copied, exactly as the library does after its check.
``tests/test_jobs.py`` pins both the library behaviour and this fix.
"""

from __future__ import annotations

from typing import Any

from nvflare.job_config import fed_job_config
from nvflare.job_config.fed_job_config import FL_PACKAGES, FedJobConfig

_original_get_custom_file = FedJobConfig._get_custom_file


def _get_custom_file(self: FedJobConfig, custom_dir: str, module: str, source_file: str, *args: Any, **kwargs: Any):
    if module.split(".")[0] in FL_PACKAGES or module.split(".")[0] in self.app_packages:
        return None
    return _original_get_custom_file(self, custom_dir, module, source_file, *args, **kwargs)


def apply() -> None:
    """Install the workaround (idempotent)."""
    if getattr(fed_job_config.FedJobConfig._get_custom_file, "__fedseg__", False):
        return
    _get_custom_file.__fedseg__ = True  # type: ignore[attr-defined]
    FedJobConfig._get_custom_file = _get_custom_file
