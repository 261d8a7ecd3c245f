"""The site side of every fedseg job: ``SiteRunner`` and the plug-ins an algorithm adds to it.

NVFlare runs the job's ``site_entry.py`` at every hospital with one argument, ``--job-config
<JSON>`` (``fedseg.jobs.base.Job.site_document``): the study settings, the algorithm and its
options. The runner is a plain Lightning loop: the same ``SegmentationModule`` and data module as
``fedseg train``, with the Trainer patched by NVFlare's Lightning client API. Per task:

- ``train``: validate the received global model on the site's validation cases (these metrics
  drive the server's best-model selection), train ``local_epochs`` epochs and send the update,
  weighted by the site's number of training cases; one progress line;
- ``validate`` (cross-site evaluation): score the received model, send the metrics;
- ``submit_model`` (cross-site evaluation): send this site's model (its shareable part).

Every model a task brings is checked before use (``check_received``: not empty, exactly the
job's keys, floating tensors where the site's parameters are floating, their sizes); a refusal
fails that task like a crash.

A crash inside a task (an exception, an out-of-memory, a bad case, a ``fault_drill`` of the site
config, a refused received model, a failure to send the model for cross-site evaluation) is answered as this site's failure for that round (no weights, the error's class only,
``fedseg.app.protocol``) and the site takes the next task as usual. A site that cannot start
(its config, its datalist, data that fails the check) answers every task the same way, so the
server names it ("hospital-b refused its data (DatasetCheckError)") instead of failing the job;
the full message and traceback stay in the site's own log.

What an algorithm adds at the site is a ``SitePlugin`` (``fedseg.app.site_plugin``): the one its
declaration names (``fedseg.jobs.base.Algorithm.site_plugin``; the personalized methods' are in
``fedseg.app.personalization``), ``ContributionPlugin`` and ``FaultDrillPlugin``; ``plugins_for``
picks them. A personalized job ends with the ``personalize`` task: the site makes its personal
model from the final global model and answers with its scores on the site's own validation cases. The site's data is
found through site-local configuration (``fedseg.app.site_config``), never through the job.
Only weights and scalar metrics leave the site.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedseg.app.protocol import PERSONALIZE_TASK
from fedseg.app.site_plugin import SitePlugin, progress
from fedseg.config import StudyConfig


@dataclass(frozen=True)
class SiteJob:
    """What the job tells every site (``--job-config``)."""

    algorithm: str
    options: dict[str, Any]
    study: StudyConfig
    study_name: str
    contribution: bool = False

    @classmethod
    def from_document(cls, doc: dict[str, Any]) -> SiteJob:
        return cls(algorithm=doc["algorithm"], options=dict(doc.get("options") or {}),
                   study=StudyConfig.from_json(doc["study"]), study_name=doc["study_name"],
                   contribution=bool(doc.get("contribution")))

    @classmethod
    def from_argv(cls, argv: Sequence[str] | None = None) -> SiteJob:
        parser = argparse.ArgumentParser(description="fedseg site script (run by NVFlare)")
        parser.add_argument("--job-config", required=True, help="the job's site document (JSON)")
        args = parser.parse_args(argv)
        return cls.from_document(json.loads(args.job_config))


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


# ------------------------------------------------------------------------------ plug-ins


class ContributionPlugin(SitePlugin):
    """Contribution-weighted aggregation: the update carries its own validation loss too."""

    def callbacks(self) -> list[Any]:
        from fedseg.app.contribution import UpdateValidationLoss

        return [UpdateValidationLoss()]


class FaultDrillPlugin(SitePlugin):
    """The site config's ``fault_drill``: training fails or hangs in chosen rounds, on purpose."""

    def __init__(self, drill: Any) -> None:
        self.drill = drill

    def setup(self, runner: SiteRunner) -> None:
        progress(f"[fedseg] {runner.site}: fault drill on: training fails in round(s) {sorted(self.drill.raise_in_rounds)}, "
                 f"hangs in round(s) {sorted(self.drill.hang_in_rounds)}")

    def callbacks(self) -> list[Any]:
        return [self.drill]

    def before_fit(self, runner: SiteRunner, round_no: int) -> None:
        self.drill.current_round = round_no


