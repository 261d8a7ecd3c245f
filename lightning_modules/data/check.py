"""Check a dataset before training on it: every broken file, named, in one report.

``check_dataset`` reads every file of every case once (header and voxels: a truncated ``.nii.gz``
has a fine header and fails only when its voxels are read) and reports each problem with its file.
It only reads: nothing is written in or near the data folder. Files outside the data root are
reported (``outside_root``), never read.

Problem kinds (``Problem.kind``), one per way a file can be broken:

====================  ===========================================================================
no_cases              the folder / datalist holds no case at all
datalist              the datalist file cannot be read
missing_modality      a case has no file for one of ``MODALITIES``
missing_file          a file the datalist names does not exist
duplicate_case        a case id listed twice in a datalist
unsafe_case_id        a case id that is no plain file name ('/', '..', a leading dot, ...): outputs are named after it
outside_root          a file that resolves (``..``, an absolute path, a symlink) outside the data root
unreadable            not a file nibabel can read as NIfTI
truncated             the header loads but the voxels cannot be read (cut or corrupt data)
wrong_ndim            a 4-D file where a 3-D volume is expected, or a 3-D one where MSD expects 4-D
channel_count         an MSD 4-D image whose channel count differs from its modalities
bad_spacing           a zero, negative or non-finite voxel size (header pixdim or affine)
non_finite            NaN or Inf voxels
empty_image           an image whose voxels are all one value (all zeros, say)
label_not_integral    a label with fractional values (e.g. 0.5: an interpolated mask)
label_values          label values outside the case's convention
shape_mismatch        spatial shape differs from the case's other files
orientation_mismatch  axis orientation (``nibabel.aff2axcodes``) differs from the case's other files
affine_mismatch       same orientation but the affine differs by more than 1e-3 mm
====================  ===========================================================================

Within a case the reference shape / orientation / affine is the one most of its files share, so
the odd file out is the one reported.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import imageglobals
from nibabel.openers import ImageOpener

from fedseg.lightning_modules.data.datalist import (
    MODALITIES,
    Case,
    DatalistError,
    EntryProblem,
    confinement_problems,
    read_datalist,
)
from fedseg.lightning_modules.data.layouts import (
    BRATS_TOKENS,
    LAYOUTS,
    Dataset,
    LayoutError,
    discover,
    discover_case,
)
from fedseg.lightning_modules.labels import check_convention, guess_convention, invalid_values, unique_values

KINDS: tuple[str, ...] = (
    "no_cases", "datalist", "missing_modality", "missing_file", "duplicate_case", "unsafe_case_id", "outside_root",
    "unreadable", "truncated", "wrong_ndim", "channel_count", "bad_spacing", "non_finite",
    "empty_image", "label_not_integral", "label_values",
    "shape_mismatch", "orientation_mismatch", "affine_mismatch",
)  # fmt: skip

#: Largest difference between two affines (mm) that still counts as the same grid.
AFFINE_TOLERANCE_MM = 1e-3
#: Smallest voxel size (mm) that counts as a real one.
MIN_SPACING_MM = 1e-6


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one file (or, for case-level problems, the file that should exist)."""

    path: Path
    case_id: str | None
    kind: str
    message: str


