"""Pre-emption: SIGTERM / SIGUSR1 ask the run to save and stop at the next step boundary.

The handler only records the signal; the loop checks it after every optimizer step, agreeing
across ranks with an all-reduce (a signal that reached any rank counts for all), then saves a
checkpoint and exits with ``--signal-exit-code`` (default 0). Further signals while saving are
ignored. The same command run again on the same ``--save`` resumes exactly; a run that already
reached its last iteration exits 0 at once, so requeueing after a signal exit is always safe.

Slurm: ``#SBATCH --signal=USR1@180`` sends SIGUSR1 to every task of the job steps 3 minutes
before the time limit. Launch the ranks with ``srun`` (one task per GPU), so each rank receives
it. torchrun does not forward SIGUSR1 by default (it kills torchrun); with torchrun pass
``--signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1``: it then sends SIGTERM to the
workers and kills them after its shutdown timeout (30 s), which must cover one step plus a save.
"""
from __future__ import annotations

import signal

__all__ = ["PreemptionHandler"]

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionHandler:
    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def install(self) -> PreemptionHandler:
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received is None:
            self.received = signum

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else "a signal on another rank"
