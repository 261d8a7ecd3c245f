"""Synthetic multi-site brain-tumour MRI: a dataset that trains in minutes and behaves like BraTS.

Each case is a skull-stripped head (an irregular ellipsoid with zero background) made of CSF,
grey and white matter, and a tumour built from a few overlapping Gaussian blobs: oedema spreading
around a core, the core an enhancing rim around a necrotic centre. Four modalities give each tissue
a different, roughly MRI-like contrast (FLAIR/T2 bright oedema, T1ce bright rim, T1 dark core, CSF
dark on FLAIR but bright on T2), so no single modality separates all three regions.

Sites differ the way hospitals do, in two independent ways recorded in ``synth.json``:

* **scanner** - gain, intensity curve (gamma), smooth multiplicative bias field, Rician noise, blur
  and thick slices (partial-volume averaging along the third axis);
* **annotation style** - one site draws oedema wider (the whole-tumour outline dilated by a voxel
  or two), another draws the core tighter (a higher threshold on the same tumour field).

The images are rendered from the true anatomy; only the label follows the site's style, so a
personalized segmentation head has a real, systematic difference to learn.

Output (BraTS 2021 layout and label values 1/2/4, so synthetic and real data take one path)::

    out/data/<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz     training and validation cases
    out/test/<case>/...                                      held-out test cases (site<k>_test<i>)
    out/datalists/site-<k>.json, out/datalists/all.json
    out/datalists/site-<k>.test.json  # a site's test cases ("test" list; no training/validation)
    out/institutions.csv            # case_id,institution  (re-split with mode "institution")
    out/synth.json                  # config, site profiles, case ids, test case ids, datalists

By default the sites are a consortium's (``SynthSettings.site_cases``: 24, 8 and 4 cases) and the
tumours "varied": sizes, shapes, positions, thin rims and patchy necrosis varied more than the
first generator's ("classic"). A site of 4 cases learns them much worse than one of 24 (the
calibration is in docs/data.md).
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

from fedseg.config import SynthSettings
from fedseg.lightning_modules.data.datalist import (
    MODALITIES,
    Case,
    Datalist,
    merge_datalists,
    write_datalist,
    write_json_atomic,
)
from fedseg.lightning_modules.data.splits import train_val_split
from fedseg.lightning_modules.labels import ED, ET, NCR, from_internal
from fedseg.lightning_modules.test_sets import test_datalist_path, write_test_datalist

log = logging.getLogger(__name__)

GENERATOR = "fedseg.synth"
FORMAT_VERSION = 2  # 2: per-site case counts, test cases, tumour models
#: what a version-1 synth.json (without these settings) was made with
_VERSION_1 = {"test_cases": 0, "tumours": "classic"}
#: the test cases' random stream (a prime tag, as the others'): [seed, _TEST_STREAM, site, case]
_TEST_STREAM = 15485863
CONVENTION = "brats2021"


class SynthError(ValueError):
    """Bad generator settings, or an output folder that must not be written into."""


_DEFAULTS = SynthSettings()  # the one place of the synthetic data's defaults (fedseg.config)


@dataclass(frozen=True)
class SynthConfig:
    """Settings of the synthetic multi-site dataset; every default comes from ``SynthSettings``.

    The defaults are a consortium of 3 sites with 24, 8 and 4 cases (``site_cases``, repeated in
    turn when there are more sites) of 48^3 voxels at 1 mm, and 16 held-out test cases per site.
    ``cases_per_site`` > 0 gives every site that many cases instead. ``site_cases`` is stored
    resolved, one count per site. 1 mm spacing matches BraTS, so a 1 mm resampling step is a no-op.
    ``heterogeneity`` scales every site's departure from the reference site: 0 gives identical
    scanners and annotation styles (IID sites), 1 the built-in profiles, >1 exaggerates them.
    ``tumours`` "varied" draws tumours hard to learn from a few cases; "classic" the first
    generator's compact ones (see ``_TUMOUR_MODELS``).
    """

    n_sites: int = _DEFAULTS.sites
    cases_per_site: int = _DEFAULTS.cases
    site_cases: tuple[int, ...] = _DEFAULTS.site_cases
    test_cases: int = _DEFAULTS.test_cases
    val_fraction: float = _DEFAULTS.synth_val_fraction
    shape: tuple[int, int, int] = (_DEFAULTS.size,) * 3
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    seed: int = _DEFAULTS.synth_seed
    heterogeneity: float = _DEFAULTS.heterogeneity
    #: site groups with different imaging protocols: 1 (all sites alike) or 2 (the second half of
    #: the sites image with protocol "b": other tissue contrasts per sequence, see PROTOCOL_CONTRAST)
    groups: int = _DEFAULTS.synth_groups
    tumours: str = _DEFAULTS.synth_tumours

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))
        counts = (self.site_cases,) if isinstance(self.site_cases, int) else tuple(self.site_cases)
        if self.n_sites < 1 or self.cases_per_site < 0 or (self.cases_per_site == 0 and not counts):
            raise SynthError(f"need at least 1 site and 1 case per site, got {self.n_sites} sites, "
                             f"cases_per_site {self.cases_per_site}, site_cases {list(counts)}")
        if self.cases_per_site > 0:
            counts = (self.cases_per_site,) * self.n_sites
        else:  # repeated in turn over the sites: (24, 8, 4) at 5 sites is 24, 8, 4, 24, 8
            counts = tuple(int(counts[k % len(counts)]) for k in range(self.n_sites))
        if min(counts) < 1:
            raise SynthError(f"need at least 1 case per site, got site_cases {list(counts)}")
        object.__setattr__(self, "site_cases", counts)
        if self.test_cases < 0:
            raise SynthError(f"test_cases must be >= 0, got {self.test_cases}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise SynthError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if len(self.shape) != 3 or min(self.shape) < 16:
            raise SynthError(f"shape must be 3 sizes of at least 16 voxels, got {self.shape}")
        if len(self.spacing) != 3 or min(self.spacing) <= 0:
            raise SynthError(f"spacing must be 3 positive sizes in mm, got {self.spacing}")
        if self.heterogeneity < 0:
            raise SynthError(f"heterogeneity must be >= 0, got {self.heterogeneity}")
        if self.groups not in (1, 2) or self.groups > self.n_sites:
            raise SynthError(f"groups must be 1 or 2 (and at most the number of sites), got {self.groups}")
        if self.tumours not in _TUMOUR_MODELS:
            raise SynthError(f"unknown tumours {self.tumours!r}; known: {', '.join(_TUMOUR_MODELS)}")

    @classmethod
    def from_settings(cls, settings: SynthSettings, **changes: Any) -> SynthConfig:
        """The generator config of a study's ``SynthSettings`` (``changes``: fields replaced, e.g.
        ``n_sites``); a cubic volume of ``settings.size`` voxels at 1 mm."""
        fields_ = dict(
            n_sites=settings.sites, cases_per_site=settings.cases, site_cases=settings.site_cases,
            test_cases=settings.test_cases, val_fraction=settings.synth_val_fraction,
            shape=(settings.size,) * 3, seed=settings.synth_seed, heterogeneity=settings.heterogeneity,
            groups=settings.synth_groups, tumours=settings.synth_tumours,
        )
        return cls(**{**fields_, **changes})

    @property
    def total_cases(self) -> int:
        """Training and validation cases over all sites (test cases not counted)."""
        return sum(self.site_cases)

    def describe_cases(self) -> str:
        """``"3 cases"`` when every site has as many, else ``"24/8/4 cases"``."""
        counts = self.site_cases
        return f"{counts[0]} cases" if len(set(counts)) == 1 else f"{'/'.join(map(str, counts))} cases"


@dataclass(frozen=True)
class SiteProfile:
    """How one (synthetic) hospital scans and annotates."""

    name: str
    gain: float  # scanner units of white matter on T1
    modality_gain: dict[str, float]  # per-sequence gain factors
    gamma: float  # intensity curve: I -> I ** gamma
    bias: float  # std of the log bias field
    noise: float  # Rician noise std, as a fraction of the gain
    blur: float  # Gaussian blur sigma in voxels
    slice_thickness: int  # voxels averaged along the third axis (thick slices)
    oedema_dilation: int  # voxels the annotated whole-tumour outline is grown by
    core_tightening: float  # added to the core threshold (fraction of the tumour-field maximum)
    description: str = ""
    group: str = "a"  # imaging protocol group: the key of PROTOCOL_CONTRAST


#: Hand-made scanners/raters; sites beyond these are drawn at random (seeded).
_BUILTIN_PROFILES: tuple[dict[str, Any], ...] = (
    dict(gain=1000.0, gamma=1.0, bias=0.10, noise=0.02, blur=0.0, slice_thickness=1,
         oedema_dilation=0, core_tightening=0.0, description="reference scanner and rater"),
    dict(gain=600.0, gamma=0.75, bias=0.30, noise=0.05, blur=0.4, slice_thickness=1,
         oedema_dilation=1, core_tightening=0.0, description="noisy, blurred scanner; rater draws oedema wide"),
    dict(gain=1800.0, gamma=1.35, bias=0.20, noise=0.035, blur=0.3, slice_thickness=2,
         oedema_dilation=0, core_tightening=0.06,
         description="thick slices, steep contrast; rater draws the core tight"),
    dict(gain=350.0, gamma=0.9, bias=0.45, noise=0.08, blur=0.3, slice_thickness=3,
         oedema_dilation=1, core_tightening=0.03, description="old scanner, strong bias field; both styles, milder"),
)
_REFERENCE = _BUILTIN_PROFILES[0]

# Tissue classes of the rendered anatomy.
BACKGROUND, CSF, GM, WM, T_ED, T_ET, T_NCR = range(7)
#: Relative signal of each tissue (BACKGROUND..T_NCR) per modality, white matter on T1 = 1.
CONTRAST: dict[str, tuple[float, ...]] = {
    #            bg   CSF   GM    WM    oedema  enh.  necr.
    "t1":    (0.0, 0.25, 0.70, 1.00, 0.60, 0.65, 0.30),
    "t1ce":  (0.0, 0.25, 0.70, 1.00, 0.60, 1.45, 0.30),
    "t2":    (0.0, 1.30, 0.65, 0.45, 1.00, 0.75, 1.15),
    "flair": (0.0, 0.15, 0.70, 0.55, 1.25, 0.85, 0.60),
}

#: Tissue contrasts per imaging protocol group. Group "b" is a different protocol family: each
#: sequence slot holds another weighting (T1 slot: T2-like, T1ce: FLAIR-like with enhancement,
#: T2: T1-like, FLAIR: inverted), so that a model of group "a" does not read group "b" images.
PROTOCOL_CONTRAST: dict[str, dict[str, tuple[float, ...]]] = {
    "a": CONTRAST,
    "b": {
        "t1":    (0.0, 1.30, 0.65, 0.45, 1.00, 0.75, 1.15),
        "t1ce":  (0.0, 0.15, 0.70, 0.55, 1.25, 1.60, 0.60),
        "t2":    (0.0, 0.25, 0.70, 1.00, 0.60, 0.65, 0.30),
        "flair": (0.0, 1.00, 0.55, 0.40, 0.20, 0.35, 0.90),
    },
}

@dataclass(frozen=True)
class TumourModel:
    """How varied the tumours are: sizes and spreads in [-1, 1] units of the volume.

    The core is ``field > core_level * max`` of a sum of Gaussian blobs; the enhancing rim is a
    shell of the core ``rim_fraction`` of its depth thick (at least a voxel), varied along the
    outline by ``rim_variation``; the necrotic centre is the core deeper than the rim, kept only
    where a smooth random field exceeds a random quantile in ``necrosis_patchiness`` (0: all of it);
    with probability ``satellite`` a second, smaller tumour grows elsewhere (multifocal).
    """

    size: tuple[float, float]  # blob width range (log-uniform)
    centre: float  # centre uniform in [-centre, centre] per axis (inside the brain, not CSF)
    blobs: tuple[int, int]  # number of blobs, [low, high)
    blob_spread: float  # blob centres' spread around the tumour centre, in blob widths
    anisotropy: float  # std of the log of each blob's per-axis width factor
    outline: float  # amplitude of the multiplicative noise on the core field (irregular outline)
    oedema_spread: tuple[float, float]  # width factor of the oedema's wider copy of the blobs
    rim_fraction: tuple[float, float]  # enhancing-rim thickness, fraction of the core's depth
    rim_variation: float = 0.0  # relative variation of the rim's thickness along the outline
    necrosis_patchiness: tuple[float, float] = (0.0, 0.0)
    satellite: float = 0.0


_TUMOUR_MODELS: dict[str, TumourModel] = {
    # more varied than "classic"; a site of 4 cases vs one of 24 is measured in docs/data.md
    "varied": TumourModel(size=(0.06, 0.30), centre=0.60, blobs=(1, 7), blob_spread=0.8, anisotropy=0.35,
                          outline=0.25, oedema_spread=(1.25, 2.4), rim_fraction=(0.08, 0.3), rim_variation=0.6,
                          necrosis_patchiness=(0.0, 0.7), satellite=0.35),
    # the first generator's compact tumours (reproduces its data byte for byte)
    "classic": TumourModel(size=(0.11, 0.26), centre=0.45, blobs=(2, 5), blob_spread=0.45, anisotropy=0.12,
                           outline=0.12, oedema_spread=(1.4, 1.9), rim_fraction=(0.2, 0.4)),
}
_WT_LEVEL, _CORE_LEVEL = 0.40, 0.30


@dataclass
class SynthResult:
    """What ``generate`` wrote."""

    out: Path
    data_root: Path
    datalists: dict[str, Path]  # site name -> datalist
    all_datalist: Path
    institutions_csv: Path
    config_path: Path
    config: SynthConfig
    profiles: list[SiteProfile]
    site_stats: dict[str, dict[str, float]] = field(default_factory=dict)  # n_train, n_val, n_test, wt_ml_mean
    seconds: float = 0.0
    #: site name -> its held-out test datalist (``<site>.test.json``); none with ``test_cases`` 0
    test_datalists: dict[str, Path] = field(default_factory=dict)

    @property
    def site_groups(self) -> dict[str, str]:
        """Site name -> its imaging protocol group (what a site declares as ``group`` in its config)."""
        return {p.name: p.group for p in self.profiles}

    def summary(self) -> str:
        """A few lines for the terminal: sites, cases, sizes."""
        cfg = self.config
        lines = [
            f"synthetic data in {self.out}: {cfg.n_sites} sites x {cfg.describe_cases()}"
            f"{f' (+ {cfg.test_cases} test cases each)' if cfg.test_cases else ''}, "
            f"{'x'.join(map(str, cfg.shape))} voxels at {'x'.join(f'{s:g}' for s in cfg.spacing)} mm, "
            f"{cfg.tumours} tumours, seed {cfg.seed}, heterogeneity {cfg.heterogeneity:g} ({self.seconds:.1f} s)"
        ]
        for p in self.profiles:
            s = self.site_stats.get(p.name, {})
            lines.append(
                f"  {p.name}: {int(s.get('n_train', 0))} train / {int(s.get('n_val', 0))} val / "
                f"{int(s.get('n_test', 0))} test, "
                f"mean WT {s.get('wt_ml_mean', float('nan')):.1f} ml - {p.description}"
                + (f" [protocol group {p.group}]" if cfg.groups > 1 else "")
            )
        lines.append(f"  datalists: {self.all_datalist.parent}")
        return "\n".join(lines)


def site_profiles(cfg: SynthConfig) -> list[SiteProfile]:
    """The scanner/annotation profile of every site, scaled by ``cfg.heterogeneity``."""
    h = cfg.heterogeneity
    profiles = []
    for k in range(cfg.n_sites):
        rng = np.random.default_rng([cfg.seed, 7919, k])  # per-site stream: adding sites changes nothing before
        if k < len(_BUILTIN_PROFILES):
            base = dict(_BUILTIN_PROFILES[k])
        else:  # more sites than hand-made profiles: random scanners, the annotation styles in turn
            style = _BUILTIN_PROFILES[k % len(_BUILTIN_PROFILES)]
            base = dict(
                gain=float(np.exp(rng.uniform(np.log(300), np.log(2500)))),
                gamma=float(rng.uniform(0.7, 1.4)),
                bias=float(rng.uniform(0.05, 0.45)),
                noise=float(rng.uniform(0.01, 0.08)),
                blur=float(rng.uniform(0.0, 0.5)),
                slice_thickness=int(rng.integers(1, 4)),
                oedema_dilation=style["oedema_dilation"],
                core_tightening=style["core_tightening"],
                description="random scanner; " + style["description"].split("; ")[-1],
            )
        ref = _REFERENCE
        modality_gain = {m: float(np.exp(h * rng.normal(0.0, 0.15))) for m in MODALITIES}
        profiles.append(
            SiteProfile(
                name=f"site-{k + 1}",
                gain=float(ref["gain"] * (base["gain"] / ref["gain"]) ** h),
                modality_gain=modality_gain,
                gamma=float(1.0 + h * (base["gamma"] - 1.0)),
                bias=float(max(0.0, ref["bias"] + h * (base["bias"] - ref["bias"]))),
                noise=float(max(0.0, ref["noise"] + h * (base["noise"] - ref["noise"]))),
                blur=float(h * base["blur"]),
                slice_thickness=max(1, int(round(1 + h * (base["slice_thickness"] - 1)))),
                oedema_dilation=int(round(h * base["oedema_dilation"])),
                core_tightening=float(min(0.3, h * base["core_tightening"])),
                description=base["description"] if h > 0 else "reference scanner and rater",
                group="b" if cfg.groups == 2 and k >= (cfg.n_sites + 1) // 2 else "a",
            )
        )
    return profiles


def generate(cfg: SynthConfig, out: Path | str) -> SynthResult:
    """Write the synthetic multi-site dataset to ``out`` (see the module docstring for the layout).

    ``out`` must be empty, missing, or an earlier synth output (whose data and datalists are then
    replaced). The same config gives the same voxel data, byte for byte.
    """
    start = time.perf_counter()
    out = Path(out)
    _prepare_output(out)
    profiles = site_profiles(cfg)
    data_root = out / "data"
    data_root.mkdir(parents=True)
    test_root = out / "test"  # apart from data/: a re-split or check of data/ never meets a test case
    test_root.mkdir()
    # Written first with complete=false: a crashed run leaves a folder that may be regenerated into.
    document = {
        "generator": GENERATOR,
        "version": FORMAT_VERSION,
        "complete": False,
        "config": asdict(cfg),
        "label_convention": CONVENTION,
        "sites": [asdict(p) for p in profiles],
    }
    config_path = write_json_atomic(out / "synth.json", document)

    affine = _affine(cfg.shape, cfg.spacing)
    voxel_ml = float(np.prod(cfg.spacing)) / 1000.0
    grid = _Grid(cfg.shape)
    site_lists: dict[str, Datalist] = {}
    site_stats: dict[str, dict[str, float]] = {}
    institutions: list[tuple[str, str]] = []
    test_sets: dict[str, list[Case]] = {}
    for k, profile in enumerate(profiles):
        cases, wt_ml = [], []
        for i in range(cfg.site_cases[k]):
            case_id = f"site{k + 1}_case{i + 1:03d}"
            rng = np.random.default_rng([cfg.seed, k, i])
            images, label = synthesize_case(grid, profile, rng, cfg.tumours)
            cases.append(_write_case(data_root, case_id, images, label, affine))
            wt_ml.append(float(np.count_nonzero(label)) * voxel_ml)
            institutions.append((case_id, profile.name))
        # Test cases: the same scanner and rater, their own random stream (adding training cases
        # changes no test case), and no datalist's training or validation part ever names them.
        test_sets[profile.name] = []
        for i in range(cfg.test_cases):
            case_id = f"site{k + 1}_test{i + 1:03d}"
            rng = np.random.default_rng([cfg.seed, _TEST_STREAM, k, i])
            images, label = synthesize_case(grid, profile, rng, cfg.tumours)
            test_sets[profile.name].append(_write_case(test_root, case_id, images, label, affine))
        training, validation = train_val_split(cases, cfg.val_fraction, np.random.default_rng([cfg.seed, 104729, k]))
        meta = {"site": profile.name, "group": profile.group, "generator": GENERATOR, "seed": cfg.seed,
                "profile": asdict(profile), "config": asdict(cfg)}
        site_lists[profile.name] = Datalist(training, validation, data_root, meta)
        site_stats[profile.name] = {"n_train": len(training), "n_val": len(validation),
                                    "n_test": cfg.test_cases, "wt_ml_mean": float(np.mean(wt_ml))}

    datalist_dir = out / "datalists"
    paths = {name: write_datalist(datalist_dir / f"{name}.json", dl) for name, dl in site_lists.items()}
    test_paths = {
        name: write_test_datalist(test_datalist_path(datalist_dir, name), cases, test_root,
                                  {**site_lists[name].meta, "split": "test"})
        for name, cases in test_sets.items() if cases
    }
    union = merge_datalists(site_lists.values())
    union.meta = {"site": "all", "generator": GENERATOR, "seed": cfg.seed, "merged_from": list(site_lists),
                  "config": asdict(cfg)}
    all_path = write_datalist(datalist_dir / "all.json", union)
    inst_path = out / "institutions.csv"
    with inst_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["case_id", "institution"])
        writer.writerows(institutions)

    document["complete"] = True
    document["cases"] = {name: [c.case_id for c in dl.cases] for name, dl in site_lists.items()}
    document["test_cases"] = {name: [c.case_id for c in cases] for name, cases in test_sets.items()}
    document["datalists"] = {name: str(p.relative_to(out)) for name, p in paths.items()}
    document["test_datalists"] = {name: str(p.relative_to(out)) for name, p in test_paths.items()}
    write_json_atomic(config_path, document)
    result = SynthResult(out, data_root, paths, all_path, inst_path, config_path, cfg, profiles,
                         site_stats, time.perf_counter() - start, test_paths)
    log.info("%s", result.summary())
    return result


# --------------------------------------------------------------------------------------------
# One case


class _Grid:
    """Voxel-centre coordinates in [-1, 1] per axis (shape-independent geometry), built once."""

    def __init__(self, shape: tuple[int, int, int]) -> None:
        self.shape = shape
        axes = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape]
        self.xyz = np.meshgrid(*axes, indexing="ij", sparse=True)

    def sq_dist(self, centre: np.ndarray, scale: np.ndarray | float = 1.0) -> np.ndarray:
        """Squared (scaled) distance of every voxel to ``centre``; shape ``self.shape``."""
        scale = np.broadcast_to(np.asarray(scale, dtype=np.float32), (3,))
        return sum(((x - c) / s) ** 2 for x, c, s in zip(self.xyz, centre, scale))


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Zero-mean, unit-std Gaussian random field smoothed with ``sigma`` voxels."""
    field_ = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="reflect")
    return (field_ - field_.mean()) / (field_.std() + 1e-8)


