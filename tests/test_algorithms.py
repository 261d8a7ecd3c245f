"""An algorithm is declared once: its ``Algorithm`` subclass in ``jobs/<name>.py``, named in the table
``fedseg.jobs.base.ALGORITHM_MODULES``. Everything that lists algorithms is derived from it (the
CLI's choices and help, ``fedseg compare``'s methods, the checked-in jobs, a site's plug-in and its
default policy), and no other module dispatches on an algorithm's name. So a new algorithm is one
module, its line in the table, its tests and its docs (docs/design.md, "How to add an algorithm")."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from fedseg.jobs.base import ALGORITHM_MODULES, algorithm, algorithms, personal_algorithms

REPO = Path(__file__).resolve().parents[1]
FOLDERS = {"app": "fedseg.app", "jobs": "fedseg.jobs", "lightning_modules": "fedseg.lightning_modules",
           "provisioning": "fedseg.provisioning", "fedseg": "fedseg"}


def help_text(capsys, *command: str) -> str:
    """What ``fedseg <command> --help`` prints, on one line (argparse wraps at spaces and hyphens, at
    the terminal's width: the ``wide_help`` fixture makes that wide)."""
    from fedseg.cli import main

    with pytest.raises(SystemExit):
        main([*command, "--help"])
    return " ".join(capsys.readouterr().out.split())


@pytest.fixture(autouse=True)
def wide_help(monkeypatch):
    """argparse wraps help at ``COLUMNS``: no line breaks inside a method's name (fedper-output)."""
    monkeypatch.setenv("COLUMNS", "100000")


def test_the_table_names_each_algorithm_once_with_what_the_help_needs():
    table = algorithms()
    assert len(table) == len(ALGORITHM_MODULES) == len(set(table))
    for name, algo in table.items():
        assert algo.name == name and algorithm(name) is algo
        assert algo.description and "\n" not in algo.description, f"{name}: a one-line description"
        assert not algo.personal or algo.site_plugin, f"{name} is personal: its site keeps its model with a plug-in"
    assert personal_algorithms() == ("fedper", "fedrep", "ditto", "apfl", "select", "finetune")


def test_the_job_options_list_every_algorithm_with_its_description(capsys):
    for command in ("simulate", "poc"):
        text = help_text(capsys, command)
        choices = re.search(r"--job \{([^}]*)\}", text).group(1).split(",")
        assert choices == list(algorithms()), command
        for name, algo in algorithms().items():
            assert f"{name}: {algo.description}" in text, (command, name)
            for field in (algo.options.__dataclass_fields__ if algo.options else {}):
                assert "--" + field.replace("_", "-") in text, (command, name, field)


def test_compare_runs_every_simulated_algorithm_and_its_variants(capsys):
    from fedseg.experiments.methods import ADDON_METHOD_JOBS, FL_METHOD_JOBS, PERSONALIZED

    expected = []
    for name, algo in algorithms().items():
        if algo.simulator:
            expected += [name, *algo.compare_variants]
    assert list(FL_METHOD_JOBS) == [*expected, *ADDON_METHOD_JOBS]
    assert "fedavg-he" not in FL_METHOD_JOBS  # NVFlare's HE recipe refuses the simulator
    assert set(PERSONALIZED) == {m for m, spec in FL_METHOD_JOBS.items() if algorithm(spec["algorithm"]).personal}
    assert {"fedper-output", "fedper-last", "ditto"} <= set(PERSONALIZED) and "fedavg" not in PERSONALIZED
    text = help_text(capsys, "compare")
    for method in (*expected, *ADDON_METHOD_JOBS):
        assert method in text, method
    for name, algo in algorithms().items():
        assert (f"{name}: {algo.description}" in text) == algo.simulator, name


def test_the_checked_in_jobs_are_each_algorithms_own(capsys):
    from fedseg.jobs.catalog import JOBS_DIR, STUDY_JOBS

    expected = {name for name, algo in algorithms().items() if algo.study_job() is not None}
    assert set(STUDY_JOBS) == expected == set(algorithms()) - {"fedavg-he"}
    exported = {p.parent.name for p in JOBS_DIR.glob("*/meta.json")} - {"stats"}
    assert exported == expected
    text = help_text(capsys, "jobs", "resume")
    assert "the study job: " + ", ".join(STUDY_JOBS) in text


def test_a_sites_default_policy_and_the_store_option_name_the_algorithms(capsys):
    from fedseg.provisioning.site_control import default_site_policy

    assert tuple(default_site_policy().algorithms) == (*algorithms(), "stats")
    text = help_text(capsys, "provision", "site-config")
    assert "(" + ", ".join(personal_algorithms()) + ")" in text


def test_a_site_makes_its_algorithms_plug_in_from_the_declaration_and_the_job_options():
    from fedseg.app.site_plugin import SitePlugin

    for name, algo in algorithms().items():
        plugin = algo.make_site_plugin({})
        assert (plugin is not None) == bool(algo.site_plugin), name
        if plugin is not None:
            assert isinstance(plugin, SitePlugin), name
    fedper = algorithm("fedper").make_site_plugin({"personal_head": "output", "keep_norm_local": True})
    assert (fedper.personal_head, fedper.keep_norm_local) == ("output", True)
    fedrep = algorithm("fedrep").make_site_plugin({"head_epochs": 2})
    assert (fedrep.personal_head, fedrep.head_epochs) == ("decoder", 2)  # the default head, from its options
    ditto = algorithm("ditto").make_site_plugin({"ditto_lambda": 0.5})
    assert (ditto.ditto_lambda, ditto.personal_epochs) == (0.5, 0)
    with pytest.raises(ValueError, match="unknown fedper options"):
        algorithm("fedper").make_site_plugin({"personal_hed": "output"})
    with pytest.raises(ValueError, match="unknown personal_head"):
        algorithm("fedper").make_site_plugin({"personal_head": "encoder"})
    with pytest.raises(ValueError, match="fedavg takes no options"):
        algorithm("fedavg").parse_options({"fedprox_mu": 0.1})


# ------------------------------------------------------------------------------ no dispatch on names


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join((FOLDERS[parts[0]], *parts[1:])) if parts[0] != "fedseg" else ".".join(parts)


def name_dispatch(source: str, names: set[str]) -> list[str]:
    """Where ``source`` decides on an algorithm's name: ``x == "fedper"``, ``x != "ditto"``,
    ``x in ("fedper", "fedrep")``, ``case "fedper":``."""

    def named(node: ast.AST) -> bool:
        if isinstance(node, ast.Constant):
            return node.value in names
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return any(isinstance(e, ast.Constant) and e.value in names for e in node.elts)
        return False

    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            for op, left, right in zip(node.ops, sides, sides[1:]):
                if (isinstance(op, (ast.Eq, ast.NotEq)) and (named(left) or named(right))) or \
                        (isinstance(op, (ast.In, ast.NotIn)) and named(right) and not isinstance(right, ast.Constant)):
                    found.append(f"line {node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.match_case) and named(node.pattern.value if isinstance(node.pattern, ast.MatchValue)
                                                        else ast.Constant(None)):
            found.append(f"line {node.pattern.lineno}: case {ast.unparse(node.pattern)}")
    return found


def test_no_module_but_an_algorithms_own_decides_on_its_name():
    names = set(algorithms())
    own = {REPO / "jobs" / f"{module}.py" for module in ALGORITHM_MODULES}
    found = {}
    for folder in FOLDERS:
        for path in sorted((REPO / folder).rglob("*.py")):
            if path not in own and (hits := name_dispatch(path.read_text(), names)):
                found[_module_name(path)] = hits
    assert not found, f"dispatch on algorithm names outside their modules (declare it on the Algorithm): {found}"


def test_the_dispatch_scan_finds_an_if_chain_on_names():
    source = '''
def plugin_for(job):
    if job.algorithm == "fedper":
        return 1
    if "ditto" != job.algorithm or job.algorithm in ("finetune", "fedrep"):
        return 2
    match job.algorithm:
        case "fedopt":
            return 3
    if "fedavg" in methods:  # a method in a table: not a dispatch
        return 4
'''
    hits = name_dispatch(source, set(algorithms()))
    assert len(hits) == 4 and all(any(f"line {n}:" in h for h in hits) for n in (3, 5, 8))


# ------------------------------------------------------------------------------ defaults written once


def written_defaults(source: str, value: object) -> list[str]:
    """Where ``source`` writes ``value`` as a default: a parameter's default, ``x.get(key, value)``,
    a ``setting(value, ...)`` field."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            for default in [*args.defaults, *(d for d in args.kw_defaults if d is not None)]:
                if isinstance(default, ast.Constant) and default.value == value:
                    found.append(f"line {default.lineno}: {node.name}(... = {default.value!r})")
        elif isinstance(node, ast.Call) and node.args:
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            position = {"get": 1, "setdefault": 1, "setting": 0}.get(name)
            if position is not None and len(node.args) > position and isinstance(node.args[position], ast.Constant) \
                    and node.args[position].value == value:
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def test_the_personal_heads_default_is_written_once_in_the_configuration():
    from fedseg.config import DEFAULT_HEAD_DEPTH
    from fedseg.jobs.fedper import FedPerOptions

    assert FedPerOptions().personal_head == DEFAULT_HEAD_DEPTH
    found = {}
    for folder in FOLDERS:
        for path in sorted((REPO / folder).rglob("*.py")):
            if path != REPO / "fedseg" / "config.py" and (hits := written_defaults(path.read_text(), DEFAULT_HEAD_DEPTH)):
                found[_module_name(path)] = hits
    assert not found, f"the personal head's default written again (use fedseg.config.DEFAULT_HEAD_DEPTH): {found}"
    # the scan sees each way of writing it again
    again = ('def plugin(personal_head: str = "decoder"): pass\n'
             'def make(*, head_depth="decoder"): pass\n'
             'head = options.get("personal_head", "decoder")\n'
             'personal_head: str = setting("decoder", "the head")\n')
    assert len(written_defaults(again, DEFAULT_HEAD_DEPTH)) == 4
