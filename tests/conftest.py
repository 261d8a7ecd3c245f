"""Shared test fixtures: where the real BraTS cases are, and tiny synthetic volumes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: ../shared beside the checkout (CI clones main with shared/ next to it); FEDSEG_SHARED overrides.
SHARED = Path(os.environ.get("FEDSEG_SHARED", REPO.parent / "shared"))
REAL = SHARED / "data" / "real"


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The read-only folder of real BraTS cases (never copied into the repo)."""
    if not REAL.is_dir():
        message = f"real BraTS cases not found at {REAL} (set FEDSEG_SHARED)"
        if os.environ.get("CI"):  # CI clones main with shared/ beside it: never skip there
            pytest.fail(message)
        pytest.skip(message)
    return REAL


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny test tensors run faster on one thread than on two contending ones (2-core CI)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
