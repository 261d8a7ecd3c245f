"""Splitting one pool of cases into federated sites: every mode, reproducibility, files, summary."""

from __future__ import annotations

import csv
import json
import statistics

import nibabel as nib
import numpy as np
import pytest

from fedseg.lightning_modules.data.datalist import Case, read_datalist
from fedseg.lightning_modules.data.splits import (
    SplitError,
    format_summary,
    read_summary,
    split_cases,
    train_val_split,
    write_split,
)

N_CASES = 24
VOXEL_ML = 2.0**3 / 1000  # 2 mm voxels


def _volume_ml(i: int) -> float:
    return 3 * (i + 1) * VOXEL_ML  # case i has 3 * (i + 1) tumour voxels


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """24 tiny labelled cases (8^3 voxels of 2 mm) with known tumour volumes; ``(cases, root)``."""
    root = tmp_path_factory.mktemp("pool") / "data"
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    cases = []
    for i in range(N_CASES):
        case_id = f"case{i:02d}"
        (root / case_id).mkdir(parents=True)
        seg = np.zeros((8, 8, 8), np.uint8)
        seg.reshape(-1)[: 3 * (i + 1)] = np.array([2, 1, 4])[np.arange(3 * (i + 1)) % 3]
        nib.save(nib.Nifti1Image(seg, affine), root / case_id / f"{case_id}_seg.nii.gz")
        nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), affine), root / case_id / f"{case_id}_t1.nii.gz")
        cases.append(Case(case_id, (f"{case_id}/{case_id}_t1.nii.gz",), ("t1",),
                          f"{case_id}/{case_id}_seg.nii.gz", "brats2021"))
    return cases, root


@pytest.fixture(scope="module")
def institutions(pool, tmp_path_factory):
    """A CSV putting the cases of the pool in 4 institutions of unequal size, ids out of order."""
    cases, _ = pool
    inst = {c.case_id: ["10", "2", "2", "7", "7", "7"][i % 6] for i, c in enumerate(cases)}
    path = tmp_path_factory.mktemp("csv") / "partitioning.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["case_id", "institution"])
        w.writerow(["not_in_pool", "99"])  # partitions list the whole dataset: extra rows are fine
        w.writerows(sorted(inst.items(), reverse=True))
    return path, inst


def _split(pool, mode, **kw):
    cases, root = pool
    n_sites = kw.pop("n_sites", None if mode == "institution" else 3)
    return split_cases(cases, n_sites, mode, data_root=root, **kw)


def _assignment(datalists):
    return {name: ([c.case_id for c in dl.training], [c.case_id for c in dl.validation])
            for name, dl in datalists.items()}


def _extra(mode, institutions):
    return {"institutions_csv": institutions[0]} if mode == "institution" else {}


@pytest.mark.parametrize("mode", ["iid", "unequal", "dirichlet", "institution"])
def test_every_mode_is_disjoint_complete_and_reproducible(pool, institutions, mode):
    extra = _extra(mode, institutions)
    sites = _split(pool, mode, seed=5, **extra)
    ids = [c.case_id for dl in sites.values() for c in dl.cases]
    assert sorted(ids) == sorted(c.case_id for c in pool[0])  # complete, and no case twice
    assert len(ids) == len(set(ids))
    assert list(sites) == [f"site-{k}" for k in range(1, len(sites) + 1)]
    for name, dl in sites.items():
        assert dl.training and dl.validation  # every site trains and validates
        assert dl.meta["site"] == name and dl.meta["split"]["mode"] == mode
        assert dl.data_root == pool[1].resolve()
    assert _assignment(_split(pool, mode, seed=5, **extra)) == _assignment(sites)
    assert _assignment(_split(pool, mode, seed=6, **extra)) != _assignment(sites)


def test_val_fraction_does_not_move_cases_between_sites(pool):
    a = _split(pool, "iid", seed=1, val_fraction=0.2)
    b = _split(pool, "iid", seed=1, val_fraction=0.5)
    for name in a:
        assert {c.case_id for c in a[name].cases} == {c.case_id for c in b[name].cases}
    assert [len(dl.validation) for dl in b.values()] == [4, 4, 4]


