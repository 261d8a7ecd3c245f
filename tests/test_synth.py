"""The synthetic multi-site generator: layout, determinism, MRI-like contrast, site differences, the
consortium's site sizes, held-out test cases and the tumour models."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fedseg.cli import main
from fedseg.config import SynthSettings, profile
from fedseg.lightning_modules.data.datalist import MODALITIES, read_datalist
from fedseg.lightning_modules.data.synth import (
    SynthConfig,
    SynthError,
    _Grid,
    generate,
    load_synth_config,
    site_profiles,
    synthesize_case,
)
from fedseg.lightning_modules.labels import to_internal
from fedseg.lightning_modules.test_sets import check_held_out, read_test_set

CFG = SynthConfig(n_sites=3, cases_per_site=3, test_cases=2, shape=(24, 24, 24), spacing=(1.5, 1.5, 2.0), seed=3)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return generate(CFG, tmp_path_factory.mktemp("synth") / "out")


def _load(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(path).dataobj)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_shapes_dtypes_affine_and_labels(synth):
    all_cases = read_datalist(synth.all_datalist).cases
    assert len(all_cases) == 9
    for case in all_cases:
        folder = synth.data_root / case.case_id
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            f"{case.case_id}_{m}.nii.gz" for m in ("flair", "seg", "t1", "t1ce", "t2")
        )
        seg_img = nib.load(folder / f"{case.case_id}_seg.nii.gz")
        assert seg_img.header.get_data_dtype() == np.uint8
        assert seg_img.shape == (24, 24, 24)
        assert seg_img.header.get_zooms() == (1.5, 1.5, 2.0)
        assert np.allclose(np.diag(seg_img.affine)[:3], [-1.5, -1.5, 2.0])  # LPS like BraTS
        seg = np.asanyarray(seg_img.dataobj)
        assert set(np.unique(seg).tolist()) == {0, 1, 2, 4}  # BraTS 2021 values, every class present
        brain = None
        for m in MODALITIES:
            img = nib.load(folder / f"{case.case_id}_{m}.nii.gz")
            assert img.header.get_data_dtype() == np.float32 and img.shape == (24, 24, 24)
            data = np.asanyarray(img.dataobj)
            assert data.min() >= 0
            mask = data > 0
            brain = mask if brain is None else brain
            assert np.array_equal(mask, brain)  # one skull-stripped mask for all modalities
        assert 0.2 < brain.mean() < 0.6  # a head in the field of view, zero background around it
        assert not brain[0].any() and not brain[:, :, -1].any()
        assert np.all(brain[seg > 0])  # the tumour lies inside the brain


def test_datalists_institutions_and_config(synth):
    assert sorted(synth.datalists) == ["site-1", "site-2", "site-3"]
    seen = []
    for name, path in synth.datalists.items():
        assert path == synth.out / "datalists" / f"{name}.json"
        assert json.loads(path.read_text())["data_root"] == "../data"
        dl = read_datalist(path)
        assert (len(dl.training), len(dl.validation)) == (2, 1)  # 3 cases, val_fraction 0.25
        assert dl.meta["site"] == name and dl.meta["profile"]["name"] == name
        for case in dl.cases:
            assert case.case_id.startswith(name.replace("-", "")) and case.convention == "brats2021"
            assert all(p.is_file() for p in case.paths(dl.data_root))
        seen += [c.case_id for c in dl.cases]
    union = read_datalist(synth.all_datalist)
    assert sorted(c.case_id for c in union.cases) == sorted(seen) and len(set(seen)) == 9
    with synth.institutions_csv.open() as f:
        rows = list(csv.DictReader(f))
    assert {r["case_id"]: r["institution"] for r in rows} == {
        c: f"site-{c[4]}" for c in seen
    }
    document = json.loads(synth.config_path.read_text())
    assert document["complete"] is True and document["label_convention"] == "brats2021"
    assert [s["name"] for s in document["sites"]] == ["site-1", "site-2", "site-3"]
    assert load_synth_config(synth.out) == CFG
    assert "3 sites x 3 cases" in synth.summary()


def test_same_config_same_bytes_other_seed_differs(synth, tmp_path):
    again = generate(CFG, tmp_path / "again")
    assert _files(again.out) == _files(synth.out)  # every file, voxel data and datalists alike
    other = generate(SynthConfig(**{**CFG.__dict__, "seed": 4}), tmp_path / "other")
    a = _load(synth.data_root / "site1_case001/site1_case001_seg.nii.gz")
    b = _load(other.data_root / "site1_case001/site1_case001_seg.nii.gz")
    assert not np.array_equal(a, b)


def test_refuses_foreign_folder_and_regenerates_over_own_output(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(SynthError, match="not empty and is not a fedseg synthetic dataset"):
        generate(CFG, foreign)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]

    out = tmp_path / "out"
    generate(SynthConfig(n_sites=3, cases_per_site=2, test_cases=1, shape=(16, 16, 16)), out)
    generate(SynthConfig(n_sites=2, cases_per_site=2, test_cases=1, shape=(16, 16, 16)), out)
    assert sorted(p.name for p in (out / "datalists").iterdir()) == [
        "all.json", "site-1.json", "site-1.test.json", "site-2.json", "site-2.test.json"
    ]
    assert sorted(p.name for p in (out / "data").iterdir()) == [
        "site1_case001", "site1_case002", "site2_case001", "site2_case002"
    ]
    assert sorted(p.name for p in (out / "test").iterdir()) == ["site1_test001", "site2_test001"]


def test_contrast_is_mri_like_and_needs_several_modalities(synth):
    """On the reference site: FLAIR/T2 bright oedema, T1ce bright rim, T1 dark core, CSF dark on FLAIR."""
    dl = read_datalist(synth.datalists["site-1"])
    for case in dl.cases:
        label = to_internal(_load(synth.data_root / case.label), "brats2021")
        img = {m: _load(case.image_path(m, dl.data_root)) for m in MODALITIES}
        brain = img["t1"] > 0
        normal = brain & (label == 0)

        def mean(m, region):
            return float(img[m][region].mean())

        ncr, ed, et = label == 1, label == 2, label == 3
        assert mean("flair", ed) > 1.3 * mean("flair", normal)
        assert mean("t2", ed) > 1.2 * mean("t2", normal)
        assert mean("t1ce", et) > 1.2 * max(mean("t1ce", ncr), mean("t1ce", ed), mean("t1ce", normal))
        assert mean("t1", ncr) < 0.7 * mean("t1", normal)
        # T1ce alone does not tell oedema from normal tissue; FLAIR does.
        assert abs(mean("t1ce", ed) / mean("t1ce", normal) - 1) < 0.3


def test_sites_differ_in_scanner_intensities(synth):
    def stats(site):
        dl = read_datalist(synth.datalists[site])
        medians, noise = [], []
        for case in dl.cases:
            t1 = _load(case.image_path("t1", dl.data_root)).astype(np.float64)
            brain = t1 > 0
            med = np.median(t1[brain])
            medians.append(med)
            # noise: spread of the difference of neighbouring voxels inside the brain, relative to the median
            inside = brain[1:] & brain[:-1]
            noise.append(np.median(np.abs(np.diff(t1, axis=0)[inside])) / med)
        return float(np.mean(medians)), float(np.mean(noise))

    (m1, n1), (m2, n2), (m3, n3) = stats("site-1"), stats("site-2"), stats("site-3")
    profiles = {p["name"]: p for p in json.loads(synth.config_path.read_text())["sites"]}
    assert profiles["site-2"]["gain"] < profiles["site-1"]["gain"] < profiles["site-3"]["gain"]
    assert m2 < 0.8 * m1 and m3 > 1.3 * m1  # gains 600 / 1000 / 1800 in scanner units
    assert n2 > 1.3 * n1  # site-2 scans are noisier


def test_annotation_style_changes_labels_of_the_same_anatomy(tmp_path):
    """Same seed, heterogeneity 0 vs 1: same anatomy, so label differences are the site's style."""
    base = dict(n_sites=3, cases_per_site=2, shape=(24, 24, 24), seed=11)
    iid = generate(SynthConfig(**base, heterogeneity=0.0), tmp_path / "iid")
    styled = generate(SynthConfig(**base, heterogeneity=1.0), tmp_path / "styled")
    for i in (1, 2):
        labels = {}
        for site in (1, 2, 3):
            rel = f"site{site}_case{i:03d}/site{site}_case{i:03d}_seg.nii.gz"
            labels[site] = (_load(iid.data_root / rel), _load(styled.data_root / rel))
        ref, same = labels[1]
        assert np.array_equal(ref, same)  # the reference rater draws alike at any heterogeneity
        plain, wide = labels[2]  # site-2: oedema drawn wider, core untouched
        assert (wide > 0).sum() > 1.1 * (plain > 0).sum() and np.all(wide[plain > 0] > 0)
        assert np.array_equal(np.isin(wide, (1, 4)), np.isin(plain, (1, 4)))
        plain, tight = labels[3]  # site-3: core drawn tighter, whole tumour untouched
        core_plain, core_tight = np.isin(plain, (1, 4)), np.isin(tight, (1, 4))
        assert core_tight.sum() < core_plain.sum() and not np.any(core_tight & ~core_plain)
        assert np.array_equal(tight > 0, plain > 0)