def synthesize_case(
    grid: _Grid, profile: SiteProfile, rng: np.random.Generator, tumours: str = _DEFAULTS.synth_tumours
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """One case as seen and annotated at a site.

    Returns ``{modality: float32 (X, Y, Z)}`` with zero background and the uint8 label ``(X, Y, Z)``
    in the internal scheme (0 bg, 1 NCR, 2 oedema, 3 enhancing). Anatomy draws from ``rng`` before
    the site's effects, so the same rng gives the same anatomy at every site. ``tumours`` names the
    tumour model (``_TUMOUR_MODELS``).
    """
    shape = grid.shape
    n = min(shape)
    brain, tissue = _anatomy(grid, rng)
    model = _TUMOUR_MODELS[tumours]
    for _ in range(10):  # redraw the rare tumour too small to hold all three labels
        tumour = _tumour(grid, brain, tissue, rng, model)
        true_label = tumour.label()
        if all(np.any(true_label == v) for v in (NCR, ED, ET)):
            break
    label = _annotate(tumour, brain, profile)
    true_tissue = tissue.copy()
    true_tissue[true_label == ED] = T_ED
    true_tissue[true_label == ET] = T_ET
    true_tissue[true_label == NCR] = T_NCR

    texture = 0.05 * _smooth_noise(rng, shape, 0.8) + 0.04 * _smooth_noise(rng, shape, n / 16)
    enhancement = 1.0 + 0.15 * _smooth_noise(rng, shape, 1.0) * (true_tissue == T_ET)
    log_bias = profile.bias * _smooth_noise(rng, shape, n / 3)
    case_gain = float(np.exp(rng.normal(0.0, 0.05)))  # scan-to-scan drift at one site
    images = {}
    for m in MODALITIES:
        signal = np.asarray(PROTOCOL_CONTRAST[profile.group][m], dtype=np.float32)[true_tissue]
        signal *= (1.0 + texture + 0.02 * _smooth_noise(rng, shape, 0.6)) * enhancement
        signal = ndimage.gaussian_filter(signal, 0.5 + profile.blur)  # partial volume + scanner blur
        signal = _thick_slices(signal, profile.slice_thickness)
        signal = np.clip(signal, 0.0, None) ** profile.gamma
        signal *= np.exp(log_bias) * profile.gain * profile.modality_gain[m] * case_gain
        sigma = profile.noise * profile.gain * profile.modality_gain[m]
        # Rician magnitude noise, as in magnitude MR images.
        noisy = np.hypot(signal + sigma * rng.standard_normal(shape, dtype=np.float32),
                         sigma * rng.standard_normal(shape, dtype=np.float32))
        noisy[~brain] = 0.0  # skull-stripped: zero outside the brain, like BraTS
        images[m] = noisy.astype(np.float32)
    return images, label


def _anatomy(grid: _Grid, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Brain mask and tissue classes (CSF, GM, WM) of one head."""
    shape, n = grid.shape, min(grid.shape)
    semi_axes = np.array([0.80, 0.86, 0.74]) * np.exp(rng.normal(0.0, 0.04, 3))
    centre = rng.normal(0.0, 0.02, 3)
    radius = np.sqrt(grid.sq_dist(centre, semi_axes)) + 0.04 * _smooth_noise(rng, shape, n / 8)
    brain = radius < 1.0
    depth = 1.0 - radius  # 0 at the brain surface, ~1 at the centre
    gyri = 0.035 * _smooth_noise(rng, shape, max(1.0, n / 24))
    tissue = np.full(shape, WM, dtype=np.uint8)
    tissue[depth < 0.13 + gyri] = GM
    tissue[depth < 0.025 + 0.5 * gyri] = CSF  # sulcal CSF
    ventricle_scale = np.array([0.07, 0.24, 0.12]) * np.exp(rng.normal(0.0, 0.1))
    for side in (-1.0, 1.0):
        c = centre + np.array([side * 0.11, 0.04, 0.08]) + rng.normal(0.0, 0.015, 3)
        tissue[grid.sq_dist(c, ventricle_scale) < 1.0] = CSF
    tissue[~brain] = BACKGROUND
    return brain, tissue


@dataclass
class _Tumour:
    """A tumour: core = ``field > level``; necrosis inside the core, oedema around it."""

    field: np.ndarray  # float32 (X, Y, Z): sum of Gaussian blobs
    level: float
    necrosis: np.ndarray  # bool (X, Y, Z): the core deeper than the enhancing rim
    whole: np.ndarray  # bool (X, Y, Z): the true whole tumour (includes the core)

    def label(self, core_level: float | None = None, whole: np.ndarray | None = None) -> np.ndarray:
        """Internal labels (uint8) for a core drawn at ``core_level`` and whole tumour ``whole``."""
        core = self.field > (self.level if core_level is None else core_level)
        label = np.zeros(self.field.shape, np.uint8)
        label[self.whole if whole is None else whole] = ED
        label[core] = ET
        label[core & self.necrosis] = NCR
        return label


def _tumour(grid: _Grid, brain: np.ndarray, tissue: np.ndarray, rng: np.random.Generator,
            model: TumourModel = _TUMOUR_MODELS["classic"]) -> _Tumour:
    """A random tumour of ``model``: a few overlapping Gaussian blobs, random size, position and shape.

    The enhancing rim is a shell of the core whose thickness is a random fraction of the core's
    depth; oedema comes from a wider copy of the blobs and spreads further along white matter.
    The "classic" model draws exactly what the first generator drew.
    """
    shape, n = grid.shape, min(grid.shape)
    size = float(np.exp(rng.uniform(*np.log(model.size))))  # blob width in [-1, 1] units
    centre = _tumour_centre(shape, brain, tissue, rng, model.centre)
    core_field = np.zeros(shape, np.float32)
    wide_field = np.zeros(shape, np.float32)
    oedema_spread = rng.uniform(*model.oedema_spread)

    def add_blobs(centre: np.ndarray, size: float, count: int) -> None:
        for _ in range(count):
            c = centre + rng.normal(0.0, model.blob_spread * size, 3)
            width = size * rng.uniform(0.6, 1.0) * np.exp(rng.normal(0.0, model.anisotropy, 3))  # anisotropic
            amplitude = rng.uniform(0.6, 1.0)
            core_field[...] += amplitude * np.exp(-0.5 * grid.sq_dist(c, width))
            wide_field[...] += amplitude * np.exp(-0.5 * grid.sq_dist(c, width * oedema_spread))

    add_blobs(centre, size, int(rng.integers(*model.blobs)))
    if model.satellite > 0 and rng.random() < model.satellite:  # multifocal: a smaller second tumour
        add_blobs(_tumour_centre(shape, brain, tissue, rng, model.centre), size * rng.uniform(0.5, 0.9),
                  int(rng.integers(1, 3)))
    core_field *= 1.0 + model.outline * _smooth_noise(rng, shape, max(1.0, n / 24))  # irregular outline
    wide_field *= (1.0 + 0.15 * _smooth_noise(rng, shape, n / 12)) * np.where(tissue == WM, 1.15, 0.85)
    core_field[~brain] = 0.0
    level = _CORE_LEVEL * float(core_field.max())
    core = core_field > level
    depth = ndimage.distance_transform_edt(core)
    fraction = float(rng.uniform(*model.rim_fraction))
    if model.rim_variation > 0:  # a rim of varying thickness, at least a voxel everywhere
        rim = np.maximum(1.0, fraction * float(depth.max())
                         * (1.0 + model.rim_variation * _smooth_noise(rng, shape, max(1.0, n / 10))))
    else:
        rim = max(1.0, fraction * float(depth.max()))
    necrosis = depth > rim
    if model.necrosis_patchiness[1] > 0 and necrosis.any():  # patchy necrosis; the rest enhances (solid)
        patch = _smooth_noise(rng, shape, max(1.0, n / 12))
        cut = float(np.quantile(patch[necrosis], rng.uniform(*model.necrosis_patchiness)))
        necrosis &= patch >= cut
    whole = ((wide_field > _WT_LEVEL * float(wide_field.max())) & brain) | core
    return _Tumour(core_field, level, necrosis, whole)


def _tumour_centre(shape: tuple[int, int, int], brain: np.ndarray, tissue: np.ndarray, rng: np.random.Generator,
                   spread: float) -> np.ndarray:
    """A tumour centre in [-spread, spread]^3 inside the brain and outside the CSF."""
    for _ in range(1000):
        centre = rng.uniform(-spread, spread, 3)
        idx = tuple(int(round((c + 1) / 2 * (s - 1))) for c, s in zip(centre, shape))
        if brain[idx] and tissue[idx] != CSF:
            break
    return centre


def _annotate(tumour: _Tumour, brain: np.ndarray, profile: SiteProfile) -> np.ndarray:
    """The label a site's rater draws (internal scheme), in the site's annotation style.

    Wide oedema: the whole-tumour outline dilated by ``oedema_dilation`` voxels (within the brain).
    Tight core: the core boundary at a higher level of the same field; should that leave no
    enhancing voxel (a tiny tumour), the reference core is kept.
    """
    whole = tumour.whole
    if profile.oedema_dilation > 0:
        whole = ndimage.binary_dilation(whole, iterations=profile.oedema_dilation) & brain
    peak = float(tumour.field.max())
    label = tumour.label(tumour.level + profile.core_tightening * peak, whole)
    if not (np.any(label == ET) and np.any(label == NCR)):
        label = tumour.label(None, whole)
    return label


def _thick_slices(volume: np.ndarray, thickness: int) -> np.ndarray:
    """Average ``thickness`` neighbouring slices along the last axis and repeat them (thick-slice MRI)."""
    if thickness <= 1:
        return volume
    starts = np.arange(0, volume.shape[-1], thickness)
    counts = np.diff(np.append(starts, volume.shape[-1]))
    means = np.add.reduceat(volume, starts, axis=-1) / counts
    return np.repeat(means, counts, axis=-1).astype(volume.dtype)


# --------------------------------------------------------------------------------------------
# Files


def _affine(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> np.ndarray:
    """An LPS-style affine like BraTS's (x and y flipped), origin at the volume centre."""
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = [spacing[0] * (shape[0] - 1) / 2, spacing[1] * (shape[1] - 1) / 2, -spacing[2] * (shape[2] - 1) / 2]
    return affine


def _save(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm")
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    nib.save(img, path)


def _write_case(
    data_root: Path, case_id: str, images: dict[str, np.ndarray], label: np.ndarray, affine: np.ndarray
) -> Case:
    folder = data_root / case_id
    folder.mkdir(parents=True)
    rel = []
    for m in MODALITIES:
        name = f"{case_id}/{case_id}_{m}.nii.gz"
        _save(images[m], affine, data_root / name)
        rel.append(name)
    label_name = f"{case_id}/{case_id}_seg.nii.gz"
    _save(from_internal(label, CONVENTION), affine, data_root / label_name)
    return Case(case_id, tuple(rel), MODALITIES, label_name, CONVENTION)


def is_synth_output(folder: Path | str) -> bool:
    """True when ``folder`` holds a ``synth.json`` written by this generator."""
    marker = Path(folder) / "synth.json"
    try:
        return json.loads(marker.read_text()).get("generator") == GENERATOR
    except (OSError, ValueError, AttributeError):
        return False


def _prepare_output(out: Path) -> None:
    """Refuse foreign non-empty folders; clear the generated parts of an earlier synth output."""
    if out.exists() and not out.is_dir():
        raise SynthError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not is_synth_output(out):
            raise SynthError(
                f"{out}: folder is not empty and is not a fedseg synthetic dataset (no synth.json "
                "from the generator); choose an empty or new folder"
            )
        for name in ("data", "test", "datalists"):
            shutil.rmtree(out / name, ignore_errors=True)
        (out / "institutions.csv").unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def load_synth_config(out: Path | str) -> SynthConfig:
    """The config an earlier synth output was generated with (from its ``synth.json``)."""
    out = Path(out)
    if not is_synth_output(out):
        raise SynthError(f"{out}: no synth.json from the fedseg generator")
    document = json.loads((out / "synth.json").read_text())
    cfg = document["config"]
    if document.get("version", 1) < 2:
        cfg = {**_VERSION_1, **cfg}
    return replace(SynthConfig(), **{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()})


__all__ = [
    "CONTRAST",
    "SiteProfile",
    "SynthConfig",
    "SynthError",
    "SynthResult",
    "generate",
    "is_synth_output",
    "load_synth_config",
    "site_profiles",
    "synthesize_case",
]