@dataclass
class CheckReport:
    """Everything ``check_dataset`` found. ``ok`` when there is no problem."""

    root: Path
    layout: str
    n_cases: int
    n_files: int = 0
    n_unlabelled: int = 0
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, path: Path, case_id: str | None, kind: str, message: str) -> None:
        assert kind in KINDS, kind
        self.problems.append(Problem(Path(path), case_id, kind, message))

    def _shown(self, path: Path) -> str:
        try:
            rel = path.relative_to(self.root).as_posix()
        except ValueError:
            return str(path)
        return str(path) if rel == "." else rel

    def format(self) -> str:
        """One ``file: kind: message`` line per problem, the discovery notes, then a summary line.

        Paths are relative to the dataset root, which the summary line names.
        """
        lines = [f"{self._shown(p.path)}: {p.kind}: {p.message}" for p in self.problems]
        lines += [f"note: {n}" for n in self.notes]
        where = f"{self.n_cases} {_plural(self.n_cases, 'case')} ({self.n_files} files) in {self.root}"
        where += f" [layout {self.layout}]"
        unlabelled = f"; {self.n_unlabelled} without label (inference only)" if self.n_unlabelled else ""
        if self.ok:
            lines.append(f"OK: {where}: no problems{unlabelled}")
            return "\n".join(lines)
        kinds = Counter(p.kind for p in self.problems)
        n_bad = len({p.case_id for p in self.problems if p.case_id is not None})
        in_cases = f" in {n_bad} {_plural(n_bad, 'case')}" if n_bad else ""
        counts = ", ".join(f"{kind} {n}" for kind, n in kinds.items())
        n = len(self.problems)
        lines.append(f"FAILED: {where}: {n} {_plural(n, 'problem')}{in_cases} ({counts}){unlabelled}")
        return "\n".join(lines)


def _plural(n: int, word: str) -> str:
    return word if n == 1 else word + "s"


class DatasetCheckError(ValueError):
    """A dataset failed its check; ``report`` holds every problem, ``str()`` is the formatted report."""

    def __init__(self, report: CheckReport) -> None:
        super().__init__(report.format())
        self.report = report


def check_dataset(
    path: Path | str,
    layout: str = "auto",
    *,
    datalist: Path | str | None = None,
    convention: str | None = None,
    modalities: Sequence[str] = MODALITIES,
) -> CheckReport:
    """Check the dataset at ``path`` and report every problem.

    ``path`` is a dataset root (read with :func:`~fedseg.lightning_modules.data.layouts.discover`,
    or :func:`~fedseg.lightning_modules.data.layouts.discover_case` for a single case folder), or a
    datalist ``.json``. With ``datalist``, the cases are that datalist's and ``path`` is their data
    root. ``convention`` overrides the label convention of discovered cases. An unknown ``layout``
    or ``convention`` name is the caller's error and raises (``LayoutError`` / ``LabelError``).
    ``modalities``: the ones every case must have (a job's: a site without T1 may join a job that
    does not use T1).
    """
    path = Path(path)
    if layout != "auto" and layout not in LAYOUTS:
        raise LayoutError(f"unknown layout {layout!r}; known: auto, {', '.join(LAYOUTS)}")
    if datalist is None and path.suffix == ".json" and path.is_file():
        datalist, root = path, None
    else:
        root = path
    if datalist is not None:
        return _check_datalist(Path(datalist), root, modalities)
    try:
        dataset = discover(path, layout, convention=convention)
    except LayoutError as err:
        if layout == "auto" and path.is_dir():
            try:
                dataset = discover_case(path, convention=convention)
            except LayoutError:
                dataset = None
        else:
            dataset = None
        if dataset is None:
            report = CheckReport(path, layout, 0)
            message = str(err).removeprefix(f"{path}: ")  # the report line names the folder already
            report.add(path, None, "no_cases", message)
            return report
    return check_discovered(dataset, modalities)


def assert_dataset_ok(
    path: Path | str,
    layout: str = "auto",
    *,
    datalist: Path | str | None = None,
    convention: str | None = None,
) -> CheckReport:
    """:func:`check_dataset`, raising :class:`DatasetCheckError` unless the dataset is clean."""
    report = check_dataset(path, layout, datalist=datalist, convention=convention)
    if not report.ok:
        raise DatasetCheckError(report)
    return report


