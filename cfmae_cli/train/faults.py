"""Preemption: SIGTERM / SIGINT ask the engine to finish the current optimizer step, save, and exit."""

from __future__ import annotations

import logging
import signal
from types import FrameType
from typing import Any, TypeVar

log = logging.getLogger(__name__)


class Preempted(Exception):
    """The run stopped on a signal after saving a checkpoint that ``--resume`` continues."""

    def __init__(self, signum: int, step: int, checkpoint: str):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint {checkpoint}")


_Catcher = TypeVar("_Catcher", bound="SignalCatcher")


class SignalCatcher:
    """A context manager that routes SIGTERM and SIGINT to :meth:`_handle` inside it (from the main thread; in
    another, signals are left to the caller) and puts the previous handlers back on leaving. ``signum``: the
    last signal caught, None until one arrives."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum

    def __enter__(self: _Catcher) -> _Catcher:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals to the caller
                pass
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class StopRequest(SignalCatcher):
    """Installs SIGTERM/SIGINT handlers that only record the request; a second SIGINT interrupts at once.

    Use as a context manager around the training loop; ``signum`` is None until a signal arrives.
    """

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("%s received: finishing the current step, then saving a checkpoint",
                    signal.Signals(signum).name)


def shut_down_workers(batches: object) -> None:
    """Stop the worker processes of a DataLoader iterator now (torch's multi-process iterator; anything else is
    left alone). Not left to the garbage collector: the workers ignore SIGTERM (:func:`ignore_stop_signals`),
    so an iterator that outlived its run would make the interpreter's exit, which terminates leftover workers
    with SIGTERM and waits for them, wait for ever."""
    shutdown = getattr(batches, "_shutdown_workers", None)  # torch's private API, stable since 1.x
    if shutdown is not None:
        shutdown()


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: workers leave SIGTERM/SIGINT to the main process, which saves and
    then shuts them down (a worker killed by the signal would abort the save)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
