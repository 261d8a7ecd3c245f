"""The 3-D segmentation networks of fedseg, selected by name, and their encoder/head/norm split.

Every network maps ``(B, C, *S)`` images (``C`` = number of modalities) to ``(B, 3, *S)`` logits,
one channel per region in ``REGIONS`` order (ET, TC, WT; sigmoid outputs, not softmax).

Networks are MONAI's, wrapped in :class:`SegmentationNetwork`, whose constructor takes only plain
values stored as attributes of the same name: NVFlare's job export writes the server model as
``{"path": "fedseg.lightning_modules.networks.SegmentationNetwork", "args": {...}}`` from exactly
those attributes. The MONAI net is ``self.net``, so state_dict keys read ``net.<...>``.

Personalised federated learning needs to know which weights are shared. Every registered network
declares, by module name, its **encoder** (the contracting path and the bottleneck) and its
**decoder levels**, ordered from the output side inwards: level 0 is the output layer (the
module(s) that produce the logits), level 1 the decoder level nearest the output, ..., the last
one the deepest decoder level. :func:`partition_keys` splits a network's state_dict keys
(parameters *and* buffers) into

* **head** - decoder levels 0 .. ``d``: kept local in FedPer;
* **encoder** - the encoder modules and the decoder levels deeper than ``d``: shared (FedAvg'ed);

where ``head_depth`` (one of :data:`HEAD_DEPTHS`) sets ``d``:

* ``"output"`` - level 0: only the output layer is personal;
* ``"last"`` - levels 0 and 1: the output layer and the decoder level nearest it;
* ``"decoder"`` (default) - every level: the whole expanding path and the output layer.

Every key lies in exactly one of them. The split fails closed: a key that lies in no declared
module, or in more than one, raises ``ValueError`` - a renamed or new layer must be declared
here before FedPer can send anything, rather than being shared by default. Orthogonally, **norm**
lists the keys of normalisation layers (affine weight/bias, and BatchNorm running statistics)
wherever they are: the keys FedBN keeps local. Module names below are relative to the MONAI net
(prefix ``net.`` in the wrapper). In UNet, ``S1`` = ``model.1.submodule``, ``S2`` =
``S1.1.submodule``, ``S3`` = ``S2.1.submodule``; in AttentionUnet, ``A1`` = ``model.1``, ``A2`` =
``A1.submodule.1``, ``A3`` = ``A2.submodule.1``:

==============  =================  ===============================  ==============================
name            MONAI class        encoder modules                  decoder levels, 0 = output
==============  =================  ===============================  ==============================
unet, resunet   UNet               down blocks ``model.0``,         0: ``model.2`` (the top up
                                   ``S1.0``, ``S2.0``; bottleneck   block outputs the logits);
                                   ``S3``                           1: ``S1.2``; 2: ``S2.2``
attention_unet  AttentionUnet      ``model.0`` (MONAI names it      0: ``model.2`` (1x1 conv);
                                   ``head``!), ``A1.submodule.0``,  1: ``A1.attention`` (the gate),
                                   ``A2.submodule.0``; bottleneck   ``A1.upconv``, ``A1.merge``;
                                   ``A3.submodule`` (a strided      2, 3: the same three of ``A2``,
                                   ConvBlock: last down step and    ``A3``
                                   bottleneck in one)
segresnet       SegResNet          ``convInit``, ``down_layers``    0: ``conv_final``;
                                                                    1: ``up_samples.2``,
                                                                    ``up_layers.2``; 2: ``...1``;
                                                                    3: ``...0`` (MONAI's index 0
                                                                    is the deepest)
unetplusplus    BasicUNetPlusPlus  ``conv_0_0`` .. ``conv_4_0``     0: ``final_conv_0_1`` ..
                                   (the backbone column)            ``_0_4``; 1: ``upcat_0_1`` ..
                                                                    ``_0_4`` (the top row);
                                                                    2: ``upcat_1_1`` .. ``_1_3``;
                                                                    3: ``upcat_2_1``, ``_2_2``;
                                                                    4: ``upcat_3_1``
==============  =================  ===============================  ==============================

The attention gates read skip features but only serve the expanding path, so they are decoder.
For ``resunet`` (``num_res_units=2``) ``model.2`` is ``Sequential(transposed conv to the 3 output
channels with norm and activation, ResidualUnit 3 -> 3 ending in a bare conv)``: both parts work
at the output's width, so the whole block is level 0. For ``unet`` (no residual units) ``model.2``
is a single conv-only transposed conv, so UNet has one decoder level fewer than the others.
UNet++ computes all four ``final_conv_0_*`` but, without deep supervision, returns only
``final_conv_0_4``'s; the other three are level 0 as well. Decoder levels deeper than ``d`` never
read a shallower level's output, so the encoder's features do not depend on the head at any depth.
Norm layers: the ``adn.N`` of each MONAI ``Convolution`` (UNet, UNet++; none in conv-only output
layers), SegResNet's ``norm1``/``norm2`` and ``conv_final.0``, AttentionUnet's ConvBlock/UpConv
norms and gate norms (``W_g.1``, ``W_x.1``, ``psi.1``).

Widths and depths (``f`` = ``features``): UNet and AttentionUnet use channels ``(f, 2f, 4f, 8f)``
with three stride-2 steps; SegResNet is the NVFlare/MONAI BraTS reference (``init_filters=f``,
``blocks_down=(1, 2, 2, 4)``, ``blocks_up=(1, 1, 1)``); BasicUNetPlusPlus uses
``(f, f, 2f, 4f, 8f, f)`` with four steps. Spatial sizes must be multiples of
:attr:`NetworkConfig.size_divisor` (8, or 16 for UNet++).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from monai.networks.layers.simplelayers import SkipConnection
from monai.networks.nets import AttentionUnet, BasicUNetPlusPlus, SegResNet, UNet
from monai.networks.nets.attentionunet import AttentionLayer
from torch import nn
from torch.nn.modules.batchnorm import _NormBase  # base of every BatchNorm*d / InstanceNorm*d

# ``head_depth`` values, shallowest head first, and the default: written once, in the configuration
from fedseg.config import DEFAULT_HEAD_DEPTH, HEAD_DEPTHS

from fedseg.config import MODALITIES, NETWORK_NAMES as _CONFIG_NETWORK_NAMES, NORMS, ModelSettings
from fedseg.lightning_modules.labels import REGIONS

__all__ = [
    "HEAD_DEPTHS",
    "NETWORK_NAMES",
    "NORMS",
    "KeyPartition",
    "NetworkConfig",
    "SegmentationNetwork",
    "build_network",
    "encoder_keys",
    "head_keys",
    "norm_keys",
    "partition_keys",
]

# ``NetworkConfig.norm`` values (``fedseg.config.NORMS``). "instance" is affine (MONAI's bare
# "instance" has no weights, which would leave FedBN nothing to keep local); "batch" adds
# running-statistics buffers.
_MODEL = ModelSettings()

_NORM_LAYERS = (_NormBase, nn.GroupNorm, nn.LayerNorm)


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NetworkConfig:
    """Which network to build and how wide.

    ``num_res_units``: residual units per block, UNet only; ``None`` means the name's default
    (``unet``: 0, a plain U-Net; ``resunet``: 2). ``dropout`` is a probability in ``[0, 1)``.
    """

    name: str = _MODEL.network
    in_channels: int = len(MODALITIES)
    out_channels: int = len(REGIONS)
    features: int = _MODEL.features
    num_res_units: int | None = None
    dropout: float = 0.0
    norm: str = _MODEL.norm

    def __post_init__(self) -> None:
        if self.name not in _REGISTRY:
            raise ValueError(f"unknown network {self.name!r}; known: {', '.join(_REGISTRY)}")
        for attr, low in (("in_channels", 1), ("out_channels", 1), ("features", 2)):
            value = getattr(self, attr)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"network {attr} must be an integer >= {low}, got {value!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not (
            0.0 <= self.dropout < 1.0
        ):
            raise ValueError(f"network dropout must be in [0, 1), got {self.dropout!r}")
        if self.norm not in NORMS:
            raise ValueError(f"unknown network norm {self.norm!r}; known: {', '.join(NORMS)}")
        res = self.num_res_units
        if res is not None:
            if isinstance(res, bool) or not isinstance(res, int) or res < 0:
                raise ValueError(f"num_res_units must be None or an integer >= 0, got {res!r}")
            if self.name not in ("unet", "resunet"):
                raise ValueError(
                    f"num_res_units applies to 'unet'/'resunet' only, not {self.name!r}; leave it None"
                )
            if self.name == "resunet" and res == 0:
                raise ValueError("'resunet' needs num_res_units > 0; use 'unet' for a plain U-Net")

    @property
    def size_divisor(self) -> int:
        """Every spatial size fed to the network must be a multiple of this."""
        return _REGISTRY[self.name].size_divisor

    @property
    def residual_units(self) -> int:
        """``num_res_units`` with the name's default filled in (0 for non-UNet networks)."""
        if self.num_res_units is not None:
            return self.num_res_units
        return 2 if self.name == "resunet" else 0


