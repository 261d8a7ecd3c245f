"""The network registry, its serializable wrapper, and the encoder/head/norm split of each network."""

from __future__ import annotations

import dataclasses
import inspect
import json
from collections import OrderedDict

import pytest
import torch
from torch import nn

from fedseg.lightning_modules import networks
from fedseg.lightning_modules.networks import (
    HEAD_DEPTHS,
    NETWORK_NAMES,
    NetworkConfig,
    SegmentationNetwork,
    build_network,
    encoder_keys,
    head_keys,
    norm_keys,
    partition_keys,
)

#: (name, in_channels, input side): tiny cases; UNet++ downsamples 4x and needs 32 voxels a side
CASES = [
    ("unet", 4, 16),
    ("resunet", 3, 16),
    ("attention_unet", 3, 16),
    ("segresnet", 4, 16),
    ("unetplusplus", 4, 32),
]
SIDE = {name: side for name, _, side in CASES}
NORM_CLASSES = {"InstanceNorm3d", "BatchNorm3d"}
CONV_CLASSES = (nn.Conv3d, nn.ConvTranspose3d)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny volumes run faster on one thread; on a busy 2-core machine two threads spin (~50x)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny(name: str, in_channels: int = 4, **kw) -> SegmentationNetwork:
    torch.manual_seed(0)
    return build_network(NetworkConfig(name, in_channels, features=4, **kw)).eval()


def _owner_class(net: nn.Module, key: str) -> str:
    return type(net.get_submodule(key.rpartition(".")[0])).__name__


def _keys_of(net: nn.Module, module_name: str) -> list[str]:
    return [f"{module_name}.{k}" for k in net.get_submodule(module_name).state_dict()]


@pytest.mark.parametrize(("name", "in_channels", "side"), CASES)
def test_forward_gives_one_logits_tensor_per_region(name, in_channels, side):
    net = _tiny(name, in_channels)
    x = torch.randn(2, in_channels, side, side, side)
    with torch.no_grad():
        y = net(x)
    assert isinstance(y, torch.Tensor)  # UNet++'s list output is unwrapped
    assert y.shape == (2, 3, side, side, side)
    assert torch.isfinite(y).all() and y.std() > 0


@pytest.mark.parametrize("norm", ["instance", "batch"])
@pytest.mark.parametrize("name", NETWORK_NAMES)
def test_partition_covers_every_key_exactly_once(name, norm):
    net = _tiny(name, norm=norm)
    keys = list(net.state_dict())
    part = partition_keys(net)
    assert part.encoder and part.head
    assert not set(part.encoder) & set(part.head)
    assert sorted(part.encoder + part.head) == sorted(keys)
    assert set(part.norm) <= set(keys)
    # FedBN keeps norms local in both halves
    assert set(part.norm) & set(part.encoder) and set(part.norm) & set(part.head)
    assert encoder_keys(net) == part.encoder and head_keys(net) == part.head
    assert norm_keys(net) == part.norm


@pytest.mark.parametrize(("name", "in_channels", "side"), CASES)
def test_first_conv_is_encoder_and_output_conv_is_head(name, in_channels, side):
    net = _tiny(name, in_channels)
    executed: list[str] = []
    modules = {m: n for n, m in net.named_modules()}
    hooks = [
        m.register_forward_hook(lambda mod, args, out: executed.append(modules[mod]))
        for m in net.modules()
        if isinstance(m, CONV_CLASSES)
    ]
    with torch.no_grad():
        net(torch.randn(1, in_channels, side, side, side))
    for h in hooks:
        h.remove()
    part = partition_keys(net)
    first, last = executed[0], executed[-1]
    assert net.get_submodule(first).in_channels == in_channels
    assert net.get_submodule(last).out_channels == 3
    assert f"{first}.weight" in part.encoder
    assert f"{last}.weight" in part.head


#: name -> (bottleneck module, deepest decoder module), as the module docstring's table declares
_UNET_L3 = "net.model.1.submodule.1.submodule"  # the third (deepest) UNet level
DEEPEST = {
    "unet": (f"{_UNET_L3}.1.submodule", f"{_UNET_L3}.2"),
    "resunet": (f"{_UNET_L3}.1.submodule", f"{_UNET_L3}.2"),
    "attention_unet": (f"{_UNET_L3}.1.submodule", f"{_UNET_L3}.1.upconv"),
    "segresnet": ("net.down_layers.3", "net.up_samples.0"),
    "unetplusplus": ("net.conv_4_0", "net.upcat_3_1"),
}


