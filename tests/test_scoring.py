"""Scoring label files: pairing by case id, conventions, spacing, errors, and `fedseg score`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fedseg.cli import main
from fedseg.cli.score import CONVENTION_CHOICES
from fedseg.lightning_modules.labels import (
    CONVENTIONS,
    from_internal,
    regions_from_internal,
    to_internal,
)
from fedseg.lightning_modules.metrics import region_scores
from fedseg.lightning_modules.scoring import (
    ScoringError,
    case_key,
    read_label_regions,
    score_files,
)

SHAPE = (16, 16, 16)
#: full-volume Dice of ET, TC, WT in the official package's own output for its sample masks
#: (BraTS/BraTS_evaluation, example/sample_mets_metrics.json, ``global_bin_dsc``)
OFFICIAL_DICE = {
    "BraTS-MET-00132-000": (0.6840802390098165, 0.6887811516543336, 0.7564775269473256),
    "BraTS-MET-00217-000": (0.7913234934355378, 0.896434730979106, 0.8260158633312996),
    "BraTS-MET-00630-001": (0.9147945524385985, 0.9266599484940097, 0.9275450621985275),
    "BraTS-MET-01325-000": (0.9721611721611721, 0.9751643535427319, 0.9854805103820593),
}


def _save(path: Path, data: np.ndarray, zooms=(1.0, 1.0, 1.0)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.diag([*zooms, 1.0])), path)
    return path


def _internal_pair() -> tuple[np.ndarray, np.ndarray]:
    """Reference and prediction in the internal scheme; ET Dice 0.75 by construction."""
    ref = np.zeros(SHAPE, np.uint8)
    ref[2:14, 2:14, 2:14] = 2  # oedema
    ref[4:10, 4:10, 4:10] = 1  # core
    ref[4:8, 4:8, 4:8] = 3  # ET: 64 voxels
    pred = np.zeros(SHAPE, np.uint8)
    pred[3:13, 2:14, 2:14] = 2
    pred[4:10, 4:10, 5:11] = 1
    pred[4:8, 4:8, 5:9] = 3  # ET: 64 voxels, 48 shared with the reference
    return ref, pred


def test_case_key_pairs_the_official_file_names():
    pairs = [
        ("00132-000.nii.gz", "BraTS-MET-00132-000-seg.nii.gz"),
        ("BraTS-MET_01325-000.nii.gz", "BraTS-MET-01325-000-seg.nii.gz"),
        ("SEG-00217-000.nii.gz", "BraTS-MET-00217-000-seg.nii.gz"),
        ("BraTS-MET-00630-001.nii.gz", "BraTS-MET-00630-001-seg.nii.gz"),
        ("BraTS2021_00006.nii.gz", "BraTS2021_00006_seg.nii.gz"),
        ("BraTS-GLI-00001-000-PRED_BraTS23_1_NOT_GT.nii.gz", "BraTS-GLI-00001-000-seg.nii"),
    ]
    for pred, ref in pairs:
        assert case_key(Path(pred)) == case_key(Path(ref)), (pred, ref)
    other_timepoint = Path("BraTS-MET-00630-000-seg.nii.gz")
    assert case_key(Path("BraTS-MET-00630-001.nii.gz")) != case_key(other_timepoint)
    assert case_key(Path("brain_seg.nii.gz")) == case_key(Path("brain.nii.gz")) == ("brain",)


@pytest.mark.parametrize("convention", sorted(CONVENTIONS))
def test_fast_region_reading_equals_the_label_module(tmp_path, convention):
    ref, _ = _internal_pair()
    data = from_internal(ref, convention).astype(np.float32)  # float files are common (BraTS 2023)
    path = _save(tmp_path / "x.nii.gz", data)
    read = read_label_regions(path, convention)
    assert read.convention == convention
    expected = regions_from_internal(to_internal(data, convention))
    np.testing.assert_array_equal(read.regions, expected)


def test_scores_folders_with_mixed_conventions_and_reference_spacing(tmp_path):
    ref, pred = _internal_pair()
    ref_file = tmp_path / "ref" / "BraTS-X-00007-000-seg.nii.gz"
    _save(ref_file, from_internal(ref, "msd"), (1.0, 2.0, 3.0))
    _save(tmp_path / "pred" / "00007-000.nii.gz", from_internal(pred, "brats2021"))  # 1 mm header
    with pytest.warns(UserWarning, match="spacing differs"):
        table = score_files(tmp_path / "pred", tmp_path / "ref", ref_convention="msd")
    (case,) = table.cases
    assert case.case_id == "BraTS-X-00007-000"
    assert (case.pred_convention, case.ref_convention) == ("brats2021", "msd")  # 4 -> guessed 2021
    assert case.spacing == (1.0, 2.0, 3.0)
    assert case.scores["dice_et"] == pytest.approx(2 * 48 / 128)
    pred_regions, ref_regions = regions_from_internal(pred)[None], regions_from_internal(ref)[None]
    expected = region_scores(pred_regions, ref_regions, (1.0, 2.0, 3.0))
    at_1mm = region_scores(pred_regions, ref_regions, (1.0, 1.0, 1.0))
    names = ("dice", "iou", "precision", "recall", "vs", "hd95")
    for m, name in enumerate(names):
        for c, region in enumerate(("et", "tc", "wt")):
            assert case.scores[f"{name}_{region}"] == pytest.approx(float(expected[0, m, c]))
    assert case.scores["hd95_et"] != pytest.approx(float(at_1mm[0, 5, 0]))  # spacing really used


def test_write_json_and_csv_with_mean_row(tmp_path):
    ref, pred = _internal_pair()
    for i, shift in enumerate((0, 1)):
        _save(tmp_path / "ref" / f"case-{i:03d}_seg.nii.gz", from_internal(ref, "brats2023"))
        moved = np.roll(pred, shift, 0)
        _save(tmp_path / "pred" / f"case-{i:03d}.nii.gz", from_internal(moved, "brats2023"))
    table = score_files(tmp_path / "pred", tmp_path / "ref")
    json_path, csv_path = table.write(tmp_path / "out")
    doc = json.loads(json_path.read_text())
    assert [c["case_id"] for c in doc["cases"]] == ["case-000", "case-001"]
    per_case = [c["scores"]["dice_wt"] for c in doc["cases"]]
    assert doc["mean"]["dice_wt"] == pytest.approx(np.mean(per_case))
    with csv_path.open() as f:
        rows = list(csv.DictReader(f))
    assert [r["case_id"] for r in rows] == ["case-000", "case-001", "mean"]
    assert float(rows[2]["hd95"]) == pytest.approx(doc["mean"]["hd95"], rel=1e-8)
    assert float(rows[0]["dice_et"]) == pytest.approx(0.75)


def test_clear_errors(tmp_path):
    ref, pred = _internal_pair()
    _save(tmp_path / "ref" / "a-001-seg.nii.gz", from_internal(ref, "brats2023"))
    _save(tmp_path / "ref" / "a-002-seg.nii.gz", from_internal(ref, "brats2023"))
    _save(tmp_path / "pred" / "a-001.nii.gz", from_internal(pred, "brats2023"))
    _save(tmp_path / "pred" / "a-003.nii.gz", from_internal(pred, "brats2023"))
    with pytest.raises(ScoringError, match=r"a-002-seg\.nii\.gz.*a-003\.nii\.gz"):
        score_files(tmp_path / "pred", tmp_path / "ref")
    with pytest.warns(UserWarning, match="without a prediction"):
        table = score_files(tmp_path / "pred", tmp_path / "ref", allow_unpaired=True)
    assert [c.case_id for c in table.cases] == ["a-001"]
    assert [p.name for p in table.unpaired_ref] == ["a-002-seg.nii.gz"]

    small = _save(tmp_path / "small.nii.gz", pred[:8])
    with pytest.raises(ScoringError, match=r"shape mismatch.*small\.nii\.gz.*a-001-seg\.nii\.gz"):
        score_files(small, tmp_path / "ref" / "a-001-seg.nii.gz")
    with pytest.raises(ScoringError, match=r"a-001\.nii\.gz.*\[3\].*brats2021"):
        score_files(
            tmp_path / "pred" / "a-001.nii.gz",
            tmp_path / "ref" / "a-001-seg.nii.gz",
            pred_convention="brats2021",
        )
    probabilities = _save(tmp_path / "prob.nii.gz", np.full(SHAPE, 0.5, np.float32))
    with pytest.raises(ScoringError, match="prob.nii.gz.*non-integer"):
        score_files(probabilities, tmp_path / "ref" / "a-001-seg.nii.gz")
    with pytest.raises(ScoringError, match="does not exist"):
        score_files(tmp_path / "nope", tmp_path / "ref")
    with pytest.raises(ScoringError, match="two label files or two folders"):
        score_files(small, tmp_path / "ref")


def test_cli_convention_choices_follow_the_label_module():
    assert set(CONVENTION_CHOICES) == {"auto", *CONVENTIONS}


def test_cli_refuses_output_inside_an_input_folder(tmp_path, capsys):
    ref, pred = _internal_pair()
    _save(tmp_path / "ref" / "a-001-seg.nii.gz", from_internal(ref, "brats2023"))
    _save(tmp_path / "pred" / "a-001.nii.gz", from_internal(pred, "brats2023"))
    out = tmp_path / "ref" / "scores"
    code = main(["score", str(tmp_path / "pred"), str(tmp_path / "ref"), "--out", str(out)])
    assert code == 2
    assert "inside the input folder" in capsys.readouterr().err
    assert not out.exists()


def test_cli_scores_the_official_sample_masks(real_data, tmp_path, capsys):
    folder = real_data / "metric_fixtures_brats_eval"
    out = tmp_path / "out"
    code = main(["score", str(folder / "pred"), str(folder / "ref"), "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "BraTS-MET-01325-000" in printed and "mean" in printed
    doc = json.loads((out / "scores.json").read_text())
    assert [c["case_id"] for c in doc["cases"]] == sorted(OFFICIAL_DICE)
    for case in doc["cases"]:
        dice = [case["scores"][f"dice_{r}"] for r in ("et", "tc", "wt")]
        assert dice == pytest.approx(OFFICIAL_DICE[case["case_id"]], abs=1e-9)
        assert case["ref_convention"] == case["pred_convention"] == "brats2023"
    assert doc["cases"][2]["spacing_mm"] == pytest.approx([0.8594, 0.8594, 1.5], abs=1e-4)
    with (out / "scores.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5 and rows[-1]["case_id"] == "mean"
    mean_dice = np.mean([c["scores"]["dice"] for c in doc["cases"]])
    assert float(rows[-1]["dice"]) == pytest.approx(mean_dice)
