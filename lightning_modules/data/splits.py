"""Split one pool of cases into federated sites, each with training and validation cases.

Modes (all reproducible by ``seed``):

* ``iid`` - shuffle, equal sizes (differing by at most one case);
* ``unequal`` - sizes from given proportions, or from a seeded power law (a few big hospitals,
  many small ones);
* ``dirichlet`` - non-IID by tumour size: cases are binned by whole-tumour volume quantiles and
  each bin is spread over the sites with Dirichlet(``alpha``) proportions (small ``alpha``: each
  site sees mostly some tumour sizes). Every site gets at least two cases;
* ``institution`` - one site per institution from a CSV with columns ``case_id,institution``
  (the form BraTS / FeTS partitions are published in; ``Subject_ID,Partition_ID`` is read too).

Only ``list[Case]`` and the data root are needed; the layout that found the cases does not matter.
Tumour volumes (labels read with nibabel) are needed only by ``dirichlet`` and the summary.
"""

from __future__ import annotations

import csv
import re
from collections import Counter
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

import nibabel as nib
import numpy as np

from fedseg.config import SPLIT_MODES, SplitSettings
from fedseg.lightning_modules.data.datalist import Case, Datalist, merge_datalists, write_datalist
from fedseg.lightning_modules.owner_only import owner_only_dir, owner_only_files

MODES: tuple[str, ...] = SPLIT_MODES
#: the split's defaults (seed, val_fraction, alpha), written once in ``fedseg.config.SplitSettings``
_SPLIT_DEFAULTS = SplitSettings()
#: Column names accepted for the case id and the institution in an institutions CSV.
CASE_COLUMNS = ("case_id", "subject_id", "case", "subject", "brats21id", "brats2021_id")
INSTITUTION_COLUMNS = ("institution", "partition_id", "site", "center", "centre")
MIN_CASES_PER_SITE = 2  # one to train on, one to validate on
#: File names write_split uses itself, so no site may be called this.
RESERVED_NAMES = ("all", "summary")

T = TypeVar("T")


class SplitError(ValueError):
    """A split that cannot be made (the message says why, naming files and cases)."""


# --------------------------------------------------------------------------------------------
# Train / validation


