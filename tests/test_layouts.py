"""Layout discovery: the real mixed BraTS folder, and each layout written small in tmp_path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from broken_corpus import (
    image_volume,
    label_volume,
    msd_image,
    write_brats2021_case,
    write_brats2023_case,
    write_msd,
    write_nifti,
)

from fedseg.lightning_modules.data.datalist import MODALITIES
from fedseg.lightning_modules.data.layouts import LayoutError, discover, discover_case
from fedseg.lightning_modules.labels import LabelError

# --------------------------------------------------------------------------------------------
# the real cases: BraTS 2021 and 2023 folders side by side, plus a folder that is no case


def test_real_folder_mixes_brats2021_and_brats2023(real_data: Path) -> None:
    dataset = discover(real_data)
    assert dataset.layout == "mixed"
    assert [c.case_id for c in dataset.cases] == [
        "BraTS-GLI-00000-000", "BraTS-GLI-00001-000", "BraTS-GLI-00027-000", "BraTS2021_00006",
    ]  # fmt: skip
    assert dataset.incomplete == {}

    c21 = dataset.case("BraTS2021_00006")
    assert dataset.case_layouts["BraTS2021_00006"] == "brats2021"
    assert c21.convention == "brats2021"
    assert c21.modalities == MODALITIES
    assert c21.images == tuple(f"BraTS2021_00006/BraTS2021_00006_{m}.nii.gz" for m in MODALITIES)
    assert c21.label == "BraTS2021_00006/BraTS2021_00006_seg.nii.gz"

    c23 = dataset.case("BraTS-GLI-00000-000")
    assert dataset.case_layouts["BraTS-GLI-00000-000"] == "brats2023"
    assert c23.convention == "brats2023"
    assert c23.images == tuple(
        f"BraTS-GLI-00000-000/BraTS-GLI-00000-000-{t}.nii.gz" for t in ("t1n", "t1c", "t2w", "t2f")
    )
    assert c23.label == "BraTS-GLI-00000-000/BraTS-GLI-00000-000-seg.nii.gz"
    assert all(path.is_file() for c in dataset.cases for path in c.paths(real_data))

    assert dataset.case("BraTS-GLI-00027-000").label is None
    # a pseudo-label is not ground truth: the -PRED_..._NOT_GT file is not taken as the label
    assert dataset.case("BraTS-GLI-00001-000").label is None
    assert any("PRED_BraTS23_1_NOT_GT" in n and "ignored" in n for n in dataset.notes)
    assert any(n.startswith("metric_fixtures_brats_eval/: skipped") for n in dataset.notes)


def test_real_folder_with_one_layout_asked_for(real_data: Path) -> None:
    dataset = discover(real_data, "brats2021")
    assert dataset.layout == "brats2021"
    assert [c.case_id for c in dataset.cases] == ["BraTS2021_00006"]
    assert "BraTS-GLI-00000-000/: skipped, not a case folder (looks like brats2023)" in dataset.notes


def test_real_single_case_folders(real_data: Path) -> None:
    one = discover_case(real_data / "BraTS2021_00006")
    assert one.root == real_data and one.layout == "brats2021"
    assert [c.case_id for c in one.cases] == ["BraTS2021_00006"]
    assert one.cases[0].label == "BraTS2021_00006/BraTS2021_00006_seg.nii.gz"

    unlabelled = discover_case(real_data / "BraTS-GLI-00027-000")
    assert unlabelled.layout == "brats2023"
    assert unlabelled.cases[0].label is None
    assert len(unlabelled.cases[0].images) == 4

    with pytest.raises(LayoutError, match=r"fixtures_brats_eval: not a case folder.*found: pred/, ref/"):
        discover_case(real_data / "metric_fixtures_brats_eval")


def test_a_case_folder_given_as_root_says_so(real_data: Path) -> None:
    with pytest.raises(LayoutError) as err:
        discover(real_data / "BraTS2021_00006")
    message = str(err.value)
    assert message.startswith(f"{real_data / 'BraTS2021_00006'}: no case found")
    for layout in ("msd", "generic", "brats2021", "brats2023"):
        assert f"  {layout}: " in message
    assert "BraTS2021_00006_flair.nii.gz" in message  # what it found instead
    assert "discover_case" in message


# --------------------------------------------------------------------------------------------
# BraTS folders


def test_brats2021_with_nii_files_a_missing_modality_and_a_duplicate(tmp_path: Path) -> None:
    files = write_brats2021_case(tmp_path, "BraTS2021_00001", suffix=".nii")
    files["t2"].unlink()
    write_nifti(tmp_path / "BraTS2021_00001" / "BraTS2021_00001_t1.nii.gz", image_volume(9))
    write_brats2021_case(tmp_path, "BraTS2021_00002")
    (tmp_path / "notes").mkdir()
    (tmp_path / "README.md").write_text("not a case")

    dataset = discover(tmp_path)
    assert dataset.layout == "brats2021"
    assert [c.case_id for c in dataset.cases] == ["BraTS2021_00001", "BraTS2021_00002"]
    first = dataset.case("BraTS2021_00001")
    assert first.modalities == ("t1", "t1ce", "flair")
    # with both x.nii and x.nii.gz, the .nii.gz is used and the other noted
    assert first.images == (
        "BraTS2021_00001/BraTS2021_00001_t1.nii.gz",
        "BraTS2021_00001/BraTS2021_00001_t1ce.nii",
        "BraTS2021_00001/BraTS2021_00001_flair.nii",
    )
    assert first.label == "BraTS2021_00001/BraTS2021_00001_seg.nii"
    assert dataset.incomplete == {"BraTS2021_00001": ["t2"]}
    assert any(n.startswith("BraTS2021_00001/BraTS2021_00001_t1.nii: ignored") for n in dataset.notes)
    assert "notes/: skipped, not a case folder (no case files)" in dataset.notes


def test_case_folder_named_otherwise_than_its_files(tmp_path: Path) -> None:
    files = write_brats2023_case(tmp_path, "BraTS-GLI-00042-000", label=False)
    renamed = tmp_path / "patient-1"
    files["t1"].parent.rename(renamed)
    dataset = discover_case(renamed)
    assert [c.case_id for c in dataset.cases] == ["BraTS-GLI-00042-000"]
    assert dataset.cases[0].images[0] == "patient-1/BraTS-GLI-00042-000-t1n.nii.gz"


def test_convention_override_and_unknown_names(tmp_path: Path) -> None:
    write_brats2023_case(tmp_path, "case-a")
    assert discover(tmp_path, convention="msd").cases[0].convention == "msd"
    with pytest.raises(LabelError, match="unknown label convention 'brats2019'"):
        discover(tmp_path, convention="brats2019")
    with pytest.raises(LayoutError, match="unknown layout 'nnunet'"):
        discover(tmp_path, "nnunet")
    with pytest.raises(LayoutError, match="no such folder"):
        discover(tmp_path / "absent")


def test_empty_folder_lists_the_layouts_tried(tmp_path: Path) -> None:
    with pytest.raises(LayoutError) as err:
        discover(tmp_path)
    message = str(err.value)
    assert str(tmp_path) in message
    assert "<case>-{t1n,t1c,t2w,t2f,seg}" in message and "dataset.json" in message
    assert "Found instead: nothing (empty folder)" in message


# --------------------------------------------------------------------------------------------
# Medical Segmentation Decathlon


def test_msd_reads_modality_order_from_dataset_json(tmp_path: Path) -> None:
    write_msd(tmp_path, {"BRATS_002": msd_image(2), "BRATS_001": msd_image(1)}, test_cases=("BRATS_500",))
    # MSD's tarball carries macOS "._" files beside the images: they are skipped
    (tmp_path / "imagesTr" / "._BRATS_001.nii.gz").write_bytes(b"macOS resource fork")
    dataset = discover(tmp_path)
    assert dataset.layout == "msd"
    assert [c.case_id for c in dataset.cases] == ["BRATS_001", "BRATS_002", "BRATS_500"]
    case = dataset.case("BRATS_001")
    assert case.is_4d and case.images == ("imagesTr/BRATS_001.nii.gz",)
    assert case.modalities == ("flair", "t1", "t1ce", "t2")
    assert case.label == "labelsTr/BRATS_001.nii.gz" and case.convention == "msd"
    assert dataset.case("BRATS_500").label is None
    assert dataset.incomplete == {}

    (tmp_path / "dataset.json").write_text(json.dumps({"modality": {"0": "T2w", "1": "FLAIR"}}))
    reordered = discover(tmp_path, "msd")
    assert reordered.case("BRATS_001").modalities == ("t2", "flair")
    assert reordered.incomplete["BRATS_001"] == ["t1", "t1ce"]


def test_msd_without_dataset_json_uses_task01_order(tmp_path: Path) -> None:
    write_nifti(tmp_path / "imagesTr" / "BRATS_001.nii.gz", msd_image(1))
    dataset = discover(tmp_path)
    assert dataset.layout == "msd"
    assert dataset.cases[0].modalities == ("flair", "t1", "t1ce", "t2")
    assert dataset.cases[0].label is None


def test_msd_bad_dataset_json_names_the_file(tmp_path: Path) -> None:
    write_msd(tmp_path, {"BRATS_001": msd_image(1)})
    (tmp_path / "dataset.json").write_text(json.dumps({"modality": {"0": "PET"}}))
    with pytest.raises(LayoutError, match=r"dataset.json: unknown modality 'PET'"):
        discover(tmp_path)
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(LayoutError, match=r"dataset.json: not a readable dataset.json"):
        discover(tmp_path)


# --------------------------------------------------------------------------------------------
# generic images/ + masks/


def test_generic_flat_and_per_case_folders(tmp_path: Path) -> None:
    for m in MODALITIES:  # flat, BraTS 2021 names
        write_nifti(tmp_path / "images" / f"sub01_{m}.nii.gz", image_volume(1))
    for token in ("t1n", "t1c", "t2w", "t2f"):  # per-case folder, BraTS 2023 names
        write_nifti(tmp_path / "images" / "sub02" / f"sub02-{token}.nii", image_volume(2))
    write_nifti(tmp_path / "images" / "sub03_flair.nii.gz", image_volume(3))
    write_nifti(tmp_path / "masks" / "sub01.nii.gz", label_volume())
    write_nifti(tmp_path / "masks" / "sub02_seg.nii.gz", label_volume())
    write_nifti(tmp_path / "masks" / "sub99.nii.gz", label_volume())

    dataset = discover(tmp_path)
    assert dataset.layout == "generic"
    assert [c.case_id for c in dataset.cases] == ["sub01", "sub02", "sub03"]
    sub01, sub02, sub03 = dataset.cases
    assert sub01.images == tuple(f"images/sub01_{m}.nii.gz" for m in MODALITIES)
    assert sub01.label == "masks/sub01.nii.gz"
    assert sub02.images == tuple(f"images/sub02/sub02-{t}.nii" for t in ("t1n", "t1c", "t2w", "t2f"))
    assert sub02.modalities == MODALITIES and sub02.label == "masks/sub02_seg.nii.gz"
    assert sub03.label is None and sub03.modalities == ("flair",)
    assert dataset.incomplete == {"sub03": ["t1", "t1ce", "t2"]}
    assert {c.convention for c in dataset.cases} == {"brats2023"}  # the documented default
    assert "masks/sub99.nii.gz: ignored, no images for case sub99" in dataset.notes
    assert discover(tmp_path, convention="brats2021").cases[0].convention == "brats2021"
