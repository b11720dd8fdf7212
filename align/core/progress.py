"""Progress of long work: a tqdm bar on a terminal, plain lines elsewhere.

tqdm hides its bar when stderr is not a terminal (CI logs, nohup, a pipe), and a 15-minute
generation then prints nothing. Here the same loop prints a line every `every` seconds and
one at the end instead. Only the main process of a distributed run reports.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def _main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


class Progress:
    """`update(n)` as work gets done, `close()` at the end (or use it as a context manager)."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", every: float = 30.0, stream=None):
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.stream = stream or sys.stderr
        self.done = 0
        self._start = self._last = time.monotonic()
        self._bar = None
        self._printed = False
        self._quiet = not _main_process()
        self._lines = not self._quiet and not (hasattr(self.stream, "isatty") and self.stream.isatty())
        if not self._quiet and not self._lines:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=f" {unit}", file=self.stream, leave=False)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self._lines and time.monotonic() - self._last >= self.every:
            self._line()

    def _line(self, final: bool = False) -> None:
        self._printed = True
        self._last = time.monotonic()
        elapsed = self._last - self._start
        of = f"/{self.total}" if self.total is not None else ""
        text = f"[align] {self.desc}: {self.done}{of} {self.unit} in {elapsed:.0f} s"
        if not final and self.total and self.done:
            text += f", about {elapsed / self.done * (self.total - self.done):.0f} s left"
        print(text + (" (done)" if final else ""), file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self._lines and self._printed:  # short work needs no closing line
            self._line(final=True)
            self._lines = False

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(items: Iterable[T], desc: str, total: int | None = None, unit: str = "it", every: float = 30.0) -> Iterator[T]:
    """Iterate over `items`, reporting progress as `Progress` does."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with Progress(total, desc, unit, every) as bar:
        for item in items:
            yield item
            bar.update(1)