def train_val_split(items: Sequence[T], val_fraction: float, rng: np.random.Generator) -> tuple[list[T], list[T]]:
    """Random training / validation split of one site's items, both kept in the input order.

    ``round(n * val_fraction)`` items validate, at least one when ``val_fraction > 0`` and ``n >= 2``,
    never all of them (a site must have something to train on).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise SplitError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n = len(items)
    n_val = int(round(n * val_fraction))
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    else:
        n_val = 0
    chosen = set(rng.permutation(n)[:n_val].tolist())
    training = [x for i, x in enumerate(items) if i not in chosen]
    validation = [x for i, x in enumerate(items) if i in chosen]
    return training, validation


# --------------------------------------------------------------------------------------------
# Tumour volume


def wt_volume_ml(case: Case, data_root: Path | str) -> float:
    """Whole-tumour volume of ``case`` in ml: label voxels > 0 times the voxel volume."""
    if case.label is None:
        raise SplitError(f"case {case.case_id}: no label, so no tumour volume")
    path = Path(data_root) / case.label
    try:
        img = nib.load(path)
        voxels = int(np.count_nonzero(np.asanyarray(img.dataobj) > 0))
        voxel_ml = float(np.prod(img.header.get_zooms()[:3])) / 1000.0
    except FileNotFoundError:
        raise SplitError(f"{path}: label of case {case.case_id} not found") from None
    except Exception as err:  # nibabel raises several types for unreadable files
        raise SplitError(f"{path}: cannot read label of case {case.case_id} ({err})") from None
    return voxels * voxel_ml


def tumour_volumes(
    cases: Sequence[Case], data_root: Path | str, cache: dict[str, float] | None = None
) -> dict[str, float]:
    """``{case_id: WT volume in ml}``; labels already in ``cache`` are not read again."""
    cache = {} if cache is None else cache
    missing = [c.case_id for c in cases if c.label is None]
    if missing:
        raise SplitError(f"tumour volumes need labels; cases without a label: {_listing(missing)}")
    for case in cases:
        if case.case_id not in cache:
            cache[case.case_id] = wt_volume_ml(case, data_root)
    return {c.case_id: cache[c.case_id] for c in cases}


# --------------------------------------------------------------------------------------------
# Splitting


def split_cases(
    cases: Sequence[Case],
    n_sites: int | None,
    mode: str,
    *,
    seed: int = _SPLIT_DEFAULTS.seed,
    val_fraction: float = _SPLIT_DEFAULTS.val_fraction,
    alpha: float = _SPLIT_DEFAULTS.alpha,
    sizes: Sequence[float] | None = _SPLIT_DEFAULTS.sizes,
    institutions_csv: Path | str | None = None,
    name_by_institution: bool = False,
    n_bins: int = 4,
    data_root: Path | str,
) -> dict[str, Datalist]:
    """Split ``cases`` (paths relative to ``data_root``) into sites ``{"site-1": Datalist, ...}``.

    ``sizes`` are proportions for ``unequal`` (normalized; a seeded power law when None). ``alpha``
    is the Dirichlet concentration and ``n_bins`` the number of volume quantile bins for
    ``dirichlet``. ``institution`` needs ``institutions_csv``; ``n_sites`` may then be None (one
    site per institution) and ``name_by_institution`` names the sites after the institutions.
    """
    cases = list(cases)
    if mode not in MODES:
        raise SplitError(f"unknown split mode {mode!r}; known: {', '.join(MODES)}")
    if not cases:
        raise SplitError("no cases to split")
    dupes = sorted(i for i, n in Counter(c.case_id for c in cases).items() if n > 1)
    if dupes:
        raise SplitError(f"case ids must be unique; repeated: {_listing(dupes)}")
    if not 0.0 <= val_fraction < 1.0:
        raise SplitError(f"val_fraction must be in [0, 1), got {val_fraction}")
    data_root = Path(data_root).resolve()
    # Separate streams for the assignment and for each site's train/validation draw, so that
    # changing val_fraction never moves a case to another site.
    rng_assign, *site_seeds = np.random.SeedSequence(seed).spawn(1 + len(cases))
    rng = np.random.default_rng(rng_assign)
    split_meta: dict[str, Any] = {"mode": mode, "seed": seed, "val_fraction": val_fraction}
    volumes: dict[str, float] = {}
    institutions: list[str] | None = None

    if mode == "institution":
        if institutions_csv is None:
            raise SplitError("mode 'institution' needs institutions_csv (columns case_id,institution)")
        groups = _groups_by_institution(cases, Path(institutions_csv))
        if n_sites is not None and n_sites != len(groups):
            raise SplitError(
                f"{institutions_csv}: the cases come from {len(groups)} institutions, but {n_sites} sites "
                "were asked for (leave the number of sites out to get one per institution)"
            )
        institutions = list(groups)
        site_cases = list(groups.values())
        split_meta["institutions_csv"] = str(institutions_csv)
    else:
        if n_sites is None or n_sites < 1:
            raise SplitError(f"mode {mode!r} needs a number of sites >= 1, got {n_sites}")
        minimum = 1 if mode == "iid" else MIN_CASES_PER_SITE
        if len(cases) < minimum * n_sites:
            raise SplitError(
                f"{len(cases)} cases cannot make {n_sites} sites of at least {minimum} case(s) each"
            )
        if mode == "iid":
            order = rng.permutation(len(cases))
            site_cases = [[cases[i] for i in part] for part in np.array_split(order, n_sites)]
        elif mode == "unequal":
            proportions = _proportions(sizes, n_sites, rng)
            split_meta["proportions"] = [round(p, 6) for p in proportions]
            counts = _allocate(len(cases), proportions, minimum)
            order = rng.permutation(len(cases))
            bounds = np.cumsum([0, *counts])
            site_cases = [[cases[i] for i in order[a:b]] for a, b in zip(bounds[:-1], bounds[1:])]
        else:  # dirichlet
            if alpha <= 0:
                raise SplitError(f"alpha must be > 0, got {alpha}")
            volumes = tumour_volumes(cases, data_root)
            site_cases = _dirichlet(cases, volumes, n_sites, alpha, n_bins, rng)
            split_meta.update(alpha=alpha, n_bins=n_bins)

    pool_order = {c.case_id: i for i, c in enumerate(cases)}
    names = _site_names(institutions if name_by_institution else None, len(site_cases))
    split_meta["n_sites"] = len(site_cases)
    datalists = {}
    for k, (name, members) in enumerate(zip(names, site_cases)):
        members = sorted(members, key=lambda c: pool_order[c.case_id])  # stable, readable files
        training, validation = train_val_split(members, val_fraction, np.random.default_rng(site_seeds[k]))
        meta: dict[str, Any] = {"site": name, "split": split_meta}
        if institutions is not None:
            meta["institution"] = institutions[k]
        if volumes:  # kept so that the summary need not read the labels again
            meta["wt_volume_ml"] = {c.case_id: round(volumes[c.case_id], 4) for c in members}
        datalists[name] = Datalist(training, validation, data_root, meta)
    return datalists


def _proportions(sizes: Sequence[float] | None, n_sites: int, rng: np.random.Generator) -> list[float]:
    if sizes is None:  # seeded power law (Pareto, shape 1.5): a few large sites, several small ones
        weights = 1.0 + rng.pareto(1.5, n_sites)
    else:
        weights = np.asarray(list(sizes), dtype=float)
        if weights.shape != (n_sites,) or not np.all(np.isfinite(weights)) or np.any(weights <= 0):
            raise SplitError(f"sizes must be {n_sites} positive numbers (one per site), got {list(sizes)}")
    return (weights / weights.sum()).tolist()


def _allocate(n: int, proportions: Sequence[float], minimum: int) -> list[int]:
    """Integer counts summing to ``n``, each >= ``minimum``, the rest by largest remainder."""
    k = len(proportions)
    rest = n - minimum * k
    exact = np.asarray(proportions) * rest
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: rest - counts.sum()]:
        counts[i] += 1
    return (counts + minimum).tolist()


def _dirichlet(
    cases: list[Case], volumes: dict[str, float], n_sites: int, alpha: float, n_bins: int,
    rng: np.random.Generator,
) -> list[list[Case]]:
    """Per volume-quantile bin, Dirichlet(alpha) shares of its cases over the sites."""
    n_bins = max(1, min(n_bins, len(cases) // n_sites))
    by_volume = sorted(range(len(cases)), key=lambda i: (volumes[cases[i].case_id], cases[i].case_id))
    sites: list[list[int]] = [[] for _ in range(n_sites)]
    for bin_members in np.array_split(np.asarray(by_volume), n_bins):
        shares = rng.dirichlet(np.full(n_sites, alpha))
        counts = _allocate(len(bin_members), shares, 0)
        bounds = np.cumsum([0, *counts])
        members = rng.permutation(bin_members)
        for s, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            sites[s].extend(members[a:b].tolist())
    # Every site needs MIN_CASES_PER_SITE: take cases from the largest site (a random one of its cases).
    while True:
        small = min(range(n_sites), key=lambda s: len(sites[s]))
        if len(sites[small]) >= MIN_CASES_PER_SITE:
            break
        donor = max(range(n_sites), key=lambda s: len(sites[s]))
        sites[small].append(sites[donor].pop(int(rng.integers(len(sites[donor])))))
    return [[cases[i] for i in s] for s in sites]


def _natural_key(text: str) -> list[Any]:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", text)]


def read_institutions(path: Path | str) -> dict[str, str]:
    """``{case_id: institution}`` from a CSV (``case_id,institution`` or FeTS ``Subject_ID,Partition_ID``)."""
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:  # UTF-8 whatever the locale; a BOM is fine
            reader = csv.DictReader(f)
            header = {h.strip().lower(): h for h in (reader.fieldnames or [])}
            case_col = next((header[c] for c in CASE_COLUMNS if c in header), None)
            inst_col = next((header[c] for c in INSTITUTION_COLUMNS if c in header), None)
            if case_col is None or inst_col is None:
                raise SplitError(
                    f"{path}: needs a case column ({'/'.join(CASE_COLUMNS)}) and an institution column "
                    f"({'/'.join(INSTITUTION_COLUMNS)}); found columns {reader.fieldnames}"
                )
            mapping: dict[str, str] = {}
            for line, row in enumerate(reader, start=2):
                case_id, inst = (row.get(case_col) or "").strip(), (row.get(inst_col) or "").strip()
                if not case_id or not inst:
                    raise SplitError(f"{path}:{line}: empty case id or institution")
                if mapping.get(case_id, inst) != inst:
                    raise SplitError(f"{path}:{line}: case {case_id} listed for two institutions "
                                     f"({mapping[case_id]!r} and {inst!r})")
                mapping[case_id] = inst
    except FileNotFoundError:
        raise SplitError(f"{path}: institutions CSV not found") from None
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise SplitError(f"{path}: not a readable CSV ({err})") from None
    return mapping


def _groups_by_institution(cases: list[Case], path: Path) -> dict[str, list[Case]]:
    """Cases grouped by institution, institutions in natural order (2 before 10)."""
    mapping = read_institutions(path)
    missing = [c.case_id for c in cases if c.case_id not in mapping]
    if missing:
        raise SplitError(f"{path}: {len(missing)} case(s) not listed: {_listing(missing)}")
    groups: dict[str, list[Case]] = {}
    for case in cases:
        groups.setdefault(mapping[case.case_id], []).append(case)
    return {inst: groups[inst] for inst in sorted(groups, key=_natural_key)}


def _site_names(institutions: list[str] | None, n: int) -> list[str]:
    if institutions is None:
        return [f"site-{k + 1}" for k in range(n)]
    names = [re.sub(r"[^A-Za-z0-9_.-]+", "-", inst).strip("-.") for inst in institutions]
    bad = [i for i, nm in zip(institutions, names) if not nm or nm.lower() in RESERVED_NAMES]
    if bad or len(set(names)) != len(names):
        raise SplitError(
            f"institution names {bad or institutions} do not make distinct, usable site names; "
            "split without naming sites after institutions"
        )
    return names


def _listing(ids: Sequence[str], limit: int = 20) -> str:
    shown = ", ".join(ids[:limit])
    return shown + (f", ... ({len(ids) - limit} more)" if len(ids) > limit else "")


# --------------------------------------------------------------------------------------------
# Writing and summarizing


@dataclass(frozen=True)
class SiteSummary:
    """One row of a split's summary table (volumes in ml; None without labels)."""

    site: str
    n_train: int
    n_val: int
    wt_ml_mean: float | None
    wt_ml_median: float | None
    institution: str = ""


