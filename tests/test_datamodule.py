"""SegDataModule: loaders, batch contents and the on-disk preprocessing cache (tiny NIfTI cases)."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor, PersistentDataset

from fedseg.lightning_modules.data.datalist import Datalist, write_datalist
from fedseg.lightning_modules.data.datamodule import DataConfig, SegDataModule, default_cache_dir
from fedseg.lightning_modules.data.transforms import PreprocessConfig
from test_transforms import BRAIN, SPACING, expected_region_counts, internal_label, save, to_file_values, write_case

ROI = (16, 16, 16)


@pytest.fixture()
def site(tmp_path) -> Datalist:
    """Three training cases (two conventions) and one validation case under tmp_path/data."""
    root = tmp_path / "data"
    training = [write_case(root, "T1"), write_case(root, "T2", "brats2023"), write_case(root, "T3", "msd", four_d=True)]
    return Datalist(training, [write_case(root, "V1", "brats2023")], root, {"site": "site-1"})


def config(tmp_path: Path, **preprocess) -> DataConfig:
    return DataConfig(
        preprocess=PreprocessConfig(**{"roi_size": ROI, **preprocess}),
        batch_size=2,
        samples_per_volume=2,
        num_workers=0,
        cache_dir=tmp_path / "cache",
    )


def cache_files(dm: SegDataModule) -> set[str]:
    return {p.name for p in dm.cache_dir.glob("*.pt")}


def run_epoch(dm: SegDataModule) -> list[dict]:
    return [*dm.train_dataloader(), *dm.val_dataloader()]


def test_batches_have_the_documented_shapes(tmp_path, site):
    dm = SegDataModule(site, config(tmp_path))
    dm.setup("fit")
    assert dm.n_train_cases == 3 and dm.n_val_cases == 1
    train = list(dm.train_dataloader())
    # 3 cases, batch_size 2 -> batches of 2 and 1 cases, each case giving 2 crops
    assert sorted(b["image"].shape[0] for b in train) == [2, 4]
    for b in train:
        n = b["image"].shape[0]
        assert tuple(b["image"].shape) == (n, 4, *ROI) and tuple(b["label"].shape) == (n, 3, *ROI)
        assert b["label"].dtype == torch.float32 and tuple(b["spacing"].shape) == (n, 3)
        assert len(b["case_id"]) == n
    assert sorted({c for b in train for c in b["case_id"]}) == ["T1", "T2", "T3"]

    (val,) = list(dm.val_dataloader())
    assert val["case_id"] == ["V1"] and val["convention"] == ["brats2023"]
    assert val["image"].shape[:2] == (1, 4) and all(s % 16 == 0 for s in val["image"].shape[2:])
    assert val["label"][0].sum(dim=(1, 2, 3)).tolist() == expected_region_counts(internal_label())
    assert val["spacing"][0].tolist() == pytest.approx(SPACING)


def test_datalist_file_and_root_override(tmp_path, site):
    path = write_datalist(tmp_path / "lists" / "site-1.json", site)
    moved = tmp_path / "moved"
    (tmp_path / "data").rename(moved)
    dm = SegDataModule(path, config(tmp_path), data_root=moved)
    (val,) = list(dm.val_dataloader())
    assert val["case_id"] == ["V1"] and dm.n_train_cases == 3
    assert dm.datalist.data_root == moved.resolve()


def test_predict_loader_keeps_meta_and_has_no_label(tmp_path, site):
    dm = SegDataModule(site, config(tmp_path, modalities=("t2", "flair")))
    (batch,) = list(dm.predict_dataloader())
    assert "label" not in batch and batch["case_id"] == ["V1"]
    assert isinstance(batch["image"], MetaTensor) and batch["image"].shape[:2] == (1, 2)
    assert batch["image"][0].applied_operations  # what build_inverse needs to map predictions back


def test_second_epoch_reads_the_cache_not_the_sources(tmp_path, site):
    dm = SegDataModule(site, config(tmp_path))
    first = run_epoch(dm)
    files = cache_files(dm)
    assert len(files) == 4  # one entry per case (3 train + 1 val)
    # Garble every source file but keep its size and mtime: only a cache read can still succeed.
    for case in site.cases:
        for path in case.paths(site.data_root):
            st = path.stat()
            path.write_bytes(b"\0" * st.st_size)
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    second = run_epoch(dm)
    assert cache_files(dm) == files
    torch.testing.assert_close(second[-1]["image"], first[-1]["image"])  # validation is deterministic
    assert second[-1]["label"].sum() == first[-1]["label"].sum()


def test_cache_entries_hold_only_the_cropped_volume(tmp_path, site):
    """A cropped view saved as is would drag the whole uncropped volume into the cache file."""
    one = Datalist(site.training[:1], [], site.data_root)
    dm = SegDataModule(one, config(tmp_path, roi_size=(8, 8, 8)))  # smaller than the brain: no pad copy
    list(dm.train_dataloader())
    (entry,) = dm.cache_dir.glob("*.pt")
    voxels = int(np.prod([s.stop - s.start for s in BRAIN]))
    payload = voxels * (4 * 4 + 3 * 1)  # float32 image of 4 channels + uint8 regions
    assert payload < entry.stat().st_size < payload + 8_000


def test_changed_source_or_setting_gives_a_new_cache_entry(tmp_path, site):
    dm = SegDataModule(site, config(tmp_path))
    list(dm.val_dataloader())
    assert len(cache_files(dm)) == 1

    # a source file rewritten (new mtime): the stale entry is not used
    label_path = site.data_root / site.validation[0].label
    lab = internal_label()
    lab[lab == 3] = 1  # no enhancing tumour any more
    save(label_path, to_file_values(lab, "brats2023"))
    st = label_path.stat()
    os.utime(label_path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # coarse-mtime filesystems
    (val,) = list(SegDataModule(site, dm.config).val_dataloader())
    assert len(cache_files(dm)) == 2 and val["label"][0, 0].sum() == 0

    # each setting of the cached part enters the key
    for change in ({"normalization": "minmax"}, {"modalities": ("t1ce", "flair")}, {"crop_foreground": False}):
        before = cache_files(dm)
        list(SegDataModule(site, config(tmp_path, **change)).val_dataloader())
        assert len(cache_files(dm) - before) == 1, change
    # roi_size shapes only training (padding to the crop size); an augmentation setting, being
    # applied after the cache, must not
    base = SegDataModule(site, config(tmp_path))
    list(base.train_dataloader())
    before = cache_files(dm)
    list(SegDataModule(site, config(tmp_path, roi_size=(24, 24, 24))).train_dataloader())
    assert len(cache_files(dm) - before) == 3
    before = cache_files(dm)
    list(SegDataModule(site, config(tmp_path, flip_prob=0.0)).train_dataloader())
    assert cache_files(dm) == before


def test_cache_key_is_stable_across_processes(tmp_path, site):
    """A restarted client (another PYTHONHASHSEED) must find the entries of the previous run."""
    dm = SegDataModule(site, config(tmp_path))
    dm.setup("fit")
    assert isinstance(dm.val_ds, PersistentDataset) and isinstance(dm.train_ds, PersistentDataset)
    code = (  # only the transforms: importing Lightning in a subprocess costs ~10 s on 2 cores
        "from monai.data import PersistentDataset; from monai.data.utils import pickle_hashing;"
        "from fedseg.lightning_modules.data.transforms import PreprocessConfig, build_transforms;"
        f"cfg = PreprocessConfig(roi_size={ROI!r});"
        "print(*(PersistentDataset([], build_transforms(cfg, s, samples_per_volume=2), None,"
        " hash_transform=pickle_hashing).transform_hash for s in ('val', 'train')))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [dm.val_ds.transform_hash, dm.train_ds.transform_hash]
    assert dm.val_ds.transform_hash != dm.train_ds.transform_hash


def test_without_cache_nothing_is_written(tmp_path, site):
    dm = SegDataModule(site, replace(config(tmp_path), use_cache=False))
    assert dm.cache_dir is None
    (val,) = list(dm.val_dataloader())
    assert val["image"].shape[1] == 4 and not (tmp_path / "cache").exists()


def test_cache_dir_inside_source_data_is_refused(tmp_path, site):
    with pytest.raises(ValueError, match="inside the source data"):
        SegDataModule(site, replace(config(tmp_path), cache_dir=site.data_root / "T1" / ".cache"))
    with pytest.raises(ValueError, match="inside the source data"):
        SegDataModule(site, replace(config(tmp_path), cache_dir=site.data_root))


def test_default_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("FEDSEG_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "fedseg" / "preprocessed"
    monkeypatch.setenv("FEDSEG_CACHE_DIR", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"


def test_data_config_from_plain_dict():
    cfg = DataConfig(preprocess={"modalities": ["t1ce", "flair"], "roi_size": [32, 32, 32]}, batch_size=1)
    assert cfg.preprocess.modalities == ("t1ce", "flair") and cfg.preprocess.roi_size == (32, 32, 32)
    with pytest.raises(ValueError, match="batch_size"):
        DataConfig(batch_size=0)


def test_training_case_without_label_is_a_clear_error(tmp_path, site):
    unlabeled = replace(site.training[0], label=None)
    dm = SegDataModule(Datalist([unlabeled], [], site.data_root), config(tmp_path))
    with pytest.raises(ValueError, match="T1: no label"):
        dm.train_dataloader()


def _augmented(dm: SegDataModule) -> list[tuple[list[str], float]]:
    """One pass of a new train loader: each batch's case order and the sum of its augmented crops."""
    return [(list(b["case_id"]), round(float(b["image"].sum()), 3)) for b in dm.train_dataloader()]