def check_discovered(dataset: Dataset, modalities: Sequence[str] = MODALITIES) -> CheckReport:
    """Check the cases ``discover`` found, including the ones of ``modalities`` their folders lack."""
    report = CheckReport(dataset.root, dataset.layout, len(dataset.cases), notes=list(dataset.notes))
    refused = _report_confinement(
        confinement_problems(((f"case {c.case_id}", c) for c in dataset.cases), dataset.root), dataset.root, report)
    for case in dataset.cases:
        for modality in (m for m in dataset.incomplete.get(case.case_id, []) if m in modalities):
            where, what = _expected_file(dataset, case, modality)
            report.add(where, case.case_id, "missing_modality", f"no {modality} image ({what})")
        if case.case_id not in refused:
            _check_case(case, dataset.root, report)
    return report


def check_cases(
    cases: Sequence[Case],
    root: Path | str,
    *,
    layout: str = "datalist",
    source: Path | str | None = None,
    modalities: Sequence[str] = MODALITIES,
    entries: Sequence[str] | None = None,
) -> CheckReport:
    """Check cases already in memory (e.g. a :class:`Datalist`'s), their paths relative to ``root``.

    Problems of a case rather than of a file (a modality it lists no image for, a case id listed
    twice, an unsafe case id, a file outside ``root``) are reported against ``source``, the file
    that lists the cases (``root`` if None); ``entries`` name the cases there ("training[0]").
    A case with a file outside ``root`` is not read at all.
    ``modalities``: the ones a case must have (a job's; a site without T1 can join a job that
    does not use T1).
    """
    root = Path(root)
    listing = Path(source) if source is not None else root
    report = CheckReport(root, layout, len(cases))
    if not cases:
        report.add(listing, None, "no_cases", "no cases to check")
    names = list(entries) if entries is not None else [f"case {c.case_id}" for c in cases]
    refused = _report_confinement(confinement_problems(zip(names, cases), root), listing, report)
    seen: set[str] = set()
    for case in cases:
        if case.case_id in seen:
            report.add(listing, case.case_id, "duplicate_case", f"case {case.case_id} is listed twice")
            continue
        seen.add(case.case_id)
        for modality in (m for m in modalities if m not in case.modalities):
            message = f"case {case.case_id} lists no {modality} image"
            report.add(listing, case.case_id, "missing_modality", message)
        if case.case_id not in refused:
            _check_case(case, root, report)
    return report


def _report_confinement(problems: Sequence[EntryProblem], listing: Path, report: CheckReport) -> set[str]:
    """Add each unsafe entry to ``report``; the case ids whose files must not be read."""
    for problem in problems:
        report.add(listing, problem.case_id, problem.kind, problem.format())
    return {p.case_id for p in problems if p.kind == "outside_root" and p.case_id is not None}


# --------------------------------------------------------------------------------------------


def _check_datalist(datalist: Path, root: Path | None, modalities: Sequence[str] = MODALITIES) -> CheckReport:
    try:
        # unconfined: check_cases reports each unsafe entry itself, and checks the others
        loaded = read_datalist(datalist, data_root=root, confine=False)
    except DatalistError as err:
        report = CheckReport(datalist.parent, "datalist", 0)
        report.add(datalist, None, "datalist", str(err))
        return report
    entries = [f"training[{i}]" for i in range(len(loaded.training))]
    entries += [f"validation[{i}]" for i in range(len(loaded.validation))]
    return check_cases(loaded.cases, loaded.data_root, layout=f"datalist {datalist.name}", source=datalist,
                       modalities=modalities, entries=entries)


def _expected_file(dataset: Dataset, case: Case, modality: str) -> tuple[Path, str]:
    """Where a missing modality's file should be, and how to say so."""
    root = dataset.root
    layout = dataset.case_layouts.get(case.case_id, dataset.layout)
    if layout == "msd":
        return root / "dataset.json", "dataset.json's 'modality' names no such channel"
    existing = [*case.images, *([case.label] if case.label else [])]
    folder = (root / existing[0]).parent if existing else root / case.case_id
    if layout in BRATS_TOKENS:
        sep, tokens = BRATS_TOKENS[layout]
        token = next(t for t, m in tokens.items() if m == modality)
        name = f"{case.case_id}{sep}{token}.nii.gz"
    else:
        name = f"{case.case_id}_{modality}.nii.gz"
    return folder / name, f"expected {name} or .nii"


