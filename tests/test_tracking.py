"""W&B tracking: federated runs (server-side receiver) and centralized runs (Lightning's
WandbLogger) write offline runs with the same metric names, and nothing private reaches W&B."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest

from conftest import LEARNING, tiny_job
from fedseg.jobs.addons import Addons
from fedseg.jobs.base import export
from fedseg.lightning_modules.data.datalist import read_datalist
from fedseg.lightning_modules.tracking import SHARED_CONFIG_KEYS, sanitize_config

PER_REGION = {f"val_{m}_{r}" for m in ("dice", "iou", "hd95") for r in ("et", "tc", "wt")}
ROUND_METRICS = {"train_loss", "val_loss", "val_dice", "val_iou", "val_hd95"} | PER_REGION


def read_wandb_run(path: Path) -> list:
    """Records of an offline run file (``run-*.wandb``).

    wandb 0.31 ships no Python reader for its transaction log (the old ``datastore`` module is
    gone with the Go core); the file is a LevelDB-log framed stream of ``Record`` protos: a 7-byte
    ``:W&B`` header, then 32 KiB blocks of chunks (crc32c, little-endian length, type).
    """
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B run file"
    records, pos, buf = [], 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # block trailer padding
            pos += 32768 - pos % 32768
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            break
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            records.append(record)
            buf = b""
    return records


def run_summary(run_file: Path) -> dict:
    """``{"name", "group", "job_type", "config", "history": [{metric: value}]}`` of a run file."""
    out: dict = {"history": []}
    for r in read_wandb_run(run_file):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out.update(name=r.run.display_name, group=r.run.run_group, job_type=r.run.job_type)
            out["config"] = {u.key: json.loads(u.value_json) for u in r.run.config.update if u.key != "_wandb"}
        elif kind == "history":
            out["history"].append({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item})
    return out


def metric_names(summary: dict) -> set[str]:
    return {k for row in summary["history"] for k in row if not k.startswith("_")}


def assert_nothing_private(wandb_dir: Path, datalists: dict[str, Path], data_root: Path) -> None:
    """Every byte under ``wandb_dir``: no case id, no data/datalist/site-config path, no image."""
    case_ids, images = set(), set()
    for path in datalists.values():
        for case in read_datalist(path).cases:
            case_ids.add(case.case_id)
            images.update(case.images + ((case.label,) if case.label else ()))
    needles = {*case_ids, *(Path(p).name for p in images), str(data_root), *map(str, datalists.values()), "site_configs", ".nii"}
    files = [p for p in wandb_dir.rglob("*") if p.is_file()]
    assert files
    for path in files:
        assert path.suffix.lower() not in {".png", ".jpg", ".jpeg", ".gif", ".npz", ".nii", ".gz"}, path
        text = path.read_bytes().decode("latin-1")
        found = [n for n in needles if n in text]
        assert not found, f"{path} contains {found}"
    # what `wandb sync` uploads (the run file; no files/ folder: metadata, code, console are off)
    # carries no path at all; only the local debug logs name their own folder
    for run_file in wandb_dir.glob("offline-run-*/run-*.wandb"):
        assert str(wandb_dir.parent) not in run_file.read_bytes().decode("latin-1")
        assert not (run_file.parent / "files" / "wandb-metadata.json").exists()
    assert not list(wandb_dir.rglob("media"))


def test_sanitize_config_drops_everything_path_like():
    config = {
        "lr": 1e-3,
        "modalities": ("t1", "flair"),
        "datalists": ["a.json"],
        "out": "runs/x",
        "cache_dir": None,
        "nested": {"data_root": "/data", "norm": "instance", "ckpt": "best.ckpt", "site": "/srv/site-1/data"},
        "study": "glioma",
        "extra": ["--x", "/tmp/secret", Path("rel")],
    }
    assert sanitize_config(config) == {
        "lr": 1e-3, "modalities": ["t1", "flair"], "nested": {"norm": "instance"}, "study": "glioma", "extra": ["--x"],
    }


def test_exported_wandb_job_has_the_receiver_and_no_credentials(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)  # present on this machine: must not reach the job
    folder = export(tiny_job(name="tracked", roi=(32, 32, 32), features=8, addons=Addons(wandb="online")), tmp_path)
    server = json.loads((folder / "app" / "config" / "config_fed_server.json").read_text())
    receiver = {c["id"]: c for c in server["components"]}["fedseg_wandb_receiver"]
    assert receiver["path"] == "fedseg.app.wandb_receiver.FedsegWandBReceiver"
    assert receiver["args"]["mode"] == "online" and receiver["args"]["run_name"] == "tracked"
    assert {*SHARED_CONFIG_KEYS, "rounds", "algorithm"} <= set(receiver["args"]["run_config"])
    text = "".join(p.read_text() for p in folder.rglob("*.json"))
    assert "x" * 40 not in text and "WANDB_API_KEY" not in text and str(tmp_path) not in text
    with pytest.raises(ValueError, match="unknown W&B mode"):
        Addons(wandb="cloud")


@pytest.fixture(scope="module")
def federated_run(fedavg_run):
    """The shared FedAvg job's run folder (``conftest.fedavg_run``: W&B offline on the server)."""
    return fedavg_run[2]