@pytest.mark.parametrize("name", NETWORK_NAMES)
def test_bottleneck_is_encoder_and_deepest_decoder_is_head(name):
    net = _tiny(name)
    part = partition_keys(net)
    bottleneck, decoder = DEEPEST[name]
    assert set(_keys_of(net, bottleneck)) <= set(part.encoder)
    assert set(_keys_of(net, decoder)) <= set(part.head)
    # the bottleneck is the coarsest level: the deepest decoder consumes its output and upsamples
    x = torch.randn(1, 4, SIDE[name], SIDE[name], SIDE[name])
    _, seen = _run_recording(net, [bottleneck, decoder], x)
    assert seen[bottleneck][1].shape[2] == SIDE[name] // net.size_divisor
    assert seen[decoder][0][0] == SIDE[name] // net.size_divisor
    assert seen[decoder][1].shape[2] == 2 * seen[decoder][0][0]


def _pure_modules(net: nn.Module, part) -> dict[str, str]:
    """Module name -> "encoder"/"head" for modules whose keys all lie on one side."""
    enc, head = set(part.encoder), set(part.head)
    out = {}
    for name, module in net.named_modules():
        keys = {f"{name}.{k}" if name else k for k in module.state_dict()}
        if name and keys and keys <= enc:
            out[name] = "encoder"
        elif name and keys and keys <= head:
            out[name] = "head"
    return out


