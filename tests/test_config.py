"""One configuration source: profiles, overrides, and every command's defaults equal its profile."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest

from fedseg.cli import build_parser
from fedseg.config import FIELD_SECTION, PROFILES, StudyConfig, profile

#: the profile each command starts from (``--profile`` changes it)
COMMAND_PROFILES = {"train": "study", "simulate": "demo", "demo": "demo", "poc": "demo", "compare": "demo"}
REQUIRED = {"train": ["x.json", "--out", "o"], "simulate": ["--out", "o"], "compare": ["--out", "o"]}


def _subparser(command: str) -> argparse.ArgumentParser:
    parser = build_parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]  # noqa: SLF001 - argparse's own
    return action.choices[command]


@pytest.mark.parametrize("command", sorted(COMMAND_PROFILES))
def test_every_command_s_defaults_are_its_profile(command):
    from fedseg.cli._options import study_from_args

    args = _subparser(command).parse_args(REQUIRED.get(command, []))
    study = study_from_args(args)
    base = profile(COMMAND_PROFILES[command])
    assert study == base
    # and the help shows the profile's value as the default of each option
    help_text = _subparser(command).format_help()
    assert f"(default: {base.model.features})" in help_text and f"profile '{COMMAND_PROFILES[command]}'" in help_text


@pytest.mark.parametrize("command", ["simulate", "compare", "poc", "demo"])
def test_options_override_the_chosen_profile_field_by_field(command):
    from fedseg.cli._options import study_from_args

    argv = [*REQUIRED.get(command, []), "--profile", "tiny", "--features", "6", "--roi", "32", "--hd95", "--seed", "3"]
    study = study_from_args(_subparser(command).parse_args(argv))
    assert study == profile("tiny").override(features=6, roi=(32, 32, 32), hd95=True, seed=3)


def test_profiles_and_overrides():
    assert set(PROFILES) == {"study", "demo", "tiny"}
    assert PROFILES["study"] == StudyConfig()  # the field defaults are the study's
    assert profile("study").data.roi == (128, 128, 128) and profile("tiny").data.roi == (16, 16, 16)
    tiny = profile("tiny")
    assert tiny.override(rounds=3).federation.rounds == 3 and tiny.override(roi=24).data.roi == (24, 24, 24)
    assert tiny.override(rounds=3, local_epochs=2).epochs == 6
    with pytest.raises(ValueError, match="unknown setting 'epochs'"):
        tiny.override(epochs=3)
    with pytest.raises(ValueError, match="unknown profile 'huge'"):
        profile("huge")
    with pytest.raises(ValueError, match="unknown network 'vnet'"):
        tiny.override(network="vnet")
    assert StudyConfig.from_json(json.loads(json.dumps(tiny.to_json()))) == tiny
    # every setting name is unique across the sections, so a flat name finds its field
    assert len(FIELD_SECTION) == sum(len(dataclasses.fields(type(getattr(tiny, s)))) for s in set(FIELD_SECTION.values()))


def test_server_and_site_build_the_module_with_the_same_constructor(tiny):
    """The job's server model arguments are ``StudyConfig.module_args()``, which the site uses too."""
    from conftest import tiny_job

    job = tiny_job(features=6)
    assert job.server_model()["args"] == tiny.override(features=6).module_args()
    assert job.server_model()["class_path"] == "fedseg.app.global_model.GlobalModel"
    site = json.loads(job.script_args().split(" ", 1)[1])
    from fedseg.app.site_runner import SiteJob

    assert SiteJob.from_document(site).study.module_args() == job.server_model()["args"]
