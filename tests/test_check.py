"""The dataset checker: real cases pass, and every deliberately broken file is reported once."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from broken_corpus import (
    BREAKS,
    image_volume,
    msd_image,
    snapshot,
    write_brats2021_case,
    write_brats2023_case,
    write_broken_corpus,
    write_msd,
    write_nifti,
)

from fedseg.lightning_modules.data.check import (
    KINDS,
    CheckReport,
    DatasetCheckError,
    assert_dataset_ok,
    check_cases,
    check_dataset,
)
from fedseg.lightning_modules.data.datalist import Datalist, read_datalist, write_datalist
from fedseg.lightning_modules.data.layouts import LayoutError, discover


def _found(report: CheckReport) -> list[tuple[str | None, Path, str]]:
    return sorted((p.case_id, p.path, p.kind) for p in report.problems)


# --------------------------------------------------------------------------------------------
# real cases, both BraTS conventions


@pytest.fixture(scope="module")
def real_report(real_data: Path) -> tuple[CheckReport, dict[str, tuple[int, int]]]:
    before = snapshot(real_data)
    report = check_dataset(real_data)
    assert snapshot(real_data) == before  # read only: no new file, no changed mtime
    return report, before


def test_real_cases_are_clean(real_report, real_data: Path) -> None:
    report, _ = real_report
    assert report.ok, report.format()
    assert (report.n_cases, report.n_files, report.n_unlabelled) == (4, 18, 2)
    text = report.format()
    assert text.splitlines()[-1] == (
        f"OK: 4 cases (18 files) in {real_data} [layout mixed]: no problems; 2 without label (inference only)"
    )
    assert "note: metric_fixtures_brats_eval/: skipped" in text


def test_real_brats2021_label_read_as_brats2023_is_caught(real_data: Path) -> None:
    report = check_dataset(real_data / "BraTS2021_00006", convention="brats2023")
    label = real_data / "BraTS2021_00006" / "BraTS2021_00006_seg.nii.gz"
    assert _found(report) == [("BraTS2021_00006", label, "label_values")]
    message = report.problems[0].message
    assert "values [4] are not in the brats2023 convention" in message
    assert "they fit brats2021" in message


# --------------------------------------------------------------------------------------------
# the broken corpus: one case per way of breaking one file


@pytest.fixture(scope="module")
def broken(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[tuple[str, Path, str]]]:
    root = tmp_path_factory.mktemp("broken")
    return root, write_broken_corpus(root)


def test_every_break_is_reported_once_with_its_file_and_kind(broken) -> None:
    root, expected = broken
    before = snapshot(root)
    report = check_dataset(root)
    assert snapshot(root) == before  # nothing written next to the data, nothing touched

    assert not report.ok
    assert _found(report) == sorted(expected)  # exactly these: no double reports, none on case-clean
    assert report.n_cases == len(BREAKS) + 1
    assert {kind for _, _, kind in expected} >= set(KINDS) - {
        "no_cases", "datalist", "missing_file", "duplicate_case", "channel_count",
        "unsafe_case_id", "outside_root",  # datalist entries: tests/test_confinement.py
    }  # fmt: skip


def test_report_text_has_a_line_per_problem_and_a_summary(broken) -> None:
    root, expected = broken
    report = check_dataset(root)
    lines = report.format().splitlines()
    assert len(lines) == len(expected) + 1  # this corpus has no discovery notes
    for start in (
        "case-cut/case-cut-t1c.nii.gz: truncated: header reads but voxel data does not (EOFError",
        "case-nofile/case-nofile-t2w.nii.gz: missing_modality: no t2 image",
        "case-flip/case-flip-t1n.nii.gz: orientation_mismatch: orientation RPS differs from the case's LPS",
    ):
        assert sum(line.startswith(start) for line in lines) == 1, start
    assert lines[-1].startswith(f"FAILED: {len(BREAKS) + 1} cases (")
    assert f": {len(expected)} problems in {len(expected)} cases (" in lines[-1]
    assert "bad_spacing 2" in lines[-1]

    with pytest.raises(DatasetCheckError) as err:
        assert_dataset_ok(root)
    assert err.value.report.problems == report.problems
    assert str(err.value) == report.format()


@pytest.mark.parametrize("name", ["cut", "zerospacing", "labelhalf"])
def test_single_breaks_give_precise_messages(tmp_path: Path, name: str) -> None:
    files = write_brats2023_case(tmp_path, "case-x")
    _, kind, breaker = BREAKS[name]
    broken_file = breaker(files)
    report = check_dataset(tmp_path)
    assert _found(report) == [("case-x", broken_file, kind)]
    message = report.problems[0].message
    assert {
        "cut": "Compressed file ended",
        "zerospacing": "pixdim) is (0, 1, 1)",
        "labelhalf": "fractional label values (0.5",
    }[name] in message


def test_the_odd_file_out_is_reported_not_the_reference(tmp_path: Path) -> None:
    """The first image has the wrong shape: it is the one named, not the four files that agree."""
    files = write_brats2021_case(tmp_path, "BraTS2021_00001")
    write_nifti(files["t1"], image_volume(0, (16, 16, 15)))
    report = check_dataset(tmp_path)
    assert _found(report) == [("BraTS2021_00001", files["t1"], "shape_mismatch")]
    assert report.problems[0].message == "shape (16, 16, 15) differs from the case's (16, 16, 16)"


def test_affine_within_tolerance_is_the_same_grid(tmp_path: Path) -> None:
    files = write_brats2023_case(tmp_path, "case-x")
    affine = np.array([[-1.0, 0, 0, 15.0004], [0, -1.0, 0, 15.0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])
    write_nifti(files["t2"], image_volume(5), affine)
    assert check_dataset(tmp_path).ok
    affine[0, 3] = 15.01
    write_nifti(files["t2"], image_volume(5), affine)
    assert _found(check_dataset(tmp_path)) == [("case-x", files["t2"], "affine_mismatch")]


def test_clean_synthetic_datasets_have_no_problem(tmp_path: Path) -> None:
    write_brats2021_case(tmp_path / "a", "BraTS2021_00001", suffix=".nii")
    write_brats2023_case(tmp_path / "a", "BraTS-GLI-00001-000")
    write_brats2023_case(tmp_path / "a", "BraTS-GLI-00002-000", label=False)
    report = check_dataset(tmp_path / "a")
    assert report.ok, report.format()
    assert (report.n_cases, report.n_files, report.n_unlabelled) == (3, 14, 1)
    assert report.format() == (
        f"OK: 3 cases (14 files) in {tmp_path / 'a'} [layout mixed]: no problems; "
        "1 without label (inference only)"
    )
    assert assert_dataset_ok(tmp_path / "a").ok


# --------------------------------------------------------------------------------------------
# MSD: 4-D images


def test_msd_dimension_channel_and_empty_channel_problems(tmp_path: Path) -> None:
    empty_channel = msd_image(4)
    empty_channel[..., 2] = 0.0
    write_msd(
        tmp_path,
        {
            "BRATS_001": msd_image(1),
            "BRATS_002": image_volume(2),  # 3-D where MSD expects 4-D
            "BRATS_003": msd_image(3, channels=3),
            "BRATS_004": empty_channel,
        },
        test_cases=("BRATS_500",),
    )
    report = check_dataset(tmp_path)
    images = tmp_path / "imagesTr"
    assert _found(report) == [
        ("BRATS_002", images / "BRATS_002.nii.gz", "wrong_ndim"),
        ("BRATS_003", images / "BRATS_003.nii.gz", "channel_count"),
        ("BRATS_004", images / "BRATS_004.nii.gz", "empty_image"),
    ]
    messages = {p.case_id: p.message for p in report.problems}
    assert messages["BRATS_002"] == "shape (16, 16, 16) is 3-D; expected a 4-D image (4 channels)"
    assert messages["BRATS_003"] == "3 channels; expected 4 (flair, t1, t1ce, t2)"
    assert messages["BRATS_004"] == "channel 2 (t1ce) is 0: an empty image"
    assert report.n_unlabelled == 1


def test_msd_missing_channel_points_at_dataset_json(tmp_path: Path) -> None:
    write_msd(tmp_path, {"BRATS_001": msd_image(1, channels=3)})
    (tmp_path / "dataset.json").write_text(json.dumps({"modality": {"0": "FLAIR", "1": "T1w", "2": "T2w"}}))
    report = check_dataset(tmp_path)
    assert _found(report) == [("BRATS_001", tmp_path / "dataset.json", "missing_modality")]


# --------------------------------------------------------------------------------------------
# datalists and empty folders


def test_datalist_cases_are_checked_and_case_problems_point_at_the_datalist(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_brats2023_case(data, "case-a")
    write_brats2023_case(data, "case-b")
    cases = discover(data).cases
    gone = data / cases[1].images[0]
    gone.unlink()
    listing = write_datalist(tmp_path / "site-1.json", Datalist([cases[0], cases[1]], [cases[0]], data))

    for report in (check_dataset(listing), check_dataset(data, datalist=listing)):
        assert _found(report) == [
            ("case-a", listing, "duplicate_case"),
            ("case-b", gone, "missing_file"),
        ]
    # check_cases on a Datalist already in memory, as training will call it
    loaded = read_datalist(listing)
    assert [p.kind for p in check_cases(loaded.training, loaded.data_root).problems] == ["missing_file"]


def test_unreadable_datalist_and_no_cases(tmp_path: Path) -> None:
    bad = tmp_path / "site-1.json"
    bad.write_text("{oops")
    report = check_dataset(bad)
    assert [(p.path, p.kind) for p in report.problems] == [(bad, "datalist")]

    empty = tmp_path / "empty"
    empty.mkdir()
    report = check_dataset(empty)
    assert [(p.path, p.kind) for p in report.problems] == [(empty, "no_cases")]
    first, *_, last = report.format().splitlines()
    assert first == f"{empty}: no_cases: no case found."
    assert last == f"FAILED: 0 cases (0 files) in {empty} [layout auto]: 1 problem (no_cases 1)"

    listing = write_datalist(tmp_path / "none.json", Datalist([], [], tmp_path))
    assert [(p.path, p.kind) for p in check_dataset(listing).problems] == [(listing, "no_cases")]

    with pytest.raises(LayoutError, match="unknown layout 'brats'"):
        check_dataset(empty, "brats")
