"""Quantized model exchange: fp16 and 8-bit tensors on the wire, restored on arrival; the bytes."""

from __future__ import annotations

import json

import pytest
import torch
from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.fl_context import FLContext

from conftest import tiny_job
from fedseg.app.quantization import QUANT_META, DequantizeWeights, QuantizeWeights, payload_bytes
from fedseg.jobs.addons import Addons
from fedseg.jobs.base import export


def _model() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"conv.weight": torch.randn(16, 4, 3, 3, 3, generator=g) * 0.1, "conv.bias": torch.randn(16, generator=g),
            "norm.num_batches_tracked": torch.tensor(7)}


@pytest.mark.parametrize(("fmt", "ratio", "tolerance"), [("fp16", 0.5, 1e-3), ("int8", 0.25, None)])
@pytest.mark.parametrize("kind", [DataKind.WEIGHTS, DataKind.WEIGHT_DIFF])
def test_quantized_exchange_restores_every_tensor_within_its_precision(fmt, ratio, tolerance, kind):
    model = _model()
    dxo = DXO(kind, data={k: v.clone() for k, v in model.items()})
    sent = QuantizeWeights(fmt).process_dxo(dxo, None, FLContext())
    assert set(sent.get_meta_prop(QUANT_META)) == {"conv.weight", "conv.bias"}  # the counter is not a weight
    assert sent.data["norm.num_batches_tracked"].dtype == torch.int64
    floats = sum(v.numel() * 4 for k, v in model.items() if v.is_floating_point())
    assert payload_bytes(sent.data) == pytest.approx(floats * ratio + 8)
    restored = DequantizeWeights().process_dxo(sent, None, FLContext()).data
    assert restored.keys() == model.keys()
    for key, value in model.items():
        assert restored[key].dtype == value.dtype and restored[key].shape == value.shape
        span = float(value.max() - value.min())
        bound = tolerance if tolerance is not None else span / 255 / 2 + 1e-7  # int8: half a step of its own range
        assert torch.allclose(restored[key].float(), value.float(), atol=bound), key
    assert sent.get_meta_prop(QUANT_META) is None  # the receiving side leaves no trace


def test_quantization_is_an_add_on_placed_outside_every_other_filter(tmp_path):
    folder = export(tiny_job("fedper", addons=Addons(quantize="int8")), tmp_path)
    client = json.loads((folder / "app" / "config" / "config_fed_client.json").read_text())
    server = json.loads((folder / "app" / "config" / "config_fed_server.json").read_text())

    def names(filters, task="train"):
        return [f["path"].rsplit(".", 1)[1] for entry in filters if entry["tasks"] == [task] for f in entry["filters"]]

    # a site strips its head, then quantizes; the server counts what came, restores it, then audits it
    assert names(client["task_result_filters"]) == ["ExcludeVars", "QuantizeWeights"]
    assert names(client["task_data_filters"]) == ["DequantizeWeights"]
    assert names(server["task_result_filters"]) == ["ExchangeBytesRecorder", "DequantizeWeights", "PayloadKeyAudit"]
    assert names(server["task_data_filters"]) == ["QuantizeWeights", "ExchangeBytesRecorder"]
    with pytest.raises(ValueError, match="unknown quantization 'int4'"):
        Addons(quantize="int4")
    with pytest.raises(ValueError, match="fedavg-he does not support quantize"):
        tiny_job("fedavg-he", addons=Addons(quantize="fp16"))
