"""fedseg's one configuration source: the study settings as frozen dataclasses, and named profiles.

Every command (``train``, ``simulate``, ``poc``, ``compare``, ``demo``), every job and the site
script read the settings of a study from here; a default is written once, in the field below.
A **profile** is a whole ``StudyConfig`` under a name:

=========  ==================================================================================
study      a real study on hospital data: 128³ crops, the 16-feature U-Net, 50 rounds × 1 epoch
demo       what ``make demo`` runs on the built-in synthetic sites in minutes on 2 CPU cores
tiny       the test suite's settings: 16³ crops of 24³ volumes, a 4-feature U-Net, 2 rounds
=========  ==================================================================================

``profile("demo").override(rounds=20)`` changes fields by name (names are unique across the
sections); the CLI builds its options from the fields (``fedseg.cli._options``), so
``fedseg simulate --profile demo --rounds 20`` is the same object. ``to_json`` / ``from_json``
carry a configuration to the sites inside a job (``fedseg.jobs.base``).

This module imports nothing heavy: ``fedseg --help`` and the job folders read it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

#: input modalities, in the default channel order of the networks
MODALITIES: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")
#: the networks of ``fedseg.lightning_modules.networks`` (its registry is checked against this)
NETWORK_NAMES: tuple[str, ...] = ("unet", "resunet", "attention_unet", "segresnet", "unetplusplus")
NORMS: tuple[str, ...] = ("instance", "batch")
NORMALIZATIONS: tuple[str, ...] = ("zscore", "minmax")
#: how much of the decoder a personalized site keeps as its personal head, shallowest first: the
#: output layer; it and the decoder level nearest it; the whole decoder
#: (``fedseg.lightning_modules.networks.partition_keys``)
HEAD_DEPTHS: tuple[str, ...] = ("output", "last", "decoder")
#: the personal head when none is chosen (FedPer's and FedRep's ``personal_head``, the network split)
DEFAULT_HEAD_DEPTH: str = "decoder"
#: the word of an option that is switched off (``--wandb off``, ``--privacy off``, ``--quantize off``)
OFF: str = "off"
#: Weights & Biases tracking: none, runs written for ``wandb sync``, or runs uploaded as they go
WANDB_MODES: tuple[str, ...] = (OFF, "offline", "online")


def setting(default: Any, help: str, **cli: Any) -> Any:  # noqa: A002 - the CLI's word
    """A dataclass field with its command-line help (and argparse extras such as ``choices``)."""
    return field(default=default, metadata={"help": help, **cli})


def _choice(obj: Any, name: str, allowed: tuple[Any, ...]) -> None:
    if getattr(obj, name) not in allowed:
        raise ValueError(f"unknown {name} {getattr(obj, name)!r}; known: {', '.join(map(str, allowed))}")


def _positive(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, bool) or not value > 0:
            raise ValueError(f"{name} must be > 0, got {value!r}")


@dataclass(frozen=True)
class ModelSettings:
    """The network and how it is optimized (every site and the centralized run alike)."""

    network: str = setting("unet", "segmentation network", choices=NETWORK_NAMES)
    features: int = setting(16, "base width of the network")
    norm: str = setting("instance", "normalization layers", choices=NORMS)
    lr: float = setting(1e-3, "AdamW learning rate (cosine schedule over the whole budget)")
    weight_decay: float = setting(1e-5, "AdamW weight decay")
    hd95: bool = setting(True, "compute HD95 during validation (the slowest metric on CPU)")

    def __post_init__(self) -> None:
        _choice(self, "network", NETWORK_NAMES)
        _choice(self, "norm", NORMS)
        _positive(self, "features", "lr")


@dataclass(frozen=True)
class DataSettings:
    """What the network sees: modalities, crop size, intensity normalization, batches."""

    modalities: tuple[str, ...] = setting(MODALITIES, "input modalities, in channel order", nargs="+")
    roi: tuple[int, int, int] = setting((128, 128, 128), "training crop and sliding window: one or three sizes", nargs="+")
    normalization: str = setting("zscore", "intensity normalization per channel", choices=NORMALIZATIONS)
    batch_size: int = setting(2, "training crops per batch")
    num_workers: int = setting(0, "data loader worker processes (0: in the training process)")

    def __post_init__(self) -> None:
        object.__setattr__(self, "modalities", tuple(self.modalities))
        roi = (int(self.roi),) if isinstance(self.roi, int) else tuple(int(r) for r in self.roi)
        object.__setattr__(self, "roi", roi * 3 if len(roi) == 1 else roi)
        unknown = [m for m in self.modalities if m not in MODALITIES]
        if not self.modalities or unknown or len(set(self.modalities)) != len(self.modalities):
            raise ValueError(f"modalities {list(self.modalities)}: give distinct names from {', '.join(MODALITIES)}")
        if len(self.roi) != 3 or min(self.roi) < 1:
            raise ValueError(f"roi takes one or three positive sizes, got {list(self.roi)}")
        _choice(self, "normalization", NORMALIZATIONS)
        _positive(self, "batch_size")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")


@dataclass(frozen=True)
class FederationSettings:
    """Rounds and how they run. ``rounds × local_epochs`` is every method's budget (epochs per case)."""

    rounds: int = setting(50, "federated rounds (centralized and local runs train rounds × local epochs)")
    local_epochs: int = setting(1, "epochs each site trains per round")
    round_timeout: int = setting(7200, "seconds a round waits for the sites (0: for ever); a late site misses the round")
    min_sites_per_round: int = setting(0, "fewest sites a round may average (0: all); fewer stop the study")
    poll_interval: float = setting(2.0, "seconds a site waits between task requests (NVFlare's task_request_interval)")
    site_threads: int = setting(0, "torch CPU threads per site (0: torch's default)")
    gpus_per_site: int = setting(0, "GPUs each site's NVFlare resource manager holds for the job (the job's "
                                    "meta.json resource_spec; a site trains on the devices its own config names); 0: none")

    def __post_init__(self) -> None:
        _positive(self, "rounds", "local_epochs", "poll_interval")
        if self.round_timeout < 0 or self.min_sites_per_round < 0 or self.site_threads < 0 or self.gpus_per_site < 0:
            raise ValueError("round_timeout, min_sites_per_round, site_threads and gpus_per_site must be >= 0")


