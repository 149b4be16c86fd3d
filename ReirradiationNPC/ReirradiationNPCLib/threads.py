"""Independent work items a few at a time in threads (SimpleITK's readers and filters and numpy's sorts run without
the GIL, so on 2 cores two items overlap)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence


def map_in_order(fn: Callable, items: Sequence, threads: int) -> list:
    """``[fn(x) for x in items]``, at most ``threads`` items at a time (and no more than the CPUs): results in the
    items' order, the first error raised. One thread (or one item): a plain loop in this thread."""
    n = max(1, min(int(threads), os.cpu_count() or 1, len(items)))
    if n == 1:
        return [fn(x) for x in items]
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(fn, items))
