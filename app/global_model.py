"""The server's copy of the study network: what it averages, checkpoints and sends.

``GlobalModel`` has exactly the parameters of the sites' ``SegmentationModule`` under the same
names (``network.*``), built from the same arguments and the same seed, but it is a plain
``torch.nn.Module``. Why not the Lightning module itself: ``nvflare job submit`` imports every
class a job's configs name, to read its constructor's defaults (nvflare/tool/job/config/
config_indexer.py), and importing ``SegmentationModule`` imports PyTorch Lightning, most of a
submit's time. This module imports only torch at import time; the network is built on the server.

``SharedEncoder`` is the personalized jobs' server model: ``GlobalModel`` without the personal
keys (``personal_keys``), so the server never sends, averages or checkpoints a site's head.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from fedseg.config import DEFAULT_HEAD_DEPTH, DataSettings, ModelSettings

_MODEL, _DATA = ModelSettings(), DataSettings()


def personal_keys(module: nn.Module, keep_norm_local: bool = False, head_depth: str = DEFAULT_HEAD_DEPTH) -> list[str]:
    """State-dict keys of ``module`` (a ``SegmentationModule`` or ``GlobalModel``) that stay at the
    site: the head of ``head_depth``, and norm layers for FedBN; a key the network does not declare
    is an error (``networks.partition_keys``)."""
    from fedseg.lightning_modules.networks import partition_keys

    parts = partition_keys(module.network, module.network.state_dict().keys(), prefix="", head_depth=head_depth)
    personal = set(parts.head) | (set(parts.norm) if keep_norm_local else set())
    return sorted(f"network.{k}" for k in personal)


class GlobalModel(nn.Module):
    """The study network as the server holds it; ``state_dict`` keys equal ``SegmentationModule``'s.

    Args:
        network, in_channels, features, network_kwargs, init_seed: as ``SegmentationModule``'s.
        **kwargs: the module's other arguments (learning rate, ROI, ...): accepted so that one
            argument set builds both models, unused here.
    """

    #: NVFlare's export writes only arguments that differ from their defaults, unless listed here
    _always_serialize_args = ("network", "in_channels", "features", "network_kwargs", "init_seed")

    def __init__(self, network: str = _MODEL.network, in_channels: int = len(_DATA.modalities),
                 features: int = _MODEL.features, network_kwargs: dict[str, Any] | None = None,
                 init_seed: int | None = None, **kwargs: Any) -> None:
        super().__init__()
        del kwargs  # NVFlare's export skips a parameter named kwargs, never one named otherwise
        # NVFlare's job export writes a component's arguments back from its attributes `<name>` or
        # `_<name>` (fed_job_config.py, _get_args); `network` is the submodule, so its name is `_network`.
        self._network = network
        self.in_channels = in_channels
        self.features = features
        self.network_kwargs = network_kwargs
        self.init_seed = init_seed
        from fedseg.lightning_modules.networks import seeded_network

        self.network = seeded_network(network, in_channels, features, network_kwargs, init_seed)


class SharedEncoder(GlobalModel):
    """A personalized job's server model: ``GlobalModel`` without the personal keys. A container
    for the shared weights, not a runnable network."""

    def __init__(self, keep_norm_local: bool = False, personal_head: str = DEFAULT_HEAD_DEPTH, **module_args: Any) -> None:
        super().__init__(**module_args)
        self.keep_norm_local = keep_norm_local
        self.personal_head = personal_head
        for key in personal_keys(self, keep_norm_local, personal_head):
            owner_path, _, name = key.rpartition(".")
            delattr(self.get_submodule(owner_path), name)  # nn.Module drops the parameter or buffer