def plugins_for(job: SiteJob, config: Any) -> list[SitePlugin]:
    """The plug-ins of this job and site: the algorithm's, contribution, the site's fault drill."""
    from fedseg.app.fault_drill import FaultDrill

    plugins: list[SitePlugin] = []
    if job.contribution:  # before the Lightning patch's callback, which sends the update
        plugins.append(ContributionPlugin())
    drill = FaultDrill.from_site_config(config.extra, config.source)
    if drill is not None:
        plugins.append(FaultDrillPlugin(drill))
    # the algorithm's own, as its declaration names it (fedseg.jobs.<name>: Algorithm.site_plugin)
    from fedseg.jobs.base import algorithm

    own = algorithm(job.algorithm).make_site_plugin(job.options)
    if own is not None:
        plugins.append(own)
    return plugins


# ------------------------------------------------------------------------------ the runner


class SiteRunner:
    """One site's part of one job: set up once, then answer the server's tasks until the job ends."""

    def __init__(self, job: SiteJob, site: str, job_id: str | None = None, ranks: Any = None) -> None:
        self.job = job
        self.site = site
        self.job_id = job_id
        self.config: Any = None
        self.datalist: Any = None
        self.datamodule: Any = None
        self.model: Any = None
        self.trainer: Any = None
        self.plugins: list[SitePlugin] = []
        self._schedule_noted = False
        # several devices (fedseg.app.multi_device): a follower's rank, rank 0's followers, the data the
        # patched Trainer uses (this rank's shard), the group of rank 0 alone
        self.ranks: Any = ranks
        self.site_ranks: Any = None
        self.trainer_data: Any = None
        self.solo_group: Any = None

    # -------------------------------------------------------------- setup

    def setup(self) -> None:
        """Seed, site config, checked data, model, plug-ins and the patched Trainer."""
        import nvflare.client.lightning as flare
        import pytorch_lightning as pl
        import torch

        from fedseg.app.protocol import GROUP_KEY, update_meta
        from fedseg.app.site_config import load_site_config
        from fedseg.lightning_modules.data.datalist import read_datalist
        from fedseg.lightning_modules.module import SegmentationModule
        from fedseg.lightning_modules.training import build_datamodule, make_trainer, refuse_unchecked_data

        study = self.job.study
        if study.federation.site_threads:
            torch.set_num_threads(study.federation.site_threads)
        # before the model and data: a personal head's initial weights and the site's crops
        pl.seed_everything(site_seed(study.seed, self.site), workers=True, verbose=False)
        # NVFlare runs the job's custom/site_entry.py with it as sys.argv[0]: the search for the site's
        # local/ folder starts there (and at the working directory, the site's kit root).
        self.config = load_site_config(self.site, script_file=sys.argv[0] if sys.argv and sys.argv[0] else None)
        self.datalist = read_datalist(self.config.datalist, self.config.data_root)
        refuse_unchecked_data(self.datalist, self.config.datalist, study.data.modalities)
        plugins = plugins_for(self.job, self.config)
        for plugin in plugins:  # e.g. cases a site holds out from training (per-site model selection)
            self.datalist = plugin.datalist(self, self.datalist)
        self.datamodule = build_datamodule(study, self.datalist, self.config.cache_dir)
        # the constructor the server builds the global model with (fedseg.jobs.base)
        self.model = SegmentationModule(**study.module_args())
        n_train = self.datamodule.n_train_cases
        # FedAvg weighs an update by meta NUM_STEPS_CURRENT_ROUND; the Lightning callback fills it with
        # the step count only when the module's __fl_meta__ lacks it. Weight by training cases instead.
        self.model.__fl_meta__ = update_meta(n_train)
        group = site_group(self.config.extra, self.config.source)
        if group:  # grouped models: the server averages this site with the sites of its own group only
            self.model.__fl_meta__[GROUP_KEY] = group
            progress(f"[fedseg] {self.site}: site group {group}")
        env = self.ranks
        if env is None:  # the NVFlare process, rank 0: its site config says how many devices it trains on
            from fedseg.app.multi_device import SiteRanks, check_devices, site_devices

            devices = site_devices(self.config.extra, self.config.source)
            check_devices(devices, n_train, len(self.datalist.validation), self.config.source)
            if devices > 1:
                self.site_ranks = SiteRanks(self, devices)
                env = self.site_ranks.start()
                self.solo_group = self.site_ranks.solo
                progress(f"[fedseg] {self.site}: training on {devices} devices (DDP; rank 0 here, ranks 1 to {devices - 1} "
                         "log to rank-<r>.log in the job's folder)")
        self.trainer_data = self.datamodule
        if env is not None:
            from fedseg.app.multi_device import ShardedData

            self.trainer_data = ShardedData(self.datamodule, env.rank, env.world, site_seed(study.seed, self.site))
        # a fault drill fails rank 0 alone: the other ranks are then left in the round (multi_device restarts them)
        self.plugins = [p for p in plugins if env is None or env.rank == 0 or not isinstance(p, FaultDrillPlugin)]
        for plugin in self.plugins:
            plugin.setup(self)
        strict = all(p.strict_load for p in self.plugins)
        self.trainer = make_trainer(
            Path.cwd() / "lightning",
            study.federation.local_epochs,
            callbacks=[c for p in self.plugins for c in p.callbacks()],
            # every self.log() streams to the server as a scalar (from rank 0 only)
            logger=flare.logger() if env is None or env.rank == 0 else False,
            progress=False,
            enable_checkpointing=False,
            num_sanity_val_steps=0,
            ranks=env,
            **({"use_distributed_sampler": False} if env is not None else {}),
        )
        flare.patch(self.trainer, load_state_dict_strict=strict)
        if env is not None:
            from nvflare.app_opt.lightning.api import FLCallback

            for callback in self.trainer.callbacks:  # a plug-in's callback is made for rank 0
                if isinstance(callback, FLCallback):
                    callback.rank = self.trainer.global_rank
        if self.site_ranks is not None:
            self.site_ranks.wait_ready()
        progress(f"[fedseg] {self.site}: {n_train} training / {len(self.datalist.validation)} validation cases")

    # -------------------------------------------------------------- the task loop

    def run(self) -> None:
        """Answer the server's tasks until the job ends."""
        try:
            self._answer_tasks()
        finally:
            if self.site_ranks is not None:
                self.site_ranks.close()

    def _answer_tasks(self) -> None:
        import nvflare.client as flapi
        import nvflare.client.lightning as flare

        ranks = self.site_ranks
        while flare.is_running():
            input_model = flare.receive()
            if input_model is None:
                break
            if flapi.is_submit_model():  # cross-site evaluation asks for this site's model
                try:
                    self.submit_model()
                except Exception as err:  # noqa: BLE001 - a failed answer, not the end of the site's part
                    self.fail(err, input_model, evaluate=False, task="submit_model")
                continue
            try:
                self.check_received(input_model, flapi.get_task_name())
                for plugin in self.plugins:
                    plugin.check_received(self, input_model)
                if flapi.get_task_name() == PERSONALIZE_TASK:
                    self.personalize(input_model)
                elif flapi.is_train():
                    if ranks is not None:
                        ranks.command("train", input_model)
                    self.train_round(input_model)
                else:
                    if ranks is not None:
                        ranks.command("validate", input_model)
                    self.evaluate()
                if ranks is not None:
                    ranks.done()
            except Exception as err:  # noqa: BLE001 - any crash of this task is this site's failure for the round
                self.fail(err, input_model, evaluate=flapi.is_evaluate())
                if ranks is not None and ranks.busy:  # no rank may stay behind in the failed task
                    ranks.restart()

    def expected_params(self) -> dict[str, Any]:
        """What a received model must hold: this site's model's keys that the job shares (every key,
        or a personalized job's shared keys), with the site's own tensors for their dtypes and sizes."""
        state = self.model.state_dict()
        for plugin in self.plugins:
            state = plugin.shareable(state)
        return state

    def check_received(self, input_model: Any, task: str) -> None:
        """``ReceivedModelError`` unless the task's model fits the job (``protocol.check_received_params``):
        a refused model fails the task like any crash, before it touches this site's model."""
        from fedseg.app.protocol import check_received_params

        check_received_params(input_model.params, self.expected_params(), what=f"the model of the {task} task")

    def submit_model(self) -> None:
        import nvflare.client as flapi
        from nvflare.app_common.abstract.fl_model import FLModel

        state = self.model.cpu().state_dict()
        for plugin in self.plugins:
            state = plugin.shareable(state)
        flapi.send(FLModel(params=state))

    def personalize(self, input_model: Any) -> None:
        """The job's last task: score this site's personal model; only the scores leave the site."""
        import nvflare.client as flapi
        from nvflare.app_common.abstract.fl_model import FLModel

        from fedseg.lightning_modules.training import make_trainer

        # one line whatever the algorithm: the progress display (fedseg.run.progress) reads it
        progress(f"[fedseg] {self.site}: personal model: made from the final global model")
        model = next((m for p in self.plugins if (m := p.personal_model(self, input_model)) is not None), None)
        if model is None:  # not a personalized method: the final global model is the site's model
            self.model.load_state_dict(dict(input_model.params), strict=True)
            model = self.model
        from fedseg.app.multi_device import rank_zero_metrics

        trainer = make_trainer(Path.cwd() / "personal", 1, logger=False, progress=False, enable_checkpointing=False)
        with rank_zero_metrics(model, self.solo_group):  # rank 0 alone (several devices)
            (metrics,) = trainer.validate(model, datamodule=self.datamodule, verbose=False)
        scores = {k: float(v) for k, v in metrics.items()}
        for plugin in self.plugins:
            scores.update(plugin.personal_metrics())
        if self.config.test_datalist is not None:
            scores.update(self.score_test_set(model))
        flapi.send(FLModel(metrics=scores))  # scalars only, like a cross-site validation answer
        progress(f"[fedseg] {self.site}: personal model val_dice={scores.get('val_dice', float('nan')):.4f}")

    def score_test_set(self, model: Any) -> dict[str, float]:
        """The personal model on this site's held-out test cases (site config ``test_datalist``), as
        the scalars ``protocol.test_set_metrics`` names; the data root is the site's own."""
        from fedseg.app.protocol import test_set_metrics
        from fedseg.lightning_modules.test_sets import score_test_set

        result = score_test_set(model, self.config.test_datalist, data_root=self.config.data_root, metrics=("dice", "iou"))
        progress(f"[fedseg] {self.site}: personal model on {result.n_cases} test cases: "
                 f"dice {result.mean['overall']['dice']:.4f} ± {result.sem['overall']['dice']:.4f}")
        return test_set_metrics(result.mean, result.sem, result.n_cases)

    def evaluate(self) -> None:
        """Cross-site evaluation: score the received model (NVFlare's callback sends the metrics).

        The trainer's streaming logger is off meanwhile: these scores belong to other models and
        come back as the task's answer, not as this site's per-round metrics (W&B, site_metrics).
        """
        loggers, self.trainer.loggers = self.trainer.loggers, []
        try:
            metrics = self.trainer.validate(self.model, datamodule=self.trainer_data, verbose=False)
        finally:
            self.trainer.loggers = loggers
        val_dice = metrics[0].get("val_dice", float("nan")) if metrics else float("nan")
        progress(f"[fedseg] {self.site}: cross-site validation val_dice={val_dice:.4f}")

    def train_round(self, input_model: Any) -> None:
        """Validate the received global model, train ``local_epochs`` epochs, send the update."""
        from fedseg.app.protocol import RECEIVED_KEY, model_fingerprint

        started = time.time()
        round_no = (input_model.current_round or 0) + 1
        name = f"round {round_no}/{input_model.total_rounds}"
        progress(f"[fedseg] {name} {self.site}: started (validating the global model, then training)")
        # which global model this round trained on, for the server's round report
        self.model.__fl_meta__ = {**self.model.__fl_meta__, RECEIVED_KEY: model_fingerprint(input_model.params or {})}
        metrics = self.trainer.validate(self.model, datamodule=self.trainer_data, verbose=False)
        val_dice = metrics[0].get("val_dice", float("nan")) if metrics else float("nan")
        self._continue_schedule(input_model, name)
        for plugin in self.plugins:
            plugin.before_fit(self, round_no)
        steps = self.trainer.global_step
        self.trainer.fit(self.model, datamodule=self.trainer_data)
        if self.site_ranks is not None:  # what rank 0 sent is the DDP model every rank holds (multi_device.follow)
            progress(f"[fedseg] {name} {self.site}: rank 0 trained {self.trainer.global_step - steps} steps on its "
                     f"shard; model {model_fingerprint(self.model.state_dict())}")
        for plugin in self.plugins:
            plugin.after_round(self, input_model)
        loss = self.trainer.callback_metrics.get("train_loss")
        progress(f"[fedseg] {name} {self.site}: global val_dice={val_dice:.4f} "
                 f"train_loss={float(loss) if loss is not None else float('nan'):.4f} "
                 f"cases={self.datamodule.n_train_cases} {time.time() - started:.2f}s")

    def _continue_schedule(self, input_model: Any, name: str) -> None:
        """Where the cosine schedule (rounds x local epochs) stands at this round.

        From the second fit on, NVFlare's RestoreState callback restores the scheduler and this is
        overridden; it matters for the first round a site trains in this job, e.g. of a resumed study.
        """
        fed = self.job.study.federation
        self.model.schedule_offset = (input_model.current_round or 0) * fed.local_epochs
        if self.model.schedule_offset and not self._schedule_noted:
            progress(f"[fedseg] {name} {self.site}: learning-rate schedule continues at epoch "
                     f"{self.model.schedule_offset} of {self.job.study.epochs}")
            self._schedule_noted = True

    def fail(self, err: BaseException, input_model: Any, *, evaluate: bool, task: str = "") -> None:
        """Report the task as this site's failure and make the site ready for the next one.

        The traceback stays in the site's log; the server learns only the error class (a message may
        hold file paths or case ids), and the site takes the next task as usual. A failed
        ``submit_model`` (cross-site evaluation) left no round half-done: nothing is reset then.
        """
        import nvflare.client as flapi
        from nvflare.app_opt.lightning.api import FLCallback

        from fedseg.app.protocol import failure_answer

        traceback.print_exc(file=sys.stdout)  # the site's own log (print goes there), never an ERROR record
        flapi.send(failure_answer(err, evaluate=evaluate))
        from fedseg.app.protocol import ReceivedModelError

        # what the server sent is no patient data: the reason goes on the site's line itself
        why = f"{type(err).__name__}: {err}" if isinstance(err, ReceivedModelError) else type(err).__name__
        if task == "submit_model":
            progress(f"[fedseg] cross-site evaluation {self.site}: sending this site's model FAILED ({why}, "
                     "traceback in the site log); reported to the server, the site takes the next task")
            return
        # The Lightning patch's callback still holds the failed round (received model, round start);
        # reset it as its own on_train_end does after a send, so the next round starts clean.
        for callback in self.trainer.callbacks:
            if isinstance(callback, FLCallback):
                callback.reset_state(self.trainer)
        for plugin in self.plugins:
            plugin.after_failure(self)
        round_no = (input_model.current_round or 0) + 1
        progress(f"[fedseg] round {round_no}/{input_model.total_rounds} {self.site}: FAILED ({why}, "
                 "traceback in the site log); reported to the server, the site stays in the study")


