"""A site on several devices (``fedseg.app.multi_device``), and jobs that say which GPUs they need.

- the site config's ``devices``: read, checked, and a site asking for more than it has stops;
- two CPU ranks (gloo) outside NVFlare: disjoint training shards, one model, validation reduced
  over the ranks (the site's ``val_dice``, not rank 0's shard's);
- the job's ``meta.json`` ``resource_spec`` and ``fedseg provision site-config --gpus``;
- end to end in NVFlare's simulator: a 2-rank site next to a 1-rank site (``e2e``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import tiny_job, tiny_synth

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ the site's devices


def test_the_device_count_is_a_site_setting_checked_before_any_round():
    from fedseg.app.multi_device import DeviceCountError, available_devices, check_devices, site_devices

    assert site_devices({}) == 1 and site_devices({"devices": 2}) == 2
    for bad in (0, -1, 1.5, "2", True):
        with pytest.raises(ValueError, match="'devices' must be a whole number"):
            site_devices({"devices": bad}, "site.json")
    have, kind = available_devices()
    check_devices(1, 1, 1)
    with pytest.raises(DeviceCountError, match=rf"asks for {have + 1} devices; this machine has {have} {kind}"):
        check_devices(have + 1, 100, 100, "site.json")
    if have >= 2:
        with pytest.raises(DeviceCountError, match="need at least 2 training and 2 validation cases"):
            check_devices(2, 5, 1, "site.json")


def test_a_site_asking_for_more_devices_than_it_has_stops_at_set_up(tmp_path, tiny, monkeypatch):
    """Before the Trainer, NVFlare or any round: ``main`` answers every task with the error's class."""
    from fedseg.app.multi_device import DeviceCountError, available_devices
    from fedseg.app.site_config import ENV_VAR, write_site_config
    from fedseg.app.site_runner import SiteJob, SiteRunner

    synth = tiny_synth(tmp_path / "synth", sites=1, cases=4)
    have, _ = available_devices()
    config = write_site_config(tmp_path / "site-1.json", next(iter(synth.datalists.values())),
                               cache_dir=tmp_path / "cache", devices=have + 1)
    monkeypatch.setenv(ENV_VAR, str(config))
    runner = SiteRunner(SiteJob.from_document(tiny_job("fedavg").site_document()), "site-1")
    with pytest.raises(DeviceCountError, match=f"asks for {have + 1} devices"):
        runner.setup()
    assert runner.trainer is None and runner.site_ranks is None  # nothing started


# ------------------------------------------------------------------------------ two ranks, no NVFlare

RANK_SCRIPT = textwrap.dedent('''
    import json, sys
    import pytorch_lightning as pl
    import torch
    from fedseg.app.multi_device import RankEnvironment, ShardedData, open_group
    from fedseg.config import profile
    from fedseg.lightning_modules.data.datalist import read_datalist
    from fedseg.lightning_modules.module import SegmentationModule
    from fedseg.lightning_modules.training import build_datamodule, make_trainer

    rank, world, port, datalist, cache, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:]
    torch.set_num_threads(1)
    study = profile("tiny").override(hd95=False)
    pl.seed_everything(0, verbose=False)
    env = RankEnvironment(rank, world, "127.0.0.1", port)
    open_group(env)
    data = ShardedData(build_datamodule(study, read_datalist(datalist), cache), rank, world, seed=7)
    seen, validated = [], []

    class Seen(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, index):
            seen.extend(map(str, batch["case_id"]))

        def on_validation_batch_start(self, trainer, module, batch, index, dataloader_index=0):
            validated.extend(map(str, batch["case_id"]))

    model = SegmentationModule(**study.module_args())
    trainer = make_trainer(out, 2, ranks=env, callbacks=[Seen()], logger=False, progress=False,
                           enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0,
                           use_distributed_sampler=False)
    assert trainer.world_size == world and trainer.global_rank == rank
    trainer.fit(model, datamodule=data)
    trainer.limit_val_batches = 1.0
    (metrics,) = trainer.validate(model, datamodule=data, verbose=False)
    torch.save(model.state_dict(), f"{out}/rank{rank}.pt")
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump({"seen": seen, "validated": validated, "val_dice": float(metrics["val_dice"])}, f)
''')


