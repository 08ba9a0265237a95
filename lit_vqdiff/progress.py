"""Progress of long commands: a bar on a terminal, plain lines in a log.

A progress bar redraws itself with carriage returns, which in a file or a pipe (a cluster
job's log, `make ... | tee`) become one unreadable line. ``progress`` draws a tqdm bar
when stderr is a terminal, and otherwise prints a plain line now and then: at most every
``every_s`` seconds, and at the end.
"""

from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, TextIO, TypeVar

from tqdm import tqdm

T = TypeVar("T")
EVERY_S = 30.0


def progress(items: Iterable[T], desc: str, total: int | None = None, unit: str = "it", enabled: bool = True,
             stream: TextIO | None = None, every_s: float = EVERY_S) -> Iterator[T]:
    """``items`` unchanged, reporting how far through them the caller is (see the module docstring)."""
    stream = stream or sys.stderr
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    if not enabled:
        yield from items
    elif stream.isatty():
        yield from tqdm(items, desc=desc, total=total, unit=unit, leave=False, file=stream)
    else:
        yield from _plain(items, desc, total, unit, stream, every_s)


def _plain(items: Iterable[T], desc: str, total: int | None, unit: str, stream: TextIO, every_s: float) -> Iterator[T]:
    start = last = time.monotonic()
    done = 0
    for item in items:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= every_s:
            last = now
            stream.write(_line(desc, done, total, unit, now - start) + "\n")
            stream.flush()
    stream.write(_line(desc, done, total, unit, time.monotonic() - start, finished=True) + "\n")
    stream.flush()


def _line(desc: str, done: int, total: int | None, unit: str, seconds: float, finished: bool = False) -> str:
    rate = done / seconds if seconds > 0 else 0.0
    of = f"/{total}" if total else ""
    state = "done" if finished else (f"~{(total - done) / rate:.0f} s left" if total and rate > 0 else "")
    units = unit + ("es" if unit.endswith(("s", "sh", "ch", "x")) else "s")
    return f"{desc}: {done}{of} {units} in {seconds:.0f} s ({rate:.1f} {unit}/s){', ' + state if state else ''}"
