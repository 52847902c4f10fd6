"""Preemption: SIGTERM (what Slurm sends before preempting or killing a job) becomes a flag
the training loop reads at a step boundary, where it checkpoints and stops."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class TrainingPreempted(RuntimeError):
    """SIGTERM arrived during training; a checkpoint was saved and a rerun resumes from it."""


@contextlib.contextmanager
def sigterm_flag() -> Iterator[threading.Event]:
    """Inside, SIGTERM only sets the yielded flag; the loop acts on it at a step boundary."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():  # signals reach only main
        yield flag
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: flag.set())
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)
