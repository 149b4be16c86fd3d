#!/usr/bin/env python3
"""First-render benchmark of ``reirradiation-npc review`` (issue 12: first full render of the demo in the browser
within 10 s of the server answering). Not part of the test suite.

    /work/venv/bin/python benchmarks/review_benchmark.py [--results DIR] [--loads 3] [--keep DIR]

Without ``--results`` it runs ``reirradiation-npc demo`` (this checkout's engine) into a temporary folder first.
Then it starts ``reirradiation-npc review`` as a subprocess on a free local port and measures:

- **HTTP 200**: wall time from starting the command to the first HTTP 200 on ``/`` (Python, slicer-core and trame
  imports, scene.mrb load), with the server process's CPU time at that moment;
- **first full render** (the issue's figure): wall time from that first HTTP 200 until the page in headless Debian
  chromium (Playwright, ``/usr/bin/chromium``) shows the constraint table's rows **and** the views show
  violation-red pixels (> 50 pixels with R > 170, G < 80, B < 80; screenshots of the views polled every 0.25 s).
  It includes launching chromium (a fresh profile) and the first page load;
- **page loads** after that (server warm, a new browser profile each): from ``page.goto`` to the full render;

with the load average (1 min) before and after, and the number of CPUs. Prints a Markdown section for
docs/benchmarks.md. The results folder is checksummed before and after (the review is read-only).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "Testing"))  # the browser helpers the review tests use
from browser_support import (CHROMIUM, CHROMIUM_ARGS, checksums as _checksums,  # noqa: E402
                             free_port as _free_port, png, red_pixels, stop_server as _stop_server,
                             wait_http_200 as _wait_http_200)
TARGET_S = 10.0


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "ReirradiationNPC") + os.pathsep + env.get("PYTHONPATH", "")
    return env




def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")






def _full_render(page, timeout: float = 120.0) -> None:
    """Return when the table has rows and the views show violation red."""
    page.wait_for_selector("tr.constraint-row", timeout=timeout * 1000)
    end = time.monotonic() + timeout
    views = page.locator("#views")
    while red_pixels(png(views.screenshot())) <= 50:
        if time.monotonic() > end:
            raise TimeoutError("no violation-red pixels in the views")
        time.sleep(0.25)


def _load_page(p, url: str) -> tuple:
    """(seconds from browser launch to goto, seconds from goto to full render) with a fresh profile."""
    with tempfile.TemporaryDirectory() as user_dir:
        t0 = time.monotonic()
        ctx = p.chromium.launch_persistent_context(user_dir, executable_path=str(CHROMIUM), args=CHROMIUM_ARGS,
                                                   headless=True, viewport={"width": 1400, "height": 850})
        try:
            page = ctx.new_page()
            t1 = time.monotonic()
            page.goto(url)
            _full_render(page)
            return t1 - t0, time.monotonic() - t1
        finally:
            ctx.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", type=Path, help="a run's output folder (default: run the demo first)")
    ap.add_argument("--loads", type=int, default=3, help="page loads after the first (server warm)")
    ap.add_argument("--keep", type=Path, help="keep the demo in this folder")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    tmp = None
    results = args.results
    if results is None:
        base = args.keep or Path(tempfile.mkdtemp(prefix="review-bench-"))
        tmp = None if args.keep else base
        t = time.monotonic()
        subprocess.run([sys.executable, "-m", "ReirradiationNPCLib.cli", "demo", "-o", str(base / "demo"),
                        "--overwrite"], check=True, env=_env(), stdout=subprocess.DEVNULL)
        print(f"demo: {time.monotonic() - t:.1f} s", file=sys.stderr)
        results = base / "demo" / "results"
    if not (results / "scene.mrb").is_file():
        print(f"{results}: no scene.mrb (the review's views need the scene)", file=sys.stderr)
        return 2
    before = _checksums(results)
    load_before = os.getloadavg()[0]
    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    log = tempfile.TemporaryFile()
    t_start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "ReirradiationNPCLib.cli", "review", str(results),
                             "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, env=_env(),
                            start_new_session=True)
    rows = {}
    try:
        _wait_http_200(url, proc, timeout=300, poll=0.1)
        t_http = time.monotonic()
        rows["http"] = (t_http - t_start, _cpu_s(proc.pid))
        with sync_playwright() as p:
            launch, render = _load_page(p, url)
            rows["first"] = (time.monotonic() - t_http, launch, render, _cpu_s(proc.pid))
            rows["loads"] = [_load_page(p, url)[1] for _ in range(args.loads)]
    finally:
        _stop_server(proc, timeout=30)
        log.close()
    load_after = os.getloadavg()[0]
    unchanged = _checksums(results) == before
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)

    http_s, http_cpu = rows["http"]
    first_s, launch_s, render_s, cpu_at_render = rows["first"]
    loads = rows["loads"]
    met = "met" if first_s <= TARGET_S else "NOT met"
    print(f"## Browser review: first render (`benchmarks/review_benchmark.py`, "
          f"{time.strftime('%H:%M UTC', time.gmtime())})\n")
    print(f"Demo results with scene.mrb; {os.cpu_count()} CPUs ({platform.machine()}), load average (1 min) "
          f"{load_before:.1f} before, {load_after:.1f} after. Headless Debian chromium via Playwright, "
          "1400 x 850 viewport, a fresh profile per load.\n")
    print("| step | wall | note |\n| --- | --- | --- |")
    print(f"| command start -> first HTTP 200 | {http_s:.1f} s | server CPU {http_cpu:.1f} s (imports, scene load) |")
    print(f"| **first HTTP 200 -> first full render** (target <= {TARGET_S:g} s: {met}) | **{first_s:.1f} s** | "
          f"Playwright driver start {first_s - launch_s - render_s:.1f} s + chromium launch {launch_s:.1f} s + "
          f"goto -> table rows and violation red {render_s:.1f} s; server CPU "
          f"{cpu_at_render - http_cpu:.1f} s in that time |")
    if loads:
        print(f"| later page loads, goto -> full render ({len(loads)}) | {min(loads):.1f}-{max(loads):.1f} s "
              f"(median {float(np.median(loads)):.1f} s) | server warm |")
    print(f"\nResults folder checksums unchanged: {'yes' if unchanged else 'NO'}.")
    return 0 if unchanged else 1


if __name__ == "__main__":
    sys.exit(main())
