"""Training throughput of SegmentationModule under a Lightning Trainer vs a plain PyTorch loop.

Both loops train the same network (fresh copies of one initialisation), on the same in-memory
batches (one ``DataLoader`` over a list of dict items, as ``SegDataModule`` yields them), with the
same Dice + BCE loss (``SegmentationModule.loss``) and AdamW settings. The Lightning side is
``Trainer.fit`` configured as fedseg's ``make_trainer`` configures it (no logger, no checkpointing,
no progress bar, fp32), so its cost includes ``training_step``'s ``self.log`` and the loop's hooks.
The plain side is ``zero_grad / forward / loss / backward / step``.

Many short rounds alternate the order (Lightning first, then plain first, ...) so that drifting
machine load hits both alike. Per loop and round, the first ``--warmup`` steps are not timed; then
each step is timed from the start of one batch to the start of the next (so data fetching and every
hook in between count). Reported: voxels/s of both loops from the median step time (robust to
spikes from other processes on a shared machine) and from the mean; the **paired** ratio (each
round's Lightning median step against the plain one run right beside it; the median over rounds
is the headline number, its spread shows the noise); and ``Trainer.fit``'s fixed start-up and
tear-down time, paid once per ``fit`` call (in NVFlare, once per round and site).

Lightning's cost is about constant per step, so its share shrinks as steps grow: a run with tiny
steps (``--roi 16 --features 4 --steps 60``) measures that constant with little noise; divide it by
the step time of a real configuration.

    .venv/bin/python bench/bench_lightning.py                 # CPU, ~1 min on 2 cores
    .venv/bin/python bench/bench_lightning.py --device cuda --roi 128 --features 16
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import time
import warnings
from dataclasses import dataclass

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from fedseg.lightning_modules.module import SegmentationModule


Mark = tuple[float, float]  # (wall seconds, process CPU seconds)


def mark(device: torch.device) -> Mark:
    """Now, after the device's queued work: wall clock and this process's CPU time."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter(), time.process_time()


@dataclass
class LoopTiming:
    """One run of one loop: wall and CPU seconds of each timed step, and fixed costs."""

    wall: list[float]
    cpu: list[float]
    fixed_seconds: float = 0.0  # Lightning: fit() time outside the steps (setup, teardown)

    @classmethod
    def from_marks(cls, marks: list[Mark], warmup: int, fixed_seconds: float = 0.0) -> LoopTiming:
        """Step ``i`` lasts from mark ``i`` to mark ``i + 1``; the first ``warmup`` steps are dropped."""
        pairs = list(zip(marks[warmup:-1], marks[warmup + 1 :]))
        return cls([b[0] - a[0] for a, b in pairs], [b[1] - a[1] for a, b in pairs], fixed_seconds)


def make_batches(n: int, batch: int, channels: int, roi: int, seed: int = 0) -> list[dict]:
    """``n * batch`` items like SegDataModule's training crops: image (C, *roi), label regions (3, *roi)."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n * batch):
        image = torch.randn((channels, roi, roi, roi), generator=g)
        # nested regions ET in TC in WT, from smooth blobs of the first channel
        blob = torch.nn.functional.avg_pool3d(image[:1][None], 5, stride=1, padding=2)[0, 0]
        wt = blob > 0.15
        tc = wt & (blob > 0.25)
        et = tc & (blob > 0.35)
        items.append({"image": image, "label": torch.stack([et, tc, wt]).float(), "case_id": f"case{i}"})
    return items


class StepTimer(pl.Callback):
    """Marks the start of every training batch, and the end of the last one."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.marks: list[Mark] = []
        self.last_end: Mark = (0.0, 0.0)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.marks.append(mark(self.device))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.last_end = mark(self.device)


def run_lightning(module: SegmentationModule, loader: DataLoader, warmup: int, device: torch.device) -> LoopTiming:
    """``Trainer.fit`` for one epoch over ``loader``, set up as fedseg's ``make_trainer`` (fp32)."""
    timer = StepTimer(device)
    trainer = pl.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        max_epochs=1,
        precision="32-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[timer],
    )
    start = mark(device)
    trainer.fit(module, train_dataloaders=loader)
    end = mark(device)
    in_steps = timer.last_end[0] - timer.marks[0][0]  # warm-up and timed steps
    return LoopTiming.from_marks([*timer.marks, timer.last_end], warmup, (end[0] - start[0]) - in_steps)


