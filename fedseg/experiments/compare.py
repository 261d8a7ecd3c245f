"""Centralized vs local-only vs federated training on the same sites, at the same compute budget.

Every method trains the same network with the same optimizer settings, and every training case
passes through the network the same number of times, ``rounds x local_epochs``:

- centralized: one run on the union of the sites' training cases for ``R x E`` epochs;
- centralized-steps: the same for ``R x E / K`` epochs (K sites): as many optimizer steps as one
  federated site takes, the fair reference for "does the federated path lose anything";
- local: each site alone, for ``R x E`` epochs (one model per site);
- every algorithm that runs in the simulator (``fedseg.jobs.base.algorithms()``: fedavg, fedprox,
  fedopt, ...) and the variants it declares (``Algorithm.compare_variants``, e.g. fedper-output and
  fedper-last, FedPer with smaller personal heads): ``R`` rounds of ``E`` local epochs in NVFlare's
  simulator; a personalized one (``Algorithm.personal``: fedper, fedrep, ditto, apfl, finetune) ends with
  each site's own personal model (Ditto trains a second model per site and fine-tuning adds
  ``finetune_epochs``: their site compute is larger);
- contribution, fedavg-svt, fedavg-percentile, grouped, grouped-shared: FedAvg with
  contribution-weighted aggregation, with an SVT or percentile privacy filter at the sites, or with
  one model per site group (the group each datalist's ``meta.group`` names, as the synthetic
  generator's ``groups=2`` writes it), without or with the encoder shared across the groups.

Every cosine schedule spans ``R x E`` epochs (the FL sites' ``max_epochs`` is the same product).

Scoring: each method's FINAL model (not its best) on each site's OWN validation cases. A federated
job's final global model is what NVFlare's cross-site evaluation scores (``SRV_FL_global_model.pt``).
A personalized method is scored by each site's PERSONAL model (the final encoder with its own head,
its Ditto model, its fine-tuned model), which the site scores on its own validation cases at the
end of the job (``metrics/personal_scores.json``).
With held-out test sets (each site datalist ``X.json`` with a ``X.test.json`` beside it, as the
synthetic generator writes them; ``lightning_modules.test_sets``), every table, the verdict and the
seed sweep report each method's final (personal) model on each site's TEST cases, with the
standard error over those cases next to each Dice; the validation scores stay in ``scores.json``.
Nobody trains, validates or selects on the test cases: a personalized method's site scores its
personal model on them in the same last task (its site config's ``test_datalist``), the other
models are scored here with ``test_sets.score_test_set``. Real data without test sets is reported
on the validation cases, as before.
Centralized and local runs are scored by ``evaluate_checkpoint`` on their ``last.ckpt`` (local:
site k's model on site k). Picking ``best.ckpt`` instead would select on the very cases it is scored
on, an advantage the federated final model does not get. Both paths compute ``RegionMetrics``
through the ``"val"`` transforms and sliding-window inference; the mean region is the per-case
mean of ET, TC and WT averaged over cases, which is both ``val_dice`` and evaluate's "overall".

Run folder::

    OUT/comparison.json, comparison.csv   method, site, region (ET, TC, WT, mean), dice, iou, hd95;
                                          per method also site "MEAN" and "WORST (<site>)"
    OUT/comparison.png                    mean Dice per site per method (grouped bars)
    OUT/verdict.txt                       who won on which site; each personalized method vs FedAvg
                                          and vs local-only training, per site
    OUT/centralized/                      a ``fedseg train`` run folder, eval/<site>/ its scores
    OUT/local/<site>/                     a ``fedseg train`` run folder per site, eval/ its scores
    OUT/<fl method>/                      a ``fedseg simulate`` run folder
    OUT/<method>/scores.json              the method's per-site scores: present = method done

Resumable: a method whose ``scores.json`` exists (made with the same settings and sites) is not
run again; a different setting is an error rather than a silent mix. An interrupted centralized or
local run resumes from its ``last.ckpt``; an interrupted federated run starts over.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedseg.config import StudyConfig
from fedseg.experiments.methods import (  # noqa: F401 - the methods' names, read from here by callers
    CENTRALIZED_STEPS,
    DEFAULT_METHODS,
    FL_METHOD_JOBS,
    FL_METHODS,
    METHODS,
    PERSONALIZED,
)
from fedseg.lightning_modules.data.datalist import json_safe, read_datalist, write_json_atomic
from fedseg.lightning_modules.labels import REGIONS

#: regions of the tables: the three scoring regions, then their per-case mean (``val_dice``)
TABLE_REGIONS: tuple[str, ...] = (*REGIONS, "mean")
SCORE_METRICS: tuple[str, ...] = ("dice", "iou", "hd95")
SCORES_FILE = "scores.json"
#: the cross-site entry of a federated job's final global model
FINAL_MODEL = "SRV_FL_global_model.pt"

Scores = dict[str, dict[str, dict[str, float]]]  # site -> region -> metric -> value


class ComparisonError(ValueError):
    """Bad methods, sites or settings, or a run folder made with other settings (the message says which)."""


@dataclass(frozen=True)
class CompareSettings:
    """What every method shares: the study settings (network, optimizer, budget ``rounds x
    local_epochs``, seed) and each algorithm's own options (e.g. ``{"fedper": FedPerOptions(...)}``)."""

    study: StudyConfig = field(default_factory=StudyConfig)
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from fedseg.jobs.base import algorithm

        for name, options in self.options.items():
            expected = algorithm(name).options
            if expected is None or not isinstance(options, expected):
                raise ComparisonError(f"options for {name}: expected {expected.__name__ if expected else 'none'}, "
                                      f"got {type(options).__name__}")

    @property
    def epochs(self) -> int:
        """The budget: how often every training case passes through the network, in every method."""
        return self.study.epochs

    def with_seed(self, seed: int) -> CompareSettings:
        return dataclasses.replace(self, study=self.study.override(seed=seed))

    def to_json(self) -> dict[str, Any]:
        """Every training setting by name (the synthetic-data settings are not part of a method's
        training); a federated method's fingerprint adds its own job (``method_job``)."""
        from fedseg.config import FIELD_SECTION

        return {k: v for k, v in self.study.flat().items() if FIELD_SECTION.get(k) != "synth"}

    def method_job(self, method: str) -> dict[str, Any] | None:
        """What a federated method runs beyond the study settings: its algorithm, options and add-ons."""
        if method not in FL_METHOD_JOBS:
            return None
        job = self.job(method, n_sites=2)
        return {"algorithm": job.algorithm, "options": job.options_json(), "addons": job.addons.to_json()}

    def train_config(self, datalists: list[Path], out: Path, data_root: Path | None) -> Any:
        """The ``TrainConfig`` of a centralized (several datalists) or local-only run."""
        from fedseg.lightning_modules.training import TrainConfig

        return TrainConfig(datalists=datalists, out=out, study=self.study, data_root=data_root, progress=False)

    def job(self, method: str, n_sites: int) -> Any:
        """The ``Job`` of a federated method (``FL_METHOD_JOBS``): ``rounds`` rounds of ``local_epochs`` epochs."""
        from fedseg.jobs.addons import Addons
        from fedseg.jobs.base import Job, algorithm

        spec = FL_METHOD_JOBS[method]
        name = spec["algorithm"]
        options = self.options.get(name) or algorithm(name).default_options()
        if spec.get("options"):  # the method's own variant of the algorithm's options
            options = dataclasses.replace(options, **spec["options"])
        return Job(algorithm=name, study=self.study, name=method, min_clients=n_sites, options=options,
                   addons=Addons.from_json(spec.get("addons", {})),
                   cross_site_eval=not algorithm(name).personal)  # those are scored by their personal models


