"""Every private NVFlare name fedseg touches is in ``fedseg.nvflare_internals`` and nowhere else, the
hooks fedseg overrides still have the signatures it overrides, the conventions it follows are still
NVFlare's, and another NVFlare version is refused.

The guard is a static scan (``boundary_violations``) of every fedseg module but ``nvflare_internals``.
A *private NVFlare name* is any underscore name (not a dunder) that occurs in the installed NVFlare's
sources. The scan reports:

- ``x._name`` on anything but ``self``/``cls``, for a private NVFlare name (``recipe._job``,
  ``base_fedavg._get_client_name``); a name reached through a module or class imported from outside
  NVFlare (``argparse._SubParsersAction``) is not NVFlare's;
- in a class that has an NVFlare class among its bases, or that is mixed into one: ``def _name``,
  ``self._name``, ``super()._name`` and a class attribute ``_name`` where ``_name`` is defined by one of
  those NVFlare classes (their ``__dict__`` and the ``self._x`` they assign). Only the hooks in
  ``OVERRIDDEN_HOOKS`` may be defined and called through ``super()``;
- a name NVFlare reads from other objects by ``getattr``/``hasattr`` (``_always_serialize_args``),
  defined anywhere, unless it is in ``EXPORT_CONVENTIONS``;
- ``self._<p> = ...`` in an ``__init__`` with a parameter ``<p>``: NVFlare's job export reads a
  constructor argument back from ``<p>`` or ``_<p>``; only ``PRIVATE_ARGUMENT_ATTRIBUTES`` may;
- a string that is a private NVFlare name (``getattr(recipe, "_job")``), and ``from nvflare... import _x``.

Underscore names fedseg defines and reaches on its own objects (``self._lock`` in a class that is not
NVFlare's) are fedseg's own. ``test_the_guard_fails_on_...`` shows the scan reports what it must.
"""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import re
import textwrap
from pathlib import Path

import pytest

from fedseg import nvflare_internals

REPO = Path(__file__).resolve().parents[1]
FOLDERS = {"app": "fedseg.app", "jobs": "fedseg.jobs", "lightning_modules": "fedseg.lightning_modules",
           "provisioning": "fedseg.provisioning", "fedseg": "fedseg", "bench": "bench"}
INTERNALS = REPO / "fedseg" / "nvflare_internals.py"
_PRIVATE = re.compile(r"\b_[A-Za-z0-9]\w*")


def _is_private(name: str) -> bool:
    return name.startswith("_") and name != "_" and not (name.startswith("__") and name.endswith("__"))


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    dotted = ".".join((FOLDERS[parts[0]], *parts[1:])) if parts[0] != "fedseg" else ".".join(parts)
    return dotted.removesuffix(".__init__")


# ------------------------------------------------------------------------------ what NVFlare defines


@functools.cache
def _nvflare_sources() -> tuple[str, ...]:
    import nvflare

    return tuple(p.read_text(encoding="utf-8") for p in Path(nvflare.__file__).parent.rglob("*.py"))


@functools.cache
def nvflare_private_names() -> frozenset[str]:
    """Every underscore name (not a dunder) in the installed NVFlare's sources: what it defines (functions,
    methods, attributes, module constants) and whatever else it names."""
    return frozenset(n for text in _nvflare_sources() for n in _PRIVATE.findall(text) if _is_private(n))


@functools.cache
def nvflare_reads_by_name() -> frozenset[str]:
    """Underscore names NVFlare reads from other objects by name (``getattr(component, "_x", ...)``)."""
    pattern = re.compile(r"""\b(?:getattr|hasattr|setattr|delattr)\(\s*[^,()]+,\s*["'](_[A-Za-z0-9]\w*)["']""")
    return frozenset(n for text in _nvflare_sources() for n in pattern.findall(text) if _is_private(n))


