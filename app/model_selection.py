"""Per-site model selection's site side: the inner split, the local-only candidate and the choice.

The algorithm is declared in ``fedseg.jobs.selection``. A site running it:

1. holds out its inner split before anything trains (``inner_split``: ``select_fraction`` of its
   training cases, at least one, picked by the cases' ids) and keeps it for the whole study: the
   held-out ids are written to its store folder (``<study>.select-split.json``) at its first job and
   reused by every restart and later job, so no case its stored models trained on becomes a case
   it chooses on (a stored split whose cases left the datalist is an error naming the file);
2. each round trains the global model (FedAvg's update, sent), then Ditto's personal model
   (``DittoPlugin``, which this plug-in extends), then its local-only model (never sent);
3. in the ``personalize`` task scores the final global model, the personal and the local model on
   the inner split and keeps the best (ties go to the earlier of ``SELECT_CANDIDATES``: the
   global model, then the personal one). The choice and its scores are written to the site's store
   folder (``<study>.select.json``, owner-only) and the chosen model to ``<study>.select-chosen.pt``;
   the choice's index is the only thing about it that leaves the site (``select_choice``).
"""

from __future__ import annotations

import json
import zlib
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedseg.app.personalization import DittoPlugin, _local_trainer, _store
from fedseg.app.protocol import SELECT_CANDIDATES, SELECT_CHOICE_KEY
from fedseg.app.site_plugin import progress

if TYPE_CHECKING:
    from fedseg.app.site_runner import SiteRunner
    from fedseg.jobs.selection import SelectOptions
    from fedseg.lightning_modules.data.datalist import Case, Datalist


def inner_split(training: list[Case], fraction: float) -> tuple[list[Case], list[Case]]:
    """``(kept for training, held out to choose on)``: ``round(n * fraction)`` cases, at least one,
    and at least one left to train on; chosen by a hash of the case ids (no seed, so every run and
    every restart of a site holds out the same cases). Both keep the datalist's order."""
    if len(training) < 2:
        raise ValueError(f"per-site model selection needs at least 2 training cases (one to choose on), got {len(training)}")
    n = min(len(training) - 1, max(1, round(len(training) * fraction)))
    held = set(sorted(range(len(training)), key=lambda i: zlib.crc32(training[i].case_id.encode()))[:n])
    return [c for i, c in enumerate(training) if i not in held], [c for i, c in enumerate(training) if i in held]