@dataclass
class MethodScores:
    """One method's scores on every site's own validation cases (``OUT/<method>/scores.json``)."""

    method: str
    scores: Scores  # on the sites' test cases where they have test sets, else on their validation cases
    seconds: float
    source: str  # which model was scored, and how
    fingerprint: dict[str, Any] = field(default_factory=dict)
    #: with test sets: the same models on each site's validation cases (``scores`` are the test scores)
    validation: Scores | None = None
    #: with test sets: site -> region -> standard error of the test Dice over that site's test cases
    sem: dict[str, dict[str, float]] = field(default_factory=dict)
    test_cases: dict[str, int] = field(default_factory=dict)
    #: per-site model selection: site -> the model it chose (``protocol.SELECT_CANDIDATES``); the
    #: choice's name is all that leaves a site about it
    choices: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return json_safe(dataclasses.asdict(self))

    @classmethod
    def read(cls, path: Path) -> MethodScores:
        doc = json.loads(path.read_text())

        def table(raw: dict[str, Any]) -> Scores:
            return {s: {r: {m: _nan(v) for m, v in ms.items()} for r, ms in rs.items()} for s, rs in raw.items()}

        return cls(doc["method"], table(doc["scores"]), doc["seconds"], doc["source"], doc.get("fingerprint", {}),
                   table(doc["validation"]) if doc.get("validation") else None,
                   {s: {r: _nan(v) for r, v in rs.items()} for s, rs in (doc.get("sem") or {}).items()},
                   dict(doc.get("test_cases") or {}), dict(doc.get("choices") or {}))


