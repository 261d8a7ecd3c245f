"""Bytes and restoring error of the 8-bit exchange on a trained model: the first int8 format (one
affine min/scale per tensor, every float tensor) against today's (``fedseg.app.quantization``:
one symmetric scale per first-dimension slice, tensors under ``INT8_MIN_ELEMENTS`` sent whole).

Reads a global checkpoint (``final_global.ckpt`` of a ``fedseg simulate`` / ``compare`` run) and
rebuilds its initial network from the checkpoint's ``init_seed``. Reports, for the final weights
and for the change since the initial weights (what all rounds' updates add up to), the bytes on
the wire relative to float32 and the relative error ``||restored - x|| / ||x||`` over the model.

    .venv/bin/python bench/bench_quantization.py runs/compare/seed-0/fedavg/checkpoints/final_global.ckpt

No training; a few seconds.
"""

from __future__ import annotations

import argparse

import torch
from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.fl_context import FLContext

from fedseg.app.quantization import DequantizeWeights, QuantizeWeights, payload_bytes
from fedseg.lightning_modules.networks import seeded_network


def per_tensor_affine(model: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
    """The first int8 format (commit 34c65e2): each float tensor onto 0..255 with its own min and scale."""
    restored, sent = {}, 0
    for key, value in model.items():
        if not value.is_floating_point():
            restored[key], sent = value, sent + value.numel() * value.element_size()
            continue
        low, high = float(value.min()), float(value.max())
        scale = (high - low) / 255.0 or 1.0
        q = torch.round((value - low) / scale).clamp_(0, 255)
        restored[key], sent = q * scale + low, sent + value.numel()  # its min and scale travelled in the meta
    return restored, sent


def per_channel(model: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
    """Today's int8 filters, as the exchange runs them."""
    dxo = QuantizeWeights("int8").process_dxo(DXO(DataKind.WEIGHTS, data={k: v.clone() for k, v in model.items()}),
                                              None, FLContext())
    sent = payload_bytes(dxo.data)
    return DequantizeWeights().process_dxo(dxo, None, FLContext()).data, sent


def relative_error(model: dict[str, torch.Tensor], restored: dict[str, torch.Tensor], norm_of: dict) -> float:
    floats = [k for k, v in model.items() if v.is_floating_point()]
    error = sum(float((restored[k].float() - model[k].float()).pow(2).sum()) for k in floats)
    return (error / sum(float(norm_of[k].float().pow(2).sum()) for k in floats)) ** 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a global checkpoint (final_global.ckpt)")
    args = parser.parse_args()
    ckpt = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    hp = ckpt["hyper_parameters"]
    final = {k.removeprefix("network."): v for k, v in ckpt["state_dict"].items()}
    initial = seeded_network(hp["network"], hp["in_channels"], hp["features"], hp.get("network_kwargs"),
                             hp["init_seed"]).state_dict()
    change = {k: final[k] - initial[k] if final[k].is_floating_point() else final[k] for k in final}
    full = payload_bytes(final)
    print(f"{'tensors':<30} {'format':<22} {'bytes vs fp32':>13} {'rel. error':>11} {'vs weights':>11}")
    for name, model in (("final weights", final), ("change since initial", change)):
        for label, fn in (("per-tensor affine", per_tensor_affine), ("per-channel symmetric", per_channel)):
            restored, sent = fn(model)
            print(f"{name:<30} {label:<22} {sent / full:>12.3f}x {relative_error(model, restored, model):>11.5f} "
                  f"{relative_error(model, restored, final):>11.5f}")


if __name__ == "__main__":
    main()
