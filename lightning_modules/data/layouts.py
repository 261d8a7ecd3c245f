"""Find the cases of a dataset folder, whatever layout it was published in.

Four layouts are recognised (``layout="auto"`` tries them in this order):

==========  =====================================================================  ===========
layout      files                                                                  convention
==========  =====================================================================  ===========
msd         ``dataset.json`` + ``imagesTr/<case>.nii.gz`` (one 4-D file per case,   msd
            channels named by dataset.json's ``modality``) + ``labelsTr/<case>``;
            ``imagesTs/`` cases have no label
generic     ``images/<case>/<case>_<mod>.nii.gz`` or flat ``images/<case>_<mod>``   brats2023
            + ``masks/<case>.nii.gz`` (or ``<case>_seg``); ``<mod>`` is a BraTS     (default)
            2021 or 2023 name, joined by ``_`` or ``-``
brats2021   ``<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz``                         brats2021
brats2023   ``<case>/<case>-{t1n,t1c,t2w,t2f,seg}.nii.gz``                          brats2023
==========  =====================================================================  ===========

``.nii`` and ``.nii.gz`` are both accepted. In a folder of case folders, ``auto`` classifies each
case folder on its own, so BraTS 2021 and 2023 cases may sit side by side (the dataset's layout is
then ``"mixed"``); a folder that is no case is skipped with a note. Discovery only lists files: a
case missing a modality is kept with the modalities it has and recorded in ``Dataset.incomplete``;
a case without a label file gets ``label=None`` (usable for inference only). Whether the files are
sound is :mod:`fedseg.lightning_modules.data.check`'s job.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from fedseg.lightning_modules.data.datalist import MODALITIES, Case, DatalistError
from fedseg.lightning_modules.labels import check_convention

LAYOUTS: tuple[str, ...] = ("msd", "generic", "brats2021", "brats2023")

#: What each layout looks like, for error messages.
LAYOUT_PATTERNS: dict[str, str] = {
    "msd": "<root>/dataset.json + imagesTr/<case>.nii[.gz] (4-D) + labelsTr/<case>.nii[.gz]",
    "generic": "<root>/images/[<case>/]<case>_<modality>.nii[.gz] + <root>/masks/<case>[_seg].nii[.gz]",
    "brats2021": "<root>/<case>/<case>_{t1,t1ce,t2,flair,seg}.nii[.gz]",
    "brats2023": "<root>/<case>/<case>-{t1n,t1c,t2w,t2f,seg}.nii[.gz]",
}

#: Label convention each layout implies (generic: the default, override with ``convention=``).
LAYOUT_CONVENTIONS: dict[str, str] = {
    "msd": "msd",
    "generic": "brats2023",
    "brats2021": "brats2021",
    "brats2023": "brats2023",
}

#: File-name modality token -> canonical modality, and the separator before it, per BraTS release.
BRATS_TOKENS: dict[str, tuple[str, dict[str, str]]] = {
    "brats2021": ("_", {"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair"}),
    "brats2023": ("-", {"t1n": "t1", "t1c": "t1ce", "t2w": "t2", "t2f": "flair"}),
}
LABEL_TOKEN = "seg"
_ANY_TOKEN: dict[str, str] = {**BRATS_TOKENS["brats2021"][1], **BRATS_TOKENS["brats2023"][1]}

#: MSD dataset.json modality names (lower-cased) -> canonical modality.
MSD_MODALITY_NAMES: dict[str, str] = {
    "flair": "flair", "t2f": "flair",
    "t1w": "t1", "t1": "t1", "t1n": "t1",
    "t1gd": "t1ce", "t1ce": "t1ce", "t1c": "t1ce",
    "t2w": "t2", "t2": "t2",
}  # fmt: skip
#: Channel order of MSD Task01_BrainTumour, used when dataset.json has no "modality".
MSD_DEFAULT_MODALITIES: tuple[str, ...] = ("flair", "t1", "t1ce", "t2")

_NIFTI_SUFFIXES = (".nii.gz", ".nii")


class LayoutError(ValueError):
    """No known layout matches a folder (the message names it, the layouts tried and what it holds)."""


@dataclass
class Dataset:
    """The cases found under ``root`` (their paths are relative to it).

    ``layout`` is one of :data:`LAYOUTS`, or ``"mixed"`` when case folders of several BraTS
    releases sit side by side (``case_layouts`` then says which is which). ``incomplete`` maps a
    case id to the modalities its folder lacks; ``notes`` lists what was skipped and why.
    """

    layout: str
    root: Path
    cases: list[Case]
    incomplete: dict[str, list[str]] = field(default_factory=dict)
    case_layouts: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def case(self, case_id: str) -> Case:
        """The case called ``case_id`` (``KeyError`` if there is none)."""
        for case in self.cases:
            if case.case_id == case_id:
                return case
        raise KeyError(case_id)


def discover(root: Path | str, layout: str = "auto", *, convention: str | None = None) -> Dataset:
    """List the cases under ``root`` in ``layout`` (one of :data:`LAYOUTS`, or ``"auto"``).

    ``convention`` overrides the label convention of every case (the layout's own otherwise, see
    :data:`LAYOUT_CONVENTIONS`). Raises :class:`LayoutError` when no case is found.
    """
    root = Path(root)
    if layout != "auto" and layout not in LAYOUTS:
        raise LayoutError(f"unknown layout {layout!r}; known: auto, {', '.join(LAYOUTS)}")
    if convention is not None:
        check_convention(convention)
    if not root.is_dir():
        raise LayoutError(f"{root}: no such folder")
    if layout == "msd" or (layout == "auto" and _looks_like_msd(root)):
        dataset = _discover_msd(root, convention)
    elif layout == "generic" or (layout == "auto" and (root / "images").is_dir()):
        dataset = _discover_generic(root, convention)
    else:
        allowed = tuple(BRATS_TOKENS) if layout == "auto" else (layout,)
        dataset = _discover_brats(root, allowed, convention)
    if not dataset.cases:
        raise LayoutError(_nothing_found(root, layout, dataset))
    return dataset


def discover_case(case_dir: Path | str, *, convention: str | None = None) -> Dataset:
    """The one case in a BraTS-style case folder, as a dataset rooted at the folder's parent.

    Files may carry a case id other than the folder's name, as long as they all carry the same.
    Raises :class:`LayoutError` when the folder holds no BraTS 2021 or 2023 case files.
    """
    case_dir = Path(case_dir)
    if convention is not None:
        check_convention(convention)
    if not case_dir.is_dir():
        raise LayoutError(f"{case_dir}: no such folder")
    dataset = Dataset("auto", case_dir.parent, [])
    found = _case_folder(case_dir, case_dir.parent, tuple(BRATS_TOKENS), convention, dataset.notes)
    if found is None:
        raise LayoutError(
            f"{case_dir}: not a case folder; expected files like "
            + " or ".join(LAYOUT_PATTERNS[lay].replace("<root>/", "") for lay in BRATS_TOKENS)
            + f"; found: {_listing(case_dir)}"
        )
    case, case_layout, missing = found
    dataset.layout = case_layout
    _add(dataset, case, case_layout, missing)
    return dataset


# --------------------------------------------------------------------------------------------
# helpers


def nifti_stem(name: str) -> str | None:
    """``name`` without its ``.nii``/``.nii.gz`` extension; None for a file that is no NIfTI."""
    lower = name.lower()
    for suffix in _NIFTI_SUFFIXES:
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


def _nifti_files(folder: Path) -> list[Path]:
    """Visible NIfTI files directly in ``folder``, sorted (``.nii`` before ``.nii.gz``)."""
    if not folder.is_dir():
        return []
    return sorted(
        p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and nifti_stem(p.name)
    )


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _listing(folder: Path, limit: int = 8) -> str:
    """A short description of a folder's visible content, for error messages."""
    try:
        entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    except OSError as err:
        return f"unreadable ({err})"
    if not entries:
        return "nothing (empty folder)"
    names = [p.name + ("/" if p.is_dir() else "") for p in entries]
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _pick(current: Path | None, new: Path, what: str, notes: list[str], root: Path) -> Path:
    """Keep one file per role; with both ``x.nii`` and ``x.nii.gz``, the later (``.nii.gz``) wins."""
    if current is not None:
        notes.append(f"{_rel(current, root)}: ignored, {_rel(new, root)} is also {what}")
    return new


