"""The packages import each other one way: each layer imports only the layers below it.

From the bottom: ``fedseg.config`` and ``fedseg.nvflare_internals``; ``lightning_modules`` (one site's
training, no NVFlare); ``app`` (code that runs inside NVFlare); ``jobs`` (the algorithms and the
recipes that place ``app``'s components); ``provisioning`` (kits); ``fedseg.run`` (where a job
runs: simulator, POC, local kits); ``fedseg.experiments``; ``fedseg.cli``. The folders map to the
packages as ``pyproject.toml``'s ``package-dir`` says (``app/`` is ``fedseg.app``, ...), which this
test reads.

The scan covers every import in every source file, at module level and inside functions (a lazy
import is still a dependency), except those under ``if TYPE_CHECKING:``. The exception is listed
with its reason, and each must still occur: a fixed one is taken off the list.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: the layers, lowest first; a module may import its own layer and those below it
LAYERS: tuple[tuple[str, ...], ...] = (
    ("fedseg.config", "fedseg.nvflare_internals", "fedseg"),
    ("fedseg.lightning_modules",),
    ("fedseg.app",),
    ("fedseg.jobs",),
    ("fedseg.provisioning",),
    ("fedseg.run",),
    ("fedseg.experiments",),
    ("fedseg.cli", "fedseg.__main__"),
)
#: (importer, imported) -> why it is allowed for now
EXCEPTIONS: dict[tuple[str, str], str] = {
    ("fedseg.app.site_runner", "fedseg.jobs.base"):
        "a site reads its algorithm's declaration (its options dataclass and site plug-in) from the table; "
        "the modules it loads import app only inside functions (test below)",
}


def package_dirs() -> dict[str, str]:
    """Folder -> package, from ``pyproject.toml`` (``fedseg.app = app`` gives ``app -> fedseg.app``)."""
    doc = tomllib.loads((REPO / "pyproject.toml").read_text())
    return {folder: package for package, folder in doc["tool"]["setuptools"]["package-dir"].items()}


def source_modules() -> dict[str, Path]:
    """Every module of the installed packages: dotted name -> file."""
    modules: dict[str, Path] = {}
    for folder, package in package_dirs().items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            if folder == "fedseg" and parts[0] in package_dirs():  # a mapped folder is not under fedseg/
                continue
            modules[".".join((package, *parts)).removesuffix(".__init__")] = path
    return modules


def layer(module: str) -> int | None:
    """The layer of ``module`` (None: not fedseg's); the longest matching package decides."""
    best: tuple[int, int] | None = None
    for rank, packages in enumerate(LAYERS):
        for package in packages:
            if module == package or module.startswith(package + "."):
                if best is None or len(package) > best[0]:
                    best = (len(package), rank)
    return best[1] if best else None


def imports(source: str) -> list[tuple[str, int]]:
    """Every ``fedseg`` module imported in ``source`` with its line, outside ``if TYPE_CHECKING:``."""
    tree = ast.parse(source)
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                   for part in node.body for n in ast.walk(part)}
    found = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, node.lineno))
    return [(name, line) for name, line in found if name == "fedseg" or name.startswith("fedseg.")]


def upward_imports(module: str, source: str) -> set[tuple[str, str]]:
    """``(module, imported)`` for every import of ``source`` into a higher layer than ``module``'s."""
    own = layer(module)
    return {(module, name) for name, _ in imports(source)
            if own is not None and (other := layer(name)) is not None and other > own}


def test_the_package_map_is_the_one_in_pyproject():
    dirs = package_dirs()
    assert dirs["app"] == "fedseg.app" and dirs["jobs"] == "fedseg.jobs" and dirs["fedseg"] == "fedseg"
    modules = source_modules()
    assert "fedseg.app.site_runner" in modules and "fedseg.jobs.base" in modules and "fedseg.cli" in modules
    assert "fedseg.provisioning.site_control" in modules and "fedseg.lightning_modules.data.synth" in modules
    # every module has a layer
    assert [m for m in modules if layer(m) is None] == []


def test_every_import_points_down_the_layers():
    found = set()
    for module, path in source_modules().items():
        found |= upward_imports(module, path.read_text())
    new = sorted(found - set(EXCEPTIONS))
    assert not new, f"imports into a higher layer (move what both need down): {new}"
    fixed = sorted(set(EXCEPTIONS) - found)
    assert not fixed, f"no longer imported, take them off EXCEPTIONS: {fixed}"


def test_the_scan_fails_on_an_upward_import():
    """The check can fail: a lazy import of a runner from app, of the CLI from jobs."""
    source = "import os\n\ndef f():\n    from fedseg.run.simulate import simulate\n    import fedseg.cli\n"
    assert upward_imports("fedseg.app.some_module", source) == {("fedseg.app.some_module", "fedseg.run.simulate"),
                                                               ("fedseg.app.some_module", "fedseg.cli")}
    assert upward_imports("fedseg.jobs.some_module", source) == {("fedseg.jobs.some_module", "fedseg.run.simulate"),
                                                               ("fedseg.jobs.some_module", "fedseg.cli")}
    typing_only = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from fedseg.jobs.base import Job\n"
    assert upward_imports("fedseg.app.some_module", typing_only) == set()
    assert upward_imports("fedseg.cli.some_module", source) == set()


def test_the_modules_a_site_reads_its_algorithm_from_import_app_only_inside_functions():
    """The one sanctioned import from app into jobs loads ``jobs.base`` and the algorithm modules; none of
    them may import ``app`` (or NVFlare, torch) when loaded, or the two would form an import cycle."""
    from fedseg.jobs.base import ALGORITHM_MODULES

    modules = source_modules()
    for name in ("fedseg.jobs.base", "fedseg.jobs.addons", *(f"fedseg.jobs.{m}" for m in ALGORITHM_MODULES)):
        tree = ast.parse(modules[name].read_text())
        top_level = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
        loaded = [name for node in top_level
                  for name in ([node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names])]
        heavy = [m for m in loaded if m.startswith(("fedseg.app", "nvflare", "torch", "monai", "pytorch_lightning"))]
        assert not heavy, f"{name} imports {heavy} at module level"