#: tumour models of the synthetic generator: "varied" (the default: sizes, shapes, positions, thin
#: rims and patchy necrosis varied more from case to case) or "classic" (the first generator's
#: compact tumours, kept so that earlier results can be reproduced); docs/data.md
SYNTH_TUMOURS: tuple[str, ...] = ("varied", "classic")


@dataclass(frozen=True)
class SynthSettings:
    """The built-in synthetic hospitals a command makes when it is given no datalists.

    The one place of the synthetic data's defaults: ``fedseg data synth`` and the generator's
    ``SynthConfig`` take theirs from here. By default the sites are a consortium's: a large, a
    medium and a small hospital (``site_cases`` 24, 8 and 4 cases), each with its own held-out
    test cases (``test_cases``) that no datalist trains or validates on.
    """

    sites: int = setting(3, "number of synthetic sites")
    cases: int = setting(0, "synthetic cases per site, the same at every site (0: --site-cases)")
    site_cases: tuple[int, ...] = setting(
        (24, 8, 4), "synthetic cases of each site when --cases is 0, repeated over the sites in turn "
        "(24 8 4: a large, a medium and a small hospital)", nargs="+")
    test_cases: int = setting(16, "held-out test cases per synthetic site (datalists/SITE.test.json), "
                                  "never in a training or validation datalist")
    synth_val_fraction: float = setting(0.25, "share of each synthetic site's cases that validate")
    size: int = setting(48, "synthetic volume size (voxels a side)")
    heterogeneity: float = setting(1.0, "how differently the synthetic sites scan and annotate (0: IID)")
    synth_groups: int = setting(1, "synthetic sites in 1 or 2 imaging-protocol groups", choices=(1, 2))
    synth_tumours: str = setting("varied", "synthetic tumour model: varied (sizes, shapes, positions "
                                           "and thin rims varied more) or classic (the first generator's)", choices=SYNTH_TUMOURS)
    synth_seed: int = setting(0, "seed of the synthetic sites' cases (data), apart from the training seed")

    def __post_init__(self) -> None:
        counts = (int(self.site_cases),) if isinstance(self.site_cases, int) else tuple(int(c) for c in self.site_cases)
        object.__setattr__(self, "site_cases", counts)
        _positive(self, "sites")
        if self.cases < 0 or self.test_cases < 0:
            raise ValueError(f"cases and test_cases must be >= 0, got {self.cases}, {self.test_cases}")
        if self.cases == 0 and (not counts or min(counts) < 1):
            raise ValueError(f"site_cases needs at least one count, each >= 1 (or set cases), got {list(counts)}")
        if not 0.0 <= self.synth_val_fraction < 1.0:
            raise ValueError(f"synth_val_fraction must be in [0, 1), got {self.synth_val_fraction}")
        if self.size < 16 or self.heterogeneity < 0:
            raise ValueError(f"synthetic size must be >= 16 and heterogeneity >= 0, got {self.size}, {self.heterogeneity}")
        _choice(self, "synth_tumours", SYNTH_TUMOURS)

    def cases_at_sites(self, n_sites: int | None = None) -> tuple[int, ...]:
        """Cases of each of ``n_sites`` sites (default ``sites``): ``cases`` at every site, or
        ``site_cases`` repeated in turn."""
        n = self.sites if n_sites is None else n_sites
        if self.cases > 0:
            return (self.cases,) * n
        return tuple(self.site_cases[k % len(self.site_cases)] for k in range(n))


