"""SIGTERM and SIGHUP as exceptions, as SIGINT already is, so that a script stopped by a job runner,
a closed terminal or ``timeout`` unwinds its ``with`` blocks and leaves no staging folder behind."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

STOPPING = (signal.SIGTERM, signal.SIGHUP)


class Stopped(BaseException):
    """The process was asked to stop by ``signum``; like KeyboardInterrupt, not an error of the work."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        return 128 + self.signum  # the status a shell reports for a process the signal killed


@contextlib.contextmanager
def stop_as_exception() -> Iterator[None]:
    """Within the block (main thread only), SIGTERM and SIGHUP raise Stopped; a second signal while
    the first unwinds is ignored, so the clean-up runs to its end."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stopping = []

    def handler(signum: int, frame: object) -> None:
        if not stopping:
            stopping.append(signum)
            raise Stopped(signum)

    previous = {s: signal.signal(s, handler) for s in STOPPING}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)
