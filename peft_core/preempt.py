"""The preemption signals (SLURM's requeue SIGTERM, the profile's ``--signal=USR1@120``).

A cell command catches them from its first line, not only while it trains:
SIGUSR1's default action ends the process, so a signal that arrived while it
imported torch, read data, evaluated or wrote results used to kill the cell
with nothing saved (the retry then trained from scratch). Caught early, the
signal is only remembered: the training loop saves its state at the next
epoch end and the command exits with ``EX_TEMPFAIL``; a signal that arrives
after the last epoch changes nothing (the cell completes). Imports nothing
heavy, so the command line can install it before torch loads.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def ignore_step_warning() -> None:
    """Ignore SIGUSR1 in this process (the workflow's Snakemake) and in what it starts.

    SLURM sends the profile's early warning (``--signal=USR1@120``) to every
    process of the job step, not only to the trainer: also to the member's
    ``snakemake --mode remote`` and the rule's shell. SIGUSR1's default action
    ends a process, and once the step's first process has died slurmstepd
    tears the step down, killing the trainer before it reaches the epoch end
    where it would save (on ViT-B an epoch takes minutes; the warning 120 s).
    An ignored signal stays ignored across fork and exec, so the shell and
    every command it runs ignore it too, except the cell commands, which
    replace SIG_IGN with their own handler (:func:`preemption_flag`) and save.
    Snakemake itself gives SIGUSR1 no meaning. Called when the Snakefile is
    parsed; off the main thread Python cannot set handlers, so it does nothing.
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)


class Preempted(Exception):
    """Raised after the training state was saved on SIGTERM/SIGUSR1."""


class _Catcher:
    """A signal handler that records a hit in its flag (``{"hit": bool}``)."""

    def __init__(self) -> None:
        self.flag = {"hit": False}

    def __call__(self, signum, frame) -> None:
        self.flag["hit"] = True


@contextmanager
def preemption_flag() -> Iterator[dict]:
    """Within it, SIGTERM / SIGUSR1 set ``flag["hit"]`` instead of ending the process.

    Nested uses share the outermost flag, so a signal caught before training
    started is seen by the loop. Off the main thread (where Python cannot set
    handlers) the flag simply never fires.
    """
    if threading.current_thread() is not threading.main_thread():
        yield {"hit": False}
        return
    current = signal.getsignal(PREEMPT_SIGNALS[0])
    if isinstance(current, _Catcher):
        yield current.flag
        return
    catcher = _Catcher()
    old = {s: signal.signal(s, catcher) for s in PREEMPT_SIGNALS}
    try:
        yield catcher.flag
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
