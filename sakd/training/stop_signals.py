"""Graceful stop: SIGTERM / SIGINT set a flag that the loop reads between optimizer steps."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingStopped(RuntimeError):
    """A stop signal ended training early, after a checkpoint; the run is resumable, not finished."""

    def __init__(self, signum: int, step: int, checkpoint_dir: Path) -> None:
        self.signum, self.step, self.checkpoint_dir = signum, step, checkpoint_dir
        super().__init__(
            f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint {checkpoint_dir} "
            "(run the same command again to resume)"
        )

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 143 for SIGTERM, 130 for SIGINT


class StopSignals:
    """Context manager: while active, the first stop signal only sets :attr:`signum`; a second one
    restores the previous handlers and re-raises (stop now). Handlers are restored on exit."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        self.signum = None
        if threading.current_thread() is threading.main_thread():  # Python only allows it there
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # a second signal: stop now, as if we had no handler
            self._restore()
            signal.raise_signal(signum)
            return
        self.signum = signum
        log.warning(
            "%s received: finishing this step, then checkpointing and stopping", signal.Signals(signum).name
        )
