"""Differential-privacy filters on the sites' updates (fedseg.jobs.addons, fedseg.app.privacy_filters).

The unit tests build each update the way it reaches a site's output filter: the site's FLModel
(torch tensors, ``NUM_STEPS_CURRENT_ROUND`` = its training cases, fedseg.app.protocol) after NVFlare's
client API turned it into a DIFF, converted by ``FLModelUtils.to_shareable`` as the in-process
client API does (nvflare/client/in_process/api.py, ``send``).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from nvflare.apis.dxo import DataKind, MetaKey, from_shareable
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.utils.fl_model_utils import FLModelUtils

from fedseg.app.privacy_filters import TorchPercentilePrivacy, TorchSVTPrivacy, update_stats
from conftest import TEST_DATA, tiny_job
from fedseg.jobs.addons import Addons, PrivacyFilter, parse_privacy_args, validate_privacy_args
from fedseg.jobs.base import export


def build_privacy_filter(kind: str, args: dict):
    return PrivacyFilter(kind, args).build()

STEPS = 4  # the site's training cases, which it sends as NUM_STEPS_CURRENT_ROUND


def site_diff(seed: int = 0, scale: float = 1e-3, channels: int = 16) -> dict[str, torch.Tensor]:
    """A model update as the site's state_dict diff: float weights and an integer counter."""
    g = torch.Generator().manual_seed(seed)
    return {
        "net.conv.weight": torch.randn(channels, 4, 3, 3, 3, generator=g) * scale,
        "net.conv.bias": torch.randn(16, generator=g) * scale,
        "net.head.weight": torch.randn(3, 16, 1, 1, 1, generator=g) * scale,
        "net.norm.num_batches_tracked": torch.tensor(7),
    }


def site_update(diff: dict[str, torch.Tensor], params_type: ParamsType = ParamsType.DIFF):
    meta = {MetaKey.NUM_STEPS_CURRENT_ROUND: STEPS, "n_train_cases": STEPS}
    model = FLModel(params={k: v.clone() for k, v in diff.items()}, params_type=params_type, meta=meta)
    return FLModelUtils.to_shareable(model)


def apply(filter_, shareable):
    return from_shareable(filter_.process(shareable, FLContext()))


def floats(diff: dict[str, torch.Tensor]) -> np.ndarray:
    return np.concatenate([v.numpy().ravel() for v in diff.values() if v.is_floating_point()])


def assert_aggregatable(received: dict, sent: dict[str, torch.Tensor]) -> None:
    """Same keys in the same order, torch tensors of the same shapes and dtypes: the server can add them."""
    assert list(received) == list(sent)
    for key, value in sent.items():
        assert isinstance(received[key], torch.Tensor), key
        assert received[key].shape == value.shape and received[key].dtype == value.dtype, key


# ---------------------------------------------------------------- the filters on one update


@pytest.mark.parametrize("percentile", [10, 75, 90])
def test_percentile_keeps_the_largest_share_of_the_diff_clipped_to_gamma(percentile):
    diff, gamma = site_diff(), 5e-4  # gamma bounds |diff| per step; STEPS * gamma = 2e-3 clips the largest
    dxo = apply(TorchPercentilePrivacy(percentile=percentile, gamma=gamma), site_update(diff))

    assert dxo.data_kind == DataKind.WEIGHT_DIFF
    assert_aggregatable(dxo.data, diff)
    sent, received = floats(diff), floats(dxo.data)
    kept = received != 0
    assert abs(kept.mean() - (100 - percentile) / 100) <= 1 / sent.size + 1e-9  # (100 - percentile)% kept
    cutoff = np.percentile(np.abs(sent) / STEPS, percentile)
    assert np.array_equal(kept, np.abs(sent) / STEPS >= cutoff)  # ... and they are the largest ones
    assert np.max(np.abs(received)) <= gamma * STEPS * (1 + 1e-6)
    expected = np.clip(sent[kept] / STEPS, -gamma, gamma) * STEPS
    np.testing.assert_allclose(received[kept], expected, rtol=1e-5)
    assert (np.abs(sent[kept]) > gamma * STEPS).any()  # the cap did bind on this update
    assert dxo.data["net.norm.num_batches_tracked"].item() == 7  # counters pass unchanged