def test_profiles_scale_with_heterogeneity_and_extend_to_many_sites():
    flat = site_profiles(SynthConfig(n_sites=6, heterogeneity=0.0))
    assert len({(p.gain, p.gamma, p.noise, p.oedema_dilation, p.core_tightening) for p in flat}) == 1
    many = site_profiles(SynthConfig(n_sites=6))
    assert [p.name for p in many] == [f"site-{k}" for k in range(1, 7)]
    assert len({p.gain for p in many}) == 6
    assert site_profiles(SynthConfig(n_sites=6)) == many  # seeded
    assert site_profiles(SynthConfig(n_sites=3)) == many[:3]  # adding sites changes no earlier site


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n_sites=0), "at least 1 site"),
        (dict(val_fraction=1.0), "val_fraction"),
        (dict(shape=(8, 8, 8)), "at least 16 voxels"),
        (dict(spacing=(1.0, 0.0, 1.0)), "spacing"),
        (dict(heterogeneity=-1), "heterogeneity"),
        (dict(site_cases=(24, 0, 4)), "at least 1 case per site"),
        (dict(site_cases=()), "at least 1 site and 1 case"),
        (dict(test_cases=-1), "test_cases"),
        (dict(tumours="spiky"), "unknown tumours 'spiky'; known: varied, classic"),
    ],
)
def test_bad_config_is_refused(kwargs, message):
    with pytest.raises(SynthError, match=message):
        SynthConfig(**kwargs)


