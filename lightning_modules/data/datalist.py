"""Cases and datalists: the one format every layout, split and site reads and writes.

A datalist is decathlon-style JSON (``training`` / ``validation`` lists), one file per site::

    {
      "data_root": "../data",              # optional; relative to this file, or absolute
      "modalities": ["t1", "t1ce", "t2", "flair"],   # informational: modalities all cases have
      "training":   [ENTRY, ...],
      "validation": [ENTRY, ...],
      "meta": {...}                        # free-form: seed, split mode, site name, ...
    }

and each ENTRY describes one case with paths relative to the data root::

    {"case_id": "BraTS2021_00006",
     "image": ["BraTS2021_00006/BraTS2021_00006_t1.nii.gz", ...],   # one file per modality ...
     "modalities": ["t1", "t1ce", "t2", "flair"],                   # ... named in the same order
     "label": "BraTS2021_00006/BraTS2021_00006_seg.nii.gz",         # or null (inference only)
     "convention": "brats2021"}                                     # see fedseg.lightning_modules.labels

A single ``image`` with several ``modalities`` is one 4-D file whose channels are those
modalities in that order (the Medical Segmentation Decathlon layout). The root is kept out of the
entries so that the same datalist works wherever a site mounts its data (site-local configuration).

``read_datalist`` is the one place a datalist file is read, and the one place its entries are
confined: every image and label path must resolve (symlinks followed) to a file under the resolved
data root, and every case id must be a safe file name (``safe_case_name``), since predictions and
reports are named after it. The data root is ``--data-root`` if given, else the file's
``data_root``, else the datalist's own folder. Datalists are UTF-8 whatever the locale.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fedseg.lightning_modules.labels import check_convention

from fedseg.config import MODALITIES  # noqa: E402 - canonical names, default channel order


class DatalistError(ValueError):
    """A datalist file that cannot be read or is malformed (the message names the file).

    ``problems`` lists the entries that were refused one by one (unsafe case id, a path outside
    the data root), so that ``fedseg data check`` can report each on its own line.
    """

    def __init__(self, message: str, problems: Sequence[EntryProblem] = ()) -> None:
        super().__init__(message)
        self.problems = list(problems)


@dataclass(frozen=True)
class EntryProblem:
    """One refused datalist entry: ``entry`` names it ("training[0]"), ``kind`` is
    ``unsafe_case_id`` or ``outside_root``."""

    entry: str
    case_id: str | None
    kind: str
    message: str

    def format(self) -> str:
        return f"{self.entry}: {self.message}"


#: the longest case id: a file system name is at most 255 bytes, and predictions add a suffix
MAX_CASE_ID_BYTES = 200


def safe_case_name(case_id: object, where: str | None = None) -> str:
    """``case_id`` if it is safe to use as a file name in an output folder, else ``DatalistError``.

    Predictions (``OUT/<case_id>.nii.gz``) and reports are named after case ids, so an id must not
    be able to point anywhere else: no ``/`` or ``\\``, no NUL or other control character, no
    leading dot (``.``, ``..``, hidden files), no leading or trailing space, not empty, at most
    ``MAX_CASE_ID_BYTES`` bytes in UTF-8. Any other Unicode is fine (``BraTS-Zürich-001``).
    ``where`` (e.g. the datalist and entry) starts the message.
    """
    prefix = f"{where}: " if where else ""
    if not isinstance(case_id, str) or not case_id:
        raise DatalistError(f"{prefix}case id {case_id!r} must be a non-empty string")
    reason = None
    if "/" in case_id or "\\" in case_id:
        reason = "contains a path separator ('/' or '\\')"
    elif any(unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") for ch in case_id):
        reason = "contains a control character"
    elif case_id.startswith("."):
        reason = "starts with '.'"
    elif case_id != case_id.strip():
        reason = "starts or ends with white space"
    elif len(case_id.encode("utf-8", "surrogatepass")) > MAX_CASE_ID_BYTES:
        reason = f"is longer than {MAX_CASE_ID_BYTES} bytes"
    if reason:
        raise DatalistError(f"{prefix}case id {case_id!r} {reason}; it names output files, so it must be "
                            "a plain file name")
    return case_id


def confined_path(relative: str, root: Path, where: str = "path") -> Path:
    """``root / relative`` resolved (symlinks followed), or ``DatalistError`` if it leads outside
    ``root`` (itself resolved): a ``..``, an absolute path or a symlink out of the data root."""
    root = Path(root).resolve()
    if not isinstance(relative, str) or not relative or "\0" in relative:
        raise DatalistError(f"{where}: {relative!r} is not a file path")
    target = (root / relative).resolve()
    if not target.is_relative_to(root):
        raise DatalistError(f"{where}: {relative!r} resolves to {target}, outside the data root {root}")
    return target


def confinement_problems(cases: Iterable[tuple[str, Case]], root: Path | str) -> list[EntryProblem]:
    """Every unsafe case id and every file outside ``root`` among ``(entry name, case)`` pairs."""
    problems = []
    for entry, case in cases:
        try:
            safe_case_name(case.case_id)
        except DatalistError as err:
            problems.append(EntryProblem(entry, case.case_id, "unsafe_case_id", str(err)))
        files = [("image", p) for p in case.images] + ([("label", case.label)] if case.label is not None else [])
        for role, rel in files:
            try:
                confined_path(rel, Path(root), role)
            except DatalistError as err:
                problems.append(EntryProblem(entry, case.case_id, "outside_root", str(err)))
    return problems


@dataclass(frozen=True)
class Case:
    """One subject: its image file(s), optional label file and label convention."""

    case_id: str
    images: tuple[str, ...]
    modalities: tuple[str, ...]
    label: str | None
    convention: str

    def __post_init__(self) -> None:
        unknown = [m for m in self.modalities if m not in MODALITIES]
        if unknown:
            raise DatalistError(f"case {self.case_id}: unknown modalities {unknown}; known: {MODALITIES}")
        if len(self.images) not in (1, len(self.modalities)):
            raise DatalistError(
                f"case {self.case_id}: {len(self.images)} image files for {len(self.modalities)} "
                "modalities (give one file per modality, or one 4-D file)"
            )
        check_convention(self.convention)

    @property
    def is_4d(self) -> bool:
        """True when one file holds all modalities as channels."""
        return len(self.images) == 1 and len(self.modalities) > 1

    def image_path(self, modality: str, root: Path | str) -> Path:
        """Absolute path of the file holding ``modality`` (the shared 4-D file for MSD)."""
        idx = 0 if self.is_4d else self.modalities.index(modality)
        return Path(root) / self.images[idx]

    def paths(self, root: Path | str) -> list[Path]:
        """All files of this case under ``root``: images, then the label if any."""
        files = [Path(root) / p for p in self.images]
        if self.label is not None:
            files.append(Path(root) / self.label)
        return files

    def to_entry(self) -> dict[str, Any]:
        return {
            "case_id": self.case_id,
            "image": list(self.images),
            "modalities": list(self.modalities),
            "label": self.label,
            "convention": self.convention,
        }

    @classmethod
    def from_entry(cls, entry: dict[str, Any]) -> Case:
        images = entry["image"]
        if isinstance(images, str):
            images = [images]
        return cls(
            case_id=str(entry["case_id"]),
            images=tuple(images),
            modalities=tuple(entry.get("modalities", MODALITIES)),
            label=entry.get("label"),
            convention=entry.get("convention", "brats2023"),
        )


@dataclass
class Datalist:
    """A site's cases split into training and validation, with the root their paths are under."""

    training: list[Case]
    validation: list[Case]
    data_root: Path
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def cases(self) -> list[Case]:
        return [*self.training, *self.validation]

    def to_json(self, path: Path | str) -> dict[str, Any]:
        """The JSON document for a datalist stored at ``path`` (``data_root`` relative to it)."""
        path = Path(path).resolve()
        root = Path(self.data_root).resolve()
        rel = os.path.relpath(root, path.parent)
        modalities = sorted({m for c in self.cases for m in c.modalities}, key=MODALITIES.index)
        return {
            "data_root": rel,
            "modalities": modalities,
            "training": [c.to_entry() for c in self.training],
            "validation": [c.to_entry() for c in self.validation],
            "meta": self.meta,
        }