@pytest.mark.parametrize("replace", [True, False])
def test_svt_releases_at_most_fraction_of_the_entries_clipped_and_laplace_noised(replace):
    diff = site_diff(seed=1, scale=2e-4, channels=64)
    fraction, gamma, noise_var = 0.3, 1e-4, 1.0
    np.random.seed(0)
    svt = TorchSVTPrivacy(fraction=fraction, epsilon=0.1, noise_var=noise_var, gamma=gamma, replace=replace)
    dxo = apply(svt, site_update(diff))

    assert_aggregatable(dxo.data, diff)
    sent, received = floats(diff), floats(dxo.data)
    released = received != 0
    n_upload = math.ceil(sent.size * fraction)
    assert released.sum() <= n_upload  # with replacement an entry can be drawn twice
    if not replace:
        assert released.sum() == n_upload
    # released value = (clip(diff / steps, +-gamma) + Laplace(b)) * steps with b = 2 gamma / noise_var
    # (svt_privacy.py: epsilon_release defaults to n_upload * noise_var, noise scale 2 gamma n_upload / epsilon_release)
    noise = received[released] / STEPS - np.clip(sent[released] / STEPS, -gamma, gamma)
    b = 2 * gamma / noise_var
    assert np.mean(np.abs(noise)) == pytest.approx(b, rel=0.1)  # Laplace(b): mean |x| = b (~2000 samples)
    assert dxo.data["net.norm.num_batches_tracked"].item() == 7
    budget = dxo.get_meta_prop("svt_privacy_budget")
    assert budget["n_upload"] == n_upload and budget["epsilon_release"] == pytest.approx(n_upload * noise_var)


@pytest.mark.parametrize("privacy", ["percentile", "svt"])
def test_empty_or_counter_only_answers_pass_and_full_weights_are_refused(privacy):
    filter_ = build_privacy_filter(privacy, {})
    assert apply(filter_, site_update({})).data == {}  # a failed round's answer (app/client.py): no weights
    counters = apply(filter_, site_update({"n": torch.tensor(3)}))
    assert counters.data["n"].item() == 3 and counters.data["n"].dtype == torch.int64
    full = site_update(site_diff(), params_type=ParamsType.FULL)
    with pytest.raises(RuntimeError, match="filters weight differences, but this update is WEIGHTS:"):
        filter_.process(full, FLContext())
    declined = TorchPercentilePrivacy(gamma=0)  # only reachable by building the filter by hand
    with pytest.raises(RuntimeError, match="declined to filter"):
        declined.process(site_update(site_diff()), FLContext())


def test_nvflare_filters_as_shipped_need_diffs_and_return_numpy():
    """Pins why fedseg.app.privacy_filters exists (nvflare/app_common/filters/*_privacy.py, 2.9.0)."""
    from nvflare.app_common.filters import PercentilePrivacy, SVTPrivacy
    from nvflare.client.utils import numerical_params_diff

    full_weights = {"w": torch.full((100,), 0.5)}  # FULL weights are filtered as if they were a diff:
    dxo = apply(PercentilePrivacy(percentile=10, gamma=0.01), site_update(full_weights, ParamsType.FULL))
    assert torch.all(dxo.data["w"] <= 0.01 * STEPS)  # every weight of 0.5 clipped: the model is gone
    np.random.seed(0)
    dxo = apply(SVTPrivacy(fraction=0.5), site_update(site_diff()))
    assert all(isinstance(v, np.ndarray) for v in dxo.data.values())  # torch in, numpy out
    declined = apply(PercentilePrivacy(gamma=0), site_update({"w": torch.full((4,), 0.5)}))
    assert torch.equal(declined.data["w"], torch.full((4,), 0.5))  # a filter returning None: sent unfiltered
    assert apply(PercentilePrivacy(), site_update({})).data == {}  # no entries: passed on, never filtered
    # With DIFF transfer, NVFlare's client API diffs a FULL answer; an empty one raises (the site's
    # failure answer in app/client.py sends params={} as FULL: see the report).
    with pytest.raises(RuntimeError, match="no common keys"):
        numerical_params_diff({"w": torch.zeros(2)}, {})


