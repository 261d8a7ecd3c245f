"""``fedseg export CKPT --format torchscript|onnx|pt2 --out FILE``: the network for deployment."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedseg.cli import UserError

FORMAT_CHOICES: tuple[str, ...] = ("torchscript", "onnx", "pt2")  # = export.FORMATS (torch-free here)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a checkpoint's network as TorchScript, ONNX or torch.export (.pt2)",
        description=(
            "Exports the bare network (image (B, C, X, Y, Z) -> logits (B, 3, X, Y, Z), regions ET, "
            "TC, WT; sigmoid > threshold) with its preprocessing facts as fedseg.json metadata, then "
            "checks that the exported model reproduces the PyTorch network on two input shapes. "
            "onnx needs the packages onnx and onnxscript (and onnxruntime for the check)."
        ),
    )
    parser.add_argument("checkpoint", metavar="CKPT", type=Path, help="checkpoint (e.g. RUN/checkpoints/best.ckpt)")
    parser.add_argument("--format", choices=FORMAT_CHOICES, default="torchscript", help="default torchscript")
    parser.add_argument("--out", type=Path, required=True, help="file to write (e.g. model.pt, model.onnx, model.pt2)")
    parser.add_argument("--atol", type=float, default=1e-4, help="largest allowed logit difference (default 1e-4)")
    parser.add_argument("--no-verify", action="store_true", help="skip the comparison with the PyTorch network")
    parser.set_defaults(func=_export)


def _export(args: argparse.Namespace) -> int:
    from fedseg.lightning_modules.export import ExportError, export_checkpoint
    from fedseg.lightning_modules.inference import InferenceError

    try:
        result = export_checkpoint(args.checkpoint, args.format, args.out, verify=not args.no_verify, atol=args.atol)
    except (ExportError, InferenceError) as err:
        raise UserError(str(err)) from None
    print(f"wrote {result.path} ({result.format}, traced on {result.example_shape}); {result.note}")
    return 0
