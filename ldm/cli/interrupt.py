"""Ctrl-C ends a run with one line and exit status 130 (128 + SIGINT, the shell's convention) instead of a
traceback: "interrupted after N of M images; the written ones are complete". They are complete because every
PNG is written under a temporary name and then linked to its final one (ldm/png_info.py), so an interruption
leaves either a whole image or none.
"""

from __future__ import annotations

import contextlib
import signal
import threading

EXIT_INTERRUPTED = 130


@contextlib.contextmanager
def deferred_interrupt():
    """Hold Ctrl-C until the block is done (writing a file and counting it), then raise it: so the count
    in the message is exactly the files on disk."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


class Progress:
    """The images a run will write (`total`, None until known) and has written; the run updates it."""

    def __init__(self):
        self.total: int | None = None
        self.written = 0

    def reset(self) -> None:
        self.total, self.written = None, 0

    def start(self, total: int) -> None:
        self.total, self.written = total, 0

    def wrote(self, n: int = 1) -> None:
        self.written += n

    def message(self) -> str:
        if self.total is None:
            return "interrupted before the run started; nothing was written"
        return f"interrupted after {self.written} of {self.total} images; the written ones are complete"


PROGRESS = Progress()