# --------------------------------------------------------------------------------------------
# builders and layout declarations, one pair per MONAI class
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    """Module names (relative to the MONAI net) of a network's encoder and decoder levels.

    ``levels[0]`` is the output layer, ``levels[1]`` the decoder level nearest the output, ...,
    ``levels[-1]`` the deepest one. Together they must own every state_dict key exactly once.
    """

    encoder: tuple[str, ...]
    levels: tuple[tuple[str, ...], ...]


def _affine_instance_norm() -> tuple[str, dict[str, Any]]:
    return ("instance", {"affine": True})


def _monai_norm(cfg: NetworkConfig) -> str | tuple[str, dict[str, Any]]:
    return _affine_instance_norm() if cfg.norm == "instance" else "batch"


def _widths(cfg: NetworkConfig, levels: int) -> tuple[int, ...]:
    return tuple(cfg.features * 2**i for i in range(levels))


def _build_unet(cfg: NetworkConfig) -> nn.Module:
    return UNet(
        spatial_dims=3,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        channels=_widths(cfg, 4),
        strides=(2, 2, 2),
        num_res_units=cfg.residual_units,
        norm=_monai_norm(cfg),
        dropout=cfg.dropout,
    )


def _is_unet_level(module: nn.Module) -> bool:
    """MONAI UNet nests each resolution level as ``Sequential(down, SkipConnection(deeper), up)``."""
    return (
        isinstance(module, nn.Sequential) and len(module) == 3 and isinstance(module[1], SkipConnection)
    )