def _add(dataset: Dataset, case: Case, case_layout: str, missing: list[str]) -> None:
    if any(c.case_id == case.case_id for c in dataset.cases):
        dataset.notes.append(f"case {case.case_id}: found twice; the second one is skipped")
        return
    dataset.cases.append(case)
    dataset.case_layouts[case.case_id] = case_layout
    if missing:
        dataset.incomplete[case.case_id] = missing


def _make_case(
    case_id: str,
    images: dict[str, Path],
    label: Path | None,
    convention: str,
    root: Path,
    order: tuple[str, ...] = MODALITIES,
) -> tuple[Case, list[str]]:
    """A Case from per-modality files (in ``order``), and the modalities that are missing."""
    present = [m for m in order if m in images]
    case = Case(
        case_id=case_id,
        images=tuple(_rel(images[m], root) for m in present),
        modalities=tuple(present),
        label=_rel(label, root) if label is not None else None,
        convention=convention,
    )
    return case, [m for m in order if m not in images]


def _nothing_found(root: Path, layout: str, dataset: Dataset) -> str:
    tried = LAYOUTS if layout == "auto" else (layout,)
    lines = [f"{root}: no case found."]
    lines += ["Layouts tried:"] + [f"  {lay}: {LAYOUT_PATTERNS[lay]}" for lay in tried]
    lines.append(f"Found instead: {_listing(root)}")
    lines += [f"  note: {n}" for n in dataset.notes[:10]]
    if _case_folder(root, root.parent, tuple(BRATS_TOKENS), None, []) is not None:
        lines.append("This folder is itself one case folder: read it with discover_case().")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# BraTS: a folder of case folders