# --------------------------------------------------------------------------------------------
# One source of defaults; the consortium


def test_generator_and_command_take_their_defaults_from_synth_settings():
    settings = SynthSettings()
    assert SynthConfig.from_settings(settings) == SynthConfig()
    cfg = SynthConfig()
    assert (cfg.n_sites, cfg.site_cases, cfg.test_cases) == (settings.sites, settings.site_cases, settings.test_cases)
    assert cfg.shape == (settings.size,) * 3 and cfg.tumours == settings.synth_tumours == "varied"
    assert cfg.site_cases == (24, 8, 4)  # the consortium: a large, a medium and a small hospital
    tiny = profile("tiny").synth  # the test suite's sites stay small and uniform
    assert SynthConfig.from_settings(tiny).site_cases == (4, 4) and tiny.test_cases == 2
    assert SynthConfig.from_settings(tiny).tumours == "classic"  # the e2e tests' learning thresholds' data
    assert SynthConfig.from_settings(tiny, n_sites=3).site_cases == (4, 4, 4)


@pytest.mark.parametrize(
    "kwargs, counts",
    [
        (dict(), (24, 8, 4)),
        (dict(n_sites=5), (24, 8, 4, 24, 8)),  # repeated in turn
        (dict(n_sites=2, site_cases=(5, 3, 1)), (5, 3)),
        (dict(n_sites=2, cases_per_site=3), (3, 3)),  # a uniform count wins over site_cases
        (dict(n_sites=3, site_cases=6), (6, 6, 6)),
    ],
)
def test_cases_of_each_site(kwargs, counts):
    assert SynthConfig(**kwargs).site_cases == counts
    settings = {"sites": kwargs.get("n_sites", 3), "cases": kwargs.get("cases_per_site", 0)}
    if "site_cases" in kwargs:
        settings["site_cases"] = kwargs["site_cases"]
    assert SynthSettings(**settings).cases_at_sites() == counts


@pytest.fixture(scope="module")
def consortium(tmp_path_factory):
    """A small consortium through the command line: sites of 5, 3 and 2 cases, 3 test cases each."""
    out = tmp_path_factory.mktemp("consortium") / "out"
    argv = ["data", "synth", "--out", str(out), "--site-cases", "5", "3", "2", "--test-cases", "3", "--size", "16",
            "--seed", "5"]
    assert main(argv) == 0
    return out


def test_consortium_sites_have_their_sizes_and_their_own_test_cases(consortium):
    document = json.loads((consortium / "synth.json").read_text())
    assert document["config"]["site_cases"] == [5, 3, 2] and document["config"]["test_cases"] == 3
    for k, n in enumerate((5, 3, 2), start=1):
        site = f"site-{k}"
        dl = read_datalist(consortium / "datalists" / f"{site}.json")
        assert len(dl.cases) == n and len(dl.training) >= 1 and len(dl.validation) == 1
        tests = read_test_set(consortium / "datalists" / f"{site}.test.json")
        assert tests.site == site and tests.meta["role"] == "test"
        assert [c.case_id for c in tests.cases] == [f"site{k}_test{i:03d}" for i in (1, 2, 3)]
        assert tests.data_root == (consortium / "test").resolve()
        assert all(p.is_file() for c in tests.cases for p in c.paths(tests.data_root))
        assert tests.meta["profile"] == dl.meta["profile"]  # the same scanner and rater as the site's cases
        assert document["test_datalists"][site] == f"datalists/{site}.test.json"
        assert document["test_cases"][site] == [c.case_id for c in tests.cases]
    # a test datalist has nothing to train or validate on: handed to training by mistake, it is empty
    empty = read_datalist(consortium / "datalists" / "site-1.test.json")
    assert empty.training == [] and empty.validation == []


