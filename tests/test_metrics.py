"""Region metrics: hand-computed volumes, HD95 geometry in mm, empty conventions, torchmetrics
behaviour, and the sample masks of the official BraTS evaluation package."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.metrics import compute_hausdorff_distance

from fedseg.lightning_modules.metrics import (
    BRATS_EMPTY_HD95,
    METRICS,
    RegionMetrics,
    metric_names,
    region_scores,
)

SHAPE = (16, 16, 16)

#: (prediction, reference) file names of the official sample data, paired by case id
FIXTURE_PAIRS = {
    "00132-000": ("00132-000.nii.gz", "BraTS-MET-00132-000-seg.nii.gz"),
    "00217-000": ("SEG-00217-000.nii.gz", "BraTS-MET-00217-000-seg.nii.gz"),
    "00630-001": ("BraTS-MET-00630-001.nii.gz", "BraTS-MET-00630-001-seg.nii.gz"),
    "01325-000": ("BraTS-MET_01325-000.nii.gz", "BraTS-MET-01325-000-seg.nii.gz"),
}
#: ``global_bin_dsc`` (full-volume Dice) of ET, TC, WT in the official package's own output for
#: these masks (BraTS/BraTS_evaluation, example/sample_mets_metrics.json, panoptica-based).
OFFICIAL_DICE = {
    "00132-000": (0.6840802390098165, 0.6887811516543336, 0.7564775269473256),
    "00217-000": (0.7913234934355378, 0.896434730979106, 0.8260158633312996),
    "00630-001": (0.9147945524385985, 0.9266599484940097, 0.9275450621985275),
    "01325-000": (0.9721611721611721, 0.9751643535427319, 0.9854805103820593),
}


def _masks(batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (batch, 3, *SHAPE)
    return torch.zeros(shape, dtype=torch.bool), torch.zeros(shape, dtype=torch.bool)


def _scores(pred, ref, spacing=None, **kw) -> dict[str, float]:
    metric = RegionMetrics(**kw)
    metric.update(pred, ref, spacing)
    return {k: float(v) for k, v in metric.compute().items()}


def test_overlap_scores_match_hand_counts():
    pred, ref = _masks()
    pred[0, 0, 2, 2, 1:5] = True  # ET: |P| = 4
    ref[0, 0, 2, 2, 2:8] = True  # ET: |R| = 6, |P∩R| = 3
    pred[0, 1] = pred[0, 0]
    pred[0, 1, 2, 2, 10:12] = True  # TC: |P| = 6
    ref[0, 1] = ref[0, 0]  # TC: |R| = 6, |P∩R| = 3
    pred[0, 2] = pred[0, 1]
    pred[0, 2, 5, 5, 5:9] = True  # WT: |P| = 10
    ref[0, 2] = ref[0, 1]
    ref[0, 2, 5, 5, 5:10] = True  # WT: |R| = 11, |P∩R| = 7
    s = _scores(pred, ref, metrics=("dice", "iou", "precision", "recall", "vs"))
    expected = {
        "dice": (6 / 10, 6 / 12, 14 / 21),
        "iou": (3 / 7, 3 / 9, 7 / 14),
        "precision": (3 / 4, 3 / 6, 7 / 10),
        "recall": (3 / 6, 3 / 6, 7 / 11),
        "vs": (1 - 2 / 10, 1.0, 1 - 1 / 21),
    }
    for name, (et, tc, wt) in expected.items():
        assert s[f"{name}_et"] == pytest.approx(et)
        assert s[f"{name}_tc"] == pytest.approx(tc)
        assert s[f"{name}_wt"] == pytest.approx(wt)
        assert s[name] == pytest.approx((et + tc + wt) / 3)
    assert list(s) == metric_names(("dice", "iou", "precision", "recall", "vs"))


def test_hd95_is_in_mm_with_anisotropic_per_case_spacing():
    pred, ref = _masks(batch=2)
    pred[:, 0, 2], ref[:, 0, 5] = True, True  # planes 3 voxels apart along axis 0
    pred[:, 1, :, :, 3], ref[:, 1, :, :, 7] = True, True  # 4 voxels apart along axis 2
    pred[:, 2, :, 1], ref[:, 2, :, 2] = True, True  # 1 voxel apart along axis 1
    spacing = torch.tensor([[0.8, 1.0, 2.5], [2.0, 1.0, 1.0]])
    rows = RegionMetrics(metrics=("hd95",))
    rows.update(pred, ref, spacing)
    first, second = rows.per_case()
    names = ("hd95_et", "hd95_tc", "hd95_wt")
    assert [first[n] for n in names] == pytest.approx([2.4, 10.0, 1.0])
    assert [second[n] for n in names] == pytest.approx([6.0, 4.0, 1.0])
    assert first["hd95"] == pytest.approx((2.4 + 10.0 + 1.0) / 3)
    # one 3-tuple applies to every case of the batch
    same = region_scores(pred, ref, (0.8, 1.0, 2.5), metrics=("hd95",))
    assert same[:, 0].flatten().tolist() == pytest.approx([2.4, 10.0, 1.0] * 2)


def test_hd95_is_the_95th_percentile_not_the_maximum():
    pred, ref = _masks()
    ref[0, :, 2] = True  # a 16x16 plane: 256 edge voxels
    pred[0, :, 2] = True
    pred[0, :, 12, 0, 0] = True  # one outlier voxel 10 voxels away
    spacing = (0.8, 1.0, 1.0)
    assert _scores(pred, ref, spacing, metrics=("hd95",))["hd95_et"] == pytest.approx(0.0)
    full_hd = compute_hausdorff_distance(
        pred[:, :1], ref[:, :1], include_background=True, spacing=spacing
    )
    assert float(full_hd) == pytest.approx(8.0)  # the outlier counts for the maximum only


def test_empty_region_conventions():
    pred, ref = _masks(batch=3)
    # case 0: both empty everywhere; case 1: prediction empty; case 2: reference empty
    ref[1, :, 4:6, 4:6, 4:6] = True
    pred[2, :, 4:6, 4:6, 4:6] = True
    metric = RegionMetrics()
    metric.update(pred, ref)
    both, missed, hallucinated = metric.per_case()
    for name in ("dice", "iou", "precision", "recall", "vs"):
        assert both[name] == 1.0
        assert missed[name] == 0.0 and hallucinated[name] == 0.0
    assert both["hd95"] == 0.0
    assert missed["hd95_et"] == hallucinated["hd95_wt"] == BRATS_EMPTY_HD95
    assert np.sqrt(240**2 + 240**2 + 155**2) == pytest.approx(BRATS_EMPTY_HD95)  # BraTS diagonal
    brats2023 = RegionMetrics(metrics=("hd95",), empty_hd95=374.0)
    brats2023.update(pred, ref)
    assert [row["hd95"] for row in brats2023.per_case()] == [0.0, 374.0, 374.0]


def test_metric_accumulates_over_updates_and_resets():
    pred, ref = _masks(batch=2)
    pred[0, :, 2:6, 2:6, 2:6], ref[0, :, 2:6, 2:6, 3:7] = True, True  # Dice 0.75 in every region
    pred[1, :, 1:3, 1:3, 1:3], ref[1, :, 1:3, 1:3, 1:3] = True, True  # Dice 1
    metric = RegionMetrics(metrics=("dice", "hd95"))
    batch_scores = metric(pred, ref)  # forward: scores of this batch, and accumulates
    assert float(batch_scores["dice"]) == pytest.approx((0.75 + 1.0) / 2)
    # a second update with 0/1 floats: one case whose ET is missed
    pred3, ref3 = _masks()
    ref3[0, :, 8:10, 8:10, 8:10] = True
    pred3[0, 1:, 8:10, 8:10, 8:10] = True
    metric.update(pred3.float(), ref3.float(), spacing=(1.0, 1.0, 1.0))
    rows = metric.per_case()
    assert [round(r["dice_et"], 6) for r in rows] == [0.75, 1.0, 0.0]
    result = metric.compute()
    assert list(result) == metric_names(("dice", "hd95"))
    assert float(result["dice_et"]) == pytest.approx((0.75 + 1.0 + 0.0) / 3)
    assert float(result["dice_tc"]) == pytest.approx((0.75 + 1.0 + 1.0) / 3)
    regions = [float(result[f"dice_{r}"]) for r in ("et", "tc", "wt")]
    assert float(result["dice"]) == pytest.approx(np.mean(regions))
    assert float(result["hd95_et"]) == pytest.approx((1.0 + 0.0 + BRATS_EMPTY_HD95) / 3)
    metric.reset()
    assert metric.per_case() == []
    assert torch.isnan(metric.compute()["dice"])
    metric.update(pred[1:], ref[1:])
    assert float(metric.compute()["dice"]) == 1.0


def test_bad_inputs_are_refused_clearly():
    pred, ref = _masks()
    with pytest.raises(ValueError, match="threshold"):
        region_scores(torch.full((1, 3, *SHAPE), 0.7), ref)
    with pytest.raises(ValueError, match="shapes differ"):
        region_scores(pred[..., :8], ref)
    with pytest.raises(ValueError, match=r"\(B, 3, \*spatial\)"):
        region_scores(pred[:, :2], ref[:, :2])
    with pytest.raises(ValueError, match="spacing"):
        region_scores(pred, ref, (1.0, 1.0))
    with pytest.raises(ValueError, match="unknown metrics"):
        RegionMetrics(metrics=("dice", "hd100"))
    assert tuple(RegionMetrics().metrics) == METRICS


def _fixture_regions(path) -> tuple[np.ndarray, tuple[float, ...]]:
    """ET/TC/WT straight from the raw BraTS 2023 values (3 enhancing, 1 core, 2 oedema)."""
    image = nib.load(path)
    a = np.asanyarray(image.dataobj)
    regions = np.stack([a == 3, (a == 1) | (a == 3), (a == 1) | (a == 2) | (a == 3)])
    return regions, tuple(float(z) for z in image.header.get_zooms()[:3])


def test_official_sample_masks(real_data):
    folder = real_data / "metric_fixtures_brats_eval"
    for case, (pred_name, ref_name) in FIXTURE_PAIRS.items():
        pred, _ = _fixture_regions(folder / "pred" / pred_name)
        ref, spacing = _fixture_regions(folder / "ref" / ref_name)
        metric = RegionMetrics(metrics=("dice", "iou", "hd95"))
        metric.update(torch.from_numpy(pred[None]), torch.from_numpy(ref[None]), spacing=[spacing])
        (row,) = metric.per_case()
        inter = (pred & ref).sum(axis=(1, 2, 3))
        total = pred.sum(axis=(1, 2, 3)) + ref.sum(axis=(1, 2, 3))
        hd95 = compute_hausdorff_distance(
            pred[None], ref[None], include_background=True, percentile=95, spacing=spacing
        )[0]
        for c, region in enumerate(("et", "tc", "wt")):
            assert row[f"dice_{region}"] == pytest.approx(2 * inter[c] / total[c], abs=1e-4), case
            iou = inter[c] / (total[c] - inter[c])
            assert row[f"iou_{region}"] == pytest.approx(iou, abs=1e-4), case
            assert row[f"dice_{region}"] == pytest.approx(OFFICIAL_DICE[case][c], abs=1e-9), case
            assert row[f"hd95_{region}"] == pytest.approx(float(hd95[c]), abs=1e-3), case
    # scored in mm: case 01325 has 0.5 mm in-plane voxels, its TC HD95 is 1 voxel = 0.5 mm
    assert row["hd95_tc"] == pytest.approx(0.5, abs=1e-3)
