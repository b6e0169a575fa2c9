"""A dependency-free progress line on stderr (the device runtime has no tqdm)."""

from __future__ import annotations

import time
from typing import TextIO

from edgeship.quiet import terminal_err


def bar(fraction: float, width: int = 20) -> str:
    """``[########------------]  40%`` (ASCII: device consoles and CI logs are not always UTF-8)."""
    f = min(max(fraction, 0.0), 1.0)
    n = round(f * width)
    return f"[{'#' * n}{'-' * (width - n)}] {f * 100:3.0f}%"


class Progress:
    def __init__(self, label: str, enabled: bool = True, stream: TextIO | None = None, every_s: float = 0.5) -> None:
        self.label = label
        self.enabled = enabled
        self.stream = stream or terminal_err()  # the real stderr even while other output goes to a log
        self.every_s = every_s
        self._tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        # A log (not a terminal) gets a line every 5 s and the final one: a run shorter than that is one line.
        self._last = 0.0 if self._tty else time.monotonic()

    def due(self) -> bool:
        """Whether an update would print now; lets hot loops skip formatting the text."""
        return self.enabled and time.monotonic() - self._last >= (self.every_s if self._tty else 5.0)

    def update(self, text: str, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < (self.every_s if self._tty else 5.0):
            return
        self._last = now
        end = "\r" if self._tty and not force else "\n"
        self.stream.write(f"[{self.label}] {text}\x1b[K{end}" if self._tty else f"[{self.label}] {text}{end}")
        self.stream.flush()

    def done(self, text: str) -> None:
        self.update(text, force=True)
