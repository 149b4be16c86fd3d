"""Helpers shared by the browser tests of `reirradiation-npc review` (Testing/test_review*.py) and
benchmarks/review_benchmark.py: Debian's headless chromium driven by Playwright, screenshots as arrays."""

from __future__ import annotations

import hashlib
import io
import socket
import time
from pathlib import Path

import numpy as np

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def missing() -> str | None:
    """Why the browser tests cannot run here (the review extra or chromium absent), else None."""
    try:
        import trame_slicer.core  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return f"trame-slicer not importable ({type(exc).__name__}: {exc}); pip install '.[review]'"
    try:
        import playwright.sync_api  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return f"playwright not importable ({exc}); pip install '.[review]'"
    if not CHROMIUM.exists():
        return f"{CHROMIUM} missing (apt-get install chromium)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def checksums(folder: Path) -> dict:
    """SHA-256 of every file below ``folder`` (relative path -> hex digest)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def png(data: bytes) -> np.ndarray:
    """A PNG screenshot as an int16 RGB array."""
    from PIL import Image
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.int16)


def red_pixels(img: np.ndarray) -> int:
    """Pixels of violation red (R > 170, G < 80, B < 80)."""
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    return int(np.count_nonzero((r > 170) & (g < 80) & (b < 80)))


def stable_shot(locator, timeout: float = 40.0) -> np.ndarray:
    """Screenshot of ``locator`` once two consecutive shots 1 s apart are identical (streamed views settled)."""
    end = time.monotonic() + timeout
    prev = png(locator.screenshot())
    while time.monotonic() < end:
        time.sleep(1.0)
        cur = png(locator.screenshot())
        if cur.shape == prev.shape and np.array_equal(cur, prev):
            return cur
        prev = cur
    return prev


def stop_server(proc, timeout: float = 30.0) -> None:
    """Stop a review server started as a subprocess (its own process group) as Ctrl-C would: SIGINT, then SIGKILL
    of its group when it does not end within ``timeout`` seconds."""
    import os
    import signal
    import subprocess
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def wait_http_200(url: str, proc, timeout: float, poll: float = 1.0) -> None:
    """Return at the first HTTP 200 on ``url``; RuntimeError when ``proc`` (the server) exits first, TimeoutError
    after ``timeout`` seconds."""
    import urllib.request
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError("the review server exited early")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"no HTTP 200 from the review server within {timeout:g} s")
        time.sleep(poll)
