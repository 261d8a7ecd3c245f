"""Tiny synthetic datasets for the layout and checker tests, clean or broken in one known way each.

Every volume is 16^3 voxels at 1 mm in LPS orientation (like BraTS), written with nibabel. Each
``BREAKS`` entry damages exactly one file of a clean case and says which problem kind the checker
must report for which file.
"""

from __future__ import annotations

import gzip
import json
import struct
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np

SHAPE = (16, 16, 16)
#: 1 mm voxels, LPS (x and y flipped), like the real BraTS files.
AFFINE = np.array([[-1.0, 0, 0, 15.0], [0, -1.0, 0, 15.0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])
#: canonical modality -> BraTS 2023 file token
TOKENS_2023 = {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f"}
MSD_MODALITY = {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def image_volume(seed: int, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    """Random intensities: they compress badly, so cutting a .nii.gz in half cuts the voxels."""
    return (np.random.default_rng(seed).random(shape) * 1000).astype(np.float32)


def label_volume(values: tuple[int, ...] = (1, 2, 3), shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    """Background with a slab per tumour value."""
    label = np.zeros(shape, dtype=np.uint8)
    for i, value in enumerate(values):
        label[4 + 3 * i : 7 + 3 * i, 4:12, 4:12] = value
    return label


def write_brats2023_case(root: Path, case_id: str, *, seed: int = 0, label: bool = True) -> dict[str, Path]:
    """``root/<case>/<case>-{t1n,t1c,t2w,t2f,seg}.nii.gz``; returns modality (or "seg") -> path."""
    folder = root / case_id
    files = {
        m: write_nifti(folder / f"{case_id}-{token}.nii.gz", image_volume(seed + i))
        for i, (m, token) in enumerate(TOKENS_2023.items())
    }
    if label:
        files["seg"] = write_nifti(folder / f"{case_id}-seg.nii.gz", label_volume())
    return files


def write_brats2021_case(
    root: Path, case_id: str, *, seed: int = 0, suffix: str = ".nii.gz"
) -> dict[str, Path]:
    """``root/<case>/<case>_{t1,t1ce,t2,flair,seg}<suffix>`` with BraTS 2021 labels (4 = enhancing)."""
    folder = root / case_id
    files = {
        m: write_nifti(folder / f"{case_id}_{m}{suffix}", image_volume(seed + i))
        for i, m in enumerate(("t1", "t1ce", "t2", "flair"))
    }
    files["seg"] = write_nifti(folder / f"{case_id}_seg{suffix}", label_volume((1, 2, 4)))
    return files


def write_msd(root: Path, cases: dict[str, np.ndarray], *, test_cases: tuple[str, ...] = ()) -> Path:
    """A Decathlon Task01-style folder: ``dataset.json``, 4-D ``imagesTr`` + ``labelsTr``, ``imagesTs``."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps({"name": "BrainTumour", "modality": MSD_MODALITY}))
    for case_id, image in cases.items():
        write_nifti(root / "imagesTr" / f"{case_id}.nii.gz", image)
        write_nifti(root / "labelsTr" / f"{case_id}.nii.gz", label_volume())
    for case_id in test_cases:
        write_nifti(root / "imagesTs" / f"{case_id}.nii.gz", msd_image(7))
    return root


def msd_image(seed: int, channels: int = 4) -> np.ndarray:
    return image_volume(seed, (*SHAPE, channels))


# --------------------------------------------------------------------------------------------
# ways to break one file


def _rewrite(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    return write_nifti(path, data, affine)


def _cut(path: Path) -> Path:
    """Keep the first 60% of a .nii.gz: the header still loads, the voxels do not."""
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) * 6 // 10])
    return path


def _patch_pixdim(path: Path, axis: int, value: float) -> Path:
    """Set pixdim[axis] in the raw header (nibabel would refuse to write it), keep the sform."""
    raw = bytearray(gzip.decompress(path.read_bytes()))
    offset = 76 + 4 * axis  # NIfTI-1: pixdim is float32[8] at byte 76
    raw[offset : offset + 4] = struct.pack("<f", value)
    path.write_bytes(gzip.compress(bytes(raw)))
    return path


def _overwrite(path: Path, blob: bytes) -> Path:
    path.write_bytes(blob)
    return path


def _remove(path: Path) -> Path:
    path.unlink()
    return path


def _with(data: np.ndarray, index: tuple[int, ...], value: float) -> np.ndarray:
    data = data.copy()
    data[index] = value
    return data


def _shifted(dx: float) -> np.ndarray:
    affine = AFFINE.copy()
    affine[0, 3] += dx
    return affine


def _flipped() -> np.ndarray:
    affine = AFFINE.copy()
    affine[0, 0] = 1.0  # x now runs to the right: RPS instead of LPS
    return affine


Break = Callable[[dict[str, Path]], Path]

#: name -> (file broken, problem kind the checker must report, how to break it)
BREAKS: dict[str, tuple[str, str, Break]] = {
    "text": ("t1", "unreadable", lambda f: _overwrite(f["t1"], b"not a NIfTI file\n")),
    "gztext": ("t2", "unreadable", lambda f: _overwrite(f["t2"], gzip.compress(b"hello" * 200))),
    "cut": ("t1ce", "truncated", lambda f: _cut(f["t1ce"])),
    "nofile": ("t2", "missing_modality", lambda f: _remove(f["t2"])),
    "shape": ("seg", "shape_mismatch", lambda f: _rewrite(f["seg"], label_volume(shape=(16, 16, 12)))),
    "shift": ("flair", "affine_mismatch", lambda f: _rewrite(f["flair"], image_volume(3), _shifted(2.0))),
    "flip": ("t1", "orientation_mismatch", lambda f: _rewrite(f["t1"], image_volume(0), _flipped())),
    "nan": ("t1ce", "non_finite", lambda f: _rewrite(f["t1ce"], _with(image_volume(1), (3, 4, 5), np.nan))),
    "inf": ("t2", "non_finite", lambda f: _rewrite(f["t2"], _with(image_volume(2), (0, 0, 0), np.inf))),
    "zerospacing": ("flair", "bad_spacing", lambda f: _patch_pixdim(f["flair"], 1, 0.0)),
    "negspacing": ("t1", "bad_spacing", lambda f: _patch_pixdim(f["t1"], 2, -1.0)),
    "labelfour": ("seg", "label_values", lambda f: _rewrite(f["seg"], label_volume((1, 2, 4)))),
    "labelhalf": (
        "seg", "label_not_integral",
        lambda f: _rewrite(f["seg"], _with(label_volume().astype(np.float32), (1, 1, 1), 0.5)),
    ),  # fmt: skip
    "zeros": ("t2", "empty_image", lambda f: _rewrite(f["t2"], np.zeros(SHAPE, np.float32))),
    "constant": ("flair", "empty_image", lambda f: _rewrite(f["flair"], np.full(SHAPE, 7, np.int16))),
    "fourd": ("t1", "wrong_ndim", lambda f: _rewrite(f["t1"], image_volume(0, (*SHAPE, 2)))),
}


def write_broken_corpus(root: Path) -> list[tuple[str, Path, str]]:
    """A BraTS 2023 folder with one clean case and one case per ``BREAKS`` entry.

    Returns the problems the checker must report: (case id, file, kind), one per broken case.
    """
    write_brats2023_case(root, "case-clean", seed=0)
    expected = []
    for name, (_, kind, breaker) in BREAKS.items():
        case_id = f"case-{name}"
        files = write_brats2023_case(root, case_id, seed=0)
        expected.append((case_id, breaker(files), kind))
    return expected


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every entry under ``root`` -> (size, mtime in ns): to prove a check wrote nothing."""
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}