@dataclass
class _Header:
    """What the cross-file checks need from one readable file."""

    path: Path
    spatial: tuple[int, ...]
    affine: np.ndarray
    axcodes: tuple[str | None, ...]


def _check_case(case: Case, root: Path, report: CheckReport) -> None:
    """Check each file of ``case`` on its own, then its files against each other."""
    headers: list[_Header] = []
    files: list[tuple[Path, str]] = [(root / p, "image") for p in case.images]
    if case.label is not None:
        files.append((root / case.label, "label"))
    else:
        report.n_unlabelled += 1
    for path, role in files:
        report.n_files += 1
        header = _check_file(path, role, case, report)
        if header is not None:
            headers.append(header)
    _check_alignment(case, headers, report)


def _check_file(path: Path, role: str, case: Case, report: CheckReport) -> _Header | None:
    """Check one file; its header facts if they are sound enough to compare with the others."""
    cid = case.case_id
    if not path.is_file():
        report.add(path, cid, "missing_file", "file not found" if not path.exists() else "not a file")
        return None
    # nibabel repairs some header faults on load (a zero pixdim becomes 1) and logs it: we report
    # them ourselves from the raw header, so its log lines are silenced.
    with _quiet_nibabel():
        try:
            img = nib.load(path, mmap=False)
            if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
                raise nib.filebasedimages.ImageFileError(f"a {type(img).__name__}, not NIfTI")
            with ImageOpener(path) as f:
                raw = type(img.header).from_fileobj(f, check=False)
        except Exception as err:  # nibabel raises many kinds (ImageFileError, HeaderDataError, ...)
            report.add(path, cid, "unreadable", f"not a readable NIfTI file ({_short(err, path)})")
            return None

    shape = tuple(int(s) for s in img.shape)
    expected_4d = role == "image" and case.is_4d
    comparable = True
    if len(shape) != (4 if expected_4d else 3):
        what = f"a 4-D image ({len(case.modalities)} channels)" if expected_4d else "a 3-D volume"
        report.add(path, cid, "wrong_ndim", f"shape {shape} is {len(shape)}-D; expected {what}")
        comparable = len(shape) >= 3
    elif expected_4d and shape[3] != len(case.modalities):
        report.add(
            path, cid, "channel_count",
            f"{shape[3]} channels; expected {len(case.modalities)} ({', '.join(case.modalities)})",
        )  # fmt: skip

    pixdim = np.asarray(raw["pixdim"][1:4], dtype=float)
    voxel = nib.affines.voxel_sizes(img.affine)[:3]
    if not (np.all(np.isfinite(pixdim)) and np.all(pixdim > MIN_SPACING_MM)):
        report.add(path, cid, "bad_spacing", f"header voxel size (pixdim) is {_fmt(pixdim)}")
        comparable = False
    elif not (np.all(np.isfinite(voxel)) and np.all(voxel > MIN_SPACING_MM)):
        report.add(path, cid, "bad_spacing", f"affine voxel size is {_fmt(voxel)}")
        comparable = False

    try:
        data = np.asanyarray(img.dataobj)
    except Exception as err:  # EOFError / zlib.error / OSError for cut or corrupt voxel data
        report.add(path, cid, "truncated", f"header reads but voxel data does not ({_short(err, path)})")
    else:
        _check_voxels(path, role, case, data, report)

    if not comparable:
        return None
    try:
        axcodes = tuple(nib.aff2axcodes(img.affine))
    except Exception:  # degenerate affine: reported above as bad spacing in practice
        axcodes = (None, None, None)
    return _Header(path, shape[:3], np.asarray(img.affine, dtype=float), axcodes)


