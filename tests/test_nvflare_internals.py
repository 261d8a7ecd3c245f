"""Every private NVFlare name fedseg touches is in ``fedseg.nvflare_internals`` and nowhere else, the
hooks fedseg overrides still have the signatures it overrides, and another NVFlare version is refused."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from fedseg import nvflare_internals

REPO = Path(__file__).resolve().parents[1]
SOURCES = [p for folder in ("app", "jobs", "lightning_modules", "provisioning", "fedseg", "bench")
           for p in (REPO / folder).rglob("*.py")]
INTERNALS = REPO / "fedseg" / "nvflare_internals.py"


def test_no_other_module_names_a_private_nvflare_name():
    offenders = []
    for path in SOURCES:
        if path == INTERNALS:
            continue
        text = path.read_text()
        for name in nvflare_internals.PRIVATE_NAMES:
            if re.search(rf"\b{re.escape(name)}\b", text):
                offenders.append(f"{path.relative_to(REPO)}: {name}")
    assert not offenders, offenders


def test_no_other_module_imports_a_private_name_from_nvflare():
    offenders = []
    for path in SOURCES:
        if path == INTERNALS:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("nvflare"):
                offenders += [f"{path.relative_to(REPO)}: {a.name}" for a in node.names if a.name.startswith("_")]
    assert not offenders, offenders


def test_overridden_hooks_are_named_only_where_they_are_overridden():
    """A private NVFlare hook may appear only as ``def <hook>`` and ``super().<hook>(`` in a subclass (and
    in documentation, between double backquotes)."""
    hooks = {hook for table in nvflare_internals.OVERRIDDEN_HOOKS.values() for hook in table}
    for path in SOURCES:
        if path == INTERNALS:
            continue
        for line in path.read_text().splitlines():
            for hook in hooks:
                if re.search(rf"\b{hook}\b", line):
                    allowed = rf"def {hook}\(|super\(\)\.{hook}\(|``{hook}``"
                    assert re.search(allowed, line), f"{path.name}: {line.strip()}"


@pytest.mark.parametrize(("class_path", "hook", "parameters"), [
    (c, h, p) for c, table in nvflare_internals.OVERRIDDEN_HOOKS.items() for h, p in table.items()
])
def test_the_hooks_fedseg_overrides_keep_their_signatures(class_path, hook, parameters):
    assert nvflare_internals.hook_signature(class_path, hook) == parameters


def test_another_nvflare_version_is_refused_with_the_install_command():
    nvflare_internals.require_supported_version("2.9.0")
    with pytest.raises(nvflare_internals.UnsupportedNVFlareVersion, match=r"pip install 'nvflare==2\.9\.0'"):
        nvflare_internals.require_supported_version("2.10.0")
