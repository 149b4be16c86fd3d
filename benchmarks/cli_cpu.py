"""Wall and CPU time of whole CLI commands (``run``, ``demo``) for two code trees, alternating, in one benchmark.

Each run is a fresh ``python -m ReirradiationNPCLib.cli ...`` subprocess with the tree's engine first on
``PYTHONPATH``. CPU time is the subprocess's user + system time from ``getrusage(RUSAGE_CHILDREN)``, which includes
every process it forked and waited for (the report's figure processes, the scene's child process); the load average
(1 min) is read before and after each run. The slowest stages of results.json ``timings`` are kept too.

    python benchmarks/cli_cpu.py --before /path/to/old/checkout --after . --repeats 3 -- run CASE.yaml
    python benchmarks/cli_cpu.py --before OLD --after . --repeats 3 --results-subdir results -- demo

The output folder is appended (``--output DIR``). Prints a markdown table (median of the repeats, and each run).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_once(tree: Path, args: list[str], out: Path, results_subdir: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree / "ReirradiationNPC"))
    env.pop("CI", None)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load0 = os.getloadavg()[0]
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "ReirradiationNPCLib.cli", *args, "--output", str(out), "--overwrite"],
                       env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode:
        raise SystemExit(f"run failed ({tree}): {p.stderr.strip()[-2000:]}")
    res = json.loads((out / results_subdir / "results.json").read_text()) if results_subdir else \
        json.loads((out / "results.json").read_text())
    return {"wall": wall, "user": after.ru_utime - before.ru_utime, "sys": after.ru_stime - before.ru_stime,
            "cpu": after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime,
            "peak_gib": after.ru_maxrss / 2 ** 20, "load0": load0, "load1": os.getloadavg()[0],
            "timings": res.get("timings", {})}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", type=Path, required=True)
    ap.add_argument("--after", type=Path, required=True)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--results-subdir", default="", help="where results.json is under --output (demo: results)")
    ap.add_argument("--json", type=Path, help="also write the raw runs here")
    ap.add_argument("command", nargs=argparse.REMAINDER)
    a = ap.parse_args(argv)
    cmd = [c for c in a.command if c != "--"]
    trees = {"before": a.before.resolve(), "after": a.after.resolve()}
    runs: dict[str, list[dict]] = {k: [] for k in trees}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.repeats):
            for k, tree in trees.items():
                d = run_once(tree, cmd, Path(tmp) / k, a.results_subdir)
                runs[k].append(d)
                print(f"{k} run {r + 1}: wall {d['wall']:.2f} s, CPU {d['cpu']:.2f} s (user {d['user']:.2f}, "
                      f"sys {d['sys']:.2f}), load {d['load0']:.1f} -> {d['load1']:.1f}", file=sys.stderr, flush=True)
    if a.json:
        a.json.write_text(json.dumps(runs, indent=1))

    def med(k, f):
        return statistics.median(f(d) for d in runs[k])

    print(f"`reirradiation-npc {' '.join(cmd)}`, {a.repeats} runs per tree, alternating; median:\n")
    print("| | wall (s) | CPU user+sys incl. children (s) | peak (GiB) | load average before -> after |")
    print("| --- | ---: | ---: | ---: | --- |")
    for k in trees:
        print(f"| {k} | {med(k, lambda d: d['wall']):.2f} | {med(k, lambda d: d['cpu']):.2f} | "
              f"{med(k, lambda d: d['peak_gib']):.2f} | "
              + ", ".join(f"{d['load0']:.1f} -> {d['load1']:.1f}" for d in runs[k]) + " |")
    print("\nSlowest stages (results.json timings, wall s, median):\n")
    names = list(dict.fromkeys(n for k in trees for d in runs[k] for n in d["timings"]))
    rows = []
    for n in names:
        b = [d["timings"][n] for d in runs["before"] if n in d["timings"]]
        f = [d["timings"][n] for d in runs["after"] if n in d["timings"]]
        rows.append((n, statistics.median(b) if b else None, statistics.median(f) if f else None))
    print("| stage | before | after |")
    print("| --- | ---: | ---: |")
    for n, b, f in sorted(rows, key=lambda r: -max(r[1] or 0, r[2] or 0)):
        if max(b or 0, f or 0) >= 0.05:
            print(f"| {n} | {'' if b is None else f'{b:.2f}'} | {'' if f is None else f'{f:.2f}'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