@functools.cache
def nvflare_class_privates(cls: type) -> frozenset[str]:
    """The underscore names an NVFlare class and its NVFlare bases define: their ``__dict__`` and the
    ``self._x`` their methods assign."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if not klass.__module__.startswith("nvflare"):
            continue
        names.update(n for n in vars(klass) if _is_private(n))
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        names.update(node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
                     and isinstance(node.ctx, ast.Store) and _is_private(node.attr))
    return frozenset(names)


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


# ------------------------------------------------------------------------------ the scan


class _Module:
    """One parsed source: its classes and what each imported name refers to (``"pkg.mod.Name"``)."""

    def __init__(self, name: str, text: str) -> None:
        self.name, self.tree = name, ast.parse(text)
        self.imports: dict[str, str] = {}
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.asname:
                        self.imports[alias.asname] = alias.name
                    else:
                        self.imports[alias.name.split(".")[0]] = alias.name.split(".")[0]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    package = name.rsplit(".", node.level)[0]
                    base = f"{package}.{base}" if base else package
                for alias in node.names:
                    self.imports[alias.asname or alias.name] = f"{base}.{alias.name}"
        self.classes = {node.name: node for node in self.tree.body if isinstance(node, ast.ClassDef)}

    def resolve(self, expr: ast.expr) -> str | None:
        """The dotted path an expression (a name or ``a.b.c``) refers to, if it comes from an import or
        from this module."""
        if isinstance(expr, ast.Name):
            if expr.id in self.imports:
                return self.imports[expr.id]
            return f"{self.name}.{expr.id}" if expr.id in self.classes else None
        if isinstance(expr, ast.Attribute):
            root = self.resolve(expr.value)
            return f"{root}.{expr.attr}" if root else None
        return None


def _import_object(dotted: str) -> object | None:
    module, _, attr = dotted.rpartition(".")
    while module:
        try:
            obj: object = importlib.import_module(module)
        except ImportError:
            module, _, head = module.rpartition(".")
            attr = f"{head}.{attr}"
            continue
        for part in attr.split("."):
            obj = getattr(obj, part, None)
        return obj
    return None


class _Classes:
    """Every class of the scanned modules with the NVFlare classes it is built on (its own bases', and
    those of the classes it is mixed into)."""

    def __init__(self, modules: list[_Module]) -> None:
        self.defined = {f"{m.name}.{name}": (m, node) for m in modules for name, node in m.classes.items()}
        self.fedseg_bases: dict[str, set[str]] = {}
        self.nvflare_bases: dict[str, set[type]] = {}
        for path, (module, node) in self.defined.items():
            self.fedseg_bases[path], self.nvflare_bases[path] = set(), set()
            for base in node.bases:
                dotted = module.resolve(base)
                if dotted is None:
                    continue
                if dotted in self.defined:
                    self.fedseg_bases[path].add(dotted)
                    continue
                obj = _import_object(dotted) if dotted.split(".")[0] in ("nvflare", "fedseg") else None
                if isinstance(obj, type):
                    self.nvflare_bases[path].update(k for k in obj.__mro__ if k.__module__.startswith("nvflare"))
        changed = True
        while changed:  # a class gets its bases' NVFlare classes, and a mixin those of the classes it is in
            changed = False
            for path, bases in self.fedseg_bases.items():
                for base in bases:
                    union = self.nvflare_bases[path] | self.nvflare_bases[base]
                    if union != self.nvflare_bases[path] or union != self.nvflare_bases[base]:
                        self.nvflare_bases[path] = self.nvflare_bases[base] = union
                        changed = True

    def nvflare_context(self, path: str) -> tuple[frozenset[str], set[str]]:
        """The private names of the NVFlare classes ``path`` is built on, and the hooks it may override."""
        classes = self.nvflare_bases.get(path, set())
        names = frozenset().union(*(nvflare_class_privates(c) for c in classes)) if classes else frozenset()
        hooks = {h for c in classes for h in nvflare_internals.OVERRIDDEN_HOOKS.get(_class_path(c), {})}
        return names, hooks


def _is_super_call(expr: ast.expr) -> bool:
    return isinstance(expr, ast.Call) and isinstance(expr.func, ast.Name) and expr.func.id == "super"


def boundary_violations(sources: dict[str, str]) -> list[str]:
    """Each use of a private NVFlare name in ``sources`` (``module name -> source text``), as
    ``"module:line: what"``; see the module docstring for the rules."""
    modules = [_Module(name, text) for name, text in sources.items()]
    classes = _Classes(modules)
    private, read_by_name = nvflare_private_names(), nvflare_reads_by_name()
    conventions = set(nvflare_internals.EXPORT_CONVENTIONS)
    found: list[str] = []

    def report(module: _Module, node: ast.AST, what: str) -> None:
        found.append(f"{module.name}:{getattr(node, 'lineno', 0)}: {what}")

    def scan(module: _Module, node: ast.AST, cls: str | None) -> None:
        names, hooks = classes.nvflare_context(cls) if cls else (frozenset(), set())
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                scan(module, child, f"{module.name}.{child.name}" if node is module.tree else cls)
                continue
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) and isinstance(node, ast.ClassDef):
                if child.name in names and child.name not in hooks:
                    report(module, child, f"def {child.name}: overrides NVFlare's private {child.name} "
                                          "(not in OVERRIDDEN_HOOKS)")
                if child.name == "__init__":
                    parameters = {a.arg for a in (*child.args.posonlyargs, *child.args.args, *child.args.kwonlyargs)}
                    allowed = nvflare_internals.PRIVATE_ARGUMENT_ATTRIBUTES.get(cls or "", ())
                    for sub in ast.walk(child):
                        if (isinstance(sub, ast.Attribute) and isinstance(sub.ctx, ast.Store)
                                and isinstance(sub.value, ast.Name) and sub.value.id == "self"
                                and sub.attr[1:] in parameters and sub.attr.startswith("_")
                                and sub.attr[1:] not in allowed):
                            report(module, sub, f"self.{sub.attr}: NVFlare's job export reads the argument "
                                                f"{sub.attr[1:]!r} back from {sub.attr} (not in "
                                                "PRIVATE_ARGUMENT_ATTRIBUTES)")
            if isinstance(child, (ast.Assign, ast.AnnAssign)) and isinstance(node, ast.ClassDef):
                targets = child.targets if isinstance(child, ast.Assign) else [child.target]
                for target in targets:
                    if isinstance(target, ast.Name) and target.id in names and target.id not in conventions:
                        report(module, child, f"{target.id} = ...: replaces NVFlare's private {target.id}")
                    elif isinstance(target, ast.Name) and target.id in read_by_name and target.id not in conventions:
                        report(module, child, f"{target.id} = ...: a name NVFlare reads by name (not in "
                                              "EXPORT_CONVENTIONS)")
            if isinstance(child, ast.Attribute) and _is_private(child.attr):
                owner = child.value
                if isinstance(owner, ast.Name) and owner.id in ("self", "cls") or _is_super_call(owner):
                    through_super = _is_super_call(owner)
                    if child.attr in names and not (through_super and child.attr in hooks):
                        report(module, child, f"{ast.unparse(child)}: NVFlare's private {child.attr}")
                    elif (isinstance(child.ctx, ast.Store) and child.attr in read_by_name
                          and child.attr not in conventions):
                        report(module, child, f"{ast.unparse(child)}: a name NVFlare reads by name "
                                              "(not in EXPORT_CONVENTIONS)")
                elif child.attr in private:
                    dotted = module.resolve(owner)
                    if dotted is None or dotted.split(".")[0] == "nvflare" or not (
                            isinstance(owner, ast.Name) or isinstance(owner, ast.Attribute)):
                        report(module, child, f"{ast.unparse(child)}: a private NVFlare name")
            if isinstance(child, ast.Constant) and isinstance(child.value, str) and child.value in private:
                report(module, child, f"{child.value!r}: a private NVFlare name as a string")
            if isinstance(child, ast.ImportFrom) and (child.module or "").split(".")[0] == "nvflare":
                for alias in child.names:
                    if _is_private(alias.name):
                        report(module, child, f"from {child.module} import {alias.name}")
            scan(module, child, cls)

    for module in modules:
        scan(module, module.tree, None)
    return found


def _fedseg_sources() -> dict[str, str]:
    sources = [p for folder in FOLDERS for p in (REPO / folder).rglob("*.py")]
    return {_module_name(p): p.read_text(encoding="utf-8") for p in sources if p != INTERNALS}


# ------------------------------------------------------------------------------ the tests


def test_no_module_but_nvflare_internals_uses_a_private_nvflare_name():
    assert boundary_violations(_fedseg_sources()) == []


_OFFENDING = '''
import argparse
from nvflare.apis.fl_component import FLComponent
from nvflare.app_common.workflows import base_fedavg
from nvflare.app_common.workflows.fedavg import FedAvg
from nvflare.app_opt.tracking.wandb.wandb_receiver import WandBReceiver

class Round(FedAvg):
    def _get_aggregated_result(self):      # a private method, not a hook in OVERRIDDEN_HOOKS
        return super()._get_aggregated_result()

    def run(self):
        self._aggr_helper = None
        self._own_counter = 0              # fedseg's own attribute on an NVFlare subclass: fine

class Mixin:
    def _maybe_cleanup_memory(self):       # mixed into Round2 below: overrides FedAvg's private helper
        pass

class Round2(Mixin, FedAvg):
    pass

class Receiver(WandBReceiver):
    def start(self):
        return self._process_queue_tasks

class Component(FLComponent):
    _always_serialize_args = ("a",)       # in EXPORT_CONVENTIONS: fine

class RecipeLike:
    _cse_added = True                     # NVFlare reads it by name from a recipe

class Model:
    def __init__(self, network):
        self._network = network
        self._lock = None                  # fedseg's own: no parameter of that name

def reach(obj, recipe):
    obj._process_queue_tasks()
    base_fedavg._get_client_name(obj)
    getattr(recipe, "_job")
    argparse._SubParsersAction            # not NVFlare's
'''


def test_the_guard_fails_on_a_private_nvflare_name_it_was_not_told_about():
    found = "\n".join(boundary_violations({"snippet": _OFFENDING}))
    for what in ("def _get_aggregated_result", "super()._get_aggregated_result", "self._aggr_helper",
                 "def _maybe_cleanup_memory", "self._process_queue_tasks", "_cse_added = ...",
                 "self._network", "obj._process_queue_tasks", "base_fedavg._get_client_name", "'_job'"):
        assert what in found, (what, found)
    for fine in ("_own_counter", "self._lock", "_SubParsersAction", "_always_serialize_args"):
        assert fine not in found, (fine, found)


def test_the_guard_accepts_what_nvflare_internals_declares():
    snippet = '''
from nvflare.apis.fl_component import FLComponent
from nvflare.app_common.workflows.base_model_controller import BaseModelController

class Round(BaseModelController):
    def _accept_train_result(self, client_name, result, fl_ctx, is_unknown_task):
        return super()._accept_train_result(client_name, result, fl_ctx, is_unknown_task)

class Component(FLComponent):
    _always_serialize_args = ("a",)
'''
    assert boundary_violations({"snippet": snippet}) == []


def test_nvflare_internals_lists_every_private_name_it_reaches():
    """``PRIVATE_NAMES`` is what ``nvflare_internals`` really reaches: every ``x._name`` of NVFlare's there
    is listed, and every listed name is NVFlare's and is used there."""
    tree = ast.parse(INTERNALS.read_text())
    own = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    used = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and _is_private(n.attr)}
    used |= {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names if _is_private(a.name)}
    reached = {n for n in used - own if n in nvflare_private_names()}
    assert reached == set(nvflare_internals.PRIVATE_NAMES)