def _unet_layout(net: nn.Module) -> _Layout:
    """Each nested level's down block is encoder and its up block a decoder level, top first;
    the top up block ``model.2`` outputs the logits (level 0). The innermost module: bottleneck."""
    level, name = net.model, "model"
    if not _is_unet_level(level):
        raise RuntimeError("MONAI UNet layout changed: net.model is not Sequential(down, skip, up)")
    encoder: list[str] = []
    levels: list[tuple[str, ...]] = []
    while _is_unet_level(level):
        encoder.append(f"{name}.0")
        levels.append((f"{name}.2",))
        level, name = level[1].submodule, f"{name}.1.submodule"
    return _Layout((*encoder, name), tuple(levels))


def _batch_to_instance_norm(module: nn.Module) -> None:
    """Replace every BatchNorm3d below ``module`` by an affine InstanceNorm3d of the same width.

    MONAI's AttentionUnet hard-codes BatchNorm (no ``norm`` argument); swapping the layers after
    construction is the only way to give it the instance norm of the other networks.
    """
    for child_name, child in module.named_children():
        if isinstance(child, nn.BatchNorm3d):
            setattr(module, child_name, nn.InstanceNorm3d(child.num_features, affine=True))
        else:
            _batch_to_instance_norm(child)


def _build_attention_unet(cfg: NetworkConfig) -> nn.Module:
    net = AttentionUnet(
        spatial_dims=3,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        channels=_widths(cfg, 4),
        strides=(2, 2, 2),
        dropout=cfg.dropout,
    )
    if cfg.norm == "instance":
        _batch_to_instance_norm(net)
    return net


def _attention_unet_layout(net: nn.Module) -> _Layout:
    """``model`` is ``Sequential(first ConvBlock, AttentionLayer, 1x1 output conv)``; each
    AttentionLayer's gate, up-conv and merge form a decoder level, its ``submodule`` is
    ``Sequential(down ConvBlock, deeper AttentionLayer)`` or, innermost, the strided bottleneck."""
    layer, name = net.model[1], "model.1"
    if not isinstance(layer, AttentionLayer):
        raise RuntimeError("MONAI AttentionUnet layout changed: net.model[1] is not an AttentionLayer")
    encoder, levels = ["model.0"], [("model.2",)]
    while True:
        levels.append((f"{name}.attention", f"{name}.upconv", f"{name}.merge"))
        sub = layer.submodule
        if not (isinstance(sub, nn.Sequential) and isinstance(sub[1], AttentionLayer)):
            return _Layout((*encoder, f"{name}.submodule"), tuple(levels))
        encoder.append(f"{name}.submodule.0")
        layer, name = sub[1], f"{name}.submodule.1"