def run_plain(module: SegmentationModule, loader: DataLoader, warmup: int, device: torch.device) -> LoopTiming:
    """The same steps by hand: forward, loss, zero_grad, backward, AdamW step."""
    module.to(device).train()
    h = module.hparams
    optimizer = torch.optim.AdamW(module.parameters(), lr=h.lr, weight_decay=h.weight_decay)
    marks = []
    for batch in loader:
        marks.append(mark(device))
        image = batch["image"].to(device, non_blocking=True)
        label = batch["label"].to(device, non_blocking=True)
        loss = module.loss(module.network(image), label)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    marks.append(mark(device))
    return LoopTiming.from_marks(marks, warmup)


def paired_ratios(lightning: list[LoopTiming], plain: list[LoopTiming], clock: str) -> list[float]:
    """Per round: plain median step / Lightning median step (= Lightning's relative throughput)."""
    return sorted(
        statistics.median(getattr(p, clock)) / statistics.median(getattr(lt, clock)) for lt, p in zip(lightning, plain)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--network", default="unet")
    parser.add_argument("--features", type=int, default=8)
    parser.add_argument("--roi", type=int, default=64, help="cubic crop size (default 64)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per loop and round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    parser.add_argument("--rounds", type=int, default=12, help="alternating rounds of both loops")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA GPU")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    logging.getLogger("lightning_fabric").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*(does not have many workers|val_dataloader|validation_step).*")

    n = args.warmup + args.steps
    items = make_batches(n, args.batch_size, 4, args.roi)
    loader = DataLoader(
        items, batch_size=args.batch_size, shuffle=False, num_workers=0, pin_memory=device.type == "cuda"
    )
    torch.manual_seed(0)
    initial = SegmentationModule(
        network=args.network, in_channels=4, features=args.features, roi_size=(args.roi,) * 3, hd95=False, max_epochs=1
    )
    voxels_per_step = args.batch_size * args.roi**3
    print(
        f"{args.network} features={args.features}, batch {args.batch_size} x 4 x {args.roi}^3 "
        f"({voxels_per_step} voxels/step), {args.device}, {torch.get_num_threads()} threads; "
        f"{args.rounds} rounds x ({args.warmup} warm-up + {args.steps} timed steps) per loop"
    )
    results: dict[str, list[LoopTiming]] = {"lightning": [], "plain": []}
    runners = {"lightning": run_lightning, "plain": run_plain}
    started = time.perf_counter()
    for r in range(args.rounds):
        order = ("lightning", "plain") if r % 2 == 0 else ("plain", "lightning")
        for name in order:
            timing = runners[name](copy.deepcopy(initial), loader, args.warmup, device)
            results[name].append(timing)
            step = statistics.median(timing.wall)
            print(
                f"  round {r + 1:>2} {name:<9}: median step {1000 * step:7.1f} ms wall, "
                f"{1000 * statistics.median(timing.cpu):7.1f} ms CPU; {voxels_per_step / step / 1e6:6.2f} Mvox/s",
                flush=True,
            )

    lit, plain = results["lightning"], results["plain"]
    print(f"\nall timed steps ({time.perf_counter() - started:.0f} s in all), voxels/s:")
    print(f"{'':<24}{'Lightning':>11}{'plain':>11}{'ratio':>8}{'overhead':>10}")
    for label, clock, how in (
        ("median step, wall", "wall", statistics.median),
        ("mean step, wall", "wall", statistics.fmean),
        ("median step, CPU time", "cpu", statistics.median),
    ):
        v_lit = voxels_per_step / how([s for t in lit for s in getattr(t, clock)])
        v_plain = voxels_per_step / how([s for t in plain for s in getattr(t, clock)])
        print(f"{label:<24}{v_lit:>11.4g}{v_plain:>11.4g}{v_lit / v_plain:>8.3f}{100 * (1 - v_lit / v_plain):>9.1f}%")
    # paired: each round's two loops ran back to back, under about the same machine load
    for clock in ("wall", "cpu"):
        paired = paired_ratios(lit, plain, clock)
        ratio = statistics.median(paired)
        q1, _, q3 = statistics.quantiles(paired, n=4) if len(paired) > 1 else (ratio, ratio, ratio)
        print(
            f"paired Lightning/plain throughput ({clock:>4}): median {ratio:.3f} (overhead {100 * (1 - ratio):+.1f}%), "
            f"quartiles {q1:.3f}-{q3:.3f}, {len(paired)} rounds"
        )
    added = statistics.median(statistics.median(lt.wall) - statistics.median(p.wall) for lt, p in zip(lit, plain))
    print(f"Lightning adds {1000 * added:+.2f} ms per step (median over rounds of the paired median-step difference)")
    fixed = statistics.median(t.fixed_seconds for t in lit)
    print(f"Trainer.fit fixed cost outside the steps (setup + teardown): {fixed:.3f} s per fit() call (median)")


if __name__ == "__main__":
    main()