def _split(stem: str, sep: str, tokens: dict[str, str]) -> tuple[str, str] | None:
    """``"<prefix><sep><token>"`` -> (prefix, token) when token is a modality or the label."""
    prefix, _, token = stem.rpartition(sep)
    if prefix and (token in tokens or token == LABEL_TOKEN):
        return prefix, token
    return None


def _case_folder(
    case_dir: Path,
    root: Path,
    allowed: tuple[str, ...],
    convention: str | None,
    notes: list[str],
) -> tuple[Case, str, list[str]] | None:
    """Read one BraTS case folder: (case, its layout, missing modalities), or None if it is none.

    Each allowed release's naming is tried; the one that names the most files wins. The case id
    is the folder's name, or else the one id all the folder's files share.
    """
    files = _nifti_files(case_dir)
    best: tuple[int, str, str, list[tuple[Path, str]]] | None = None
    for case_layout in allowed:
        sep, tokens = BRATS_TOKENS[case_layout]
        by_prefix: dict[str, list[tuple[Path, str]]] = {}
        for path in files:
            parsed = _split(nifti_stem(path.name) or "", sep, tokens)
            if parsed:
                by_prefix.setdefault(parsed[0], []).append((path, parsed[1]))
        if case_dir.name in by_prefix:
            case_id = case_dir.name
        elif len(by_prefix) == 1:
            case_id = next(iter(by_prefix))
        else:
            continue
        matched = by_prefix[case_id]
        if best is None or len(matched) > best[0]:
            best = (len(matched), case_layout, case_id, matched)
    if best is None:
        return None
    _, case_layout, case_id, matched = best
    tokens = BRATS_TOKENS[case_layout][1]
    images: dict[str, Path] = {}
    label: Path | None = None
    for path, token in matched:
        if token == LABEL_TOKEN:
            label = _pick(label, path, "the label", notes, root)
        else:
            images[tokens[token]] = _pick(images.get(tokens[token]), path, tokens[token], notes, root)
    used = {p for p, _ in matched}
    for path in files:
        if path not in used:
            notes.append(f"{_rel(path, root)}: ignored, not a {case_layout} modality or label file")
    case, missing = _make_case(
        case_id, images, label, convention or LAYOUT_CONVENTIONS[case_layout], root
    )
    return case, case_layout, missing


def _discover_brats(root: Path, allowed: tuple[str, ...], convention: str | None) -> Dataset:
    dataset = Dataset(allowed[0] if len(allowed) == 1 else "auto", root, [])
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        found = _case_folder(sub, root, allowed, convention, dataset.notes)
        if found is None:
            other = _case_folder(sub, root, tuple(BRATS_TOKENS), None, [])
            why = f"looks like {other[1]}" if other else "no case files"
            dataset.notes.append(f"{sub.name}/: skipped, not a case folder ({why})")
            continue
        _add(dataset, *found)
    if len(allowed) > 1:
        kinds = set(dataset.case_layouts.values())
        dataset.layout = kinds.pop() if len(kinds) == 1 else "mixed"
    dataset.cases.sort(key=lambda c: c.case_id)
    return dataset


# --------------------------------------------------------------------------------------------
# Medical Segmentation Decathlon


def _looks_like_msd(root: Path) -> bool:
    return (root / "dataset.json").is_file() or (root / "imagesTr").is_dir()


