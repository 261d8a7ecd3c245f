"""Training-step speed at study scale: Lightning vs plain loop, fp32 vs bf16 / channels-last / compile.

The study network (``fedseg.config.profile("study")``: the 16-feature U-Net, batch 2 of 4 x 128³
crops, AdamW with the study's lr and weight decay) trains on in-memory synthetic batches under
two loops and several variants, every one starting from the same initial weights (the batches are
placed on the device beforehand, so no host-to-device copy is timed; the loops' ``.to(device)`` is
then a no-op):

* loops: ``lightning`` - fedseg's ``SegmentationModule`` under ``Trainer.fit``, the Trainer built by
  fedseg's own ``make_trainer`` with only ``precision`` replaced by the variant's (no checkpointing,
  no validation); ``plain`` - ``forward / DiceBCE loss / zero_grad / backward / AdamW step`` by hand
  on a copy of the same module's network and loss.
* variants, written as ``+``-joined flags (``fp32`` = none): ``bf16`` autocast
  (``torch.autocast(device, dtype=torch.bfloat16)``; Lightning ``precision="bf16-mixed"``), ``fp16``
  autocast with a GradScaler (Lightning ``"16-mixed"``, what ``make_trainer`` uses on a GPU today),
  ``cl3d`` (model and inputs in ``torch.channels_last_3d``), ``compile`` (``torch.compile``, default
  mode, of the network: ``module.network.compile()`` in both loops; the loss stays eager). E.g.
  ``--variants fp32 bf16 bf16+cl3d+compile``. A variant that fails (compile on CPU may) is reported
  as ``failed: <reason>``, not fatal; ``--compile-timeout`` bounds its first (compiling) step.
  (Lightning's own route, ``trainer.fit(torch.compile(module))``, compiles ``training_step`` with
  its ``self.log`` and fails on torch 2.12/2.13 with PL <= 2.6.6: Lightning-AI/pytorch-lightning#21836.)

Timing is interleaved: each of ``--rounds`` rounds runs every (variant, loop) for ``--warmup``
untimed + ``--steps`` timed steps, in reversed order every other round; the models and optimizers
live on across rounds (compilation happens once, in round 1's first step, reported as "1st step";
inductor caches compiled code on disk, so a second run compiles faster: point
``TORCHINDUCTOR_CACHE_DIR`` at an empty folder for a cold compile). A step lasts from the start of
one batch to the start of the next (the device synchronised). Reported: median step time; ratios
from medians of the **same round** (so load drift on a shared machine hits both sides): each config
against the plain fp32 loop and Lightning against plain per variant, median over rounds; the same
ratios from each config's fastest step ("best": on a shared machine whose load comes in bursts, the
undisturbed speed); on CPU all of it from process CPU time too (a step descheduled by another
process costs wall time, not CPU time); with ``--peak-tflops`` the achieved FLOP/s (FLOPs of one
step counted with ``torch.utils.flop_counter.FlopCounterMode`` on the meta device) as a fraction of
that peak. On a CPU shared with other work, 2 OpenMP threads can slow down many-fold whenever the
other work wants the cores too; ``--threads 1`` is steadier (and slower).
Correctness: the loss of the first step (initial weights) and of the second (after one AdamW step)
of every config against the plain fp32 loop's, within a tolerance (looser for bf16/fp16).

    .venv/bin/python bench/bench_step.py --quick                      # CPU, 64³: ~40 s (+1 min cold compile)
    .venv/bin/python bench/bench_step.py --quick --variants fp32 bf16 # skip cl3d and compile
    .venv/bin/python bench/bench_step.py --rounds 3                   # CPU, study scale 128³: ~3-4 min
    .venv/bin/python bench/bench_step.py --device cuda --steps 10 --warmup 3 --rounds 3 --peak-tflops 790
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import signal
import statistics
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from fedseg.config import StudyConfig, profile
from fedseg.lightning_modules.module import SegmentationModule
from fedseg.lightning_modules.training import make_trainer

FLAGS: tuple[str, ...] = ("bf16", "fp16", "cl3d", "compile")
DEFAULT_VARIANTS = {"cpu": ["fp32", "bf16", "cl3d", "compile"],
                    "cuda": ["fp32", "fp16", "bf16", "cl3d", "compile", "bf16+cl3d+compile"]}
LOOPS: tuple[str, ...] = ("plain", "lightning")
#: relative loss difference to the plain fp32 loop accepted as "the same" (fp32 maths / mixed precision)
TOLERANCE = {"fp32": 1e-3, "mixed": 3e-2}
#: round-1 losses kept per config (step 1: initial weights; step 2: after one optimizer step)
LOSS_STEPS = 2


# --------------------------------------------------------------------------------------------
# variants


@dataclass(frozen=True)
class Variant:
    """A set of flags from ``FLAGS``; its name is ``fp32`` (none) or the flags joined by ``+``."""

    flags: frozenset[str]

    @classmethod
    def parse(cls, text: str) -> Variant:
        flags = frozenset() if text == "fp32" else frozenset(text.split("+"))
        unknown = flags - set(FLAGS)
        if unknown or {"bf16", "fp16"} <= flags:
            raise ValueError(f"variant {text!r}: give fp32 or distinct flags of {', '.join(FLAGS)} "
                             "(not bf16 with fp16)")
        return cls(flags)

    @property
    def name(self) -> str:
        return "+".join(f for f in FLAGS if f in self.flags) or "fp32"

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return torch.bfloat16 if "bf16" in self.flags else torch.float16 if "fp16" in self.flags else None

    @property
    def precision(self) -> str:
        """Lightning's ``precision`` for this variant."""
        return {torch.bfloat16: "bf16-mixed", torch.float16: "16-mixed", None: "32-true"}[self.autocast_dtype]

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last_3d if "cl3d" in self.flags else torch.contiguous_format

    @property
    def tolerance(self) -> float:
        return TOLERANCE["fp32" if self.autocast_dtype is None else "mixed"]