def test_each_train_loader_draws_new_augmentations_and_a_run_repeats_them(tmp_path, site):
    """Pins the work-around in ``SegDataModule._loader``: MONAI's DataLoader (num_workers=0) reseeds
    the transforms and resets torch's default generator whenever a loader is made, so without a
    generator per loader a federated site's rounds (a new loader each) repeated one round's
    augmentations. Each loader differs now; the same seed still gives the same run."""
    import pytorch_lightning as pl

    def three_rounds() -> list[list[tuple[list[str], float]]]:
        pl.seed_everything(3, verbose=False)
        dm = SegDataModule(site, config(tmp_path))
        dm.setup("fit")
        return [_augmented(dm) for _ in range(3)]

    rounds = three_rounds()
    # a new round's loader: new crops, flips and intensity shifts (before, the second and every later
    # loader repeated one stream: MONAI drew their seed right after resetting the generator)
    assert rounds[0] != rounds[1] != rounds[2] != rounds[0]
    assert three_rounds() == rounds  # reproducible from the seed
    # torch's default generator is left alone: making a loader does not rewind it
    pl.seed_everything(3, verbose=False)
    dm = SegDataModule(site, config(tmp_path))
    dm.setup("fit")
    before = torch.rand(1)
    dm.train_dataloader()
    assert not torch.equal(torch.rand(1), before)


