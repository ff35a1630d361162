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


class Signals:
    """The first stopping signal received, if any: a signal that lands inside an import or a C call
    can surface as another exception (ImportError: initialization failed), so the caller asks here."""

    signum: int | None = None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    @property
    def exit_status(self) -> int:
        return (
            130 if self.signum == signal.SIGINT else 128 + (self.signum or 0)
        )  # as a shell reports it


@contextlib.contextmanager
def stop_as_exception() -> Iterator[Signals]:
    """Within the block (main thread only), SIGTERM and SIGHUP raise Stopped and SIGINT
    KeyboardInterrupt, each recorded in the yielded Signals; a second signal while the first unwinds
    is ignored, so the clean-up runs to its end."""
    received = Signals()
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum: int, frame: object) -> None:
        if received.signum is None:
            received.signum = signum
            raise KeyboardInterrupt if signum == signal.SIGINT else Stopped(signum)

    previous = {s: signal.signal(s, handler) for s in (*STOPPING, signal.SIGINT)}
    try:
        yield received
    finally:
        for s, old in previous.items():
            signal.signal(s, old)