@pytest.fixture(scope="module")
def synth(fedavg_run):
    return fedavg_run[1]


@pytest.mark.e2e
@pytest.mark.slow
def test_simulator_writes_one_offline_wandb_run_per_site_with_round_metrics(federated_run, synth):
    runs = sorted((federated_run / "wandb").glob("offline-run-*/run-*.wandb"))
    summaries = {s["config"]["client"]: s for s in map(run_summary, runs)}
    assert set(summaries) == {"site-1", "site-2"} and len(runs) == 2
    groups = {s["group"] for s in summaries.values()}
    assert len(groups) == 1 and groups.pop().startswith("fedavg-")  # grouped by job
    for site, s in summaries.items():
        assert s["name"].startswith(f"{site}-") and s["job_type"] == "federated"
        assert s["config"]["rounds"] == 2 and s["config"]["roi"] == [32, 32, 32]
        assert set(SHARED_CONFIG_KEYS) <= set(s["config"])
        assert ROUND_METRICS <= metric_names(s), ROUND_METRICS - metric_names(s)
        dice = [row["val_dice"] for row in s["history"] if "val_dice" in row]
        # a validation per local epoch (2 rounds of LEARNING's epochs); the run learns (test_jobs.py)
        assert len(dice) == 2 * LEARNING["local_epochs"] and all(0.0 <= d <= 1.0 for d in dice)
        cases = [row["n_train_cases"] for row in s["history"] if "n_train_cases" in row]
        assert cases and set(cases) == {2.0}  # 3 synthetic cases per site: 2 training, 1 validation
    assert_nothing_private(federated_run / "wandb", synth.datalists, synth.data_root)
    # the scan does find a case id where there is one
    planted = federated_run / "planted" / "wandb"
    planted.mkdir(parents=True)
    (planted / "debug.log").write_text(f"loading {read_datalist(synth.datalists['site-1']).cases[0].case_id}")
    with pytest.raises(AssertionError, match="contains"):
        assert_nothing_private(planted, synth.datalists, synth.data_root)


@pytest.mark.e2e
@pytest.mark.slow
def test_centralized_run_logs_the_same_metric_names_offline(federated_run, synth, tmp_path, monkeypatch):
    from conftest import tiny_train_config
    from fedseg.lightning_modules.training import train

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    with pytest.raises(ValueError, match="WANDB_API_KEY"):
        train(tiny_train_config(synth.datalists.values(), tmp_path / "online", epochs=1, wandb="online",
                                features=8, roi=(32, 32, 32)))
    out = tmp_path / "central"
    cfg = tiny_train_config(synth.datalists.values(), out, epochs=2, wandb="offline", features=8, roi=(32, 32, 32),
                            hd95=True)
    train(cfg)
    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    central = run_summary(run_file)
    federated = run_summary(next((federated_run / "wandb").glob("offline-run-*/run-*.wandb")))
    fed_names, central_names = metric_names(federated), metric_names(central)
    assert ROUND_METRICS | {"n_train_cases"} <= central_names
    assert {n for n in fed_names if n.startswith(("val_", "train_", "n_"))} == {
        n for n in central_names if n.startswith(("val_", "train_", "n_"))
    }
    assert central["config"]["kind"] == "centralized" and central["config"]["epochs"] == 2
    assert set(SHARED_CONFIG_KEYS) <= set(central["config"]) and set(SHARED_CONFIG_KEYS) <= set(federated["config"])
    assert {k: central["config"][k] for k in ("network", "features", "roi", "modalities")} == {
        k: federated["config"][k] for k in ("network", "features", "roi", "modalities")
    }
    assert_nothing_private(out / "wandb", synth.datalists, synth.data_root)
