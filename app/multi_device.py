"""A site that trains on several devices: Lightning's DDP, one process per device, one rank talking to NVFlare.

Design
------
- **The device count is a site setting**, ``devices`` in the site's ``fedseg_site.json``
  (``fedseg provision site-config --gpus N`` writes it), never a job setting: hardware differs per
  hospital, and one job folder serves them all. Default 1. On a GPU machine a device is a GPU; on a
  CPU-only machine it is a training process (gloo), at most one per CPU core.
- **The site starts its own ranks.** NVFlare runs the site in-process (``SiteExecutor``): that
  process is **rank 0**, the only one that receives tasks and sends results. Lightning's own DDP
  launcher would re-run ``sys.argv`` (NVFlare's client, not the site) or fork the NVFlare process,
  so it is not used: rank 0 starts ranks ``1..N-1`` itself as subprocesses
  (``python -m fedseg.app.multi_device``, the installed fedseg, the job's site document), opens the
  process group with them (``tcp://127.0.0.1:<free port>``), and every rank's Trainer uses
  ``DDPStrategy`` with a ``RankEnvironment``: a cluster environment whose processes were created
  externally, so Lightning launches nothing.
- **Every rank runs the same site code** (``SiteRunner``, the job's plug-ins, the Lightning patch).
  A follower rank (``rank > 0``) has no NVFlare connection: it registers ``FollowerClientAPI``,
  which refuses to receive or send, so NVFlare's ``FLCallback`` on that rank only takes part in
  the broadcasts of the received model and task kind (``trainer.strategy.broadcast``, src 0) and
  never sends.
- **Rank 0 tells the followers what to do.** Before each task that uses the DDP Trainer (``train``:
  validate the received model, then fit; cross-site ``validate``), rank 0 broadcasts a command with
  the task and the round; at the end of the job, ``stop``. Rank-0-only tasks (``submit_model``,
  ``personalize``) send no command; their validation runs with the metrics reduced over rank 0
  alone (``rank_zero_metrics``).
- **Data**: each rank trains on its shard of the site's training cases (``DistributedSampler``,
  the same seed on every rank, reshuffled per epoch) and validates a disjoint, unpadded shard of
  its validation cases; the Dice scores are one torchmetrics ``cat`` state, gathered over the ranks
  before they are averaged, so ``val_dice`` is the site's, not rank 0's shard's. The update's
  weight is the site's number of training cases (rank 0 counts them all).
- **What stays per site stays once**: FedPer's head, Ditto's personal model and the fine-tuned
  model are saved by rank 0 only (followers never run ``after_round``); the DDP ranks' models are
  identical after every optimizer step, and the model rank 0 sends is that model.
- **Failures**: a site whose config asks for more devices than it has (or more ranks than it has
  training or validation cases) stops at set-up, before any round, and answers every task with
  ``DeviceCountError`` (``answer_refused``). A follower that cannot set up is reported the same way.
  A ``train`` or ``validate`` task that fails at rank 0 while the followers were in it restarts
  the followers (new processes, a new process group) so no rank is left behind in a collective;
  rank 0's optimizer and schedule states travel to the new ranks with the next command.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from lightning_fabric.plugins.environments.cluster_environment import ClusterEnvironment

#: the site config's key: how many devices (GPUs, or CPU processes) the site trains on
DEVICES_KEY = "devices"
#: how long a rank waits in a collective for the others before it fails (a rank that died)
COLLECTIVE_TIMEOUT = timedelta(minutes=30)
#: how long rank 0 waits for the ranks it started to join the site's process group
RENDEZVOUS_TIMEOUT = timedelta(minutes=5)
STOP, TRAIN, VALIDATE = "stop", "train", "validate"


class DeviceCountError(RuntimeError):
    """The site config asks for more devices (or ranks) than this site can train on."""


def site_devices(extra: dict[str, Any], source: object = None) -> int:
    """The site config's ``devices`` (1 if absent); ``ValueError`` naming the file if malformed."""
    devices = extra.get(DEVICES_KEY, 1)
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise ValueError(f"{source}: '{DEVICES_KEY}' must be a whole number >= 1, got {devices!r}")
    return devices