@dataclass
class ComparisonResults:
    """Every method's scores on every site; the tables, plot and verdict are made from these."""

    out: Path
    sites: list[str]
    methods: dict[str, MethodScores]
    settings: CompareSettings
    files: dict[str, Path] = field(default_factory=dict)

    def mean_dice(self, method: str, site: str) -> float:
        """Dice averaged over ET, TC and WT (``val_dice``) of ``method`` on ``site``'s own cases."""
        return self.methods[method].scores[site]["mean"]["dice"]

    @property
    def on_test_sets(self) -> bool:
        """True when every method was scored on the sites' held-out test cases."""
        return bool(self.methods) and all(ms.validation is not None for ms in self.methods.values())

    @property
    def scored_on(self) -> str:
        return "held-out test cases" if self.on_test_sets else "validation cases"

    def dice_sem(self, method: str, site: str, region: str = "mean") -> float:
        """The standard error of ``method``'s test Dice on ``site`` (NaN without test sets)."""
        return self.methods[method].sem.get(site, {}).get(region, math.nan)

    def rows(self) -> list[dict[str, Any]]:
        """``method, site, region, dice, iou, hd95``: per site, then the site mean and the worst site."""
        rows: list[dict[str, Any]] = []
        for method, ms in self.methods.items():
            per_site = [{"method": method, "site": s, "region": r, **ms.scores[s][r],
                         **({"dice_sem": ms.sem.get(s, {}).get(r, math.nan)} if self.on_test_sets else {})}
                        for s in self.sites for r in TABLE_REGIONS]
            rows += per_site
            for region in TABLE_REGIONS:
                of_region = [r for r in per_site if r["region"] == region]
                rows.append({"method": method, "site": "MEAN", "region": region,
                             **{m: _nanmean([r[m] for r in of_region]) for m in SCORE_METRICS}})
            for region in TABLE_REGIONS:
                worst = min((r for r in per_site if r["region"] == region), key=lambda r: _nan_low(r["dice"]))
                rows.append({"method": method, "site": f"WORST ({worst['site']})", "region": region,
                             **{m: worst[m] for m in SCORE_METRICS}})
        return rows

    def winner(self, site: str) -> str:
        """The method with the highest mean Dice on ``site``."""
        return max(self.methods, key=lambda m: _nan_low(self.mean_dice(m, site)))

    def format_table(self) -> str:
        """Mean Dice per method (rows) and site (columns), the site mean and the worst site; then per region."""
        width = max(12, *(len(s) + 2 for s in self.sites))
        head = f"{'method':<14}" + "".join(f"{s:>{width}}" for s in self.sites) + f"{'mean':>9}  worst site"
        test = self.on_test_sets
        if test:  # each cell "Dice ± its standard error over the site's test cases"
            width = max(width, 17)
            head = f"{'method':<14}" + "".join(f"{s:>{width}}" for s in self.sites) + f"{'mean':>9}  worst site"
        cases = ""
        if test:
            counts = next(iter(self.methods.values())).test_cases
            cases = " (" + ", ".join(f"{s} {counts.get(s, '?')}" for s in self.sites) + " cases; ± standard error)"
        lines = [f"mean Dice (ET, TC, WT averaged) of each method's final model on each site's own {self.scored_on}"
                 + cases, head, "-" * len(head)]
        for method in self.methods:
            dice = [self.mean_dice(method, s) for s in self.sites]
            worst = min(range(len(dice)), key=lambda i: _nan_low(dice[i]))
            cells = ([f"{d:.4f} ± {self.dice_sem(method, s):.4f}" for d, s in zip(dice, self.sites)] if test
                     else [f"{d:.4f}" for d in dice])
            lines.append(f"{method:<14}" + "".join(f"{c:>{width}}" for c in cells)
                         + f"{_nanmean(dice):>9.4f}  {dice[worst]:.4f} ({self.sites[worst]})")
        lines += ["", "Dice per region", f"{'method':<14}{'region':<8}" + "".join(f"{s:>{width}}" for s in self.sites)]
        for method, ms in self.methods.items():
            for region in REGIONS:
                lines.append(f"{method:<14}{region:<8}" + "".join(f"{ms.scores[s][region]['dice']:>{width}.4f}" for s in self.sites))
        for method, ms in self.methods.items():
            if ms.choices:
                lines += ["", f"{method}: each site kept its " + ", ".join(f"{s} {ms.choices.get(s, '?')}" for s in self.sites)
                          + " model (chosen on cases it did not train on)"]
        lines += ["", "wall time: " + ", ".join(f"{m} {ms.seconds:.0f} s" for m, ms in self.methods.items())]
        return "\n".join(lines)

    def verdict(self) -> str:
        """In words: the winner on every site, the best method overall, and each personalized method
        against FedAvg and against local-only training, per site."""
        s = self.settings
        lines = [
            f"Budget: every training case seen {s.epochs} times per method "
            f"({s.study.federation.rounds} rounds x {s.study.federation.local_epochs} local epochs); scores: final models, mean Dice over ET/TC/WT "
            f"on each site's own {self.scored_on}.",
        ]
        for site in self.sites:
            ranked = sorted(self.methods, key=lambda m: -_nan_low(self.mean_dice(m, site)))
            best = ranked[0]
            others = ", ".join(f"{m} {self.mean_dice(m, site):.4f} ({self.mean_dice(m, site) - self.mean_dice(best, site):+.4f})"
                               for m in ranked[1:])
            lines.append(f"{site}: {best} wins with {self.mean_dice(best, site):.4f}" + (f"; then {others}." if others else "."))
        means = {m: _nanmean([self.mean_dice(m, st) for st in self.sites]) for m in self.methods}
        worsts = {m: min(_nan_low(self.mean_dice(m, st)) for st in self.sites) for m in self.methods}
        top_mean, top_worst = max(means, key=lambda m: _nan_low(means[m])), max(worsts, key=worsts.get)
        lines.append(f"Across sites: {top_mean} has the best mean ({means[top_mean]:.4f}), "
                     f"{top_worst} the best worst site ({worsts[top_worst]:.4f}).")
        for method in (m for m in self.methods if m in PERSONALIZED):
            for reference in ("fedavg", "local"):
                if reference not in self.methods:
                    continue
                diffs = {st: self.mean_dice(method, st) - self.mean_dice(reference, st) for st in self.sites}
                per_site = "; ".join(f"{st} {d:+.4f}" for st, d in diffs.items())
                lines.append(f"{method} - {reference}: mean {_nanmean(list(diffs.values())):+.4f}, better on "
                             f"{sum(d > 0 for d in diffs.values())} of {len(diffs)} sites ({per_site}).")
            if "fedavg" in self.methods:
                # per region: a site whose raters draw one region differently should gain on that region
                by_region = "; ".join(
                    f"{st} " + " ".join(
                        f"{r} {self.methods[method].scores[st][r]['dice'] - self.methods['fedavg'].scores[st][r]['dice']:+.4f}"
                        for r in REGIONS)
                    for st in self.sites)
                lines.append(f"{method} - fedavg Dice per region: {by_region}.")
        for variant in ("contribution", "fedavg-svt", "fedavg-percentile", "grouped", "grouped-shared"):
            if variant in self.methods and "fedavg" in self.methods:
                diffs = {st: self.mean_dice(variant, st) - self.mean_dice("fedavg", st) for st in self.sites}
                lines.append(f"{variant} - FedAvg mean Dice: {_nanmean(list(diffs.values())):+.4f} ("
                             + ", ".join(f"{st} {d:+.4f}" for st, d in diffs.items()) + ").")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return json_safe({
            "sites": self.sites,
            "settings": self.settings.to_json(),
            "budget_epochs_per_case": self.settings.epochs,
            "scoring": f"final model of every method on each site's own {self.scored_on}",
            "methods": {m: {"source": ms.source, "seconds": ms.seconds} for m, ms in self.methods.items()},
            "rows": self.rows(),
            "winners": {s: self.winner(s) for s in self.sites},
        })

    def write(self) -> dict[str, Path]:
        """``comparison.json|csv|png`` and ``verdict.txt`` in ``out``."""
        from fedseg.lightning_modules.history import write_rows, write_text_atomic

        self.files["json"] = write_json_atomic(self.out / "comparison.json", self.to_json())
        csv_path = self.out / "comparison.csv"
        write_rows(csv_path, self.rows(), first=("method", "site", "region", *SCORE_METRICS,
                                                 *(("dice_sem",) if self.on_test_sets else ())))
        self.files["csv"] = csv_path
        self.files["png"] = plot_comparison(self, self.out / "comparison.png")
        verdict = self.out / "verdict.txt"
        write_text_atomic(verdict, self.verdict() + "\n")
        self.files["verdict"] = verdict
        return self.files


