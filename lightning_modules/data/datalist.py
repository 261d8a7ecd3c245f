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
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fedseg.lightning_modules.labels import check_convention

from fedseg.config import MODALITIES  # noqa: E402 - canonical names, default channel order


class DatalistError(ValueError):
    """A datalist file that cannot be read or is malformed (the message names the file)."""


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
        with os.fdopen(fd, "w") as f:
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


def read_datalist(path: Path | str, data_root: Path | str | None = None) -> Datalist:
    """Read a datalist; ``data_root`` overrides the root stored in the file.

    Without either, paths are relative to the datalist's folder (MONAI's decathlon default).
    """
    path = Path(path)
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise DatalistError(f"{path}: datalist not found") from None
    except (OSError, json.JSONDecodeError) as err:
        raise DatalistError(f"{path}: not a readable JSON datalist ({err})") from None
    if not isinstance(document, dict) or not ({"training", "validation"} & document.keys()):
        raise DatalistError(f"{path}: a datalist needs a 'training' and/or 'validation' list")
    if data_root is None:
        stored = document.get("data_root")
        data_root = path.parent / stored if stored else path.parent
    try:
        training = [Case.from_entry(e) for e in document.get("training", [])]
        validation = [Case.from_entry(e) for e in document.get("validation", [])]
    except (KeyError, TypeError) as err:
        raise DatalistError(f"{path}: malformed case entry (missing {err})") from None
    except ValueError as err:
        raise DatalistError(f"{path}: {err}") from None
    return Datalist(training, validation, Path(data_root).resolve(), document.get("meta", {}))


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
