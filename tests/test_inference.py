"""fedseg predict: label files on the input's own grid (shape, affine) in the input's convention."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from fedseg.cli import main
from fedseg.lightning_modules.data.layouts import discover_case
from fedseg.lightning_modules.data.synth import SynthConfig, generate
from fedseg.lightning_modules.inference import (
    CasePredictor,
    InferenceError,
    load_model,
    predict_cases,
    preprocess_from_hparams,
)
from fedseg.lightning_modules.labels import CONVENTIONS, to_internal
from fedseg.lightning_modules.module import SegmentationModule
from conftest import TEST_DATA, tiny_train_config
from fedseg.lightning_modules.training import train

MODS_2021 = ("t1", "t1ce", "t2", "flair")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A 2-epoch tiny UNet trained by ``fedseg train`` on synthetic sites (~3 s)."""
    root = tmp_path_factory.mktemp("trained")
    synth = generate(SynthConfig(**TEST_DATA, n_sites=2, cases_per_site=3, shape=(32, 32, 32)), root / "synth")
    cfg = tiny_train_config([synth.datalists["site-1"], synth.datalists["site-2"]], root / "run", features=8,
                            roi=(32, 32, 32))
    train(cfg)
    return root / "run" / "checkpoints" / "best.ckpt"


def lps_affine(spacing=(1.2, 1.0, 2.0), origin=(40.0, 30.0, -20.0)) -> np.ndarray:
    """A BraTS-like LPS voxel grid (x and y axes flipped), anisotropic, off-origin."""
    return np.array(
        [[-spacing[0], 0, 0, origin[0]], [0, -spacing[1], 0, origin[1]], [0, 0, spacing[2], origin[2]], [0, 0, 0, 1]]
    )


def write_brats2021_case(folder: Path, case_id: str, shape=(30, 28, 22), affine=None, label: bool = False) -> Path:
    """A BraTS 2021 case folder: four modalities with an off-centre, non-cubic 'brain' (zeros around)."""
    affine = lps_affine() if affine is None else affine
    rng = np.random.default_rng(7)
    case_dir = folder / case_id
    case_dir.mkdir(parents=True)
    brain = np.zeros(shape, dtype=bool)
    brain[3:21, 5:26, 2:15] = True  # the crop box is not centred: its inverse must put it back here
    for k, mod in enumerate(MODS_2021):
        data = np.where(brain, rng.normal(100 + 20 * k, 10, shape), 0).astype(np.float32)
        nib.save(nib.Nifti1Image(data, affine), case_dir / f"{case_id}_{mod}.nii.gz")
    if label:
        seg = np.zeros(shape, dtype=np.uint8)
        seg[8:14, 10:18, 5:10] = 2
        seg[10:12, 12:16, 6:9] = 4
        nib.save(nib.Nifti1Image(seg, affine), case_dir / f"{case_id}_seg.nii.gz")
    return case_dir


def save_untrained_checkpoint(path: Path, **hparams) -> Path:
    """A Lightning-format checkpoint of an untrained module (what ModelCheckpoint would write)."""
    module = SegmentationModule(features=4, roi_size=(16, 16, 16), hd95=False, **hparams)
    torch.save(
        {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
         "pytorch-lightning_version": pl.__version__},
        path,
    )
    return path


def test_predict_case_folder_restores_grid_and_convention(checkpoint, tmp_path):
    case_dir = write_brats2021_case(tmp_path / "data", "Synth_001")
    out = tmp_path / "pred"
    assert main(["predict", str(checkpoint), str(case_dir), "--out", str(out), "--device", "cpu"]) == 0
    written = nib.load(out / "Synth_001.nii.gz")
    source = nib.load(case_dir / "Synth_001_t1.nii.gz")
    assert written.shape == (30, 28, 22)
    np.testing.assert_array_equal(written.affine, source.affine)
    assert written.get_data_dtype() == np.uint8
    values = set(np.unique(np.asanyarray(written.dataobj)).tolist())
    assert values <= set(CONVENTIONS["brats2021"]) and 3 not in values, values
    assert sorted(p.name for p in case_dir.iterdir()) == [f"Synth_001_{m}.nii.gz" for m in sorted(MODS_2021)]