def summarize(datalists: dict[str, Datalist]) -> list[SiteSummary]:
    """One row per site; volumes from the datalist meta when the split computed them, else read.

    Volumes cover the labeled cases; a site without labels gets None.
    """
    rows = []
    for name, dl in datalists.items():
        labeled = [c for c in dl.cases if c.label is not None]  # unlabeled cases have no volume
        vols = list(tumour_volumes(labeled, dl.data_root, dict(dl.meta.get("wt_volume_ml", {}))).values())
        rows.append(SiteSummary(
            site=name,
            n_train=len(dl.training),
            n_val=len(dl.validation),
            wt_ml_mean=float(np.mean(vols)) if vols else None,
            wt_ml_median=float(statistics.median(vols)) if vols else None,
            institution=str(dl.meta.get("institution", "")),
        ))
    return rows


def write_split(datalists: dict[str, Datalist], out_dir: Path | str) -> Path:
    """Write ``<site>.json`` per site, ``all.json`` (their union) and ``summary.csv``; return the latter.

    Datalists named in an earlier ``summary.csv`` in ``out_dir`` are removed first, so a split
    with fewer sites leaves no stale site behind. ``out_dir`` must not lie inside a data root.
    """
    out_dir = Path(out_dir).resolve()
    for dl in datalists.values():
        root = Path(dl.data_root).resolve()
        if out_dir == root or root in out_dir.parents:
            raise SplitError(f"{out_dir}: inside the data folder {root}; write splits outside source data")
    bad = [n for n in datalists if n.lower() in RESERVED_NAMES or not re.fullmatch(r"[A-Za-z0-9_.-]+", n)]
    if bad:
        raise SplitError(f"site names {bad} cannot be datalist file names")
    rows = summarize(datalists)
    summary_path = out_dir / "summary.csv"
    if summary_path.is_file():
        for old in read_summary(summary_path):
            if re.fullmatch(r"[A-Za-z0-9_.-]+", old.site) and not old.site.startswith("."):  # never a path
                (out_dir / f"{old.site}.json").unlink(missing_ok=True)
    # case ids and per-case tumour volumes (meta) come from patients' labels: owner-only
    owner_only_dir(out_dir)
    with owner_only_files():
        for name, dl in datalists.items():
            write_datalist(out_dir / f"{name}.json", dl)
        union = merge_datalists(datalists.values())
        union.meta = {"site": "all", "merged_from": list(datalists),
                      "split": next(iter(datalists.values())).meta.get("split", {})}
        write_datalist(out_dir / "all.json", union)
        tmp = summary_path.with_name(".summary.csv.tmp")
        with tmp.open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow([fl.name for fl in fields(SiteSummary)])
            for r in rows:
                writer.writerow([r.site, r.n_train, r.n_val, _fmt(r.wt_ml_mean), _fmt(r.wt_ml_median), r.institution])
        tmp.chmod(0o600)  # an earlier run's leftover temporary file keeps its mode
        tmp.replace(summary_path)
    return summary_path