def test_update_stats_measure_share_kept_and_largest_value():
    stats = update_stats({"a": torch.tensor([0.0, 2.0, -4.0, 0.0]), "n": torch.tensor(3)}, steps=2)
    assert stats == {"entries": 4, "nonzero_fraction": 0.5, "max_abs": 4.0, "max_abs_per_step": 2.0,
                     "l2_norm": pytest.approx(math.sqrt(20))}


# ---------------------------------------------------------------- arguments


def test_privacy_args_are_checked_and_converted():
    assert validate_privacy_args("percentile", {"percentile": "90", "gamma": 0.001}) == {"percentile": 90.0, "gamma": 0.001}
    assert validate_privacy_args("svt", parse_privacy_args(["fraction=0.9", "replace=false", "epsilon_release=none"])) == {
        "fraction": 0.9, "replace": False, "epsilon_release": None}
    with pytest.raises(ValueError, match=r"unknown percentile privacy argument 'fraction'; allowed: percentile, gamma"):
        validate_privacy_args("percentile", {"fraction": 0.1})
    bad = [("percentile", "percentile", 150), ("percentile", "gamma", 0), ("svt", "fraction", 0),
           ("svt", "epsilon", "abc"), ("svt", "replace", "maybe"), ("svt", "noise_var", True), ("svt", "gamma", "nan")]
    for privacy, name, value in bad:
        with pytest.raises(ValueError, match=rf"{privacy} privacy argument {name}=.*must be .*allowed arguments: "):
            validate_privacy_args(privacy, {name: value})
    with pytest.raises(ValueError, match="epsilon_threshold \\+ epsilon_query must equal epsilon"):
        validate_privacy_args("svt", {"epsilon": 1, "epsilon_threshold": 0.5, "epsilon_query": 0.2})
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        parse_privacy_args(["gamma"])
    with pytest.raises(ValueError, match="unknown svt privacy argument 'data_kinds'"):
        PrivacyFilter("svt", {"data_kinds": ["WEIGHTS"]})


# ---------------------------------------------------------------- the job


@pytest.mark.parametrize("algorithm", ["fedavg", "fedprox", "fedper", "fedopt"])
def test_every_fedavg_family_job_filters_train_updates_sent_as_diffs(algorithm, tmp_path):
    job = tiny_job(algorithm, cross_site_eval=False,
                   addons=Addons(privacy=PrivacyFilter("percentile", {"percentile": 90, "gamma": 0.001})))
    folder = export(job, tmp_path)
    client = json.loads((folder / "app" / "config" / "config_fed_client.json").read_text())
    server = json.loads((folder / "app" / "config" / "config_fed_server.json").read_text())
    assert client["executors"][0]["executor"]["args"]["params_transfer_type"] == "DIFF"
    train = [f for entry in client["task_result_filters"] if entry["tasks"] == ["train"] for f in entry["filters"]]
    paths = [f["path"].rsplit(".", 1)[1] for f in train]
    # FedPer strips the head first; the privacy filter is the last one the update passes
    assert paths == (["ExcludeVars"] if algorithm == "fedper" else []) + ["TorchPercentilePrivacy"]
    assert train[-1]["args"]["percentile"] == 90 and train[-1]["args"]["gamma"] == 0.001
    assert all("TorchPercentilePrivacy" not in json.dumps(e) for e in client["task_result_filters"] if e["tasks"] != ["train"])
    received = [f["path"] for e in server["task_result_filters"] if e["tasks"] == ["train"] for f in e["filters"]]
    assert received[-1] == "fedseg.app.privacy_filters.UpdateStatsRecorder"