def answer_refused(site: str, err: BaseException) -> None:
    """A site that could not start answers every task with its failure until the job ends.

    The server names the site and the error class ("refused its data (DatasetCheckError)"); the
    full message and traceback are printed to the site's own log only.
    """
    import nvflare.client as flapi
    import nvflare.client.lightning as flare

    from fedseg.app.protocol import failure_answer

    traceback.print_exc(file=sys.stdout)
    progress(f"[fedseg] {site}: could not start ({type(err).__name__}: see above in this log); "
             "every task of this job is answered as failed")
    while flare.is_running():
        if flare.receive() is None:
            break
        flapi.send(failure_answer(err, evaluate=flapi.is_evaluate(), stage="startup"))


def main(argv: Sequence[str] | None = None) -> None:
    """The site script: read the job's site document, set up, answer tasks."""
    import nvflare.client.lightning as flare

    job = SiteJob.from_argv(argv)
    flare.init()
    runner = SiteRunner(job, flare.get_site_name(), job_id=flare.get_job_id())
    try:
        runner.setup()
    except Exception as err:  # noqa: BLE001 - any start-up failure is answered, not raised to NVFlare's log
        if runner.site_ranks is not None:  # followers started for several devices end with the site
            from fedseg.app.multi_device import close_group

            runner.site_ranks.kill()
            close_group()
        answer_refused(runner.site, err)
        return
    runner.run()