SECTIONS: dict[str, type] = {
    "model": ModelSettings,
    "data": DataSettings,
    "federation": FederationSettings,
    "synth": SynthSettings,
}


@dataclass(frozen=True)
class StudyConfig:
    """Everything that defines a study's training, whatever runs it (centralized, local or federated)."""

    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    federation: FederationSettings = field(default_factory=FederationSettings)
    synth: SynthSettings = field(default_factory=SynthSettings)
    #: seed of the initial weights (every method starts from the same ones), data order and augmentation
    seed: int = 0

    @property
    def epochs(self) -> int:
        """The budget: how often every training case passes through the network, in every method."""
        return self.federation.rounds * self.federation.local_epochs

    def override(self, **changes: Any) -> StudyConfig:
        """A copy with fields changed by name (``features=8, rounds=2``); unknown names are an error."""
        by_section: dict[str, dict[str, Any]] = {}
        for name, value in changes.items():
            if name == "seed":
                continue
            section = FIELD_SECTION.get(name)
            if section is None:
                raise ValueError(f"unknown setting {name!r}; known: seed, {', '.join(sorted(FIELD_SECTION))}")
            by_section.setdefault(section, {})[name] = value
        replaced = {s: dataclasses.replace(getattr(self, s), **c) for s, c in by_section.items()}
        return dataclasses.replace(self, **replaced, **({"seed": int(changes["seed"])} if "seed" in changes else {}))

    def flat(self) -> dict[str, Any]:
        """Every setting by its (unique) name, lists for tuples: what W&B and run folders record."""
        doc: dict[str, Any] = {"seed": self.seed}
        for section in SECTIONS:
            doc.update(json.loads(json.dumps(dataclasses.asdict(getattr(self, section)))))
        return doc

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> StudyConfig:
        unknown = set(doc) - {*SECTIONS, "seed"}
        if unknown:
            raise ValueError(f"unknown study config sections {sorted(unknown)}")
        return cls(**{s: SECTIONS[s](**doc[s]) for s in SECTIONS if s in doc}, seed=int(doc.get("seed", 0)))

    def module_args(self) -> dict[str, Any]:
        """``SegmentationModule`` arguments: the sites' model and the server's initial global model
        are both built as ``SegmentationModule(**config.module_args())``."""
        m, d = self.model, self.data
        return {
            "network": m.network,
            "in_channels": len(d.modalities),
            "features": m.features,
            "network_kwargs": {"norm": m.norm},
            "lr": m.lr,
            "weight_decay": m.weight_decay,
            "max_epochs": self.epochs,
            "roi_size": list(d.roi),
            "hd95": m.hd95,
            "preprocess": {"modalities": list(d.modalities), "roi_size": list(d.roi), "normalization": d.normalization},
            "init_seed": self.seed,
        }


#: setting name -> its section ("features" -> "model"); names are unique across sections
FIELD_SECTION: dict[str, str] = {f.name: section for section, cls in SECTIONS.items() for f in fields(cls)}
assert len(FIELD_SECTION) == sum(len(fields(c)) for c in SECTIONS.values()), "setting names must be unique"

