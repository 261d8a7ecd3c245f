"""The site training script that NVFlare runs at every hospital (through ``site_entry.py``).

It is a plain Lightning script: the same ``SegmentationModule`` and ``SegDataModule`` as
``fedseg train``, with the Trainer patched by NVFlare's Lightning client API. Per round it

1. validates the received global model on the site's validation cases (these metrics drive the
   server's best-model selection),
2. trains ``--local-epochs`` epochs and sends the update, weighted by the site's number of
   training cases,
3. prints one progress line.

A crash inside a round (an exception, an out-of-memory, a bad case, a ``fault_drill`` of the site
config) is reported to the server as this site's failure for that round (no weights, the error's
class only) and the site takes the next round as usual; see ``fedseg.app.resilient_fedavg``.

It also answers the ``submit_model`` task of cross-site evaluation. The site's data is found
through site-local configuration (``fedseg.app.site_config``), never through paths in the job.
Only weights and scalar metrics leave the site.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import traceback
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--network", default="unet")
    p.add_argument("--features", type=int, default=16)
    p.add_argument("--norm", default="instance")
    p.add_argument("--modalities", nargs="+", default=["t1", "t1ce", "t2", "flair"])
    p.add_argument("--roi", type=int, nargs=3, default=[128, 128, 128])
    p.add_argument("--normalization", default="zscore")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--rounds", type=int, default=1, help="total rounds: the cosine schedule spans rounds x local epochs")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--no-hd95", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=None, help="seed of this site's data order and augmentation (plus site_seed's offset)")
    p.add_argument("--fedper", action="store_true", help="keep the segmentation head at the site (FedPer)")
    p.add_argument("--keep-norm-local", action="store_true", help="FedPer: keep normalization layers local too (FedBN)")
    p.add_argument("--study", default="fedper", help="FedPer: the study whose head store this site uses")
    p.add_argument("--contribution", action="store_true",
                   help="contribution-weighted aggregation: also send the update's own validation loss")
    return p.parse_args(argv)


def progress(line: str) -> None:
    """One line to the site log (NVFlare redirects ``print``) and to the process console."""
    print(line)
    if sys.__stdout__ is not None and sys.stdout is not sys.__stdout__:
        sys.__stdout__.write(line + "\n")
        sys.__stdout__.flush()


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)

    import nvflare.client as flapi  # send / is_submit_model / is_evaluate: not re-exported below
    import nvflare.client.lightning as flare
    import torch
    from nvflare.app_common.abstract.fl_model import FLModel

    from fedseg.app.fault_drill import FaultDrill
    from fedseg.app.fingerprint import RECEIVED_KEY, model_fingerprint
    from fedseg.app.grouped_fedavg import GROUP_KEY
    from fedseg.app.fedper import SharedKeysFLCallback, personal_keys
    from fedseg.app.head_store import FedPerHeadStore
    from fedseg.app.site_config import default_head_store, load_site_config
    from fedseg.lightning_modules.data.datalist import read_datalist
    from fedseg.lightning_modules.data.datamodule import DataConfig, SegDataModule
    from fedseg.lightning_modules.data.transforms import PreprocessConfig
    from fedseg.lightning_modules.module import SegmentationModule
    from fedseg.lightning_modules.training import make_trainer, refuse_unchecked_data

    if args.threads:
        torch.set_num_threads(args.threads)
    flare.init()
    site = flare.get_site_name()
    if args.seed is not None:  # before the model and data: a FedPer head's initial weights too
        import pytorch_lightning as pl

        pl.seed_everything(site_seed(args.seed, site), workers=True, verbose=False)
    # NVFlare runs the job's custom/site_entry.py with it as sys.argv[0]: the search for the site's
    # local/ folder starts there (and at the working directory, the site's kit root).
    config = load_site_config(site, script_file=sys.argv[0] if sys.argv and sys.argv[0] else None)
    datalist = read_datalist(config.datalist, config.data_root)
    refuse_unchecked_data(datalist, config.datalist)

    preprocess = PreprocessConfig(
        modalities=tuple(args.modalities), roi_size=tuple(args.roi), normalization=args.normalization
    )
    datamodule = SegDataModule(
        datalist,
        DataConfig(preprocess=preprocess, batch_size=args.batch_size, num_workers=args.num_workers, cache_dir=config.cache_dir),
    )
    model = SegmentationModule(
        network=args.network,
        in_channels=len(args.modalities),
        features=args.features,
        network_kwargs={"norm": args.norm},
        lr=args.lr,
        max_epochs=args.rounds * args.local_epochs,
        roi_size=tuple(args.roi),
        hd95=not args.no_hd95,
        preprocess=dataclasses.asdict(preprocess),
    )
    n_train = datamodule.n_train_cases
    # FedAvg weighs an update by meta NUM_STEPS_CURRENT_ROUND; the Lightning callback fills it with
    # the step count only when the module's __fl_meta__ lacks it. Weight by training cases instead.
    model.__fl_meta__ = {"NUM_STEPS_CURRENT_ROUND": n_train, "n_train_cases": n_train}
    group = site_group(config.extra, config.source)
    if group:  # grouped models: the server averages this site with the sites of its own group only
        model.__fl_meta__[GROUP_KEY] = group
        progress(f"[fedseg] {site}: site group {group}")

    callbacks, head_store, personal = [], None, []
    if args.contribution:  # before the Lightning patch's callback, which sends the update
        from fedseg.app.contribution import UpdateValidationLoss

        callbacks.append(UpdateValidationLoss())
    drill = FaultDrill.from_site_config(config.extra, config.source)
    if drill is not None:
        callbacks.append(drill)
        progress(f"[fedseg] {site}: fault drill on: training fails in round(s) {sorted(drill.raise_in_rounds)}, "
                 f"hangs in round(s) {sorted(drill.hang_in_rounds)}")
    if args.fedper:
        # The head stays here: only shared keys are sent, the received encoder is loaded
        # non-strictly (the head is kept), and the head lives in a site-local store.
        personal = personal_keys(model, args.keep_norm_local)
        shared = [k for k in model.state_dict() if k not in set(personal)]
        callbacks.append(SharedKeysFLCallback(shared, load_state_dict_strict=False))
        head_store = FedPerHeadStore(config.head_store or default_head_store(site), args.study)
        record = head_store.load_into(model, personal)
        progress(
            f"[fedseg] {site}: FedPer head "
            + (f"reused from {head_store.path} (encoder round {record.encoder_round})" if record else "new (site new to the study)")
        )
    trainer = make_trainer(
        Path.cwd() / "lightning",
        args.local_epochs,
        callbacks=callbacks,
        logger=flare.logger(),  # every self.log() streams to the server as a scalar
        progress=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    flare.patch(trainer, load_state_dict_strict=not args.fedper)
    progress(f"[fedseg] {site}: {n_train} training / {len(datalist.validation)} validation cases")

    schedule_note_done = False
    while flare.is_running():
        input_model = flare.receive()
        if input_model is None:
            break
        if flapi.is_submit_model():  # cross-site evaluation asks for this site's model
            state = model.cpu().state_dict()
            flapi.send(FLModel(params={k: v for k, v in state.items() if k not in set(personal)}))
            continue
        started = time.time()
        round_no = (input_model.current_round or 0) + 1  # None for cross-site evaluation tasks
        round_name = f"round {round_no}/{input_model.total_rounds}"
        if drill is not None:
            drill.current_round = round_no
        if flapi.is_train():
            progress(f"[fedseg] {round_name} {site}: started (validating the global model, then training)")
            # which global model this round trained on, for the server's round report
            model.__fl_meta__ = {**model.__fl_meta__, RECEIVED_KEY: model_fingerprint(input_model.params or {})}
        try:
            global_metrics = trainer.validate(model, datamodule=datamodule, verbose=False)
            val_dice = global_metrics[0].get("val_dice", float("nan")) if global_metrics else float("nan")
            if flapi.is_evaluate():  # cross-site evaluation: the callback has sent the metrics
                progress(f"[fedseg] {site}: cross-site validation val_dice={val_dice:.4f}")
                continue
            # Where the cosine schedule (rounds x local epochs) stands at this round. From the second
            # fit on, NVFlare's RestoreState callback restores the scheduler and this is overridden;
            # it matters for the first round a site trains in this job, e.g. of a resumed study.
            model.schedule_offset = (input_model.current_round or 0) * args.local_epochs
            if model.schedule_offset and not schedule_note_done:
                progress(f"[fedseg] {round_name} {site}: learning-rate schedule continues at epoch "
                         f"{model.schedule_offset} of {args.rounds * args.local_epochs}")
                schedule_note_done = True
            trainer.fit(model, datamodule=datamodule)
        except Exception as err:  # noqa: BLE001 - any crash of this round is this site's failure for the round
            # The traceback stays in the site's log; the server learns only the error class (a message
            # may hold file paths or case ids), and the site takes the next round's task as usual.
            traceback.print_exc()
            report_round_failure(trainer, err, evaluate=flapi.is_evaluate())
            if head_store is not None:
                head_store.load_into(model, personal)  # drop the half-trained head of the failed round
            progress(f"[fedseg] {round_name} {site}: FAILED ({type(err).__name__}, traceback in the site log); "
                     "reported to the server, the site stays in the study")
            continue
        if head_store is not None:
            head_store.save(model, personal, encoder_round=input_model.current_round, job_id=flare.get_job_id())
        loss = trainer.callback_metrics.get("train_loss")
        progress(
            f"[fedseg] {round_name} {site}: "
            f"global val_dice={val_dice:.4f} train_loss={float(loss) if loss is not None else float('nan'):.4f} "
            f"cases={n_train} {time.time() - started:.1f}s"
        )


def site_seed(seed: int, site: str) -> int:
    """The seed of one site: the job's seed plus an offset fixed by the site's name, so that sites do
    not draw the same crops in lockstep, and a site draws the same ones in every run of the job."""
    return seed + zlib.crc32(site.encode()) % 1_000_003


def site_group(extra: dict[str, Any], source: object) -> str:
    """The ``group`` a site declares in its config ('' if none); ``ValueError`` naming the file if malformed."""
    import re

    group = extra.get("group", "")
    if group and (not isinstance(group, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", group)):
        raise ValueError(f"{source}: 'group' must be a short name of letters, digits, '.', '_' or '-', got {group!r}")
    return group


def report_round_failure(trainer: Any, err: BaseException, evaluate: bool) -> None:
    """Answer the current task with "this site failed this round" and make the site ready for the next.

    The answer carries no weights and only the error's class name under ``SITE_FAILURE_KEY``;
    ``fedseg.app.resilient_fedavg.ResilientFedAvg`` leaves the site out of the round and names it.
    """
    import nvflare.client as flapi
    from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
    from nvflare.app_opt.lightning.api import FLCallback

    from fedseg.app.resilient_fedavg import SITE_FAILURE_KEY

    meta = {SITE_FAILURE_KEY: type(err).__name__, "NUM_STEPS_CURRENT_ROUND": 0}
    if evaluate:
        answer = FLModel(metrics={}, meta=meta)
    else:
        # DIFF: NVFlare would try to diff an empty FULL answer against the received model when the
        # job sends weight diffs (privacy filters) and fail there (nvflare/client/in_process/api.py)
        answer = FLModel(params={}, params_type=ParamsType.DIFF, meta=meta)
    flapi.send(answer)
    # The Lightning patch's callback still holds the failed round (received model, round start);
    # reset it as its own on_train_end does after a send, so the next round starts clean.
    for callback in trainer.callbacks:
        if isinstance(callback, FLCallback):
            callback.reset_state(trainer)


if __name__ == "__main__":
    main()
