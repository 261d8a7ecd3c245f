"""What a hospital is promised: nothing the server sends runs code at the site, patient-derived files
are owner-only, and a site that cannot start is named without its message leaving it."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
import torch

from fedseg.lightning_modules.safe_load import CheckpointError, UnsafeCheckpointError, load_checkpoint


class _RunsCode:
    """A pickle that touches ``path`` when it is loaded: what a malicious checkpoint would do."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def _malicious(tmp_path: Path, name: str, wrap) -> tuple[Path, Path]:
    sentinel = tmp_path / f"{name}.ran"
    path = tmp_path / name
    torch.save(wrap(_RunsCode(sentinel)), path)
    return path, sentinel


def test_every_loader_refuses_a_checkpoint_whose_pickle_would_run_code(tmp_path):
    """Each loader that reads a file another party wrote: the refusal names the file, and the code never ran."""
    from fedseg.app.fedper import personalize
    from fedseg.app.personal_store import PersonalModelStore
    from fedseg.app.resilient_fedopt import read_optimizer_state
    from fedseg.lightning_modules.inference import InferenceError, load_model
    from fedseg.lightning_modules.module import SegmentationModule
    from fedseg.run.results import global_checkpoint
    from fedseg.jobs.resume import ResumeError, find_resume_point

    module = SegmentationModule(features=4, roi_size=(16, 16, 16), hd95=False)
    good_encoder = tmp_path / "encoder.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, good_encoder)

    loaders = {
        "load_checkpoint": (lambda p: load_checkpoint(p), UnsafeCheckpointError),
        "global model -> Lightning checkpoint (fedseg.run.results)":
            (lambda p: global_checkpoint(p, {}, tmp_path / "out.ckpt"), UnsafeCheckpointError),
        "resume point (fedseg.jobs.resume)": (lambda p: find_resume_point(p), ResumeError),
        "personal model store": (lambda p: PersonalModelStore(p.parent, p.stem).record(), UnsafeCheckpointError),
        "personalize: the encoder": (lambda p: personalize(p, p, tmp_path / "x.ckpt"), UnsafeCheckpointError),
        "personalize: the head": (lambda p: personalize(good_encoder, p, tmp_path / "y.ckpt"), UnsafeCheckpointError),
        "FedOpt optimizer state": (lambda p: read_optimizer_state(p), UnsafeCheckpointError),
        "fedseg predict / evaluate (Lightning)": (lambda p: load_model(p), InferenceError),
    }
    for i, (name, (load, error)) in enumerate(loaders.items()):
        path, sentinel = _malicious(tmp_path, f"evil{i}.pt", lambda payload: {"model": {"w": payload}, "state": {},
                                                                             "record": {}, "round": 0})
        with pytest.raises(error) as caught:
            load(path)
        assert str(path) in str(caught.value), name
        assert not sentinel.exists(), f"{name}: the pickle's code ran"
    if _tenseal():
        from fedseg.app.he import decrypt_global_model

        path, sentinel = _malicious(tmp_path, "evil_he.pt", lambda payload: {"model": {"w": payload}})
        with pytest.raises(UnsafeCheckpointError):
            decrypt_global_model(path, tmp_path, {})
        assert not sentinel.exists()
    # a file that is no checkpoint at all is named as such, not as unsafe
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint") as caught:
        load_checkpoint(junk)
    assert not isinstance(caught.value, UnsafeCheckpointError)


def _tenseal() -> bool:
    try:
        import tenseal  # noqa: F401
    except ImportError:
        return False
    return True


def test_personal_model_store_and_preprocessed_cache_are_owner_only(tmp_path, tiny):
    from conftest import tiny_synth
    from fedseg.app.personal_store import PersonalModelStore
    from fedseg.lightning_modules.data.datalist import read_datalist
    from fedseg.lightning_modules.module import SegmentationModule
    from fedseg.lightning_modules.training import build_datamodule

    module = SegmentationModule(features=4, roi_size=(16, 16, 16), hd95=False)
    store = PersonalModelStore(tmp_path / "heads" / "site-1", "study")
    store.save(module, ["network.net.model.2.conv.weight"], global_round=0)
    for folder in (tmp_path / "heads", tmp_path / "heads" / "site-1"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600

    synth = tiny_synth(tmp_path / "synth", sites=1, cases=2)
    cache = tmp_path / "scratch" / "cache"
    data = build_datamodule(tiny, read_datalist(synth.datalists["site-1"]), cache)
    data.setup("fit")
    next(iter(data.train_dataloader()))  # writes the training case's cache entry
    entries = list(cache.rglob("*.pt"))
    assert entries
    for path in [tmp_path / "scratch", cache, *entries]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o700 if path.is_dir() else 0o600), (path, oct(mode))


def test_data_check_asks_only_for_the_modalities_the_job_uses(tmp_path):
    from conftest import tiny_synth
    from fedseg.lightning_modules.data.check import check_dataset

    synth = tiny_synth(tmp_path / "synth", sites=1, cases=2)
    datalist = synth.datalists["site-1"]
    doc = json.loads(datalist.read_text())
    for entry in doc["training"] + doc["validation"]:  # a site without T1
        keep = [i for i, m in enumerate(entry["modalities"]) if m != "t1"]
        entry["image"] = [entry["image"][i] for i in keep]
        entry["modalities"] = [entry["modalities"][i] for i in keep]
    no_t1 = tmp_path / "no_t1.json"
    no_t1.write_text(json.dumps({**doc, "data_root": str(synth.data_root)}))
    assert not check_dataset(no_t1).ok  # every modality, by default
    assert "missing_modality" in {p.kind for p in check_dataset(no_t1).problems}
    assert check_dataset(no_t1, modalities=("t1ce", "t2", "flair")).ok


def test_a_site_that_cannot_start_is_named_with_its_error_class_only():
    from fedseg.app.protocol import SITE_FAILURE_KEY, SITE_STAGE_KEY, describe_failure, failure_answer
    from fedseg.lightning_modules.data.check import DatasetCheckError

    class _Report:
        ok = False

        def format(self) -> str:
            return "/data/hospital-b/BraTS2021_00006_t1.nii.gz: truncated"

    answer = failure_answer(DatasetCheckError(_Report()), evaluate=False, stage="startup")
    assert answer.params == {} and answer.meta[SITE_FAILURE_KEY] == "DatasetCheckError"
    assert answer.meta[SITE_STAGE_KEY] == "startup"
    assert "BraTS" not in json.dumps(answer.meta) and "/data" not in json.dumps(answer.meta)
    assert describe_failure("hospital-b", "DatasetCheckError", "startup") == (
        "hospital-b refused its data (DatasetCheckError); see that site's log")
    assert describe_failure("hospital-b", "SiteConfigError", "startup").startswith("hospital-b refused its data")
    assert describe_failure("hospital-b", "ImportError", "startup") == (
        "hospital-b could not start (ImportError); see that site's log")
    assert describe_failure("hospital-b", "FaultDrillError") == "hospital-b failed (FaultDrillError)"
