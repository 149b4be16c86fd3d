"""Stage timings of a run: a progress callable that also records how long each announced stage took.

Each ``clock(message)`` closes the stage announced by the previous message and opens a new one named by this
message; ``timings()`` returns {stage message: wall seconds} in the order the stages ran (results.json
``timings``; a stage announced twice is summed). The wrapped progress callable (e.g. the CLI's progress lines) is
called unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class StageClock:
    """Progress pass-through that times stages (wall seconds, ``time.perf_counter``)."""

    def __init__(self, progress: Callable[[str], None] | None = None):
        self._progress = progress
        self._stage: str | None = None
        self._t = time.perf_counter()
        self._timings: dict[str, float] = {}

    def __call__(self, message: str) -> None:
        self._close()
        self._stage = message
        if self._progress is not None:
            self._progress(message)

    def _close(self) -> None:
        now = time.perf_counter()
        if self._stage is not None:
            self._timings[self._stage] = self._timings.get(self._stage, 0.0) + (now - self._t)
        self._t = now

    def add(self, stage: str, seconds: float) -> None:
        """Record a stage timed elsewhere (e.g. in a child process running beside the announced stages)."""
        self._timings[stage] = self._timings.get(stage, 0.0) + float(seconds)

    def timings(self) -> dict[str, float]:
        """{stage: seconds} so far, the running stage included up to now."""
        self._close()
        return {k: round(v, 3) for k, v in self._timings.items()}
