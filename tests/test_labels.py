import nibabel as nib
import numpy as np
import pytest
import torch

from fedseg.lightning_modules.labels import (
    LabelError,
    from_internal,
    internal_from_regions,
    regions_from_internal,
    to_internal,
)


def _counts(a):
    values, counts = np.unique(a, return_counts=True)
    return dict(zip(values.tolist(), counts.tolist()))


def test_brats2021_real_case_maps_4_to_enhancing(real_data):
    seg = np.asanyarray(nib.load(real_data / "BraTS2021_00006/BraTS2021_00006_seg.nii.gz").dataobj)
    internal = to_internal(seg, "brats2021")
    assert _counts(internal) == {0: 8790089, 1: 25506, 2: 85957, 3: 26448}
    et, tc, wt = regions_from_internal(internal)
    assert et.sum() == 26448 and tc.sum() == 25506 + 26448 and wt.sum() == 25506 + 85957 + 26448


def test_brats2023_real_float_label_keeps_enhancing_3(real_data):
    seg = nib.load(real_data / "BraTS-GLI-00000-000/BraTS-GLI-00000-000-seg.nii.gz").get_fdata()
    assert seg.dtype.kind == "f"  # published as float32: rounding must not lose labels
    internal = to_internal(seg, "brats2023")
    assert _counts(internal) == {0: 8870695, 1: 11738, 2: 12836, 3: 32731}
    assert regions_from_internal(internal)[0].sum() == 32731  # ET not dropped (the MONAI 1/2/4 trap)


def test_msd_swaps_oedema_and_core():
    msd = np.array([0, 1, 2, 3])
    assert to_internal(msd, "msd").tolist() == [0, 2, 1, 3]
    assert from_internal(to_internal(msd, "msd"), "msd").tolist() == msd.tolist()


def test_values_outside_convention_are_named():
    with pytest.raises(LabelError, match=r"\[3\].*brats2021"):
        to_internal(np.array([0, 1, 3]), "brats2021")
    with pytest.raises(LabelError, match="unknown label convention"):
        to_internal(np.array([0]), "brats2019")


@pytest.mark.parametrize("convention", ["brats2021", "brats2023", "msd"])
def test_regions_round_trip_numpy_and_torch(convention):
    rng = np.random.default_rng(0)
    internal = rng.integers(0, 4, size=(8, 8, 8)).astype(np.uint8)
    for arr in (internal, torch.from_numpy(internal)):
        regions = regions_from_internal(arr)
        assert tuple(regions.shape) == (3, 8, 8, 8)
        back = internal_from_regions(regions)
        assert np.array_equal(np.asarray(back), internal)
    on_disk = from_internal(internal, convention)
    assert np.array_equal(to_internal(on_disk, convention), internal)
