"""Issue 21, item 1: datalist entries stay under the data root, case ids are plain file names, and
non-ASCII ids and paths work whatever the locale."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fedseg.cli import main
from fedseg.lightning_modules.data.check import check_dataset
from fedseg.lightning_modules.data.datalist import DatalistError, read_datalist, safe_case_name
from fedseg.lightning_modules.inference import InferenceError, predict_cases, prediction_path

MODALITIES = ["t1", "t1ce", "t2", "flair"]
REPO = Path(__file__).resolve().parents[1]


def write_case(folder: Path, case_id: str, seed: int = 0) -> dict:
    """A real 16^3 BraTS 2021 case (4 images and a 0/1/2/4 label) in ``folder``; its datalist entry
    with paths relative to ``folder.parent``."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    images = []
    for m in MODALITIES:
        path = folder / f"{case_id}_{m}.nii.gz"
        nib.save(nib.Nifti1Image(rng.random((16, 16, 16), dtype=np.float32), affine), path)
        images.append(f"{folder.name}/{path.name}")
    label = np.zeros((16, 16, 16), dtype=np.uint8)
    label[4:8, 4:8, 4:8], label[5:7, 5:7, 5:7], label[6, 6, 6] = 2, 1, 4
    nib.save(nib.Nifti1Image(label, affine), folder / f"{case_id}_seg.nii.gz")
    return {"case_id": case_id, "image": images, "modalities": MODALITIES,
            "label": f"{folder.name}/{case_id}_seg.nii.gz", "convention": "brats2021"}


@pytest.fixture
def study(tmp_path):
    """``data/`` with two good cases and ``outside/`` beside it with a real case (not under data/)."""
    data = tmp_path / "data"
    good = [write_case(data / f"case-{k}", f"case-{k}", seed=k) for k in (1, 2)]
    outside = write_case(tmp_path / "outside", "stray", seed=9)
    return data, good, outside


def datalist(path: Path, training: list[dict], validation: list[dict] = (), **extra) -> Path:
    path.write_text(json.dumps({**extra, "training": list(training), "validation": list(validation)}),
                    encoding="utf-8")
    return path


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def test_the_issue_s_datalist_fails_data_check_with_each_entry_named(study, tmp_path, capsys):
    data, good, outside = study
    escaped = {**outside, "case_id": "../../escaped",
               "image": [f"../{p}" for p in outside["image"]], "label": f"../{outside['label']}"}
    listing = datalist(data / "site.json", [escaped, good[0]], [good[1]])
    before = snapshot(tmp_path)

    assert main(["data", "check", str(listing)]) == 1
    report = capsys.readouterr().out
    lines = report.strip().splitlines()
    assert any(line.startswith("site.json: unsafe_case_id: training[0]: case id '../../escaped'") for line in lines)
    outside_lines = [line for line in lines if ": outside_root: " in line]
    assert len(outside_lines) == 5  # 4 images and the label, each with the entry and where it leads
    assert all("training[0]" in line and str(tmp_path / "outside") in line for line in outside_lines)
    assert lines[-1].startswith("FAILED: 3 cases")
    assert "in 1 case " in lines[-1]  # the two good cases were checked and are clean
    assert snapshot(tmp_path) == before  # nothing written anywhere


def test_every_command_that_reads_a_datalist_refuses_it(study, tmp_path, capsys):
    data, good, outside = study
    escaped = {**good[0], "image": [f"../outside/{Path(p).name}" for p in outside["image"]]}
    listing = datalist(data / "site.json", [escaped, good[1]])

    with pytest.raises(DatalistError, match=r"training\[0\]: image: '../outside/stray_t1.nii.gz' resolves to") as err:
        read_datalist(listing)
    assert {p.kind for p in err.value.problems} == {"outside_root"} and len(err.value.problems) == 4
    out = tmp_path / "run"
    assert main(["train", str(listing), "--out", str(out), "--profile", "tiny", "--epochs", "1"]) == 2
    assert main(["evaluate", str(tmp_path / "no.ckpt"), str(listing), "--out", str(tmp_path / "eval")]) == 2
    errors = capsys.readouterr().err
    assert errors.count("training[0]: image: '../outside/stray_t1.nii.gz'") == 2
    assert not (tmp_path / "eval").exists()


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlinked file", "symlinked folder", "root override"])
def test_a_path_that_leads_out_of_the_data_root_is_refused(study, tmp_path, how):
    data, good, outside = study
    entry = dict(good[0])
    root = None
    if how == "dotdot":
        entry["label"] = "case-1/../../outside/stray_seg.nii.gz"
    elif how == "absolute":
        entry["label"] = str(tmp_path / "outside" / "stray_seg.nii.gz")
    elif how == "symlinked file":
        (data / "case-1" / "link_seg.nii.gz").symlink_to(tmp_path / "outside" / "stray_seg.nii.gz")
        entry["label"] = "case-1/link_seg.nii.gz"
    elif how == "symlinked folder":
        (data / "elsewhere").symlink_to(tmp_path / "outside", target_is_directory=True)
        entry["label"] = "elsewhere/stray_seg.nii.gz"
    else:  # the file's own root holds the label, but the user named a narrower root
        root = data / "case-2"
        entry = {**good[1], "image": [Path(p).name for p in good[1]["image"]], "label": "../case-1/case-1_seg.nii.gz"}
    listing = datalist(tmp_path / "site.json", [entry], data_root=str(data))
    with pytest.raises(DatalistError, match=r"training\[0\]: label: .* outside the data root") as err:
        read_datalist(listing, root)
    assert [p.kind for p in err.value.problems] == ["outside_root"]
    report = check_dataset(listing) if root is None else check_dataset(root, datalist=listing)
    assert [p.kind for p in report.problems] == ["outside_root"]