def test_a_stream_draws_apart_and_leaves_the_sites_own_draws_as_they_were(tmp_path, site):
    """A personal model's loaders (``stream``) do not shift the global model's: the site's own loaders
    draw the same with or without a stream's loaders made between them."""
    import pytorch_lightning as pl

    def site_draws(with_stream: bool) -> tuple[list, list]:
        pl.seed_everything(5, verbose=False)
        dm = SegDataModule(site, config(tmp_path))
        dm.setup("fit")
        personal = dm.stream("ditto")
        own, theirs = [], []
        for _ in range(2):  # two rounds: the global model's epoch, then the personal model's
            own.append(_augmented(dm))
            if with_stream:
                theirs.append(_augmented(personal))
        return own, theirs

    own, theirs = site_draws(with_stream=True)
    assert site_draws(with_stream=False)[0] == own
    assert theirs[0] != own[0] and theirs[0] != theirs[1]  # and it goes on from round to round


def test_a_stream_is_one_object_per_name(tmp_path, site):
    """A plug-in asks for its stream every round: the same name gives the same, going-on stream."""
    dm = SegDataModule(site, config(tmp_path))
    assert dm.stream("ditto") is dm.stream("ditto") and dm.stream("apfl") is not dm.stream("ditto")


def test_a_loader_is_made_whatever_the_processs_seed(tmp_path, site):
    """An unseeded process's initial seed can be any 64-bit number: the loaders' seeds stay in range."""
    torch.manual_seed(2**64 - 1)
    dm = SegDataModule(site, config(tmp_path))
    dm.setup("fit")
    assert _augmented(dm) and _augmented(dm.stream("ditto"))
