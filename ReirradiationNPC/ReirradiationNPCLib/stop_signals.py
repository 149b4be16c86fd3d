"""SIGTERM handled as Ctrl-C by the long-running servers (``reirradiation-npc review`` and its ``--per-viewer``
launcher): a service manager's stop then takes the same clean way out as Ctrl-C (``KeyboardInterrupt``)."""

from __future__ import annotations

import signal
from contextlib import contextmanager


def _interrupt(signum, frame):
    raise KeyboardInterrupt


@contextmanager
def sigterm_as_ctrl_c():
    """Within the block, SIGTERM raises ``KeyboardInterrupt`` in the main thread (as Ctrl-C does); the previous
    SIGTERM handler is put back on the way out. Main thread only (Python's rule for ``signal.signal``)."""
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