def test_symlinks_inside_the_root_and_a_datalist_without_root_are_fine(study, tmp_path):
    data, good, _ = study
    (data / "alias").symlink_to(data / "case-1", target_is_directory=True)
    entry = {**good[0], "image": [p.replace("case-1/", "alias/", 1) for p in good[0]["image"]]}
    # no data_root: the datalist's own folder is the root
    loaded = read_datalist(datalist(data / "site.json", [entry, good[1]]))
    assert loaded.data_root == data.resolve() and len(loaded.cases) == 2
    assert check_dataset(data / "site.json").ok
    # ... and a datalist outside its data: only what data_root names is the root
    assert read_datalist(datalist(tmp_path / "lists.json", [good[0]], data_root="data")).data_root == data.resolve()


@pytest.mark.parametrize("case_id", ["../../escaped", "a/b", "a\\b", "..", ".", ".hidden", "", " pad", "pad ",
                                     "nul\x00byte", "new\nline", "x" * 201])
def test_unsafe_case_ids_are_refused_with_the_entry_named(case_id, study):
    data, good, _ = study
    with pytest.raises(DatalistError, match="case id"):
        safe_case_name(case_id)
    listing = datalist(data / "site.json", [good[0], {**good[1], "case_id": case_id}])
    with pytest.raises(DatalistError, match=r"training\[1\]: case id") as err:
        read_datalist(listing)
    assert [p.kind for p in err.value.problems] == ["unsafe_case_id"]
    with pytest.raises(InferenceError, match="case id"):
        prediction_path(data / "out", case_id)


@pytest.mark.parametrize("case_id", ["BraTS2021_00006", "BraTS-GLI-00027-000", "BraTS-Zürich-001", "病例 7", "a..b"])
def test_plain_case_ids_name_a_file_inside_the_output_folder(case_id, tmp_path):
    assert safe_case_name(case_id) == case_id
    path = prediction_path(tmp_path / "out", case_id)
    assert path.parent == tmp_path / "out" and path.name == f"{case_id}.nii.gz"


def test_prediction_refuses_an_unsafe_case_id_before_any_work(study, tmp_path):
    """Cases from a folder (``discover``) are not read through a datalist: the output name is checked
    again where it is made, before the model or any file is touched."""
    from fedseg.lightning_modules.data.datalist import Case

    data, good, _ = study
    cases = [Case.from_entry(good[0]), Case.from_entry({**good[1], "case_id": "../../escaped"})]
    with pytest.raises(InferenceError, match="'../../escaped' contains a path separator"):
        predict_cases(None, cases, data, tmp_path / "out")  # type: ignore[arg-type] - never reached
    assert not (tmp_path / "out").exists()


def test_non_ascii_case_ids_and_paths(tmp_path, capsys):
    data = tmp_path / "données"
    entry = write_case(data / "Zürich", "BraTS-Zürich-001")
    listing = data / "site.json"
    listing.write_text(json.dumps({"training": [entry], "validation": []}, ensure_ascii=False), encoding="utf-8")
    assert read_datalist(listing).cases[0].case_id == "BraTS-Zürich-001"
    assert main(["data", "check", str(listing)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("OK: 1 case (5 files)")


NON_ASCII_CHECK = """
import sys
from fedseg.cli import main
sys.exit(main(["data", "check", sys.argv[1]]))
"""


def test_a_utf8_datalist_reads_in_an_ascii_locale(tmp_path):
    """A true ASCII locale (no UTF-8 mode, no locale coercion; plain ``LC_ALL=C`` would switch Python
    to UTF-8 mode, PEP 538/540): the locale's encoding would fail on the case id's ``ü``. Paths stay
    ASCII, as the file system encoding is ASCII there too."""
    data = tmp_path / "data"
    entry = {**write_case(data / "case-001", "case-001"), "case_id": "BraTS-Zürich-001"}
    listing = data / "site.json"
    listing.write_text(json.dumps({"training": [entry], "validation": []}, ensure_ascii=False), encoding="utf-8")
    assert "Zürich".encode() in listing.read_bytes()  # stored as UTF-8, not as \\u escapes

    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), "LC_ALL": "C", "LANG": "C",
           "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0", "PYTHONIOENCODING": "utf-8"}
    done = subprocess.run([sys.executable, "-c", NON_ASCII_CHECK, str(listing)], env=env, cwd=REPO,
                          capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert done.stdout.decode().strip().splitlines()[-1].startswith("OK: 1 case (5 files)")


def test_predict_refuses_a_case_folder_whose_files_lead_out_before_loading_a_model(study, tmp_path, capsys):
    data, _, _ = study
    flair = data / "case-2" / "case-2_flair.nii.gz"
    flair.unlink()
    flair.symlink_to(tmp_path / "outside" / "stray_flair.nii.gz")
    argv = ["predict", str(tmp_path / "missing.ckpt"), str(data), "--out", str(tmp_path / "pred")]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert "case case-2: image: 'case-2/case-2_flair.nii.gz' resolves to" in error and "outside the data root" in error
    assert not (tmp_path / "pred").exists()
    report = check_dataset(data)  # the folder's own check says the same, and reads the rest
    assert [(p.case_id, p.kind) for p in report.problems] == [("case-2", "outside_root")]
    assert report.n_files == 5
