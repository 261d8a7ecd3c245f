"""Preprocessing: tiny NIfTI cases written with nibabel, plus the real BraTS cases."""

from __future__ import annotations

import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor, decollate_batch, list_data_collate
from monai.transforms import Compose

from fedseg.lightning_modules.data.datalist import MODALITIES, Case, DatalistError
from fedseg.lightning_modules.data.transforms import (
    PreprocessConfig,
    build_inverse,
    build_transforms,
    case_to_item,
    deterministic_transforms,
)
from fedseg.lightning_modules.labels import LabelError

# ---------------------------------------------------------------- tiny synthetic cases (nibabel)

SHAPE = (20, 24, 18)
SPACING = (1.0, 1.25, 1.5)
#: LPS like BraTS: RAS reorientation flips file axes 0 and 1
AFFINE = np.array([[-1.0, 0, 0, 10.0], [0, -1.25, 0, 20.0], [0, 0, 1.5, -5.0], [0, 0, 0, 1]])
BRAIN = (slice(3, 17), slice(4, 21), slice(2, 16))
#: file values of (NCR, ED, ET) per convention
FILE_VALUES = {"brats2021": (1, 2, 4), "brats2023": (1, 2, 3), "msd": (2, 1, 3)}
#: each modality is a ramp along one file axis, so a channel's identity and orientation can be read
#: off the preprocessed image: (axis, direction) in the file, and its sign per RAS axis afterwards
RAMPS = {"t1": (0, 1), "t1ce": (1, 1), "t2": (2, 1), "flair": (2, -1)}
RAS_SIGNATURE = {"t1": (-1, 0, 0), "t1ce": (0, -1, 0), "t2": (0, 0, 1), "flair": (0, 0, -1)}