def test_two_cpu_ranks_train_disjoint_shards_into_one_model_and_reduce_validation(tmp_path, tiny):
    """What a 2-device site does inside NVFlare, without it: Lightning's DDP (gloo) over two processes
    the site started itself (``RankEnvironment``), each on its shard (``ShardedData``)."""
    import torch

    from fedseg.app.multi_device import free_port
    from fedseg.lightning_modules.data.datalist import read_datalist
    from fedseg.lightning_modules.module import SegmentationModule
    from fedseg.lightning_modules.training import build_datamodule, make_trainer

    synth = tiny_synth(tmp_path / "synth", sites=1, cases=8)
    datalist = next(iter(synth.datalists.values()))
    cases = read_datalist(datalist)
    assert len(cases.training) == 6 and len(cases.validation) == 2
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    port, world = free_port(), 2
    ranks = [subprocess.Popen([sys.executable, str(script), str(r), str(world), str(port), str(datalist),
                               str(tmp_path / "cache"), str(tmp_path)], cwd=REPO) for r in range(world)]
    assert [p.wait(timeout=600) for p in ranks] == [0, 0]
    done = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]

    # each epoch the ranks split the training cases between them, with none trained twice
    train_ids = sorted(c.case_id for c in cases.training)
    for epoch in range(2):
        shards = [set(d["seen"][3 * epoch:3 * epoch + 3]) for d in done]
        assert len(shards[0]) == len(shards[1]) == 3 and not shards[0] & shards[1]
        assert sorted(shards[0] | shards[1]) == train_ids
    # validation: each rank its own case, the Dice over both
    assert sorted(d["validated"][0] for d in done) == sorted(c.case_id for c in cases.validation)
    # one model: DDP's ranks hold the same weights after every step
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    # the validation both ranks report is the site's: one process scoring every validation case agrees
    study = tiny.override(hd95=False)
    model = SegmentationModule(**study.module_args())
    model.load_state_dict(states[0])
    (single,) = make_trainer(tmp_path / "single", 1, logger=False, progress=False).validate(
        model, datamodule=build_datamodule(study, cases, tmp_path / "cache"), verbose=False)
    assert done[0]["val_dice"] == done[1]["val_dice"] == pytest.approx(float(single["val_dice"]), abs=1e-6)


# ------------------------------------------------------------------------------ jobs that say what they need


def test_an_exported_job_asks_each_site_for_the_studys_gpus(tmp_path):
    from nvflare.utils.job_launcher_utils import get_resource_manager_spec, validate_portable_resource_spec

    from fedseg.jobs.base import export

    folder = export(tiny_job("fedavg", name="gpus", gpus_per_site=2), tmp_path)
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["resource_spec"] == {"@default": {"num_of_gpus": 2}}
    validate_portable_resource_spec(meta["resource_spec"])  # what the server checks at submission
    # NVFlare's scheduler asks every site, whatever its name, for 2 GPUs
    assert get_resource_manager_spec(meta, "hospital-x") == {"num_of_gpus": 2}
    # the sites are not told: each trains on the devices its own config names
    client = json.loads((folder / "app" / "config" / "config_fed_client.json").read_text())
    assert "gpus_per_site" not in json.dumps(client)

    plain = export(tiny_job("fedavg", name="cpu"), tmp_path)
    meta = json.loads((plain / "meta.json").read_text())
    assert meta["resource_spec"] == {} and get_resource_manager_spec(meta, "hospital-x") == {}  # no requirement


def test_site_config_writes_the_sites_gpus_into_its_kit(tmp_path, capsys):
    from test_provisioning import _consortium_doc, _write

    from fedseg.app.site_config import load_site_config
    from fedseg.cli import main
    from fedseg.provisioning.consortium import parse_consortium
    from fedseg.provisioning.kits import provision
    from fedseg.provisioning.site_control import is_locked_down

    kits = provision(parse_consortium(_consortium_doc()), tmp_path / "kits")
    kit = kits.hospital_kit("hospital-a")
    datalist = _write(tmp_path / "site.json", "{}")

    def manager() -> dict:
        resources = json.loads((kit / "local" / "resources.json").read_text())
        return next(c for c in resources["components"] if c["id"] == "resource_manager")["args"]

    assert main(["provision", "site-config", str(kit), "--datalist", str(datalist), "--gpus", "2"]) == 0
    assert manager()["num_of_gpus"] == 2 and manager()["mem_per_gpu_in_GiB"] == 0
    assert manager()["expiration_period"] == 300  # the rest of NVFlare's settings stay
    assert is_locked_down(kit)  # and fedseg's class allow list and custom-code refusal too
    assert load_site_config("hospital-a", kit / "startup" / "x.py").extra["devices"] == 2
    assert "2 GPU(s)" in capsys.readouterr().out

    assert main(["provision", "site-config", str(kit), "--datalist", str(datalist), "--gpus", "0"]) == 0  # CPU only
    assert manager()["num_of_gpus"] == 0
    assert load_site_config("hospital-a", kit / "startup" / "x.py").extra["devices"] == 1
    assert main(["provision", "site-config", str(kit), "--datalist", str(datalist), "--gpus", "-1"]) == 2
    assert "--gpus must be >= 0" in capsys.readouterr().err