def test_a_test_case_is_in_no_training_or_validation_datalist(consortium):
    lists = sorted((consortium / "datalists").glob("*.json"))
    training_lists = [p for p in lists if not p.name.endswith(".test.json")]
    assert len(training_lists) == 4  # site-1..3 and all.json
    trained_on = set()
    for path in training_lists:
        dl = read_datalist(path)
        trained_on |= {c.case_id for c in dl.cases} | {str((dl.data_root / c.label).resolve()) for c in dl.cases}
    for path in (p for p in lists if p.name.endswith(".test.json")):
        tests = read_test_set(path)
        assert not {c.case_id for c in tests.cases} & trained_on
        assert not {str((tests.data_root / c.label).resolve()) for c in tests.cases} & trained_on
        check_held_out(tests, training_lists)  # the library's check agrees
    assert not set((consortium / "institutions.csv").read_text().split()) & {
        f"site{k}_test{i:03d},site-{k}" for k in (1, 2, 3) for i in (1, 2, 3)}


def test_test_cases_do_not_change_when_a_site_gets_more_cases(tmp_path):
    small = generate(SynthConfig(n_sites=1, site_cases=(2,), test_cases=2, shape=(16,) * 3, seed=9), tmp_path / "s")
    large = generate(SynthConfig(n_sites=1, site_cases=(4,), test_cases=2, shape=(16,) * 3, seed=9), tmp_path / "l")
    assert _files(small.out / "test") == _files(large.out / "test")
    for c in ("site1_case001", "site1_case002"):  # the small site's cases are the large site's first ones
        assert _files(small.data_root / c) == _files(large.data_root / c)
    train_label = _load(large.data_root / "site1_case001/site1_case001_seg.nii.gz")
    test_label = _load(large.out / "test/site1_test001/site1_test001_seg.nii.gz")
    assert not np.array_equal(train_label, test_label)


def test_classic_tumours_reproduce_the_first_generator(tmp_path):
    """Label voxel counts (NCR, oedema, enhancing) of the first generator's cases at CFG's settings."""
    out = generate(SynthConfig(**{**CFG.__dict__, "tumours": "classic", "test_cases": 0}), tmp_path / "classic")
    for case, counts in (("site1_case001", [7, 31, 26]), ("site3_case002", [7, 112, 24])):
        label = _load(out.data_root / case / f"{case}_seg.nii.gz")
        assert [int((label == v).sum()) for v in (1, 2, 4)] == counts


def test_varied_tumours_vary_more_and_have_thinner_structures():
    """Over 24 cases at 32^3: tumour sizes spread wider, positions at least as wide, necrosis a smaller part
    of the core (the enhancing part thicker or the necrosis patchy)."""
    grid, reference = _Grid((32, 32, 32)), site_profiles(SynthConfig(n_sites=1))[0]
    stats = {}
    for model in ("classic", "varied"):
        volumes, centres, ncr_share = [], [], []
        for i in range(24):
            _, label = synthesize_case(grid, reference, np.random.default_rng([1, 0, i]), model)
            whole, core = label > 0, np.isin(label, (1, 3))
            volumes.append(whole.sum())
            centres.append(np.argwhere(whole).mean(axis=0))
            ncr_share.append((label == 1).sum() / core.sum())
        stats[model] = (np.std(np.log(volumes)), np.linalg.norm(np.std(centres, axis=0)), np.median(ncr_share))
    (size_c, pos_c, ncr_c), (size_v, pos_v, ncr_v) = stats["classic"], stats["varied"]
    assert size_v > 1.3 * size_c and pos_v > pos_c and ncr_v < 0.5 * ncr_c, stats


def test_a_version_1_synth_json_loads_as_what_it_was_made_with(synth, tmp_path):
    document = json.loads(synth.config_path.read_text())
    document["version"] = 1
    for key in ("site_cases", "test_cases", "tumours"):
        document["config"].pop(key)
    old = tmp_path / "old"
    old.mkdir()
    (old / "synth.json").write_text(json.dumps(document))
    cfg = load_synth_config(old)
    assert (cfg.site_cases, cfg.test_cases, cfg.tumours) == ((3, 3, 3), 0, "classic")