def _run_recording(net: nn.Module, names, x):
    """Network output and, per module name, (input spatial shape, output copy)."""
    seen: dict[str, tuple] = {}

    def hook(name):
        def record(mod, args, out):
            if isinstance(out, torch.Tensor) and name not in seen:
                first = args[0] if args else None
                shape = tuple(first.shape[2:]) if isinstance(first, torch.Tensor) else None
                seen[name] = (shape, out.detach().clone())

        return record

    hooks = [net.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    with torch.no_grad():
        y = net(x)
    for h in hooks:
        h.remove()
    return y, seen


def _perturb(net: nn.Module, keys: list[str]) -> None:
    params = dict(net.named_parameters())
    with torch.no_grad():
        for k in keys:
            if k in params:
                params[k].add_(0.5 * torch.randn_like(params[k]) + 0.1)


@pytest.mark.parametrize("norm", ["instance", "batch"])
@pytest.mark.parametrize(("name", "in_channels", "side"), CASES)
def test_split_is_behavioural_encoder_never_sees_head(name, in_channels, side, norm):
    net = _tiny(name, in_channels, norm=norm)
    part = partition_keys(net)
    sides = _pure_modules(net, part)
    x = torch.randn(1, in_channels, side, side, side)
    y0, before = _run_recording(net, sides, x)
    encoder = [n for n in before if sides[n] == "encoder"]
    head = [n for n in before if sides[n] == "head"]
    assert encoder and head

    # the contracting path never upsamples; the expanding path does
    assert all(before[n][0] is None or before[n][1].shape[2:] <= before[n][0] for n in encoder)
    assert any(before[n][0] is not None and before[n][1].shape[2] > before[n][0][0] for n in head)
    # the bottleneck (coarsest output) is encoder
    coarsest = min(before[n][1].shape[2] for n in before)
    bottleneck = [n for n in encoder if before[n][1].shape[2] == coarsest]
    assert bottleneck

    torch.manual_seed(1)
    _perturb(net, part.head)
    y1, after = _run_recording(net, sides, x)
    assert not torch.allclose(y0, y1)
    for n in encoder:
        assert torch.equal(before[n][1], after[n][1]), f"encoder module {n} depends on head weights"

    _perturb(net, part.encoder)
    y2, changed = _run_recording(net, sides, x)
    assert not torch.allclose(y1, y2)
    assert all(not torch.allclose(after[n][1], changed[n][1]) for n in bottleneck)


#: the head rule before decoder levels were declared: every key under one of these modules of
#: the MONAI net was head, every other key encoder (written out again here, not imported)
_UNET_UPS = ("model.2", "model.1.submodule.2", "model.1.submodule.1.submodule.2")
_GATES = ("model.1", "model.1.submodule.1", "model.1.submodule.1.submodule.1")
OLD_HEAD_MODULES = {
    "unet": _UNET_UPS,
    "resunet": _UNET_UPS,
    "attention_unet": (
        "model.2", *(f"{g}.{m}" for g in _GATES for m in ("attention", "upconv", "merge"))
    ),
    "segresnet": ("up_samples", "up_layers", "conv_final"),
    "unetplusplus": ("upcat_", "final_conv_"),  # a name prefix, not a module
}


def _old_head(name: str, keys: list[str]) -> list[str]:
    heads = tuple(f"net.{m}" if m.endswith("_") else f"net.{m}." for m in OLD_HEAD_MODULES[name])
    return [k for k in keys if k.startswith(heads)]


@pytest.mark.parametrize("norm", ["instance", "batch"])
@pytest.mark.parametrize("name", NETWORK_NAMES)
def test_default_head_depth_keeps_the_old_split(name, norm):
    net = _tiny(name, norm=norm)
    keys = list(net.state_dict())
    old_head = _old_head(name, keys)
    assert old_head
    for part in (partition_keys(net), partition_keys(net, head_depth="decoder")):
        assert part.head == old_head
        assert part.encoder == [k for k in keys if k not in old_head]


@pytest.mark.parametrize("norm", ["instance", "batch"])
@pytest.mark.parametrize("name", NETWORK_NAMES)
def test_head_grows_with_depth_and_every_depth_covers_every_key_once(name, norm):
    net = _tiny(name, norm=norm)
    keys = list(net.state_dict())
    heads = []
    for depth in HEAD_DEPTHS:
        part = partition_keys(net, head_depth=depth)
        assert part.encoder and part.head
        assert not set(part.encoder) & set(part.head)
        assert sorted(part.encoder + part.head) == sorted(keys)
        assert part.norm == norm_keys(net)  # norms do not depend on the depth
        assert encoder_keys(net, head_depth=depth) == part.encoder
        assert head_keys(net, head_depth=depth) == part.head
        heads.append(set(part.head))
    output, last, decoder = heads
    assert output < last < decoder  # every network has at least two decoder levels


#: the head of unet (features=4, affine instance norm) at each depth, typed out by hand
UNET_OUTPUT_HEAD = [
    "net.model.2.conv.weight",
    "net.model.2.conv.bias",
]
UNET_LAST_HEAD = [
    "net.model.1.submodule.2.conv.weight",
    "net.model.1.submodule.2.conv.bias",
    "net.model.1.submodule.2.adn.N.weight",
    "net.model.1.submodule.2.adn.N.bias",
    "net.model.1.submodule.2.adn.A.weight",
    "net.model.2.conv.weight",
    "net.model.2.conv.bias",
]
UNET_DECODER_HEAD = [
    "net.model.1.submodule.1.submodule.2.conv.weight",
    "net.model.1.submodule.1.submodule.2.conv.bias",
    "net.model.1.submodule.1.submodule.2.adn.N.weight",
    "net.model.1.submodule.1.submodule.2.adn.N.bias",
    "net.model.1.submodule.1.submodule.2.adn.A.weight",
    "net.model.1.submodule.2.conv.weight",
    "net.model.1.submodule.2.conv.bias",
    "net.model.1.submodule.2.adn.N.weight",
    "net.model.1.submodule.2.adn.N.bias",
    "net.model.1.submodule.2.adn.A.weight",
    "net.model.2.conv.weight",
    "net.model.2.conv.bias",
]


@pytest.mark.parametrize(
    ("depth", "expected"),
    [("output", UNET_OUTPUT_HEAD), ("last", UNET_LAST_HEAD), ("decoder", UNET_DECODER_HEAD)],
)
def test_unet_head_at_each_depth_is_the_hand_written_list(depth, expected):
    net = _tiny("unet")
    part = partition_keys(net, head_depth=depth)
    assert part.head == expected
    assert part.encoder == [k for k in net.state_dict() if k not in expected]


def test_unknown_head_depth_is_refused():
    with pytest.raises(ValueError, match="unknown head_depth 'all'; known: output, last, decoder"):
        partition_keys(_tiny("unet"), head_depth="all")


@pytest.mark.parametrize("name", NETWORK_NAMES)
def test_a_new_module_is_neither_encoder_nor_head_and_refused(name):
    net = _tiny(name)
    net.net.extra = nn.Linear(2, 2)
    message = f"'net.extra.weight', 'net.extra.bias' are neither encoder nor head of {name}"
    for depth in HEAD_DEPTHS:
        with pytest.raises(ValueError, match=f"{message}: declare them in networks.py"):
            partition_keys(net, head_depth=depth)
    # even when only declared keys are asked for: the network's layout is wrong
    with pytest.raises(ValueError, match=message):
        partition_keys(net, [k for k in net.state_dict() if "extra" not in k])
    with pytest.raises(ValueError, match="neither encoder nor head of"):
        encoder_keys(net.net)  # the bare MONAI net fails the same way


def test_a_module_on_the_wrapper_is_refused():
    net = _tiny("segresnet")
    net.extra = nn.Conv3d(1, 1, 1, bias=False)
    message = "key.s. 'extra.weight' is neither encoder nor head of segresnet: declare it"
    with pytest.raises(ValueError, match=message):
        partition_keys(net)


def test_a_renamed_module_is_refused():
    seg = _tiny("segresnet")
    seg.net.conv_out = seg.net.conv_final
    del seg.net.conv_final
    message = r"'net\.conv_out\.0\.weight'.* neither encoder nor head of segresnet"
    with pytest.raises(ValueError, match=message):
        partition_keys(seg)

    unet = _tiny("unet")  # the top up block (the output layer) renamed from model.2 to model.out
    unet.net.model = nn.Sequential(OrderedDict(zip(["0", "1", "out"], unet.net.model)))
    with pytest.raises(
        ValueError,
        match=r"'net\.model\.out\.conv\.weight', 'net\.model\.out\.conv\.bias' are neither "
        r"encoder nor head of unet",
    ):
        partition_keys(unet)


def test_a_key_declared_twice_or_a_declaration_owning_nothing_is_refused(monkeypatch):
    spec = networks._REGISTRY["unet"]

    def twice(net):
        layout = spec.layout(net)
        return dataclasses.replace(layout, encoder=(*layout.encoder, "model.2"))

    monkeypatch.setitem(networks._REGISTRY, "unet", dataclasses.replace(spec, layout=twice))
    message = r"'net\.model\.2\.conv\.weight'.* of unet lie in more than one declared module"
    with pytest.raises(ValueError, match=message):
        partition_keys(_tiny("unet"))

    def stale(net):
        layout = spec.layout(net)
        return dataclasses.replace(layout, encoder=(*layout.encoder, "model.3"))

    monkeypatch.setitem(networks._REGISTRY, "unet", dataclasses.replace(spec, layout=stale))
    message = "declares module.s. 'model.3' that own no state_dict key of unet"
    with pytest.raises(ValueError, match=message):
        partition_keys(_tiny("unet"))


@pytest.mark.parametrize("depth", ["output", "last"])
@pytest.mark.parametrize(("name", "in_channels", "side"), CASES)
def test_shallow_heads_are_behavioural_too(name, in_channels, side, depth):
    """The encoder of a shallower head holds deeper decoder levels: none of them reads the head."""
    net = _tiny(name, in_channels)
    part = partition_keys(net, head_depth=depth)
    sides = _pure_modules(net, part)
    x = torch.randn(1, in_channels, side, side, side)
    y0, before = _run_recording(net, sides, x)
    encoder = [n for n in before if sides[n] == "encoder"]
    assert encoder and any(sides[n] == "head" for n in before)
    torch.manual_seed(1)
    _perturb(net, part.head)
    y1, after = _run_recording(net, sides, x)
    assert not torch.allclose(y0, y1)
    for n in encoder:
        assert torch.equal(before[n][1], after[n][1]), f"encoder module {n} depends on head weights"


@pytest.mark.parametrize("name", NETWORK_NAMES)
def test_norm_keys_are_exactly_the_norm_layers(name):
    for norm in ("instance", "batch"):
        net = _tiny(name, norm=norm)
        keys = list(net.state_dict())
        found = norm_keys(net)
        expected = [k for k in keys if _owner_class(net, k) in NORM_CLASSES]
        assert found and found == expected
        assert all(net.state_dict()[k].ndim <= 1 for k in found)  # no conv kernels
        suffixes = {k.rpartition(".")[2] for k in found}
        if norm == "batch":
            assert {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"} <= suffixes
            assert any(_owner_class(net, k) == "BatchNorm3d" for k in found)
        else:
            assert suffixes == {"weight", "bias"}
            # MONAI's AttentionUnet hard-codes BatchNorm: it must have been swapped out
            assert not any(isinstance(m, nn.BatchNorm3d) for m in net.modules())


def test_prefixed_keys_of_a_container_are_partitioned_the_same():
    class Holder(nn.Module):  # how a LightningModule holds the network
        def __init__(self):
            super().__init__()
            self.network = _tiny("unet")

    holder = Holder()
    plain = partition_keys(holder.network)
    prefixed = partition_keys(holder.network, holder.state_dict().keys(), prefix="network.")
    assert prefixed.encoder == ["network." + k for k in plain.encoder]
    assert prefixed.head == ["network." + k for k in plain.head]
    assert prefixed.norm == ["network." + k for k in plain.norm]
    assert head_keys(holder.network, prefix="network.") == prefixed.head
    # a subset is split alone
    subset = partition_keys(holder.network, ["network.net.model.2.conv.bias"], prefix="network.")
    assert subset.head == ["network.net.model.2.conv.bias"] and subset.encoder == []

    with pytest.raises(ValueError, match="does not start with the prefix 'network.'"):
        partition_keys(holder.network, ["net.model.0.conv.weight"], prefix="network.")
    with pytest.raises(ValueError, match="network.net.model.9.weight"):
        partition_keys(holder.network, ["network.net.model.9.weight"], prefix="network.")
    with pytest.raises(TypeError, match="prefix"):
        partition_keys(holder)


def test_bare_monai_net_partitions_like_the_wrapper():
    net = _tiny("segresnet")
    wrapped = partition_keys(net)
    bare = partition_keys(net.net)
    assert ["net." + k for k in bare.encoder] == wrapped.encoder
    assert ["net." + k for k in bare.head] == wrapped.head
    assert ["net." + k for k in bare.norm] == wrapped.norm


@pytest.mark.parametrize("name", NETWORK_NAMES)
def test_wrapper_rebuilds_from_its_attributes(name):
    net = SegmentationNetwork(name, 3, features=4, dropout=0.1, norm="batch")
    params = [p for p in inspect.signature(SegmentationNetwork.__init__).parameters if p != "self"]
    args = {p: getattr(net, p) for p in params}
    assert args == json.loads(json.dumps(args))  # plain JSON values
    again = SegmentationNetwork(**args)
    assert {k: v.shape for k, v in again.state_dict().items()} == {
        k: v.shape for k, v in net.state_dict().items()
    }
    assert again.config == net.config == NetworkConfig(name, 3, 3, 4, None, 0.1, "batch")
    assert SegmentationNetwork.from_config(net.config).config == net.config


def test_nvflare_job_export_reads_back_every_argument():
    from nvflare.job_config.fed_job_config import FedJobConfig

    net = SegmentationNetwork("unet", 4, features=8)
    exported = FedJobConfig("job", 1)._get_args(net, custom_dir=None)
    assert exported == {
        "name": "unet", "in_channels": 4, "out_channels": 3, "features": 8,
        "num_res_units": None, "dropout": 0.0, "norm": "instance",
    }  # fmt: skip
    assert SegmentationNetwork(**json.loads(json.dumps(exported))).config == net.config


def test_resunet_is_unet_with_residual_units():
    plain = set(_tiny("unet").state_dict())
    res = set(_tiny("resunet").state_dict())
    assert not any("residual" in k for k in plain)
    assert any(".residual." in k for k in res)
    assert set(_tiny("unet", num_res_units=2).state_dict()) == res
    assert NetworkConfig("resunet").residual_units == 2 and NetworkConfig("unet").residual_units == 0


@pytest.mark.parametrize("name", NETWORK_NAMES)
def test_dropout_reaches_the_monai_net(name):
    net = _tiny(name, dropout=0.25)
    rates = {m.p for m in net.modules() if isinstance(m, nn.modules.dropout._DropoutNd)}
    assert 0.25 in rates and rates <= {0.0, 0.25}  # AttentionUnet's gates/upconvs have none
    undropped = _tiny(name).modules()
    assert not any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in undropped)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "vnet"}, "unknown network 'vnet'; known: unet, resunet"),
        ({"norm": "group"}, "unknown network norm 'group'"),
        ({"name": "resunet", "num_res_units": 0}, "needs num_res_units > 0"),
        ({"name": "segresnet", "num_res_units": 2}, "applies to 'unet'/'resunet' only"),
        ({"in_channels": 0}, "in_channels must be an integer >= 1"),
        ({"features": 1}, "features must be an integer >= 2"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
    ],
)
def test_bad_config_is_refused_with_a_clear_message(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NetworkConfig(**kwargs)


def test_bad_input_is_refused_with_a_clear_message():
    net = _tiny("unet", 4)
    with pytest.raises(ValueError, match=r"expects input \(B, 4, D, H, W\), got \(1, 3, 16, 16, 16\)"):
        net(torch.zeros(1, 3, 16, 16, 16))
    with pytest.raises(ValueError, match=r"divisible by 8, got \(16, 20, 16\)"):
        net(torch.zeros(1, 4, 16, 20, 16))
    assert _tiny("unetplusplus").size_divisor == 16 == NetworkConfig("unetplusplus").size_divisor
