"""The `fedseg data` and `fedseg demo` commands as a user runs them."""

from __future__ import annotations

import json

from fedseg.cli import main
from fedseg.lightning_modules.data.datalist import read_datalist


def test_synth_check_split_round_trip(tmp_path, capsys):
    out = tmp_path / "synth"
    assert main(["data", "synth", "--out", str(out), "--sites", "2", "--cases", "3", "--size", "24"]) == 0
    assert "site-2" in capsys.readouterr().out
    assert main(["data", "check", str(out / "data")]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("OK: 6 cases")

    split = tmp_path / "split"
    assert main(["data", "split", str(out / "data"), "--sites", "3", "--mode", "iid", "--out", str(split)]) == 0
    ids = set()
    for k in (1, 2, 3):
        dl = read_datalist(split / f"site-{k}.json")
        assert dl.training and dl.validation
        ids |= {c.case_id for c in dl.cases}
        assert all(p.exists() for c in dl.cases for p in c.paths(dl.data_root))
    assert len(ids) == 6
    assert main(["data", "check", str(split / "site-1.json")]) == 0


def test_check_fails_with_the_broken_file_named(tmp_path, capsys):
    out = tmp_path / "synth"
    main(["data", "synth", "--out", str(out), "--sites", "1", "--cases", "2", "--size", "24"])
    flair = sorted((out / "data").glob("*/*_flair.nii.gz"))[0]
    flair.write_bytes(flair.read_bytes()[: flair.stat().st_size // 2])  # truncated gzip
    capsys.readouterr()
    assert main(["data", "check", str(out / "data")]) == 1
    report = capsys.readouterr().out
    assert f"{flair.parent.name}/{flair.name}: truncated" in report
    assert report.strip().splitlines()[-1].startswith("FAILED")


def test_split_refuses_output_inside_source(tmp_path, capsys):
    out = tmp_path / "synth"
    main(["data", "synth", "--out", str(out), "--sites", "1", "--cases", "4", "--size", "24"])
    before = sorted(p.name for p in (out / "data").iterdir())
    assert main(["data", "split", str(out / "data"), "--sites", "2", "--out", str(out / "data" / "splits")]) == 2
    assert "error" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "data").iterdir()) == before


def test_demo_generates_and_checks(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--sites", "2", "--cases", "2", "--size", "24", "--data-only"]) == 0
    text = capsys.readouterr().out
    assert "OK: 4 cases" in text
    cfg = json.loads((tmp_path / "demo" / "synth" / "synth.json").read_text())
    assert cfg["complete"] is True and cfg["config"]["n_sites"] == 2