def test_inverse_puts_the_cropped_brain_back_where_it_was(checkpoint, tmp_path):
    """The brain mask of the preprocessed (RAS, cropped, padded) image, mapped back with the
    predictor's inverse, must equal the non-zero voxels of the source files exactly."""
    case_dir = write_brats2021_case(tmp_path / "data", "Synth_002", shape=(26, 31, 19))
    dataset = discover_case(case_dir)
    predictor = CasePredictor(load_model(checkpoint, device="cpu"))
    item = predictor.preprocess(dataset.cases[0], dataset.root)
    assert tuple(item["image"].shape[1:]) != (26, 31, 19)  # cropped and padded: not the source grid
    brain = (item["image"].as_tensor() != 0).any(0).to(torch.uint8)
    restored = predictor.to_source_grid(item, brain)
    source = np.asanyarray(nib.load(case_dir / "Synth_002_flair.nii.gz").dataobj) != 0
    assert restored.shape == source.shape
    np.testing.assert_array_equal(restored.astype(bool), source)


def test_predicted_labels_follow_each_case_convention(checkpoint, tmp_path):
    """Same model, a BraTS 2021 and a BraTS 2023 input: 4 vs 3 for enhancing, as the input uses."""
    synth_root = tmp_path / "data"
    write_brats2021_case(synth_root, "Synth_003")
    model = load_model(checkpoint, device="cpu")
    case = discover_case(synth_root / "Synth_003").cases[0]
    as_2023 = type(case)(case.case_id, case.images, case.modalities, None, "brats2023")
    p21 = predict_cases(model, [case], synth_root, tmp_path / "p21")[0]
    p23 = predict_cases(model, [as_2023], synth_root, tmp_path / "p23")[0]
    a = np.asanyarray(nib.load(p21.path).dataobj)
    b = np.asanyarray(nib.load(p23.path).dataobj)
    assert (a == 4).any() and (a == 2).any(), "the trained model predicts enhancing tumour and oedema"
    # the same internal labels, written in two conventions
    np.testing.assert_array_equal(to_internal(a, "brats2021"), to_internal(b, "brats2023"))
    assert (a == 4).sum() == (b == 3).sum() and not (a == 3).any() and not (b == 4).any()
    assert p21.voxels == {int(v): int((a == v).sum()) for v in np.unique(a)}


def test_refuses_output_inside_the_input(checkpoint, tmp_path, capsys):
    case_dir = write_brats2021_case(tmp_path / "data", "Synth_004")
    for out in (case_dir / "pred", tmp_path / "data" / "pred", case_dir):
        assert main(["predict", str(checkpoint), str(case_dir), "--out", str(out)]) == 2
        assert "inside the input folder" in capsys.readouterr().err
        assert not (case_dir / "pred").exists() and not (tmp_path / "data" / "pred").exists()
    assert len(list(case_dir.iterdir())) == 4


