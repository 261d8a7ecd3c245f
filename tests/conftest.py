"""Shared test fixtures: where the real BraTS cases are, and tiny synthetic volumes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: ../shared beside the checkout (CI clones main with shared/ next to it); FEDSEG_SHARED overrides.
SHARED = Path(os.environ.get("FEDSEG_SHARED", REPO.parent / "shared"))
REAL = SHARED / "data" / "real"


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The read-only folder of real BraTS cases (never copied into the repo)."""
    if not REAL.is_dir():
        message = f"real BraTS cases not found at {REAL} (set FEDSEG_SHARED)"
        if os.environ.get("CI"):  # CI clones main with shared/ beside it: never skip there
            pytest.fail(message)
        pytest.skip(message)
    return REAL


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny test tensors run faster on one thread than on two contending ones (2-core CI)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny():
    """The ``tiny`` profile (``fedseg.config``): the one set of small settings every test starts from."""
    from fedseg.config import profile

    return profile("tiny")


def tiny_job(algorithm: str = "fedavg", *, name: str | None = None, min_clients: int = 2, options=None, addons=None,
             cross_site_eval: bool = True, study_name: str = "", **settings):
    """A ``Job`` on the tiny profile with ``settings`` (study fields: ``rounds=3``, ``roi=(24,)*3``, ...)."""
    from fedseg.config import profile
    from fedseg.jobs.addons import Addons
    from fedseg.jobs.base import Job

    return Job(algorithm=algorithm, study=profile("tiny").override(**settings), name=name or algorithm,
               min_clients=min_clients, options=options, addons=addons or Addons(), cross_site_eval=cross_site_eval,
               study_name=study_name)


#: the synthetic data of the end-to-end tests that call ``SynthConfig`` directly: the first generator's
#: compact tumours and no held-out test cases, as their thresholds were measured (the default is the
#: consortium's harder "varied" tumours with 16 test cases a site, docs/data.md)
TEST_DATA = {"tumours": "classic", "test_cases": 0}


def tiny_synth(folder, *, sites: int | None = None, cases: int | None = None, size: int | None = None, **kwargs):
    """The tiny profile's synthetic sites in ``folder`` (``SynthConfig`` overrides as keywords)."""
    from fedseg.config import profile
    from fedseg.lightning_modules.data.synth import SynthConfig, generate

    s = profile("tiny").synth
    n = size or s.size
    kwargs.setdefault("test_cases", s.test_cases)  # the tiny profile's few test cases, not the default 16
    kwargs.setdefault("tumours", s.synth_tumours)  # its classic tumours: the learning thresholds were measured on them
    return generate(SynthConfig(n_sites=sites or s.sites, cases_per_site=cases or s.cases, shape=(n, n, n), **kwargs),
                    folder)


def tiny_train_config(datalists, out, *, epochs: int = 2, wandb: str = "off", init_from=None, **settings):
    """A ``TrainConfig`` on the tiny profile with study ``settings`` (``features=8``, ``roi=(32,)*3``, ...)."""
    from fedseg.config import profile
    from fedseg.lightning_modules.training import TrainConfig

    return TrainConfig(datalists=list(datalists), out=out, study=profile("tiny").override(**settings), epochs=epochs,
                       progress=False, wandb=wandb, init_from=init_from)


#: settings under which a tiny federated job learns in 2 rounds: an untrained network's mean Dice on the
#: synthetic validation cases is about 0.01; after 2 rounds of 4 local epochs at this rate, 0.2 to 0.5
#: (FedAvg, 2 sites x 3 cases, seeds 0-2; docs/testing.md)
LEARNING = {"lr": 0.03, "local_epochs": 4}
#: how far a trained model's mean Dice over the sites must rise above the initial model's
LEARNED_BY = 0.1


def assert_learned(initial, trained, what: str = "the model") -> None:
    """The sites' mean Dice of a trained model (``site -> Dice``) is ``LEARNED_BY`` above the initial
    model's, measured in the same run: each site's validation in round 1 scores the initial global model."""
    assert set(trained) == set(initial), (initial, trained)
    before, after = (sum(d.values()) / len(d) for d in (initial, trained))
    assert after > before + LEARNED_BY, (
        f"{what} did not learn: mean Dice {before:.4f} -> {after:.4f} (needs +{LEARNED_BY}); "
        f"initial {dict(initial)}, trained {dict(trained)}")


@pytest.fixture(scope="session")
def fedavg_run(tmp_path_factory):
    """One FedAvg-family job in NVFlare's simulator, shared by the tests that read it (jobs, tracking):
    2 sites x 3 cases of 32^3, 2 rounds of 4 local epochs (``LEARNING``: it learns), cross-site
    evaluation, W&B offline on the server, and the fine-tuning step at the end (``finetune`` is FedAvg
    plus that step).

    Returns ``(job, synth, run folder, FederatedResults)``.
    """
    import os

    from fedseg.jobs.addons import Addons
    from fedseg.jobs.finetune import FineTuneOptions
    from fedseg.run.simulate import simulate

    root = tmp_path_factory.mktemp("fedavg")
    synth = tiny_synth(root / "synth", sites=2, cases=3, size=32)
    job = tiny_job("finetune", name="fedavg", rounds=2, features=8, roi=(32, 32, 32), hd95=True, **LEARNING,
                   options=FineTuneOptions(finetune_epochs=2), addons=Addons(wandb="offline"))
    env = {k: os.environ.pop(k) for k in ("WANDB_API_KEY", "WANDB_MODE") if k in os.environ}
    try:
        results = simulate(job, synth.datalists, root / "run")
    finally:
        os.environ.update(env)
    return job, synth, root / "run", results


def component_paths(node):
    """Every class path (``"path"``) named anywhere in a job config document."""
    if isinstance(node, dict):
        if isinstance(node.get("path"), str):
            yield node["path"]
        for value in node.values():
            yield from component_paths(value)
    elif isinstance(node, list):
        for value in node:
            yield from component_paths(value)