def internal_label(shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    """Internal labels: oedema block around a necrotic core around an enhancing core."""
    lab = np.zeros(shape, np.uint8)
    lab[6:14, 8:16, 5:12] = 2
    lab[8:12, 10:14, 7:10] = 1
    lab[9:11, 11:13, 8:9] = 3
    return lab


def modality_volume(modality: str, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    axis, direction = RAMPS[modality]
    ramp = np.indices(shape)[axis].astype(np.float32)
    vol = 100.0 + 7.0 * direction * ramp + (0.5 if direction < 0 else 0.0)
    out = np.zeros(shape, np.int16)
    out[BRAIN] = np.rint(vol[BRAIN])
    return out


def to_file_values(internal: np.ndarray, convention: str) -> np.ndarray:
    ncr, ed, et = FILE_VALUES[convention]
    out = np.zeros_like(internal)
    out[internal == 1], out[internal == 2], out[internal == 3] = ncr, ed, et
    return out


def save(path: Path, array: np.ndarray, affine: np.ndarray = AFFINE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))


def write_case(
    root: Path, case_id: str, convention: str = "brats2021", *, four_d: bool = False, label: np.ndarray | None = None
) -> Case:
    """A BraTS-2021-layout case (one gzip NIfTI per modality) or an MSD-style 4-D one under ``root``."""
    lab = internal_label() if label is None else label
    save(root / case_id / f"{case_id}_seg.nii.gz", to_file_values(lab, convention))
    if four_d:  # MSD channel order
        order = ("flair", "t1", "t1ce", "t2")
        save(root / case_id / f"{case_id}.nii.gz", np.stack([modality_volume(m) for m in order], axis=-1))
        return Case(case_id, (f"{case_id}/{case_id}.nii.gz",), order, f"{case_id}/{case_id}_seg.nii.gz", convention)
    for m in MODALITIES:
        save(root / case_id / f"{case_id}_{m}.nii.gz", modality_volume(m))
    images = tuple(f"{case_id}/{case_id}_{m}.nii.gz" for m in MODALITIES)
    return Case(case_id, images, MODALITIES, f"{case_id}/{case_id}_seg.nii.gz", convention)


def ramp_signature(channel: np.ndarray, mask: np.ndarray) -> tuple[int, ...]:
    """Sign of the mean voxel-to-voxel change of ``channel`` inside ``mask`` along each axis."""
    signs = []
    for axis in range(3):
        inside = np.logical_and(
            np.take(mask, range(mask.shape[axis] - 1), axis), np.take(mask, range(1, mask.shape[axis]), axis)
        )
        step = np.diff(channel, axis=axis)[inside].mean()
        signs.append(int(np.sign(round(float(step), 4))))
    return tuple(signs)


def expected_region_counts(lab: np.ndarray) -> list[int]:
    return [int((lab == 3).sum()), int(np.isin(lab, (1, 3)).sum()), int((lab > 0).sum())]


# ---------------------------------------------------------------- config


def test_config_validates_and_normalises_lists():
    cfg = PreprocessConfig(modalities=["t2", "flair"], roi_size=[16, 16, 16])
    assert cfg.modalities == ("t2", "flair") and cfg.roi_size == (16, 16, 16) and cfg.in_channels == 2
    hash(cfg)
    with pytest.raises(ValueError, match="unknown"):
        PreprocessConfig(modalities=("t1", "dwi"))
    with pytest.raises(ValueError, match="normalization"):
        PreprocessConfig(normalization="percentile")
    with pytest.raises(ValueError, match="duplicates"):
        PreprocessConfig(modalities=("t1", "t1"))
    with pytest.raises(ValueError, match="stage"):
        build_transforms(PreprocessConfig(), "test")  # type: ignore[arg-type]


def test_case_to_item_lists_absolute_paths_and_stamps(tmp_path):
    case = write_case(tmp_path, "C1")
    item = case_to_item(case, tmp_path, ("flair", "t1ce"))
    assert item["image"] == [str(tmp_path / "C1" / "C1_flair.nii.gz"), str(tmp_path / "C1" / "C1_t1ce.nii.gz")]
    assert item["modalities"] == ["flair", "t1ce"] and item["convention"] == "brats2021"
    assert item["label"] == str(tmp_path / "C1" / "C1_seg.nii.gz")
    assert len(item["source_stamp"].split(";")) == 3 and item["pipeline_version"] >= 1
    assert "label" not in case_to_item(case, tmp_path, with_label=False)
    (tmp_path / "C1" / "C1_t1ce.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match="C1_t1ce.nii.gz"):
        case_to_item(case, tmp_path)


# ---------------------------------------------------------------- val stage on tiny cases


@pytest.mark.parametrize("convention", ["brats2021", "brats2023", "msd"])
def test_val_item_regions_channels_normalisation(tmp_path, convention):
    case = write_case(tmp_path, "C1", convention)
    out = build_transforms(PreprocessConfig(), "val")(case_to_item(case, tmp_path))
    image, label = out["image"], out["label"]
    assert type(image) is torch.Tensor and type(label) is torch.Tensor  # plain tensors, no meta
    assert image.shape[0] == 4 and label.shape[0] == 3 and label.dtype == torch.float32
    assert image.shape[1:] == label.shape[1:]
    assert all(s % 16 == 0 for s in image.shape[1:])
    # ET/TC/WT voxel counts survive label mapping, reorientation, brain crop and padding
    assert label.sum(dim=(1, 2, 3)).tolist() == expected_region_counts(internal_label())
    assert set(torch.unique(label).tolist()) == {0.0, 1.0}
    # spacing along the RAS axes (no axis swap here: only flips)
    assert out["spacing"].tolist() == pytest.approx(SPACING)
    assert out["case_id"] == "C1" and out["convention"] == convention
    assert not {"source_stamp", "modalities", "pipeline_version"} & out.keys()
    # z-score over the brain, per channel
    brain = (image != 0).any(0)
    assert int(brain.sum()) == np.prod([s.stop - s.start for s in BRAIN])
    for ch in image:
        assert float(ch[brain].mean()) == pytest.approx(0.0, abs=1e-4)
        assert float(ch[brain].std(unbiased=False)) == pytest.approx(1.0, abs=1e-3)
        assert float(ch[~brain].abs().max()) == 0.0


def test_modality_subset_order_and_ras_orientation(tmp_path):
    case = write_case(tmp_path, "C1")
    cfg = PreprocessConfig(modalities=("flair", "t1ce", "t2"))  # t1 dropped, order changed
    out = build_transforms(cfg, "val")(case_to_item(case, tmp_path, cfg.modalities))
    image = out["image"].numpy()
    assert image.shape[0] == 3
    brain = (image != 0).any(0)
    assert [ramp_signature(ch, brain) for ch in image] == [RAS_SIGNATURE[m] for m in cfg.modalities]


def test_4d_msd_file_channels_are_reordered(tmp_path):
    case = write_case(tmp_path, "M1", "msd", four_d=True)
    assert case.is_4d
    out = build_transforms(PreprocessConfig(), "val")(case_to_item(case, tmp_path))
    image = out["image"].numpy()
    brain = (image != 0).any(0)
    assert [ramp_signature(ch, brain) for ch in image] == [RAS_SIGNATURE[m] for m in MODALITIES]
    assert out["label"].sum(dim=(1, 2, 3)).tolist() == expected_region_counts(internal_label())


def test_geometry_is_ras_and_world_positions_are_kept(tmp_path):
    case = write_case(tmp_path, "C1")
    out = Compose(deterministic_transforms(PreprocessConfig(), "val"))(case_to_item(case, tmp_path))
    image, label = out["image"], out["label"]
    assert isinstance(image, MetaTensor)
    assert nib.aff2axcodes(image.affine.numpy()) == ("R", "A", "S")
    assert torch.allclose(label.affine, image.affine)
    # the enhancing core sits at the same place in the world before and after preprocessing
    src = np.argwhere(internal_label() == 3).mean(0)
    dst = np.argwhere(label[0].numpy() > 0).mean(0)
    world = lambda aff, ijk: (np.asarray(aff) @ np.append(ijk, 1.0))[:3]  # noqa: E731
    np.testing.assert_allclose(world(image.affine.numpy(), dst), world(AFFINE, src), atol=1e-6)


def test_minmax_normalisation(tmp_path):
    case = write_case(tmp_path, "C1")
    out = build_transforms(PreprocessConfig(normalization="minmax"), "val")(case_to_item(case, tmp_path))
    flat = out["image"].flatten(1)
    assert flat.min(1).values.tolist() == [0.0] * 4 and flat.max(1).values.tolist() == pytest.approx([1.0] * 4)


def test_no_foreground_crop_keeps_the_whole_grid(tmp_path):
    case = write_case(tmp_path, "C1")
    out = build_transforms(PreprocessConfig(crop_foreground=False, pad_multiple=1), "val")(
        case_to_item(case, tmp_path)
    )
    assert tuple(out["image"].shape[1:]) == SHAPE  # LPS -> RAS flips only, nothing cropped


# ---------------------------------------------------------------- train stage


def test_train_gives_roi_crops_with_augmentation(tmp_path):
    case = write_case(tmp_path, "C1")
    cfg = PreprocessConfig(roi_size=(16, 16, 24))  # larger than the brain along z: padded first
    transform = build_transforms(cfg, "train", samples_per_volume=3)
    transform.set_random_state(seed=0)
    samples = transform(case_to_item(case, tmp_path))
    assert isinstance(samples, list) and len(samples) == 3
    for s in samples:
        assert tuple(s["image"].shape) == (4, 16, 16, 24) and tuple(s["label"].shape) == (3, 16, 16, 24)
        assert type(s["image"]) is torch.Tensor and s["label"].dtype == torch.float32
        assert s["spacing"].tolist() == pytest.approx(SPACING)
    # pos/neg sampling: at least one of the crops holds tumour
    assert max(float(s["label"][2].sum()) for s in samples) > 0


def test_train_augmentation_flips_then_scales_and_shifts_each_channel(tmp_path):
    case = write_case(tmp_path, "C1")
    cfg = PreprocessConfig(roi_size=(16, 32, 16), flip_prob=1.0)  # roi >= padded brain: crop = all
    item = case_to_item(case, tmp_path)
    reference = Compose(deterministic_transforms(cfg, "train"))(dict(item))
    transform = build_transforms(cfg, "train")
    transform.set_random_state(seed=1)
    (out,) = transform(item)
    flipped = torch.flip(reference["image"].as_tensor(), dims=(1, 2, 3))
    torch.testing.assert_close(out["label"], torch.flip(reference["label"].as_tensor(), dims=(1, 2, 3)).float())
    factors = []
    for aug, ref in zip(out["image"], flipped):  # aug = ref * scale + shift, per channel
        design = torch.stack([ref.flatten(), torch.ones(ref.numel())], 1).double()
        (scale, shift), *_ = np.linalg.lstsq(design.numpy(), aug.flatten().double().numpy(), rcond=None)
        np.testing.assert_allclose(aug.numpy(), ref.numpy() * scale + shift, atol=1e-4)
        assert 0.9 <= scale <= 1.1 and -0.1 <= shift <= 0.1 and (scale, shift) != (1.0, 0.0)
        factors.append(round(float(scale), 6))
    assert len(set(factors)) == 4  # channel-wise


# ---------------------------------------------------------------- bad input


def raises_from(exc_type: type[Exception], match: str):
    """MONAI's ``Compose`` re-raises a transform's error as ``RuntimeError`` from it: check the cause."""
    return pytest.raises(
        RuntimeError, check=lambda e: isinstance(e.__cause__, exc_type) and re.search(match, str(e.__cause__))
    )


def test_label_value_outside_convention_names_the_file(tmp_path):
    case = write_case(tmp_path, "C1", "brats2023")
    wrong = Case(case.case_id, case.images, case.modalities, case.label, "brats2021")  # 3 is no 2021 label
    with raises_from(LabelError, r"C1_seg\.nii\.gz.*\[3\]"):
        build_transforms(PreprocessConfig(), "val")(case_to_item(wrong, tmp_path))


def test_label_on_another_grid_names_the_file(tmp_path):
    case = write_case(tmp_path, "C1")
    save(tmp_path / "C1" / "C1_seg.nii.gz", np.zeros((20, 24, 17), np.uint8))
    with raises_from(LabelError, r"C1_seg\.nii\.gz.*grid"):
        build_transforms(PreprocessConfig(), "val")(case_to_item(case, tmp_path))


def test_missing_modality_is_a_clear_error(tmp_path):
    case = write_case(tmp_path, "M1", "msd", four_d=True)
    three = Case(case.case_id, case.images, ("flair", "t1", "t1ce"), case.label, "msd")
    with raises_from(DatalistError, "M1.nii.gz: 4 channels"):
        build_transforms(PreprocessConfig(), "val")(case_to_item(three, tmp_path))


# ---------------------------------------------------------------- predict + inversion


def _invert_brain_mask(item: dict, cfg: PreprocessConfig) -> MetaTensor:
    """Run the predict pipeline, fake a 3-channel prediction (channel 0's brain mask), batch it,
    decollate, and map it back onto the source grid."""
    transform = build_transforms(cfg, "predict")
    out = transform(item)
    assert isinstance(out["image"], MetaTensor) and "label" not in out
    assert nib.aff2axcodes(out["image"].affine.numpy()) == ("R", "A", "S")
    batch = list_data_collate([out])
    batch["pred"] = (batch["image"][:, :1] != 0).float().repeat(1, 3, 1, 1, 1)
    return build_inverse(transform)(decollate_batch(batch)[0])["pred"]


def test_prediction_is_inverted_to_the_source_grid(tmp_path):
    case = write_case(tmp_path, "C1")
    cfg = PreprocessConfig(modalities=("t2", "t1"))
    pred = _invert_brain_mask(case_to_item(case, tmp_path, cfg.modalities, with_label=False), cfg)
    assert tuple(pred.shape) == (3, *SHAPE)
    np.testing.assert_allclose(pred.affine.numpy(), AFFINE, atol=1e-6)
    np.testing.assert_array_equal(pred[0].numpy() > 0.5, modality_volume("t2") != 0)


# ---------------------------------------------------------------- real BraTS cases

#: region voxel counts (ET, TC, WT) from the README of the real data
REAL_CASES = {
    "BraTS2021_00006": ("brats2021", "_", ("t1", "t1ce", "t2", "flair"), "seg", [26448, 51954, 137911]),
    "BraTS-GLI-00000-000": ("brats2023", "-", ("t1n", "t1c", "t2w", "t2f"), "seg", [32731, 44469, 57305]),
}


def real_case(root: Path, case_id: str) -> Case:
    convention, sep, names, seg, _ = REAL_CASES[case_id]
    images = tuple(f"{case_id}/{case_id}{sep}{n}.nii.gz" for n in names)
    return Case(case_id, images, MODALITIES, f"{case_id}/{case_id}{sep}{seg}.nii.gz", convention)


@pytest.mark.parametrize("case_id", sorted(REAL_CASES))
def test_real_case_val_item(real_data, case_id):
    case = real_case(real_data, case_id)
    out = build_transforms(PreprocessConfig(), "val")(case_to_item(case, real_data))
    image, label = out["image"], out["label"]
    assert image.shape[0] == 4 and label.shape[0] == 3
    assert all(s % 16 == 0 for s in image.shape[1:]) and all(s < 240 for s in image.shape[1:])
    # ET non-empty for both conventions, and no tumour voxel lost to the brain crop
    assert label.sum(dim=(1, 2, 3)).tolist() == REAL_CASES[case_id][-1]
    assert out["spacing"].tolist() == pytest.approx([1.0, 1.0, 1.0])
    for ch in image:
        brain = ch != 0
        assert float(ch[brain].mean()) == pytest.approx(0.0, abs=1e-3)
        assert float(ch[brain].std()) == pytest.approx(1.0, abs=1e-3)


def test_real_case_prediction_inverts_to_source_geometry(real_data):
    case = real_case(real_data, "BraTS-GLI-00000-000")
    cfg = PreprocessConfig(modalities=("flair", "t1ce"))
    pred = _invert_brain_mask(case_to_item(case, real_data, cfg.modalities, with_label=False), cfg)
    source = nib.load(real_data / case.images[3])  # t2f = flair
    assert tuple(pred.shape) == (3, *source.shape)
    np.testing.assert_allclose(pred.affine.numpy(), source.affine, atol=1e-5)
    np.testing.assert_array_equal(pred[0].numpy() > 0.5, np.asanyarray(source.dataobj) != 0)