def available_devices() -> tuple[int, str]:
    """How many devices this machine has, and what they are: visible GPUs, else CPU cores."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.device_count(), "GPU"
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1), "CPU core"


def check_devices(devices: int, n_train: int, n_val: int, source: object = None) -> None:
    """``DeviceCountError`` unless this site can train on ``devices`` ranks."""
    have, kind = available_devices()
    if devices > have:
        raise DeviceCountError(f"{source}: the site config asks for {devices} devices; this machine has {have} "
                               f"{kind}{'s' if have != 1 else ''}")
    if devices > 1 and (n_train < devices or n_val < devices):
        raise DeviceCountError(f"{source}: {devices} devices need at least {devices} training and {devices} "
                               f"validation cases (one each per rank); the site has {n_train} and {n_val}")


class RankEnvironment(ClusterEnvironment):
    """One rank of a site's DDP group, its processes started by the site (``creates_processes_externally``)."""

    def __init__(self, rank: int, world: int, address: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__()
        self.rank, self.world, self.address, self.port = rank, world, address, port

    @property
    def creates_processes_externally(self) -> bool:
        return True

    @property
    def main_address(self) -> str:
        return self.address

    @property
    def main_port(self) -> int:
        return self.port

    @staticmethod
    def detect() -> bool:
        return False

    def world_size(self) -> int:
        return self.world

    def set_world_size(self, size: int) -> None:
        pass  # fixed by the site

    def global_rank(self) -> int:
        return self.rank

    def set_global_rank(self, rank: int) -> None:
        pass  # fixed by the site

    def local_rank(self) -> int:
        return self.rank

    def node_rank(self) -> int:
        return 0


def backend() -> str:
    import torch

    return "nccl" if torch.cuda.is_available() else "gloo"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def open_group(env: RankEnvironment) -> Any:
    """Join the site's process group; returns the group of rank 0 alone (``rank_zero_metrics``)."""
    import torch
    import torch.distributed as dist

    if backend() == "nccl":  # each rank on its own GPU before any collective (NCCL's objects live there)
        torch.cuda.set_device(env.local_rank())
    # the ranks meet within RENDEZVOUS_TIMEOUT (a follower that died at start must not hold rank 0 for long)
    store = dist.TCPStore(env.address, env.port, env.world, is_master=env.rank == 0, timeout=RENDEZVOUS_TIMEOUT)
    dist.init_process_group(backend(), store=store, rank=env.rank, world_size=env.world, timeout=COLLECTIVE_TIMEOUT)
    return dist.new_group([0])  # every rank makes it, in the same order


def close_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_command(command: dict[str, Any] | None) -> dict[str, Any]:
    """Rank 0 sends ``command``; every other rank gets it."""
    import torch.distributed as dist

    box = [command]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextmanager
def rank_zero_metrics(model: Any, group: Any) -> Iterator[None]:
    """Validation at rank 0 alone (the ``personalize`` task): torchmetrics would otherwise gather over
    every rank of the site's group and wait for followers that are not validating."""
    from torchmetrics import Metric

    metrics = [m for m in model.modules() if isinstance(m, Metric)] if group is not None else []
    previous = [m.process_group for m in metrics]
    for m in metrics:
        m.process_group = group
    try:
        yield
    finally:
        for m, p in zip(metrics, previous):
            m.process_group = p


# ------------------------------------------------------------------------------ data


class ShardedData(pl.LightningDataModule):
    """One rank's share of a site's ``SegDataModule``: a ``DistributedSampler`` shard of the training
    cases (same seed on every rank, reshuffled each epoch) and a disjoint, unpadded shard of the
    validation cases (rank r: cases r, r + N, ...). For a Trainer with ``use_distributed_sampler=False``."""

    def __init__(self, data: Any, rank: int, world: int, seed: int) -> None:
        super().__init__()
        self.data, self.rank, self.world, self.seed = data, rank, world, seed

    @property
    def n_train_cases(self) -> int:
        """The site's, not the shard's: the update's weight."""
        return self.data.n_train_cases

    def setup(self, stage: str | None = None) -> None:
        self.data.setup(stage)

    def train_dataloader(self) -> Any:
        from monai.data import DataLoader
        from torch.utils.data import DistributedSampler

        full = self.data.train_dataloader()
        sampler = DistributedSampler(full.dataset, num_replicas=self.world, rank=self.rank, shuffle=True,
                                     seed=self.seed)
        # the site's loader's own generator: new augmentations every round (see SegDataModule._loader);
        # the shards' order comes from the sampler's seed, the same on every rank
        return DataLoader(full.dataset, batch_size=full.batch_size, sampler=sampler, num_workers=full.num_workers,
                          persistent_workers=full.num_workers > 0, pin_memory=full.pin_memory, generator=full.generator)

    def val_dataloader(self) -> Any:
        from monai.data import DataLoader
        from torch.utils.data import Subset

        full = self.data.val_dataloader()
        shard = Subset(full.dataset, list(range(self.rank, len(full.dataset), self.world)))
        return DataLoader(shard, batch_size=1, shuffle=False, num_workers=full.num_workers,
                          persistent_workers=full.num_workers > 0, pin_memory=full.pin_memory, generator=full.generator)


# ------------------------------------------------------------------------------ rank 0


def job_document(job: Any) -> dict[str, Any]:
    """The site document of ``job`` (a ``SiteJob``) as the followers read it."""
    return {"algorithm": job.algorithm, "options": job.options, "study": job.study.to_json(),
            "study_name": job.study_name, "contribution": job.contribution}


class SiteRanks:
    """Rank 0's side: start the followers, tell them each task, restart them after a failure, stop them."""

    def __init__(self, runner: Any, world: int) -> None:
        self.runner = runner
        self.world = world
        self.processes: list[subprocess.Popen] = []
        self.env: RankEnvironment | None = None
        self.solo: Any = None
        self.busy = False  # the followers are inside a task (a failure there restarts them)
        self.resend_state = False

    def start(self) -> RankEnvironment:
        if self.env is None:
            from nvflare.client.api import get_context

            keep_next_task(get_context().api)
        self.env = RankEnvironment(0, self.world, "127.0.0.1", free_port())
        document = json.dumps(job_document(self.runner.job), separators=(",", ":"))
        env = {**os.environ, "FEDSEG_SITE_CONFIG": str(self.runner.config.source)}
        for rank in range(1, self.world):
            argv = [sys.executable, "-m", "fedseg.app.multi_device", "--site", self.runner.site,
                    "--job-id", self.runner.job_id or "", "--rank", str(rank), "--world", str(self.world),
                    "--port", str(self.env.port), "--job-config", document]
            with open(Path.cwd() / f"rank-{rank}.log", "ab") as log:  # the site log stays rank 0's
                self.processes.append(subprocess.Popen(argv, env=env, cwd=os.getcwd(), stdout=log,
                                                       stderr=subprocess.STDOUT))
        self.solo = open_group(self.env)
        return self.env

    def wait_ready(self) -> None:
        """Every follower set up, or ``DeviceCountError`` naming what failed there (its log has the rest)."""
        import torch.distributed as dist

        status: list[Any] = [None] * self.world
        dist.all_gather_object(status, "")
        failed = {r: s for r, s in enumerate(status) if s}
        if failed:
            raise DeviceCountError(f"rank(s) {sorted(failed)} of this site could not set up: "
                                   + ", ".join(sorted(set(failed.values()))))

    def command(self, task: str, input_model: Any = None) -> None:
        """Tell the followers the task rank 0 starts now (with rank 0's optimizer state after a restart)."""
        command: dict[str, Any] = {"task": task}
        if input_model is not None:
            command.update(current_round=input_model.current_round, total_rounds=input_model.total_rounds)
        if self.resend_state:
            command["restore_state"] = restore_state_of(self.runner.trainer)
            self.resend_state = False
        self.busy = task != STOP
        broadcast_command(command)

    def done(self) -> None:
        self.busy = False

    def restart(self) -> None:
        """After a failed task the followers may wait in a collective that rank 0 left: new followers."""
        from pytorch_lightning.strategies import DDPStrategy

        self.kill()
        close_group()
        self.processes = []
        self.busy = False
        env = self.start()
        strategy = self.runner.trainer.strategy
        if isinstance(strategy, DDPStrategy):
            strategy.cluster_environment.port = env.port
        self.wait_ready()
        self.resend_state = True
        self.runner.solo_group = self.solo

    def close(self) -> None:
        """End of the job: the followers stop; any that does not is ended."""
        try:
            if not self.busy:
                self.command(STOP)
                deadline = time.time() + 60
                for p in self.processes:
                    p.wait(timeout=max(1.0, deadline - time.time()))
        except Exception:  # noqa: BLE001 - whatever happened, no follower outlives the job
            pass
        finally:
            self.kill()
            close_group()

    def kill(self) -> None:
        for p in self.processes:
            if p.poll() is None:
                p.kill()
                p.wait()


def keep_next_task(api: Any) -> None:
    """Let NVFlare's in-process Client API keep a task that arrives while the Lightning callback is
    still finishing the last one.

    ``FLCallback`` sends a result (``send(clear_cache=False)``) and only then clears the received
    model (``reset_state`` -> ``clear()``). The executor hands the next task over as soon as the
    result is out (``QuickResultHandoff``: within ~0.1 s); with several ranks, ``reset_state`` waits
    in a collective (Lightning counts the training batches over every rank) and the next task's
    model arrives before the clear, which then drops it: rank 0 would wait for ever for a task it
    was given. Here ``clear`` drops only the model that was answered; a newer one stays for the next
    ``receive``.
    """
    send, clear = api.send, api.clear
    answered: dict[str, Any] = {"model": None}

    def send_and_note(model: Any, clear_cache: bool = True) -> None:
        answered["model"] = api.fl_model
        send(model, clear_cache)

    def clear_answered() -> None:
        if api.fl_model is not None and api.fl_model is not answered["model"]:
            api.receive_called = False  # the next task is here: the runner's receive() takes it
            return
        clear()

    api.send, api.clear = send_and_note, clear_answered


def restore_state_of(trainer: Any) -> dict[str, Any] | None:
    from nvflare.app_opt.lightning.callbacks import RestoreState

    state = next((c for c in trainer.callbacks if isinstance(c, RestoreState)), None)
    if state is None:
        return None
    return {"optimizer_states": state.optimizer_states, "scaler_states": state.scaler_states,
            "lr_scheduler_states": state.lr_scheduler_states}


def set_restore_state(trainer: Any, doc: dict[str, Any] | None) -> None:
    from nvflare.app_opt.lightning.callbacks import RestoreState

    state = next((c for c in trainer.callbacks if isinstance(c, RestoreState)), None)
    if state is not None and doc is not None:
        state.optimizer_states = doc["optimizer_states"]
        state.scaler_states = doc["scaler_states"]
        state.lr_scheduler_states = doc["lr_scheduler_states"]


# ------------------------------------------------------------------------------ the followers


def follower_client_api() -> Any:
    """A Client API for a follower rank: NVFlare's Lightning callback initializes it and clears it
    after a round; receiving or sending from a follower is a bug."""
    from nvflare.client.in_process.api import InProcessClientAPI

    class FollowerClientAPI(InProcessClientAPI):
        def __init__(self) -> None:  # noqa: D107 - no NVFlare connection at all
            self.rank = None

        def init(self, rank: str | None = None, config: dict | None = None) -> None:
            self.rank = rank

        def get_config(self) -> dict:
            return {}

        def clear(self) -> None:
            pass

        def shutdown(self) -> None:
            pass

        def receive(self, timeout: float | None = None) -> Any:
            raise RuntimeError("a follower rank never receives from NVFlare (rank 0 broadcasts)")

        def send(self, model: Any, clear_cache: bool = True) -> None:
            raise RuntimeError("a follower rank never sends to NVFlare (rank 0 sends the site's update)")

        def log(self, *args: Any, **kwargs: Any) -> None:
            pass

    return FollowerClientAPI()


class RoundStub:
    """What a follower knows of the round rank 0 received (the plug-ins' and schedule's inputs)."""

    def __init__(self, command: dict[str, Any]) -> None:
        self.current_round = command.get("current_round")
        self.total_rounds = command.get("total_rounds")
        self.params: dict[str, Any] = {}


def follow(runner: Any) -> None:
    """A follower's loop: each command of rank 0 runs the same Trainer calls, until ``stop``."""
    from fedseg.app.protocol import model_fingerprint
    from fedseg.app.site_runner import progress

    while True:
        command = broadcast_command(None)
        task = command["task"]
        if task == STOP:
            return
        set_restore_state(runner.trainer, command.get("restore_state"))
        if task == TRAIN:
            stub = RoundStub(command)
            runner._continue_schedule(stub, f"round {(stub.current_round or 0) + 1}")
            for plugin in runner.plugins:
                plugin.before_fit(runner, (stub.current_round or 0) + 1)
            runner.trainer.validate(runner.model, datamodule=runner.trainer_data, verbose=False)
            steps = runner.trainer.global_step
            runner.trainer.fit(runner.model, datamodule=runner.trainer_data)
            progress(f"[fedseg] round {(stub.current_round or 0) + 1}/{stub.total_rounds} {runner.site}: rank "
                     f"{runner.trainer.global_rank} trained {runner.trainer.global_step - steps} steps on its shard; "
                     f"model {model_fingerprint(runner.model.state_dict())}")
        elif task == VALIDATE:
            runner.evaluate()


def main(argv: Sequence[str] | None = None) -> int:
    """A follower rank (started by rank 0's ``SiteRanks``)."""
    parser = argparse.ArgumentParser(description="fedseg: one follower rank of a multi-device site")
    parser.add_argument("--site", required=True)
    parser.add_argument("--job-id", default="")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--address", default="127.0.0.1")
    parser.add_argument("--job-config", required=True)
    args = parser.parse_args(argv)

    from nvflare.client.api_spec import CLIENT_API_KEY
    from nvflare.fuel.data_event.data_bus import DataBus

    from fedseg.app.site_runner import SiteJob, SiteRunner, progress

    DataBus().put_data(CLIENT_API_KEY, follower_client_api())
    env = RankEnvironment(args.rank, args.world, args.address, args.port)
    solo = open_group(env)
    runner = SiteRunner(SiteJob.from_document(json.loads(args.job_config)), args.site, job_id=args.job_id or None,
                        ranks=env)
    runner.solo_group = solo
    import torch.distributed as dist

    try:
        runner.setup()
        status = ""
    except Exception as err:  # noqa: BLE001 - reported to rank 0, which stops the site
        import traceback

        traceback.print_exc()
        status = type(err).__name__
    dist.all_gather_object([None] * args.world, status)
    if status:
        close_group()
        return 1
    progress(f"[fedseg] {args.site}: rank {args.rank}/{args.world} ready")
    try:
        follow(runner)
    finally:
        close_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
