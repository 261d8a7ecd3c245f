"""The 3-D segmentation networks of fedseg, selected by name, and their encoder/head/norm split.

Every network maps ``(B, C, *S)`` images (``C`` = number of modalities) to ``(B, 3, *S)`` logits,
one channel per region in ``REGIONS`` order (ET, TC, WT; sigmoid outputs, not softmax).

Networks are MONAI's, wrapped in :class:`SegmentationNetwork`, whose constructor takes only plain
values stored as attributes of the same name: NVFlare's job export writes the server model as
``{"path": "fedseg.lightning_modules.networks.SegmentationNetwork", "args": {...}}`` from exactly
those attributes. The MONAI net is ``self.net``, so state_dict keys read ``net.<...>``.

Personalised federated learning needs to know which weights are shared. :func:`partition_keys`
splits a network's state_dict keys (parameters *and* buffers) into

* **encoder** - the contracting path and the bottleneck: shared (FedAvg'ed) in FedPer;
* **head** - the expanding path and the output layer: kept local in FedPer;

every key lies in exactly one of them. Orthogonally, **norm** lists the keys of normalisation
layers (affine weight/bias, and BatchNorm running statistics) wherever they are: the keys FedBN
keeps local. Module names below are relative to the MONAI net (prefix ``net.`` in the wrapper):

==============  =================  ================================  ===============================
name            MONAI class        encoder (shared in FedPer)        head (personal in FedPer)
==============  =================  ================================  ===============================
unet, resunet   UNet               ``model.0``; each ``model.1.      ``model.2`` (last up block with
                                   submodule...0`` (down blocks);    the output conv); each
                                   the innermost ``submodule``       ``model.1.submodule...2``
                                   (bottleneck)                      (up blocks)
attention_unet  AttentionUnet      ``model.0`` (MONAI names it       ``model.2`` (1x1 output conv);
                                   ``head``!); each ``submodule.0``  each AttentionLayer's
                                   (down ConvBlocks); innermost      ``attention`` (the gate),
                                   ``submodule`` (bottleneck)        ``upconv`` and ``merge``
segresnet       SegResNet          ``convInit``, ``down_layers``     ``up_samples``, ``up_layers``,
                                                                     ``conv_final``
unetplusplus    BasicUNetPlusPlus  ``conv_0_0`` .. ``conv_4_0``      ``upcat_i_j`` (nested decoder
                                   (the backbone column)             nodes), ``final_conv_0_1..4``
==============  =================  ================================  ===============================

The attention gates read skip features but only serve the expanding path, so they are head.
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

from fedseg.lightning_modules.data.datalist import MODALITIES
from fedseg.lightning_modules.labels import REGIONS

__all__ = [
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

#: ``NetworkConfig.norm`` values. "instance" is affine (MONAI's bare "instance" has no weights,
#: which would leave FedBN nothing to keep local); "batch" adds running-statistics buffers.
NORMS: tuple[str, ...] = ("instance", "batch")

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

    name: str = "unet"
    in_channels: int = len(MODALITIES)
    out_channels: int = len(REGIONS)
    features: int = 16
    num_res_units: int | None = None
    dropout: float = 0.0
    norm: str = "instance"

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
# builders and head declarations, one pair per MONAI class
# --------------------------------------------------------------------------------------------


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


def _unet_head(net: nn.Module) -> list[str]:
    level, name = net.model, "model"
    if not _is_unet_level(level):
        raise RuntimeError("MONAI UNet layout changed: net.model is not Sequential(down, skip, up)")
    heads = []
    while True:
        heads.append(f"{name}.2")
        level, name = level[1].submodule, f"{name}.1.submodule"
        if not _is_unet_level(level):  # the bottleneck: encoder
            return heads


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


def _attention_unet_head(net: nn.Module) -> list[str]:
    layer, name = net.model[1], "model.1"
    if not isinstance(layer, AttentionLayer):
        raise RuntimeError("MONAI AttentionUnet layout changed: net.model[1] is not an AttentionLayer")
    heads = ["model.2"]
    while True:
        heads += [f"{name}.attention", f"{name}.upconv", f"{name}.merge"]
        sub = layer.submodule
        if not (isinstance(sub, nn.Sequential) and isinstance(sub[1], AttentionLayer)):
            return heads  # the bottleneck ConvBlock: encoder
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


def _segresnet_head(net: nn.Module) -> list[str]:
    return ["up_samples", "up_layers", "conv_final"]


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


def _unetplusplus_head(net: nn.Module) -> list[str]:
    return [name for name, _ in net.named_children() if name.startswith(("upcat_", "final_conv_"))]


@dataclass(frozen=True)
class _NetworkSpec:
    monai_class: type[nn.Module]
    build: Callable[[NetworkConfig], nn.Module]
    head_modules: Callable[[nn.Module], list[str]]
    size_divisor: int


_REGISTRY: dict[str, _NetworkSpec] = {
    "unet": _NetworkSpec(UNet, _build_unet, _unet_head, 8),
    "resunet": _NetworkSpec(UNet, _build_unet, _unet_head, 8),
    "attention_unet": _NetworkSpec(AttentionUnet, _build_attention_unet, _attention_unet_head, 8),
    "segresnet": _NetworkSpec(SegResNet, _build_segresnet, _segresnet_head, 8),
    "unetplusplus": _NetworkSpec(BasicUNetPlusPlus, _build_unetplusplus, _unetplusplus_head, 16),
}

#: Names accepted by ``NetworkConfig.name``.
NETWORK_NAMES: tuple[str, ...] = tuple(_REGISTRY)


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
        features: int = 16,
        num_res_units: int | None = None,
        dropout: float = 0.0,
        norm: str = "instance",
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


def _monai_net(network: nn.Module) -> tuple[nn.Module, str, _NetworkSpec]:
    """The MONAI net inside ``network``, the key prefix it has there, and its registry entry."""
    if isinstance(network, SegmentationNetwork):
        return network.net, "net.", _REGISTRY[network.name]
    for spec in _REGISTRY.values():
        # exact type: a subclass (e.g. SegResNetVAE) may add modules the head rule does not know
        if type(network) is spec.monai_class:
            return network, "", spec
    raise TypeError(
        f"cannot partition a {type(network).__name__}: pass the SegmentationNetwork (or one of "
        f"{', '.join(sorted({s.monai_class.__name__ for s in _REGISTRY.values()}))}) itself, "
        "and the prefix its keys carry in the container (e.g. prefix='network.')"
    )


def partition_keys(
    network: nn.Module, keys: Iterable[str] | None = None, prefix: str = ""
) -> KeyPartition:
    """Split state_dict keys of ``network`` into encoder / head, and pick out the norm keys.

    ``network``: a :class:`SegmentationNetwork` or a bare registered MONAI net.
    ``keys``: the keys to split, default all of ``network.state_dict()`` (with ``prefix``); each
    must be ``prefix`` + a key of ``network.state_dict()``. ``prefix`` is what a container adds,
    e.g. ``"network."`` for a LightningModule holding the wrapper as ``self.network``.
    Keys come back unchanged (prefix included), in input order.
    """
    monai_net, inner, spec = _monai_net(network)
    own = network.state_dict(keep_vars=True)
    heads = tuple(f"{inner}{name}." for name in spec.head_modules(monai_net))
    norm_modules = {
        f"{inner}{name}" for name, m in monai_net.named_modules() if isinstance(m, _NORM_LAYERS)
    }
    if keys is None:
        keys = [prefix + k for k in own]
    example = next(iter(own), "")
    part = KeyPartition()
    for key in dict.fromkeys(keys):
        if not key.startswith(prefix):
            raise ValueError(f"state_dict key {key!r} does not start with the prefix {prefix!r}")
        rel = key[len(prefix):]
        if rel not in own:
            raise ValueError(
                f"{key!r} is not a key of this {type(network).__name__} with prefix {prefix!r} "
                f"(its keys look like {prefix + example!r})"
            )
        (part.head if rel.startswith(heads) else part.encoder).append(key)
        if rel.rpartition(".")[0] in norm_modules:
            part.norm.append(key)
    return part


def encoder_keys(network: nn.Module, keys: Iterable[str] | None = None, prefix: str = "") -> list[str]:
    """The shared (FedPer) keys: contracting path and bottleneck. See :func:`partition_keys`."""
    return partition_keys(network, keys, prefix).encoder


def head_keys(network: nn.Module, keys: Iterable[str] | None = None, prefix: str = "") -> list[str]:
    """The personal (FedPer) keys: expanding path and output layer. See :func:`partition_keys`."""
    return partition_keys(network, keys, prefix).head


def norm_keys(network: nn.Module, keys: Iterable[str] | None = None, prefix: str = "") -> list[str]:
    """The normalisation layers' keys (kept local by FedBN). See :func:`partition_keys`."""
    return partition_keys(network, keys, prefix).norm
