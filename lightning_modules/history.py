"""Per-epoch metrics of a run as one CSV row each, kept across resumes, and their plot.

Lightning's ``CSVLogger`` writes train and validation metrics as separate half-empty rows and
deletes earlier rows when a run resumes into the same folder; a run folder needs one complete row
per epoch that survives a crash, so this small callback writes ``metrics.csv`` itself.
"""

from __future__ import annotations

import csv
import io
import os
import tempfile
from pathlib import Path
from typing import Any

import pytorch_lightning as pl


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` through a temporary file and a rename (readers never see half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_rows(path: Path | str) -> list[dict[str, Any]]:
    """Rows of a metrics CSV with numbers parsed (empty cells dropped)."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    with path.open() as f:
        for raw in csv.DictReader(f):
            rows.append({k: _number(v) for k, v in raw.items() if v not in ("", None)})
    return rows


def write_rows(path: Path | str, rows: list[dict[str, Any]], first: tuple[str, ...] = ("epoch",)) -> None:
    """Write rows (union of their keys; ``first`` columns lead) as CSV, atomically."""
    keys = sorted({k for row in rows for k in row} - set(first))
    columns = [k for k in first if any(k in row for row in rows)] + keys
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(Path(path), buf.getvalue())


def _number(value: str) -> Any:
    try:
        number = float(value)
    except ValueError:
        return value
    return int(number) if number.is_integer() and "." not in value and "e" not in value else number


class MetricsHistory(pl.Callback):
    """Appends ``{epoch, <every logged metric>}`` to ``path`` at the end of each training epoch.

    On resume, rows of epochs that are being redone are dropped and the earlier ones kept.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        epoch = trainer.current_epoch
        row = {"epoch": epoch, "step": trainer.global_step}
        row.update({k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1})
        rows = [r for r in read_rows(self.path) if r.get("epoch", -1) < epoch]
        write_rows(self.path, [*rows, row], first=("epoch", "step"))


def plot_curves(rows: list[dict[str, Any]], out: Path | str, *, x: str = "epoch", title: str = "") -> Path:
    """PNG of loss and Dice curves (``train_loss``, ``val_loss``, ``val_dice*``) against ``x``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(10, 4))
    xs = [r[x] for r in rows]
    for key in ("train_loss", "val_loss"):
        pts = [(a, r[key]) for a, r in zip(xs, rows) if key in r]
        if pts:
            ax_loss.plot(*zip(*pts), marker=".", label=key)
    for key in ("val_dice", "val_dice_et", "val_dice_tc", "val_dice_wt"):
        pts = [(a, r[key]) for a, r in zip(xs, rows) if key in r]
        if pts:
            ax_dice.plot(*zip(*pts), marker=".", label=key, linewidth=2.5 if key == "val_dice" else 1)
    ax_loss.set(xlabel=x, ylabel="loss", title="loss")
    ax_dice.set(xlabel=x, ylabel="Dice", title="validation Dice", ylim=(0, 1))
    for ax in (ax_loss, ax_dice):
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


class EpochLines(pl.Callback):
    """One progress line per ``every`` epochs (and the last): epoch k/n, train loss, val_dice, time left.

    ``print_line`` is where the lines go (``fedseg.run.console.Console.print``); Lightning's own
    progress bar is off in a quiet run, since it draws on the terminal the libraries' logs no longer use.
    """

    def __init__(self, print_line: Any, every: int = 1, label: str = "") -> None:
        self.print_line = print_line
        self.every = max(1, every)
        self.label = label
        self._started = 0.0
        self._first_epoch = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import time

        self._started, self._first_epoch = time.monotonic(), trainer.current_epoch

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import time

        epoch, total = trainer.current_epoch + 1, trainer.max_epochs
        if epoch % self.every and epoch != total:
            return
        metrics = trainer.callback_metrics
        done = epoch - self._first_epoch
        left = (time.monotonic() - self._started) / done * (total - epoch) if done else 0.0
        parts = [f"{self.label}epoch {epoch}/{total}"]
        parts += [f"{name} {float(metrics[name]):.4f}" for name in ("train_loss", "val_dice") if name in metrics]
        parts.append(f"about {int(left // 60)} min {int(left % 60):02d} s left" if left >= 1 else "")
        self.print_line("  ".join(p for p in parts if p))