def _check_voxels(path: Path, role: str, case: Case, data: np.ndarray, report: CheckReport) -> None:
    cid = case.case_id
    if data.dtype.kind == "f":
        finite = np.isfinite(data)
        if not finite.all():
            n_nan, n_inf = int(np.isnan(data).sum()), int(np.isinf(data).sum())
            report.add(path, cid, "non_finite", f"{n_nan} NaN and {n_inf} Inf voxels")
            return
    elif data.dtype.kind not in "iub":
        report.add(path, cid, "unreadable", f"voxel type {data.dtype} is not a number")
        return
    if role == "image":
        if case.is_4d and data.ndim == 4:  # MSD: each channel is one modality
            named = case.modalities[: data.shape[3]]
            channels = [(f"channel {c} ({m})", data[..., c]) for c, m in enumerate(named)]
        else:
            channels = [("every voxel", data)]
        for which, channel in channels:
            lo, hi = channel.min(), channel.max()
            if lo == hi:
                report.add(path, cid, "empty_image", f"{which} is {float(lo):g}: an empty image")
        return
    # label
    if data.dtype.kind == "f":
        fractional = data != np.rint(data)
        if fractional.any():
            examples = ", ".join(f"{v:g}" for v in np.unique(data[fractional])[:3])
            report.add(path, cid, "label_not_integral", f"fractional label values ({examples}, ...)")
            return
    bad = invalid_values(data, case.convention)
    if bad:
        allowed = sorted(check_convention(case.convention))
        message = f"values {bad} are not in the {case.convention} convention (allowed {allowed})"
        values = unique_values(data)
        guess = guess_convention(values)
        if guess != case.convention and not [v for v in values if v not in check_convention(guess)]:
            message += f"; they fit {guess}: pass convention={guess!r}"
        report.add(path, cid, "label_values", message)


def _check_alignment(case: Case, headers: list[_Header], report: CheckReport) -> None:
    """Report each file whose grid differs from the one most of the case's files share."""
    if len(headers) < 2:
        return
    cid = case.case_id
    shape_ref = Counter(h.spatial for h in headers).most_common(1)[0][0]
    codes_ref = Counter(h.axcodes for h in headers).most_common(1)[0][0]
    same_codes = [h for h in headers if h.axcodes == codes_ref]
    # the affine most files agree with (within tolerance), among those of the common orientation
    affine_ref = max(
        (h.affine for h in same_codes),
        key=lambda a: sum(_close(a, h.affine) for h in same_codes),
    )
    for h in headers:
        if h.spatial != shape_ref:
            message = f"shape {h.spatial} differs from the case's {shape_ref}"
            report.add(h.path, cid, "shape_mismatch", message)
        if h.axcodes != codes_ref:
            codes, ref = "".join(map(str, h.axcodes)), "".join(map(str, codes_ref))
            message = f"orientation {codes} differs from the case's {ref}"
            report.add(h.path, cid, "orientation_mismatch", message)
        elif not _close(h.affine, affine_ref):
            diff = float(np.abs(h.affine - affine_ref).max())
            report.add(
                h.path, cid, "affine_mismatch",
                f"affine differs from the case's by up to {diff:.4g} mm (tolerance {AFFINE_TOLERANCE_MM} mm)",
            )  # fmt: skip


@contextmanager
def _quiet_nibabel() -> Iterator[None]:
    """Silence nibabel's header-repair warnings for a while.

    Not ``nibabel.imageglobals.LoggingOutputSuppressor``: it removes the logger's handlers, and a
    logger without handlers falls back to Python's last-resort handler, which still prints.
    """
    logger = imageglobals.logger
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.allclose(a, b, rtol=0.0, atol=AFFINE_TOLERANCE_MM))


def _fmt(values: Iterable[float]) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


def _short(err: BaseException, path: Path) -> str:
    """The first line of an error, with the file's full path (already on the report line) cut."""
    text = str(err).strip().replace(f'"{path}"', "it").replace(str(path), "it")
    text = text.splitlines()[0] if text else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
