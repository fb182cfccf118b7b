"""Progress that suits where output goes: a tqdm bar with an ETA on a terminal, and a plain line every
`interval` seconds otherwise (logs and CI get a few readable lines, not thousands of carriage returns)."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
log = logging.getLogger("lmcompress")
PLAIN_INTERVAL_S = 30.0


def _format_seconds(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def track(items: Iterable[T], total: int | None = None, desc: str = "", enabled: bool = True,
          unit: str = "it", interval: float = PLAIN_INTERVAL_S) -> Iterator[T]:
    """Iterate `items`, reporting progress as suits the terminal (or not at all when disabled)."""
    if not enabled:
        yield from items
        return
    if sys.stderr.isatty():
        yield from tqdm(items, total=total, desc=desc, unit=unit, leave=False)
        return
    start = last = time.perf_counter()
    for done, item in enumerate(items, 1):
        yield item
        now = time.perf_counter()
        if now - last >= interval and total:
            eta = (now - start) / done * (total - done)
            log.info("%s: %d/%d %s (%.0f%%), %s elapsed, about %s left", desc, done, total, unit,
                     100 * done / total, _format_seconds(now - start), _format_seconds(eta))
            last = now
