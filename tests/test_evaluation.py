"""fedseg evaluate: per-case/per-region tables, summary and plots that agree with training's validation."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl

from fedseg.cli import main
from fedseg.lightning_modules.data.datalist import read_datalist, write_datalist
from fedseg.lightning_modules.data.datamodule import DataConfig, SegDataModule
from fedseg.lightning_modules.data.synth import SynthConfig, generate
from fedseg.lightning_modules.evaluation import EvaluationError, evaluate_checkpoint, summarize
from fedseg.lightning_modules.module import SegmentationModule
from conftest import TEST_DATA, tiny_train_config
from fedseg.lightning_modules.training import train

METRIC_COLUMNS = ["dice", "iou", "precision", "recall", "vs", "hd95"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Synthetic sites and a 2-epoch tiny UNet trained on them (~3 s)."""
    root = tmp_path_factory.mktemp("trained")
    synth = generate(SynthConfig(**TEST_DATA, n_sites=2, cases_per_site=3, shape=(32, 32, 32)), root / "synth")
    cfg = tiny_train_config([synth.datalists["site-1"], synth.datalists["site-2"]], root / "run", features=8,
                            roi=(32, 32, 32))
    train(cfg)
    return synth, root / "run" / "checkpoints" / "best.ckpt"


@pytest.fixture(scope="module")
def evaluated(trained, tmp_path_factory):
    """``fedseg evaluate`` on all cases of site-1, through the command line."""
    synth, ckpt = trained
    out = tmp_path_factory.mktemp("eval") / "site-1"
    argv = ["evaluate", str(ckpt), str(synth.datalists["site-1"]), "--out", str(out), "--split", "all"]
    argv += ["--device", "cpu"]
    assert main(argv) == 0
    return synth, ckpt, out


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open() as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def test_writes_per_case_rows_for_every_case_and_region(evaluated):
    synth, _, out = evaluated
    case_ids = [c.case_id for c in read_datalist(synth.datalists["site-1"]).cases]
    columns, rows = read_csv(out / "per_case.csv")
    assert columns == ["case_id", "region", *METRIC_COLUMNS]
    assert [(r["case_id"], r["region"]) for r in rows] == [
        (c, region) for c in case_ids for region in ("ET", "TC", "WT", "overall")
    ]
    as_json = json.loads((out / "per_case.json").read_text())
    assert len(as_json) == len(rows) == 4 * len(case_ids)
    for row, doc in zip(rows, as_json):
        assert doc["case_id"] == row["case_id"] and doc["region"] == row["region"]
        for m in METRIC_COLUMNS:
            assert doc[m] == pytest.approx(float(row[m]), rel=1e-8)
            if m == "hd95":
                assert 0.0 <= doc[m] < 100.0  # mm, inside a 32 mm cube (or both regions empty: 0)
            else:
                assert 0.0 <= doc[m] <= 1.0
        if doc["region"] != "overall":  # per region, Dice = 2 IoU / (1 + IoU)
            assert doc["dice"] == pytest.approx(2 * doc["iou"] / (1 + doc["iou"]), abs=1e-9)
    # "overall" is the mean of the three regions of the case
    for i in range(0, len(as_json), 4):
        et, tc, wt, overall = as_json[i : i + 4]
        for m in METRIC_COLUMNS:
            assert overall[m] == pytest.approx((et[m] + tc[m] + wt[m]) / 3)


def test_summary_matches_the_table(evaluated):
    _, ckpt, out = evaluated
    summary = json.loads((out / "summary.json").read_text())
    rows = json.loads((out / "per_case.json").read_text())
    assert summary["n_cases"] == 3 and summary["split"] == "all"
    assert summary["checkpoint"] == str(ckpt.resolve()) and summary["metrics"] == METRIC_COLUMNS
    for region in ("ET", "TC", "WT", "overall"):
        region_rows = [r for r in rows if r["region"] == region]
        for m in METRIC_COLUMNS:
            values = np.array([r[m] for r in region_rows])
            stats = summary["regions"][region][m]
            assert stats["mean"] == pytest.approx(values.mean())
            assert stats["median"] == pytest.approx(np.median(values))
            worst = values.max() if m == "hd95" else values.min()
            assert stats["worst"] == pytest.approx(worst)
            assert next(r for r in region_rows if r[m] == stats["worst"])["case_id"] == stats["worst_case"]