class SelectionPlugin(DittoPlugin):
    """Ditto's personal model, a local-only model, and the choice among them and the global model."""

    store_kind = "select-personal"

    def __init__(self, options: SelectOptions) -> None:
        from nvflare.app_opt.lightning.callbacks import RestoreState

        super().__init__(options)
        self.select_fraction = options.select_fraction
        self.select_on = options.select_on
        self.inner: list[Case] = []
        self.local: Any = None
        self.local_store: Any = None
        self.local_started = False
        self.local_optimizer_state = RestoreState()  # the local model's AdamW and schedule go on across rounds
        self.choice = ""

    def datalist(self, runner: SiteRunner, datalist: Datalist) -> Datalist:
        from fedseg.lightning_modules.data.datalist import write_json_atomic
        from fedseg.lightning_modules.owner_only import owner_only_dir

        if self.select_on == "validation":  # no candidate trains on them either; nothing is held out
            self.inner = list(datalist.validation)
            progress(f"[fedseg] {runner.site}: chooses its model on its {len(self.inner)} validation cases")
            return datalist

        split_file = _store(runner).folder / f"{runner.job.study_name}.select-split.json"
        if split_file.is_file():  # the study's split: its stored models never trained on these cases
            held = set(json.loads(split_file.read_text())["held_out"])
            missing = sorted(held - {c.case_id for c in datalist.training})
            if missing:
                raise ValueError(f"{split_file}: {len(missing)} case(s) held out earlier in this study are no longer among "
                                 "the datalist's training cases; the stored models trained on the others. Move the "
                                 "file and the study's select-* stores away to start a new split")
            kept = [c for c in datalist.training if c.case_id not in held]
            self.inner = [c for c in datalist.training if c.case_id in held]
        else:
            kept, self.inner = inner_split(datalist.training, self.select_fraction)
            owner_only_dir(split_file.parent)
            write_json_atomic(split_file, {"held_out": [c.case_id for c in self.inner], "fraction": self.select_fraction})
        progress(f"[fedseg] {runner.site}: {len(self.inner)} of its {len(datalist.training)} training cases held out "
                 "to choose its model on (no candidate trains on them)")
        return replace(datalist, training=kept)

    def setup(self, runner: SiteRunner) -> None:
        from fedseg.lightning_modules.module import SegmentationModule

        super().setup(runner)
        study = runner.job.study
        epochs = study.federation.local_epochs
        self.local = SegmentationModule(**{**study.module_args(), "max_epochs": study.federation.rounds * epochs})
        self.local_store = _store(runner, kind="select-local")
        self.local_started = self.local_store.load_into(self.local, list(self.local.state_dict())) is not None
        progress(f"[fedseg] {runner.site}: local-only model " + (
            f"reused from {self.local_store.path}" if self.local_started
            else "new: starts from the first global model it receives"))

    def after_round(self, runner: SiteRunner, input_model: Any) -> None:
        """Ditto's personal epochs, then the local model's ``local_epochs`` on the site's own cases."""
        super().after_round(runner, input_model)
        if not self.local_started:
            self.local.load_state_dict({k: v.detach().clone() for k, v in (input_model.params or {}).items()}, strict=True)
            self.local_started = True
        epochs = runner.job.study.federation.local_epochs
        round_no = input_model.current_round or 0
        self.local.schedule_offset = round_no * epochs
        _local_trainer(runner, "select-local", epochs, [self.local_optimizer_state]).fit(
            self.local, datamodule=runner.datamodule.stream("select-local"))
        self.local_store.save(self.local, list(self.local.state_dict()), global_round=round_no, job_id=runner.job_id)

    def after_failure(self, runner: SiteRunner) -> None:
        """A failed round: back to the stored personal and local models; with none stored yet, both start
        again from the next global model the site receives."""
        self.started = self.store.exists()
        if self.started:
            self.store.load_into(self.model, self.keys)
        self.local_started = self.local_store.exists()
        if self.local_started:
            self.local_store.load_into(self.local, list(self.local.state_dict()))

    def personal_model(self, runner: SiteRunner, input_model: Any) -> Any:
        """The best of the final global model, the personal and the local model on the inner split."""
        from fedseg.app.multi_device import rank_zero_metrics
        from fedseg.lightning_modules.data.datalist import write_json_atomic
        from fedseg.lightning_modules.module import SegmentationModule
        from fedseg.lightning_modules.training import build_datamodule, make_trainer

        final = dict(input_model.params)
        global_model = SegmentationModule(**runner.job.study.module_args())
        global_model.load_state_dict(final, strict=True)
        personal = super().personal_model(runner, input_model)
        if not self.local_started:  # a site that joined at the very end: its local model is the global one
            self.local.load_state_dict(final, strict=True)
        candidates = dict(zip(SELECT_CANDIDATES, (global_model, personal, self.local)))
        inner = replace(runner.datalist, training=list(self.inner), validation=list(self.inner))
        data = build_datamodule(runner.job.study, inner, runner.config.cache_dir)
        trainer = make_trainer(Path.cwd() / "select", 1, logger=False, progress=False, enable_checkpointing=False)
        scores: dict[str, float] = {}
        for name, model in candidates.items():
            with rank_zero_metrics(model, getattr(runner, "solo_group", None)):  # rank 0 alone (several devices)
                (metrics,) = trainer.validate(model, datamodule=data, verbose=False)
            scores[name] = float(metrics["val_dice"])
        self.choice = max(SELECT_CANDIDATES, key=lambda n: (scores[n], -SELECT_CANDIDATES.index(n)))
        chosen = candidates[self.choice]
        store = _store(runner, kind="select-chosen")
        round_no = input_model.current_round or 0
        # the record first, naming the round and job of the model saved after it: a crash between the
        # two leaves a record that does not match the model's own record, never a silent mismatch
        write_json_atomic(store.path.with_name(f"{runner.job.study_name}.select.json"),
                          {"choice": self.choice, "inner_dice": scores, "inner_cases": len(self.inner),
                           "global_round": round_no, "job_id": runner.job_id})
        store.save(chosen, list(chosen.state_dict()), global_round=round_no, job_id=runner.job_id)
        # the site's own log (and console): the scores never leave the site
        where = "validation case(s)" if self.select_on == "validation" else "held-out training case(s)"
        progress(f"[fedseg] {runner.site}: chose its {self.choice} model on {len(self.inner)} {where} "
                 "(" + ", ".join(f"{n} {s:.4f}" for n, s in scores.items()) + f"); kept at {store.path}")
        return chosen

    def personal_metrics(self) -> dict[str, float]:
        return {SELECT_CHOICE_KEY: float(SELECT_CANDIDATES.index(self.choice))} if self.choice else {}


__all__ = ["SelectionPlugin", "inner_split"]