def compare(
    site_datalists: Mapping[str, Path | str],
    out: Path | str,
    settings: CompareSettings | None = None,
    *,
    methods: Sequence[str] = DEFAULT_METHODS,
    data_root: Path | str | None = None,
    test_sets: Mapping[str, Path | str] | None = None,
    progress: Callable[[str], None] = print,
    console: Any = None,
    **overrides: Any,
) -> ComparisonResults:
    """Train and score every method in ``methods`` on the sites ``{name: datalist}`` into ``out``.

    ``test_sets``: each site's held-out test datalist; None: the ``<datalist>.test.json`` beside each
    site's datalist, if every site has one (the synthetic sites'); ``{}``: none (score on validation).
    ``overrides`` replace study settings (``compare(sites, out, rounds=2, features=8)``).
    ``data_root`` overrides every datalist's data root; ``console`` shows each federated run's live
    progress (``fedseg.run.progress``). See the module docstring for the budget, the scoring rule and
    the run folder.
    """
    settings = settings or CompareSettings()
    if overrides:
        settings = dataclasses.replace(settings, study=settings.study.override(**overrides))
    out = Path(out).resolve()
    methods = _check_methods(methods)
    sites = {name: Path(p).resolve() for name, p in site_datalists.items()}
    root = Path(data_root).resolve() if data_root is not None else None
    _check_sites(sites, root)
    tests = _test_sets(sites, test_sets, root)
    if not tests:
        from fedseg.jobs.base import algorithm

        biased = [m for m in methods if m in FL_METHOD_JOBS
                  and algorithm(FL_METHOD_JOBS[m]["algorithm"]).selects_on_validation(settings.job(m, len(sites)).options)]
        if biased:
            raise ComparisonError(f"{', '.join(biased)} choose(s) each site's model on its validation cases, and without "
                                  "held-out test sets the comparison reports on those very cases; give test sets or drop it")
    from fedseg.lightning_modules.owner_only import owner_only_dir

    owner_only_dir(out)  # per-site scores of patient data: like every other fedseg output, owner-only
    fingerprint = {"settings": settings.to_json(), "sites": {k: str(v) for k, v in sites.items()},
                   "data_root": str(root) if root else None, "test_sets": {k: str(v) for k, v in tests.items()}}

    done: dict[str, MethodScores] = {}
    for i, method in enumerate(methods, 1):
        run_dir = out / method
        # a federated method's job options are part of what its scores were made with
        method_fingerprint = {**fingerprint, "job": settings.method_job(method)}
        previous = _finished(run_dir, method_fingerprint)
        if previous is not None:
            progress(f"[compare] {i}/{len(methods)} {method}: done earlier ({run_dir / SCORES_FILE}), not run again")
            done[method] = previous
            continue
        progress(f"[compare] {i}/{len(methods)} {method}: {_plan(method, settings, len(sites))} -> {run_dir}")
        started = time.time()
        if method == "centralized":
            scores, source, models = _run_centralized(sites, run_dir, settings, root)
        elif method == CENTRALIZED_STEPS:
            scores, source, models = _run_centralized(sites, run_dir, settings, root,
                                                      epochs=_equal_steps_epochs(settings, sites))
        elif method == "local":
            scores, source, models = _run_local(sites, run_dir, settings, root, progress)
        else:
            scores, source, models = _run_federated(method, sites, run_dir, settings, root, console, tests)
        result = MethodScores(method, scores, round(time.time() - started, 1), source, method_fingerprint,
                              choices=_choices(models))
        if tests:
            result = _with_test_scores(result, models, tests, run_dir, root)
        write_json_atomic(run_dir / SCORES_FILE, result.to_json())
        done[method] = result
        dice = "  ".join(f"{s} {result.scores[s]['mean']['dice']:.4f}" for s in sites)
        progress(f"[compare] {i}/{len(methods)} {method}: {result.seconds:.0f} s; mean Dice "
                 f"({'test' if tests else 'validation'}) {dice}")

    results = ComparisonResults(out, list(sites), done, settings)
    results.write()
    return results