def test_box_plots_are_written(evaluated):
    _, _, out = evaluated
    for region in ("et", "tc", "wt", "overall"):
        png = out / f"boxplot_{region}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_scores_equal_training_validation(trained, evaluated):
    """evaluate and Lightning's validation loop run the same pipeline: the same mean scores."""
    synth, ckpt, out = evaluated
    module = SegmentationModule.load_from_checkpoint(ckpt, map_location="cpu")
    site = read_datalist(synth.datalists["site-1"])
    site.validation = site.cases  # validate on all three cases, as evaluated with --split all
    data = SegDataModule(site, DataConfig(preprocess=module.hparams.preprocess, num_workers=0, use_cache=False))
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    logged = trainer.validate(module, datamodule=data, verbose=False)[0]
    summary = json.loads((out / "summary.json").read_text())["regions"]
    assert summary["overall"]["dice"]["mean"] == pytest.approx(logged["val_dice"], abs=1e-6)
    for region in ("ET", "TC", "WT"):
        for m in ("dice", "iou", "precision", "recall", "vs"):
            assert summary[region][m]["mean"] == pytest.approx(logged[f"val_{m}_{region.lower()}"], abs=1e-6)


def test_prints_a_summary_table(trained, tmp_path, capsys):
    synth, ckpt = trained
    argv = ["evaluate", str(ckpt), str(synth.datalists["site-2"]), "--out", str(tmp_path / "e")]
    assert main(argv) == 0
    captured = capsys.readouterr()
    n_val = len(read_datalist(synth.datalists["site-2"]).validation)
    assert captured.err.count("dice ET") == n_val and f"[{n_val}/{n_val}]" in captured.err
    lines = captured.out.splitlines()
    assert lines[0].split() == ["region", "metric", "mean", "median", "worst", "worst", "case"]
    assert sum(line.startswith("overall") for line in lines) == len(METRIC_COLUMNS)


def test_default_output_folder_is_in_the_run(trained):
    synth, ckpt = trained
    assert main(["evaluate", str(ckpt), str(synth.datalists["site-1"])]) == 0
    out = ckpt.parent.parent / "evaluation" / "site-1-validation"
    assert (out / "summary.json").is_file() and (out / "per_case.csv").is_file()


def test_refusals(trained, tmp_path, capsys):
    synth, ckpt = trained
    site = read_datalist(synth.datalists["site-1"])
    with pytest.raises(EvaluationError, match="inside the input folder"):
        evaluate_checkpoint(ckpt, synth.datalists["site-1"], out=site.data_root / "eval")
    assert not (site.data_root / "eval").exists()
    with pytest.raises(EvaluationError, match="unknown split 'test'"):
        evaluate_checkpoint(ckpt, synth.datalists["site-1"], out=tmp_path / "e", split="test")

    unlabelled = tmp_path / "unlabelled.json"
    case = site.validation[0]
    site.validation = [type(case)(case.case_id, case.images, case.modalities, None, case.convention)]
    write_datalist(unlabelled, site)
    assert main(["evaluate", str(ckpt), str(unlabelled), "--out", str(tmp_path / "e")]) == 2
    assert f"have no label to score against: ['{case.case_id}']" in capsys.readouterr().err

    site.validation = []
    write_datalist(tmp_path / "empty.json", site)
    assert main(["evaluate", str(ckpt), str(tmp_path / "empty.json"), "--out", str(tmp_path / "e")]) == 2
    assert "no validation cases to evaluate" in capsys.readouterr().err


def test_summarize_picks_the_worst_case_per_metric_direction():
    rows = [
        {"case_id": c, "region": r, "dice": d, "hd95": h}
        for c, d, h in (("a", 0.9, 3.0), ("b", 0.2, 1.0), ("c", 0.5, 9.0))
        for r in ("ET", "TC", "WT", "overall")
    ]
    stats = summarize(rows, ["dice", "hd95"])["TC"]
    assert (stats["dice"]["worst"], stats["dice"]["worst_case"]) == (0.2, "b")
    assert (stats["hd95"]["worst"], stats["hd95"]["worst_case"]) == (9.0, "c")
    assert stats["dice"]["median"] == 0.5 and stats["hd95"]["mean"] == pytest.approx(13 / 3)


def test_cli_choices_match_the_library():
    from fedseg.cli import evaluate
    from fedseg.lightning_modules.evaluation import SPLITS

    assert evaluate.SPLIT_CHOICES == SPLITS
