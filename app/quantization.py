"""Smaller model exchange: the weights (or weight differences) of every ``train`` task travel as
fp16 or 8-bit, in both directions, and are restored to their own dtype on arrival.

``QuantizeWeights`` (where a model leaves: the server's task data, a site's result) and
``DequantizeWeights`` (where it arrives) are NVFlare ``DXOFilter``s. NVFlare ships quantization
filters (nvflare/app_opt/pt/quantization), but not usable here: they import ``bitsandbytes`` for
every format (fp16 too), and their 8-bit and 4-bit formats move tensors to CUDA
(``quantizer.py``: ``.cuda()``), so a CPU-only FL server or site cannot run them. These do the same
job on any device:

- ``fp16``: each floating-point tensor cast to float16 (half the bytes);
- ``int8``: each floating-point tensor of at least ``INT8_MIN_ELEMENTS`` entries as int8 with one
  symmetric scale per slice of its first dimension (a conv's output channel, a transposed conv's
  input channel): ``x = q * scale[row]``, ``q`` in -127..127, ``scale[row] = max |x[row]| / 127``,
  so the error is at most ``scale[row] / 2`` per entry and zeros stay exact. The scales travel
  as float32 tensors beside it (``<name>`` + ``SCALE_SUFFIX``), so the recorded bytes include them.
  Smaller tensors (biases, norm weights, PReLU slopes: under 1 % of a U-Net's entries) and tensors
  holding a NaN or inf travel in their own dtype. The ``quantize`` add-on also makes the sites send
  weight differences for int8 (``fedseg.jobs.addons``): an update spans a far smaller range than
  the weights, and the server adds it to its own full-precision model.

Integer tensors (counters such as BatchNorm's ``num_batches_tracked``) pass unchanged. What a
tensor was is kept in the DXO's meta (``QUANT_META``), so the receiving side restores shape, dtype
and, for int8, the value up to the rounding. ``ExchangeBytesRecorder`` writes, on the server, the
bytes of every model it sends and receives (``metrics/exchange_bytes.jsonl``).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import numpy as np
import torch
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.app_constant import AppConstants

FORMATS = ("fp16", "int8")
#: DXO meta key: ``{tensor name: [original dtype, format]}`` of the tensors sent in another format
QUANT_META = "fedseg_quantized"
#: an int8 tensor's per-row scales travel in the DXO's data under its name + this suffix
SCALE_SUFFIX = "::int8_scale"
#: floating-point tensors with fewer entries travel in their own dtype under int8
INT8_MIN_ELEMENTS = 1024
_KINDS = [DataKind.WEIGHTS, DataKind.WEIGHT_DIFF]


def _torch(value: Any) -> torch.Tensor:
    return value.detach() if isinstance(value, torch.Tensor) else torch.from_numpy(np.asarray(value))


def quantize(value: Any, fmt: str) -> tuple[torch.Tensor, torch.Tensor | None, list[Any]] | None:
    """``value`` as it travels in ``fmt``, its int8 row scales (``None`` for fp16) and what restoring
    it needs (``[dtype, fmt]``); ``None`` where it travels as it is (int8: small or not finite)."""
    tensor = _torch(value)
    dtype = str(tensor.dtype).removeprefix("torch.")
    if fmt == "fp16":
        return tensor.to(torch.float16), None, [dtype, fmt]
    if tensor.numel() < INT8_MIN_ELEMENTS or not bool(torch.isfinite(tensor).all()):
        return None
    rows = tensor.float().reshape(tensor.shape[0] if tensor.dim() > 1 else 1, -1)
    scale = rows.abs().amax(dim=1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    quantized = torch.round(rows / scale[:, None]).clamp_(-127, 127).to(torch.int8).reshape(tensor.shape)
    return quantized, scale, [dtype, fmt]


def dequantize(value: Any, spec: list[Any], scale: Any = None) -> torch.Tensor:
    """The tensor ``quantize`` made, back in its own dtype."""
    dtype, fmt = spec
    tensor = _torch(value)
    if fmt == "int8":
        rows = tensor.float().reshape(tensor.shape[0] if tensor.dim() > 1 else 1, -1)
        tensor = (rows * _torch(scale).float()[:, None]).reshape(tensor.shape)
    return tensor.to(getattr(torch, dtype))


class QuantizeWeights(DXOFilter):
    """Where a model leaves: its floating-point tensors in ``fmt`` ("fp16" or "int8")."""

    def __init__(self, fmt: str) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"unknown quantization {fmt!r}; known: {', '.join(FORMATS)}")
        super().__init__(supported_data_kinds=_KINDS, data_kinds_to_filter=_KINDS)
        self.fmt = fmt

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO:
        specs, data = {}, {}
        for key, value in (dxo.data or {}).items():
            floating = value.is_floating_point() if isinstance(value, torch.Tensor) else np.issubdtype(
                np.asarray(value).dtype, np.floating)
            sent = quantize(value, self.fmt) if floating else None
            if sent is None:
                data[key] = value
                continue
            data[key], scale, specs[key] = sent
            if scale is not None:
                data[key + SCALE_SUFFIX] = scale
        dxo.data = data
        dxo.set_meta_prop(QUANT_META, specs)
        return dxo


class DequantizeWeights(DXOFilter):
    """Where a model arrives: every tensor ``QuantizeWeights`` changed, back in its own dtype."""

    def __init__(self) -> None:
        super().__init__(supported_data_kinds=_KINDS, data_kinds_to_filter=_KINDS)

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO:
        specs = dxo.get_meta_prop(QUANT_META) or {}
        if specs:
            data = dxo.data or {}
            dxo.data = {k: dequantize(v, specs[k], data.get(k + SCALE_SUFFIX)) if k in specs else v
                        for k, v in data.items() if not (k.endswith(SCALE_SUFFIX) and k[: -len(SCALE_SUFFIX)] in specs)}
            dxo.remove_meta_props([QUANT_META])
        return dxo


def payload_bytes(data: dict[str, Any]) -> int:
    """Bytes of a model's tensors as they travel (quantized or not; int8 scales included)."""
    return int(sum(_torch(v).numel() * _torch(v).element_size() for v in data.values()))