# ------------------------------------------------------------------------------ end to end


def _rank_lines(text: str, rank: int) -> dict[int, tuple[int, str]]:
    """round -> (steps, model fingerprint) of ``rank``'s 'trained ... on its shard' lines."""
    import re

    found = re.findall(rf"round (\d+)/\d+ site-1: rank {rank} trained (\d+) steps on its shard; model (\w+)", text)
    return {int(r): (int(steps), fingerprint) for r, steps, fingerprint in found}


def _followers_alive(folder: Path) -> list[int]:
    """Follower processes still running from ``folder`` (their working directory)."""
    alive = []
    for proc in Path("/proc").iterdir():
        try:
            if b"fedseg.app.multi_device" in (proc / "cmdline").read_bytes() and \
                    Path(proc / "cwd").resolve().is_relative_to(folder):
                alive.append(int(proc.name))
        except (OSError, ValueError):
            continue
    return alive


@pytest.mark.e2e
def test_simulator_a_two_rank_site_next_to_a_one_rank_site(tmp_path):
    """site-1 trains on 2 CPU ranks (gloo), site-2 on one. Its rank 0 fails in round 1 (a fault drill
    at rank 0 alone leaves rank 1 inside the round): the followers are restarted, and in round 2 both
    ranks train half the site's cases each into the model rank 0 sends. FedPer: the multi-device path
    with a personal head (only the shared keys leave rank 0); FedAvg's is the same path without the
    split, and ran here as a second case until the suite's 15-minute budget asked for its 37 s."""
    from fedseg.run.simulate import simulate

    algorithm = "fedper"

    synth = tiny_synth(tmp_path / "synth", sites=2, cases=8)
    job = tiny_job(algorithm, rounds=2, batch_size=1, min_sites_per_round=1)
    run = tmp_path / "run"
    results = simulate(job, synth.datalists, run, site_settings={
        "site-1": {"devices": 2, "fault_drill": {"raise_in_rounds": [1]}}})

    site_log = (run / "nvflare" / algorithm / "site-1" / "log.txt").read_text()
    (follower_log,) = [p.read_text() for p in run.rglob("rank-1.log")]
    assert "site-1: training on 2 devices" in site_log
    assert "round 1/2 site-1: FAILED (FaultDrillError" in site_log
    assert follower_log.count("site-1: rank 1/2 ready") == 2  # started, then restarted after round 1
    # round 2: each rank trained 3 of the site's 6 training cases (batch size 1, one epoch), and both
    # hold the model rank 0 sent
    rank0, rank1 = _rank_lines(site_log, 0), _rank_lines(follower_log, 1)
    assert set(rank0) == {2} and rank0 == rank1 and rank0[2][0] == 3
    # the server averaged site-1's update, weighted by the site's 6 cases, not a rank's 3
    per_site = {(r["round"], r["site"]): r for r in results.rounds if r["site"] != "mean"}
    assert (1, "site-1") in per_site and (0, "site-2") in per_site
    server = run / "nvflare" / algorithm / "server" / "simulate_job"
    rounds = [json.loads(line) for line in (server / "metrics" / "participation.jsonl").read_text().splitlines()]
    assert rounds[0]["failed"] == {"site-1": "FaultDrillError"}
    assert rounds[1]["weights"] == {"site-1": 0.5, "site-2": 0.5}  # 6 cases each (a rank's 3 would give 1/3)
    # cross-site evaluation (both ranks validate) scored site-1's model on site-1
    assert "site-1" in next(iter(results.cross_site.values()))
    assert not _followers_alive(run.resolve()), "a follower rank outlived the job"


def test_simulate_and_poc_say_how_many_devices_a_site_trains_on():
    from fedseg.cli import UserError, build_parser
    from fedseg.cli.simulate import site_group_settings

    assert site_group_settings(["site-1=a"], ["site-1=2", "site-2=1"]) == {
        "site-1": {"group": "a", "devices": 2}, "site-2": {"devices": 1}}
    for bad in ("site-1", "site-1=0", "site-1=two", "=2"):
        with pytest.raises(UserError, match="--site-devices takes SITE=N"):
            site_group_settings([], [bad])
    for command in (["simulate", "--out", "x"], ["poc", "--out", "x"]):
        args = build_parser().parse_args([*command, "--site-devices", "site-1=2"])
        assert args.site_devices == ["site-1=2"]