@pytest.mark.parametrize(("class_path", "hook", "parameters"), [
    (c, h, p) for c, table in nvflare_internals.OVERRIDDEN_HOOKS.items() for h, p in table.items()
])
def test_the_hooks_fedseg_overrides_keep_their_signatures(class_path, hook, parameters):
    assert nvflare_internals.hook_signature(class_path, hook) == parameters


def test_nvflare_still_reads_the_export_conventions_fedseg_follows():
    """The job export writes a listed argument even at its default (``_always_serialize_args``) and reads
    an argument back from ``_<name>`` when ``<name>`` is taken: what fedseg's components rely on."""
    from fedseg.app.global_model import GlobalModel

    assert set(nvflare_internals.EXPORT_CONVENTIONS) == {"_always_serialize_args"}
    args = nvflare_internals.exported_arguments(GlobalModel(network="unet", in_channels=2, features=4))
    assert args["network"] == "unet" and args["in_channels"] == 2 and args["features"] == 4
    for path, names in nvflare_internals.PRIVATE_ARGUMENT_ATTRIBUTES.items():
        cls = _import_object(path)
        assert isinstance(cls, type), path
        assert set(names) <= set(inspect.signature(cls.__init__).parameters), path


def test_another_nvflare_version_is_refused_with_the_install_command():
    nvflare_internals.require_supported_version("2.9.0")
    with pytest.raises(nvflare_internals.UnsupportedNVFlareVersion, match=r"pip install 'nvflare==2\.9\.0'"):
        nvflare_internals.require_supported_version("2.10.0")
