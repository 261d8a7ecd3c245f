"""FedPer: a shared encoder averaged on the server, a personal head that each site keeps.

Which keys are personal comes from the network registry (``networks.partition_keys``): the head
(the decoder levels nearest the output: ``head_depth`` "output", "last" or "decoder"), plus the
normalization layers with ``keep_norm_local`` (the FedBN variant). The head never leaves its site; this is enforced three times:

1. the server's model is ``SharedEncoder`` (``fedseg.app.global_model``), the study network
   without its personal parameters, so the server never sends, aggregates or checkpoints a head;
2. the site sends only shared keys (``SharedKeysFLCallback``, whatever the server sent);
3. the job adds a site-side output filter (NVFlare's ``ExcludeVars`` with the explicit personal
   keys) on every result a site returns (``fedseg.jobs.fedper``).
The server's ``PayloadKeyAudit`` records the keys of every payload it receives, so a run can show it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_opt.lightning.api import FLCallback

from fedseg.app.global_model import personal_keys
from fedseg.config import DEFAULT_HEAD_DEPTH
from fedseg.lightning_modules.module import SegmentationModule


class SharedKeysFLCallback(FLCallback):
    """NVFlare's Lightning callback, sending only the shared keys of the site's model.

    ``flare.patch`` keeps an ``FLCallback`` already on the Trainer, so placing this one there first
    makes every update the site sends encoder-only, whatever the job or the server asked for.
    """

    def __init__(self, shared_keys: list[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.shared_keys = set(shared_keys)

    def _send_model(self, output_model: FLModel) -> None:
        if output_model.params:
            output_model.params = {k: v for k, v in output_model.params.items() if k in self.shared_keys}
        super()._send_model(output_model)


def shared_state(module: SegmentationModule, keep_norm_local: bool = False, head_depth: str = DEFAULT_HEAD_DEPTH) -> dict[str, Any]:
    """The module's state dict without its personal keys (what a FedPer site may send)."""
    personal = set(personal_keys(module, keep_norm_local, head_depth))
    return {k: v for k, v in module.state_dict().items() if k not in personal}


def personalize(encoder_checkpoint: Path | str, head_file: Path | str, out: Path | str) -> Path:
    """A site's personal model: a global checkpoint of the job completed by the site's stored personal
    part, saved as a full ``SegmentationModule`` checkpoint (``fedseg evaluate`` / ``predict`` take it).

    Runs at the site; ``head_file`` is the site's own ``PersonalModelStore`` file of the study: a
    FedPer or FedRep head completes the global encoder checkpoint; Ditto's and the fine-tuned model
    are whole models, which take only their settings from the global checkpoint (every key is
    theirs). Both files are read without running code from them (``fedseg.lightning_modules.safe_load``).
    """
    import torch

    from fedseg.lightning_modules.safe_load import load_checkpoint

    encoder = load_checkpoint(encoder_checkpoint)
    head = load_checkpoint(head_file)
    hparams = {k: v for k, v in encoder["hyper_parameters"].items() if k not in ("keep_norm_local", "personal_head")}
    module = SegmentationModule(**hparams)
    expected = set(module.state_dict())
    state = {**encoder["state_dict"], **head["state"]}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(f"{head_file} does not complete {encoder_checkpoint}: missing {missing[:3]}, unexpected {extra[:3]}")
    module.load_state_dict(state, strict=True)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    torch.save({**encoder, "state_dict": module.state_dict(), "hyper_parameters": hparams, "fedper_head": head["record"]}, tmp)
    tmp.replace(out)
    return out
