"""Preemption: turn SIGTERM / SIGINT into "finish this step, save a checkpoint, exit 0".

    with PreemptionWatcher() as watcher:
        for step in ...:
            ...one step...
            if watcher.should_stop(step):
                save a checkpoint; raise Preempted(...)

Single process: Python handlers for SIGTERM and SIGINT only set a flag; the loop checks it after
every step. A second SIGINT (Ctrl-C twice) raises KeyboardInterrupt at once.

Several processes (jax.distributed): every process must stop after the same step, or the
next collective hangs. JAX's preemption service (started by jax.distributed.initialize)
catches SIGTERM on any host and agrees on a step; `should_stop` asks it every step through
`multihost_utils.reached_preemption_sync_point`. No Python SIGTERM handler is installed then
(it would replace JAX's); SIGINT keeps its default behaviour.
"""

from __future__ import annotations

import signal
import threading

import jax


class Preempted(SystemExit):
    """Raised after a preemption checkpoint is saved. A SystemExit with code 0: uncaught, the
    process exits successfully; a caller that runs the loop in-process can catch it."""

    def __init__(self, message: str, step: int, checkpoint: str):
        super().__init__(0)
        self.message, self.step, self.checkpoint = message, step, checkpoint

    def __str__(self) -> str:
        return self.message


class PreemptionWatcher:
    """Context manager: while inside, SIGTERM/SIGINT request a stop at the next step boundary."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)):
        self.signals = signals
        self.received: str | None = None  # name of the first signal received, e.g. 'SIGTERM'
        self._previous: dict[int, object] = {}
        self._multi = jax.process_count() > 1

    def start(self) -> PreemptionWatcher:
        """Install the handlers (see the module docstring for several processes)."""
        # Several processes: JAX's preemption service owns SIGTERM, and SIGINT on one host cannot
        # stop all hosts at one step. Threads other than the main one cannot set handlers.
        if self._multi or threading.current_thread() is not threading.main_thread():
            return self
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def stop(self) -> None:
        """Put the previous handlers back."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self) -> PreemptionWatcher:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt(f"second {name}: stopping without a checkpoint")
        self.received = self.received or name
        if jax.process_index() == 0:
            print(f"received {name}: finishing the current step, then saving a checkpoint "
                  f"(send SIGINT again to stop at once)", flush=True)

    def should_stop(self, step: int) -> bool:
        """Whether to stop after `step` (called once per step, with the same steps on every process)."""
        if self._multi:
            from jax.experimental import multihost_utils

            try:
                reached = multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError:  # jax_enable_preemption_service is off: no agreed stop is possible
                return False
            if reached:
                self.received = self.received or "SIGTERM"
            return reached
        return self.received is not None