def json_safe(document: Any) -> Any:
    """NaN/inf -> None and paths -> str, so a document dumps as standard JSON (``json.dump``
    would write ``NaN``)."""
    if isinstance(document, float):
        return document if math.isfinite(document) else None
    if isinstance(document, dict):
        return {k: json_safe(v) for k, v in document.items()}
    if isinstance(document, (list, tuple)):
        return [json_safe(v) for v in document]
    if isinstance(document, Path):
        return str(document)
    return document


def write_json_atomic(path: Path | str, document: Any) -> Path:
    """Write JSON through a temporary file and a rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(document, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_datalist(path: Path | str, datalist: Datalist) -> Path:
    """Write ``datalist`` to ``path`` atomically."""
    return write_json_atomic(path, datalist.to_json(path))


def read_datalist(path: Path | str, data_root: Path | str | None = None, *, confine: bool = True) -> Datalist:
    """Read a datalist (UTF-8); ``data_root`` overrides the root stored in the file.

    Without either, paths are relative to the datalist's folder (MONAI's decathlon default). Every
    entry is confined to the data root (see the module doc): ``DatalistError`` names each entry that
    is not, with ``problems`` listing them. ``confine=False`` is for ``fedseg data check`` only,
    which reports those entries itself (``confinement_problems``) and checks the others.
    """
    path = Path(path)
    try:
        # UTF-8 whatever the locale: a case id like "BraTS-Zürich-001" must read the same under LC_ALL=C
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatalistError(f"{path}: datalist not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatalistError(f"{path}: not a readable JSON datalist ({err})") from None
    if not isinstance(document, dict) or not ({"training", "validation"} & document.keys()):
        raise DatalistError(f"{path}: a datalist needs a 'training' and/or 'validation' list")
    if data_root is None:
        stored = document.get("data_root")
        data_root = path.parent / stored if stored else path.parent
    entries: dict[str, list[Case]] = {}
    for split in ("training", "validation"):
        listed = document.get(split, [])
        if not isinstance(listed, list):
            raise DatalistError(f"{path}: '{split}' must be a list of case entries")
        entries[split] = []
        for i, entry in enumerate(listed):
            try:
                if not isinstance(entry, dict):
                    raise TypeError("not an object")
                entries[split].append(Case.from_entry(entry))
            except (KeyError, TypeError) as err:
                raise DatalistError(f"{path}: {split}[{i}]: malformed case entry ({_missing(err)})") from None
            except ValueError as err:
                raise DatalistError(f"{path}: {split}[{i}]: {err}") from None
    root = Path(data_root).resolve()
    if confine:
        named = [(f"{split}[{i}]", c) for split, cases in entries.items() for i, c in enumerate(cases)]
        problems = confinement_problems(named, root)
        if problems:
            listed = "\n  ".join(p.format() for p in problems)
            n = len({p.entry for p in problems})
            raise DatalistError(f"{path}: refused, {n} unsafe entr{'y' if n == 1 else 'ies'} "
                                f"(a case id must be a plain file name, and every file must lie under the data "
                                f"root {root}):\n  {listed}", problems)
    return Datalist(entries["training"], entries["validation"], root, document.get("meta", {}))


def _missing(err: Exception) -> str:
    return f"missing {err}" if isinstance(err, KeyError) else str(err)


def merge_datalists(datalists: Iterable[Datalist]) -> Datalist:
    """The union of several sites' datalists (for centralized training): all must share a root."""
    datalists = list(datalists)
    roots = {d.data_root for d in datalists}
    if len(roots) == 1:
        root = roots.pop()
        training = [c for d in datalists for c in d.training]
        validation = [c for d in datalists for c in d.validation]
    else:  # sites with different roots: make every path absolute
        root = Path("/")
        training = [_absolute(c, d.data_root) for d in datalists for c in d.training]
        validation = [_absolute(c, d.data_root) for d in datalists for c in d.validation]
    return Datalist(training, validation, root, {"merged_from": [d.meta.get("site") for d in datalists]})


def _absolute(case: Case, root: Path) -> Case:
    label = str(Path(root) / case.label) if case.label else None
    return replace(case, images=tuple(str(Path(root) / p) for p in case.images), label=label)