def _choices(models: Mapping[str, Any]) -> dict[str, str]:
    """Which model each site of a per-site model selection kept (empty for every other method)."""
    from fedseg.app.protocol import SELECT_CANDIDATES, SELECT_CHOICE_KEY

    return {site: SELECT_CANDIDATES[int(sent[SELECT_CHOICE_KEY])] for site, sent in models.items()
            if isinstance(sent, Mapping) and SELECT_CHOICE_KEY in sent}


def _plan(method: str, s: CompareSettings, n_sites: int) -> str:
    if method == "centralized":
        return f"one model on the union of {n_sites} sites' cases, {s.epochs} epochs"
    if method == CENTRALIZED_STEPS:
        return (f"one model on the union of {n_sites} sites' cases, {max(1, round(s.epochs / n_sites))} epochs "
                "(the optimizer steps of one site)")
    if method == "local":
        return f"one model per site on its own cases, {s.epochs} epochs each"
    fed = s.study.federation
    return f"{fed.rounds} rounds x {fed.local_epochs} local epochs on {n_sites} simulated sites"


def _check_methods(methods: Sequence[str]) -> list[str]:
    methods = list(dict.fromkeys(methods))
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ComparisonError(f"unknown methods {unknown or '(none given)'}; known: {', '.join(METHODS)}")
    return methods