class ExchangeBytesRecorder(Filter):
    """Server side: appends the bytes of each model sent or received to ``metrics/exchange_bytes.jsonl``.

    Registered as a task-data filter (``direction="sent"``, after any quantizer) and a task-result
    filter (``"received"``, before any dequantizer), so it counts what crosses the network.
    """

    def __init__(self, direction: str, file_name: str = "exchange_bytes.jsonl") -> None:
        super().__init__()
        self.direction = direction
        self.file_name = file_name

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        try:
            dxo = from_shareable(shareable)
        except Exception:  # not a DXO (an error reply): nothing travelled
            return shareable
        if dxo.data_kind not in _KINDS or not dxo.data:
            return shareable
        peer = shareable.get_peer_prop(ReservedKey.IDENTITY_NAME, "") if self.direction == "received" else ""
        record = {
            "time": time.time(),
            "direction": self.direction,
            "site": peer,
            "task": shareable.get_header(ReservedKey.TASK_NAME, ""),
            "round": shareable.get_header(AppConstants.CURRENT_ROUND, fl_ctx.get_prop(AppConstants.CURRENT_ROUND)),
            "bytes": payload_bytes(dxo.data),
            "quantized": bool(dxo.get_meta_prop(QUANT_META)),
        }
        run_dir = fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id())
        os.makedirs(os.path.join(run_dir, "metrics"), exist_ok=True)
        with open(os.path.join(run_dir, "metrics", self.file_name), "a") as f:
            f.write(json.dumps(record) + "\n")
        return shareable