def _build_segresnet(cfg: NetworkConfig) -> nn.Module:
    return SegResNet(
        spatial_dims=3,
        init_filters=cfg.features,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        dropout_prob=cfg.dropout or None,
        norm=_monai_norm(cfg),
        blocks_down=(1, 2, 2, 4),
        blocks_up=(1, 1, 1),
    )


def _segresnet_layout(net: nn.Module) -> _Layout:
    """MONAI's decoder runs ``up_samples[i]`` then ``up_layers[i]`` for i = 0, 1, 2: index 0 is
    the deepest level, so the levels count the indices down; ``conv_final`` is the output layer."""
    ups = len(net.up_layers)
    if len(net.up_samples) != ups:
        raise RuntimeError("MONAI SegResNet layout changed: up_samples, up_layers differ in length")
    levels = [(f"up_samples.{i}", f"up_layers.{i}") for i in reversed(range(ups))]
    return _Layout(("convInit", "down_layers"), (("conv_final",), *levels))


def _build_unetplusplus(cfg: NetworkConfig) -> nn.Module:
    f = cfg.features
    return BasicUNetPlusPlus(
        spatial_dims=3,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        features=(f, f, 2 * f, 4 * f, 8 * f, f),
        deep_supervision=False,
        norm=_monai_norm(cfg),
        dropout=cfg.dropout,
    )


#: BasicUNetPlusPlus's fixed number of downsampling steps (rows below the top one)
_UNETPP_STEPS = 4


def _unetplusplus_layout(net: nn.Module) -> _Layout:
    """Node ``x_i_j`` sits in resolution row ``i``: ``conv_i_0`` is the backbone (encoder),
    ``upcat_i_j`` (j >= 1) a nested decoder node. No node reads a row above its own, so the rows,
    top first, are the decoder levels; the four ``final_conv_0_j`` form the output layer."""
    n = _UNETPP_STEPS
    output = tuple(f"final_conv_0_{j}" for j in range(1, n + 1))
    rows = [tuple(f"upcat_{i}_{j}" for j in range(1, n - i + 1)) for i in range(n)]
    return _Layout(tuple(f"conv_{i}_0" for i in range(n + 1)), (output, *rows))


@dataclass(frozen=True)
class _NetworkSpec:
    monai_class: type[nn.Module]
    build: Callable[[NetworkConfig], nn.Module]
    layout: Callable[[nn.Module], _Layout]
    size_divisor: int


_REGISTRY: dict[str, _NetworkSpec] = {
    "unet": _NetworkSpec(UNet, _build_unet, _unet_layout, 8),
    "resunet": _NetworkSpec(UNet, _build_unet, _unet_layout, 8),
    "attention_unet": _NetworkSpec(AttentionUnet, _build_attention_unet, _attention_unet_layout, 8),
    "segresnet": _NetworkSpec(SegResNet, _build_segresnet, _segresnet_layout, 8),
    "unetplusplus": _NetworkSpec(BasicUNetPlusPlus, _build_unetplusplus, _unetplusplus_layout, 16),
}

#: Names accepted by ``NetworkConfig.name``.
NETWORK_NAMES: tuple[str, ...] = tuple(_REGISTRY)
if NETWORK_NAMES != _CONFIG_NETWORK_NAMES:  # the CLI offers fedseg.config's list without importing torch
    raise RuntimeError(f"fedseg.config.NETWORK_NAMES {_CONFIG_NETWORK_NAMES} differs from the registry {NETWORK_NAMES}")


# --------------------------------------------------------------------------------------------
# the serializable wrapper
# --------------------------------------------------------------------------------------------