FP32 = Variant(frozenset())


# --------------------------------------------------------------------------------------------
# timing helpers


Mark = tuple[float, float]  # (wall seconds, this process's CPU seconds)
Batches = list[dict[str, torch.Tensor]]
CLOCKS: tuple[str, ...] = ("wall", "cpu")


def now(device: torch.device) -> Mark:
    """Wall clock and process CPU time, after the device's queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter(), time.process_time()


def step_times(marks: list[Mark], clock: int) -> list[float]:
    """Step ``i`` lasts from mark ``i`` to mark ``i + 1`` (``clock`` 0: wall, 1: CPU)."""
    return [b[clock] - a[clock] for a, b in zip(marks, marks[1:])]


@contextlib.contextmanager
def deadline(seconds: int | None) -> Iterator[None]:
    """Raise ``TimeoutError`` in this (main) thread after ``seconds``, and again every second after
    (torch's compiler swallows some exceptions and carries on), until ``disarm()`` or the end."""
    if not seconds:
        yield
        return

    def on_alarm(signum: int, frame: Any) -> None:
        raise TimeoutError(f"first step not done within --compile-timeout {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds, 1.0)
    try:
        yield
    finally:
        disarm()
        signal.signal(signal.SIGALRM, previous)


def disarm() -> None:
    """Cancel a pending ``deadline`` (no-op when none is set)."""
    signal.setitimer(signal.ITIMER_REAL, 0)


def failure(err: BaseException) -> str:
    first = (str(err).strip().splitlines() or [""])[0]
    return f"failed: {type(err).__name__}: {first[:160]}"


# --------------------------------------------------------------------------------------------
# data


def make_batches(n: int, batch_size: int, channels: int, roi: int, seed: int = 0) -> Batches:
    """``n`` collated batches like ``SegDataModule``'s training crops: ``image`` (B, C, *roi) float,
    ``label`` (B, 3, *roi) nested regions ET in TC in WT (from smooth blobs of the first channel)."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        image = torch.randn((batch_size, channels, roi, roi, roi), generator=g)
        blob = torch.nn.functional.avg_pool3d(image[:, :1], 5, stride=1, padding=2)[:, 0]
        wt = blob > 0.15
        tc = wt & (blob > 0.25)
        et = tc & (blob > 0.35)
        batches.append({"image": image, "label": torch.stack([et, tc, wt], dim=1).float()})
    return batches


def placed(batches: Batches, fmt: torch.memory_format, device: torch.device) -> Batches:
    """The batches on ``device`` with their tensors in memory format ``fmt``."""
    return [{k: v.to(device).contiguous(memory_format=fmt) for k, v in b.items()} for b in batches]


# --------------------------------------------------------------------------------------------
# the two loops


@dataclass
class Config:
    """One (variant, loop): its state lives across rounds; timed step seconds are kept per round and clock."""

    variant: Variant
    loop: str
    rounds: dict[str, list[list[float]]] = field(default_factory=lambda: {c: [] for c in CLOCKS})
    losses: list[float] = field(default_factory=list)
    first_step: float | None = None  # round 1's first step (includes compilation)
    peak_bytes: int | None = None
    failed: str | None = None
    state: Any = None

    @property
    def label(self) -> str:
        return f"{self.variant.name}/{self.loop}"

    def median(self, clock: str = "wall") -> float:
        return statistics.median(s for r in self.rounds[clock] for s in r)

    def best(self, clock: str = "wall") -> float:
        return min(s for r in self.rounds[clock] for s in r)


def fresh_module(initial: SegmentationModule, variant: Variant, device: torch.device) -> SegmentationModule:
    """A copy of the initial module on ``device`` in the variant's memory format, in train mode,
    its network compiled (in place: same parameters and state_dict keys) for ``compile``."""
    module = copy.deepcopy(initial).to(device=device, memory_format=variant.memory_format).train()
    if "compile" in variant.flags:
        module.network.compile()  # compiles lazily, on the first step
    return module


@dataclass
class PlainState:
    module: SegmentationModule
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None


def plain_state(initial: SegmentationModule, variant: Variant, device: torch.device) -> PlainState:
    module = fresh_module(initial, variant, device)
    h = module.hparams
    optimizer = torch.optim.AdamW(module.parameters(), lr=h.lr, weight_decay=h.weight_decay)
    scaler = torch.amp.GradScaler(device.type) if variant.autocast_dtype == torch.float16 else None
    return PlainState(module, optimizer, scaler)


def run_plain(cfg: Config, batches: Batches, device: torch.device) -> tuple[list[Mark], list[float]]:
    """Step marks and losses of one pass over ``batches``: forward + loss (under autocast), backward, AdamW."""
    s: PlainState = cfg.state
    dtype = cfg.variant.autocast_dtype
    marks, losses = [], []
    for batch in batches:
        marks.append(now(device))
        image = batch["image"].to(device, non_blocking=True)
        label = batch["label"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = s.module.loss(s.module.network(image), label)
        s.optimizer.zero_grad(set_to_none=True)
        if s.scaler is not None:
            s.scaler.scale(loss).backward()
            s.scaler.step(s.optimizer)
            s.scaler.update()
        else:
            loss.backward()
            s.optimizer.step()
        losses.append(loss.detach())
        disarm()
    marks.append(now(device))
    return marks, [float(x) for x in losses]


class StepMarks(pl.Callback):
    """Marks the start of every training batch and the end of the last one; keeps the losses."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.marks: list[Mark] = []
        self.end: Mark = (0.0, 0.0)
        self.losses: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.marks.append(now(self.device))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.losses.append((outputs["loss"] if isinstance(outputs, dict) else outputs).detach())
        self.end = now(self.device)
        disarm()


def bench_trainer(precision: str, device: torch.device, root: Path, callbacks: list[pl.Callback]) -> pl.Trainer:
    """fedseg's ``make_trainer`` (one epoch, no progress bar), with only ``precision`` replaced by
    the variant's; no checkpoints and no validation, as only the training steps are measured."""
    real_trainer = pl.Trainer

    def trainer_with_precision(**kwargs: Any) -> pl.Trainer:
        return real_trainer(**{**kwargs, "precision": precision})

    with mock.patch.object(pl, "Trainer", trainer_with_precision):
        return make_trainer(
            root, 1, accelerator="gpu" if device.type == "cuda" else "cpu", callbacks=callbacks, progress=False,
            enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0,
        )


def run_lightning(cfg: Config, batches: Batches, device: torch.device) -> tuple[list[Mark], list[float]]:
    """Step marks and losses of ``Trainer.fit`` for one epoch over ``batches``."""
    marks = StepMarks(device)
    loader = DataLoader(batches, batch_size=None, shuffle=False, num_workers=0)  # yields the batches as they are
    with tempfile.TemporaryDirectory(prefix="bench_step_") as root:
        trainer = bench_trainer(cfg.variant.precision, device, Path(root), [marks])
        trainer.fit(cfg.state, train_dataloaders=loader)
    return [*marks.marks, marks.end], [float(x) for x in marks.losses]


RUNNERS = {"plain": run_plain, "lightning": run_lightning}


def setup(cfg: Config, initial: SegmentationModule, device: torch.device) -> None:
    if cfg.loop == "plain":
        cfg.state = plain_state(initial, cfg.variant, device)
    else:
        cfg.state = fresh_module(initial, cfg.variant, device)


def run_round(cfg: Config, batches: Batches, warmup: int, device: torch.device,
              first_round: bool, compile_timeout: int) -> None:
    """One pass of ``warmup + steps`` batches; records timed steps (and round 1's losses and first step)."""
    if cfg.failed:
        return
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timeout = compile_timeout if first_round and "compile" in cfg.variant.flags else None
    try:
        with deadline(timeout):
            marks, losses = RUNNERS[cfg.loop](cfg, batches, device)
    except Exception as err:  # compile on CPU, or bf16/fp16 kernels a device lacks
        disarm()
        cfg.failed = failure(err)
        cfg.state = None
        return
    for i, clock in enumerate(CLOCKS):
        cfg.rounds[clock].append(step_times(marks, i)[warmup:])
    if first_round:
        cfg.first_step, cfg.losses = step_times(marks, 0)[0], losses[:LOSS_STEPS]
    if device.type == "cuda":
        cfg.peak_bytes = max(cfg.peak_bytes or 0, torch.cuda.max_memory_allocated(device))


# --------------------------------------------------------------------------------------------
# FLOPs and report


def step_flops(initial: SegmentationModule, batch: dict[str, torch.Tensor]) -> int:
    """FLOPs of one forward + backward (``FlopCounterMode``; on the meta device, so nothing is computed)."""
    module = copy.deepcopy(initial).to("meta").train()
    image, label = (torch.empty_like(batch[k], device="meta") for k in ("image", "label"))
    with FlopCounterMode(display=False) as counter:
        module.loss(module.network(image), label).backward()
    return counter.get_total_flops()


def paired(cfg: Config, ref: Config, clock: str = "wall") -> float | None:
    """Median over rounds of (cfg's median step / ref's median step in the same round)."""
    if cfg.failed or ref.failed or not cfg.rounds[clock]:
        return None
    pairs = zip(cfg.rounds[clock], ref.rounds[clock])
    return statistics.median(statistics.median(a) / statistics.median(b) for a, b in pairs)


def best_ratio(cfg: Config, ref: Config, clock: str = "wall") -> float | None:
    """cfg's fastest step / ref's fastest step: the ratio when neither was disturbed."""
    if cfg.failed or ref.failed or not cfg.rounds[clock]:
        return None
    return cfg.best(clock) / ref.best(clock)


def fmt(value: float | None, spec: str, width: int) -> str:
    return f"{'-' if value is None else format(value, spec):>{width}}"


def print_timings(variants: list[Variant], configs: dict[tuple[str, str], Config], flops: int,
                  peak_tflops: float | None, device: torch.device, clock: str = "wall") -> None:
    """One row per config: median and best step, the ratios of both, FLOP/s (from the median).

    ``clock="cpu"``: the same from process CPU time (on a shared CPU a step descheduled by another
    process costs wall time but no CPU time; spinning OpenMP threads still cost CPU time)."""
    base = configs[("fp32", "plain")]
    head = (f"{'variant':<20}{'loop':<10}{'median ms':>10}{'best ms':>9}{'1st step s':>11}"
            f"{'÷ plain fp32':>13}{'(best)':>8}{'Lightning÷plain':>16}{'(best)':>8}")
    if clock == "wall":
        head += f"{'TFLOP/s':>9}" + (f"{'% peak':>8}" if peak_tflops else "")
        head += f"{'peak GiB':>9}" if device.type == "cuda" else ""
    print(head)
    for v in variants:
        plain = configs[(v.name, "plain")]
        for loop in LOOPS:
            c = configs[(v.name, loop)]
            if c.failed:
                print(f"{v.name:<20}{loop:<10}  {c.failed}")
                continue
            lightning = loop == "lightning"
            row = (f"{v.name:<20}{loop:<10}{1000 * c.median(clock):>10.1f}{1000 * c.best(clock):>9.1f}"
                   f"{fmt(c.first_step if clock == 'wall' else None, '.2f', 11)}"
                   f"{fmt(paired(c, base, clock), '.3f', 13)}{fmt(best_ratio(c, base, clock), '.3f', 8)}"
                   f"{fmt(paired(c, plain, clock) if lightning else None, '.3f', 16)}"
                   f"{fmt(best_ratio(c, plain, clock) if lightning else None, '.3f', 8)}")
            if clock == "wall":
                tflops = flops / c.median() / 1e12
                row += f"{tflops:>9.3g}" + (f"{100 * tflops / peak_tflops:>7.2f}%" if peak_tflops else "")
                row += fmt(c.peak_bytes / 2**30 if c.peak_bytes else None, ".2f", 9) if device.type == "cuda" else ""
            print(row)


def print_losses(variants: list[Variant], configs: dict[tuple[str, str], Config]) -> bool:
    """Losses of steps 1 and 2 against the plain fp32 loop's; returns whether all agree."""
    ref = configs[("fp32", "plain")].losses
    print(f"{'variant':<20}{'loop':<10}{'loss step 1':>12}{'loss step 2':>12}{'rel diff 1':>11}{'rel diff 2':>11}"
          f"{'tol':>8}  ok")
    all_ok = True
    for v in variants:
        for loop in LOOPS:
            c = configs[(v.name, loop)]
            if c.failed or len(c.losses) < LOSS_STEPS or len(ref) < LOSS_STEPS:
                print(f"{v.name:<20}{loop:<10}{'(no losses)':>12}")
                continue
            diffs = [abs(a - b) / abs(b) for a, b in zip(c.losses, ref)]
            ok = all(d <= v.tolerance for d in diffs)
            all_ok &= ok
            print(f"{v.name:<20}{loop:<10}{c.losses[0]:>12.6f}{c.losses[1]:>12.6f}{diffs[0]:>11.2e}{diffs[1]:>11.2e}"
                  f"{v.tolerance:>8.0e}  {'ok' if ok else 'MISMATCH'}")
    return all_ok


# --------------------------------------------------------------------------------------------


def parse_args(study: StudyConfig) -> argparse.Namespace:
    m, d = study.model, study.data
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--network", default=m.network, help=f"default: the study's ({m.network})")
    parser.add_argument("--features", type=int, default=m.features, help=f"default: the study's ({m.features})")
    parser.add_argument("--roi", type=int, default=None,
                        help=f"cubic crop size (default: the study's {d.roi[0]}; 64 with --quick)")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help=f"default: the study's ({d.batch_size})")
    parser.add_argument("--quick", action="store_true", help="64³ crops (a CPU run in a few minutes)")
    parser.add_argument("--variants", nargs="+", default=None,
                        help=f"fp32 or +-joined flags of {', '.join(FLAGS)} "
                             f"(default: {' '.join(DEFAULT_VARIANTS['cpu'])}"
                             f" on cpu; {' '.join(DEFAULT_VARIANTS['cuda'])} on cuda)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per config and round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before them (>= 1)")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds over all configs")
    parser.add_argument("--compile-timeout", type=int, default=300, help="seconds for a compile variant's first step")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the chip's peak dense bf16 TFLOP/s (H100 SXM 989; 790 as measured on H200)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA GPU")
    if args.warmup < 1 or args.steps < 1 or args.rounds < 1:
        parser.error("--warmup, --steps and --rounds must be >= 1")
    args.roi = args.roi or (64 if args.quick else d.roi[0])
    try:
        args.variants = [Variant.parse(v) for v in args.variants or DEFAULT_VARIANTS[args.device]]
    except ValueError as err:
        parser.error(str(err))
    if FP32 not in args.variants:  # the reference of every ratio and loss check
        args.variants.insert(0, FP32)
    return args


def quiet() -> None:
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    logging.getLogger("lightning_fabric").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*(does not have many workers|val_dataloader|validation_step"
                                               "|smaller than the logging interval|GradScaler is enabled|LeafSpec).*")
    # every compile config compiles the same code objects with different modules / autocast state
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)


