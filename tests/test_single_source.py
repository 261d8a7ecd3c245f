"""The options beside the study settings have one typed source each: the add-ons (``AddonSettings``),
``fedseg train``'s own options (``TrainSettings``) and ``fedseg data split`` (``SplitSettings``).

Each option is generated from its field (name, help, choices; its default is the field's), no
command writes one of them by hand, and the code that shares a default (``Addons``,
``TrainConfig``, ``split_cases``) reads it from the dataclass instead of writing it again.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
from pathlib import Path

import pytest

from fedseg.cli import build_parser
from fedseg.cli._options import dataclass_from_args, option_name
from fedseg.config import SplitSettings, TrainSettings, profile
from fedseg.jobs.addons import Addons, AddonSettings, ContributionWeights, PrivacyFilter, SiteGroups

REPO = Path(__file__).resolve().parents[1]
#: (command words, the arguments it needs, the settings dataclass whose options it has)
COMMANDS = [
    (("simulate",), ["--out", "o"], AddonSettings),
    (("poc",), [], AddonSettings),
    (("demo",), [], AddonSettings),
    (("train",), ["x.json", "--out", "o"], TrainSettings),
    (("data", "split"), ["root", "--out", "o"], SplitSettings),
]
#: (source file, the parser variable to scan, None: every one; the dataclass none of whose options it may write)
SOURCES = [
    ("fedseg/cli/_options.py", None, AddonSettings),
    ("fedseg/cli/train.py", None, TrainSettings),
    ("fedseg/cli/data.py", "split", SplitSettings),  # the synth and check parsers have options of their own
]


def _subparser(*words: str) -> argparse.ArgumentParser:
    parser = build_parser()
    for word in words:
        (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]  # noqa: SLF001 - argparse's own
        parser = sub.choices[word]
    return parser


def _action(parser: argparse.ArgumentParser, flag: str) -> argparse.Action:
    (action,) = [a for a in parser._actions if flag in a.option_strings]  # noqa: SLF001 - argparse's own
    return action


@pytest.mark.parametrize(("words", "required", "settings"), COMMANDS, ids=lambda v: " ".join(v) if isinstance(v, tuple) else None)
def test_each_option_is_its_field_and_left_out_it_is_the_field_s_default(words, required, settings):
    parser = _subparser(*words)
    assert dataclass_from_args(parser.parse_args(required), settings) == settings()
    for f in dataclasses.fields(settings):
        action = _action(parser, option_name(f.name))
        assert action.dest == f.name
        assert action.help.startswith(f.metadata["help"])
        assert tuple(action.choices or ()) == tuple(f.metadata.get("choices", ()))
        shown = not (f.default is None or f.default == () or f.metadata.get("action") == "store_true")
        assert ("(default: " in action.help[len(f.metadata["help"]):]) == shown, f.name
        if shown:
            assert action.help.endswith(f"(default: {f.default})")


@pytest.mark.parametrize(("source", "receiver", "settings"), SOURCES, ids=[s for s, _, _ in SOURCES])
def test_no_command_writes_an_option_of_the_settings_by_hand(source, receiver, settings):
    flags = {option_name(f.name) for f in dataclasses.fields(settings)}
    written = set()
    for node in ast.walk(ast.parse((REPO / source).read_text())):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add_argument"
                and (receiver is None or (isinstance(node.func.value, ast.Name) and node.func.value.id == receiver))):
            written |= {a.value for a in node.args if isinstance(a, ast.Constant)} & flags
    assert not written, f"{source} writes {sorted(written)} by hand: generate them from {settings.__name__}"


def _literal_defaults(source: str, owner: str, names: set[str]) -> dict[str, object]:
    """The defaults of ``names`` that ``owner`` (a class's fields or a function's keywords) writes as literals."""
    tree = ast.parse((REPO / source).read_text())
    (node,) = [n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef)) and n.name == owner]
    if isinstance(node, ast.ClassDef):
        pairs = [(s.target.id, s.value) for s in node.body
                 if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name) and s.value is not None]
    else:
        pairs = [(a.arg, d) for a, d in zip(node.args.kwonlyargs, node.args.kw_defaults) if d is not None]
    return {name: ast.literal_eval(value) for name, value in pairs
            if name in names and isinstance(value, (ast.Constant, ast.Tuple))}


@pytest.mark.parametrize(("source", "owner", "settings", "names"), [
    ("jobs/addons.py", "Addons", AddonSettings, {"wandb", "quantize"}),  # resume_from: a path there, "" here
    ("lightning_modules/training.py", "TrainConfig", TrainSettings, None),
    ("lightning_modules/data/splits.py", "split_cases", SplitSettings, {"seed", "val_fraction", "alpha", "sizes"}),
])
def test_a_default_is_written_once(source, owner, settings, names):
    names = names or {f.name for f in dataclasses.fields(settings)}
    assert _literal_defaults(source, owner, names) == {}, f"{owner} writes {settings.__name__}'s defaults again"


def test_the_shared_defaults_are_the_settings():
    import inspect

    from fedseg.lightning_modules.data.splits import split_cases
    from fedseg.lightning_modules.training import TrainConfig

    chosen = AddonSettings()
    assert (Addons().wandb, Addons().quantize) == (chosen.wandb, chosen.quantize)
    assert Addons.from_settings(chosen) == Addons()
    config = TrainConfig(datalists=[], out=Path("o"), study=profile("tiny"))
    assert {f.name: getattr(config, f.name) for f in dataclasses.fields(TrainSettings)} == {
        **dataclasses.asdict(TrainSettings()), "epochs": profile("tiny").epochs}
    params = inspect.signature(split_cases).parameters
    assert {n: params[n].default for n in ("seed", "val_fraction", "alpha", "sizes")} == {
        n: getattr(SplitSettings(), n) for n in ("seed", "val_fraction", "alpha", "sizes")}


def test_the_add_on_options_make_the_job_s_add_ons(tmp_path):
    from fedseg.cli._options import job_from_args

    def addons(*argv: str) -> Addons:
        args = _subparser("simulate").parse_args(["--out", "o", *argv])
        return job_from_args(args, profile("tiny"), min_clients=2).addons

    assert addons() == Addons()
    assert addons("--privacy", "svt", "--privacy-arg", "epsilon=1", "--privacy-arg", "gamma=0.5", "--quantize", "fp16",
                  "--wandb", "offline", "--aggregation", "contribution", "--max-site-share", "0.6",
                  "--resume-from", str(tmp_path)) == Addons(
        privacy=PrivacyFilter("svt", {"epsilon": 1.0, "gamma": 0.5}), contribution=ContributionWeights(max_site_share=0.6),
        wandb="offline", quantize="fp16", resume_from=str(tmp_path.resolve()))
    assert addons("--grouped", "--share-encoder").groups == SiteGroups(share_encoder=True)
    assert "--no-grouped" not in _subparser("simulate").format_help()  # a flag, as before
    with pytest.raises(ValueError, match="--share-encoder needs --grouped"):
        addons("--share-encoder")
    with pytest.raises(ValueError, match="--privacy-arg given without a privacy filter"):
        addons("--privacy-arg", "gamma=1")


def test_train_and_split_options_parse_to_their_settings():
    train = _subparser("train").parse_args(["x.json", "--out", "o", "--epochs", "3", "--init-from", "c.ckpt",
                                            "--wandb", "offline", "--cache-dir", "cache"])
    assert dataclass_from_args(train, TrainSettings) == TrainSettings(epochs=3, init_from=Path("c.ckpt"), wandb="offline",
                                                                      cache_dir=Path("cache"))
    split = _subparser("data", "split").parse_args(["root", "--out", "o", "--sites", "3", "--mode", "unequal",
                                                    "--sizes", "1", "2.5", "--institutions", "i.csv"])
    assert dataclass_from_args(split, SplitSettings) == SplitSettings(sites=3, mode="unequal", sizes=(1.0, 2.5),
                                                                      institutions=Path("i.csv"))