def _msd_modalities(root: Path) -> tuple[str, ...]:
    """Channel order of the 4-D images, from dataset.json's ``modality`` (Task01's if absent)."""
    path = root / "dataset.json"
    if not path.is_file():
        return MSD_DEFAULT_MODALITIES
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LayoutError(f"{path}: not a readable dataset.json ({err})") from None
    named = document.get("modality") if isinstance(document, dict) else None
    if not named:
        return MSD_DEFAULT_MODALITIES
    try:
        names = [str(name) for _, name in sorted(named.items(), key=lambda kv: int(kv[0]))]
    except (AttributeError, ValueError) as err:
        raise LayoutError(f"{path}: malformed 'modality' ({err})") from None
    unknown = [n for n in names if n.lower() not in MSD_MODALITY_NAMES]
    if unknown:
        known = ", ".join(sorted(MSD_MODALITY_NAMES))
        raise LayoutError(f"{path}: unknown modality {unknown[0]!r} (case-insensitive; known: {known})")
    modalities = tuple(MSD_MODALITY_NAMES[n.lower()] for n in names)
    if len(set(modalities)) != len(modalities):
        raise LayoutError(f"{path}: a modality is named twice in {named}")
    return modalities


def _discover_msd(root: Path, convention: str | None) -> Dataset:
    modalities = _msd_modalities(root)
    dataset = Dataset("msd", root, [])
    missing = [m for m in MODALITIES if m not in modalities]
    labels = {nifti_stem(p.name): p for p in _nifti_files(root / "labelsTr")}
    for folder, labelled in (("imagesTr", True), ("imagesTs", False)):
        for path in _nifti_files(root / folder):
            case_id = nifti_stem(path.name) or path.name
            label = labels.pop(case_id, None) if labelled else None
            try:
                case = Case(
                    case_id=case_id,
                    images=(_rel(path, root),),
                    modalities=modalities,
                    label=_rel(label, root) if label is not None else None,
                    convention=convention or "msd",
                )
            except DatalistError as err:  # e.g. one modality named but a 4-D layout
                raise LayoutError(f"{root / 'dataset.json'}: {err}") from None
            _add(dataset, case, "msd", missing)
    for stem, path in sorted(labels.items()):
        dataset.notes.append(f"{_rel(path, root)}: ignored, no image imagesTr/{stem}.nii[.gz]")
    dataset.cases.sort(key=lambda c: c.case_id)
    return dataset


# --------------------------------------------------------------------------------------------
# generic images/ + masks/


def _split_any(stem: str) -> tuple[str, str] | None:
    """``<case>_<token>`` or ``<case>-<token>`` with a BraTS 2021 or 2023 token (or ``seg``)."""
    for sep in ("_", "-"):
        parsed = _split(stem, sep, _ANY_TOKEN)
        if parsed:
            return parsed
    return None


def _discover_generic(root: Path, convention: str | None) -> Dataset:
    dataset = Dataset("generic", root, [])
    images_dir, masks_dir = root / "images", root / "masks"
    images: dict[str, dict[str, Path]] = {}

    def take(path: Path, case_hint: str | None) -> None:
        parsed = _split_any(nifti_stem(path.name) or "")
        if parsed is None or parsed[1] == LABEL_TOKEN or (case_hint and parsed[0] != case_hint):
            dataset.notes.append(f"{_rel(path, root)}: ignored, not named <case>_<modality>")
            return
        case_id, token = parsed
        modality = _ANY_TOKEN[token]
        per_case = images.setdefault(case_id, {})
        per_case[modality] = _pick(per_case.get(modality), path, modality, dataset.notes, root)

    for path in _nifti_files(images_dir):
        take(path, None)
    subfolders = sorted(images_dir.iterdir()) if images_dir.is_dir() else []
    for sub in (p for p in subfolders if p.is_dir() and not p.name.startswith(".")):
        files = _nifti_files(sub)
        prefixes = {parsed[0] for p in files if (parsed := _split_any(nifti_stem(p.name) or ""))}
        hint = sub.name if sub.name in prefixes or len(prefixes) != 1 else prefixes.pop()
        for path in files:
            take(path, hint)
        if not files:
            dataset.notes.append(f"{_rel(sub, root)}/: skipped, no NIfTI files")

    masks: dict[str, Path] = {}
    for path in _nifti_files(masks_dir):
        stem = nifti_stem(path.name) or ""
        parsed = _split_any(stem)
        case_id = parsed[0] if parsed and parsed[1] == LABEL_TOKEN else stem
        masks[case_id] = _pick(masks.get(case_id), path, f"the mask of {case_id}", dataset.notes, root)
    if images_dir.is_dir() and not masks_dir.is_dir():
        dataset.notes.append("masks/: not found, every case is unlabelled")

    for case_id in sorted(images):
        case, missing = _make_case(
            case_id, images[case_id], masks.pop(case_id, None), convention or "brats2023", root
        )
        _add(dataset, case, "generic", missing)
    for case_id, path in sorted(masks.items()):
        dataset.notes.append(f"{_rel(path, root)}: ignored, no images for case {case_id}")
    return dataset