def test_clear_errors_for_bad_checkpoint_and_input(checkpoint, tmp_path, capsys):
    not_ckpt = tmp_path / "notes.ckpt"
    not_ckpt.write_text("hello")
    case_dir = write_brats2021_case(tmp_path / "data", "Synth_005")
    assert main(["predict", str(not_ckpt), str(case_dir), "--out", str(tmp_path / "o")]) == 2
    assert f"{not_ckpt}: not a fedseg SegmentationModule checkpoint" in capsys.readouterr().err
    assert main(["predict", str(checkpoint), str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "no such folder" in capsys.readouterr().err
    (case_dir / "Synth_005_t2.nii.gz").unlink()  # the model needs t2
    assert main(["predict", str(checkpoint), str(case_dir), "--out", str(tmp_path / "o")]) == 2
    assert "Synth_005 lacks ['t2']" in capsys.readouterr().err


def test_modalities_come_from_the_checkpoint_or_the_option(tmp_path):
    """fedseg train stores the modalities; older checkpoints need --modalities (default all four)."""
    two = save_untrained_checkpoint(
        tmp_path / "two.ckpt", in_channels=2,
        preprocess={"modalities": ["flair", "t1ce"], "roi_size": [16, 16, 16]},
    )
    model = load_model(two, device="cpu")
    assert model.modalities == ("flair", "t1ce")
    with pytest.raises(InferenceError, match=r"trained on modalities \['flair', 't1ce'\]"):
        load_model(two, device="cpu", modalities=["t1", "t2"])

    old = save_untrained_checkpoint(tmp_path / "old.ckpt", in_channels=2)  # no preprocess stored
    with pytest.raises(InferenceError, match="takes 2 input channels"):
        load_model(old, device="cpu")
    assert load_model(old, device="cpu", modalities=["t2", "flair"]).modalities == ("t2", "flair")
    assert preprocess_from_hparams({"in_channels": 4}, Path("x.ckpt")).modalities == MODS_2021

    # a 2-channel model on a 4-modality case reads exactly its two channels, in its order
    case_dir = write_brats2021_case(tmp_path / "data", "Synth_006")
    out = tmp_path / "pred"
    assert main(["predict", str(two), str(case_dir), "--out", str(out), "--device", "cpu"]) == 0
    assert nib.load(out / "Synth_006.nii.gz").shape == (30, 28, 22)


def test_predict_on_real_cases(checkpoint, real_data, tmp_path):
    """Real 240x240x155 LPS cases: an unlabelled BraTS 2023 one, and the 2021 one (values 0/1/2/4)."""
    for case_id, convention in (("BraTS-GLI-00027-000", "brats2023"), ("BraTS2021_00006", "brats2021")):
        case_dir = real_data / case_id
        out = tmp_path / case_id
        assert main(["predict", str(checkpoint), str(case_dir), "--out", str(out), "--device", "cpu"]) == 0
        written = nib.load(out / f"{case_id}.nii.gz")
        image = next(p for p in sorted(case_dir.iterdir()) if "seg" not in p.name)
        source = nib.load(image)
        assert written.shape == source.shape == (240, 240, 155)
        np.testing.assert_array_equal(written.affine, source.affine)
        values = set(np.unique(np.asanyarray(written.dataobj)).tolist())
        assert values <= set(CONVENTIONS[convention]), (case_id, values)
        if convention == "brats2021":
            assert 3 not in values

    # and the inverse is exact on a real LPS volume: the brain goes back voxel for voxel
    dataset = discover_case(real_data / "BraTS2021_00006")
    predictor = CasePredictor(load_model(checkpoint, device="cpu"))
    item = predictor.preprocess(dataset.cases[0], dataset.root)
    restored = predictor.to_source_grid(item, (item["image"].as_tensor() != 0).any(0).to(torch.uint8))
    source = np.zeros((240, 240, 155), dtype=bool)
    for path in dataset.cases[0].images:
        source |= np.asanyarray(nib.load(dataset.root / path).dataobj) != 0
    np.testing.assert_array_equal(restored.astype(bool), source)


def test_predict_msd_dataset_writes_3d_labels_on_the_4d_grid(checkpoint, tmp_path):
    """MSD: one 4-D file per case (channels named by dataset.json), MSD label values."""
    import json

    root = tmp_path / "Task01"
    (root / "imagesTs").mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps({"modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}}))
    data = np.zeros((26, 30, 18, 4), np.float32)
    data[4:20, 5:25, 3:15] = np.random.default_rng(0).normal(100, 10, (16, 20, 12, 4))
    affine = np.diag([-1.5, 1.0, 2.0, 1.0])
    affine[:3, 3] = [10.0, -20.0, 5.0]
    nib.save(nib.Nifti1Image(data, affine), root / "imagesTs" / "BRATS_900.nii.gz")
    out = tmp_path / "pred"
    assert main(["predict", str(checkpoint), str(root), "--out", str(out), "--device", "cpu"]) == 0
    written = nib.load(out / "BRATS_900.nii.gz")
    assert written.shape == (26, 30, 18)
    np.testing.assert_array_equal(written.affine, affine)
    labels = np.asanyarray(written.dataobj)
    assert set(np.unique(labels).tolist()) <= {0, 1, 2, 3} and labels.any()


def test_cli_choices_match_the_library():
    from fedseg.cli import predict
    from fedseg.lightning_modules.data.datalist import MODALITIES

    assert predict.MODALITY_CHOICES == MODALITIES
    assert predict.CONVENTION_CHOICES == tuple(CONVENTIONS)


def test_inference_reads_the_checkpoint_without_lightning_and_segments_as_the_module_does(checkpoint):
    import subprocess
    import sys

    module = SegmentationModule.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True).eval()
    loaded = load_model(checkpoint, device="cpu")
    image = torch.randn(4, 40, 36, 32, generator=torch.Generator().manual_seed(1))  # not a window's size
    with torch.inference_mode():
        assert torch.equal(loaded.segment(image), module.segment(image[None])[0])
    assert tuple(loaded.module.hparams.roi_size) == tuple(module.hparams.roi_size)
    script = ("import sys\nfrom fedseg.cli import predict\nfrom fedseg.lightning_modules.inference import load_model\n"
              f"load_model({str(checkpoint)!r}, device='cpu')\n"
              "print(sorted(m for m in ('pytorch_lightning', 'lightning_fabric') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240, check=True)
    assert out.stdout.strip() == "[]", out.stdout