def _check_sites(sites: dict[str, Path], data_root: Path | None) -> None:
    """Every site must have training and validation cases: the score is on its own validation cases."""
    if len(sites) < 2:
        raise ComparisonError(f"a comparison needs at least 2 sites, got {len(sites)}")
    for name, path in sites.items():
        datalist = read_datalist(path, data_root)
        if not datalist.training or not datalist.validation:
            raise ComparisonError(
                f"{path}: site {name} has {len(datalist.training)} training and {len(datalist.validation)} "
                "validation cases; every site needs both"
            )


def _test_sets(sites: dict[str, Path], given: Mapping[str, Path | str] | None, root: Path | None) -> dict[str, Path]:
    """Each site's held-out test datalist (see ``compare``), checked: readable, and no test case in
    any site's training or validation part."""
    from fedseg.lightning_modules.test_sets import TEST_SUFFIX, TestSetError, check_held_out, read_test_set

    if given is None:
        found = {site: path.with_name(path.name.removesuffix(".json") + TEST_SUFFIX) for site, path in sites.items()}
        given = found if all(p.is_file() for p in found.values()) else {}
    tests = {site: Path(p).resolve() for site, p in given.items()}
    if tests and set(tests) != set(sites):
        raise ComparisonError(f"test sets for {sorted(tests)}, but the sites are {sorted(sites)}: every site needs one")
    for site, path in tests.items():
        try:
            check_held_out(read_test_set(path, root), sites.values())
        except TestSetError as err:
            raise ComparisonError(f"site {site}: {err}") from None
    return tests


def _with_test_scores(result: MethodScores, models: dict[str, Any], tests: dict[str, Path], run_dir: Path,
                      root: Path | None) -> MethodScores:
    """``result`` with its scores on the test sets: ``models[site]`` is a checkpoint to score here, or
    the test metrics a personalized site sent (``protocol.test_set_metrics``)."""
    from fedseg.app.protocol import TEST_PREFIX
    from fedseg.lightning_modules.test_sets import score_test_set

    scores: Scores = {}
    sem: dict[str, dict[str, float]] = {}
    counts: dict[str, int] = {}
    for site, test in tests.items():
        model = models.get(site)
        if isinstance(model, Mapping):  # the site scored its personal model on its own test cases
            if f"{TEST_PREFIX}dice" not in model:
                raise ComparisonError(f"{run_dir}: {site} sent no test-set score of its personal model")
            key = {region: "" if region == "mean" else f"_{region.lower()}" for region in TABLE_REGIONS}
            scores[site] = {r: {m: float(model.get(f"{TEST_PREFIX}{m}{key[r]}", math.nan)) for m in SCORE_METRICS}
                            for r in TABLE_REGIONS}
            sem[site] = {r: float(model.get(f"{TEST_PREFIX}dice{key[r]}_sem", math.nan)) for r in TABLE_REGIONS}
            counts[site] = int(model.get(f"{TEST_PREFIX}cases", 0))
            continue
        if model is None:
            raise ComparisonError(f"{run_dir}: no model of {result.method} to score on {site}'s test cases")
        scored = score_test_set(model, test, data_root=root, metrics=("dice", "iou"))
        write_json_atomic(run_dir / "test" / f"{site}.json", scored.to_json())
        region = {r: "overall" if r == "mean" else r for r in TABLE_REGIONS}
        scores[site] = {r: {m: scored.mean[region[r]].get(m, math.nan) for m in SCORE_METRICS} for r in TABLE_REGIONS}
        sem[site] = {r: scored.sem[region[r]]["dice"] for r in TABLE_REGIONS}
        counts[site] = scored.n_cases
    return dataclasses.replace(result, scores=scores, validation=result.scores, sem=sem, test_cases=counts,
                               source=result.source + "; the same models on each site's held-out test cases")


