"""Preemption: SIGTERM / SIGUSR1 (SLURM preemption or requeue) end a cell at an epoch boundary.

The training loops (peft_core/train.py, peft_core/batched.py) check the flag at
each epoch end, save their state and raise :class:`Preempted`; the rerun resumes.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """Raised after the training state was saved on SIGTERM/SIGUSR1."""


@contextmanager
def preemption_flag():
    """SIGTERM / SIGUSR1 (SLURM preemption or requeue) set a flag the loop checks at each epoch end.

    Saving at an epoch boundary keeps the resumed run bit-identical on CPU: the
    data order generator, the global RNG and the optimiser are all at a clean state.
    """
    flag = {"hit": False}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    old = {s: signal.signal(s, lambda signum, frame: flag.update(hit=True)) for s in PREEMPT_SIGNALS}
    try:
        yield flag
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