PROFILES: dict[str, StudyConfig] = {
    "study": StudyConfig(),
    "demo": StudyConfig().override(features=8, lr=3e-3, roi=(48, 48, 48), rounds=20, local_epochs=2, site_threads=1),
    "tiny": StudyConfig().override(features=4, lr=3e-3, hd95=False, roi=(16, 16, 16), rounds=2, local_epochs=1,
                                   round_timeout=240, poll_interval=0.5, site_threads=1, sites=2, cases=4, size=24,
                                   test_cases=2, synth_tumours="classic"),
}


def profile(name: str) -> StudyConfig:
    """The named profile (``ValueError`` naming the known ones)."""
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown profile {name!r}; known: {', '.join(PROFILES)}") from None


# ------------------------------------------------------------------------------ beyond the study settings
# (not sections of a StudyConfig: options of an add-on and of a command, with their defaults written once)


@dataclass(frozen=True)
class ContributionWeights:
    """The contribution-weights add-on: each site weighs by its cases and by how much its update
    lowered its own validation loss (``fedseg.app.contribution``; the job's add-on in ``fedseg.jobs.addons``)."""

    contribution_alpha: float = setting(0.5, "contribution: weight of the case share (1 = FedAvg)")
    max_site_share: float = setting(0.5, "contribution: most any site may weigh in a round")

    def __post_init__(self) -> None:
        if not 0.0 <= self.contribution_alpha <= 1.0 or not 0.0 < self.max_site_share <= 1.0:
            raise ValueError("contribution_alpha must be in [0, 1] and max_site_share in (0, 1]")


@dataclass(frozen=True)
class ComparisonSettings:
    """What ``fedseg compare`` runs when it is told no methods (``fedseg.experiments.compare``)."""

    methods: tuple[str, ...] = setting(("centralized", "local", "fedavg", "fedper"),
                                       "the methods to compare (listed in this command's description)",
                                       nargs="+", metavar="METHOD")

    def __post_init__(self) -> None:
        object.__setattr__(self, "methods", tuple(self.methods))


@dataclass(frozen=True)
class TrainSettings:
    """``fedseg train``'s own options beside the study settings (its CLI options are made from these
    fields); ``fedseg.lightning_modules.training.TrainConfig`` takes its defaults from here too."""

    data_root: Path | None = setting(None, "override the datalists' data root")
    epochs: int | None = setting(None, "epochs to train (default: the profile's budget, rounds x local epochs)")
    accelerator: str = setting("auto", "auto, cpu or gpu")
    cache_dir: Path | None = setting(None, "preprocessed-volume cache (default OUT/cache)")
    init_from: Path | None = setting(None, "start from this checkpoint's weights (fine-tuning a global model on one site)")
    wandb: str = setting(OFF, "Weights & Biases tracking: offline writes OUT/wandb (upload later with `wandb sync`); "
                              "online needs WANDB_API_KEY in the environment", choices=WANDB_MODES)


#: how ``fedseg data split`` assigns cases to sites (``fedseg.lightning_modules.data.splits``)
SPLIT_MODES: tuple[str, ...] = ("iid", "unequal", "dirichlet", "institution")


@dataclass(frozen=True)
class SplitSettings:
    """How one pool of cases is split into sites: ``fedseg data split``'s options are made from these
    fields, and ``fedseg.lightning_modules.data.splits.split_cases`` takes its defaults from here."""

    sites: int | None = setting(None, "number of sites (institution mode: default one per institution)")
    mode: str = setting("iid", "how cases go to the sites: iid (equal shares), unequal (--sizes or a power law), "
                               "dirichlet (skewed by tumour volume, --alpha) or institution (--institutions)",
                        choices=SPLIT_MODES)
    seed: int = setting(0, "seed of the assignment to sites and of each site's validation cases")
    val_fraction: float = setting(0.2, "share of each site's cases that validate")
    alpha: float = setting(0.5, "Dirichlet concentration (smaller = more skewed)")
    sizes: tuple[float, ...] | None = setting(None, "unequal mode: relative site sizes", nargs="+")
    institutions: Path | None = setting(None, "institution mode: CSV case_id,institution")

    def __post_init__(self) -> None:
        if self.sizes is not None:
            object.__setattr__(self, "sizes", tuple(float(s) for s in self.sizes))