def read_summary(path: Path | str) -> list[SiteSummary]:
    """The rows of a ``summary.csv`` written by ``write_split``."""
    with Path(path).open(newline="", encoding="utf-8") as f:
        return [
            SiteSummary(
                site=row["site"], n_train=int(row["n_train"]), n_val=int(row["n_val"]),
                wt_ml_mean=float(row["wt_ml_mean"]) if row["wt_ml_mean"] else None,
                wt_ml_median=float(row["wt_ml_median"]) if row["wt_ml_median"] else None,
                institution=row.get("institution", "") or "",
            )
            for row in csv.DictReader(f)
        ]


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def format_summary(summary: Sequence[SiteSummary] | Path | str) -> str:
    """A fixed-width table of a split (rows, or the path of a ``summary.csv``) with a total line."""
    rows = read_summary(summary) if isinstance(summary, (str, Path)) else list(summary)
    show_inst = any(r.institution and r.institution != r.site for r in rows)
    head = f"{'site':<16} {'train':>6} {'val':>5} {'WT mean ml':>11} {'WT median ml':>13}"
    lines = [head + ("  institution" if show_inst else ""), "-" * len(head)]
    for r in rows:
        line = (f"{r.site:<16} {r.n_train:>6} {r.n_val:>5} "
                f"{_fmt_cell(r.wt_ml_mean, 11)} {_fmt_cell(r.wt_ml_median, 13)}")
        lines.append(line + (f"  {r.institution}" if show_inst else ""))
    lines.append("-" * len(head))
    lines.append(f"{'total':<16} {sum(r.n_train for r in rows):>6} {sum(r.n_val for r in rows):>5}")
    return "\n".join(lines)


def _fmt_cell(value: float | None, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.2f}"


__all__ = [
    "MODES",
    "SiteSummary",
    "SplitError",
    "format_summary",
    "read_institutions",
    "read_summary",
    "split_cases",
    "summarize",
    "train_val_split",
    "tumour_volumes",
    "write_split",
    "wt_volume_ml",
]
