"""A quiet terminal for long commands: the libraries' output goes to a log file, the user sees ours.

NVFlare (its simulator runs in child processes, which inherit this process's stdout and stderr),
Lightning and the site scripts print hundreds of lines per run. Inside ``quiet_console(log_file)``
file descriptors 1 and 2 point at ``log_file``, so everything they write, child processes
included, lands there; what fedseg itself shows goes to the ``Console`` the context manager yields,
which writes to the terminal the command started with. With ``verbose=True`` nothing is redirected:
the raw logs stream as before. On an error the console says which log file to read.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO


class Console:
    """Where fedseg's own lines go during a quiet run (the terminal, or pytest's capture)."""

    def __init__(self, stream: TextIO, log_file: Path | None) -> None:
        self.stream = stream
        self.log_file = log_file

    @property
    def is_terminal(self) -> bool:
        return bool(getattr(self.stream, "isatty", lambda: False)())

    def print(self, line: str = "") -> None:
        self.stream.write(line + "\n")
        self.stream.flush()

    def rich(self) -> object:
        """A ``rich.console.Console`` on the same stream (for live displays)."""
        from rich.console import Console as RichConsole

        return RichConsole(file=self.stream, force_terminal=self.is_terminal, soft_wrap=True, highlight=False)


def _fd_backed(stream: TextIO) -> bool:
    try:
        return stream.fileno() in (1, 2)
    except (AttributeError, OSError, io.UnsupportedOperation):
        return False  # e.g. pytest's capsys: a Python-level capture, not a file descriptor


@contextlib.contextmanager
def quiet_console(log_file: Path | str, *, verbose: bool = False) -> Iterator[Console]:
    """Send this process's and its children's output to ``log_file``; yield the user's ``Console``.

    ``verbose``: no redirection (the libraries' logs stream to the terminal as they come).
    """
    log_file = Path(log_file)
    if verbose:
        yield Console(sys.stdout, None)
        return
    log_file.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    user_stream: TextIO = (os.fdopen(os.dup(saved[0]), "w", buffering=1) if _fd_backed(sys.stdout)
                           else sys.stdout)
    console = Console(user_stream, log_file)
    root = logging.getLogger()
    previous_handlers, previous_level = list(root.handlers), root.level
    try:
        with log_file.open("a") as f:
            os.dup2(f.fileno(), 1)
            os.dup2(f.fileno(), 2)
            # Python's own logging and warnings of this process: to the file too (handlers made
            # earlier hold the old stderr object, which now writes to the file as well)
            handler = logging.StreamHandler(f)
            handler.setFormatter(logging.Formatter("%(asctime)s - %(name)s - %(levelname)s - %(message)s"))
            root.handlers = [handler]
            root.setLevel(logging.INFO)
            try:
                yield console  # Python's warnings go to sys.stderr: the file too
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    except BaseException:
        console.print(f"stopped; NVFlare's and Lightning's log of this run: {log_file}")
        raise
    finally:
        root.handlers, root.level = previous_handlers, previous_level
        os.close(saved[0])
        os.close(saved[1])
        if user_stream is not sys.stdout:
            user_stream.close()