def main() -> None:
    study = profile("study")
    args = parse_args(study)
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet()
    device = torch.device(args.device)
    args_study = study.override(network=args.network, features=args.features, roi=(args.roi,) * 3)
    initial = SegmentationModule(**{**args_study.module_args(), "hd95": False, "max_epochs": 1})
    channels = initial.hparams.in_channels
    batches = make_batches(2, args.batch_size, channels, args.roi)  # two distinct batches, cycled
    flops = step_flops(initial, batches[0])
    per_round = {}  # memory format -> the batches of one round in it
    for memory_format in {v.memory_format for v in args.variants}:
        distinct = placed(batches, memory_format, device)
        per_round[memory_format] = [distinct[i % len(distinct)] for i in range(args.warmup + args.steps)]

    configs = {(v.name, loop): Config(v, loop) for v in args.variants for loop in LOOPS}
    for cfg in configs.values():
        setup(cfg, initial, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"{args.network} features={args.features}, batch {args.batch_size} x {channels} x {args.roi}³, {name}; "
          f"torch {torch.__version__}, Lightning {pl.__version__}")
    print(f"{len(configs)} configs x {args.rounds} rounds x ({args.warmup} warm-up + {args.steps} timed steps); "
          f"{flops / 1e9:.1f} GFLOP per step (forward + backward, FlopCounterMode)")

    started = time.perf_counter()
    order = list(configs.values())
    for r in range(args.rounds):
        for cfg in order if r % 2 == 0 else order[::-1]:
            run_round(cfg, per_round[cfg.variant.memory_format], args.warmup, device, r == 0, args.compile_timeout)
            status = cfg.failed or f"median {1000 * statistics.median(cfg.rounds['wall'][-1]):.1f} ms"
            print(f"  round {r + 1} {cfg.label:<28} {status}", flush=True)

    print(f"\nstep times, wall clock ({time.perf_counter() - started:.0f} s in all). Ratios: '÷' columns from "
          f"same-round medians, median over rounds; '(best)' from the fastest steps; < 1 = faster:")
    print_timings(args.variants, configs, flops, args.peak_tflops, device)
    if device.type == "cpu":
        print("\nstep times, process CPU time:")
        print_timings(args.variants, configs, flops, args.peak_tflops, device, clock="cpu")
    print("\nlosses against the plain fp32 loop (step 1: initial weights; step 2: after one AdamW step):")
    if not print_losses(args.variants, configs):
        print("WARNING: some variant's loss differs from fp32 beyond its tolerance")


if __name__ == "__main__":
    main()
