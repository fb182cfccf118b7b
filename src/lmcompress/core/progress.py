"""Progress that suits where output goes: a tqdm bar with an ETA on a terminal, and a plain line every
`interval` seconds otherwise (logs and CI get a few readable lines, not thousands of carriage returns)."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
log = logging.getLogger("lmcompress")
PLAIN_INTERVAL_S = 30.0


def _format_seconds(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def track(items: Iterable[T], total: int | None = None, desc: str = "", enabled: bool = True,
          unit: str = "it", interval: float = PLAIN_INTERVAL_S,
          status: Callable[[], str] | None = None) -> Iterator[T]:
    """Iterate `items`, reporting progress as suits the terminal (or not at all when disabled).
    `status` adds a short live figure (a loss, say) to the bar or line."""
    if not enabled:
        yield from items
        return
    if sys.stderr.isatty():
        bar = tqdm(items, total=total, desc=desc, unit=unit, leave=False)
        for item in bar:
            yield item
            if status is not None:
                bar.set_postfix_str(status(), refresh=False)
        return
    start = last = time.perf_counter()
    for done, item in enumerate(items, 1):
        yield item
        now = time.perf_counter()
        if now - last >= interval and total:
            eta = (now - start) / done * (total - done)
            log.info("%s: %d/%d %s (%.0f%%), %s elapsed, about %s left%s", desc, done, total, unit,
                     100 * done / total, _format_seconds(now - start), _format_seconds(eta),
                     f"; {status()}" if status is not None else "")
            last = now
