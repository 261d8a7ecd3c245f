"""Quantized model exchange: fp16 and 8-bit tensors on the wire, restored on arrival; the bytes."""

from __future__ import annotations

import json

import pytest
import torch
from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.fl_context import FLContext

from conftest import tiny_job
from fedseg.app import quantization
from fedseg.app.quantization import QUANT_META, SCALE_SUFFIX, DequantizeWeights, QuantizeWeights, payload_bytes
from fedseg.jobs.addons import Addons
from fedseg.jobs.base import export


def _model() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(16, 4, 3, 3, 3, generator=g) * 0.1
    weight[3] *= 50  # an outlier channel must not coarsen the others
    weight[5] = 0  # a silent channel
    return {"conv.weight": weight, "conv.bias": torch.randn(16, generator=g),
            "norm.num_batches_tracked": torch.tensor(7)}


def _round_trip(fmt, kind, model):
    dxo = DXO(kind, data={k: v.clone() for k, v in model.items()})
    sent = QuantizeWeights(fmt).process_dxo(dxo, None, FLContext())
    wire = dict(sent.data), dict(sent.get_meta_prop(QUANT_META))
    restored = DequantizeWeights().process_dxo(sent, None, FLContext())
    assert restored.get_meta_prop(QUANT_META) is None  # the receiving side leaves no trace
    return wire, restored.data


@pytest.mark.parametrize("kind", [DataKind.WEIGHTS, DataKind.WEIGHT_DIFF])
def test_fp16_exchange_restores_every_float_tensor_within_half_precision(kind):
    model = _model()
    (wire, specs), restored = _round_trip("fp16", kind, model)
    assert set(specs) == {"conv.weight", "conv.bias"}  # the counter is not a weight
    assert wire["norm.num_batches_tracked"].dtype == torch.int64
    assert payload_bytes(wire) == (16 * 108 + 16) * 2 + 8
    assert restored.keys() == model.keys()
    for key, value in model.items():
        assert restored[key].dtype == value.dtype and restored[key].shape == value.shape
        assert torch.allclose(restored[key].float(), value.float(), rtol=1e-3, atol=1e-3), key


@pytest.mark.parametrize("kind", [DataKind.WEIGHTS, DataKind.WEIGHT_DIFF])
def test_int8_exchange_scales_each_channel_and_sends_small_tensors_whole(kind, monkeypatch):
    monkeypatch.setattr(quantization, "INT8_MIN_ELEMENTS", 100)  # the bias (16) stays, the weight (1728) goes
    model = _model()
    (wire, specs), restored = _round_trip("int8", kind, model)
    assert set(specs) == {"conv.weight"}
    assert wire["conv.weight"].dtype == torch.int8 and wire["conv.weight" + SCALE_SUFFIX].shape == (16,)
    assert wire["conv.bias"] is not model["conv.bias"] and torch.equal(wire["conv.bias"], model["conv.bias"])
    assert payload_bytes(wire) == 16 * 108 + 16 * 4 + 16 * 4 + 8  # int8 weight, its scales, fp32 bias, counter
    assert restored.keys() == model.keys()
    for key, value in model.items():
        assert restored[key].dtype == value.dtype and restored[key].shape == value.shape
    assert torch.equal(restored["conv.bias"], model["conv.bias"])
    assert torch.equal(restored["norm.num_batches_tracked"], model["norm.num_batches_tracked"])
    weight, error = model["conv.weight"], (restored["conv.weight"] - model["conv.weight"]).abs()
    for channel in range(16):  # at most half a step of the channel's own range, zeros exact
        step = float(weight[channel].abs().max()) / 127
        assert float(error[channel].max()) <= step / 2 * (1 + 1e-5) + 1e-12, channel
    assert float(error[5].max()) == 0.0
    assert float(error[0].max()) < float(weight[3].abs().max()) / 127 / 50  # the outlier channel did not widen it


def test_int8_leaves_non_finite_tensors_as_they_are():
    value = torch.ones(64, 32)
    value[0, 0] = float("nan")
    assert quantization.quantize(value, "int8") is None
    assert quantization.quantize(torch.ones(8), "int8") is None  # under INT8_MIN_ELEMENTS


def test_int8_sends_under_0_3_of_the_bytes_of_the_demo_unet():
    from fedseg.lightning_modules.networks import NetworkConfig, build_network

    torch.manual_seed(0)
    model = build_network(NetworkConfig(features=8)).state_dict()
    (wire, _), restored = _round_trip("int8", DataKind.WEIGHTS, model)
    full = payload_bytes(model)
    assert payload_bytes(wire) <= 0.3 * full
    for key, value in model.items():
        assert restored[key].shape == value.shape and restored[key].dtype == value.dtype
        if value.numel() < quantization.INT8_MIN_ELEMENTS:  # biases, norm weights, PReLU slopes, the first conv
            assert torch.equal(restored[key], value), key


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
    # int8: the sites send the update, not the model
    assert client["executors"][0]["executor"]["args"]["params_transfer_type"] == "DIFF"
    fp16 = export(tiny_job("fedavg", addons=Addons(quantize="fp16")), tmp_path / "fp16")
    fp16_client = json.loads((fp16 / "app" / "config" / "config_fed_client.json").read_text())
    assert fp16_client["executors"][0]["executor"]["args"].get("params_transfer_type", "FULL") == "FULL"
    with pytest.raises(ValueError, match="unknown quantization 'int4'"):
        Addons(quantize="int4")
    with pytest.raises(ValueError, match="fedavg-he does not support quantize"):
        tiny_job("fedavg-he", addons=Addons(quantize="fp16"))