def _finished(run_dir: Path, fingerprint: dict[str, Any]) -> MethodScores | None:
    """The method's earlier scores, if it finished with the same settings; an error if with others."""
    path = run_dir / SCORES_FILE
    if not path.exists():
        return None
    previous = MethodScores.read(path)
    if previous.fingerprint != fingerprint:
        changed = sorted(
            k for part in ("settings", "sites") for k in {**fingerprint[part], **previous.fingerprint.get(part, {})}
            if fingerprint[part].get(k) != previous.fingerprint.get(part, {}).get(k)
        ) or [k for k in ("data_root", "job", "test_sets") if fingerprint.get(k) != previous.fingerprint.get(k)]
        raise ComparisonError(
            f"{path}: made with other settings or sites (differs in: {', '.join(changed)}); "
            f"use a new output folder or delete {run_dir}"
        )
    return previous


def _train_and_score(
    datalists: list[Path], run_dir: Path, settings: CompareSettings, data_root: Path | None,
    score_on: dict[str, Path], epochs: int | None = None,
) -> tuple[Scores, Path]:
    """Train (or resume) a run, then score its final model (``last.ckpt``, returned too) on each given site."""
    from fedseg.lightning_modules.training import train

    cfg = settings.train_config(datalists, run_dir, data_root)
    if epochs is not None:
        cfg = dataclasses.replace(cfg, epochs=epochs)
    config_file = run_dir / "config.json"
    if config_file.exists() and json.loads(config_file.read_text()) != cfg.to_json():
        raise ComparisonError(f"{config_file}: an unfinished run with other settings; delete {run_dir} to start it again")
    results = train(cfg)
    last = results.get("last_checkpoint")
    if not last or results["epochs_done"] < cfg.epochs:
        raise ComparisonError(f"{run_dir}: training stopped after {results['epochs_done']} of {cfg.epochs} epochs")
    return {site: _score_checkpoint(last, datalist, run_dir / "eval" / site, settings, data_root)
            for site, datalist in score_on.items()}, Path(last)


def _score_checkpoint(
    checkpoint: Path | str, datalist: Path, out: Path, settings: CompareSettings, data_root: Path | None
) -> dict[str, dict[str, float]]:
    """Region -> metric -> mean over the site's validation cases, of one Lightning checkpoint."""
    from fedseg.lightning_modules.evaluation import evaluate_checkpoint

    metrics = ("dice", "iou", "hd95") if settings.study.model.hd95 else ("dice", "iou")
    evaluation = evaluate_checkpoint(checkpoint, datalist, out=out, split="validation", data_root=data_root, metrics=metrics)
    regions = evaluation.summary["regions"]
    return {
        region: {m: regions["overall" if region == "mean" else region][m]["mean"] if m in metrics else math.nan
                 for m in SCORE_METRICS}
        for region in TABLE_REGIONS
    }


def _run_centralized(
    sites: dict[str, Path], run_dir: Path, s: CompareSettings, root: Path | None, epochs: int | None = None
) -> tuple[Scores, str, dict[str, Any]]:
    scores, last = _train_and_score(list(sites.values()), run_dir, s, root, sites, epochs=epochs)
    return scores, (f"{run_dir.name}/checkpoints/last.ckpt ({epochs or s.epochs} epochs), evaluate_checkpoint "
                    "on each site's validation cases"), {site: last for site in sites}


def _equal_steps_epochs(s: CompareSettings, sites: dict[str, Path]) -> int:
    """Epochs of centralized training with the optimizer steps of one federated site.

    A site of K similar sites holds about 1/K of the pool, so ``budget`` epochs of its cases take as
    many steps as ``budget / K`` epochs of the pool (rounded, at least 1).
    """
    return max(1, round(s.epochs / len(sites)))


def _run_local(
    sites: dict[str, Path], run_dir: Path, s: CompareSettings, root: Path | None, progress: Callable[[str], None]
) -> tuple[Scores, str, dict[str, Any]]:
    scores: Scores = {}
    models: dict[str, Any] = {}
    for site, datalist in sites.items():
        progress(f"[compare]   local {site}: {s.epochs} epochs on its own cases -> {run_dir / site}")
        site_scores, models[site] = _train_and_score([datalist], run_dir / site, s, root, {site: datalist})
        scores.update(site_scores)
    return scores, "local/<site>/checkpoints/last.ckpt, evaluate_checkpoint on that site's validation cases", models


