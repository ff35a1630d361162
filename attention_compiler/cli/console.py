"""What a command-line script tells its user: lines of output, and progress for slow steps.

With --json, stdout carries only the JSON summary, so the lines move to stderr; --quiet drops both.
A reader that goes away (``compile.py ... | head -1``) does not stop the work: later lines are dropped.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator
from typing import TextIO


class Console:
    def __init__(
        self,
        *,
        quiet: bool = False,
        json_mode: bool = False,
        delay: float = 1.0,
        tick: float = 0.5,
        stdout: TextIO | None = None,
        stderr: TextIO | None = None,
    ) -> None:
        self._lines = (
            None if quiet else ((stderr or sys.stderr) if json_mode else (stdout or sys.stdout))
        )
        self._progress = None if quiet else (stderr or sys.stderr)
        self._delay, self._tick = delay, tick

    def say(self, text: str) -> None:
        if self._lines is not None:
            emit(text, self._lines)

    @contextlib.contextmanager
    def step(self, label: str) -> Iterator[None]:
        """Names ``label`` once it has run longer than ``delay`` seconds and then its time when it ends;
        on a terminal the elapsed seconds tick on one line. Quick steps print nothing."""
        stream = self._progress
        if stream is None:
            yield
            return
        tty = stream.isatty()
        start, done, shown = time.perf_counter(), threading.Event(), threading.Event()

        def watch() -> None:
            if done.wait(self._delay):
                return
            shown.set()
            if not tty:
                emit(f"{label}...", stream)
            while True:
                if tty:
                    emit(f"\r{label}... {time.perf_counter() - start:.0f} s", stream, end="")
                if done.wait(self._tick):
                    return

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        outcome = "failed"
        try:
            yield
            outcome = "done"
        finally:
            done.set()
            watcher.join()
            if shown.is_set():
                emit(
                    f"{chr(13) if tty else ''}{label}: {outcome} in {time.perf_counter() - start:.1f} s",
                    stream,
                )


def emit(text: str, stream: TextIO, end: str = "\n") -> None:
    """print, but a closed pipe points the stream at /dev/null instead of raising (and again at exit)."""
    try:
        print(text, end=end, file=stream, flush=True)
    except BrokenPipeError:
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())
        except (OSError, ValueError):  # not a real file: nothing to redirect
            pass
