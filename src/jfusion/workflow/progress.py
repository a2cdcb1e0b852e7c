"""Progress on stderr: phases as lines, and a bar where the work has a length.

Results go to stdout, progress to stderr, so ``jfusion ... > results.txt`` keeps only the
results. The bar is tqdm's when tqdm is installed, else a small one of our own; either is
drawn only when stderr is a terminal. Elsewhere (a log file, a pipe, a test) each step is
one plain line instead, so logs stay readable.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable, TextIO

try:  # optional: pip install tqdm (the "cli" extra)
    import tqdm as _tqdm
except ImportError:  # pragma: no cover - depends on the environment
    _tqdm = None


def log(message: str) -> None:
    """One line of progress on stderr."""
    print(message, file=sys.stderr, flush=True)


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or replaced streams
        return False


class _PlainBar:
    """A one-line bar redrawn with carriage returns (when tqdm is missing)."""

    def __init__(self, total: int, description: str, stream: TextIO):
        self.total, self.description, self.stream = total, description, stream
        self.done, self.postfix, self.start = 0, "", time.perf_counter()
        self._draw()

    def _line(self) -> str:
        width = 24
        filled = width * self.done // max(self.total, 1)
        elapsed = time.perf_counter() - self.start
        postfix = f"  {self.postfix}" if self.postfix else ""
        return (
            f"{self.description}: [{'#' * filled}{'.' * (width - filled)}] "
            f"{self.done}/{self.total} {elapsed:.1f} s{postfix}"
        )

    def _draw(self) -> None:
        self.stream.write("\r\033[K" + self._line())
        self.stream.flush()

    def update(self, postfix: str) -> None:
        self.done += 1
        self.postfix = postfix
        self._draw()

    def status(self, postfix: str) -> None:
        self.postfix = postfix
        self._draw()

    def write(self, line: str, file: TextIO) -> None:
        self.stream.write("\r\033[K")
        self.stream.flush()
        print(line, file=file, flush=True)
        self._draw()

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


class _TqdmBar:
    def __init__(self, total: int, description: str, stream: TextIO):
        self.bar = _tqdm.tqdm(total=total, desc=description, file=stream, leave=True, dynamic_ncols=True)

    def update(self, postfix: str) -> None:
        self.bar.set_postfix_str(postfix, refresh=False)
        self.bar.update(1)

    def status(self, postfix: str) -> None:
        self.bar.set_postfix_str(postfix, refresh=True)

    def write(self, line: str, file: TextIO) -> None:
        self.bar.write(line, file=file)

    def close(self) -> None:
        self.bar.close()


class Progress:
    """Progress through ``total`` steps named ``description``.

    ``step(text)`` marks one step done (``text``: what it left, e.g. its loss);
    ``result(line)`` prints a line of results to stdout without tearing the bar. Use it as a
    context manager. ``bar=None`` draws a bar only when stderr is a terminal; otherwise every
    step is a line ``description i/total: text`` on stderr.
    """

    def __init__(self, total: int, description: str, *, bar: bool | None = None, stream: TextIO | None = None):
        self.total, self.description = total, description
        self.stream = sys.stderr if stream is None else stream
        self.done = 0
        draw = _is_terminal(self.stream) if bar is None else bar
        self._bar: Any = None
        if draw:
            self._bar = (_TqdmBar if _tqdm is not None else _PlainBar)(total, description, self.stream)

    def status(self, text: str) -> None:
        """Say what the current step is doing (e.g. "compiling"): the bar's postfix, or a line."""
        if self._bar is not None:
            self._bar.status(text)
        else:
            print(f"{self.description} {self.done + 1}/{self.total}: {text}", file=self.stream, flush=True)

    def step(self, text: str = "") -> None:
        """Mark a step done; ``text`` (e.g. its loss) is shown on the bar, or as a line."""
        self.done += 1
        if self._bar is not None:
            self._bar.update(text)
        elif text:
            print(f"{self.description} {self.done}/{self.total}: {text}", file=self.stream, flush=True)

    def result(self, line: str, print_fn: Callable[[str], Any] | None = print) -> None:
        """Print a line of results with ``print_fn`` (None: nowhere); with ``print`` (stdout)
        the bar is cleared first and redrawn below the line."""
        if print_fn is None:
            return
        if print_fn is print and self._bar is not None:
            self._bar.write(line, sys.stdout)
        else:
            print_fn(line)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
