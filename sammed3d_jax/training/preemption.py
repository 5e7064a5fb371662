"""Stopping a run cleanly: SIGTERM/SIGINT handling, the cross-process agreement on the step, and how runs end.

:class:`StopSignals` turns the first SIGTERM (pre-emption on TPU VMs, spot GPUs, SLURM's ``--signal``, k8s) or
SIGINT (Ctrl-C) into a flag; a second SIGINT aborts at once (KeyboardInterrupt). The loop feeds the flag with its
batch rows (``batch["stop"]``) and the train step returns the maximum over the global batch as ``metrics["stop"]``,
a replicated value every process reads after the same step: that is how all processes agree on the step at which
they save and leave, with no extra collective and the same code for one process or a pod. (JAX's own preemption
sync service, which Orbax's preemption policy uses, sees only SIGTERM on multi-process jobs; this covers SIGINT and
single-process runs too.)

:class:`RunStopped` and its subclasses carry the one-line message and exit status of a run that ended early.
Must not import jax, data/ or ml_collections.
"""

import signal
import threading
from collections.abc import Iterable

EXIT_PREEMPTED = 143  # 128 + SIGTERM, what schedulers expect from a job that honoured the signal.
EXIT_INTERRUPTED = 130  # 128 + SIGINT.
EXIT_DIVERGED = 3


class RunStopped(Exception):
    """A run that ended before ``total_steps``: ``str(err)`` is the one-line message, ``exit_status`` the code."""

    exit_status = 1


class Preempted(RunStopped):
    """Stopped by SIGTERM/SIGINT after saving a checkpoint."""

    def __init__(self, message: str, exit_status: int):
        super().__init__(message)
        self.exit_status = exit_status


class Diverged(RunStopped):
    """Stopped because updates kept being skipped for non-finite gradients, or params became non-finite."""

    exit_status = EXIT_DIVERGED


class StopSignals:
    """Context manager recording the first SIGTERM/SIGINT instead of dying; restores the old handlers on exit.

    Only the main thread can install signal handlers; elsewhere (a notebook thread) this is a no-op that never
    requests a stop.

    Args:
      signals: the signals to catch.
    """

    def __init__(self, signals: Iterable[int] = (signal.SIGTERM, signal.SIGINT)):
        self._signals = tuple(signals)
        self._previous: dict[int, object] = {}
        self.received: int | None = None

    def _handle(self, signum, frame):
        del frame
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # Second Ctrl-C: the user does not want to wait for the checkpoint.
        if self.received is None:
            self.received = signum

    @property
    def requested(self) -> bool:
        """Whether a stop signal arrived."""
        return self.received is not None

    @property
    def name(self) -> str:
        """The received signal's name (``"SIGTERM"``), or ``""``."""
        return signal.Signals(self.received).name if self.received is not None else ""

    @property
    def exit_status(self) -> int:
        """128 + the signal number, or the pre-emption status when the stop came from another process."""
        return EXIT_INTERRUPTED if self.received == signal.SIGINT else EXIT_PREEMPTED

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in self._signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