def test_iid_is_balanced(pool):
    sites = _split(pool, "iid", n_sites=5)
    assert sorted(len(dl.cases) for dl in sites.values()) == [4, 5, 5, 5, 5]


def test_unequal_sizes_from_proportions_and_power_law(pool):
    sites = _split(pool, "unequal", sizes=[3, 2, 1])
    # 2 per site first, the other 18 split 9/6/3
    assert [len(dl.cases) for dl in sites.values()] == [11, 8, 5]
    assert sites["site-1"].meta["split"]["proportions"] == pytest.approx([0.5, 1 / 3, 1 / 6], abs=1e-5)
    sizes = {seed: [len(dl.cases) for dl in _split(pool, "unequal", n_sites=4, seed=seed).values()]
             for seed in range(5)}
    assert all(sum(s) == N_CASES and min(s) >= 2 for s in sizes.values())
    assert any(max(s) >= 2 * min(s) for s in sizes.values())  # a power law, not equal shares
    assert len({tuple(s) for s in sizes.values()}) > 1  # seeded
    with pytest.raises(SplitError, match="3 positive numbers"):
        _split(pool, "unequal", sizes=[1, 2])


def test_dirichlet_skews_tumour_volumes_across_sites(pool):
    def spread(sites):
        """How far apart the sites' median volumes are, relative to the pool's range."""
        medians = [statistics.median(_volume_ml(int(c.case_id[4:])) for c in dl.cases) for dl in sites.values()]
        return (max(medians) - min(medians)) / (_volume_ml(N_CASES - 1) - _volume_ml(0))

    iid = np.mean([spread(_split(pool, "iid", seed=s)) for s in range(8)])
    skewed = np.mean([spread(_split(pool, "dirichlet", alpha=0.1, seed=s)) for s in range(8)])
    assert skewed > 1.5 * iid
    assert np.mean([spread(_split(pool, "dirichlet", alpha=100.0, seed=s)) for s in range(8)]) < skewed


def test_dirichlet_gives_every_site_two_cases_and_records_volumes(pool):
    for seed in range(5):
        sites = _split(pool, "dirichlet", n_sites=6, alpha=0.01, seed=seed)
        assert min(len(dl.cases) for dl in sites.values()) >= 2
    volumes = {k: v for dl in sites.values() for k, v in dl.meta["wt_volume_ml"].items()}
    assert volumes == {f"case{i:02d}": pytest.approx(_volume_ml(i)) for i in range(N_CASES)}


def test_dirichlet_needs_labels(pool):
    cases, root = pool
    unlabeled = [Case(c.case_id, c.images, c.modalities, None, c.convention) for c in cases[:6]]
    with pytest.raises(SplitError, match="without a label: case00, case01"):
        split_cases(unlabeled + cases[6:], 3, "dirichlet", data_root=root)


def test_institution_mapping_and_names(pool, institutions):
    path, inst = institutions
    sites = _split(pool, "institution", institutions_csv=path)
    # natural order of institution names: 2, 7, 10
    assert [dl.meta["institution"] for dl in sites.values()] == ["2", "7", "10"]
    for dl in sites.values():
        assert {inst[c.case_id] for c in dl.cases} == {dl.meta["institution"]}
    named = _split(pool, "institution", institutions_csv=path, name_by_institution=True)
    assert list(named) == ["2", "7", "10"]
    with pytest.raises(SplitError, match="3 institutions, but 4 sites"):
        _split(pool, "institution", institutions_csv=path, n_sites=4)


def test_institution_csv_in_fets_columns(pool, tmp_path):
    cases, root = pool
    path = tmp_path / "partitioning_1.csv"
    path.write_text("Subject_ID,Partition_ID\n" + "".join(f"{c.case_id},{i % 2 + 1}\n" for i, c in enumerate(cases)))
    sites = split_cases(cases, 2, "institution", institutions_csv=path, data_root=root)
    assert [len(dl.cases) for dl in sites.values()] == [12, 12]