class SegmentationNetwork(nn.Module):
    """A registered MONAI network behind one constructor of plain values: ``(B, C, *S) -> (B, 3, *S)``.

    Each constructor argument is stored as an attribute of the same name (NVFlare's job export
    reads them back); the MONAI net is ``self.net``.
    """

    #: NVFlare exports only arguments that differ from their defaults, unless listed here; all
    #: are listed so that an exported job does not depend on this file's defaults.
    _always_serialize_args = (
        "name", "in_channels", "out_channels", "features", "num_res_units", "dropout", "norm",
    )  # fmt: skip

    def __init__(
        self,
        name: str,
        in_channels: int,
        out_channels: int = len(REGIONS),
        features: int = _MODEL.features,
        num_res_units: int | None = None,
        dropout: float = 0.0,
        norm: str = _MODEL.norm,
    ) -> None:
        super().__init__()
        cfg = NetworkConfig(name, in_channels, out_channels, features, num_res_units, dropout, norm)
        self.name = name
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.features = features
        self.num_res_units = num_res_units
        self.dropout = dropout
        self.norm = norm
        self.net = _REGISTRY[name].build(cfg)

    @classmethod
    def from_config(cls, cfg: NetworkConfig) -> SegmentationNetwork:
        return cls(**asdict(cfg))

    @property
    def config(self) -> NetworkConfig:
        return NetworkConfig(
            self.name, self.in_channels, self.out_channels, self.features,
            self.num_res_units, self.dropout, self.norm,
        )  # fmt: skip

    @property
    def size_divisor(self) -> int:
        return _REGISTRY[self.name].size_divisor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, D, H, W)`` images -> ``(B, out_channels, D, H, W)`` logits."""
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"{self.name} expects input (B, {self.in_channels}, D, H, W), got {tuple(x.shape)}"
            )
        d = self.size_divisor
        if any(s % d for s in x.shape[2:]):
            raise ValueError(
                f"{self.name} needs spatial sizes divisible by {d}, got {tuple(x.shape[2:])}"
            )
        out = self.net(x)
        # BasicUNetPlusPlus returns a list (one entry without deep supervision).
        return out[0] if isinstance(out, (list, tuple)) else out

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in asdict(self.config).items())


def build_network(cfg: NetworkConfig) -> SegmentationNetwork:
    """The network ``cfg`` describes, wrapped so that it can be exported and partitioned."""
    return SegmentationNetwork.from_config(cfg)


def seeded_network(network: str, in_channels: int, features: int, network_kwargs: dict[str, Any] | None,
                   init_seed: int | None) -> SegmentationNetwork:
    """The study network with its initial weights drawn from ``init_seed`` (torch's global generator
    left as it was); ``None`` draws from the global generator."""
    with torch.random.fork_rng(devices=[], enabled=init_seed is not None):
        if init_seed is not None:
            torch.manual_seed(init_seed)
        return SegmentationNetwork(name=network, in_channels=in_channels, out_channels=3, features=features,
                                   **(network_kwargs or {}))


# --------------------------------------------------------------------------------------------
# encoder / head / norm partition of state_dict keys
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyPartition:
    """State_dict keys split for personalised FL; ``encoder`` + ``head`` is every key once, and
    ``norm`` (normalisation layers' parameters and buffers) is a subset of both together."""

    encoder: list[str] = field(default_factory=list)
    head: list[str] = field(default_factory=list)
    norm: list[str] = field(default_factory=list)



_ENCODER = -1  # the "level" of encoder keys in :func:`_key_levels`


def _monai_net(network: nn.Module) -> tuple[nn.Module, str, _NetworkSpec, str]:
    """The MONAI net inside ``network``, the key prefix it has there, its registry entry, and a
    name for messages."""
    if isinstance(network, SegmentationNetwork):
        return network.net, "net.", _REGISTRY[network.name], network.name
    for spec in _REGISTRY.values():
        # exact type: a subclass (e.g. SegResNetVAE) may add modules the layout does not declare
        if type(network) is spec.monai_class:
            return network, "", spec, type(network).__name__
    raise TypeError(
        f"cannot partition a {type(network).__name__}: pass the SegmentationNetwork (or one of "
        f"{', '.join(sorted({s.monai_class.__name__ for s in _REGISTRY.values()}))}) itself, "
        "and the prefix its keys carry in the container (e.g. prefix='network.')"
    )


def _head_levels(head_depth: str, levels: int) -> int:
    """How many decoder levels, counted from the output, the head holds at ``head_depth``."""
    if head_depth not in HEAD_DEPTHS:
        raise ValueError(f"unknown head_depth {head_depth!r}; known: {', '.join(HEAD_DEPTHS)}")
    return {"output": 1, "last": 2}.get(head_depth, levels)


def _listed(keys: list[str], limit: int = 8) -> str:
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(map(repr, keys[:limit])) + more


def _key_levels(network: nn.Module, inner: str, layout: _Layout, label: str) -> dict[str, int]:
    """Each state_dict key of ``network`` -> its decoder level, or ``_ENCODER``.

    Fails closed: a key owned by no declared module, or by more than one, and a declared module
    that owns no key, raise ``ValueError`` - nothing is shared by default.
    """
    declared = [(m, _ENCODER) for m in layout.encoder]
    declared += [(m, level) for level, names in enumerate(layout.levels) for m in names]
    owners = {
        k: [(m, lv) for m, lv in declared if k.startswith(f"{inner}{m}.")] for k in network.state_dict()
    }
    undeclared = [k for k, found in owners.items() if not found]
    if undeclared:
        one = len(undeclared) == 1
        raise ValueError(
            f"state_dict key(s) {_listed(undeclared)} {'is' if one else 'are'} neither encoder "
            f"nor head of {label}: declare {'it' if one else 'them'} in networks.py"
        )
    twice = [k for k, found in owners.items() if len(found) > 1]
    if twice:
        raise ValueError(
            f"state_dict key(s) {_listed(twice)} of {label} lie in more than one declared module "
            f"({', '.join(m for m, _ in owners[twice[0]])}): fix its layout in networks.py"
        )
    unused = [m for m, _ in declared if not any(k.startswith(f"{inner}{m}.") for k in owners)]
    if unused:
        raise ValueError(
            f"networks.py declares module(s) {_listed(unused)} that own no state_dict key of "
            f"{label}: fix its layout"
        )
    return {k: found[0][1] for k, found in owners.items()}


def partition_keys(
    network: nn.Module,
    keys: Iterable[str] | None = None,
    prefix: str = "",
    head_depth: str = DEFAULT_HEAD_DEPTH,
) -> KeyPartition:
    """Split state_dict keys of ``network`` into encoder / head, and pick out the norm keys.

    ``network``: a :class:`SegmentationNetwork` or a bare registered MONAI net.
    ``keys``: the keys to split, default all of ``network.state_dict()`` (with ``prefix``); each
    must be ``prefix`` + a key of ``network.state_dict()``. ``prefix`` is what a container adds,
    e.g. ``"network."`` for a LightningModule holding the wrapper as ``self.network``.
    ``head_depth`` (:data:`HEAD_DEPTHS`): how many decoder levels, from the output inwards, are
    head; deeper levels are shared with the encoder. Keys come back unchanged (prefix included),
    in input order. Raises ``ValueError`` if any key of the network lies in no declared module.
    """
    monai_net, inner, spec, label = _monai_net(network)
    layout = spec.layout(monai_net)
    head_levels = _head_levels(head_depth, len(layout.levels))
    levels = _key_levels(network, inner, layout, label)
    norm_modules = {
        f"{inner}{name}" for name, m in monai_net.named_modules() if isinstance(m, _NORM_LAYERS)
    }
    if keys is None:
        keys = [prefix + k for k in levels]
    example = next(iter(levels), "")
    part = KeyPartition()
    for key in dict.fromkeys(keys):
        if not key.startswith(prefix):
            raise ValueError(f"state_dict key {key!r} does not start with the prefix {prefix!r}")
        rel = key[len(prefix):]
        if rel not in levels:
            raise ValueError(
                f"{key!r} is not a key of this {type(network).__name__} with prefix {prefix!r} "
                f"(its keys look like {prefix + example!r})"
            )
        is_head = _ENCODER < levels[rel] < head_levels
        (part.head if is_head else part.encoder).append(key)
        if rel.rpartition(".")[0] in norm_modules:
            part.norm.append(key)
    return part


def encoder_keys(
    network: nn.Module,
    keys: Iterable[str] | None = None,
    prefix: str = "",
    head_depth: str = DEFAULT_HEAD_DEPTH,
) -> list[str]:
    """The shared (FedPer) keys: contracting path, bottleneck, and decoder levels deeper than
    ``head_depth``. See :func:`partition_keys`."""
    return partition_keys(network, keys, prefix, head_depth).encoder


def head_keys(
    network: nn.Module,
    keys: Iterable[str] | None = None,
    prefix: str = "",
    head_depth: str = DEFAULT_HEAD_DEPTH,
) -> list[str]:
    """The personal (FedPer) keys: the output layer and the decoder levels up to ``head_depth``.
    See :func:`partition_keys`."""
    return partition_keys(network, keys, prefix, head_depth).head


def norm_keys(
    network: nn.Module,
    keys: Iterable[str] | None = None,
    prefix: str = "",
    head_depth: str = DEFAULT_HEAD_DEPTH,
) -> list[str]:
    """The normalisation layers' keys (kept local by FedBN); the same at every ``head_depth``,
    which is accepted for a uniform signature. See :func:`partition_keys`."""
    return partition_keys(network, keys, prefix, head_depth).norm
