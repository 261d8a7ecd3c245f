"""The Lightning DataModule of one site: a datalist -> cached MONAI datasets -> DataLoaders.

Training and validation items go through ``monai.data.PersistentDataset``: the output of the
deterministic preprocessing (decoded, reoriented, cropped, normalised volumes) is stored on disk,
so epochs and federated rounds after the first never decode gzip NIfTI again. A cache entry's name
is the hash of the item (absolute paths + size/mtime stamp of every source file, see
``transforms.case_to_item``) plus the hash of the deterministic transforms and their settings
(``hash_transform=pickle_hashing``): a changed source file or setting gives a new entry, never a
stale one. Entries are not garbage-collected; delete the cache folder to reclaim space.
"""

from __future__ import annotations

import copy
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytorch_lightning as pl
import torch
from monai.data import DataLoader, Dataset, PersistentDataset
from monai.data.utils import pickle_hashing

from fedseg.config import DataSettings
from fedseg.lightning_modules.data.datalist import Case, Datalist, read_datalist
from fedseg.lightning_modules.data.transforms import PreprocessConfig, build_transforms, case_to_item
from fedseg.lightning_modules.owner_only import owner_only_dir


_DATA = DataSettings()  # the study defaults (fedseg.config) of the loader settings


def default_cache_dir() -> Path:
    """``$FEDSEG_CACHE_DIR``, else ``$XDG_CACHE_HOME/fedseg/preprocessed`` (``~/.cache`` by default)."""
    if os.environ.get("FEDSEG_CACHE_DIR"):
        return Path(os.environ["FEDSEG_CACHE_DIR"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "fedseg" / "preprocessed"


@dataclass
class DataConfig:
    """Loader settings of a site.

    A training batch holds ``batch_size * samples_per_volume`` crops (MONAI's ``list_data_collate``
    flattens the crops of each case). Validation and prediction always use batch size 1 (whole
    volumes of different sizes). ``cache_dir=None`` means :func:`default_cache_dir`;
    ``use_cache=False`` decodes the source files every epoch.
    """

    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    batch_size: int = _DATA.batch_size
    samples_per_volume: int = 1
    num_workers: int = _DATA.num_workers
    cache_dir: str | Path | None = None
    use_cache: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.preprocess, dict):  # from a JSON / YAML config
            self.preprocess = PreprocessConfig(**self.preprocess)
        if self.batch_size < 1 or self.samples_per_volume < 1 or self.num_workers < 0:
            raise ValueError(
                f"DataConfig: batch_size and samples_per_volume must be >= 1 and num_workers >= 0, got "
                f"{self.batch_size}, {self.samples_per_volume}, {self.num_workers}"
            )

    def resolved_cache_dir(self) -> Path:
        return Path(self.cache_dir).expanduser() if self.cache_dir else default_cache_dir()


def check_cache_dir(cache_dir: Path, datalist: Datalist) -> None:
    """Refuse a cache folder inside the source data (the data folder is never written to)."""
    cache = cache_dir.expanduser().resolve()
    roots = {p.parent.resolve() for c in datalist.cases for p in c.paths(datalist.data_root)}
    root = Path(datalist.data_root).resolve()
    if root != Path(root.anchor):  # a merged datalist's root is "/" and says nothing
        roots.add(root)
    for source in sorted(roots):
        if cache == source or source in cache.parents:
            raise ValueError(f"cache dir {cache_dir} is inside the source data folder {source}; choose another")


class OwnerOnlyPersistentDataset(PersistentDataset):
    """MONAI's ``PersistentDataset`` whose cache is owner-only: folder 0700, files 0600.

    The cached volumes are patients' images; on a shared scratch disk the default umask would let
    every user read them. MONAI writes each entry through a temporary folder and a move
    (monai/data/dataset.py, ``_cachecheck``), with the process umask: the umask is narrowed around
    that write (files are created 0600), and the cache folder and its parents made here are 0700.
    """

    def __init__(self, *args, cache_dir: Path | str, **kwargs) -> None:
        owner_only_dir(cache_dir)
        super().__init__(*args, cache_dir=cache_dir, **kwargs)

    def _cachecheck(self, item_transformed):  # noqa: ANN001, ANN202 - MONAI's hook
        previous = os.umask(0o077)
        try:
            return super()._cachecheck(item_transformed)
        finally:
            os.umask(previous)


class SegDataModule(pl.LightningDataModule):
    """Train / val / predict loaders of one site's datalist.

    ``datalist`` is a ``Datalist`` or the path of a datalist JSON (``data_root`` then overrides the
    root stored in it). ``predict_cases`` default to the validation cases. Train/val items: see
    ``transforms.py`` (``image``, ``label``, ``spacing``, ``case_id``, ``convention``).
    """

    def __init__(
        self,
        datalist: Datalist | str | Path,
        config: DataConfig | None = None,
        *,
        data_root: str | Path | None = None,
        predict_cases: Sequence[Case] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(datalist, (str, Path)):
            datalist = read_datalist(datalist, data_root)
        elif data_root is not None:
            datalist = Datalist(datalist.training, datalist.validation, Path(data_root).resolve(), datalist.meta)
        self.datalist = datalist
        self.config = config or DataConfig()
        self.predict_cases = list(predict_cases) if predict_cases is not None else list(datalist.validation)
        self.train_ds: Dataset | None = None
        self.val_ds: Dataset | None = None
        self.predict_ds: Dataset | None = None
        self.predict_transforms = build_transforms(self.config.preprocess, "predict")
        # each loader's own random stream: the run's seed (set before the datamodule is made) and
        # how many loaders came before it (see ``_loader``)
        self._seed = torch.initial_seed()
        self._loaders_made = 0
        self._streams: dict[str, SegDataModule] = {}
        if self.config.use_cache:
            check_cache_dir(self.config.resolved_cache_dir(), datalist)

    def stream(self, name: str) -> SegDataModule:
        """This datamodule (the same cases, datasets and cache) with a random stream of its own,
        ``name``'s: its loaders draw augmentations and order apart from this one's, and go on from
        call to call (the same object for the same name). A site's personal models train on their own
        streams, so the global model's training at the site draws exactly what it would under FedAvg,
        however many personal models train beside it."""
        if name not in self._streams:
            twin = copy.copy(self)
            twin._seed = (self._seed + zlib.crc32(name.encode()) * 1_000_003) % 2**63
            twin._loaders_made = 0
            twin._streams = {}
            self._streams[name] = twin
        return self._streams[name]

    @property
    def n_train_cases(self) -> int:
        """Number of training cases (the site's FedAvg weight)."""
        return len(self.datalist.training)

    @property
    def n_val_cases(self) -> int:
        return len(self.datalist.validation)

    @property
    def cache_dir(self) -> Path | None:
        return self.config.resolved_cache_dir() if self.config.use_cache else None

    def _items(self, cases: Sequence[Case], *, with_label: bool = True) -> list[dict]:
        pre = self.config.preprocess
        return [case_to_item(c, self.datalist.data_root, pre.modalities, with_label=with_label) for c in cases]

    def _dataset(self, cases: Sequence[Case], stage: str) -> Dataset:
        transform = build_transforms(
            self.config.preprocess, stage, samples_per_volume=self.config.samples_per_volume  # type: ignore[arg-type]
        )
        items = self._items(cases)
        if not self.config.use_cache:
            return Dataset(items, transform)
        return OwnerOnlyPersistentDataset(items, transform, cache_dir=self.cache_dir, hash_transform=pickle_hashing)

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets ``stage`` needs (lazy: nothing is decoded; missing files raise now)."""
        if stage in (None, "fit", "validate", "test"):
            self._train_dataset()
            self._val_dataset()
        if stage in (None, "predict"):
            self._predict_dataset()

    def _train_dataset(self) -> Dataset:
        if self.train_ds is None:
            self.train_ds = self._dataset(self.datalist.training, "train")
        return self.train_ds

    def _val_dataset(self) -> Dataset:
        if self.val_ds is None:
            self.val_ds = self._dataset(self.datalist.validation, "val")
        return self.val_ds

    def _predict_dataset(self) -> Dataset:
        if self.predict_ds is None:
            items = self._items(self.predict_cases, with_label=False)
            self.predict_ds = Dataset(items, self.predict_transforms)  # one pass: nothing to cache
        return self.predict_ds

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        # Around MONAI's DataLoader: with num_workers=0 it reseeds the dataset's random transforms from
        # its generator and then resets that generator to its initial seed (monai/data/dataloader.py),
        # so every loader made from torch's default generator repeats the last one's augmentations and
        # order. A federated site makes a new train loader every round (a new Trainer.fit): without a
        # generator of its own per loader, all rounds would see the same two augmented epochs. Each
        # loader gets one, seeded by the run's seed and the loaders made before it: a run is as
        # reproducible as before, and torch's default generator is never reset.
        generator = torch.Generator().manual_seed((self._seed + self._loaders_made) % 2**63)
        self._loaders_made += 1
        workers = self.config.num_workers
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle and len(dataset) > 0,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
            generator=generator,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled random crops; also asked for by NVFlare's Lightning client on evaluate tasks."""
        return self._loader(self._train_dataset(), self.config.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Whole foreground-cropped volumes, batch size 1, in datalist order."""
        return self._loader(self._val_dataset(), 1, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """Whole volumes without labels; ``image`` stays a ``MetaTensor`` for ``transforms.build_inverse``."""
        return self._loader(self._predict_dataset(), 1, shuffle=False)
