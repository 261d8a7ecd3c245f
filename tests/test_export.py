"""fedseg export: the exported network gives the PyTorch network's logits; ONNX needs its packages."""

from __future__ import annotations

import json

import pytest
import torch

from fedseg.cli import main
from fedseg.lightning_modules.data.synth import SynthConfig, generate
from fedseg.lightning_modules.export import ExportError, export_checkpoint, verify_export
from fedseg.lightning_modules.inference import load_model
from conftest import TEST_DATA, tiny_train_config
from fedseg.lightning_modules.training import train



@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A 2-epoch tiny UNet trained on two modalities (so the metadata and input channels are checkable)."""
    root = tmp_path_factory.mktemp("trained")
    synth = generate(SynthConfig(**TEST_DATA, n_sites=1, cases_per_site=3, shape=(32, 32, 32)), root / "synth")
    cfg = tiny_train_config([synth.datalists["site-1"]], root / "run", features=8, roi=(32, 32, 32),
                            modalities=("flair", "t1ce"))
    train(cfg)
    return root / "run" / "checkpoints" / "best.ckpt"


def reference_logits(checkpoint, x: torch.Tensor) -> torch.Tensor:
    model = load_model(checkpoint, device="cpu")
    with torch.no_grad():
        return model.module.network(x)


def test_torchscript_reproduces_the_network(checkpoint, tmp_path, capsys):
    out = tmp_path / "model.pt"
    assert main(["export", str(checkpoint), "--format", "torchscript", "--out", str(out)]) == 0
    assert "max |logit difference| vs PyTorch" in capsys.readouterr().out
    extra = {"fedseg.json": ""}
    loaded = torch.jit.load(str(out), map_location="cpu", _extra_files=extra)
    meta = json.loads(extra["fedseg.json"])
    assert meta["modalities"] == ["flair", "t1ce"] and meta["outputs"] == ["ET", "TC", "WT"]
    assert meta["in_channels"] == 2 and meta["size_divisor"] == 8 and meta["threshold"] == 0.5
    # traced on (1, 2, 32, 32, 32); a bigger batch and another grid work as well
    x = torch.randn(3, 2, 48, 40, 24, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = loaded(x)
    expected = reference_logits(checkpoint, x)
    assert got.shape == (3, 3, 48, 40, 24)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert expected.abs().max() > 0.1  # a real, non-trivial output was compared


def test_pt2_reproduces_the_network(checkpoint, tmp_path):
    result = export_checkpoint(checkpoint, "pt2", tmp_path / "model.pt2")
    assert result.max_abs_diff is not None and result.max_abs_diff <= 1e-4
    program = torch.export.load(str(tmp_path / "model.pt2"))
    x = torch.randn(1, 2, 24, 32, 40, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), reference_logits(checkpoint, x), atol=1e-5, rtol=1e-5)


def test_verification_catches_a_different_model(checkpoint, tmp_path):
    result = export_checkpoint(checkpoint, "torchscript", tmp_path / "model.pt")
    assert result.checked_shapes == ((1, 2, 32, 32, 32), (2, 2, 40, 40, 48))
    model = load_model(checkpoint, device="cpu")
    with torch.no_grad():
        for p in model.module.network.parameters():
            p.add_(0.05)
    with pytest.raises(ExportError, match="differs from the PyTorch network"):
        verify_export(model, tmp_path / "model.pt", "torchscript")


def test_bad_requests_fail_clearly(checkpoint, tmp_path, capsys):
    assert main(["export", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "m.pt")]) == 2
    assert "missing.ckpt: checkpoint not found" in capsys.readouterr().err
    assert main(["export", str(checkpoint), "--out", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_onnx_without_its_packages_names_them(checkpoint, tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if it were not installed: import fails
    out = tmp_path / "model.onnx"
    assert main(["export", str(checkpoint), "--format", "onnx", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "ONNX export needs" in err and "pip install" in err and "onnxscript" in err
    assert not out.exists()


def test_onnx_reproduces_the_network(checkpoint, tmp_path):
    """The `export` extra is part of `dev`: `make test` installs onnx, onnxscript and onnxruntime."""
    result = export_checkpoint(checkpoint, "onnx", tmp_path / "model.onnx")
    assert result.max_abs_diff is not None and result.max_abs_diff <= 1e-4
    assert result.checked_shapes == ((1, 2, 32, 32, 32), (2, 2, 40, 40, 48))


def test_cli_choices_match_the_library():
    from fedseg.cli import export
    from fedseg.lightning_modules.export import FORMATS

    assert export.FORMAT_CHOICES == FORMATS