def test_without_privacy_sites_send_full_weights_unfiltered(tmp_path):
    folder = export(tiny_job(name="plain"), tmp_path)
    client = json.loads((folder / "app" / "config" / "config_fed_client.json").read_text())
    assert client["executors"][0]["executor"]["args"].get("params_transfer_type", "FULL") == "FULL"
    assert "Privacy" not in json.dumps(client.get("task_result_filters", []))


def test_privacy_refuses_he_and_scores_only_global_models_in_the_final_evaluation(tmp_path):
    with pytest.raises(ValueError, match="fedavg-he does not support privacy"):
        tiny_job("fedavg-he", addons=Addons(privacy=PrivacyFilter("svt")))
    folder = export(tiny_job(name="cse", addons=Addons(privacy=PrivacyFilter("svt"))), tmp_path)
    server = json.loads((folder / "app" / "config" / "config_fed_server.json").read_text())
    # NVFlare's final global evaluation: only the server's models are scored; no site is asked for its model
    evaluation = [w for w in server["workflows"] if "Eval" in w["path"]]
    assert len(evaluation) == 1 and "submit_model_timeout" not in evaluation[0]["args"]
    assert evaluation[0]["args"].get("submit_model_task_name", "") == ""  # no site is asked for its model


# ---------------------------------------------------------------- the simulator


@pytest.mark.e2e
@pytest.mark.slow
def test_simulator_percentile_privacy_filters_what_the_server_receives(tmp_path):
    from fedseg.lightning_modules.data.synth import SynthConfig, generate
    from fedseg.run.simulate import simulate

    percentile, gamma = 80, 2e-4
    synth = generate(SynthConfig(**TEST_DATA, n_sites=2, cases_per_site=3, shape=(24, 24, 24)), tmp_path / "synth")
    job = tiny_job(name="dp", rounds=2, features=8, roi=(24, 24, 24),
                   addons=Addons(privacy=PrivacyFilter("percentile", {"percentile": percentile, "gamma": gamma})))
    run = tmp_path / "run"
    results = simulate(job, synth.datalists, run)
    assert {r["round"] for r in results.rounds} == {0, 1}

    workspace = run / "nvflare" / "dp"
    records = [json.loads(line) for line in (workspace / "server" / "simulate_job" / "metrics" / "update_stats.jsonl").read_text().splitlines()]
    assert sorted((r["site"], r["round"]) for r in records) == [("site-1", 0), ("site-1", 1), ("site-2", 0), ("site-2", 1)]
    for record in records:  # what the server received: (100 - percentile)% of the diff, each |value| <= gamma per step
        assert record["kind"] == "WEIGHT_DIFF" and record["steps"] > 0
        # all entries tied at the cutoff are kept, and Adam moves many weights by the same step: a little over
        assert (100 - percentile) / 100 <= record["nonzero_fraction"] <= (100 - percentile) / 100 + 0.01
        assert record["max_abs_per_step"] <= gamma * (1 + 1e-5)
    # what the sites had before the filter (NVFlare's PercentilePrivacy logs it): larger than gamma per step
    raw_max = [float(m) for log in workspace.glob("site-*/log.txt")
               for m in re.findall(r"Max abs delta_w: ([0-9.e+-]+)", log.read_text())]
    assert len(raw_max) == 4 and min(raw_max) > gamma

    # The final evaluation scores the global models on every site; no site's unfiltered local model
    # is asked for (no submit_model task), so none reaches the server.
    assert set(results.cross_site) == {"SRV_FL_global_model.pt", "SRV_best_FL_global_model.pt"}
    for scores in results.cross_site.values():
        assert set(scores) == {"site-1", "site-2"} and all(0.0 <= m["val_dice"] <= 1.0 for m in scores.values())
    logs = [workspace / "server" / "log.txt", *workspace.glob("site-*/log.txt")]
    assert len(logs) == 3 and not any("submit_model" in log.read_text() for log in logs)