def test_institution_csv_missing_cases_are_listed(pool, tmp_path):
    cases, root = pool
    path = tmp_path / "partial.csv"
    path.write_text("case_id,institution\n" + "".join(f"{c.case_id},A\n" for c in cases[2:]))
    with pytest.raises(SplitError, match=r"partial.csv: 2 case\(s\) not listed: case00, case01"):
        split_cases(cases, None, "institution", institutions_csv=path, data_root=root)
    path.write_text("case_id,institution\ncase00,A\ncase00,B\n")
    with pytest.raises(SplitError, match="case00 listed for two institutions"):
        split_cases(cases, None, "institution", institutions_csv=path, data_root=root)
    path.write_text("id,hospital\ncase00,A\n")
    with pytest.raises(SplitError, match="needs a case column"):
        split_cases(cases, None, "institution", institutions_csv=path, data_root=root)


@pytest.mark.parametrize(
    "args, kwargs, message",
    [
        ((3, "random"), {}, "unknown split mode 'random'"),
        ((13, "dirichlet"), {}, "24 cases cannot make 13 sites"),
        ((0, "iid"), {}, "number of sites >= 1"),
        ((3, "iid"), {"val_fraction": 1.0}, "val_fraction"),
        ((3, "institution"), {}, "needs institutions_csv"),
    ],
)
def test_bad_requests_are_refused(pool, args, kwargs, message):
    with pytest.raises(SplitError, match=message):
        split_cases(pool[0], *args, data_root=pool[1], **kwargs)


def test_duplicate_case_ids_are_refused(pool):
    cases, root = pool
    with pytest.raises(SplitError, match="repeated: case03"):
        split_cases([*cases, cases[3]], 2, "iid", data_root=root)


def test_train_val_split_sizes():
    rng = np.random.default_rng(0)
    assert [len(x) for x in train_val_split(list(range(10)), 0.2, rng)] == [8, 2]
    assert [len(x) for x in train_val_split([1, 2], 0.1, rng)] == [1, 1]  # at least one validates
    assert [len(x) for x in train_val_split([1], 0.5, rng)] == [1, 0]  # a single case trains
    train, val = train_val_split(list(range(10)), 0.3, rng)
    assert train == sorted(train) and val == sorted(val)  # input order kept


def test_write_split_files_summary_and_table(pool, institutions, tmp_path):
    sites = _split(pool, "iid", seed=2)
    out = tmp_path / "splits"
    summary = write_split(sites, out)
    assert summary == out.resolve() / "summary.csv"
    assert sorted(p.name for p in out.iterdir()) == [
        "all.json", "site-1.json", "site-2.json", "site-3.json", "summary.csv"
    ]
    for name, dl in sites.items():
        back = read_datalist(out / f"{name}.json")
        assert [c.case_id for c in back.training] == [c.case_id for c in dl.training]
        assert all(p.is_file() for c in back.cases for p in c.paths(back.data_root))
    assert len(read_datalist(out / "all.json").cases) == N_CASES
    rows = read_summary(summary)
    for row, dl in zip(rows, sites.values()):
        vols = [_volume_ml(int(c.case_id[4:])) for c in dl.cases]
        assert (row.site, row.n_train, row.n_val) == (dl.meta["site"], len(dl.training), len(dl.validation))
        assert row.wt_ml_mean == pytest.approx(np.mean(vols), abs=1e-3)
        assert row.wt_ml_median == pytest.approx(statistics.median(vols), abs=1e-3)
    table = format_summary(summary)
    assert "site-3" in table and table.splitlines()[-1].split()[1:] == [
        str(sum(r.n_train for r in rows)), str(sum(r.n_val for r in rows))
    ]

    # A new split with fewer sites, named after institutions, replaces the old datalists.
    named = _split(pool, "institution", institutions_csv=institutions[0], name_by_institution=True)
    write_split(named, out)
    assert sorted(p.name for p in out.iterdir()) == ["10.json", "2.json", "7.json", "all.json", "summary.csv"]
    assert json.loads((out / "7.json").read_text())["meta"]["institution"] == "7"


def test_write_split_refuses_to_write_into_the_data(pool):
    sites = _split(pool, "iid")
    with pytest.raises(SplitError, match="inside the data folder"):
        write_split(sites, pool[1] / "splits")
    assert not (pool[1] / "splits").exists()