def _run_federated(
    method: str, sites: dict[str, Path], run_dir: Path, s: CompareSettings, root: Path | None, console: Any = None,
    tests: dict[str, Path] | None = None,
) -> tuple[Scores, str, dict[str, Any]]:
    from fedseg.run.simulate import simulate

    if run_dir.exists() and any(run_dir.iterdir()):
        # An unfinished job cannot be resumed (and FedPer heads from it must not leak into a new one).
        if not (run_dir / "job.json").exists():
            raise ComparisonError(f"{run_dir}: exists, is not empty and is not a fedseg simulate run folder")
        shutil.rmtree(run_dir)
    roots = {site: root for site in sites} if root else None
    job = s.job(method, len(sites))
    groups = {site: read_datalist(path, root).meta.get("group") for site, path in sites.items()}
    grouped = job.addons.groups is not None
    site_settings: dict[str, dict[str, Any]] = {site: {"group": g} for site, g in groups.items() if g} if grouped else {}
    if grouped and len(site_settings) < len(sites):
        raise ComparisonError("grouped needs every site's group in its datalist meta (e.g. synthetic sites with --synth-groups 2)")
    if job.spec.personal:  # each site scores its personal model on its own test cases, in the job's last task
        for site, test in (tests or {}).items():
            site_settings.setdefault(site, {})["test_datalist"] = str(test)
    results = simulate(job, sites, run_dir, data_roots=roots, site_settings=site_settings or None, console=console,
                       round_lines=False)
    if grouped:  # no single global model: each site scores its own group's final model
        scores, models = {}, {}
        for site, datalist in sites.items():
            checkpoint = results.checkpoints.get(f"final_group-{groups[site]}")
            if checkpoint is None:
                raise ComparisonError(f"{run_dir}: no final model of group {groups[site]} (site {site})")
            scores[site] = _score_checkpoint(checkpoint, datalist, run_dir / "eval" / site, s, root)
            models[site] = Path(checkpoint)
        return scores, "grouped: each site's group's final model, evaluate_checkpoint on the site's validation cases", models
    personal = job.spec.personal
    final = results.personal if personal else results.cross_site.get(FINAL_MODEL, {})
    missing = [site for site in sites if "val_dice" not in final.get(site, {})]
    if missing:
        what = "its personal model" if personal else "the final global model"
        raise ComparisonError(
            f"{run_dir}: no score of {what} on {', '.join(missing)} (see the site logs under {run_dir / 'nvflare' / method})"
        )
    scores = {
        site: {
            region: {m: float(final[site].get(f"val_{m}" + ("" if region == "mean" else f"_{region.lower()}"), math.nan))
                     for m in SCORE_METRICS}
            for region in TABLE_REGIONS
        }
        for site in sites
    }
    if personal:
        return (scores, f"{method}: each site's personal model on its own validation cases (metrics/personal_scores.json)",
                {site: final[site] for site in sites})
    final_global = results.checkpoints.get("final")
    return (scores, f"{method}: cross-site evaluation of the final global model ({FINAL_MODEL}) on each site's validation cases",
            {site: Path(final_global) for site in sites} if final_global else {})


def plot_comparison(results: ComparisonResults, out: Path) -> Path:
    """Grouped bars: mean Dice (over ET, TC, WT) of every method on every site, and their mean."""
    # The object-oriented API with an Agg canvas, as in evaluation.py: no pyplot global state.
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = [*results.sites, "mean"]
    methods = list(results.methods)
    width = 0.8 / len(methods)
    fig = Figure(figsize=(2 + 1.6 * len(groups), 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    x = np.arange(len(groups))
    for i, method in enumerate(methods):
        dice = [results.mean_dice(method, s) for s in results.sites]
        values = [*dice, _nanmean(dice)]
        bars = ax.bar(x + (i - (len(methods) - 1) / 2) * width, values, width, label=method)
        ax.bar_label(bars, fmt="%.3f", fontsize=7, rotation=90, padding=2)
    ax.set_xticks(x, groups)
    ax.set(ylabel="mean Dice (ET, TC, WT)", ylim=(0, 1.2),  # headroom for the legend
           title=f"final models on each site's own validation cases ({results.settings.epochs} epochs per case)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(ncols=min(len(methods), 5), loc="upper center", fontsize=8)
    fig.savefig(out, dpi=110)
    return out


def _nanmean(values: Sequence[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def _nan_low(x: float) -> float:
    return -math.inf if math.isnan(x) else x


def _nan(value: Any) -> float:
    return math.nan if value is None else float(value)

